"""The ``aiida-dm21`` command line (no AiiDA profile needed for these commands)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from aiida_dm21.cli import main

pytestmark = pytest.mark.core


def test_weights_import_fetch_list(upstream_dir, tmp_path, monkeypatch):
    monkeypatch.setenv('AIIDA_DM21_WEIGHTS_DIR', str(tmp_path / 'w'))
    runner = CliRunner()
    result = runner.invoke(main, ['weights', 'import', str(upstream_dir / 'DM21'), '--no-store'])  # no AiiDA here
    assert result.exit_code == 0, result.output
    assert (tmp_path / 'w' / 'DM21.safetensors').is_file()
    result = runner.invoke(main, ['weights', 'fetch', 'DM21m', '--source', upstream_dir.as_uri(), '--no-store'])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ['weights', 'list'])
    assert result.exit_code == 0 and 'deepmind:DM21m' in result.output and 'deepmind:DM21 ' in result.output


def test_weights_errors_are_clear(upstream_dir, tmp_path, monkeypatch):
    monkeypatch.setenv('AIIDA_DM21_WEIGHTS_DIR', str(tmp_path / 'w'))
    runner = CliRunner()
    result = runner.invoke(main, ['weights', 'fetch', 'DM22', '--source', str(upstream_dir)])
    assert result.exit_code != 0 and 'unknown functional' in result.output
    truncated = tmp_path / 'DM21'
    shutil.copytree(upstream_dir / 'DM21', truncated)
    index = truncated / 'variables' / 'variables.index'
    index.chmod(0o644)
    index.write_bytes(index.read_bytes()[:100])
    result = runner.invoke(main, ['weights', 'import', str(truncated)])
    assert result.exit_code == 1 and 'sha256 mismatch' in result.output
    result = runner.invoke(main, ['weights', 'import', '--no-verify', str(truncated)])
    assert result.exit_code == 1 and 'variables.index' in result.output
    assert not (tmp_path / 'w' / 'DM21.safetensors').exists()


def test_run_prints_the_energy(weights_env):
    result = CliRunner().invoke(main, ['run', 'h2', '--basis', 'sto-3g', '--json'])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data['scf'] == 'RKS' and data['converged'] and -1.2 < data['e_tot'] < -1.0


def test_run_with_dispersion_and_refuses_an_unknown_one(weights_env):
    runner = CliRunner()
    plain = json.loads(runner.invoke(main, ['run', 'h2', '--basis', 'sto-3g', '--json']).stdout)
    result = runner.invoke(main, ['run', 'h2', '--basis', 'sto-3g', '--disp', 'd3bj', '--json'])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data['dispersion'] == 'd3bj' and data['e_disp'] < 0
    assert data['e_tot'] - plain['e_tot'] == pytest.approx(data['e_disp'], abs=1e-8)
    result = runner.invoke(main, ['run', 'h2', '--basis', 'sto-3g', '--disp', 'd3'])
    assert result.exit_code == 2 and "'d3' is not one of" in result.output


def test_run_rejects_bad_molecules(weights_env):
    runner = CliRunner()
    result = runner.invoke(main, ['run', 'Xx 0 0 0', '--basis', 'sto-3g'])
    assert result.exit_code == 1 and 'cannot build the molecule' in result.output
    result = runner.invoke(main, ['run', 'h2', '--basis', 'sto-3g', '--charge', '1', '--spin', '0'])
    assert result.exit_code == 1 and 'cannot build the molecule' in result.output
    result = runner.invoke(main, ['run', 'h2', '--basis', 'sto-3g', '-f', 'DM99'])
    assert result.exit_code == 1 and 'unknown functional' in result.output


@pytest.mark.skipif(__import__('torch').cuda.is_available(), reason='this machine has a GPU')
def test_run_refuses_cuda_without_gpu(weights_env):
    from click.testing import CliRunner

    from aiida_dm21.cli import main

    result = CliRunner().invoke(main, ['run', 'h2', '--basis', 'sto-3g', '--device', 'cuda'])
    assert result.exit_code == 1
    assert 'sees no CUDA GPU' in result.output and 'Traceback' not in result.output
