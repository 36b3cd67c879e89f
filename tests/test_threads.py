"""Threads from the scheduler: every compute-node runner sets PyTorch, numba and PySCF from what the job was granted.

``SLURM_CPUS_PER_TASK``, then ``PBS_NUM_PPN``, ``NCPUS``, ``OMP_NUM_THREADS``; never more than the CPUs of the
process; a count that is not a positive integer is refused (``unsupported_input``, exit status 2) and the runner
runs nothing.  The runners are run through their real entry points: ``python -m ...`` in a subprocess with the
variables set (so the libraries' thread counts are those of a fresh job), and in-process for the refusals (which
stop before any library is touched).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aiida_dm21.runner.common import (
    INPUT_FORMAT_VERSION,
    THREAD_VARIABLES,
    ThreadCountError,
    apply_thread_count,
    available_cpus,
    thread_count,
    thread_summary,
)

pytestmark = pytest.mark.core

REPO = Path(__file__).resolve().parents[1]
H2 = {'symbols': ['H', 'H'], 'positions': [[0.0, 0.0, 0.0], [0.0, 0.0, 0.74]], 'basis': 'sto-3g'}
GARBAGE = ['abc', '0', '-2', '2.5', '4 cores', '٣']  # the last: an Arabic-Indic digit, which str.isdigit accepts


@pytest.fixture
def clean_env(monkeypatch) -> None:
    """No scheduler variable from the machine running the tests."""
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _subprocess_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env['PYTHONPATH'] = os.pathsep.join([str(REPO), *filter(None, [env.get('PYTHONPATH')])])
    env.update(variables)
    return env


# --- the choice ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ('environ', 'source', 'granted'),
    [
        (
            {'SLURM_CPUS_PER_TASK': '1', 'PBS_NUM_PPN': '3', 'NCPUS': '4', 'OMP_NUM_THREADS': '5'},
            'SLURM_CPUS_PER_TASK',
            1,
        ),
        ({'PBS_NUM_PPN': '1', 'NCPUS': '4', 'OMP_NUM_THREADS': '5'}, 'PBS_NUM_PPN', 1),
        ({'NCPUS': '1', 'OMP_NUM_THREADS': '5'}, 'NCPUS', 1),
        ({'OMP_NUM_THREADS': '1'}, 'OMP_NUM_THREADS', 1),
        ({'OMP_NUM_THREADS': '1,4'}, 'OMP_NUM_THREADS', 1),  # an OpenMP nested list: the first level
        ({'SLURM_CPUS_PER_TASK': '', 'OMP_NUM_THREADS': '1'}, 'OMP_NUM_THREADS', 1),  # empty counts as unset
        ({'SLURM_CPUS_PER_TASK': ' 1 '}, 'SLURM_CPUS_PER_TASK', 1),
    ],
)
def test_the_first_set_variable_decides(environ, source, granted):
    record = thread_count(environ)
    assert record == {
        'count': granted,
        'source': source,
        'granted': granted,
        'available': available_cpus(),
        'processes': 1,
    }


def test_no_variable_keeps_the_library_defaults():
    record = thread_count({'PATH': '/bin'})
    assert record['count'] is None and record['source'] == 'default' and record['granted'] is None
    assert 'library defaults' in thread_summary(record)


def test_never_more_than_the_cpus_of_the_process():
    record = thread_count({'SLURM_CPUS_PER_TASK': '4096'})
    assert record['granted'] == 4096 and record['count'] == available_cpus() == len(os.sched_getaffinity(0))
    assert f'capped to the {available_cpus()} CPUs' in thread_summary(record)


def test_data_parallel_processes_share_the_threads(monkeypatch):
    """torchrun's processes on one node split the grant (at least one thread each), never multiply it."""
    monkeypatch.setattr('aiida_dm21.runner.common.available_cpus', lambda: 16)
    assert thread_count({'SLURM_CPUS_PER_TASK': '16'}, processes=4)['count'] == 4
    assert thread_count({'SLURM_CPUS_PER_TASK': '64'}, processes=4)['count'] == 4  # capped first, then shared
    record = thread_count({'SLURM_CPUS_PER_TASK': '2'}, processes=4)
    assert record['count'] == 1 and record['processes'] == 4
    assert 'shared by 4 processes: 1 each' in thread_summary(record)


@pytest.mark.parametrize('value', GARBAGE)
@pytest.mark.parametrize('name', THREAD_VARIABLES)
def test_garbage_is_refused(name, value):
    with pytest.raises(ThreadCountError, match=re.escape(f'{name}={value!r}, which is not a positive integer')):
        thread_count({name: value})


