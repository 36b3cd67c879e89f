"""Batched ``dm21.reference`` jobs and the batching, retrying, throttled ``dm21.reference_data`` (issue 11).

Real PySCF throughout (FCI/6-31G on one- and two-electron species: seconds).  The failing species fail on the
compute node only, as a species the plugins cannot foresee failing would: the code of those tests is a Python
(:func:`failing_code`) that runs the real runner with the core's ``run_integer_system`` raising for the named
species on their first N attempts (counted across jobs in a folder of the test), so the failure goes through
the runner's own per-species error path (``internal_error``) and a retry may succeed.
"""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip('aiida.engine')

from aiida import orm
from aiida.engine import run_get_node

from aiida_dm21.calculations.reference import DM21ReferenceCalculation

pytestmark = pytest.mark.aiida

H = {'label': 'H', 'symbols': ['H'], 'positions': [[0.0, 0.0, 0.0]], 'charge': 0, 'multiplicity': 2}
HE_PLUS = {'label': 'He+', 'symbols': ['He'], 'positions': [[0.0, 0.0, 0.0]], 'charge': 1, 'multiplicity': 2}
LI_PLUS = {'label': 'Li+', 'symbols': ['Li'], 'positions': [[0.0, 0.0, 0.0]], 'charge': 1, 'multiplicity': 1}
H_PLUS = {'label': 'H+', 'symbols': ['H'], 'positions': [[0.0, 0.0, 0.0]], 'charge': 1, 'multiplicity': 1}
FCI = {'basis': '6-31g', 'reference_method': 'fci'}


@pytest.fixture
def reference_code(aiida_code_installed):
    return aiida_code_installed(
        label='dm21-python-batch', default_calc_job_plugin='dm21.reference', filepath_executable=sys.executable
    )


FAILING_PYTHON = """#!{python}
\"\"\"This Python's aiida-dm21 reference runner fails species on purpose (aiida-dm21 tests): {plan}.\"\"\"
import json
import runpy
import sys
from pathlib import Path

PLAN = json.loads({plan!r})  # label -> how many of its first attempts fail
ATTEMPTS = Path({attempts!r})


def install():
    import aiida_dm21.reference.integer as integer

    original = integer.run_integer_system

    def run_integer_system(spec):
        path = ATTEMPTS / (spec.label + '.attempts')
        attempt = int(path.read_text()) + 1 if path.exists() else 1
        path.write_text(str(attempt))
        if attempt <= PLAN.get(spec.label, 0):
            raise RuntimeError(f'injected failure of {{spec.label}} (attempt {{attempt}})')
        return original(spec)

    integer.run_integer_system = run_integer_system  # the runner imports it from the module when it runs


install()
if sys.argv[1:2] != ['-m'] or len(sys.argv) < 3:
    raise SystemExit('usage: python -m MODULE [ARGS]')
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
"""


@pytest.fixture
def failing_code(aiida_code_installed, tmp_path):
    """``failing_code({label: n})``: a code whose runner fails each named species on its first ``n`` attempts
    (across jobs); ``attempts(label)`` of the returned code's folder counts them.  Other species run normally."""
    import stat
    import uuid

    def factory(plan: dict[str, int]):
        folder = tmp_path / f'failing-{uuid.uuid4().hex[:8]}'
        (folder / 'attempts').mkdir(parents=True)
        script = folder / 'python'
        text = FAILING_PYTHON.format(python=sys.executable, plan=json.dumps(plan), attempts=str(folder / 'attempts'))
        script.write_text(text)
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        code = aiida_code_installed(
            label=f'dm21-failing-{folder.name}',
            default_calc_job_plugin='dm21.reference',
            filepath_executable=str(script),
        )
        return code, lambda label: int((folder / 'attempts' / f'{label}.attempts').read_text())

    return factory


