"""Fractional-charge (FC) and fractional-spin (FS) training systems built from integer calculations (no AiiDA).

FC: for N+δ electrons the exact energy is linear, E(N+δ) = (1−δ) E(N) + δ E(N+1), and the density is
the ensemble D(δ) = (1−δ) D_N + δ D_{N+1}, per spin channel.  FS: an ensemble of a state and its
spin-flipped partner (α ↔ β), D(x) = (1−x) D_↑ + x D_↓, has the energy of the pure state.

Only E_xc is learned, so every system carries E_xc^target = E_ref − E_non-xc[D] with
E_non-xc = kinetic + nuclear attraction + Hartree (of the ensemble density: quadratic, recomputed) +
nuclear repulsion.

For the self-consistency regulariser each system also carries "input orbitals" per spin: the natural
orbitals of D (generalised eigenvectors of S D S C = S C n), made canonical within each block of equal
occupation by diagonalising the ensemble-averaged reference Fock matrix there, with that Fock
matrix's diagonal as orbital energies.  For an integer system these are the reference calculation's
own canonical orbitals.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .integer import IntegerResult, build_molecule, coulomb_matrix, frame_molecule, non_xc_energy

# TrainingSystem lives in a module without PySCF (the dataset file and the AiiDA data node need only it)
from .system import TrainingSystem

__all__ = [
    'TrainingSystem',
    'fractional_charge_systems',
    'fractional_spin_systems',
    'integer_system',
    'natural_orbitals',
]


def natural_orbitals(s: np.ndarray, dm: np.ndarray, fock: np.ndarray, tol: float = 1e-7):
    """Natural orbitals of one spin density matrix, canonicalised with ``fock`` inside equal-occupation blocks.

    Returns (C, n, eps) with C^T S C = 1, occupations n descending, eps = diag(C^T F C).
    """
    occ, coeff = scipy.linalg.eigh(s @ dm @ s, s)
    order = np.argsort(-occ, kind='stable')
    occ, coeff = occ[order], coeff[:, order]
    start = 0
    while start < len(occ):
        stop = start + 1
        while stop < len(occ) and abs(occ[stop] - occ[start]) < tol:
            stop += 1
        block = coeff[:, start:stop]
        f_block = block.T @ fock @ block
        eps, rot = np.linalg.eigh(f_block)
        coeff[:, start:stop] = block @ rot
        start = stop
    eps = np.einsum('pi,pq,qi->i', coeff, fock, coeff)
    return coeff, np.clip(occ, 0.0, 1.0), eps


def _system(kind, label, atom, basis, delta, e_ref, dm, fock, sources) -> TrainingSystem:
    mol = frame_molecule(atom, basis)
    dm_total = dm[0] + dm[1]
    vj = coulomb_matrix(mol, dm_total)  # once: for the Hartree energy and for the regulariser's Fock matrix
    e_non_xc = sum(non_xc_energy(mol, dm, vj).values())
    s = mol.intor('int1e_ovlp')
    coeffs, occs, energies = zip(*(natural_orbitals(s, dm[k], fock[k]) for k in range(2)), strict=True)
    return TrainingSystem(
        kind=kind,
        label=label,
        atom=atom,
        basis=basis,
        delta=float(delta),
        n_electrons=float(np.trace(dm_total @ s)),
        e_ref=float(e_ref),
        e_non_xc=float(e_non_xc),
        e_xc_target=float(e_ref - e_non_xc),
        dm=dm,
        no_coeff=np.stack(coeffs),
        no_occ=np.stack(occs),
        no_energy=np.stack(energies),
        h_core_j=mol.intor('int1e_kin') + mol.intor('int1e_nuc') + vj,
        sources=tuple(sources),
    )


def _check_same_frame(a: IntegerResult, b: IntegerResult) -> None:
    if a.spec.basis.lower() != b.spec.basis.lower():
        raise ValueError(f'{a.spec.label} and {b.spec.label} use different basis sets: no common ensemble')
    mol_a = build_molecule(a.spec.atom, a.spec.basis, a.spec.charge, a.spec.spin)
    mol_b = build_molecule(b.spec.atom, b.spec.basis, b.spec.charge, b.spec.spin)
    if (
        mol_a.natm != mol_b.natm
        or not np.allclose(mol_a.atom_coords(), mol_b.atom_coords(), atol=1e-8)
        or [mol_a.atom_symbol(i) for i in range(mol_a.natm)] != [mol_b.atom_symbol(i) for i in range(mol_b.natm)]
    ):
        raise ValueError(f'{a.spec.label} and {b.spec.label} are not the same nuclei at the same geometry')


def integer_system(result: IntegerResult) -> TrainingSystem:
    """The integer calculation itself as a training system (δ = 0)."""
    spec = result.spec
    return _system(
        'integer',
        spec.label,
        spec.atom,
        spec.basis,
        0.0,
        result.e_ref,
        result.dm,
        result.fock,
        (spec.label,),
    )


def fractional_charge_systems(
    lower: IntegerResult, upper: IntegerResult, deltas=(0.25, 0.5, 0.75)
) -> list[TrainingSystem]:
    """FC ensembles between an N-electron (``lower``) and an N+1-electron (``upper``) calculation."""
    _check_same_frame(lower, upper)
    n_low, n_up = sum(lower.n_electrons), sum(upper.n_electrons)
    if n_up != n_low + 1:
        raise ValueError(
            f'fractional charge needs N and N+1 electrons: {lower.spec.label} has {n_low}, {upper.spec.label} {n_up}'
        )
    systems = []
    for delta in deltas:
        if not 0.0 < delta < 1.0:
            raise ValueError(f'fractional charge δ must lie strictly between 0 and 1, got {delta}')
        dm = (1.0 - delta) * lower.dm + delta * upper.dm
        fock = (1.0 - delta) * lower.fock + delta * upper.fock
        e_ref = (1.0 - delta) * lower.e_ref + delta * upper.e_ref
        label = f'FC[{lower.spec.label}->{upper.spec.label}]@{delta:g}'
        systems.append(
            _system(
                'fc',
                label,
                lower.spec.atom,
                lower.spec.basis,
                delta,
                e_ref,
                dm,
                fock,
                (lower.spec.label, upper.spec.label),
            )
        )
    return systems


def fractional_spin_systems(result: IntegerResult, fractions=(0.25, 0.5)) -> list[TrainingSystem]:
    """FS ensembles of a spin-polarised state and its α ↔ β mirror image, at the pure state's energy."""
    if result.n_electrons[0] == result.n_electrons[1]:
        raise ValueError(f'{result.spec.label} has no spin polarisation: a fractional-spin ensemble is trivial')
    flipped_dm = result.dm[::-1]
    flipped_fock = result.fock[::-1]
    systems = []
    for x in fractions:
        if not 0.0 < x <= 0.5:
            raise ValueError(f'fractional spin fraction must lie in (0, 0.5], got {x}')
        dm = (1.0 - x) * result.dm + x * flipped_dm
        fock = (1.0 - x) * result.fock + x * flipped_fock
        label = f'FS[{result.spec.label}]@{x:g}'
        systems.append(
            _system('fs', label, result.spec.atom, result.spec.basis, x, result.e_ref, dm, fock, (result.spec.label,))
        )
    return systems
