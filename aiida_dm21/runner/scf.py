"""Compute-node runner of one DM21 SCF calculation: ``python -m aiida_dm21.runner.scf input.json``.

Pure PySCF + PyTorch (it never imports AiiDA), so the compute node needs only the numerical core.
It runs in the working folder written by the ``dm21.scf`` CalcJob and reads ``input.json``:

=====================  =====================================================================
key                    meaning
=====================  =====================================================================
``symbols``            element symbols, one per atom
``positions``          Cartesian positions (Angstrom), one triple per atom
``basis``              PySCF basis name (all-electron)
``charge``             total charge
``multiplicity``       2S + 1
``scf_type``           ``auto`` (RKS if closed shell, else UKS), ``RKS``, ``UKS`` or ``ROKS``
``grid_level``         PySCF grid level 0-9
``conv_tol``           energy convergence (Ha)
``conv_tol_grad``      orbital-gradient convergence
``max_cycle``          maximum number of SCF cycles
``init_guess``         ``b3lyp`` (converged B3LYP density), ``b3lyp_broken_symmetry`` (UKS only: B3LYP followed
                       down its spin-symmetry-breaking instabilities) or a PySCF guess
``open_shell_direction`` optional, open-shell atoms: ``"lowest"`` or ``[x, y, z]`` (see functional.atoms)
``level_shift``        level shift (Ha)
``damp``               Fock damping factor for the first 3 cycles (DIIS starts at cycle 4); absent: none, or
                       :data:`SMEARING_DAMP` with ``smearing``
``newton``             second-order (Newton) solver with the exact DM21 XC kernel (autograd, functional/response.py)
``smearing``           optional: Fermi-Dirac smearing width (Ha), fractional occupations; 0 or absent: integer
``checkpoint``         checkpoint file name (``checkpoint.safetensors``)
``restart_density``    optional ``.npy`` density matrix to start from
``walltime_seconds``   optional: stop cleanly (saving the density) before this much time
``max_memory_mb``      optional: PySCF ``max_memory`` (bounds the integral cache)
``device``             optional: ``cpu`` (default), ``cuda`` or ``cuda:N``; refused here if absent
``screening``          optional: local-HF screening threshold (Ha), 0 for dense
``dispersion``         optional: ``none`` (default) or a D3/D4 name of ``functional.dispersion.VERSIONS``
=====================  =====================================================================

Before anything else it sets the threads of PyTorch, numba and PySCF from what the scheduler granted
(:func:`~aiida_dm21.runner.common.apply_thread_count`: ``SLURM_CPUS_PER_TASK``, ``PBS_NUM_PPN``, ``NCPUS``,
``OMP_NUM_THREADS``); ``results.json["threads"]`` records the count and where it came from.  A count that is
not a positive integer (``SLURM_CPUS_PER_TASK=abc``) is refused as ``unsupported_input``.

It writes ``results.json`` (always, also after errors) and ``density_matrix.npy`` (whenever an SCF
cycle ran, converged or not), and logs PySCF's output to stdout.  ``results.json["error"]`` is
``null`` or ``{"category", "message", "type"}`` with category one of :data:`ERROR_CATEGORIES`.

A converged SCF is also checked for the aufbau principle (``results.json["aufbau"]``; integer occupations only):
a virtual orbital more than :data:`AUFBAU_TOLERANCE` below an occupied one of the same spin is a stationary state
that is not the ground state (the Newton solver can land there, e.g. for stretched H2, docs/core.md).

Exit status: 0 converged, 3 not converged, 4 stopped for walltime, 2 unsupported input or unreadable
checkpoint, 1 any other failure.
"""

from __future__ import annotations

import json
import math
import platform
import signal
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# the molecule checks live in the core (the SCF objects run them too); the plugin layer imports them from here
from aiida_dm21.functional.molecule import MIN_DISTANCE_ANGSTROM, basis_ecp, check_geometry, check_occupations
from aiida_dm21.runner.common import (
    InputFileError,
    ThreadCountError,
    apply_thread_count,
    read_json_object,
    thread_summary,
)