def test_a_batch_of_three_species(reference_code):
    from pyscf import fci, gto, scf

    results, node = run_get_node(
        DM21ReferenceCalculation,
        code=reference_code,
        species=orm.List([H, HE_PLUS, LI_PLUS]),
        parameters=orm.Dict(FCI),
    )
    assert node.is_finished_ok, node.exit_message
    assert set(results['species']) == {'H', 'He_plus', 'Li_plus'}
    status = results['species_status'].get_dict()
    assert {key: s['status'] for key, s in status.items()} == dict.fromkeys(('H', 'He_plus', 'Li_plus'), 'converged')
    assert status['He_plus']['label'] == 'He+'
    li = gto.M(atom='Li 0 0 0', basis='6-31g', charge=1, spin=0, verbose=0)
    e_fci = fci.FCI(scf.UHF(li).run()).kernel()[0]
    li_out = node.outputs.species.Li_plus
    assert abs(li_out.output_parameters['e_ref'] - e_fci) < 1e-7
    assert li_out.output_arrays.base.attributes.get('spec')['label'] == 'Li+'
    assert li_out.output_arrays.get_array('dm').shape[0] == 2
    assert node.base.caching.is_valid_cache
    payload = json.loads(node.base.repository.get_object_content('input.json'))
    assert [item['label'] for item in payload['species']] == ['H', 'He+', 'Li+'] and 'symbols' not in payload


def test_a_failing_species_does_not_sink_the_batch(failing_code):
    code, _ = failing_code({'He+': 99})
    results, node = run_get_node(
        DM21ReferenceCalculation, code=code, species=orm.List([H_PLUS, HE_PLUS]), parameters=orm.Dict(FCI)
    )
    assert node.exit_status == 430 and not node.is_excepted, node.exit_message
    assert 'He+ (internal_error' in node.exit_message and 'H+' not in node.exit_message.replace('He+', '')
    status = results['species_status'].get_dict()
    assert status['H_plus']['status'] == 'converged' and status['He_plus']['status'] == 'failed'
    assert status['He_plus']['category'] == 'internal_error'
    assert 'injected failure of He+ (attempt 1)' in status['He_plus']['message']
    assert set(results['species']) == {'H_plus'}  # the failed species stores nothing
    assert results['species']['H_plus']['output_arrays'].get_array('dm').shape[0] == 2
    assert not node.base.caching.is_valid_cache


@pytest.mark.parametrize(
    ('inputs', 'message'),
    [
        ({'structure': 'h', 'species': [H]}, 'give either `structure` (one species) or `species` (a batch)'),
        ({'species': []}, 'the species list of a batch is empty'),
        ({'species': [H, {**H, 'label': 'H '}]}, "both map to the output key 'H': rename one"),
        ({'species': [{**H, 'multiplicity': 1}]}, "species 'H': charge 0 and multiplicity 1 are impossible"),
        ({'species': [{**H, 'colour': 'red'}]}, "unknown keys ['colour'] in species 'H'"),
        ({'species': [{**H, 'positions': [[0.0, 0.0]]}]}, "species 'H': `positions` must be one finite"),
        ({'species': [H], 'parameters': {**FCI, 'charge': 1}}, "the parameters ['charge'] belong to each species"),
        ({'species': [H], 'parameters': {'basis': '6-31g', 'reference_method': 'user'}}, 'takes one species'),
        ({'species': [{**H, 'symbols': ['Ne'], 'charge': 0, 'multiplicity': 1}]}, 'FCI is limited'),
        (
            {'species': [H], 'parameters': {**FCI, 'density_method': 'no_such_xc'}},
            "`density_method` 'no_such_xc' is not one of: hf, lda, svwn",
        ),
        ({'structure': 'h', 'parameters': {**FCI, 'density_method': 'b2plyp'}}, "`density_method` 'b2plyp' is not"),
    ],
)
def test_bad_batches_are_refused(reference_code, make_structure, count_nodes, inputs, message):
    launch = {'code': reference_code, 'parameters': orm.Dict(inputs.pop('parameters', FCI))}
    if 'structure' in inputs:
        launch['structure'] = make_structure([('H', (0.0, 0.0, 0.0))])
    if 'species' in inputs:
        launch['species'] = orm.List(inputs['species'])
    before = count_nodes()
    with pytest.raises(ValueError) as info:
        run_get_node(DM21ReferenceCalculation, **launch)
    assert message in str(info.value)
    assert count_nodes() == before


# --- the workchain: batches, throttling, retries ------------------------------------------------------------

WC_SPECIES = [
    {'label': 'H+', 'atom': 'H 0 0 0', 'charge': 1, 'multiplicity': 1},
    {'label': 'H', 'atom': 'H 0 0 0', 'charge': 0, 'multiplicity': 2},
    {'label': 'He+', 'atom': 'He 0 0 0', 'charge': 1, 'multiplicity': 2},
]


