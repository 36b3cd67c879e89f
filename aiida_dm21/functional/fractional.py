"""Fractional-electron SCF: energy versus electron number and fractional spin, for DM21 and standard functionals.

The exact energy is piecewise linear in the number of electrons, ``E(N+δ) = (1−δ) E(N) + δ E(N+1)``
for 0 ≤ δ ≤ 1 (fractional charge, FC), and an ensemble of spin states has the energy of the pure
state (fractional spin, FS).  Approximate functionals such as B3LYP are convex between integers
(delocalisation error: the curve sags below the straight line) and too high for fractional spins
(static-correlation error).  DM21 was trained with fractional-charge and fractional-spin systems and
is nearly exact for both (Kirkpatrick et al., Science 374, 1385 (2021), doi:10.1126/science.abj6511,
figure 1).  This module measures both for any DM21 checkpoint and for any PySCF/libxc functional.

How a point is computed: an unrestricted KS SCF (:func:`aiida_dm21.functional.scf.UKS` for a DM21
checkpoint, ``pyscf.dft.UKS`` for an XC string, including ``'hf'``) whose ``get_occ`` returns fixed
occupations — ``floor(nσ)`` ones, then the fractional remainder on the next orbital, in orbital-energy
order (aufbau), for each spin σ.  Everything else is PySCF's: ``make_rdm1`` uses these occupations, and
DIIS and level shifts stay valid because the converged density still commutes with the Fock matrix.
Points that do not converge with DIIS are retried from where they stopped with damping and a level
shift; ``converged`` reports the outcome.  Every functional uses the same grids (``grid_level``,
``treutler_ahlrichs_original`` radial grids, ``small_rho_cutoff = 1e-20``), so curves are comparable.

A system with no electrons at all (a bare proton, the N = 0 end of the H atom curve) is not an SCF:
its energy is the nuclear repulsion, ``mol.energy_nuc()`` (0 for one atom), for every functional,
and it is set to that explicitly.

No AiiDA here: this module runs anywhere PySCF and PyTorch do.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pyscf import dft, gto
from pyscf.dft import libxc

from .checkpoint import PUBLISHED_FUNCTIONALS, load_network, weights_dir
from .model import DM21Network
from .scf import DM21UKS, treutler_ahlrichs_original

__all__ = [
    'FractionalCurve',
    'FractionalPoint',
    'Functional',
    'UnknownFunctionalError',
    'aufbau_occupation',
    'fractional_charge_curve',
    'fractional_scf',
    'fractional_spin_curve',
    'make_fractional_scf',
    'plot_fractional_curves',
    'resolve_functional',
    'run_fractional_point',
    'write_table',
]

#: Occupations closer than this to an integer are treated as that integer.
OCC_TOL = 1e-10
#: Guess functional for DM21 points, and for the first point of any curve (as in DeepMind's examples).
GUESS_XC = 'b3lyp5'

ProgressCallback = Callable[['FractionalPoint'], None]


class UnknownFunctionalError(ValueError):
    """The functional is neither a DM21 checkpoint nor an XC functional PySCF/libxc knows."""


# --- functionals ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Functional:
    """A resolved functional: a DM21 network, or an XC string for ``pyscf.dft.UKS``."""

    label: str
    xc: str | None = None
    network: DM21Network | None = field(default=None, repr=False, compare=False)

    @property
    def is_dm21(self) -> bool:
        return self.network is not None


def _looks_like_checkpoint(text: str) -> bool:
    if text.lower() in {name.lower() for name in PUBLISHED_FUNCTIONALS}:
        return True
    if Path(text).exists() or text.endswith('.safetensors') or '/' in text:
        return True
    return (weights_dir() / f'{text}.safetensors').is_file()


def resolve_functional(spec: str | Path | DM21Network | Functional) -> Functional:
    """A :class:`Functional` from a DM21 name/checkpoint/folder/network or a PySCF XC string.

    DM21 names (``DM21``, ``DM21m``, ``DM21mc``, ``DM21mu``; any case) need installed weights, as for
    :func:`~aiida_dm21.functional.scf.UKS`; anything else that is not a path is handed to libxc's parser
    (``'b3lyp5'``, ``'pbe'``, ``'hf'``, ``'pbe0'`` ...).  Raises :class:`UnknownFunctionalError` (or
    :class:`~aiida_dm21.functional.checkpoint.CheckpointError` for a DM21 checkpoint that cannot be read).
    """
    if isinstance(spec, Functional):
        return spec
    if isinstance(spec, DM21Network):
        return Functional(label='DM21 network', network=spec)
    text = str(spec).strip()
    if not text:
        raise UnknownFunctionalError('empty functional name')
    if isinstance(spec, Path) or _looks_like_checkpoint(text):
        canonical = {name.lower(): name for name in PUBLISHED_FUNCTIONALS}.get(text.lower(), text)
        network, meta = load_network(canonical)
        return Functional(label=str(meta.get('name') or Path(text).name), network=network)
    try:
        libxc.parse_xc(text)
    except (KeyError, ValueError) as exc:
        raise UnknownFunctionalError(
            f'unknown functional {text!r}: not a DM21 checkpoint (one of {", ".join(PUBLISHED_FUNCTIONALS)}, '
            f'a .safetensors file or a DeepMind folder) nor an XC functional known to PySCF/libxc ({exc})'
        ) from exc
    return Functional(label=text, xc=text)


# --- occupations and single points ---------------------------------------------------------------------


def aufbau_occupation(n: float, nmo: int) -> np.ndarray:
    """``floor(n)`` ones followed by the remainder ``n − floor(n)``, padded with zeros to ``nmo``."""
    if not math.isfinite(n) or n < -OCC_TOL:
        raise ValueError(f'the number of electrons of a spin channel must be finite and >= 0, got {n}')
    n = max(n, 0.0)
    n_full = math.floor(n + OCC_TOL)
    frac = n - n_full
    if abs(frac) < OCC_TOL:
        frac = 0.0
    needed = n_full + (1 if frac > 0 else 0)
    if needed > nmo:
        raise ValueError(f'{n} electrons in one spin channel need {needed} orbitals, the basis has {nmo}')
    occ = np.zeros(nmo)
    occ[:n_full] = 1.0
    if frac > 0:
        occ[n_full] = frac
    return occ


class _FixedOccupationMixin:
    """``get_occ`` returning fixed (possibly fractional) aufbau occupations per spin channel."""

    _keys: ClassVar[set[str]] = {'fixed_nelec'}
    fixed_nelec: tuple[float, float]

    def get_occ(self, mo_energy=None, mo_coeff=None):
        if mo_energy is None:
            mo_energy = self.mo_energy
        mo_energy = np.asarray(mo_energy)
        mo_occ = np.zeros_like(mo_energy)
        nmo = mo_energy.shape[-1]
        for spin in range(2):
            order = np.argsort(mo_energy[spin].round(9), kind='stable')
            mo_occ[spin, order] = aufbau_occupation(self.fixed_nelec[spin], nmo)
        return mo_occ


_CLASS_CACHE: dict[type, type] = {}


def _with_fixed_occupations(mf, n_alpha: float, n_beta: float):
    cls = type(mf)
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(f'Fractional{cls.__name__}', (_FixedOccupationMixin, cls), {})
    mf.__class__ = _CLASS_CACHE[cls]
    mf.fixed_nelec = (float(n_alpha), float(n_beta))
    return mf


def _integer_host(mol: gto.Mole, n_alpha: float, n_beta: float) -> gto.Mole:
    """A copy of ``mol`` with ``ceil(nα)`` α and ``ceil(nβ)`` β electrons (PySCF needs integers)."""
    na, nb = (math.ceil(n - OCC_TOL) for n in (n_alpha, n_beta))
    host = mol.copy()
    host.charge = int(mol.atom_charges().sum()) - na - nb
    host.spin = na - nb
    host.verbose = mol.verbose
    host.build(dump_input=False, parse_arg=False)
    return host


def make_fractional_scf(
    mol: gto.Mole,
    functional: str | Path | DM21Network | Functional,
    n_alpha: float,
    n_beta: float,
    *,
    grid_level: int = 3,
    conv_tol: float | None = None,
    max_cycle: int = 100,
):
    """A PySCF UKS object with fixed occupations ``(n_alpha, n_beta)`` (each may be fractional).

    ``mol`` gives the nuclei and basis; its charge and spin are replaced by ``ceil`` of the given
    electron counts.  ``conv_tol`` defaults to 1e-7 Ha for DM21 (float32 network) and 1e-9 Ha otherwise.
    """
    func = resolve_functional(functional)
    if n_alpha + n_beta <= OCC_TOL:
        raise ValueError('a system without electrons has no SCF: its energy is mol.energy_nuc()')
    host = _integer_host(mol, n_alpha, n_beta)
    if func.is_dm21:
        mf = DM21UKS(host, func.network)
        mf.conv_tol = 1e-7 if conv_tol is None else conv_tol
        mf.conv_tol_grad = 1e-4
    else:
        mf = dft.UKS(host)
        mf.xc = func.xc
        mf.small_rho_cutoff = 1e-20
        mf.grids.radi_method = treutler_ahlrichs_original
        mf.conv_tol = 1e-9 if conv_tol is None else conv_tol
    mf.grids.level = grid_level
    mf.max_cycle = max_cycle
    mf.verbose = mol.verbose
    return _with_fixed_occupations(mf, n_alpha, n_beta)


@dataclass
class FractionalPoint:
    """One fractional-occupation SCF."""

    n_alpha: float
    n_beta: float
    energy: float
    converged: bool
    cycles: int
    dm: np.ndarray | None = field(default=None, repr=False)


def fractional_scf(mf, dm0: np.ndarray | None = None) -> FractionalPoint:
    """Run ``mf`` (from :func:`make_fractional_scf`); retry once with damping and a level shift if DIIS fails."""
    cycles = 0

    def count(envs):
        nonlocal cycles
        cycles += 1

    mf.callback = count
    energy = mf.kernel(dm0=dm0)
    if not mf.converged:
        dm_last = mf.make_rdm1()
        mf.diis = None
        mf.damp = 0.5
        mf.diis_start_cycle = 10**6
        mf.level_shift = 0.25
        mf.max_cycle = 2 * mf.max_cycle
        energy = mf.kernel(dm0=dm_last)
    n_alpha, n_beta = mf.fixed_nelec
    return FractionalPoint(
        n_alpha=n_alpha,
        n_beta=n_beta,
        energy=float(energy),
        converged=bool(mf.converged),
        cycles=cycles,
        dm=np.asarray(mf.make_rdm1()),
    )


def run_fractional_point(
    mol: gto.Mole,
    functional: str | Path | DM21Network | Functional,
    n_alpha: float,
    n_beta: float,
    *,
    dm0: np.ndarray | None = None,
    grid_level: int = 3,
    conv_tol: float | None = None,
    max_cycle: int = 100,
) -> FractionalPoint:
    """The energy of ``mol``'s nuclei with ``n_alpha`` α and ``n_beta`` β electrons (fractions allowed).

    Without ``dm0`` the SCF starts from a B3LYP (VWN5) density with the same occupations and grid
    (itself started from PySCF's minao guess); a DM21 functional never uses its own integer-occupation
    B3LYP guess here.  With no electrons the energy is ``mol.energy_nuc()`` and no SCF is run.
    """
    func = resolve_functional(functional)
    if n_alpha < -OCC_TOL or n_beta < -OCC_TOL:
        raise ValueError(f'electron counts must be >= 0, got alpha={n_alpha}, beta={n_beta}')
    if n_alpha + n_beta <= OCC_TOL:
        return FractionalPoint(n_alpha=0.0, n_beta=0.0, energy=float(mol.energy_nuc()), converged=True, cycles=0)
    options = {'grid_level': grid_level, 'conv_tol': conv_tol, 'max_cycle': max_cycle}
    if dm0 is None and not (func.xc and func.xc.lower() == GUESS_XC):
        guess = make_fractional_scf(mol, GUESS_XC, n_alpha, n_beta, **options)
        dm0 = fractional_scf(guess).dm
    mf = make_fractional_scf(mol, func, n_alpha, n_beta, **options)
    return fractional_scf(mf, dm0)


# --- curves --------------------------------------------------------------------------------------------


@dataclass
class FractionalCurve:
    """Energies along a fractional-charge (``kind='charge'``) or fractional-spin (``kind='spin'``) path.

    ``delta`` is the fraction: electrons added to the N-electron system (charge) or moved from α to β
    (spin).  ``reference`` is the exact behaviour built from the curve's own integer end points: the
    straight line between E(N) and E(N+1) (charge), or E of the pure spin state (spin).
    """

    kind: Literal['charge', 'spin']
    functional: str
    system: str
    basis: str
    grid_level: int
    delta: np.ndarray
    n_alpha: np.ndarray
    n_beta: np.ndarray
    energy: np.ndarray
    reference: np.ndarray
    converged: np.ndarray
    cycles: np.ndarray

    @property
    def n_electrons(self) -> np.ndarray:
        return self.n_alpha + self.n_beta

    @property
    def deviation(self) -> np.ndarray:
        """E − reference (Ha); negative = below the straight line (delocalisation error)."""
        return self.energy - self.reference

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged))

    def deviation_at(self, delta: float = 0.5) -> float:
        """E − reference at fraction ``delta`` (Ha); ``delta`` must be one of the computed points."""
        hit = np.flatnonzero(np.abs(self.delta - delta) < 1e-9)
        if hit.size == 0:
            raise ValueError(f'delta = {delta} was not computed; points: {", ".join(f"{d:g}" for d in self.delta)}')
        return float(self.deviation[hit[0]])

    def records(self) -> list[dict[str, Any]]:
        """One dict per point (energies in Ha, deviation also in mHa), for tables."""
        return [
            {
                'functional': self.functional,
                'kind': self.kind,
                'system': self.system,
                'basis': self.basis,
                'grid_level': self.grid_level,
                'delta': float(self.delta[i]),
                'n_electrons': float(self.n_electrons[i]),
                'n_alpha': float(self.n_alpha[i]),
                'n_beta': float(self.n_beta[i]),
                'energy': float(self.energy[i]),
                'reference': float(self.reference[i]),
                'deviation': float(self.deviation[i]),
                'deviation_mha': float(self.deviation[i] * 1000.0),
                'converged': bool(self.converged[i]),
                'cycles': int(self.cycles[i]),
            }
            for i in range(len(self.delta))
        ]


def _fractions(values: Sequence[float] | np.ndarray | int, upper: float, name: str) -> np.ndarray:
    """Sorted unique fractions in [0, upper], always including both ends."""
    if isinstance(values, (int, np.integer)) and not isinstance(values, bool):
        if values < 2:
            raise ValueError(f'need at least 2 points (the two ends of the curve), got {values}')
        values = np.linspace(0.0, upper, int(values))
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size == 0:
        raise ValueError(f'no {name} values given')
    if not np.all(np.isfinite(arr)) or arr.min() < -1e-12 or arr.max() > upper + 1e-12:
        raise ValueError(f'{name} values must lie in [0, {upper:g}], got {arr.min():g} .. {arr.max():g}')
    arr = np.clip(np.concatenate([[0.0, upper], arr]), 0.0, upper)
    return np.unique(np.round(arr, 12))


def _describe(mol: gto.Mole, spin_next: int | None = None) -> str:
    """``H, charge 1 → 0 (2S 0 → 1)`` for a charge curve (``spin_next`` given), ``H, charge 0, 2S = 1`` else."""
    counts: dict[str, int] = {}
    for i in range(mol.natm):
        symbol = mol.atom_pure_symbol(i)
        counts[symbol] = counts.get(symbol, 0) + 1
    formula = ''.join(f'{s}{n if n > 1 else ""}' for s, n in counts.items())
    if spin_next is None:
        return f'{formula}, charge {mol.charge}, 2S = {mol.spin}'
    return f'{formula}, charge {mol.charge} → {mol.charge - 1} (2S {mol.spin} → {spin_next})'


def _run_path(
    mol: gto.Mole,
    func: Functional,
    occupations: list[tuple[float, float]],
    order: np.ndarray,
    *,
    grid_level: int,
    conv_tol: float | None,
    max_cycle: int,
    progress: ProgressCallback | None,
) -> list[FractionalPoint]:
    """SCF at each occupation, in ``order``.

    A standard functional starts each point from the previous point's density.  A DM21 functional starts
    each point from a B3LYP density with the same occupations (that B3LYP chain itself starts from the
    previous B3LYP point): jumping straight from the previous DM21 density (e.g. from the pure spin state
    to x = 0.5) costs DM21 three times as many cycles, and B3LYP cycles are cheap next to DM21's.
    """
    points: list[FractionalPoint | None] = [None] * len(occupations)
    options = {'grid_level': grid_level, 'conv_tol': conv_tol, 'max_cycle': max_cycle}
    dm_prev = guess_prev = None
    for i in order:
        n_alpha, n_beta = occupations[i]
        dm0 = dm_prev
        if func.is_dm21 and n_alpha + n_beta > OCC_TOL:
            guess = run_fractional_point(mol, GUESS_XC, n_alpha, n_beta, dm0=guess_prev, **options)
            dm0 = guess_prev = guess.dm
        point = run_fractional_point(mol, func, n_alpha, n_beta, dm0=dm0, **options)
        if point.dm is not None:
            dm_prev = point.dm
        points[i] = point
        if progress is not None:
            progress(point)
    return points  # type: ignore[return-value]


def _curve(kind, func, mol, deltas, points, reference, grid_level, spin_next=None) -> FractionalCurve:
    return FractionalCurve(
        kind=kind,
        functional=func.label,
        system=_describe(mol, spin_next),
        basis=str(mol.basis),
        grid_level=grid_level,
        delta=deltas,
        n_alpha=np.array([p.n_alpha for p in points]),
        n_beta=np.array([p.n_beta for p in points]),
        energy=np.array([p.energy for p in points]),
        reference=reference,
        converged=np.array([p.converged for p in points]),
        cycles=np.array([p.cycles for p in points]),
    )


def fractional_charge_curve(
    mol_N: gto.Mole,
    functional: str | Path | DM21Network | Functional,
    deltas: Sequence[float] | np.ndarray | int = 11,
    *,
    spin_next: int | None = None,
    grid_level: int = 3,
    conv_tol: float | None = None,
    max_cycle: int = 100,
    progress: ProgressCallback | None = None,
) -> FractionalCurve:
    """E(N+δ) from the N-electron system ``mol_N`` (its charge and spin) to the N+1-electron one.

    ``deltas``: fractions in [0, 1] or a number of evenly spaced points (default 11); 0 and 1 are always
    included, since they define the straight line.  ``spin_next`` is 2S of the N+1 system; it decides
    whether the fraction goes to α (``spin_next = spin + 1``) or β (``spin − 1``).  The default pairs the
    added electron: ``spin − 1`` for an open-shell N system, 1 for a closed-shell one (right for H⁺ → H,
    H → H⁻, H₂O⁺ → H₂O, O → O⁻; pass ``spin_next`` for Hund's-rule cases such as C → C⁻).  Points are
    computed from δ = 1 down, each started from the previous density (the first from B3LYP).  An
    N = 0 end (e.g. H⁺ for the H atom) has the energy ``mol_N.energy_nuc()`` — 0 for a bare proton.
    """
    func = resolve_functional(functional)
    delta = _fractions(deltas, 1.0, 'delta')
    na, nb = mol_N.nelec
    if spin_next is None:
        spin_next = mol_N.spin - 1 if mol_N.spin > 0 else 1
    if abs(spin_next - mol_N.spin) != 1:
        raise ValueError(f'spin_next (2S of the N+1 system) must differ from spin {mol_N.spin} by 1, got {spin_next}')
    add_alpha = spin_next > mol_N.spin
    if not add_alpha and mol_N.spin == 0:
        raise ValueError('spin_next = -1 is impossible: a closed-shell N system gains an alpha electron')
    occupations = [(na + d, nb) if add_alpha else (na, nb + d) for d in delta]
    points = _run_path(
        mol_N,
        func,
        occupations,
        np.arange(len(delta))[::-1],
        grid_level=grid_level,
        conv_tol=conv_tol,
        max_cycle=max_cycle,
        progress=progress,
    )
    e0, e1 = points[0].energy, points[-1].energy
    return _curve('charge', func, mol_N, delta, points, (1.0 - delta) * e0 + delta * e1, grid_level, spin_next)


def fractional_spin_curve(
    mol: gto.Mole,
    functional: str | Path | DM21Network | Functional,
    fractions: Sequence[float] | np.ndarray | int = 6,
    *,
    grid_level: int = 3,
    conv_tol: float | None = None,
    max_cycle: int = 100,
    progress: ProgressCallback | None = None,
) -> FractionalCurve:
    """E with a fraction x of one α electron moved to β: nα − x α and nβ + x β electrons, x in [0, 0.5].

    For the H atom this is the ensemble of half a spin-up and half a spin-down electron at x = 0.5,
    whose exact energy is E(H).  ``mol`` must be open-shell (``mol.spin >= 1``); ``fractions`` are
    values of x or a number of evenly spaced points in [0, 0.5] (0 and 0.5 always included).  The
    reference is the pure state's energy E(x = 0).
    """
    func = resolve_functional(functional)
    if mol.spin < 1:
        raise ValueError('fractional spin needs an open-shell molecule (spin >= 1): nothing to move from alpha to beta')
    x = _fractions(fractions, 0.5, 'fraction')
    na, nb = mol.nelec
    occupations = [(na - xi, nb + xi) for xi in x]
    points = _run_path(
        mol,
        func,
        occupations,
        np.arange(len(x)),
        grid_level=grid_level,
        conv_tol=conv_tol,
        max_cycle=max_cycle,
        progress=progress,
    )
    return _curve('spin', func, mol, x, points, np.full(len(x), points[0].energy), grid_level)


# --- output --------------------------------------------------------------------------------------------


def write_table(curves: Sequence[FractionalCurve], path: str | Path) -> Path:
    """Write every point of ``curves`` as ``.csv`` or ``.json`` (by the file suffix)."""
    path = Path(path)
    rows = [row for curve in curves for row in curve.records()]
    suffix = path.suffix.lower()
    if suffix not in {'.csv', '.json'}:
        raise ValueError(f'table format is chosen by suffix: .csv or .json, got {path.name!r}')
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == '.json':
        summary = [
            {
                'functional': c.functional,
                'kind': c.kind,
                'deviation_at_0.5_mha': c.deviation_at(0.5) * 1000.0 if np.any(np.isclose(c.delta, 0.5)) else None,
                'max_abs_deviation_mha': float(np.max(np.abs(c.deviation)) * 1000.0),
                'all_converged': c.all_converged,
            }
            for c in curves
        ]
        path.write_text(json.dumps({'summary': summary, 'points': rows}, indent=2) + '\n')
    else:
        with path.open('w', newline='') as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ['functional'])
            writer.writeheader()
            writer.writerows(rows)
    return path


def plot_fractional_curves(
    curves: Sequence[FractionalCurve],
    path: str | Path,
    *,
    title: str | None = None,
    raw_panel: bool = True,
    dpi: int = 150,
) -> Path:
    """PNG of E − reference (mHa) against N (charge) or x (spin) for several functionals, plus raw E.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).  Points that did not
    converge are drawn as open red circles.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError('no curves to plot')
    kinds = {c.kind for c in curves}
    if len(kinds) != 1:
        raise ValueError(f'cannot mix fractional charge and fractional spin curves in one plot: {sorted(kinds)}')
    kind = kinds.pop()
    fig = Figure(figsize=(11.0 if raw_panel else 6.0, 4.4), layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if raw_panel else 1, squeeze=False)[0]
    if kind == 'charge':
        xlabel, dev_label, ref_label = 'number of electrons N', 'E − linear interpolation (mHa)', 'exact: straight line'
    else:
        xlabel, dev_label, ref_label = 'x (electrons moved from α to β)', 'E − E(pure spin state) (mHa)', 'exact'
    ax = axes[0]
    ax.axhline(0.0, color='black', lw=1.0, ls='--', label=ref_label)
    for i, curve in enumerate(curves):
        color = f'C{i}'
        xs = curve.n_electrons if kind == 'charge' else curve.delta
        ax.plot(xs, curve.deviation * 1000.0, 'o-', color=color, ms=4, label=curve.functional)
        bad = ~curve.converged
        if np.any(bad):
            ax.plot(xs[bad], curve.deviation[bad] * 1000.0, 'o', mfc='none', mec='red', ms=9)
        if raw_panel:
            axes[1].plot(xs, curve.energy, 'o-', color=color, ms=4, label=curve.functional)
            axes[1].plot(xs, curve.reference, '--', color=color, lw=1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(dev_label)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    if raw_panel:
        axes[1].set_xlabel(xlabel)
        axes[1].set_ylabel('E (Ha)')
        axes[1].set_title('total energy (dashed: exact behaviour)', fontsize=10)
        axes[1].grid(alpha=0.3)
        axes[1].legend(frameon=False)
    first = curves[0]
    fig.suptitle(title or f'fractional {kind}: {first.system}; {first.basis}, grid level {first.grid_level}')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format='png')
    return path
