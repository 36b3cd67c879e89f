"""A training system (a fixed density and the XC energy it should have), without PySCF (NumPy only).

Built by :mod:`aiida_dm21.reference.fractional`; read and written by :mod:`aiida_dm21.reference.dataset`, which
the ``dm21.dataset`` data node uses to validate files without importing PySCF.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ['TrainingSystem']


@dataclasses.dataclass
class TrainingSystem:
    """One training/evaluation system: a fixed density and the XC energy it should have."""

    kind: str  # 'integer' | 'fc' | 'fs'
    label: str
    atom: str
    basis: str
    delta: float  # fraction (FC: of the upper system; FS: of the spin-flipped state); 0 for integer systems
    n_electrons: float
    e_ref: float
    e_non_xc: float
    e_xc_target: float
    dm: np.ndarray  # (2, nao, nao)
    no_coeff: np.ndarray  # (2, nao, nao) natural orbitals per spin
    no_occ: np.ndarray  # (2, nao)
    no_energy: np.ndarray  # (2, nao)
    h_core_j: np.ndarray  # (nao, nao): kinetic + nuclear attraction + Hartree potential of the ensemble density
    sources: tuple[str, ...]  # labels of the integer calculations it was built from

    def scalars(self) -> dict:
        return {
            'kind': self.kind,
            'label': self.label,
            'atom': self.atom,
            'basis': self.basis,
            'delta': self.delta,
            'n_electrons': self.n_electrons,
            'e_ref': self.e_ref,
            'e_non_xc': self.e_non_xc,
            'e_xc_target': self.e_xc_target,
            'sources': list(self.sources),
        }