def _reference_data(code, **inputs):
    from aiida_dm21.workflows.reference_data import ReferenceDataWorkChain

    defaults = {
        'code': code,
        'species': orm.List(WC_SPECIES),
        'fractional': orm.Dict({'fractional_charge': [['H+', 'H']], 'integer': ['He+']}),
        'reference_method': orm.Str('fci'),
        'deltas': orm.List([0.5]),
    }
    return run_get_node(ReferenceDataWorkChain, **{**defaults, **inputs})


def _jobs(workchain) -> list[orm.CalcJobNode]:
    return sorted((c for c in workchain.called if isinstance(c, orm.CalcJobNode)), key=lambda n: n.pk)


def test_workchain_batches_throttles_and_links_the_dataset(reference_code):
    from aiida_dm21.provenance import _dataset_lineage

    results, node = _reference_data(reference_code, batch_size=orm.Int(2), max_concurrent=orm.Int(1))
    assert node.is_finished_ok, node.exit_message
    jobs = _jobs(node)
    assert len(jobs) == 2
    assert 'species' in jobs[0].inputs and [s['label'] for s in jobs[0].inputs.species.get_list()] == ['H+', 'H']
    assert 'structure' in jobs[1].inputs and jobs[1].inputs.parameters['label'] == 'He+'  # the last, alone
    # max_concurrent 1: the second job was created only after the first one had been parsed
    assert jobs[1].ctime > jobs[0].outputs.species_status.ctime
    dataset = results['dataset']
    assert dataset.n_systems == 2 and dataset.kinds == {'fc': 1, 'integer': 1}
    lineage = _dataset_lineage(dataset, 'train')
    assert [r.pk for r in lineage.references] == [job.pk for job in jobs]  # every reference job is reached
    from aiida_dm21.provenance import reference_labels

    assert [reference_labels(r) for r in lineage.references] == [['H+', 'H'], ['He+']]


def test_with_sources_the_dataset_holds_every_fractional_systems_integer_sources(reference_code):
    """with_sources: H+ and H (FC[H+->H]'s endpoints) join He+ as integer systems, and every condition of the
    training's constraint_weight then finds its sources; without it (the test above) FC[H+->H] has none."""
    from aiida_dm21.training.constraints import constraint_table
    from aiida_dm21.workflows.reference_data import _integer_species

    definition = {'fractional_charge': [['H+', 'H']], 'fractional_spin': ['H'], 'integer': ['He+', 'H']}
    assert _integer_species(definition, False) == ['He+', 'H']
    assert _integer_species(definition, True) == ['He+', 'H', 'H+']

    results, node = _reference_data(reference_code, batch_size=orm.Int(3), with_sources=orm.Bool(True))
    assert node.is_finished_ok, node.exit_message
    dataset = results['dataset']
    assert dataset.n_systems == 4 and dataset.kinds == {'fc': 1, 'integer': 3}
    systems = dataset.load_systems()
    assert sorted(s.label for s in systems if s.kind == 'integer') == ['H', 'H+', 'He+']
    table, left_out = constraint_table(systems)
    assert left_out == [] and len(table) == 1
    (condition,) = table.values()
    assert sorted(systems[j].label for j, _ in condition.terms) == ['H', 'H+'] and abs(condition.offset) < 1e-12


def test_workchain_retries_a_failed_species_alone_then_reports_it(failing_code):
    code, attempts = failing_code({'H': 99, 'He+': 99})  # fail every time, on the compute node only
    results, node = _reference_data(code, batch_size=orm.Int(3))
    assert node.exit_status == 401, node.exit_message
    # the last try's error: the retry alone ended in 350 (internal_error: the runner raised)
    assert 'H (exit 350' in node.exit_message and 'He+ (exit 350' in node.exit_message
    assert 'H+ (' not in node.exit_message and '2 tries' in node.exit_message
    assert 'injected failure of H (attempt 2)' in node.exit_message
    assert attempts('H') == attempts('He+') == 2
    assert 'dataset' not in results
    batch, *retries = _jobs(node)
    assert batch.exit_status == 430 and set(batch.outputs.species) == {'H_plus'}
    assert sorted(r.inputs.parameters['label'] for r in retries) == ['H', 'He+']  # each alone, once
    assert all('structure' in r.inputs and r.exit_status == 350 for r in retries)
    labels = {link.link_label for link in node.base.links.get_outgoing(node_class=orm.CalcJobNode).all()}
    assert labels == {'reference_batch_0', 'retry1_H', 'retry1_He_plus'}
    reports = ' '.join(log.message for log in orm.Log.collection.get_logs_for(node))
    assert 'H failed (internal_error' in reports and 'retry 1 alone' in reports


