"""The ``dm21.reference`` runner and parser on real PySCF output and on that output broken by hand.

Every bad output must end in a named exit code (never an excepted process), store nothing NaN or
half-written, and leave a node that caching will not reuse; the scheduler's own codes (110, 120, 140)
survive the parser.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('aiida.engine')

from aiida import orm
from aiida.engine import run_get_node
from aiida.plugins import CalculationFactory, ParserFactory

from aiida_dm21.calculations.reference import DM21ReferenceCalculation
from aiida_dm21.parsers.reference import DM21ReferenceParser
from aiida_dm21.runner.common import INPUT_FORMAT_VERSION
from aiida_dm21.runner.reference import run

pytestmark = pytest.mark.aiida

H2 = {'symbols': ['H', 'H'], 'positions': [[0.0, 0.0, 0.0], [0.0, 0.0, 0.74]], 'basis': '6-31g', 'spin': 0}
NAN = float('nan')


def _run_runner(folder: Path, **data) -> tuple[int, Path]:
    """The runner, in-process, on ``input.json`` = ``data``; returns its exit status and the folder."""
    folder.mkdir(parents=True)
    (folder / 'input.json').write_text(json.dumps({'format_version': INPUT_FORMAT_VERSION, **data}))
    status = run(folder / 'input.json')
    (folder / 'input.json').unlink()  # the retrieved folder holds only the runner's output
    return status, folder


@pytest.fixture(scope='module')
def h2_output(tmp_path_factory) -> Path:
    """A real, converged CCSD(T) reference of H2/6-31G written by the runner."""
    status, folder = _run_runner(tmp_path_factory.mktemp('h2') / 'job', **H2, reference_method='ccsd(t)', label='H2')
    assert status == 0
    return folder


@pytest.fixture
def reference_node(retrieved_calc_node, tmp_path, h2_output):
    """``reference_node(edit_results=None, edit_arrays=None, drop=(), exit_status=None)``: a dm21.reference
    CalcJobNode whose retrieved files are the real H2 output, edited."""

    def factory(edit_results=None, edit_arrays=None, drop=(), exit_status=None, raw_results: bytes | None = None):
        folder = tmp_path / 'edited'
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(h2_output, folder)
        if edit_results is not None:
            payload = json.loads((folder / 'results.json').read_text())
            edit_results(payload)
            (folder / 'results.json').write_text(json.dumps(payload))  # Python writes NaN as the runner would
        if raw_results is not None:
            (folder / 'results.json').write_bytes(raw_results)
        if edit_arrays is not None:
            with np.load(folder / 'arrays.npz') as data:
                arrays = {k: data[k] for k in data.files}
            edit_arrays(arrays)
            np.savez(folder / 'arrays.npz', **arrays)
        for name in drop:
            (folder / name).unlink()
        return retrieved_calc_node(folder, exit_status=exit_status, plugin='dm21.reference')

    return factory


def parse(node):
    return DM21ReferenceParser.parse_from_node(node, store_provenance=False)


def cache_valid_after(node: orm.CalcJobNode, status: int) -> bool:
    """Finish ``node`` with ``status`` as the engine would, and ask whether caching may reuse it."""
    from aiida.engine import ProcessState

    node.set_process_state(ProcessState.FINISHED)
    node.set_exit_status(status)
    node.seal()
    return node.base.caching.is_valid_cache


def assert_nothing_stored(results):
    assert not results or set(results) == set(), results


def test_entry_points_and_cache_rules():
    assert ParserFactory('dm21.reference') is DM21ReferenceParser
    calc = CalculationFactory('dm21.reference')
    codes = calc.exit_codes
    own = [code for label, code in codes.items() if code.status >= 300]
    assert own and all(code.invalidates_cache for code in own), [c for c in own if not c.invalidates_cache]
    assert codes.ERROR_SCHEDULER_OUT_OF_WALLTIME.invalidates_cache


def test_real_output_is_parsed(reference_node):
    node = reference_node()
    results, calcfunction = parse(node)
    assert calcfunction.is_finished_ok, calcfunction.exit_message
    parameters = results['output_parameters'].get_dict()
    assert parameters['converged'] is True and parameters['ccsd_converged'] is True
    assert parameters['e_ref'] < parameters['e_hf'] < 0
    assert set(parameters['versions']) == {'python', 'numpy', 'pyscf', 'torch', 'aiida_dm21'}
    assert set(parameters['threads']) == {'count', 'source', 'granted', 'available', 'processes', 'libraries'}
    assert set(parameters['threads']['libraries']) == {'pyscf', 'blas'}
    assert parameters['format_version'] == 1
    assert results['output_arrays'].get_array('dm').shape[0] == 2
    assert cache_valid_after(node, 0)


@pytest.mark.parametrize('scheduler_status', [110, 120, 140])
def test_scheduler_code_survives_missing_results(reference_node, scheduler_status):
    node = reference_node(drop=('results.json', 'arrays.npz'), exit_status=scheduler_status)
    results, calcfunction = parse(node)
    assert calcfunction.exit_status == scheduler_status, calcfunction.exit_message
    assert_nothing_stored(results)
    assert not cache_valid_after(node, calcfunction.exit_status)


def test_scheduler_walltime_explains_a_truncated_file(reference_node):
    node = reference_node(raw_results=b'{"format_version": 1, "scal', exit_status=120)
    results, calcfunction = parse(node)
    assert calcfunction.exit_status == 120
    assert_nothing_stored(results)


def test_missing_results_without_scheduler_verdict(reference_node):
    node = reference_node(drop=('results.json',))
    results, calcfunction = parse(node)
    assert calcfunction.exit_status == 300 and 'arrays.npz' in calcfunction.exit_message
    assert_nothing_stored(results)
    assert not cache_valid_after(node, 300)


@pytest.mark.parametrize(
    ('edit', 'status', 'key'),
    [
        (lambda p: p['scalars'].update(e_ref=NAN), 410, 'reference energy'),
        (lambda p: p['scalars'].update(e_hartree=NAN), 411, '`e_hartree`'),
        (lambda p: p['scalars'].update(e_triples=float('inf')), 411, '`e_triples`'),
        (lambda p: p['scalars'].update(n_electrons=[1, NAN]), 411, '`n_electrons[1]`'),
        (lambda p: p['spec'].update(user_energy=NAN), 411, '`spec.user_energy`'),
        (lambda p: p.update(wall_s=NAN), 411, '`wall_s`'),
    ],
)
def test_non_finite_scalars_end_in_a_named_code(reference_node, edit, status, key):
    node = reference_node(edit_results=edit)
    results, calcfunction = parse(node)  # orm.Dict would refuse the NaN: the process must not except
    assert calcfunction.is_finished and not calcfunction.is_excepted
    assert calcfunction.exit_status == status
    assert key in calcfunction.exit_message
    assert_nothing_stored(results)
    assert not cache_valid_after(node, status)


def test_non_finite_array_is_not_stored(reference_node):
    def poison(arrays):
        arrays['dm'][0, 0, 0] = NAN

    results, calcfunction = parse(reference_node(edit_arrays=poison))
    assert calcfunction.exit_status == 411 and 'arrays.npz:dm' in calcfunction.exit_message
    assert_nothing_stored(results)


@pytest.mark.parametrize(
    ('edit', 'message'),
    [
        (lambda p: p['scalars'].pop('e_kinetic'), "'e_kinetic' is missing"),
        (lambda p: p['scalars'].update(e_hartree='lots'), 'not a number'),
        (lambda p: p.pop('spec'), 'lacks the scalars or the spec'),
    ],
)
def test_malformed_results(reference_node, edit, message):
    results, calcfunction = parse(reference_node(edit_results=edit))
    assert calcfunction.exit_status == 301 and message in calcfunction.exit_message
    assert_nothing_stored(results)


def test_corrupt_or_missing_arrays(reference_node):
    node = reference_node(drop=('arrays.npz',))
    results, calcfunction = parse(node)
    assert calcfunction.exit_status == 301 and 'arrays.npz' in calcfunction.exit_message
    assert_nothing_stored(results)
    node = reference_node(drop=('arrays.npz',), exit_status=140)
    _, calcfunction = parse(node)
    assert calcfunction.exit_status == 140


@pytest.mark.parametrize(
    ('flag', 'value'), [('converged', False), ('ccsd_converged', False), ('hf_converged', False), ('converged', None)]
)
def test_unconverged_reference_is_kept_out(reference_node, flag, value):
    node = reference_node(edit_results=lambda p: p['scalars'].update({flag: value}))
    results, calcfunction = parse(node)
    assert calcfunction.exit_status == 400 and flag in calcfunction.exit_message
    assert 'output_arrays' not in results  # nothing a dataset could be built from
    assert results['output_parameters'][flag] == value
    assert not cache_valid_after(node, 400)


@pytest.mark.parametrize(
    ('category', 'scheduler', 'status'),
    [
        ('unsupported_input', None, 420),
        ('unsupported_format', None, 421),
        ('internal_error', None, 350),
        ('internal_error', 110, 110),  # a MemoryError that the scheduler also saw as out of memory
        ('something_new', None, 350),
    ],
)
def test_runner_errors(reference_node, category, scheduler, status):
    error = {'format_version': 1, 'error': {'category': category, 'message': 'it went wrong'}}
    node = reference_node(raw_results=json.dumps(error).encode(), drop=('arrays.npz',), exit_status=scheduler)
    results, calcfunction = parse(node)
    assert calcfunction.exit_status == status
    if scheduler is None:
        assert 'it went wrong' in calcfunction.exit_message
    assert_nothing_stored(results)


# --- the runner itself, with real PySCF ---------------------------------------------------------------------


@pytest.mark.parametrize('version', [99, None, '1'])
def test_runner_refuses_an_unknown_input_format(tmp_path, retrieved_calc_node, version):
    folder = tmp_path / 'job'
    folder.mkdir()
    data = {**H2, 'reference_method': 'hf'}
    if version is not None:
        data['format_version'] = version
    (folder / 'input.json').write_text(json.dumps(data))
    assert run(folder / 'input.json') == 2
    (folder / 'input.json').unlink()
    payload = json.loads((folder / 'results.json').read_text())
    assert payload['error']['category'] == 'unsupported_format'
    assert f'format_version {version!r}' in payload['error']['message']
    assert set(payload['versions']) == {'python', 'numpy', 'pyscf', 'torch', 'aiida_dm21'}
    assert not (folder / 'arrays.npz').exists()
    results, calcfunction = parse(retrieved_calc_node(folder, plugin='dm21.reference'))
    assert calcfunction.exit_status == 421 and 'reads format_version 1' in calcfunction.exit_message
    assert_nothing_stored(results)


def test_runner_records_unconverged_ccsd(tmp_path, retrieved_calc_node):
    status, folder = _run_runner(tmp_path / 'job', **H2, reference_method='ccsd', cc_max_cycle=1, label='H2')
    assert status == 3
    payload = json.loads((folder / 'results.json').read_text())
    assert payload['scalars']['ccsd_converged'] is False and payload['scalars']['converged'] is True
    _, calcfunction = parse(retrieved_calc_node(folder, plugin='dm21.reference'))
    assert calcfunction.exit_status == 400 and 'ccsd_converged' in calcfunction.exit_message


def test_runner_records_unconverged_density(tmp_path):
    li = {'symbols': ['Li'], 'positions': [[0.0, 0.0, 0.0]], 'basis': '6-31g', 'spin': 1}
    status, folder = _run_runner(tmp_path / 'job', **li, reference_method='hf', max_cycle=1)
    assert status == 3
    assert json.loads((folder / 'results.json').read_text())['scalars']['converged'] is False


def test_runner_refuses_bad_iteration_limits(tmp_path):
    status, folder = _run_runner(tmp_path / 'job', **H2, reference_method='hf', max_cycle=0)
    assert status == 2
    error = json.loads((folder / 'results.json').read_text())['error']
    assert error['category'] == 'unsupported_input' and 'max_cycle' in error['message']


# --- as AiiDA processes -------------------------------------------------------------------------------------


@pytest.fixture
def reference_code(aiida_code_installed):
    import sys

    return aiida_code_installed(
        label='dm21-python-ref', default_calc_job_plugin='dm21.reference', filepath_executable=sys.executable
    )


def _h2_structure():
    structure = orm.StructureData(pbc=(False, False, False), cell=[[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    structure.append_atom(position=(0.0, 0.0, 0.0), symbols='H')
    structure.append_atom(position=(0.0, 0.0, 0.74), symbols='H')
    return structure


def test_unconverged_calcjob_is_not_cached(reference_code):
    results, node = run_get_node(
        DM21ReferenceCalculation,
        code=reference_code,
        structure=_h2_structure(),
        parameters=orm.Dict({'basis': '6-31g', 'reference_method': 'ccsd', 'cc_max_cycle': 1, 'label': 'H2'}),
    )
    assert node.exit_status == 400, node.exit_message
    assert 'output_arrays' not in results
    assert results['output_parameters']['ccsd_converged'] is False
    assert not node.base.caching.is_valid_cache
    input_json = json.loads(node.base.repository.get_object_content('input.json'))
    assert input_json['format_version'] == INPUT_FORMAT_VERSION and input_json['cc_max_cycle'] == 1


def test_bad_iteration_limit_is_refused(reference_code, count_nodes):
    before = count_nodes()
    with pytest.raises(ValueError, match='cc_max_cycle'):
        run_get_node(
            DM21ReferenceCalculation,
            code=reference_code,
            structure=_h2_structure(),
            parameters=orm.Dict({'basis': '6-31g', 'cc_max_cycle': 0}),
        )
    assert count_nodes() == before


def test_workchain_keeps_an_unconverged_reference_out(reference_code):
    from aiida_dm21.workflows.reference_data import ReferenceDataWorkChain

    results, node = run_get_node(
        ReferenceDataWorkChain,
        code=reference_code,
        species=orm.List([{'label': 'H2', 'atom': 'H 0 0 0; H 0 0 0.74'}]),
        fractional=orm.Dict({'integer': ['H2']}),
        reference_method=orm.Str('ccsd'),
        iterations=orm.Dict({'cc_max_cycle': 1}),
    )
    assert node.exit_status == 402, node.exit_message
    assert 'H2' in node.exit_message and 'ccsd_converged' in node.exit_message
    assert 'dataset' not in results and 'dataset' not in node.outputs
    (calc,) = node.called
    assert calc.exit_status == 400 and 'output_arrays' not in calc.outputs


def test_a_bug_in_the_parser_ends_in_301_not_a_traceback(reference_node, monkeypatch):
    def broken(self):
        raise RuntimeError('a bug')

    monkeypatch.setattr(DM21ReferenceParser, '_parse', broken)
    results, calcfunction = parse(reference_node())
    assert calcfunction.exit_status == 301 and 'parser error RuntimeError: a bug' in calcfunction.exit_message
    assert_nothing_stored(results)
