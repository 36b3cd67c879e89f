"""Checks that a molecule can be a DM21 calculation at all: geometry, occupations, ECP bases (PySCF and numpy only).

The SCF objects (:mod:`.scf`) run them when they are made; the ``dm21.scf`` CalcJob runs them at validation on
the submitting machine (which needs no PyTorch for them) and the runner again on the compute node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ['MIN_DISTANCE_ANGSTROM', 'basis_ecp', 'check_geometry', 'check_occupations', 'missing_ecp']

#: Atoms closer than this (Angstrom) are refused: no chemical bond is shorter (H2: 0.74), and PySCF builds
#: such a molecule (it refuses only below 1e-5 Bohr) into a singular overlap matrix or a meaningless energy.
MIN_DISTANCE_ANGSTROM = 0.1


def basis_ecp(basis: str, symbols: Sequence[str]) -> dict[str, str]:
    """The effective core potentials that the basis set ``basis`` brings for these elements: ``{symbol: basis}``.

    PySCF never adds the ECP of a basis by itself (``gto.M(basis='def2-svp')`` for iodine runs all 53 electrons
    in a basis made for 25); this is the ``ecp=`` a molecule must be built with, so that the ECP is seen and
    refused (DM21 needs all-electron densities).  Empty for an all-electron basis or a name PySCF cannot read.
    """
    import warnings

    from pyscf.gto import basis as pyscf_basis

    if not isinstance(basis, str):
        return {}
    found = {}
    for symbol in sorted(set(symbols)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                ecp = pyscf_basis.load_ecp(basis, symbol)
        except Exception:  # an unknown basis name: the basis itself is refused when the molecule is built
            continue
        if ecp:
            found[symbol] = basis
    return found


def check_geometry(symbols: Sequence[str], positions: Any) -> str | None:
    """``None``, or why the atoms cannot be a molecule: two atoms closer than :data:`MIN_DISTANCE_ANGSTROM`."""
    coords = np.asarray(positions, dtype=float).reshape(-1, 3)
    if len(coords) < 2:
        return None
    distances = np.linalg.norm(coords[:, None, :] - coords[None, :, :], axis=-1)
    distances[np.diag_indices(len(coords))] = np.inf
    i, j = np.unravel_index(int(np.argmin(distances)), distances.shape)
    if distances[i, j] < MIN_DISTANCE_ANGSTROM:
        i, j = sorted((int(i), int(j)))
        return (
            f'atoms {i + 1} ({symbols[i]}) and {j + 1} ({symbols[j]}) are {distances[i, j]:.3g} Angstrom apart: '
            f'atoms closer than {MIN_DISTANCE_ANGSTROM} Angstrom are refused (coincident or duplicated atoms?)'
        )
    return None


def check_occupations(nelec: Sequence[int], nao: int, basis: str) -> str | None:
    """``None``, or why ``nelec`` (alpha, beta) electrons do not fit in ``nao`` basis functions."""
    n_alpha, n_beta = (int(n) for n in nelec)
    if max(n_alpha, n_beta) > nao:
        return (
            f'{n_alpha} alpha and {n_beta} beta electrons do not fit in the {nao} basis functions of {basis!r} '
            '(at most one electron of each spin per orbital): use a larger basis set'
        )
    return None


def missing_ecp(mol) -> dict[str, str]:
    """``{symbol: basis}`` for elements whose basis set comes with an ECP that ``mol`` was built without.

    ``gto.M(atom='I 0 0 0; I 0 0 2.66', basis='def2-svp')`` has no ECP (PySCF adds one only when asked with
    ``ecp=``) and would run all 106 electrons in a basis made for the valence ones.
    """
    if mol.has_ecp():
        return {}
    symbols = [mol.atom_pure_symbol(i) for i in range(mol.natm)]
    if isinstance(mol.basis, str):
        return basis_ecp(mol.basis, symbols)
    found: dict[str, str] = {}
    if isinstance(mol.basis, dict):
        for symbol in set(symbols):
            name = mol.basis.get(symbol, mol.basis.get('default'))
            if isinstance(name, str):
                found.update(basis_ecp(name, [symbol]))
    return found
