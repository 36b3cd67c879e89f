"""The ASE calculator drives ASE's optimiser with DM21 energies and analytic forces."""

from __future__ import annotations

import numpy as np
import pytest

ase = pytest.importorskip('ase')

from ase import Atoms  # noqa: E402
from ase.calculators.calculator import CalculationFailed  # noqa: E402
from ase.optimize import BFGS  # noqa: E402
from ase.units import Bohr, Hartree  # noqa: E402

from aiida_dm21.ase import DM21Calculator  # noqa: E402

pytestmark = pytest.mark.core


@pytest.fixture(scope='module')
def dm21_network(upstream_dir):
    from aiida_dm21.functional.checkpoint import load_network

    return load_network(upstream_dir / 'DM21')[0]


def test_forces_are_minus_the_energy_derivative_and_bfgs_relaxes_h2(dm21_network):
    atoms = Atoms('H2', positions=[(0, 0, 0), (0, 0, 0.80)])
    atoms.calc = DM21Calculator(functional=dm21_network, basis='sto-3g', grid_level=2, conv_tol=1e-10)
    forces = atoms.get_forces()
    assert np.allclose(forces.sum(0), 0.0, atol=1e-4)  # translational invariance (grid response on)
    step = 1e-3  # Angstrom
    energies = []
    for sign in (1, -1):
        moved = atoms.copy()
        moved.positions[1, 2] += sign * step
        moved.calc = atoms.calc
        energies.append(moved.get_potential_energy())
    assert forces[1, 2] == pytest.approx(-(energies[0] - energies[1]) / (2 * step), abs=2e-4 * Hartree / Bohr)
    BFGS(atoms, logfile=None).run(fmax=0.01, steps=30)
    assert np.abs(atoms.get_forces()).max() < 0.01
    assert 0.70 < atoms.get_distance(0, 1) < 0.76


def test_periodic_atoms_impossible_spin_and_unconverged_scf_are_refused(dm21_network):
    crystal = Atoms('H2', positions=[(0, 0, 0), (0, 0, 0.74)], cell=[3, 3, 3], pbc=True)
    crystal.calc = DM21Calculator(functional=dm21_network, basis='sto-3g')
    with pytest.raises(CalculationFailed, match='molecules only'):
        crystal.get_potential_energy()
    atom = Atoms('H', positions=[(0, 0, 0)])
    atom.calc = DM21Calculator(functional=dm21_network, basis='sto-3g', spin=0)  # one electron, spin 0: impossible
    with pytest.raises(CalculationFailed, match='cannot build the molecule'):
        atom.get_potential_energy()
    lih = Atoms('LiH', positions=[(0, 0, 0), (0, 0, 1.6)])  # (H2/STO-3G would be converged by symmetry at once)
    lih.calc = DM21Calculator(functional=dm21_network, basis='sto-3g', grid_level=1, conv_tol=1e-12, max_cycle=1)
    with pytest.raises(CalculationFailed, match='did not converge'):
        lih.get_potential_energy()
    assert 'energy' not in lih.calc.results  # nothing half-computed handed to ASE
