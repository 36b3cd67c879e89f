"""An ASE calculator for DM21 functionals: energy and forces, so that ASE's optimisers, MD and NEB work.

    from ase.build import molecule
    from ase.optimize import BFGS
    from aiida_dm21.ase import DM21Calculator

    atoms = molecule('H2O')
    atoms.calc = DM21Calculator(functional='DM21', basis='6-31g', disp='d3bj')
    BFGS(atoms).run(fmax=0.02)            # eV/Angstrom, ASE's units

Each call runs a DM21 SCF (:func:`aiida_dm21.KS`) and, for forces, its analytic nuclear gradient.  A new
geometry with the same atoms starts from the previous density matrix.  An SCF that does not converge, or
a non-finite energy or force, raises ``ase.calculators.calculator.CalculationFailed`` instead of handing
ASE a wrong number.  Needs ``ase`` (``pip install ase``); not imported by the rest of the package.
"""

from __future__ import annotations

import typing as t

import numpy as np
from ase.calculators.calculator import CalculationFailed, Calculator, all_changes
from ase.units import Bohr, Hartree

__all__ = ['DM21Calculator']


class DM21Calculator(Calculator):
    """DM21 energy (eV) and forces (eV/Angstrom) of a molecule (no periodic boundary conditions).

    :param functional: a name (DM21, DM21m, DM21mc, DM21mu), a checkpoint path or a ``DM21Network``.
    :param basis: a PySCF all-electron basis name.
    :param charge: total charge; ``spin`` (2S) defaults to 0 for an even electron count, else 1.
    :param grid_level: PySCF grid level.
    :param disp: dispersion (``d3bj``, ``d4`` … with B3LYP's parameters), or None.
    :param conv_tol: SCF energy convergence (Ha); ``max_cycle`` its most cycles.
    :param grid_response: include the grid-weight response in the forces (PySCF's convention).
    :param ks_options: further keyword arguments of :func:`aiida_dm21.KS` (``device``, ``screening`` …).
    """

    implemented_properties: t.ClassVar[list[str]] = ['energy', 'free_energy', 'forces']
    default_parameters: t.ClassVar[dict[str, t.Any]] = {
        'functional': 'DM21',
        'basis': '6-31g*',
        'charge': 0,
        'spin': None,
        'grid_level': 3,
        'disp': None,
        'conv_tol': 1e-8,
        'max_cycle': 50,
        'grid_response': True,
    }

    def __init__(self, ks_options: dict[str, t.Any] | None = None, **kwargs: t.Any) -> None:
        super().__init__(**kwargs)
        self.ks_options = dict(ks_options or {})
        self.mf = None
        self._dm: np.ndarray | None = None
        self._numbers: tuple[int, ...] | None = None

    def _molecule(self, atoms):
        from pyscf import gto

        if atoms.pbc.any():
            raise CalculationFailed(f'DM21Calculator treats molecules only; the atoms are periodic (pbc={atoms.pbc})')
        p = self.parameters
        numbers = atoms.get_atomic_numbers()
        spin = p['spin']
        if spin is None:
            spin = int((int(numbers.sum()) - int(p['charge'])) % 2)
        try:
            return gto.M(
                atom=[(int(z), tuple(r)) for z, r in zip(numbers, atoms.get_positions(), strict=True)],
                basis=p['basis'],
                charge=int(p['charge']),
                spin=spin,
                unit='Angstrom',
                verbose=0,
            )
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CalculationFailed(f'cannot build the molecule: {exc}') from exc

    def calculate(self, atoms=None, properties=('energy',), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        from aiida_dm21.functional.scf import KS

        p = self.parameters
        mol = self._molecule(self.atoms)
        try:
            mf = KS(mol, p['functional'], disp=p['disp'], **self.ks_options)
        except (ValueError, RuntimeError) as exc:  # unsupported molecule, basis, functional or option
            raise CalculationFailed(f'DM21 cannot treat this: {exc}') from exc
        mf.grids.level = int(p['grid_level'])
        mf.conv_tol = float(p['conv_tol'])
        mf.max_cycle = int(p['max_cycle'])
        numbers = tuple(int(z) for z in self.atoms.get_atomic_numbers())
        dm0 = self._dm if numbers == self._numbers else None
        energy = mf.kernel(dm0=dm0)
        if not mf.converged or not np.isfinite(energy):
            raise CalculationFailed(f'the DM21 SCF did not converge (E = {energy} Ha, converged={mf.converged})')
        self.mf, self._dm, self._numbers = mf, mf.make_rdm1(), numbers
        self.results['energy'] = self.results['free_energy'] = float(energy) * Hartree
        if 'forces' in properties:
            gradients = mf.nuc_grad_method()
            gradients.grid_response = bool(p['grid_response'])
            gradients.verbose = 0
            grad = np.asarray(gradients.kernel(), dtype=float)
            if not np.isfinite(grad).all():
                raise CalculationFailed('the DM21 nuclear gradient is not finite')
            self.results['forces'] = -grad * Hartree / Bohr