def test_workchain_retry_recovers_a_species_that_failed_once(failing_code):
    """H fails in the batch and succeeds in its retry: only H is resubmitted, and the dataset is built from the
    batch's converged species and the retry's H."""
    code, attempts = failing_code({'H': 1})
    results, node = _reference_data(code, batch_size=orm.Int(3))
    assert node.is_finished_ok, node.exit_message
    batch, *retries = _jobs(node)
    assert batch.exit_status == 430 and 'H (internal_error' in batch.exit_message
    status = batch.outputs.species_status.get_dict()
    assert {key: entry['status'] for key, entry in status.items()} == {
        'H_plus': 'converged',
        'H': 'failed',
        'He_plus': 'converged',
    }
    assert 'injected failure of H (attempt 1)' in status['H']['message']
    assert set(batch.outputs.species) == {'H_plus', 'He_plus'}
    (retry,) = retries  # only H, alone, once
    assert 'structure' in retry.inputs and retry.inputs.parameters['label'] == 'H' and retry.is_finished_ok
    assert retry.outputs.output_parameters['label'] == 'H'
    labels = {link.link_label for link in node.base.links.get_outgoing(node_class=orm.CalcJobNode).all()}
    assert labels == {'reference_batch_0', 'retry1_H'}
    assert (attempts('H'), attempts('H+'), attempts('He+')) == (2, 1, 1)
    dataset = results['dataset']
    assert dataset.n_systems == 2 and dataset.kinds == {'fc': 1, 'integer': 1}
    from aiida_dm21.provenance import _dataset_lineage, reference_labels

    lineage = _dataset_lineage(dataset, 'train')
    assert sorted(r.pk for r in lineage.references) == [batch.pk, retry.pk]  # H comes from the retry
    assert [reference_labels(r) for r in lineage.references if r.pk == retry.pk] == [['H']]


def test_a_workchain_checkpointed_before_arrays_pk_finds_the_same_arrays(failing_code, monkeypatch):
    """A workchain checkpointed by an older version has no ``arrays_pk`` in its context: ``_arrays_of`` then
    finds each species' ``output_arrays`` from its job (a batch's ``species`` namespace, a retry's own output),
    the same nodes as through the recorded pks."""
    from aiida_dm21.workflows.reference_data import ReferenceDataWorkChain

    original = ReferenceDataWorkChain._arrays_of
    found = {}

    def without_pks(self, labels):
        found['recorded'] = {label: node.pk for label, node in original(self, labels).items()}
        assert set(self.ctx.arrays_pk) == set(labels)  # the new path had every pk: the fallback below is all
        self.ctx.arrays_pk = {}
        found['fallback'] = {label: node.pk for label, node in original(self, labels).items()}
        return original(self, labels)

    monkeypatch.setattr(ReferenceDataWorkChain, '_arrays_of', without_pks)
    code, _ = failing_code({'H': 1})  # H from a lone retry, H+ and He+ from the batch
    results, node = _reference_data(code, batch_size=orm.Int(3))
    assert node.is_finished_ok, node.exit_message
    assert found['fallback'] == found['recorded'] and set(found['recorded']) == {'H+', 'H', 'He+'}
    batch, retry = _jobs(node)
    assert found['fallback']['H'] == retry.outputs.output_arrays.pk
    assert found['fallback']['He+'] == batch.outputs.species.He_plus.output_arrays.pk
    assert results['dataset'].n_systems == 2


def test_no_retries(failing_code):
    code, attempts = failing_code({'H': 99, 'He+': 99})
    _, node = _reference_data(code, batch_size=orm.Int(3), max_retries=orm.Int(0))
    assert node.exit_status == 401 and 'H (internal_error' in node.exit_message and '1 try)' in node.exit_message
    assert len(_jobs(node)) == 1 and attempts('H') == 1