__all__ = [
    'DENSITY_FILE',
    'ERROR_CATEGORIES',
    'MIN_DISTANCE_ANGSTROM',
    'RESULTS_FILE',
    'RunnerError',
    'basis_ecp',
    'check_geometry',
    'check_occupations',
    'main',
    'run',
]

RESULTS_FILE = 'results.json'
DENSITY_FILE = 'density_matrix.npy'
RESULTS_FORMAT_VERSION = 1

#: Error categories written to ``results.json["error"]["category"]``.
ERROR_CATEGORIES: dict[str, str] = {
    'unsupported_input': 'the input cannot be treated (bad input.json, basis, spin state, restart density, a '
    'thread count of the job environment that is not a positive integer...)',
    'checkpoint_unreadable': 'the checkpoint file is missing, corrupt or not a DM21 checkpoint',
    'walltime': 'the run stopped before the walltime ran out (signal or deadline); the last density is saved',
    'scf_error': 'the SCF raised an exception',
    'relax_failed': 'the geometry optimiser stopped with an error (e.g. an SCF that did not converge at a geometry)',
    'internal_error': 'an unexpected error in the runner',
}

EXIT_CONVERGED = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_CONVERGED = 3
EXIT_WALLTIME = 4

#: Ha: a virtual orbital this far below an occupied one (same spin, integer occupations) breaks the aufbau principle.
AUFBAU_TOLERANCE = 1e-3
#: An orbital with more than this occupation (per spin orbital, in [0, 1]) counts as occupied for HOMO and LUMO.
OCCUPIED = 0.5

SCF_TYPES = ('auto', 'RKS', 'UKS', 'ROKS')
INIT_GUESSES = ('b3lyp', 'b3lyp_broken_symmetry', 'minao', 'atom', 'huckel', '1e')


def check_init_guess(init_guess: str | None, scf_type: str, multiplicity: int) -> str | None:
    """Why ``init_guess`` cannot start this SCF (``None`` if it can): ``b3lyp_broken_symmetry`` needs UKS."""
    if init_guess != 'b3lyp_broken_symmetry':
        return None
    if scf_type == 'UKS' or (scf_type == 'auto' and multiplicity != 1):
        return None
    runs = 'RKS (scf_type auto, multiplicity 1)' if scf_type == 'auto' else scf_type
    return (
        f'init_guess b3lyp_broken_symmetry breaks the spin symmetry of an unrestricted SCF, but this one runs {runs}, '
        'with one set of spatial orbitals for both spins: set scf_type UKS'
    )


def check_combinations(data: Mapping[str, Any]) -> str | None:
    """Why parameters that are each valid cannot go together (``None`` if they can): ``smearing`` with ``newton``,
    and :func:`check_init_guess`.  Shared by the runner and the ``dm21.scf`` CalcJob's validation."""
    if data.get('newton') and data.get('smearing'):
        return '`smearing` and `newton` cannot be combined: the second-order solver needs integer occupations'
    return check_init_guess(data.get('init_guess'), data.get('scf_type') or 'auto', data.get('multiplicity') or 1)


AU2EV = 27.211386245988  # CODATA 2018, as PySCF's nist.HARTREE2EV


class RunnerError(Exception):
    """A failure with a category for ``results.json``."""

    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category
        self.message = message


#: Termination signals raise :class:`WalltimeExceeded` only while this is true (not while results are written).
_signals_interrupt = True


class WalltimeExceeded(Exception):  # noqa: N818 (not an error of the calculation)
    """Raised in the SCF loop when the deadline is near or a termination signal arrived."""


# --- input ------------------------------------------------------------------------------------------------


