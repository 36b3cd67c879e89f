"""``dm21.scf``: one DM21 Kohn-Sham SCF calculation of a molecule, run by :mod:`aiida_dm21.runner.scf`.

The job folder holds ``input.json`` (geometry in Angstrom, symbols, basis and SCF settings),
``checkpoint.safetensors`` (the network, copied from the ``checkpoint`` node) and, when restarting,
``restart_dm.npy``.  The code is a Python interpreter with ``aiida-dm21`` installed; the command line is
``python -m aiida_dm21.runner.scf input.json``.  Everything that can be checked before submission
(periodicity, elements, parameter names and types, charge/multiplicity parity, basis availability,
restart density shape) is checked by the input validators, so a bad input never reaches a scheduler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import typing as t
import warnings

import numpy as np
from aiida import orm
from aiida.common import datastructures
from aiida.common.constants import elements
from aiida.engine import CalcJob

from aiida_dm21.data.checkpoint import DM21CheckpointData
from aiida_dm21.functional.dispersion import PARAMETER_SET, VERSIONS  # numpy only: no PySCF or PyTorch
from aiida_dm21.runner.scf import (
    DENSITY_FILE,
    INIT_GUESSES,
    RESULTS_FILE,
    SCF_TYPES,
    basis_ecp,
    check_combinations,
    check_geometry,
    check_occupations,
)

if t.TYPE_CHECKING:
    from aiida.common.folders import Folder

__all__ = (
    'PARAMETERS',
    'DM21ScfCalculation',
    'resolve_parameters',
    'validate_parameters',
    'validate_structure',
)

INPUT_FILE = 'input.json'
CHECKPOINT_FILE = 'checkpoint.safetensors'
RESTART_FILE = 'restart_dm.npy'
OUTPUT_FILE = 'aiida.out'
RUNNER_MODULE = 'aiida_dm21.runner.scf'

#: Atomic number of every element symbol AiiDA knows, without the placeholder ``X`` (Z = 0).
ATOMIC_NUMBERS: dict[str, int] = {value['symbol']: z for z, value in elements.items() if z >= 1}


# --- the parameters schema --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One key of the ``parameters`` input: accepted types, default, extra check and help."""

    types: tuple[type, ...]
    default: t.Any
    help: str
    check: t.Callable[[t.Any], str | None] | None = None
    required: bool = False

    def validate(self, key: str, value: t.Any) -> str | None:
        if value is None and not self.required:
            return None
        is_bool = isinstance(value, bool)
        if (is_bool and bool not in self.types) or not isinstance(value, self.types):
            names = ' or '.join(tp.__name__ for tp in self.types)
            return f'`{key}` must be {names}, got {value!r} ({type(value).__name__})'
        if isinstance(value, float) and not math.isfinite(value):
            return f'`{key}` must be a finite number ({self.help}), got {value!r}'
        if self.check is not None:
            problem = self.check(value)
            if problem:
                return f'`{key}`: {problem}'
        return None


def _one_of(choices: t.Sequence[str]) -> t.Callable[[t.Any], str | None]:
    def check(value: t.Any) -> str | None:
        return None if value in choices else f'{value!r} is not one of {", ".join(map(repr, choices))}'

    return check


def _at_least(low: float, *, strict: bool = False) -> t.Callable[[t.Any], str | None]:
    def check(value: t.Any) -> str | None:
        if value > low or (value == low and not strict):
            return None
        return f'{value!r} must be {">" if strict else ">="} {low}'

    return check


def _between(low: float, high: float, *, high_open: bool = False) -> t.Callable[[t.Any], str | None]:
    def check(value: t.Any) -> str | None:
        if low <= value < high or (value == high and not high_open):
            return None
        return f'{value!r} is outside [{low}, {high}{")" if high_open else "]"}'

    return check


def _direction(value: t.Any) -> str | None:
    from aiida_dm21.functional.atoms import parse_direction  # the core's check (imports PySCF: only when used)

    try:
        parse_direction(value)
    except ValueError as exc:
        return str(exc)
    return None


_DEVICE = re.compile(r'^(cpu|cuda(:\d+)?)$')


def _device(value: t.Any) -> str | None:
    # only the form here: whether the GPU exists is checked on the compute node, where the job runs (a CPU-only
    # submitting machine may ask for a GPU)
    return None if _DEVICE.match(value) else f"{value!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'"