@pytest.mark.parametrize(
    ('name', 'value', 'message'),
    [
        ('batch_size', 0, '`batch_size` must be an integer >= 1, got 0'),
        ('batch_size', -3, '`batch_size` must be an integer >= 1, got -3'),
        ('max_concurrent', 0, '`max_concurrent` must be an integer >= 1, got 0'),
        ('max_concurrent', -1, '`max_concurrent` must be an integer >= 1, got -1'),
        ('max_retries', -1, '`max_retries` must be an integer >= 0, got -1'),
        ('density_method', 'no_such_xc', "`density_method` 'no_such_xc' is not one of: hf, lda, svwn"),
    ],
)
def test_bad_batching_inputs_are_refused(reference_code, count_nodes, name, value, message):
    before = count_nodes()
    with pytest.raises(ValueError) as info:
        _reference_data(reference_code, **{name: orm.Int(value) if isinstance(value, int) else orm.Str(value)})
    assert message in str(info.value)
    assert count_nodes() == before


# --- the parser on a real batch output, broken by hand: a bad species never sinks the others -----------------

NAN = float('nan')


@pytest.fixture(scope='module')
def batch_output(tmp_path_factory):
    """A real batch (H+, H, He+; FCI/6-31G) written by the runner, in-process."""
    from aiida_dm21.runner.common import INPUT_FORMAT_VERSION
    from aiida_dm21.runner.reference import run

    folder = tmp_path_factory.mktemp('batch') / 'job'
    folder.mkdir()
    species = [
        {key: item[key] for key in ('label', 'symbols', 'positions', 'charge')} | {'spin': item['multiplicity'] - 1}
        for item in (H_PLUS, H, HE_PLUS)
    ]
    data = {'format_version': INPUT_FORMAT_VERSION, **FCI, 'species': species}
    (folder / 'input.json').write_text(json.dumps(data))
    assert run(folder / 'input.json') == 0
    (folder / 'input.json').unlink()
    return folder


@pytest.mark.parametrize(
    ('edit', 'drop', 'category', 'message'),
    [
        (lambda p: p['species'][1]['scalars'].update(e_ref=NAN), (), 'non_finite', 'reference energy'),
        (lambda p: p['species'][1]['scalars'].update(e_hartree=float('inf')), (), 'non_finite', '`e_hartree`'),
        (lambda p: p['species'][1]['scalars'].pop('e_kinetic'), (), 'unreadable', "'e_kinetic' is missing"),
        (
            lambda p: p['species'][1].update(error={'category': 'internal_error', 'message': 'boom'}),
            (),
            'internal_error',
            'boom',
        ),
        (None, ('arrays_1.npz',), 'unreadable', 'arrays_1.npz was not retrieved'),
        (lambda p: p['species'][1].update(index='one'), (), 'unreadable', "bad species index 'one'"),
    ],
)
def test_a_bad_species_in_a_batch_output(retrieved_calc_node, tmp_path, batch_output, edit, drop, category, message):
    import shutil

    from aiida_dm21.parsers.reference import DM21ReferenceParser

    folder = tmp_path / 'edited'
    shutil.copytree(batch_output, folder)
    if edit is not None:
        payload = json.loads((folder / 'results.json').read_text())
        edit(payload)
        (folder / 'results.json').write_text(json.dumps(payload))  # NaN as Python's json writes it
    for name in drop:
        (folder / name).unlink()
    node = retrieved_calc_node(folder, plugin='dm21.reference')
    results, calcfunction = DM21ReferenceParser.parse_from_node(node, store_provenance=False)
    assert calcfunction.is_finished and not calcfunction.is_excepted
    assert calcfunction.exit_status == 430 and 'H (' in calcfunction.exit_message, calcfunction.exit_message
    status = results['species_status'].get_dict()
    assert status['H']['status'] == 'failed' and status['H']['category'] == category
    assert message in status['H']['message']
    assert set(results['species']) == {'H_plus', 'He_plus'}  # the good ones are attached, the bad one not at all
    assert {s['status'] for key, s in status.items() if key != 'H'} == {'converged'}