def read_input(path: Path) -> dict[str, Any]:
    """``input.json``, checked for the keys and types the runner needs."""
    try:
        data = read_json_object(path)
    except InputFileError as exc:
        raise RunnerError('unsupported_input', str(exc)) from exc
    required = ('symbols', 'positions', 'basis')
    missing = [key for key in required if key not in data]
    if missing:
        raise RunnerError('unsupported_input', f'input file {path} lacks {", ".join(missing)}')
    symbols, positions = data['symbols'], data['positions']
    if not isinstance(symbols, list) or not symbols or not all(isinstance(s, str) for s in symbols):
        raise RunnerError('unsupported_input', '`symbols` must be a non-empty list of element symbols')
    try:
        coords = np.asarray(positions, dtype=float)
    except (TypeError, ValueError) as exc:
        raise RunnerError('unsupported_input', f'`positions` is not a list of 3-vectors: {exc}') from exc
    if coords.shape != (len(symbols), 3) or not np.all(np.isfinite(coords)):
        raise RunnerError('unsupported_input', f'`positions` must be {len(symbols)} finite 3-vectors (Angstrom)')
    data.setdefault('charge', 0)
    data.setdefault('multiplicity', 1)
    data.setdefault('scf_type', 'auto')
    data.setdefault('checkpoint', 'checkpoint.safetensors')
    if data['scf_type'] not in SCF_TYPES:
        raise RunnerError('unsupported_input', f'scf_type {data["scf_type"]!r} is not one of {", ".join(SCF_TYPES)}')
    guess = data.get('init_guess')
    if guess is not None and guess not in INIT_GUESSES:
        raise RunnerError('unsupported_input', f'init_guess {guess!r} is not one of {", ".join(INIT_GUESSES)}')
    for key, (kind, low, high, strict) in NUMERIC_INPUTS.items():
        problem = _numeric_problem(data.get(key), kind, low, high, strict)
        if problem:
            raise RunnerError('unsupported_input', f'`{key}` {problem}, got {data[key]!r}')
    problem = check_combinations(data)
    if problem:
        raise RunnerError('unsupported_input', problem)
    relax = data.get('relax')
    if relax is not None and data.get('smearing'):
        raise RunnerError('unsupported_input', '`smearing` with `relax`: the analytic forces need integer occupations')
    if relax is not None:
        from aiida_dm21.runner.relax import RELAX_DEFAULTS

        if not isinstance(relax, dict) or set(relax) - set(RELAX_DEFAULTS):
            raise RunnerError('unsupported_input', f'`relax` must be a mapping of {", ".join(RELAX_DEFAULTS)}')
        for key, value in relax.items():
            kind = int if key == 'max_steps' else float
            problem = _numeric_problem(value, kind, 0.0 if kind is float else 1, None, kind is float)
            if problem:
                raise RunnerError('unsupported_input', f'`relax.{key}` {problem}, got {value!r}')
    return data


#: The Fock damping of the first 3 cycles of a smeared SCF when ``damp`` is not given.  Stretched H2 (6-31G, RKS,
#: σ = 0.02 Ha, B3LYP guess): undamped DIIS took 26-47 cycles at 2.8-3.5 Å (level 2), erratically (the first
#: cycles swap σg² and σu², which poisons the DIIS history; once in CI not converged in 100); damped by 0.5,
#: 8-22 cycles at every distance of 2.6-4.0 Å on levels 2 and 3 with 1 and 2 threads (0.3: not converged at three
#: of six; 0.7: 10-16; docs/core.md).
SMEARING_DAMP = 0.5


#: Numeric keys of ``input.json``: (type, lowest, highest, lowest excluded); ``None`` means unbounded.
NUMERIC_INPUTS: dict[str, tuple[type, float | None, float | None, bool]] = {
    'grid_level': (int, 0, 9, False),
    'max_cycle': (int, 1, None, False),
    'conv_tol': (float, 0.0, None, True),
    'conv_tol_grad': (float, 0.0, None, True),
    'level_shift': (float, 0.0, None, False),
    'damp': (float, 0.0, 1.0, False),
    'walltime_seconds': (float, None, None, False),
    'max_memory_mb': (float, 0.0, None, True),
    'smearing': (float, 0.0, None, False),
}