def _non_empty(value: t.Any) -> str | None:
    return None if value.strip() else 'must not be empty'


#: The keys of ``parameters``: everything else is refused.
PARAMETERS: dict[str, Parameter] = {
    'basis': Parameter((str,), None, 'PySCF name of an all-electron basis set, e.g. "def2-svp"', _non_empty, True),
    'charge': Parameter((int,), 0, 'total charge of the molecule'),
    'multiplicity': Parameter((int,), 1, 'spin multiplicity 2S + 1', _at_least(1)),
    'scf_type': Parameter(
        (str,), 'auto', 'auto (RKS if multiplicity is 1, else UKS), RKS, UKS or ROKS', _one_of(SCF_TYPES)
    ),
    'grid_level': Parameter((int,), 3, 'PySCF integration grid level, 0 (coarse) to 9 (fine)', _between(0, 9)),
    'conv_tol': Parameter((float, int), 1e-6, 'energy convergence threshold (Ha)', _at_least(0, strict=True)),
    'conv_tol_grad': Parameter((float, int), 1e-3, 'orbital gradient threshold', _at_least(0, strict=True)),
    'max_cycle': Parameter((int,), 50, 'maximum number of SCF cycles', _at_least(1)),
    'init_guess': Parameter(
        (str,),
        'b3lyp',
        'initial density: b3lyp (converged B3LYP), b3lyp_broken_symmetry (UKS: B3LYP past its spin-symmetry-breaking '
        'instabilities, for stretched bonds), minao, atom, huckel or 1e',
        _one_of(INIT_GUESSES),
    ),
    'open_shell_direction': Parameter(
        (str, list),
        None,
        "open-shell atoms only: start from the lowest B3LYP state over orientations of the open shell ('lowest') "
        'or with it along [x, y, z]; unset: wherever B3LYP lands (path-dependent, see docs/core.md)',
        _direction,
    ),
    'level_shift': Parameter((float, int), 0.0, 'virtual orbital level shift (Ha)', _at_least(0)),
    'damp': Parameter(
        (float, int),
        None,
        'Fock damping factor in [0, 1) for cycles 1-3 (DIIS then starts at 4); unset: none, or 0.5 with smearing',
        _between(0, 1, high_open=True),
    ),
    'device': Parameter(
        (str,),
        'cpu',
        "where the network, features, potential and integrals run: 'cpu', 'cuda' or 'cuda:N' (checked on the "
        'compute node: no silent fallback to the CPU)',
        _device,
    ),
    'screening': Parameter(
        (float, int),
        1e-5,  # aiida_dm21.functional.numint.DEFAULT_SCREENING (not imported: it would load PyTorch here)
        'local-HF integral screening threshold (Ha, an estimated bound on the E_xc error); 0: dense',
        _at_least(0),  # and finite: Parameter.validate refuses NaN and inf for every float
    ),
    'dispersion': Parameter(
        (str,),
        'none',
        f"empirical dispersion added to the energy: {', '.join(VERSIONS)} (with {PARAMETER_SET.upper()}'s "
        "parameters, DM21's convention) or 'none'",
        _one_of(('none', *VERSIONS)),
    ),
    'newton': Parameter(
        (bool,),
        False,
        'second-order (Newton) SCF solver with the exact orbital Hessian (J + the DM21 XC kernel by autograd)',
    ),
    'smearing': Parameter(
        (float, int),
        0.0,
        'Fermi-Dirac smearing width (Ha): fractional occupations around the Fermi level (PySCF smearing_); '
        'e_tot is the energy of that density, e_free adds -sigma*S; 0: integer occupations; not with newton',
        _at_least(0),
    ),
}


def validate_parameters(value: orm.Dict | t.Mapping[str, t.Any], _: t.Any = None) -> str | None:
    """Port validator: the keys, types and ranges of ``parameters``."""
    data = value.get_dict() if isinstance(value, orm.Dict) else dict(value)
    unknown = sorted(set(data) - set(PARAMETERS))
    if unknown:
        return f'unknown parameters {", ".join(map(repr, unknown))}; accepted: {", ".join(PARAMETERS)}'
    problems = [
        f'`{key}` is required ({spec.help})'
        if spec.required and data.get(key) is None
        else spec.validate(key, data[key])
        for key, spec in PARAMETERS.items()
        if key in data or spec.required
    ]
    problems = [p for p in problems if p]
    if not problems:  # each is valid: may they go together?
        combination = check_combinations(data)
        if combination:
            problems.append(combination)
    return '; '.join(problems) if problems else None


