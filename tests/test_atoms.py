"""Deterministic starts for open-shell atoms (aiida_dm21.functional.atoms): real PySCF, no mocks."""

from __future__ import annotations

import numpy as np
import pytest
from pyscf import gto

from aiida_dm21.functional import atoms
from aiida_dm21.functional.model import DM21Network
from aiida_dm21.functional.scf import KS

pytestmark = pytest.mark.core


@pytest.fixture(scope='module')
def carbon():
    return gto.M(atom='C 0 0 0', basis='sto-3g', spin=2, verbose=0)


def test_default_directions_cover_the_unique_region():
    d = atoms.DEFAULT_DIRECTIONS
    assert d.shape[1] == 3 and len(d) >= 20
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-12)
    assert np.all(d[:, 0] >= d[:, 1] - 1e-12) and np.all(d[:, 1] >= d[:, 2] - 1e-12) and np.all(d[:, 2] >= -1e-12)
    # the high-symmetry directions come first, so ties go to them
    np.testing.assert_allclose(d[2], np.ones(3) / np.sqrt(3))


def test_is_open_shell_atom():
    assert atoms.is_open_shell_atom(gto.M(atom='O 0 0 0', basis='sto-3g', spin=2))
    assert not atoms.is_open_shell_atom(gto.M(atom='Ne 0 0 0', basis='sto-3g'))
    assert not atoms.is_open_shell_atom(gto.M(atom='O 0 0 0; H 0 0 1', basis='sto-3g', spin=1))


def test_rotation_taking_maps_and_is_proper():
    rng = np.random.default_rng(3)
    for _ in range(5):
        a, b = rng.normal(size=3), rng.normal(size=3)
        r = atoms._rotation_taking(a, b)
        np.testing.assert_allclose(r @ (a / np.linalg.norm(a)), b / np.linalg.norm(b), atol=1e-12)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(r) == pytest.approx(1.0)
    r = atoms._rotation_taking(np.array([0, 0, 1.0]), np.array([0, 0, -1.0]))  # antiparallel
    np.testing.assert_allclose(r @ [0, 0, 1.0], [0, 0, -1.0], atol=1e-12)


def test_symmetric_state_has_its_open_shell_on_a_grid_axis(carbon):
    mf = KS(carbon, DM21Network())  # untrained network, unused: only the B3LYP guess runs
    dm, energy = atoms.symmetric_guess(mf)
    axis = atoms.open_shell_axis(carbon, dm)
    assert np.sort(np.abs(axis)) == pytest.approx([0.0, 0.0, 1.0], abs=1e-8)
    assert energy == pytest.approx(-37.33086959, abs=1e-7)  # C/STO-3G B3LYP(VWN5), level-3 grid


def test_rotate_density_moves_the_open_shell_and_keeps_the_electrons(carbon):
    mf = KS(carbon, DM21Network())
    dm, _ = atoms.symmetric_guess(mf)
    target = np.array([1.0, 2.0, 2.0]) / 3.0
    axis = atoms.open_shell_axis(carbon, dm)
    rotated = atoms.rotate_density(carbon, dm, atoms._rotation_taking(axis, target))
    new_axis = atoms.open_shell_axis(carbon, rotated)
    assert abs(new_axis @ target) == pytest.approx(1.0, abs=1e-10)
    s = carbon.intor('int1e_ovlp')
    np.testing.assert_allclose(np.einsum('sij,ji->s', rotated, s), carbon.nelec, atol=1e-10)


def test_closed_p_shell_has_no_axis():
    mol = gto.M(atom='Ne 0 0 0', basis='sto-3g', verbose=0)
    dm = np.stack([np.diag([1.0, 1, 1, 1, 1])] * 2)  # 1s 2s 2p^6: spherical
    assert atoms.open_shell_axis(mol, dm) is None


def test_oriented_start_is_deterministic_and_lands_where_asked(carbon):
    mf = KS(carbon, DM21Network())
    target = np.array([0.0, 0.0, 1.0])
    dm1, e1 = atoms.oriented_guess(mf, target)
    dm2, e2 = atoms.oriented_guess(mf, target)
    assert e1 == pytest.approx(e2, abs=1e-10)
    np.testing.assert_allclose(dm1, dm2, atol=1e-7)
    assert abs(atoms.open_shell_axis(carbon, dm1) @ target) == pytest.approx(1.0, abs=1e-6)


def test_open_shell_direction_on_the_scf_object(carbon, upstream_dir):
    mf = KS(carbon, upstream_dir / 'DM21')
    mf.conv_tol = 1e-7
    mf.open_shell_direction = (0, 0, 1)
    energy = mf.kernel()
    assert mf.converged
    assert energy == pytest.approx(-37.34185853370385, abs=1e-5)  # DeepMind's C/STO-3G DM21 energy
    for bad in ('sideways', (0, 0, 0)):
        mf.open_shell_direction = bad
        with pytest.raises(ValueError, match='open_shell_direction'):
            mf.get_init_guess(key='b3lyp')


def test_oriented_guess_refuses_molecules():
    mf = KS(gto.M(atom='O 0 0 0; H 0 0 0.97', basis='sto-3g', spin=1, verbose=0), DM21Network())
    with pytest.raises(ValueError, match='open-shell atom'):
        atoms.oriented_guess(mf, (0, 0, 1))


def test_lowest_guess_is_the_minimum_of_its_scan(carbon):
    mf = KS(carbon, DM21Network())
    directions = atoms.DEFAULT_DIRECTIONS[:6]
    scan = atoms.lowest_guess(mf, directions)
    assert len(scan.energies) == 6
    assert scan.energy == scan.energies.min() or scan.energy <= scan.energies.min() + 1e-9
    assert scan.spread >= 0.0
    # every state in the scan is a C triplet B3LYP state within the grid's orientation spread
    assert scan.spread < 1e-5


def test_runner_passes_open_shell_direction(carbon, tmp_path):
    from aiida_dm21.functional.checkpoint import save_checkpoint
    from aiida_dm21.runner.scf import RunnerError, make_scf

    checkpoint = tmp_path / 'checkpoint.safetensors'
    save_checkpoint(checkpoint, DM21Network())
    base = {'scf_type': 'auto'}
    assert make_scf(carbon, base, checkpoint)[0].open_shell_direction is None
    mf, _ = make_scf(carbon, {**base, 'open_shell_direction': 'lowest'}, checkpoint)
    assert mf.open_shell_direction == 'lowest'
    mf, scf_type = make_scf(carbon, {**base, 'open_shell_direction': [0, 0, 1]}, checkpoint)
    assert scf_type == 'UKS' and mf.open_shell_direction == (0.0, 0.0, 1.0)
    for bad in ('up', [0, 0, 0]):
        with pytest.raises(RunnerError, match='open_shell_direction'):
            make_scf(carbon, {**base, 'open_shell_direction': bad}, checkpoint)


@pytest.mark.parametrize(
    'bad', ['sideways', [0, 0, 0], [1, 0], [1, 0, 0, 0], ['1', '0', '0'], [True, 0, 0], [np.nan, 0, 1], 3]
)
def test_parse_direction_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="neither 'lowest' nor a non-zero 3-vector"):
        atoms.parse_direction(bad)


def test_parse_direction_accepts_lowest_and_vectors():
    assert atoms.parse_direction('lowest') == 'lowest'
    assert atoms.parse_direction([0, 0.5, 1]) == (0.0, 0.5, 1.0)
    assert atoms.parse_direction(np.array([1.0, 2.0, 2.0])) == (1.0, 2.0, 2.0)