def _numeric_problem(value: Any, kind: type, low: float | None, high: float | None, strict: bool) -> str | None:
    """Why ``value`` is not a number of ``kind`` in the range, or ``None`` (also for a missing value)."""
    if value is None:
        return None
    accepted = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, accepted):
        return f'must be {"an integer" if kind is int else "a number"}'
    if not math.isfinite(value):
        return 'must be finite'
    if low is not None and (value < low or (strict and value == low)):
        return f'must be {">" if strict else ">="} {low}'
    if high is not None and value > high:
        return f'must be <= {high}'
    return None


def build_molecule(data: dict[str, Any]):
    from pyscf import gto

    charge, multiplicity = data['charge'], data['multiplicity']
    if not isinstance(charge, int) or not isinstance(multiplicity, int) or multiplicity < 1:
        raise RunnerError('unsupported_input', 'charge must be an integer and multiplicity an integer >= 1')
    atoms = [
        (symbol, tuple(float(x) for x in position))
        for symbol, position in zip(data['symbols'], data['positions'], strict=True)
    ]
    problem = check_geometry(data['symbols'], data['positions'])
    if problem:
        raise RunnerError('unsupported_input', problem)
    mol = gto.Mole()
    mol.atom = atoms
    mol.unit = 'Angstrom'
    mol.basis = data['basis']
    mol.ecp = basis_ecp(data['basis'], data['symbols'])  # so that an ECP basis is seen (and refused), not ignored
    mol.charge = charge
    mol.spin = multiplicity - 1
    mol.verbose = int(data.get('verbose', 4))
    mol.stdout = sys.stdout
    if data.get('max_memory_mb'):
        mol.max_memory = float(data['max_memory_mb'])
    try:
        mol.build(dump_input=False, parse_arg=False)
    except (RuntimeError, KeyError, ValueError, TypeError, OSError, AttributeError) as exc:
        raise RunnerError('unsupported_input', f'PySCF cannot build the molecule: {type(exc).__name__}: {exc}') from exc
    if mol.has_ecp():
        elements = ', '.join(sorted(mol._ecp))
        raise RunnerError(
            'unsupported_input',
            f'basis {data["basis"]!r} brings effective core potentials for {elements}: DM21 needs an all-electron '
            'basis set (e.g. cc-pVDZ, or def2 up to Kr)',
        )
    problem = check_occupations(mol.nelec, mol.nao_nr(), str(data['basis']))
    if problem:
        raise RunnerError('unsupported_input', problem)
    return mol


