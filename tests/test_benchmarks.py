"""The benchmark scripts refuse nonsensical options before doing any work."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCF_SPEED = Path(__file__).resolve().parents[1] / 'benchmarks' / 'scf_speed.py'


@pytest.mark.parametrize(('value', 'message'), [('0', 'must be at least 1, got 0'), ('two', 'invalid')])
def test_scf_speed_refuses_a_bad_repeat_count(value, message):
    result = subprocess.run(
        [sys.executable, str(SCF_SPEED), '--repeat', value], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2
    assert '--repeat' in result.stderr and message in result.stderr


SCALE = SCF_SPEED.with_name('scale.py')


@pytest.mark.parametrize(
    ('args', 'message'),
    [
        (['--timeout', '0'], '--timeout must be positive'),
        (['--systems', 'c3po'], "invalid choice: 'c3po'"),
        pytest.param(
            ['--device', 'cuda'],
            'sees no CUDA GPU',
            marks=pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='this machine has a GPU'),
        ),
        (['--device', 'quantum'], 'not a device name'),
    ],
)
def test_scale_refuses_bad_options_before_any_work(args, message):
    command = [sys.executable, str(SCALE), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert message in result.stderr


def test_scale_alkanes_and_slope():
    """The alkane geometries are C_nH_2n+2 with C-C 1.53 A and no clashes; the slope fit recovers an exponent."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location('scale', SCALE)
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    for n in (2, 4, 8, 16):
        atoms = scale.alkane(n)
        symbols = [s for s, _ in atoms]
        assert symbols.count('C') == n and symbols.count('H') == 2 * n + 2
        xyz = np.array([p for _, p in atoms])
        d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1) + 10 * np.eye(len(xyz))
        carbons = [i for i, s in enumerate(symbols) if s == 'C']
        assert np.allclose([d[i, j] for i, j in itertools.pairwise(carbons)], 1.53, atol=1e-3)
        assert d.min() > 0.9  # every pair of atoms at least a C-H bond apart
    assert scale.slope([(a, 3.0 * a**2.5) for a in (8, 14, 26, 50)]) == pytest.approx(2.5)


OVERHEAD = SCF_SPEED.with_name('aiida_overhead.py')


@pytest.mark.parametrize(
    ('args', 'message'),
    [(['--n', '0'], 'must be at least 1, got 0'), (['--batch-size', '1', '0'], 'must be at least 1, got 0')],
)
def test_aiida_overhead_refuses_bad_options_before_any_work(args, message):
    result = subprocess.run(
        [sys.executable, str(OVERHEAD), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.slow
def test_aiida_overhead_smoke(tmp_path):
    """N=3 through the workchain (one batch and one job per species) and the plain loop: the table is printed."""
    pytest.importorskip('aiida.engine')
    command = [sys.executable, str(OVERHEAD), '--n', '3', '--batch-size', '1', '3', '--keep-profile', str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith('| 3 |')]
    assert [row.split('|')[2].strip() for row in rows] == ['1', '3']
    assert [row.split('|')[3].strip() for row in rows] == ['3', '1']  # CalcJobs


@pytest.mark.slow
def test_aiida_overhead_on_postgresql_with_ten_electron_species(tmp_path):
    """``--storage psql`` (a throw-away core.psql_dos profile in a new database, dropped afterwards) and
    ``--species ten-electron`` (CCSD(T)/cc-pVTZ): two species in one batch."""
    pytest.importorskip('aiida.engine')
    psycopg = pytest.importorskip('psycopg')
    connect = 'host=127.0.0.1 port=5432 user=postgres dbname=postgres'
    try:
        with psycopg.connect(connect, connect_timeout=5) as connection:
            before = {row[0] for row in connection.execute('SELECT datname FROM pg_database')}
    except psycopg.OperationalError as exc:
        if os.environ.get('AIIDA_DM21_REQUIRE_SERVICES'):
            raise
        pytest.skip(f'no PostgreSQL at 127.0.0.1:5432: {exc}')
    command = [sys.executable, str(OVERHEAD), '--n', '2', '--batch-size', '2', '--storage', 'psql']
    command += ['--species', 'ten-electron', '--keep-profile', str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'CCSD(T)/cc-pvtz' in result.stdout and 'storage psql' in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith('| 2 |')]
    assert len(rows) == 1 and rows[0].split('|')[3].strip() == '1'  # one CalcJob
    with psycopg.connect(connect) as connection:
        after = {row[0] for row in connection.execute('SELECT datname FROM pg_database')}
    assert after == before  # the benchmark's database is gone


EXACT_CONDITIONS = SCF_SPEED.with_name('exact_conditions.py')


@pytest.mark.parametrize(
    ('args', 'message'),
    [
        (['--weights', '0,nan'], 'every weight must be a finite number >= 0'),
        (['--weights', '-1'], 'every weight must be a finite number >= 0'),
        (['--weights', 'heavy'], 'expected numbers separated by commas'),
        (['--deltas', '0.5,inf'], '`deltas` must hold finite numbers in (0.0, 1.0), got inf'),
        (['--deltas', '0.5,1'], '`deltas`: 1.0 is outside (0.0, 1.0)'),
        (['--deltas', '0'], '`deltas`: 0.0 is outside (0.0, 1.0)'),
        (['--deltas', ','], '`deltas` must be a non-empty list of numbers in (0.0, 1.0), got []'),
        (['--deltas', 'half'], 'expected numbers separated by commas'),
    ],
)
def test_exact_conditions_refuses_bad_weights_before_any_work(args, message):
    result = subprocess.run(
        [sys.executable, str(EXACT_CONDITIONS), *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr
