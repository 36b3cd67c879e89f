"""The whole loop as one workchain (what ``aiida-dm21 demo`` runs), small: one epoch, coarse grids.

One real run, with its own scheduler options and code for each step; every other test here is refused at
validation, before anything runs or is stored.
"""

from __future__ import annotations

import pytest
from aiida import orm
from aiida.engine import run_get_node

from aiida_dm21.provenance import checkpoint_lineage
from aiida_dm21.workflows.pipeline import STEPS, PipelineWorkChain
from aiida_dm21.workflows.reference_data import ReferenceDataWorkChain

pytestmark = [pytest.mark.aiida]

#: A distinct walltime, queue and scheduler line per step: each must reach that step's CalcJobs and no other.
STEP_OPTIONS = {
    step: {
        'max_wallclock_seconds': 3600 + 600 * i,
        'queue_name': f'queue-{step}',
        'custom_scheduler_commands': f'# dm21.pipeline step: {step}',
    }
    for i, step in enumerate(STEPS)
}


def calcjobs_under(node: orm.ProcessNode) -> list[orm.CalcJobNode]:
    """Every CalcJob called by ``node`` or by the workchains it called, recursively."""
    found = []
    for child in node.called:
        if isinstance(child, orm.CalcJobNode):
            found.append(child)
        elif isinstance(child, orm.WorkflowNode):
            found.extend(calcjobs_under(child))
    return found


@pytest.mark.slow
def test_pipeline_end_to_end(checkpoint_node, python_code):
    """The loop runs; each step's code and options reach its CalcJobs, through the restart workchains."""
    from aiida_dm21.cli.aiida_support import ensure_code

    code = ensure_code()
    results, node = run_get_node(
        PipelineWorkChain,
        code=code,
        scf_code=python_code,  # one step with its own code, the others with `code`
        initial_checkpoint=checkpoint_node,
        training=orm.Dict({'epochs': 1, 'learning_rate': 1e-4, 'grid_level': 0}),
        scf_parameters=orm.Dict({'grid_level': 0, 'init_guess': 'minao'}),
        **{f'{step}_options': orm.Dict(options) for step, options in STEP_OPTIONS.items()},
    )
    assert node.is_finished_ok, node.exit_message
    report = results['report'].get_dict()
    assert set(report['scf']) == {'scf_trained_Li', 'scf_initial_Li'}
    assert all(v['converged'] for v in report['scf'].values())
    assert report['training']['n_train_systems'] == 17 and report['training']['n_heldout_systems'] == 5
    lineage = checkpoint_lineage(results['checkpoint'])
    labels = sorted(r.inputs.parameters['label'] for r in lineage.reference_calculations)
    assert labels == ['H', 'H+', 'H-', 'He', 'He+']  # the held-out Li calculations are not learned from
    assert lineage.initial.checkpoint.pk == checkpoint_node.pk
    assert results['report'].creator.process_label == 'summarise'

    # the steps run in the workchains, not as bare CalcJobs of the pipeline
    called = node.base.links.get_outgoing(node_class=orm.ProcessNode).all()
    labels_of = {link.link_label: link.node.process_label for link in called}
    assert labels_of['train_data'] == labels_of['heldout_data'] == 'ReferenceDataWorkChain'
    assert labels_of['train'] == 'DM21TrainWorkChain'
    assert labels_of['scf_trained_Li'] == labels_of['scf_initial_Li'] == 'DM21ScfWorkChain'
    assert not any(isinstance(child, orm.CalcJobNode) for child in node.called)
    assert lineage.training.caller.process_label == 'DM21TrainWorkChain'
    assert lineage.training.caller.caller.pk == node.pk

    # every CalcJob got the options and code of its own step
    step_of = {'dm21.reference': 'reference', 'dm21.train': 'train', 'dm21.scf': 'scf'}
    jobs = calcjobs_under(node)
    assert {job.process_type.split(':')[-1] for job in jobs} == set(step_of)
    for job in jobs:
        step = step_of[job.process_type.split(':')[-1]]
        for key, value in STEP_OPTIONS[step].items():
            assert job.get_option(key) == value, (job.process_label, key)
        assert job.get_option('resources') == {'num_machines': 1, 'num_mpiprocs_per_machine': 1}  # the default
        assert job.inputs.code.pk == (python_code if step == 'scf' else code).pk
    assert len([job for job in jobs if job.process_type.endswith('dm21.reference')]) == 7  # H, He ions; Li, Li+


# --- refused at validation: nothing runs, nothing is stored ---------------------------------------------------


@pytest.fixture
def refused(python_code, count_nodes):
    """``refused(process, **inputs)``: the message with which launching ``process`` is refused (no node stored)."""

    def launch(process, **inputs) -> str:
        before = count_nodes()
        with pytest.raises(ValueError) as info:
            run_get_node(process, **inputs)
        assert count_nodes() == before
        return str(info.value)

    return launch


