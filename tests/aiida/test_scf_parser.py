"""The ``dm21.scf`` parser on hand-written output folders (``tests/data/scf/<case>``) and on real runner output.

Every case must end in a named exit code, never in an exception; unconverged and walltime-stopped runs
keep their outputs (for restarts).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('aiida.engine')

from aiida.plugins import CalculationFactory, ParserFactory

from aiida_dm21.parsers.scf import DM21ScfParser
from aiida_dm21.runner.scf import AU2EV

DATA = Path(__file__).resolve().parents[1] / 'data' / 'scf'

pytestmark = pytest.mark.aiida

SCHEDULER_OUT_OF_WALLTIME = 120  # CalcJob.exit_codes.ERROR_SCHEDULER_OUT_OF_WALLTIME


def parse(node):
    results, calcfunction = DM21ScfParser.parse_from_node(node, store_provenance=False)
    return results, calcfunction


def test_entry_points():
    assert ParserFactory('dm21.scf') is DM21ScfParser
    calc = CalculationFactory('dm21.scf')
    assert calc.spec().inputs['metadata']['options']['parser_name'].default == 'dm21.scf'
    # machine-dependent failures are never reused from the cache; deterministic outcomes may be
    assert calc.exit_codes.ERROR_OUT_OF_WALLTIME_PARTIAL.invalidates_cache
    assert calc.exit_codes.ERROR_CHECKPOINT_UNREADABLE.invalidates_cache
    assert not calc.exit_codes.ERROR_SCF_NOT_CONVERGED.invalidates_cache


def test_converged(retrieved_calc_node):
    results, calcfunction = parse(retrieved_calc_node('converged'))
    assert calcfunction.is_finished_ok
    parameters = results['output_parameters'].get_dict()
    assert parameters['e_tot'] == pytest.approx(-1.1617)
    assert parameters['e_tot_ev'] == pytest.approx(-1.1617 * AU2EV)
    assert parameters['converged'] is True
    assert parameters['cycles'] == 3
    assert parameters['homo_ev'] == pytest.approx(-0.55 * AU2EV)
    assert parameters['lumo_ev'] == pytest.approx(0.62 * AU2EV)
    assert parameters['dipole_units'] == 'Debye'
    assert parameters['mo_energy'] == [[-0.55, 0.62]]
    assert parameters['versions']['pyscf'] == '2.14.0'
    assert parameters['timings']['total'] == pytest.approx(2.6)
    density = results['output_density'].get_array('density_matrix')
    assert density.shape == (2, 2)


def test_not_converged_keeps_outputs(retrieved_calc_node):
    results, calcfunction = parse(retrieved_calc_node('not_converged'))
    assert calcfunction.exit_status == 400
    assert '2 cycles' in calcfunction.exit_message
    assert results['output_parameters']['converged'] is False
    assert results['output_density'].get_array('density_matrix').shape == (2, 2)


@pytest.mark.parametrize(
    ('case', 'status', 'message'),
    [
        ('missing_results', 300, 'results.json is not among the retrieved files'),
        ('garbage_results', 301, 'unreadable or malformed'),
        ('empty_results', 301, 'unreadable or malformed'),
        ('not_an_object', 301, 'expected a JSON object'),
        ('missing_energy', 301, "'e_tot' is missing"),
        ('energy_not_a_number', 301, 'not a number'),
        ('converged_not_bool', 301, 'not a boolean'),
        ('missing_density', 302, 'was not retrieved'),
        ('corrupt_density', 302, 'not a readable .npy'),
        ('wrong_density_shape', 302, 'the basis has 2 functions'),
        ('nan_energy', 410, 'NaN'),
        ('null_energy', 410, 'NaN'),
        ('unsupported_input', 420, 'Basis set not found for Og'),
        ('checkpoint_unreadable', 430, 'truncated or corrupt'),
        ('internal_error', 350, 'internal_error'),
        ('error_not_an_object', 350, '42'),
    ],
)
def test_failures_end_in_exit_codes(retrieved_calc_node, case, status, message):
    results, calcfunction = parse(retrieved_calc_node(case))
    assert calcfunction.exit_status == status, calcfunction.exit_message
    assert message in calcfunction.exit_message
    if status in (410,):
        assert results['output_parameters']['e_tot'] is None
        assert 'output_density' not in results
    if status in (300, 301, 302, 420, 430, 350):
        assert 'output_density' not in results


def test_converged_but_not_aufbau_gives_405_with_outputs(retrieved_calc_node, tmp_path):
    """The runner's aufbau check (an empty orbital 0.146 Ha below a filled one, as the Newton solver gives for
    stretched H2): exit 405 naming the gap, energy and density attached; ``aufbau`` None (fractional
    occupations) or True is a success."""
    source = tmp_path / 'not_aufbau'
    shutil.copytree(DATA / 'converged', source)
    results_file = source / 'results.json'
    data = json.loads(results_file.read_text())
    for aufbau, violation, status in [(False, 0.1462, 405), (True, -0.2, 0), (None, None, 0)]:
        data.update(aufbau=aufbau, aufbau_violation=violation)
        results_file.write_text(json.dumps(data))
        results, calcfunction = parse(retrieved_calc_node(source))
        assert calcfunction.exit_status == status, calcfunction.exit_message
        assert results['output_parameters']['aufbau'] is aufbau
        assert 'output_density' in results
    # the message of the 405 case
    data.update(aufbau=False, aufbau_violation=0.1462)
    results_file.write_text(json.dumps(data))
    _, calcfunction = parse(retrieved_calc_node(source))
    assert 'an empty orbital lies 0.1462 Ha below a filled one' in calcfunction.exit_message


def test_weird_fields_are_sanitised(retrieved_calc_node):
    results, calcfunction = parse(retrieved_calc_node('weird_fields'))
    assert calcfunction.is_finished_ok
    parameters = results['output_parameters'].get_dict()
    assert parameters['mo_energy'] == 'not a list'
    assert parameters['dipole'] == {'x': None}  # inf cannot be stored
    assert parameters['versions'] == 42


def test_walltime_partial_keeps_outputs(retrieved_calc_node):
    results, calcfunction = parse(retrieved_calc_node('walltime_partial'))
    assert calcfunction.exit_status == 311
    assert 'after 4 SCF cycles' in calcfunction.exit_message
    assert results['output_parameters']['e_tot'] == pytest.approx(-1.14)
    assert results['output_parameters']['error']['category'] == 'walltime'
    assert 'output_density' in results


def test_scheduler_walltime_without_results(retrieved_calc_node):
    node = retrieved_calc_node('missing_results', exit_status=SCHEDULER_OUT_OF_WALLTIME)
    _, calcfunction = parse(node)
    assert calcfunction.exit_status == 310


def test_empty_retrieved_folder(retrieved_calc_node):
    _, calcfunction = parse(retrieved_calc_node('no_such_case'))
    assert calcfunction.exit_status == 300
    assert 'none' in calcfunction.exit_message


def test_binary_garbage_results(retrieved_calc_node):
    node = retrieved_calc_node('no_such_case', extra_files={'results.json': bytes(range(256)) * 4})
    _, calcfunction = parse(node)
    assert calcfunction.exit_status == 301


def test_huge_nesting_does_not_crash(retrieved_calc_node):
    deep = '[' * 100000 + ']' * 100000
    node = retrieved_calc_node('no_such_case', extra_files={'results.json': deep.encode()})
    _, calcfunction = parse(node)
    assert calcfunction.exit_status == 301


# --- real runner output (no SCF needed for these) -------------------------------------------------------


def _runner_folder(tmp_path, input_data: dict, checkpoint: bytes | None):
    from aiida_dm21.runner.scf import run

    folder = tmp_path / 'job'
    folder.mkdir()
    (folder / 'input.json').write_text(json.dumps(input_data))
    if checkpoint is not None:
        (folder / 'checkpoint.safetensors').write_bytes(checkpoint)
    status = run(folder / 'input.json', folder)
    return folder, status


H2_INPUT = {
    'symbols': ['H', 'H'],
    'positions': [[0.0, 0.0, 0.0], [0.0, 0.0, 0.74]],
    'basis': 'sto-3g',
    'grid_level': 0,
    'init_guess': 'minao',
    'verbose': 0,
}


def test_runner_corrupt_checkpoint_gives_430(tmp_path, retrieved_calc_node):
    folder, status = _runner_folder(tmp_path, H2_INPUT, b'corrupt' * 100)
    assert status == 2
    results = json.loads((folder / 'results.json').read_text())
    assert results['error']['category'] == 'checkpoint_unreadable'
    assert not (folder / 'density_matrix.npy').exists()
    _, calcfunction = parse(retrieved_calc_node(folder))
    assert calcfunction.exit_status == 430


def test_runner_unknown_basis_gives_420(tmp_path, dm21_checkpoint_file, retrieved_calc_node):
    folder, status = _runner_folder(tmp_path, dict(H2_INPUT, basis='no-such-basis'), dm21_checkpoint_file.read_bytes())
    assert status == 2
    _, calcfunction = parse(retrieved_calc_node(folder))
    assert calcfunction.exit_status == 420
    assert 'PySCF cannot build the molecule' in calcfunction.exit_message


@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='this machine has a GPU')
def test_runner_refuses_a_gpu_the_node_does_not_have(tmp_path, dm21_checkpoint_file, retrieved_calc_node):
    """device='cuda' passes validation on the submitting side and is refused on the node: 420, never a CPU run."""
    folder, status = _runner_folder(tmp_path, dict(H2_INPUT, device='cuda'), dm21_checkpoint_file.read_bytes())
    assert status == 2
    _, calcfunction = parse(retrieved_calc_node(folder))
    assert calcfunction.exit_status == 420
    assert 'sees no CUDA GPU' in calcfunction.exit_message


def test_runner_bad_input_json(tmp_path):
    from aiida_dm21.runner.scf import run

    (tmp_path / 'input.json').write_text('{"symbols": ["H"], ')
    assert run(tmp_path / 'input.json', tmp_path) == 2
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['error']['category'] == 'unsupported_input'
    assert run(tmp_path / 'absent.json', tmp_path) == 2


def test_runner_walltime_stop_gives_311(tmp_path, dm21_checkpoint_file, retrieved_calc_node):
    """A deadline already passed: the runner stops after the first cycle, saving its density."""
    data = dict(H2_INPUT, walltime_seconds=1e-3)
    folder, status = _runner_folder(tmp_path, data, dm21_checkpoint_file.read_bytes())
    assert status == 4
    results = json.loads((folder / 'results.json').read_text())
    assert results['error']['category'] == 'walltime'
    assert results['cycles'] == 1
    assert math.isfinite(results['e_tot'])
    assert np.load(folder / 'density_matrix.npy').shape == (2, 2)
    results, calcfunction = parse(retrieved_calc_node(folder))
    assert calcfunction.exit_status == 311
    assert results['output_density'].get_array('density_matrix').shape == (2, 2)


def test_runner_sigterm_saves_density(tmp_path, dm21_checkpoint_file, retrieved_calc_node):
    """``python -m aiida_dm21.runner.scf``: a SIGTERM (what schedulers send at the walltime) during the SCF ends in
    a 'walltime' result with the last density; the parser turns it into 311 with both outputs."""
    import os
    import signal
    import subprocess
    import sys

    data = dict(H2_INPUT, conv_tol=1e-14, conv_tol_grad=1e-12, max_cycle=500, verbose=4)
    (tmp_path / 'input.json').write_text(json.dumps(data))
    (tmp_path / 'checkpoint.safetensors').write_bytes(dm21_checkpoint_file.read_bytes())
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    with subprocess.Popen(
        [sys.executable, '-m', 'aiida_dm21.runner.scf', 'input.json'],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as process:
        for line in process.stdout:
            if line.startswith('cycle= 2'):
                process.send_signal(signal.SIGTERM)
                break
        process.stdout.read()
        process.wait(timeout=60)
    assert process.returncode == 4
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['error']['category'] == 'walltime'
    assert 'SIGTERM' in results['error']['message']
    assert results['cycles'] >= 1  # cycles whose density was recorded when the signal came
    results, calcfunction = parse(retrieved_calc_node(tmp_path))
    assert calcfunction.exit_status == 311
    assert results['output_density'].get_array('density_matrix').shape == (2, 2)


def test_runner_roks_open_shell(tmp_path, dm21_checkpoint_file, retrieved_calc_node):
    """ROKS of the Li atom through runner and parser: per-spin orbitals, exact <S^2>, (2, nao, nao) density."""
    data = dict(H2_INPUT, symbols=['Li'], positions=[[0.0, 0.0, 0.0]], multiplicity=2, scf_type='ROKS')
    folder, status = _runner_folder(tmp_path, data, dm21_checkpoint_file.read_bytes())
    assert status == 0, (folder / 'results.json').read_text()
    results, calcfunction = parse(retrieved_calc_node(folder))
    assert calcfunction.is_finished_ok, calcfunction.exit_message
    parameters = results['output_parameters'].get_dict()
    assert parameters['scf_type'] == 'ROKS'
    assert parameters['s2'] == pytest.approx(0.75)
    assert parameters['nelec'] == [2, 1]
    assert len(parameters['mo_energy']) == 2
    assert parameters['homo'] < parameters['lumo']
    assert results['output_density'].get_array('density_matrix').shape == (2, 5, 5)


def test_runner_newton(tmp_path, dm21_checkpoint_file):
    """newton=True runs the core's second-order solver (its science is tested in the core tests) and lands on the
    same energy as DIIS."""
    energies = {}
    for newton in (False, True):
        folder = tmp_path / f'newton-{newton}'
        folder.mkdir()
        data = dict(H2_INPUT, newton=newton)
        _, status = _runner_folder(folder, data, dm21_checkpoint_file.read_bytes())
        results = json.loads((folder / 'job' / 'results.json').read_text())
        assert status == 0, results
        assert results['cycles'] >= 1
        energies[newton] = results['e_tot']
    assert abs(energies[True] - energies[False]) < 1e-6


def test_runner_does_not_import_aiida(tmp_path):
    """The compute-node side needs only the numerical core: no ``aiida`` module may be imported."""
    import subprocess
    import sys

    (tmp_path / 'input.json').write_text(json.dumps(H2_INPUT))
    (tmp_path / 'checkpoint.safetensors').write_bytes(b'corrupt')
    code = (
        'import sys; from aiida_dm21.runner.scf import run; run("input.json", "."); '
        'bad = [m for m in sys.modules if m == "aiida" or m.startswith("aiida.")]; '
        'assert not bad, bad; assert "aiida_dm21.functional.scf" in sys.modules'
    )
    completed = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