def resolve_parameters(value: orm.Dict | t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """The parameters with every default filled in (what the runner receives)."""
    data = value.get_dict() if isinstance(value, orm.Dict) else dict(value)
    resolved = {key: spec.default for key, spec in PARAMETERS.items()}
    resolved.update({key: val for key, val in data.items() if val is not None})
    for key in ('conv_tol', 'conv_tol_grad', 'level_shift', 'damp', 'screening', 'smearing'):
        if resolved.get(key) is not None:  # damp: unset means 'the runner's choice' (none, or damped with smearing)
            resolved[key] = float(resolved[key])
    return resolved


# --- structure --------------------------------------------------------------------------------------------


def validate_structure(value: orm.StructureData, _: t.Any = None) -> str | None:
    """Port validator: a finite molecule made of known elements (no cell periodicity, alloys or vacancies)."""
    pbc = tuple(bool(x) for x in value.pbc)
    if any(pbc):
        return (
            f'the structure is periodic (pbc={pbc}): dm21.scf treats finite molecules only; '
            'set `structure.pbc = (False, False, False)` for a molecule'
        )
    if not value.sites:
        return 'the structure has no atoms'
    for kind in value.kinds:
        if kind.is_alloy or kind.has_vacancies:
            return f'kind {kind.name!r} is an alloy or has vacancies ({kind.symbols}, {kind.weights}): not a molecule'
        symbol = kind.symbols[0]
        if symbol not in ATOMIC_NUMBERS:
            return f'unknown element {symbol!r} in kind {kind.name!r}: every atom must be a real element'
    positions = np.array([site.position for site in value.sites], dtype=float)
    if not np.all(np.isfinite(positions)):
        return 'the structure has non-finite atomic positions'
    symbols, _ = molecule_of(value)
    return check_geometry(symbols, positions)


def molecule_of(structure: orm.StructureData) -> tuple[list[str], list[list[float]]]:
    """Element symbols and Cartesian positions (Angstrom) of the atoms."""
    kinds = {kind.name: kind.symbols[0] for kind in structure.kinds}
    symbols = [kinds[site.kind_name] for site in structure.sites]
    positions = [[float(x) for x in site.position] for site in structure.sites]
    return symbols, positions


def _check_electrons(symbols: list[str], charge: int, multiplicity: int, scf_type: str) -> str | None:
    n_electrons = sum(ATOMIC_NUMBERS[s] for s in symbols) - charge
    n_unpaired = multiplicity - 1
    formula = ''.join(symbols) if len(symbols) <= 8 else f'{len(symbols)} atoms'
    if n_electrons <= 0:
        return f'charge {charge} leaves {n_electrons} electrons in {formula}'
    if n_unpaired > n_electrons or (n_electrons - n_unpaired) % 2:
        allowed = 'odd (1, 3, 5, ...)' if n_electrons % 2 == 0 else 'even (2, 4, ...)'
        return (
            f'charge {charge} and multiplicity {multiplicity} are impossible for {formula}: '
            f'{n_electrons} electrons need an {allowed} multiplicity of at most {n_electrons + 1}'
        )
    if scf_type == 'RKS' and multiplicity != 1:
        return f'scf_type RKS needs multiplicity 1 (closed shell), got {multiplicity}: use UKS or ROKS'
    return None


def _basis_size(symbols: list[str], positions: list[list[float]], params: dict[str, t.Any]) -> tuple[int | None, str]:
    """Number of basis functions (PySCF), or ``(None, reason)`` when PySCF cannot build the molecule."""
    from pyscf import gto

    stream = io.StringIO()
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            mol = gto.M(
                atom=list(zip(symbols, positions, strict=True)),
                unit='Angstrom',
                basis=params['basis'],
                ecp=basis_ecp(params['basis'], symbols),  # as the runner builds it: an ECP must be seen
                charge=params['charge'],
                spin=params['multiplicity'] - 1,
                verbose=0,
            )
    except Exception as exc:  # PySCF raises many types for a bad or missing basis
        return None, f'{type(exc).__name__}: {exc}'
    if mol.has_ecp():
        elements = ', '.join(sorted(mol._ecp))
        return None, (
            f'it brings effective core potentials for {elements}; DM21 needs an all-electron basis set '
            '(e.g. cc-pVDZ, or def2 up to Kr)'
        )
    problem = check_occupations(mol.nelec, mol.nao_nr(), params['basis'])
    if problem:
        return None, problem
    return mol.nao_nr(), ''


def validate_restart_density(value: orm.ArrayData, _: t.Any = None) -> str | None:
    """Port validator: an array ``density_matrix`` of shape (nao, nao) or (2, nao, nao)."""
    if 'density_matrix' not in value.get_arraynames():
        return f'restart_density has no array named "density_matrix" (found {value.get_arraynames()})'
    shape = tuple(value.get_shape('density_matrix'))
    square = len(shape) == 2 and shape[0] == shape[1]
    spin_pair = len(shape) == 3 and shape[0] == 2 and shape[1] == shape[2]
    if not (square or spin_pair):
        return f'restart_density: density_matrix has shape {shape}, expected (nao, nao) or (2, nao, nao)'
    array = value.get_array('density_matrix')
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        return f'restart_density: density_matrix must hold real numbers, got dtype {array.dtype}'
    if not np.all(np.isfinite(array)):
        return 'restart_density: density_matrix contains NaN or infinite values'
    return None


def validate_inputs(inputs: dict[str, t.Any], ctx: t.Any = None) -> str | None:
    """Cross-checks: electron count vs charge and multiplicity, basis availability, restart density size."""
    options = (inputs.get('metadata') or {}).get('options') or {}
    for key in ('max_wallclock_seconds', 'max_memory_kb'):
        value = options.get(key)
        if value is not None and value < 1:
            return f'metadata.options.{key} must be >= 1 if given, got {value}'
    structure, parameters = inputs.get('structure'), inputs.get('parameters')
    if structure is None or parameters is None:
        return None
    if validate_structure(structure) or validate_parameters(parameters):
        return None  # already reported by the port validators
    params = resolve_parameters(parameters)
    symbols, positions = molecule_of(structure)
    problem = _check_electrons(symbols, params['charge'], params['multiplicity'], params['scf_type'])
    if problem:
        return problem
    nao, reason = _basis_size(symbols, positions, params)
    if nao is None:
        return f'basis {params["basis"]!r} cannot be used for this molecule: {reason}'
    restart = inputs.get('restart_density')
    if restart is not None and not validate_restart_density(restart):
        shape = tuple(restart.get_shape('density_matrix'))
        if shape[-1] != nao:
            return f'restart_density is for {shape[-1]} basis functions, this molecule in {params["basis"]} has {nao}'
    return None


# --- the CalcJob ------------------------------------------------------------------------------------------


class DM21ScfCalculation(CalcJob):
    """Kohn-Sham SCF of a molecule with a DM21-architecture neural functional (PySCF + PyTorch)."""

    @classmethod
    def define(cls, spec):  # type: ignore[override]
        super().define(spec)
        spec.input(
            'structure',
            valid_type=orm.StructureData,
            validator=validate_structure,
            help='The molecule: no periodic boundary conditions (pbc all False), real elements only.',
        )
        spec.input(
            'parameters',
            valid_type=orm.Dict,
            validator=validate_parameters,
            help='SCF settings. Keys: '
            + '; '.join(
                f'{key}: {p.help} ({"required" if p.required else f"default {p.default!r}"})'
                for key, p in PARAMETERS.items()
            )
            + '. Unknown keys are refused.',
        )
        spec.input(
            'checkpoint',
            valid_type=DM21CheckpointData,
            help='The DM21-architecture network (dm21.checkpoint node).',
        )
        spec.input(
            'restart_density',
            valid_type=orm.ArrayData,
            required=False,
            validator=validate_restart_density,
            help='Start from this density matrix: an ArrayData with an array "density_matrix" of shape (nao, nao) '
            'or (2, nao, nao), e.g. the output_density of an earlier (unconverged) run.',
        )
        spec.inputs.validator = validate_inputs

        options = spec.inputs['metadata']['options']
        options['resources'].default = {'num_machines': 1, 'num_mpiprocs_per_machine': 1}
        options['parser_name'].default = 'dm21.scf'
        options['input_filename'].default = INPUT_FILE
        options['output_filename'].default = OUTPUT_FILE
        options['withmpi'].default = False

        spec.output(
            'output_parameters',
            valid_type=orm.Dict,
            required=False,
            help='Results: e_tot (Ha) and e_tot_ev, converged, cycles, orbital energies (Ha) per spin, HOMO/LUMO, '
            'dipole (Debye), <S^2>, timings (s) and package versions.',
        )
        spec.output(
            'output_density',
            valid_type=orm.ArrayData,
            required=False,
            help='Final density matrix (AO basis), array "density_matrix": (nao, nao) for RKS, (2, nao, nao) for '
            'UKS/ROKS. Attached also when the SCF did not converge, for restarts.',
        )
        spec.default_output_node = 'output_parameters'

        # Failures that depend on the machine, not on the inputs, must not be reused from the cache.
        transient = {'invalidates_cache': True}
        spec.exit_code(300, 'ERROR_MISSING_RESULTS', message='The runner wrote no results.json: {detail}', **transient)
        spec.exit_code(
            301, 'ERROR_INVALID_RESULTS', message='results.json is unreadable or malformed: {detail}', **transient
        )
        spec.exit_code(
            302, 'ERROR_MISSING_DENSITY', message='The density matrix file is missing or invalid: {detail}', **transient
        )
        spec.exit_code(
            310,
            'ERROR_OUT_OF_WALLTIME',
            message='The job ran out of walltime (reported by the scheduler) before the runner wrote results.',
            **transient,
        )
        spec.exit_code(
            311,
            'ERROR_OUT_OF_WALLTIME_PARTIAL',
            message='The runner stopped for the walltime after {cycles} SCF cycles ({detail}); '
            'the last energy and density are attached for a restart.',
            **transient,
        )
        spec.exit_code(350, 'ERROR_RUNNER_FAILED', message='The runner failed ({category}): {detail}', **transient)
        spec.exit_code(
            400,
            'ERROR_SCF_NOT_CONVERGED',
            message='The SCF did not converge in {cycles} cycles; energy and density are attached for a restart.',
        )
        spec.exit_code(
            405,
            'ERROR_NOT_AUFBAU',
            message='The SCF converged to a state that is not the ground state: an empty orbital lies {violation} Ha '
            'below a filled one of the same spin (aufbau principle); energy and density are attached.',
        )
        spec.exit_code(410, 'ERROR_NAN_ENERGY', message='The total energy is NaN or infinite.')
        spec.exit_code(420, 'ERROR_UNSUPPORTED_INPUT', message='The runner refused the input: {detail}', **transient)
        spec.exit_code(
            430,
            'ERROR_CHECKPOINT_UNREADABLE',
            message='The checkpoint could not be read on the compute node: {detail}',
            **transient,
        )

    def prepare_for_submission(self, folder: Folder) -> datastructures.CalcInfo:
        """Write ``input.json`` (and ``restart_dm.npy``); the checkpoint is copied from the node's repository."""
        params = resolve_parameters(self.inputs.parameters)
        symbols, positions = molecule_of(self.inputs.structure)
        options = self.inputs.metadata.options
        payload: dict[str, t.Any] = {
            'format_version': 1,
            'symbols': symbols,
            'positions': positions,
            'units': 'Angstrom',
            **params,
            'checkpoint': CHECKPOINT_FILE,
            'restart_density': None,
            'walltime_seconds': options.get('max_wallclock_seconds', None),
            'max_memory_mb': None,
        }
        if options.get('max_memory_kb', None):
            payload['max_memory_mb'] = 0.9 * options.max_memory_kb / 1024.0
        if 'restart_density' in self.inputs:
            array = self.inputs.restart_density.get_array('density_matrix')
            with folder.open(RESTART_FILE, 'wb') as handle:
                np.save(handle, np.asarray(array, dtype=float), allow_pickle=False)
            payload['restart_density'] = RESTART_FILE

        input_filename = options.input_filename
        with folder.open(input_filename, 'w', encoding='utf8') as handle:
            json.dump(payload, handle, indent=2)

        codeinfo = datastructures.CodeInfo()
        codeinfo.code_uuid = self.inputs.code.uuid
        codeinfo.cmdline_params = ['-m', RUNNER_MODULE, input_filename]
        codeinfo.stdout_name = options.output_filename

        checkpoint = self.inputs.checkpoint
        calcinfo = datastructures.CalcInfo()
        calcinfo.codes_info = [codeinfo]
        calcinfo.local_copy_list = [(checkpoint.uuid, checkpoint.filename, CHECKPOINT_FILE)]
        calcinfo.remote_copy_list = []
        calcinfo.retrieve_list = [RESULTS_FILE, DENSITY_FILE, options.output_filename]
        return calcinfo