def make_scf(mol, data: dict[str, Any], checkpoint: Path):
    from aiida_dm21.functional import atoms, scf
    from aiida_dm21.functional.checkpoint import CheckpointError, load_network
    from aiida_dm21.functional.numint import DeviceUnavailableError

    if not checkpoint.is_file():
        raise RunnerError('checkpoint_unreadable', f'checkpoint file {checkpoint} does not exist')
    try:
        network, metadata = load_network(checkpoint)
    except CheckpointError as exc:
        raise RunnerError('checkpoint_unreadable', str(exc)) from exc
    scf_type = data['scf_type']
    if scf_type == 'auto':
        scf_type = 'RKS' if mol.spin == 0 else 'UKS'
    options = {key: data[key] for key in ('device', 'screening') if data.get(key) is not None}
    if data.get('dispersion') not in (None, 'none'):
        options['disp'] = data['dispersion']
    try:
        mf = getattr(scf, scf_type)(mol, network, **options)
    except ValueError as exc:  # includes UnsupportedSystemError (periodic, ECP, no electrons) and RKS + open shell
        raise RunnerError('unsupported_input', str(exc)) from exc
    except DeviceUnavailableError as exc:  # a GPU asked for on a node without one: never a silent CPU run
        raise RunnerError('unsupported_input', str(exc)) from exc
    mf.functional = metadata.get('name', mf.functional)
    mf.checkpoint_metadata = metadata
    mf.verbose = mol.verbose
    mf.stdout = sys.stdout
    if data.get('grid_level') is not None:
        mf.grids.level = int(data['grid_level'])
    for key in ('conv_tol', 'conv_tol_grad'):
        if data.get(key) is not None:
            setattr(mf, key, float(data[key]))
    if data.get('max_cycle') is not None:
        mf.max_cycle = int(data['max_cycle'])
    if data.get('init_guess') is not None:
        mf.init_guess = data['init_guess']
    if data.get('open_shell_direction') is not None:
        try:
            mf.open_shell_direction = atoms.parse_direction(data['open_shell_direction'])
        except ValueError as exc:
            raise RunnerError('unsupported_input', f'open_shell_direction {exc}') from exc
    if data.get('level_shift'):
        mf.level_shift = float(data['level_shift'])
    damp = data.get('damp')
    if damp is None and data.get('smearing'):
        damp = SMEARING_DAMP
    if damp:
        # PySCF damps the Fock matrix only in the cycles before DIIS starts (by default cycle 1, i.e. never):
        # with damping requested, DIIS starts at cycle 4 so the damping takes effect first.
        mf.damp = float(damp)
        mf.diis_start_cycle = max(mf.diis_start_cycle, 4)
    if data.get('max_memory_mb'):
        mf.max_memory = float(data['max_memory_mb'])
    if data.get('smearing'):  # never with newton: read_input refused that (check_combinations)
        from pyscf.scf import addons

        # fractional occupations f = 1 / (exp((e - mu) / sigma) + 1), mu fixed by the electron count (per spin in UKS)
        mf = addons.smearing_(mf, sigma=float(data['smearing']), method='fermi')
    if data.get('newton'):
        mf = mf.newton()  # exact orbital Hessian: J + the DM21 XC kernel by autograd (functional/response.py)
    return mf, scf_type


def read_restart_density(path: Path, mol, scf_type: str) -> np.ndarray:
    """The restart density matrix, in the shape the SCF type wants, or a ``RunnerError``."""
    try:
        dm = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RunnerError('unsupported_input', f'restart density {path} is not a readable .npy array: {exc}') from exc
    nao = mol.nao_nr()
    if dm.ndim == 2 and dm.shape == (nao, nao):
        spin_pair = np.stack([dm * 0.5, dm * 0.5])
    elif dm.ndim == 3 and dm.shape == (2, nao, nao):
        spin_pair = dm
    else:
        raise RunnerError(
            'unsupported_input',
            f'restart density has shape {dm.shape}; this molecule and basis need ({nao}, {nao}) or (2, {nao}, {nao})',
        )
    if not np.all(np.isfinite(spin_pair)):
        raise RunnerError('unsupported_input', 'restart density contains NaN or infinite values')
    return spin_pair[0] + spin_pair[1] if scf_type == 'RKS' else spin_pair


# --- results ----------------------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _jsonable(value: Any) -> Any:
    """Plain JSON types, with NaN/inf turned into ``null`` (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _finite(value)
    return value


def orbital_channels(mf, scf_type: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(energies, occupations in [0, 1]) per spin channel: one for RKS, two for UKS/ROKS."""
    energy, occ = np.asarray(mf.mo_energy), np.asarray(mf.mo_occ)
    if scf_type == 'RKS':
        return [(energy, occ / 2.0)]
    if scf_type == 'UKS':
        return [(energy[0], occ[0]), (energy[1], occ[1])]
    mo_ea = getattr(mf.mo_energy, 'mo_ea', energy)
    mo_eb = getattr(mf.mo_energy, 'mo_eb', energy)
    return [(np.asarray(mo_ea), (occ > 0).astype(float)), (np.asarray(mo_eb), (occ > 1).astype(float))]


def frontier(channels: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """HOMO and LUMO over the spin channels: occupied means more than :data:`OCCUPIED` (with smearing, the orbitals
    either side of the Fermi level)."""
    homos = [float(e[o > OCCUPIED].max()) if np.any(o > OCCUPIED) else None for e, o in channels]
    lumos = [float(e[o <= OCCUPIED].min()) if np.any(o <= OCCUPIED) else None for e, o in channels]
    homo = max((h for h in homos if h is not None), default=None)
    lumo = min((x for x in lumos if x is not None), default=None)
    return {
        'homo': homo,
        'lumo': lumo,
        'homo_lumo_gap': lumo - homo if homo is not None and lumo is not None else None,
        'homo_per_spin': homos,
        'lumo_per_spin': lumos,
    }


def aufbau_violation(channels: list[tuple[np.ndarray, np.ndarray]], front: dict[str, Any]) -> float | None:
    """How far (Ha) the lowest empty orbital lies below the highest filled one of the same spin, at most over the
    channels (<= 0: aufbau), from :func:`frontier`'s per-spin HOMO and LUMO; ``None`` with fractional occupations or
    when no channel has both a filled and an empty orbital."""
    if any(np.any((occ > 1e-6) & (occ < 1.0 - 1e-6)) for _, occ in channels):
        return None
    gaps = [
        homo - lumo
        for homo, lumo in zip(front['homo_per_spin'], front['lumo_per_spin'], strict=True)
        if homo is not None and lumo is not None
    ]
    return max(gaps, default=None)


def smearing_results(mf) -> dict[str, Any]:
    """The smearing width, the entropy and the free energy of a smeared SCF (PySCF's ``smearing_``); ``{}`` without."""
    sigma = getattr(mf, 'sigma', None)
    if not sigma:
        return {}
    entropy = _finite(getattr(mf, 'entropy', None))
    e_free = _finite(getattr(mf, 'e_free', None))
    if e_free is None and entropy is not None and _finite(mf.e_tot) is not None:
        e_free = float(mf.e_tot) - float(sigma) * entropy
    return {'smearing': float(sigma), 'entropy': entropy, 'e_free': e_free}


def versions() -> dict[str, str]:
    found = {'python': platform.python_version()}
    for module in ('pyscf', 'torch', 'numpy', 'aiida_dm21'):
        try:
            found[module] = str(__import__(module).__version__)
        except Exception:  # report what can be found
            found[module] = 'unknown'
    return found


def scf_results(mf, scf_type: str) -> dict[str, Any]:
    """Everything ``results.json`` reports about a finished (converged or not) SCF."""
    channels = orbital_channels(mf, scf_type)
    front = frontier(channels)
    results: dict[str, Any] = {
        'e_tot': _finite(mf.e_tot),
        'e_tot_is_finite': _finite(mf.e_tot) is not None,
        'converged': bool(mf.converged),
        'cycles': int(getattr(mf, 'cycles', -1)),
        'dispersion': getattr(mf, 'disp', None) or 'none',
        'e_disp': _finite(mf.scf_summary.get('dispersion', 0.0)),
        'mo_energy': [e.tolist() for e, _ in channels],
        'mo_occ': [o.tolist() for _, o in channels],
        **front,
        **smearing_results(mf),
        'guess': getattr(mf, 'guess_info', None),
    }
    violation = aufbau_violation(channels, front)
    results['aufbau_violation'] = violation
    results['aufbau'] = None if violation is None else violation <= AUFBAU_TOLERANCE
    try:
        dipole = mf.dip_moment(unit='Debye', verbose=0)
        results['dipole'] = [float(x) for x in dipole]
    except Exception as exc:  # a property, never a reason to fail the run
        results['dipole'] = None
        results['dipole_error'] = f'{type(exc).__name__}: {exc}'
    if scf_type == 'UKS':
        s2, multiplicity = mf.spin_square()
        results['s2'] = float(s2)
        results['s2_multiplicity'] = float(multiplicity)
    elif scf_type == 'ROKS':
        s = mf.mol.spin / 2.0
        results['s2'] = s * (s + 1.0)
        results['s2_multiplicity'] = 2.0 * s + 1.0
    else:
        results['s2'] = 0.0
        results['s2_multiplicity'] = 1.0
    return results


def write_results(workdir: Path, results: dict[str, Any]) -> None:
    path = workdir / RESULTS_FILE
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(_jsonable(results), indent=2, allow_nan=False))
    tmp.replace(path)