def test_garbage_refused_even_with_a_good_lower_variable():
    """The deciding variable is garbage: the job is refused, not quietly run on the next one."""
    with pytest.raises(ThreadCountError, match="SLURM_CPUS_PER_TASK='abc'"):
        thread_count({'SLURM_CPUS_PER_TASK': 'abc', 'OMP_NUM_THREADS': '2'})


# --- the reference runner (PySCF only) ----------------------------------------------------------------------------


def _write(folder: Path, name: str, payload: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({'format_version': INPUT_FORMAT_VERSION, **payload}))
    return path


def _run_module(module: str, path: Path, **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', module, path.name],
        cwd=path.parent,
        env=_subprocess_env(**variables),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_reference_runner_sets_and_records_pyscf_threads(tmp_path):
    """SLURM_CPUS_PER_TASK=1 wins over OMP_NUM_THREADS=2; PyTorch is still never imported by a reference job."""
    path = _write(tmp_path, 'input.json', {**H2, 'reference_method': 'fci', 'label': 'H2'})
    done = _run_module('aiida_dm21.runner.reference', path, SLURM_CPUS_PER_TASK='1', OMP_NUM_THREADS='2')
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['threads'] == {
        'count': 1,
        'source': 'SLURM_CPUS_PER_TASK',
        'granted': 1,
        'available': available_cpus(),
        'processes': 1,
        'libraries': {'pyscf': 1, 'blas': 1},
    }
    assert 'threads: SLURM_CPUS_PER_TASK=1 (pyscf 1, blas 1)' in done.stdout
    assert results['versions']['pyscf'] != 'unknown'


@pytest.mark.parametrize('value', ['abc', '0'])
def test_reference_runner_refuses_a_garbage_count(value, tmp_path, monkeypatch, clean_env):
    from aiida_dm21.runner.reference import EXIT_BAD_INPUT, main

    monkeypatch.setenv('SLURM_CPUS_PER_TASK', value)
    path = _write(tmp_path, 'input.json', {**H2, 'reference_method': 'fci'})
    assert main([str(path)]) == EXIT_BAD_INPUT
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['error']['category'] == 'unsupported_input'
    assert f'SLURM_CPUS_PER_TASK={value!r}, which is not a positive integer' in results['error']['message']
    assert results['threads'] is None and 'scalars' not in results


# --- the SCF runner (PyTorch, numba, PySCF) ---------------------------------------------------------------------


@pytest.fixture(scope='module')
def random_checkpoint(tmp_path_factory) -> Path:
    import torch

    from aiida_dm21.functional.checkpoint import save_checkpoint
    from aiida_dm21.functional.model import DM21Network

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('ckpt') / 'checkpoint.safetensors'
    save_checkpoint(path, DM21Network(), {'name': 'random', 'source': 'test'})
    return path


def test_scf_runner_sets_and_records_all_four_libraries(tmp_path, random_checkpoint):
    """PBS_NUM_PPN=1: PyTorch, numba, PySCF and the BLAS pools all run one thread; the SCF runs (two cycles)."""
    import shutil

    shutil.copy(random_checkpoint, tmp_path / 'checkpoint.safetensors')
    path = _write(tmp_path, 'input.json', {**H2, 'grid_level': 0, 'max_cycle': 2, 'init_guess': 'minao'})
    done = _run_module('aiida_dm21.runner.scf', path, PBS_NUM_PPN='1')
    assert done.returncode in (0, 3), done.stdout + done.stderr  # a random network need not converge in 2 cycles
    results = json.loads((tmp_path / 'results.json').read_text())
    threads = results['threads']
    assert threads['count'] == 1 and threads['source'] == 'PBS_NUM_PPN' and threads['granted'] == 1
    assert threads['libraries']['torch'] == 1 and threads['libraries']['pyscf'] == 1
    assert threads['libraries']['blas'] == 1  # numpy's and scipy's OpenBLAS pools (threadpoolctl)
    assert threads['libraries']['numba'] in (1, None)  # None only where numba cannot be imported
    assert results['error'] is None and results['cycles'] >= 1


@pytest.mark.parametrize('value', ['abc', '0'])
def test_scf_runner_refuses_a_garbage_count(value, tmp_path, monkeypatch, clean_env):
    from aiida_dm21.runner import scf as runner

    monkeypatch.setenv('SLURM_CPUS_PER_TASK', value)
    path = _write(tmp_path, 'input.json', H2)  # run(), not main(): main() installs signal handlers in pytest
    assert runner.run(path, tmp_path) == runner.EXIT_BAD_INPUT
    results = json.loads((tmp_path / runner.RESULTS_FILE).read_text())
    assert results['error']['category'] == 'unsupported_input'
    assert f'SLURM_CPUS_PER_TASK={value!r}, which is not a positive integer' in results['error']['message']
    assert results['threads'] is None and results['e_tot'] is None


# --- the training runner ----------------------------------------------------------------------------------------


def test_training_runner_records_threads_in_metrics(tmp_path):
    """One epoch on H (STO-3G, FCI reference) with NCPUS=1: metrics.json holds the thread record."""
    from aiida_dm21.reference.dataset import save_dataset
    from aiida_dm21.reference.fractional import fractional_spin_systems, integer_system
    from aiida_dm21.reference.integer import IntegerSpec, run_integer_system

    h = run_integer_system(IntegerSpec(atom='H 0 0 0', basis='sto-3g', spin=1, reference_method='fci', label='H'))
    save_dataset(tmp_path / 'datasets_h.npz', [integer_system(h), *fractional_spin_systems(h, (0.5,))])
    hyper = {'epochs': 1, 'grid_level': 0, 'save_every': 1, 'learning_rate': 1e-4}
    path = _write(tmp_path, 'config.json', {'hyperparameters': hyper, 'datasets': ['datasets_h.npz']})
    done = _run_module('aiida_dm21.training.train', path, NCPUS='1')
    assert done.returncode == 0, done.stdout + done.stderr
    threads = json.loads((tmp_path / 'metrics.json').read_text())['threads']
    assert threads['count'] == 1 and threads['source'] == 'NCPUS'
    assert threads['libraries']['torch'] == 1 and threads['libraries']['pyscf'] == 1
    assert 'threads: NCPUS=1' in done.stdout


@pytest.mark.parametrize('value', ['abc', '0'])
def test_training_runner_refuses_a_garbage_count(value, tmp_path, monkeypatch, clean_env):
    from aiida_dm21.training.train import EXIT_BAD_INPUT, main

    monkeypatch.setenv('SLURM_CPUS_PER_TASK', value)
    path = _write(tmp_path, 'config.json', {'hyperparameters': {'epochs': 1}, 'datasets': ['none.npz']})
    assert main([str(path)]) == EXIT_BAD_INPUT
    payload = json.loads((tmp_path / 'error.json').read_text())
    assert payload['error']['category'] == 'unsupported_input'
    assert f'SLURM_CPUS_PER_TASK={value!r}, which is not a positive integer' in payload['error']['message']
    assert payload['threads'] is None and not (tmp_path / 'metrics.json').exists()


@pytest.fixture
def restore_threads():
    """The thread counts of this test process, put back after an in-process runner set them."""
    import numba
    import torch
    from pyscf import lib
    from threadpoolctl import threadpool_limits

    saved = torch.get_num_threads(), numba.get_num_threads(), lib.num_threads()
    with threadpool_limits(limits=None):  # the BLAS pools come back on leaving
        yield
    torch.set_num_threads(saved[0])
    numba.set_num_threads(saved[1])
    lib.num_threads(saved[2])


def test_training_runner_shares_the_threads_between_torchrun_processes(
    tmp_path, monkeypatch, clean_env, restore_threads
):
    """LOCAL_WORLD_SIZE=2 (torchrun) with SLURM_CPUS_PER_TASK=2: one thread per process, also in error.json."""
    from aiida_dm21.training.train import EXIT_BAD_INPUT, main

    monkeypatch.setenv('SLURM_CPUS_PER_TASK', '2')
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')
    path = _write(tmp_path, 'config.json', {'hyperparameters': {'epochs': 1}, 'datasets': ['none.npz']})
    assert main([str(path)]) == EXIT_BAD_INPUT  # no such dataset: refused after the threads were set
    threads = json.loads((tmp_path / 'error.json').read_text())['threads']
    assert threads['processes'] == 2 and threads['count'] == 1 and threads['source'] == 'SLURM_CPUS_PER_TASK'
    assert threads['libraries'] == {'torch': 1, 'numba': 1, 'pyscf': 1, 'blas': 1}


def test_blas_pools_limited_to_the_granted_threads():
    """numpy and scipy each load their own OpenBLAS, whose pools start at every CPU of the node: one thread
    granted means one thread in each of them (threadpoolctl), and the record says so."""
    threadpoolctl = pytest.importorskip('threadpoolctl')
    import scipy.linalg  # noqa: F401  (its BLAS loaded too)

    with threadpoolctl.threadpool_limits(limits=None):  # puts the pools back afterwards
        record = apply_thread_count(('blas',), environ={'SLURM_CPUS_PER_TASK': '1'})
        pools = threadpoolctl.threadpool_info()
        blas = [pool['num_threads'] for pool in pools if pool['user_api'] == 'blas']
        assert blas and set(blas) == {1}, pools
        assert record['libraries'] == {'blas': 1}
        assert '(blas 1)' in thread_summary(record)
