"""Reference data -> dataset -> training -> checkpoint, as real AiiDA processes, and the lineage queries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from aiida import orm
from aiida.common.links import LinkType
from aiida.engine import run_get_node

from aiida_dm21.calculations.reference import DM21ReferenceCalculation
from aiida_dm21.calculations.train import DM21TrainCalculation
from aiida_dm21.data.dataset import DM21DatasetData
from aiida_dm21.provenance import checkpoint_lineage, lineage_tree
from aiida_dm21.workflows.reference_data import ReferenceDataWorkChain, link_label

pytestmark = pytest.mark.aiida

SPECIES = [
    {'label': 'H+', 'atom': 'H 0 0 0', 'charge': 1, 'multiplicity': 1},
    {'label': 'H', 'atom': 'H 0 0 0', 'charge': 0, 'multiplicity': 2},
]


@pytest.fixture(scope='module')
def hydrogen_data(aiida_profile):
    """ReferenceDataWorkChain on H+ and H (FCI, 6-31G): two real reference CalcJobs and a dataset."""
    from aiida_dm21.cli.aiida_support import ensure_code

    code = ensure_code()
    results, node = run_get_node(
        ReferenceDataWorkChain,
        code=code,
        species=orm.List(SPECIES),
        fractional=orm.Dict({'fractional_charge': [['H+', 'H']], 'fractional_spin': ['H'], 'integer': ['H']}),
        reference_method=orm.Str('fci'),
        deltas=orm.List([0.5]),
        spin_fractions=orm.List([0.5]),
    )
    assert node.is_finished_ok, node.exit_message
    return code, results['dataset'], node


def test_reference_data_workchain_builds_a_linked_dataset(hydrogen_data):
    _, dataset, workchain = hydrogen_data
    assert isinstance(dataset, DM21DatasetData)
    assert dataset.n_systems == 3 and dataset.kinds == {'fc': 1, 'fs': 1, 'integer': 1}
    assert dataset.elements == ['H'] and dataset.reference_method == 'fci'
    systems = dataset.load_systems()
    assert {s.label for s in systems} == {'H', 'FC[H+->H]@0.5', 'FS[H]@0.5'}
    calcs = [c for c in workchain.called if c.process_type == 'aiida.calculations:dm21.reference']
    assert len(calcs) == 2 and all(c.is_finished_ok for c in calcs)
    h = next(c for c in calcs if c.inputs.parameters['label'] == 'H')
    params = h.outputs.output_parameters.get_dict()
    from pyscf import gto, scf

    e_uhf = scf.UHF(gto.M(atom='H 0 0 0', basis='6-31g', spin=1, verbose=0)).kernel()
    assert abs(params['e_ref'] - e_uhf) < 1e-8  # one electron: FCI = HF
    builder = dataset.creator
    inputs = {t.node.pk for t in builder.base.links.get_incoming(link_type=LinkType.INPUT_CALC).all()}
    assert {c.outputs.output_arrays.pk for c in calcs} <= inputs


def test_training_and_lineage(hydrogen_data, checkpoint_node):
    code, dataset, _ = hydrogen_data
    results, node = run_get_node(
        DM21TrainCalculation,
        code=code,
        datasets={'hydrogen': dataset},
        heldout={'hydrogen_again': dataset},
        parameters=orm.Dict({'epochs': 2, 'learning_rate': 1e-4, 'grid_level': 0}),
        seed=orm.Int(3),
        initial_checkpoint=checkpoint_node,
        metadata={'options': {'max_wallclock_seconds': 600}},
    )
    assert node.is_finished_ok, node.exit_message
    trained = results['checkpoint']
    assert trained.base.attributes.get('source') == 'trained'
    assert trained.base.attributes.get('weights_sha256') != checkpoint_node.base.attributes.get('weights_sha256')
    curves = results['loss_curves']
    assert list(curves.get_array('epoch')) == [1.0, 2.0] and np.all(np.isfinite(curves.get_array('loss')))
    metrics = results['metrics'].get_dict()
    assert metrics['n_train_systems'] == 3 and 'heldout' in metrics['after']
    json.loads(node.base.repository.get_object_content('config.json'))  # the job folder kept its input

    lineage = checkpoint_lineage(trained)
    assert lineage.training.pk == node.pk
    roles = sorted(d.role for d in lineage.datasets)
    assert roles == ['heldout', 'train']
    refs = lineage.reference_calculations
    assert sorted(r.inputs.parameters['label'] for r in refs) == ['H', 'H+']
    assert set(lineage.datasets[0].systems) == {'H', 'FC[H+->H]@0.5', 'FS[H]@0.5'}
    assert lineage.initial is not None and lineage.initial.checkpoint.pk == checkpoint_node.pk
    assert lineage.initial.training is None and lineage.initial.source == 'deepmind:DM21'
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(lineage_tree(lineage))
    text = console.export_text()
    assert f'DM21TrainCalculation<{node.pk}>' in text and 'imported from DeepMind' in text
    assert 'FC[H+->H]@0.5' in text


def test_lineage_of_a_hand_built_graph(aiida_localhost, checkpoint_node, dm21_checkpoint_file):
    """The lineage walks exactly the links: reference CalcJob -> arrays -> calcfunction -> dataset -> train -> ckpt."""
    from aiida_dm21.data.checkpoint import DM21CheckpointData

    def calc(process_type):
        node = orm.CalcJobNode(computer=aiida_localhost, process_type=process_type)
        node.set_option('resources', {'num_machines': 1})
        return node

    ref = calc('aiida.calculations:dm21.reference')
    params = orm.Dict({'label': 'X', 'basis': 'sto-3g', 'reference_method': 'fci'}).store()
    ref.base.links.add_incoming(params, LinkType.INPUT_CALC, 'parameters')
    ref.store()
    arrays = orm.ArrayData()
    arrays.set_array('dm', np.zeros((2, 1, 1)))
    arrays.base.links.add_incoming(ref, LinkType.CREATE, 'output_arrays')
    arrays.store()
    builder = orm.CalcFunctionNode()
    builder.base.links.add_incoming(arrays, LinkType.INPUT_CALC, 'X_0')
    builder.store()
    dataset = orm.SinglefileData.from_string('x')
    dataset.base.attributes.set('labels', ['FC[X]@0.5'])
    dataset.base.links.add_incoming(builder, LinkType.CREATE, 'result')
    dataset.store()
    train = calc('aiida.calculations:dm21.train')
    train.base.links.add_incoming(dataset, LinkType.INPUT_CALC, 'datasets__x')
    train.base.links.add_incoming(checkpoint_node, LinkType.INPUT_CALC, 'initial_checkpoint')
    train.store()
    trained = DM21CheckpointData(file=str(dm21_checkpoint_file))
    trained.base.links.add_incoming(train, LinkType.CREATE, 'checkpoint')
    trained.store()
    lineage = checkpoint_lineage(trained.pk)
    assert lineage.training.pk == train.pk
    assert [r.pk for r in lineage.reference_calculations] == [ref.pk]
    assert lineage.datasets[0].builder.pk == builder.pk and lineage.datasets[0].systems == ['FC[X]@0.5']
    assert lineage.initial.checkpoint.pk == checkpoint_node.pk


def test_deepmind_checkpoint_has_no_training_lineage(checkpoint_node):
    lineage = checkpoint_lineage(checkpoint_node)
    assert lineage.training is None and lineage.datasets == [] and lineage.reference_calculations == []
    assert lineage.source == 'deepmind:DM21'


def test_bad_reference_inputs_are_refused(aiida_localhost, aiida_code_installed, make_structure, count_nodes):
    import sys

    code = aiida_code_installed(
        label='dm21-python-bad', default_calc_job_plugin='dm21.reference', filepath_executable=sys.executable
    )
    h = make_structure([('H', (0.0, 0.0, 0.0))])
    before = count_nodes()
    cases = [
        ({'basis': '6-31g', 'multiplicity': 1}, 'impossible'),  # one electron cannot be a singlet
        ({'basis': '6-31g', 'multiplicity': 2, 'reference_method': 'mp9'}, 'reference_method'),
        ({'basis': '6-31g', 'multiplicity': 2, 'colour': 'red'}, 'unknown parameters'),
        ({'basis': '6-31g', 'multiplicity': 2, 'reference_method': 'user'}, 'user_energy'),
    ]
    for parameters, match in cases:
        with pytest.raises(ValueError, match=match):
            run_get_node(DM21ReferenceCalculation, code=code, structure=h, parameters=orm.Dict(parameters))
    ne = make_structure([('Ne', (0.0, 0.0, 0.0))])
    with pytest.raises(ValueError, match='FCI is limited'):
        run_get_node(
            DM21ReferenceCalculation,
            code=code,
            structure=ne,
            parameters=orm.Dict({'basis': 'sto-3g', 'reference_method': 'fci'}),
        )
    bad_unit = orm.SinglefileData.from_string(json.dumps({'energy': -0.5, 'unit': 'kJ'}))
    with pytest.raises(ValueError, match='unit'):
        run_get_node(
            DM21ReferenceCalculation,
            code=code,
            structure=h,
            user_energy=bad_unit,
            parameters=orm.Dict({'basis': '6-31g', 'multiplicity': 2, 'reference_method': 'user'}),
        )
    periodic = make_structure([('H', (0.0, 0.0, 0.0))], pbc=(True, True, True))
    with pytest.raises(ValueError, match='periodic'):
        run_get_node(
            DM21ReferenceCalculation,
            code=code,
            structure=periodic,
            parameters=orm.Dict({'basis': '6-31g', 'multiplicity': 2}),
        )
    assert count_nodes() == before


def test_user_energy_in_ev_enters_the_provenance(aiida_code_installed, make_structure):
    import sys

    code = aiida_code_installed(
        label='dm21-python-user', default_calc_job_plugin='dm21.reference', filepath_executable=sys.executable
    )
    energy = orm.SinglefileData.from_string(json.dumps({'energy': -13.6057, 'unit': 'eV'}))
    results, node = run_get_node(
        DM21ReferenceCalculation,
        code=code,
        structure=make_structure([('H', (0.0, 0.0, 0.0))]),
        user_energy=energy,
        parameters=orm.Dict({'basis': '6-31g', 'multiplicity': 2, 'reference_method': 'user', 'label': 'H'}),
    )
    assert node.is_finished_ok and node.inputs.user_energy.pk == energy.pk
    assert abs(results['output_parameters']['e_ref'] - (-13.6057 / 27.211386245988)) < 1e-9


@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='this machine has a GPU')
def test_gpu_training_is_submitted_from_a_cpu_machine_and_refused_where_it_runs(hydrogen_data):
    """device cuda passes validation on a CPU-only submitting machine; the job on a CPU-only node ends in 420."""
    from aiida_dm21.calculations.train import validate_parameters

    code, dataset, _ = hydrogen_data
    assert validate_parameters(orm.Dict({'device': 'cuda:0'})) is None
    _, node = run_get_node(
        DM21TrainCalculation, code=code, datasets={'d': dataset}, parameters=orm.Dict({'device': 'cuda'})
    )
    assert node.exit_status == 420, node.exit_message
    assert 'sees no such CUDA GPU' in node.exit_message and 'does not fall back' in node.exit_message
    assert 'output_checkpoint' not in node.outputs


def test_training_refuses_bad_hyperparameters(hydrogen_data, count_nodes):
    code, dataset, _ = hydrogen_data
    before = count_nodes()
    with pytest.raises(ValueError, match='unknown training hyper-parameters'):
        run_get_node(DM21TrainCalculation, code=code, datasets={'d': dataset}, parameters=orm.Dict({'epoch': 3}))
    with pytest.raises(ValueError, match='device name'):
        run_get_node(DM21TrainCalculation, code=code, datasets={'d': dataset}, parameters=orm.Dict({'device': 'gpu'}))
    refused = [
        ({'batch_size': -2}, '`batch_size` must be an integer >= 1'),
        ({'validation_fraction': 1.0}, '`validation_fraction` must be < 1'),
        ({'learning_rate': float('nan')}, '`learning_rate` must be a finite number > 0'),
        ({'max_grad_norm': -1.0}, '`max_grad_norm` must be a finite number >= 0'),
        ({'kind_weights': {'fc': -1.0}}, 'kind_weights'),
        ({'regulariser_orbital_energies': 'uhf'}, '`regulariser_orbital_energies` must be one of'),
        ({'scf_evaluation': [{'atom': 'H 0 0 0', 'basis': 'sto-3g'}]}, r'`scf_evaluation\[0\]` lacks `e_ref`'),
        ({'fractional_evaluation': {'atom': 'H 0 0 0', 'basis': 'sto-3g', 'spin_next': 2}}, '`spin_next`'),
    ]
    for parameters, match in refused:
        with pytest.raises(ValueError, match=match):
            run_get_node(DM21TrainCalculation, code=code, datasets={'d': dataset}, parameters=orm.Dict(parameters))
    with pytest.raises(ValueError, match='absolute path'):
        run_get_node(
            DM21TrainCalculation, code=code, datasets={'d': dataset}, prepared_folder=orm.Str('relative/prepared')
        )
    assert count_nodes() == before


def test_link_labels():
    assert link_label('H+') == 'H_plus' and link_label('C2H6-') == 'C2H6_minus' and link_label('2x') == 's_2x'


@pytest.mark.slow
def test_train_workchain_resumes_after_walltime(hydrogen_data):
    """A training cut into one-epoch jobs (as if each hit the walltime) resumes from the saved state and
    ends with exactly the weights of an uninterrupted run."""
    from aiida_dm21.workflows.train import DM21TrainWorkChain

    code, dataset, _ = hydrogen_data
    hyper = {'epochs': 2, 'learning_rate': 1e-4, 'grid_level': 0, 'seed': 5}
    straight, straight_node = run_get_node(
        DM21TrainCalculation, code=code, datasets={'h': dataset}, parameters=orm.Dict(hyper)
    )
    assert straight_node.is_finished_ok
    results, node = run_get_node(
        DM21TrainWorkChain,
        train={'code': code, 'datasets': {'h': dataset}, 'parameters': orm.Dict({**hyper, 'epochs_per_job': 1})},
    )
    assert node.is_finished_ok, node.exit_message
    jobs = [c for c in node.called if isinstance(c, orm.CalcJobNode)]
    assert len(jobs) == 2 and jobs[0].exit_status == 310 and jobs[1].exit_status == 0
    assert jobs[1].inputs.parent_folder.pk == jobs[0].outputs.remote_folder.pk
    reports = ' '.join(log.message for log in orm.Log.collection.get_logs_for(node))
    assert 'resuming from its saved state' in reports
    resumed = results['checkpoint'].base.attributes.get('weights_sha256')
    assert resumed == straight['checkpoint'].base.attributes.get('weights_sha256')
    assert list(results['loss_curves'].get_array('epoch')) == [1.0, 2.0]
    # the second job links the first job's prepared data and recomputes nothing
    first, second = (Path(job.outputs.remote_folder.get_remote_path()) for job in jobs)
    assert (second / 'prepared').is_symlink() and (second / 'prepared').resolve() == (first / 'prepared').resolve()
    log = jobs[1].outputs.retrieved.base.repository.get_object_content('aiida.out', mode='r')
    assert '0 systems computed, 3 reused' in log, log


def test_two_process_training_through_torchrun_follows_the_single_process_curve(hydrogen_data):
    """num_processes 2: the dm21.train job runs torchrun (gloo, 2 CPU processes); same loss curve as 1 process."""
    code, dataset, _ = hydrogen_data
    hyper = orm.Dict({'epochs': 2, 'learning_rate': 1e-4, 'grid_level': 0, 'seed': 3, 'batch_size': 2})
    single, single_node = run_get_node(DM21TrainCalculation, code=code, datasets={'h': dataset}, parameters=hyper)
    double, double_node = run_get_node(
        DM21TrainCalculation, code=code, datasets={'h': dataset}, parameters=hyper, num_processes=orm.Int(2)
    )
    assert single_node.is_finished_ok and double_node.is_finished_ok, double_node.exit_message
    script = double_node.base.repository.get_object_content('_aiidasubmit.sh', mode='r')
    assert 'torch.distributed.run' in script and '--nproc_per_node=2' in script
    a, b = (r['loss_curves'].get_array('loss') for r in (single, double))
    assert np.allclose(a, b, rtol=1e-6, atol=1e-9), (a, b)


INJECTED_FAILURE = """\"\"\"aiida-dm21 tests: process 1 of a torchrun training fails in its first step ({mode}),
while process 0 is still computing its own first system (it sleeps there), so that torchrun's SIGTERM reaches
process 0 before any collective could fail.\"\"\"
import os