def save_density(workdir: Path, dm: Any) -> str | None:
    if dm is None:
        return None
    np.save(workdir / DENSITY_FILE, np.asarray(dm, dtype=float), allow_pickle=False)
    return DENSITY_FILE


# --- the run ----------------------------------------------------------------------------------------------


class _Progress:
    """SCF callback: remembers the last density and stops before the deadline."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.dm: np.ndarray | None = None
        self.e_tot: float | None = None
        self.cycle = 0
        self.last = time.monotonic()
        self.slowest = 0.0

    def start(self) -> None:
        """Call when the SCF starts: the first cycle's time then includes the initial guess, no more."""
        self.last = time.monotonic()

    def __call__(self, envs: dict[str, Any]) -> None:
        now = time.monotonic()
        self.slowest = max(self.slowest, now - self.last)
        self.last = now
        self.dm = np.asarray(envs.get('dm')) if envs.get('dm') is not None else self.dm
        self.e_tot = _finite(envs.get('e_tot'))
        index = envs.get('cycle', envs.get('imacro'))  # 0-based: 'cycle' in DIIS, 'imacro' in the Newton solver
        self.cycle = int(index) + 1 if isinstance(index, int) else self.cycle + 1
        # A cycle that converged is kept: stopping now would throw the converged result away for a restart.
        if self.deadline is not None and not envs.get('scf_conv') and now + self.slowest > self.deadline:
            raise WalltimeExceeded(f'stopped after cycle {self.cycle}: the next cycle would pass the walltime')


def deadline_from(data: dict[str, Any], start: float) -> float | None:
    walltime = _finite(data.get('walltime_seconds'))
    if walltime is None or walltime <= 0:
        return None
    margin = min(60.0, 0.1 * walltime)
    return start + walltime - margin


