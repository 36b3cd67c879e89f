"""Hard cases through the dm21.scf runner: an open-shell first-row transition-metal atom (DeepMind's issue #479:
V, Cr and Mn do not converge) either converges or ends as not converged with finite numbers, never NaN."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from aiida_dm21.runner import scf as runner

pytestmark = pytest.mark.core


def _strict_json(text: str):
    def refuse(constant: str):
        raise AssertionError(f'results.json holds {constant}')

    return json.loads(text, parse_constant=refuse)


def _finite_everywhere(value, where: str = 'results') -> None:
    if isinstance(value, float):
        assert math.isfinite(value), where
    elif isinstance(value, dict):
        for key, item in value.items():
            _finite_everywhere(item, f'{where}.{key}')
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _finite_everywhere(item, f'{where}[{i}]')


@pytest.fixture(scope='module')
def checkpoint(upstream_dir, tmp_path_factory):
    from aiida_dm21.functional.checkpoint import install_deepmind

    path, _ = install_deepmind(upstream_dir / 'DM21', tmp_path_factory.mktemp('weights'))
    return path


def test_vanadium_atom_converges_or_says_so(checkpoint, tmp_path):
    """V (4F, quartet), STO-3G, a few cycles: exit 0 or 3 (not converged), finite energy, density saved, no NaN.

    (The same with ``newton: True``, the exact-kernel Newton solver, passed too but took 508 s for 6 macro
    iterations on a loaded 2-core machine: too long for the suite.)
    """
    shutil.copy(checkpoint, tmp_path / 'model.safetensors')
    data = {
        'symbols': ['V'],
        'positions': [[0.0, 0.0, 0.0]],
        'basis': 'sto-3g',
        'multiplicity': 4,
        'grid_level': 1,
        'max_cycle': 6,
        'checkpoint': 'model.safetensors',
    }
    (tmp_path / 'input.json').write_text(json.dumps(data))
    status = runner.run(tmp_path / 'input.json', tmp_path)
    results = _strict_json((tmp_path / 'results.json').read_text())
    assert status in (runner.EXIT_CONVERGED, runner.EXIT_NOT_CONVERGED), results.get('error')
    assert results['converged'] is (status == runner.EXIT_CONVERGED)
    assert results['error'] is None
    # B3LYP (b3lyp5, UKS) gives -933.827 Ha for V/STO-3G; a DM21 energy within 1 Ha of it is a real one
    assert isinstance(results['e_tot'], float) and abs(results['e_tot'] + 933.827) < 1.0
    assert results['nelec'] == [13, 10]
    _finite_everywhere(results)
    assert (tmp_path / results['density_file']).is_file()