if os.environ.get('RANK') in ('0', '1'):
    import signal
    import time

    import aiida_dm21.training.prepared as prepared

    original = prepared.compact_energy

    def compact_energy(*args, **kwargs):
        if os.environ['RANK'] == '0':
            time.sleep(60)  # torchrun notices process 1's end within a second and SIGTERMs this one
            return original(*args, **kwargs)
        if {mode!r} == 'kill':
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would: no Python handler runs
        raise RuntimeError('injected failure of process 1')

    prepared.compact_energy = compact_energy  # the training module imports it from here when it starts
"""


@pytest.mark.parametrize('mode', ['raise', 'kill'])
def test_a_process_of_a_torchrun_training_that_fails_fails_the_job_instead_of_passing_for_a_walltime(
    hydrogen_data, tmp_path, mode
):
    """torchrun SIGTERMs the other processes when one fails, and they stop as for the walltime (interrupted.json):
    the job must end in 350 with the failed process named, not in 310, which the workchain would resume forever."""
    code, dataset, _ = hydrogen_data
    (tmp_path / 'sitecustomize.py').write_text(INJECTED_FAILURE.format(mode=mode))
    hyper = orm.Dict({'epochs': 2, 'learning_rate': 1e-4, 'grid_level': 0, 'seed': 3, 'batch_size': 2})
    options = {'environment_variables': {'PYTHONPATH': str(tmp_path)}}
    _, node = run_get_node(
        DM21TrainCalculation,
        code=code,
        datasets={'h': dataset},
        parameters=hyper,
        num_processes=orm.Int(2),
        metadata={'options': options},
    )
    assert node.exit_status == 350, node.exit_message
    retrieved = node.outputs.retrieved.base.repository.list_object_names()
    assert 'interrupted.json' in retrieved and 'error.json' not in retrieved  # process 0 stopped as for a walltime
    if mode == 'raise':  # the failed process's own error file names it
        assert 'error_rank1.json' in retrieved
        assert 'process 1: RuntimeError: injected failure of process 1' in node.exit_message
    else:  # a SIGKILLed process writes nothing: torchrun's report on stderr names it
        assert '(worker_failed)' in node.exit_message
        assert 'process 1 of the data-parallel run exited with code -9' in node.exit_message
    assert 'checkpoint' not in node.outputs
    assert not node.base.caching.is_valid_cache


def test_num_processes_below_one_is_refused(hydrogen_data, count_nodes):
    code, dataset, _ = hydrogen_data
    before = count_nodes()
    with pytest.raises(ValueError, match='num_processes must be an integer >= 1'):
        run_get_node(DM21TrainCalculation, code=code, datasets={'d': dataset}, num_processes=orm.Int(0))
    assert count_nodes() == before