@pytest.mark.parametrize('step', list(STEPS))
def test_unknown_option_key_is_refused(refused, python_code, step):
    message = refused(PipelineWorkChain, code=python_code, **{f'{step}_options': orm.Dict({'max_walltime': 600})})
    assert f"`{step}_options`: unknown option 'max_walltime'" in message
    assert 'max_wallclock_seconds' in message and 'queue_name' in message  # the accepted keys are listed


@pytest.mark.parametrize(
    ('options', 'expected'),
    [
        ({'max_wallclock_seconds': 0}, "option 'max_wallclock_seconds' must be >= 1, got 0"),
        ({'max_wallclock_seconds': '1h'}, "option 'max_wallclock_seconds':"),
        ({'resources': {'num_machines': 0}}, "resources['num_machines'] must be an integer >= 1, got 0"),
        ({'queue_name': 3}, "option 'queue_name':"),
        ({'parser_name': 'core.arithmetic.add'}, "option 'parser_name' is set by the DM21TrainCalculation plugin"),
    ],
)
def test_bad_option_values_are_refused(refused, python_code, options, expected):
    assert expected in refused(PipelineWorkChain, code=python_code, train_options=orm.Dict(options))


def test_reference_data_workchain_refuses_an_unknown_option(refused, python_code):
    message = refused(
        ReferenceDataWorkChain,
        code=python_code,
        set_name=orm.Str('demo_train'),
        options=orm.Dict({'walltime': 600}),
    )
    assert "`options`: unknown option 'walltime'; DM21ReferenceCalculation accepts:" in message


def test_every_step_needs_a_code(refused, python_code):
    message = refused(PipelineWorkChain, train_code=python_code)
    assert 'no code for the steps reference, scf: give `code` (all steps) or `reference_code`, `scf_code`' in message


def test_unknown_set_is_refused(refused, python_code):
    message = refused(PipelineWorkChain, code=python_code, heldout_set=orm.Str('no_such_set'))
    assert "`heldout_set`: unknown set 'no_such_set'; built-in sets: demo_train, demo_heldout" in message


def test_good_options_and_step_codes_pass_validation(python_code):
    inputs = {
        'reference_code': python_code,
        'train_code': python_code,
        'scf_code': python_code,
        'train_options': orm.Dict(
            {
                'resources': {'num_machines': 1, 'num_mpiprocs_per_machine': 4},
                'max_wallclock_seconds': 86400,
                'queue_name': 'gpu',
                'account': 'proj42',
                'qos': 'normal',
                'max_memory_kb': 64_000_000,
                'custom_scheduler_commands': '#SBATCH --gres=gpu:1',
                'prepend_text': 'module load cuda',
            }
        ),
    }
    assert PipelineWorkChain.spec().inputs.validate(inputs) is None  # no `code`: every step has its own


# --- a held-out SCF that fails: exit 403, with the report of the others -----------------------------------------


def finished_workchain(process_label: str, exit_status: int, **outputs: orm.Data) -> orm.WorkChainNode:
    """A stored, finished WorkChainNode of ``process_label`` that returned ``outputs``."""
    from aiida.common.links import LinkType
    from aiida.engine import ProcessState

    node = orm.WorkChainNode()
    node.set_process_label(process_label)
    node.store()
    for label, output in outputs.items():
        output.store()
        output.base.links.add_incoming(node, LinkType.RETURN, label)
    node.set_process_state(ProcessState.FINISHED)
    node.set_exit_status(exit_status)
    node.seal()
    return node


def test_a_failed_heldout_scf_fails_the_pipeline_with_403(python_code):
    """One held-out SCF workchain converged, the other failed for good (400): the report holds the converged one,
    the pipeline ends with ERROR_SCF naming the other."""
    from aiida.engine.utils import instantiate_process
    from aiida.manage import get_manager

    process = instantiate_process(get_manager().get_runner(), PipelineWorkChain, code=python_code)
    metrics = {'before': {'heldout': {'mae_fc_mha': 2.0}}, 'after': {'heldout': {'mae_fc_mha': 1.0}}}
    process.ctx.train = finished_workchain('DM21TrainWorkChain', 0, metrics=orm.Dict(metrics))
    process.ctx.scf_trained_Li = finished_workchain(
        'DM21ScfWorkChain', 0, output_parameters=orm.Dict({'e_tot': -7.4, 'converged': True, 'cycles': 9})
    )
    process.ctx.scf_initial_Li = finished_workchain('DM21ScfWorkChain', 400)
    process.ctx.scf_keys = ['scf_trained_Li', 'scf_initial_Li']
    result = process.make_report()
    assert result.status == 403 and result.message.startswith('The held-out SCF failed for: scf_initial_Li')
    assert PipelineWorkChain.exit_codes.ERROR_SCF.status == 403
    report = process.outputs['report'].get_dict()
    assert report['scf'] == {'scf_trained_Li': {'e_tot': -7.4, 'converged': True, 'cycles': 9}}
    assert report['training'] == metrics
