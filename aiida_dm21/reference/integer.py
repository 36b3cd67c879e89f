"""Integer-electron reference calculations (no AiiDA): a density and a reference energy per species.

For a molecule or atom with a charge and spin this computes

* the density (unrestricted HF, or a chosen PySCF functional, always as alpha/beta matrices),
* a reference total energy: FCI, CCSD(T), CCSD, HF, or a number supplied by the user; computed in the
  density's basis, or in a larger ``reference_basis`` (the density, and so the E_xc target, stay in ``basis``:
  DM21 learned near-complete-basis energies on densities of its working basis),
* the non-XC energy terms of that density (kinetic, nuclear attraction, Hartree, nuclear repulsion),
* orbitals, occupations and orbital energies per spin, and the reference-method Fock matrices.

Everything is returned as plain NumPy arrays and JSON-able numbers so that a CalcJob can write it on
the compute node and a parser can read it back.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from pyscf import cc, dft, fci, gto, scf

# the names the AiiDA plugins need, kept free of PySCF
from .constants import ARRAY_NAMES, FCI_MAX_ELECTRONS, REFERENCE_METHODS, ReferenceInputError

__all__ = [
    'REFERENCE_METHODS',
    'IntegerResult',
    'IntegerSpec',
    'ReferenceInputError',
    'build_molecule',
    'coulomb_matrix',
    'frame_molecule',
    'non_xc_energy',
    'run_integer_system',
]


@dataclasses.dataclass
class IntegerSpec:
    """One integer-electron system. ``spin`` is 2S (PySCF convention); geometry in Angstrom."""

    atom: str
    basis: str
    charge: int = 0
    spin: int = 0
    density_method: str = 'hf'  # 'hf' or a PySCF xc string such as 'b3lyp5'
    reference_method: str = 'ccsd(t)'
    user_energy: float | None = None  # Ha, for reference_method == 'user'
    label: str = ''
    conv_tol: float = 1e-10
    max_cycle: int = 50  # SCF cycles of the density (and HF) calculation, then as many Newton iterations
    cc_max_cycle: int = 50  # CCSD amplitude iterations
    #: basis of the reference energy (its own HF, then the correlated method) when not ``basis``; None: ``basis``
    reference_basis: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> IntegerSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ReferenceInputError(f'unknown keys {sorted(unknown)} in an integer-system specification')
        return cls(**data)


@dataclasses.dataclass
class IntegerResult:
    spec: IntegerSpec
    n_electrons: tuple[int, int]
    e_ref: float
    e_density_method: float
    e_kinetic: float
    e_nuclear_attraction: float
    e_hartree: float
    e_nuclear_repulsion: float
    converged: bool
    dm: np.ndarray  # (2, nao, nao)
    mo_coeff: np.ndarray  # (2, nao, nmo)
    mo_occ: np.ndarray  # (2, nmo)
    mo_energy: np.ndarray  # (2, nmo)
    fock: np.ndarray  # (2, nao, nao) of the density method
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def e_non_xc(self) -> float:
        return self.e_kinetic + self.e_nuclear_attraction + self.e_hartree + self.e_nuclear_repulsion

    @property
    def e_xc_target(self) -> float:
        return self.e_ref - self.e_non_xc

    def scalars(self) -> dict[str, Any]:
        return {
            'label': self.spec.label,
            'n_electrons': list(self.n_electrons),
            'e_ref': self.e_ref,
            'e_density_method': self.e_density_method,
            'e_kinetic': self.e_kinetic,
            'e_nuclear_attraction': self.e_nuclear_attraction,
            'e_hartree': self.e_hartree,
            'e_nuclear_repulsion': self.e_nuclear_repulsion,
            'e_non_xc': self.e_non_xc,
            'e_xc_target': self.e_xc_target,
            'converged': self.converged,
            'reference_method': self.spec.reference_method,
            'density_method': self.spec.density_method,
            **self.extra,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAY_NAMES}

    def save(self, folder: str | Path) -> None:
        """``results.json`` + ``arrays.npz`` (no pickle) in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / 'arrays.npz', **self.arrays())
        payload = {'spec': self.spec.to_dict(), 'scalars': self.scalars()}
        (folder / 'results.json').write_text(json.dumps(payload, indent=2))

    @classmethod
    def from_parts(cls, spec: dict, scalars: dict, arrays: dict[str, np.ndarray]) -> IntegerResult:
        """Rebuild a result from :meth:`scalars`, the spec dict and :meth:`arrays` (files or AiiDA nodes)."""
        base = ('e_ref', 'e_density_method', 'e_kinetic', 'e_nuclear_attraction', 'e_hartree', 'e_nuclear_repulsion')
        derived = {'label', 'e_non_xc', 'e_xc_target', 'reference_method', 'density_method'}
        return cls(
            spec=IntegerSpec.from_dict(spec),
            n_electrons=tuple(int(n) for n in scalars['n_electrons']),
            converged=bool(scalars['converged']),
            extra={k: v for k, v in scalars.items() if k not in {*base, 'n_electrons', 'converged'} | derived},
            **{k: float(scalars[k]) for k in base},
            **{k: np.asarray(arrays[k]) for k in ARRAY_NAMES},
        )

    @classmethod
    def load(cls, folder: str | Path) -> IntegerResult:
        folder = Path(folder)
        payload = json.loads((folder / 'results.json').read_text())
        with np.load(folder / 'arrays.npz', allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        return cls.from_parts(payload['spec'], payload['scalars'], arrays)


def build_molecule(atom: str, basis: str, charge: int = 0, spin: int = 0) -> gto.Mole:
    """A built PySCF molecule, with PySCF's errors turned into :class:`ReferenceInputError`."""
    try:
        mol = gto.M(atom=atom, basis=basis, charge=charge, spin=spin, unit='Angstrom', verbose=0)
    except (RuntimeError, KeyError, ValueError, AttributeError) as exc:
        raise ReferenceInputError(f'cannot build {atom!r}/{basis} (charge {charge}, 2S {spin}): {exc}') from exc
    if mol.nelectron < 0:
        raise ReferenceInputError(f'charge {charge} leaves a negative number of electrons for {atom!r}')
    from aiida_dm21.runner.scf import basis_ecp

    ecp = basis_ecp(basis, [mol.atom_pure_symbol(i) for i in range(mol.natm)])
    if ecp:
        raise ReferenceInputError(
            f'basis {basis!r} brings effective core potentials for {", ".join(sorted(ecp))}: the densities DM21 '
            'learns from are all-electron ones (PySCF would run every electron in a basis made for the valence)'
        )
    return mol


def frame_molecule(atom: str, basis: str) -> gto.Mole:
    """The nuclei and basis of ``atom`` as a neutral molecule (lowest spin): for grids and integrals only."""
    try:
        nuclear_charge = sum(gto.charge(symbol) for symbol, _ in gto.format_atom(atom, unit='Angstrom'))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ReferenceInputError(f'cannot read the geometry {atom!r}: {exc}') from exc
    return build_molecule(atom, basis, 0, nuclear_charge % 2)


def coulomb_matrix(mol: gto.Mole, dm_total: np.ndarray) -> np.ndarray:
    """J[D] of a total density matrix (zero for a system without electrons)."""
    return scf.hf.get_jk(mol, dm_total, with_k=False)[0] if np.any(dm_total) else np.zeros_like(dm_total)


def non_xc_energy(mol: gto.Mole, dm: np.ndarray, vj: np.ndarray | None = None) -> dict[str, float]:
    """Kinetic, nuclear attraction, Hartree and nuclear repulsion energies of spin density matrices (2, nao, nao).

    ``vj``: J of the total density if the caller already has it.
    """
    dm_total = dm[0] + dm[1]
    if vj is None:
        vj = coulomb_matrix(mol, dm_total)
    return {
        'e_kinetic': float(np.einsum('ij,ji', mol.intor('int1e_kin'), dm_total)),
        'e_nuclear_attraction': float(np.einsum('ij,ji', mol.intor('int1e_nuc'), dm_total)),
        'e_hartree': float(0.5 * np.einsum('ij,ji', vj, dm_total)),
        'e_nuclear_repulsion': float(mol.energy_nuc()),
    }


def _zero_electron_result(spec: IntegerSpec, mol: gto.Mole) -> IntegerResult:
    """A system without electrons (e.g. H+): every electronic quantity is exactly zero."""
    nao = mol.nao
    s = mol.intor('int1e_ovlp')
    e, c = np.linalg.eigh(s)
    mo = c / np.sqrt(e)
    hcore = mol.intor('int1e_kin') + mol.intor('int1e_nuc')
    eps = np.diag(mo.T @ hcore @ mo)
    order = np.argsort(eps)
    mo, eps = mo[:, order], eps[order]
    zeros = np.zeros((2, nao, nao))
    e_nn = float(mol.energy_nuc())
    return IntegerResult(
        spec=spec,
        n_electrons=(0, 0),
        e_ref=e_nn,
        e_density_method=e_nn,
        e_kinetic=0.0,
        e_nuclear_attraction=0.0,
        e_hartree=0.0,
        e_nuclear_repulsion=e_nn,
        converged=True,
        dm=zeros,
        mo_coeff=np.stack([mo, mo]),
        mo_occ=np.zeros((2, nao)),
        mo_energy=np.stack([eps, eps]),
        fock=np.stack([hcore, hcore]),
    )


def _converge(mf, spec: IntegerSpec):
    """Run a mean-field calculation; when it does not converge, continue with the second-order solver.

    ``mf.converged`` of the returned object tells whether either succeeded.
    """
    mf.conv_tol = spec.conv_tol
    mf.max_cycle = spec.max_cycle
    mf.kernel()
    if not mf.converged:
        mf = mf.newton()
        mf.kernel(mf.make_rdm1())
    return mf


def run_integer_system(spec: IntegerSpec) -> IntegerResult:
    """Density, reference energy and energy terms of one integer-electron system.

    Whether every iterative step converged is recorded: ``converged`` (the density), ``hf_converged`` (the
    Hartree-Fock reference of a correlated method on a DFT density or in ``reference_basis``), ``ccsd_converged``
    and ``fci_converged``.  With ``reference_basis`` the reference energy is that basis's (its own UHF, then the
    method); the density, orbitals and energy terms are always ``basis``'s.
    """
    method = spec.reference_method.lower()
    if method not in REFERENCE_METHODS:
        raise ReferenceInputError(f'unknown reference method {spec.reference_method!r}: use one of {REFERENCE_METHODS}')
    if method == 'user' and spec.user_energy is None:
        raise ReferenceInputError('reference_method "user" needs user_energy (Ha)')
    if spec.reference_basis is not None and method == 'user':
        raise ReferenceInputError('reference_basis goes with a computed reference energy, not with "user"')
    mol = build_molecule(spec.atom, spec.basis, spec.charge, spec.spin)
    mol_ref = mol
    if spec.reference_basis is not None and spec.reference_basis != spec.basis:
        mol_ref = build_molecule(spec.atom, spec.reference_basis, spec.charge, spec.spin)
    if mol.nelectron == 0:
        result = _zero_electron_result(spec, mol)
        if method == 'user':
            result.e_ref = float(spec.user_energy)
        return result
    if method == 'fci' and mol.nelectron > FCI_MAX_ELECTRONS:
        raise ReferenceInputError(
            f'FCI is limited to {FCI_MAX_ELECTRONS} electrons here ({mol.nelectron} requested): use ccsd(t)'
        )
    if spec.density_method.lower() == 'hf':
        mf = scf.UHF(mol)
    else:
        mf = dft.UKS(mol)
        mf.xc = spec.density_method
    mf = _converge(mf, spec)
    dm = np.asarray(mf.make_rdm1())
    extra: dict[str, Any] = {}

    def hartree_fock():
        if spec.density_method.lower() == 'hf' and mol_ref is mol:
            return mf
        hf = _converge(scf.UHF(mol_ref), spec)
        extra['hf_converged'] = bool(hf.converged)
        return hf

    if mol_ref is not mol:
        extra['reference_basis'] = spec.reference_basis

    if method == 'hf' or (mol.nelectron == 1 and method in ('fci', 'ccsd(t)', 'ccsd')):
        hf = hartree_fock()
        e_ref = float(hf.e_tot)  # one electron: HF is exact in the basis
    elif method == 'user':
        e_ref = float(spec.user_energy)
    else:
        hf = hartree_fock()
        if method == 'fci':
            solver = fci.FCI(hf)
            e_ref = float(solver.kernel()[0])
            extra['fci_converged'] = bool(getattr(solver, 'converged', True))
        else:
            mycc = cc.UCCSD(hf)
            mycc.max_cycle = spec.cc_max_cycle
            mycc.run()
            e_ref = float(mycc.e_tot)
            extra['e_ccsd'] = float(mycc.e_tot)
            if method == 'ccsd(t)':
                e_t = float(mycc.ccsd_t())
                e_ref += e_t
                extra['e_triples'] = e_t
            extra['ccsd_converged'] = bool(mycc.converged)
        extra['e_hf'] = float(hf.e_tot)
    fock = np.asarray(mf.get_fock(dm=dm))
    return IntegerResult(
        spec=spec,
        n_electrons=tuple(int(n) for n in mol.nelec),
        e_ref=e_ref,
        e_density_method=float(mf.e_tot),
        converged=bool(mf.converged),
        dm=dm,
        mo_coeff=np.asarray(mf.mo_coeff),
        mo_occ=np.asarray(mf.mo_occ),
        mo_energy=np.asarray(mf.mo_energy),
        fock=fock,
        extra=extra,
        **non_xc_energy(mol, dm),
    )