def run(input_file: str | Path = 'input.json', workdir: str | Path | None = None) -> int:
    """Run the calculation described by ``input_file``; write results in ``workdir``; return the exit status."""
    start_wall, start = time.time(), time.monotonic()
    input_path = Path(input_file)
    workdir = Path(workdir) if workdir is not None else input_path.resolve().parent
    results: dict[str, Any] = {
        'format_version': RESULTS_FORMAT_VERSION,
        'e_tot': None,
        'converged': False,
        'cycles': 0,
        'error': None,
        'density_file': None,
        'versions': versions(),
        'threads': None,
        'started': start_wall,
    }
    timings: dict[str, Any] = {}
    status = EXIT_FAILED
    progress: _Progress | None = None
    mf = None
    try:
        try:
            results['threads'] = apply_thread_count()
        except ThreadCountError as exc:
            raise RunnerError('unsupported_input', str(exc)) from exc
        print(thread_summary(results['threads']), flush=True)
        data = read_input(input_path)
        results['input'] = {k: v for k, v in data.items() if k not in ('symbols', 'positions')}
        progress = _Progress(deadline_from(data, start))
        mol = build_molecule(data)
        results['nao'] = int(mol.nao_nr())
        results['nelec'] = [int(n) for n in mol.nelec]
        mf, scf_type = make_scf(mol, data, workdir / data['checkpoint'])
        results['scf_type'] = scf_type
        meta = mf.checkpoint_metadata
        results['functional'] = {k: meta.get(k) for k in ('name', 'source', 'weights_sha256')}
        dm0 = None
        if data.get('restart_density'):
            dm0 = read_restart_density(workdir / data['restart_density'], mol, scf_type)
            results['restarted'] = True
        mf.callback = progress
        timings['setup'] = time.monotonic() - start
        t_scf = time.monotonic()
        progress.start()
        relax = data.get('relax')
        try:
            if relax is None:
                mf.kernel(dm0=dm0)
            else:
                from aiida_dm21.runner.relax import RELAX_FILE, optimise

                results['relax'] = {'converged': False, 'file': RELAX_FILE}
                try:
                    mf, results['relax']['converged'] = optimise(mf, relax, workdir, dm0)
                except (RuntimeError, ValueError, np.linalg.LinAlgError, ArithmeticError) as exc:
                    raise RunnerError('relax_failed', f'{type(exc).__name__}: {exc}') from exc
        except (WalltimeExceeded, RunnerError):
            raise
        except (ValueError, np.linalg.LinAlgError, RuntimeError, MemoryError, ArithmeticError) as exc:
            raise RunnerError('scf_error', f'{type(exc).__name__}: {exc}') from exc
        finally:
            timings['scf'] = time.monotonic() - t_scf
        results.update(scf_results(mf, scf_type))
        if results['cycles'] <= 0:  # the Newton solver does not count mf.cycles
            results['cycles'] = progress.cycle
        results['e_tot_ev'] = results['e_tot'] * AU2EV if results['e_tot'] is not None else None
        results['density_file'] = save_density(workdir, mf.make_rdm1())
        relaxed = results.get('relax', {}).get('converged', True)
        status = EXIT_CONVERGED if results['converged'] and relaxed else EXIT_NOT_CONVERGED
    except WalltimeExceeded as exc:
        results['error'] = {'category': 'walltime', 'message': str(exc), 'type': 'WalltimeExceeded'}
        if progress is not None:
            results['e_tot'] = progress.e_tot
            results['cycles'] = progress.cycle
            results['density_file'] = save_density(workdir, progress.dm)
        status = EXIT_WALLTIME
    except RunnerError as exc:
        results['error'] = {'category': exc.category, 'message': exc.message, 'type': 'RunnerError'}
        status = EXIT_BAD_INPUT if exc.category in ('unsupported_input', 'checkpoint_unreadable') else EXIT_FAILED
        if exc.category in ('scf_error', 'relax_failed') and progress is not None and progress.dm is not None:
            results['density_file'] = save_density(workdir, progress.dm)
            results['cycles'] = progress.cycle
    except Exception as exc:  # every failure ends in results.json
        results['error'] = {
            'category': 'internal_error',
            'message': f'{type(exc).__name__}: {exc}',
            'type': type(exc).__name__,
            'traceback': traceback.format_exc(limit=20),
        }
        status = EXIT_FAILED
    global _signals_interrupt
    _signals_interrupt = False  # a late SIGTERM must not cut the writing of results.json
    timings['total'] = time.monotonic() - start
    if mf is not None and hasattr(mf, '_numint') and hasattr(mf._numint, 'timings'):
        timings['xc'] = mf._numint.timings.as_dict()
    results['timings'] = timings
    results['exit_status'] = status
    write_results(workdir, results)
    if results['error'] is not None:
        print(f'aiida-dm21 runner: {results["error"]["category"]}: {results["error"]["message"]}', file=sys.stderr)
    else:
        print(f'aiida-dm21 runner: e_tot = {results["e_tot"]} Ha, converged = {results["converged"]}')
    return status


def _raise_walltime(signum: int, frame: Any) -> None:
    if _signals_interrupt:
        raise WalltimeExceeded(f'received signal {signal.Signals(signum).name}')


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m aiida_dm21.runner.scf [input.json]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0] in ('-h', '--help')):
        print(__doc__)
        return EXIT_BAD_INPUT if len(args) > 1 else 0
    for name in ('SIGTERM', 'SIGUSR1', 'SIGXCPU'):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _raise_walltime)
    global _signals_interrupt
    _signals_interrupt = True
    input_file = Path(args[0] if args else 'input.json')
    return run(input_file, Path.cwd())


if __name__ == '__main__':
    sys.exit(main())
