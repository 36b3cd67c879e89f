"""Geometry optimisation of a DM21 SCF with geomeTRIC (through PySCF's ``geomopt.geometric_solver``).

The ``dm21.relax`` CalcJob writes the ``dm21.scf`` runner's ``input.json`` with one more key, ``relax``
(the optimiser settings below); :func:`aiida_dm21.runner.scf.run` then calls :func:`optimise` instead of a
single SCF.  After the optimiser stops, one last SCF at the final geometry (from the last density) gives
the reported energy, orbitals and density, so that every output belongs to the output structure.

``relax.json`` (always written, also after a failure) holds the trajectory: the positions (Angstrom),
the energy (Ha) and the largest gradient component (Ha/bohr) of every geometry the optimiser asked
for, whether it converged, and the final positions.  A failed or interrupted optimisation still
leaves its last geometry there, for a restart.

=========================  ========================================================================
``relax`` key              meaning (geomeTRIC's names and defaults)
=========================  ========================================================================
``max_steps``              optimiser steps before giving up (100)
``convergence_energy``     energy change (Ha, 1e-6)
``convergence_grms``       RMS gradient (Ha/bohr, 3e-4)
``convergence_gmax``       largest gradient component (Ha/bohr, 4.5e-4)
``convergence_drms``       RMS displacement (Angstrom, 1.2e-3)
``convergence_dmax``       largest displacement (Angstrom, 1.8e-3)
=========================  ========================================================================
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ['CONVERGENCE_KEYS', 'RELAX_DEFAULTS', 'RELAX_FILE', 'optimise']

RELAX_FILE = 'relax.json'

#: The optimiser settings and their defaults (geomeTRIC's own defaults for the thresholds).
RELAX_DEFAULTS: dict[str, float | int] = {
    'max_steps': 100,
    'convergence_energy': 1e-6,
    'convergence_grms': 3e-4,
    'convergence_gmax': 4.5e-4,
    'convergence_drms': 1.2e-3,
    'convergence_dmax': 1.8e-3,
}
CONVERGENCE_KEYS = tuple(key for key in RELAX_DEFAULTS if key.startswith('convergence_'))


class _Trajectory:
    """geomeTRIC's per-step callback: every geometry, energy and largest gradient, written as it goes."""

    def __init__(self, path: Path, symbols: list[str]) -> None:
        self.path = path
        self.symbols = symbols
        self.positions: list[list[list[float]]] = []
        self.energies: list[float | None] = []
        self.max_force: list[float | None] = []
        self.converged = False
        self.final_positions: list[list[float]] | None = None

    def __call__(self, envs: dict[str, Any]) -> None:
        mol = envs['mol']
        energy, gradients = envs.get('energy'), envs.get('gradients')
        self.positions.append(mol.atom_coords(unit='Angstrom').tolist())
        self.energies.append(float(energy) if energy is not None and np.isfinite(energy) else None)
        grad = np.asarray(gradients, dtype=float) if gradients is not None else None
        self.max_force.append(float(np.abs(grad).max()) if grad is not None and np.isfinite(grad).all() else None)
        self.write()

    def write(self) -> None:
        data = {
            'symbols': self.symbols,
            'units': {'positions': 'Angstrom', 'energies': 'Ha', 'max_force': 'Ha/bohr'},
            'positions': self.positions,
            'energies': self.energies,
            'max_force': self.max_force,
            'steps': len(self.positions),
            'converged': self.converged,
            'final_positions': self.final_positions,
        }
        tmp = self.path.with_suffix('.tmp')
        tmp.write_text(json.dumps(data, indent=1), encoding='utf8')
        tmp.replace(self.path)

    @property
    def last_positions(self) -> list[list[float]] | None:
        return self.final_positions or (self.positions[-1] if self.positions else None)


def optimise(mf, settings: dict[str, Any], workdir: Path, dm0=None):
    """Relax ``mf.mol`` with geomeTRIC; return ``(mf at the final geometry, converged)``; write ``relax.json``.

    :raises RuntimeError: from the optimiser or the SCF (an SCF that does not converge at some geometry
        raises ``RuntimeError('Nuclear gradients of ... not converged')``); ``relax.json`` holds what ran.
    """
    from pyscf.geomopt import geometric_solver

    values = {**RELAX_DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    mol = mf.mol
    symbols = [mol.atom_pure_symbol(i) for i in range(mol.natm)]
    trajectory = _Trajectory(workdir / RELAX_FILE, symbols)
    trajectory.write()
    if dm0 is not None:
        mf.kernel(dm0=dm0)  # the scanner then starts its first geometry from this density
    conv_params = {key: float(values[key]) for key in CONVERGENCE_KEYS}
    with tempfile.TemporaryDirectory(prefix='geometric-', dir=workdir) as scratch:
        previous = Path.cwd()
        os.chdir(scratch)  # geomeTRIC writes its own log and xyz files into the working directory
        try:
            converged, final = geometric_solver.kernel(
                mf, maxsteps=int(values['max_steps']), callback=trajectory, **conv_params
            )
        finally:
            os.chdir(previous)
            trajectory.write()
    trajectory.converged = bool(converged)
    trajectory.final_positions = final.atom_coords(unit='Angstrom').tolist()
    trajectory.write()
    # the reported energy, orbitals and density belong to the final geometry
    dm = mf.make_rdm1() if mf.mo_coeff is not None else None
    mf.reset(final)
    mf.mol = final
    mf.kernel(dm0=dm)
    return mf, bool(converged)


def read_trajectory(workdir: Path) -> dict[str, Any] | None:
    path = workdir / RELAX_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding='utf8'))