def test_an_unconverged_species_in_a_batch(reference_code):
    h2 = {'label': 'H2', 'symbols': ['H', 'H'], 'positions': [[0.0, 0.0, 0.0], [0.0, 0.0, 0.74]]}
    results, node = run_get_node(
        DM21ReferenceCalculation,
        code=reference_code,
        species=orm.List([H_PLUS, h2]),
        parameters=orm.Dict({'basis': '6-31g', 'reference_method': 'ccsd', 'cc_max_cycle': 1}),
    )
    assert node.exit_status == 430 and 'H2 (not_converged: not converged: ccsd_converged' in node.exit_message
    status = results['species_status'].get_dict()
    assert status['H2']['status'] == 'not_converged' and status['H_plus']['status'] == 'converged'
    assert set(results['species']['H2']) == {'output_parameters'}  # no arrays: never reaches a dataset
    assert results['species']['H2']['output_parameters']['ccsd_converged'] is False


def test_workchain_does_not_retry_an_unconverged_species(reference_code):
    from aiida_dm21.workflows.reference_data import ReferenceDataWorkChain

    _, node = run_get_node(
        ReferenceDataWorkChain,
        code=reference_code,
        species=orm.List(
            [{'label': 'H+', 'atom': 'H 0 0 0', 'charge': 1}, {'label': 'H2', 'atom': 'H 0 0 0; H 0 0 0.74'}]
        ),
        fractional=orm.Dict({'integer': ['H2']}),
        reference_method=orm.Str('ccsd'),
        iterations=orm.Dict({'cc_max_cycle': 1}),
        batch_size=orm.Int(2),
    )
    assert node.exit_status == 402 and 'H2 (not converged: ccsd_converged)' in node.exit_message, node.exit_message
    assert len(_jobs(node)) == 1  # the same input would not converge twice: no retry


def test_workchain_reference_basis_reaches_every_job_and_the_targets(reference_code):
    """FCI in cc-pVTZ on 6-31G densities, batched and alone: the energies are cc-pVTZ's, the densities 6-31G's."""
    from pyscf import gto, scf

    results, node = _reference_data(reference_code, batch_size=orm.Int(2), reference_basis=orm.Str('cc-pvtz'))
    assert node.is_finished_ok, node.exit_message
    jobs = _jobs(node)
    assert len(jobs) == 2
    assert [json.loads(j.base.repository.get_object_content('input.json'))['reference_basis'] for j in jobs] == [
        'cc-pvtz',
        'cc-pvtz',
    ]
    he_plus = jobs[1].outputs.output_parameters
    mol = gto.M(atom='He 0 0 0', basis='cc-pvtz', charge=1, spin=1, verbose=0)
    assert he_plus['e_ref'] == pytest.approx(scf.UHF(mol).run(conv_tol=1e-10).e_tot, abs=1e-8)
    assert he_plus['reference_basis'] == 'cc-pvtz'
    assert jobs[1].outputs.output_arrays.get_array('dm').shape[-1] == 2  # He in 6-31G: 2 functions
    h = jobs[0].outputs.species.H.output_parameters
    assert h['e_ref'] == pytest.approx(scf.UHF(gto.M(atom='H', basis='cc-pvtz', spin=1, verbose=0)).kernel(), abs=1e-8)
    assert results['dataset'].n_systems == 2


@pytest.mark.parametrize(
    ('value', 'message'),
    [
        ('no-such-basis', "species 'H+': cannot build 'H 0 0 0'/no-such-basis"),
        ('', '`reference_basis` must be a PySCF basis name'),
    ],
)
def test_a_bad_reference_basis_is_refused_before_any_job(reference_code, count_nodes, value, message):
    before = count_nodes()
    with pytest.raises(ValueError) as info:
        _reference_data(reference_code, reference_basis=orm.Str(value))
    assert message in str(info.value)
    assert count_nodes() == before


def test_the_calcjob_refuses_a_bad_reference_basis():
    from aiida_dm21.calculations.reference import validate_parameters

    assert 'not with reference_method "user"' in validate_parameters(
        orm.Dict({'basis': '6-31g', 'reference_method': 'user', 'reference_basis': 'cc-pvtz'})
    )
    assert '`reference_basis` must be a PySCF basis name' in validate_parameters(
        orm.Dict({'basis': '6-31g', 'reference_basis': 3})
    )
    assert validate_parameters(orm.Dict({'basis': '6-31g', 'reference_basis': 'cc-pvtz'})) is None
