"""``dm21.reference``: integer-electron reference calculations (density + FCI/CCSD(T)/user energy).

One species (``structure`` + ``parameters`` with its charge, multiplicity and label) or a batch
(``species``: a list of ``{label, symbols, positions, charge, multiplicity}``, positions in Angstrom, with
the common ``parameters``).  A batch runs its species one after the other in one job; each gets its own
outputs ``species.<key>.output_parameters`` / ``species.<key>.output_arrays`` (``key`` =
:func:`link_label` of its label) and an entry in ``species_status``: ``{key: {label, status, category,
message}}`` with ``status`` ``converged``, ``not_converged`` or ``failed``.  Exit-code rule of a batch: 0
when every species converged; 430 (``ERROR_SPECIES_FAILED``, never cached) when at least one species failed
or did not converge: the message lists them, the converged species' outputs are attached all the same.  A
failure of the whole job (no ``results.json``, bad input format, the scheduler's 110/120/140) keeps its own
code, with whatever species had finished attached.

Runs :mod:`aiida_dm21.runner.reference` on the compute node (no AiiDA needed there).  The parser
attaches ``output_parameters`` (energies and energy terms, Ha) and ``output_arrays`` (density, orbitals,
occupations, orbital energies and Fock matrices per spin); the arrays node also carries the
specification and scalars as attributes, which is what :func:`.fractional.build_fractional_dataset`
reads, so that the dataset is linked to these exact calculations in the provenance graph.
"""

from __future__ import annotations

import json
import typing as t

from aiida import orm
from aiida.common import datastructures
from aiida.engine import CalcJob

from aiida_dm21.calculations.scf import _check_electrons, molecule_of, validate_structure
from aiida_dm21.reference.constants import (  # no PySCF
    FCI_MAX_ELECTRONS,
    REFERENCE_METHODS,
    density_method_problem,
)
from aiida_dm21.runner.common import INPUT_FORMAT_VERSION
from aiida_dm21.runner.reference import ARRAYS_FILE, RESULTS_FILE

__all__ = ('BATCH_PARAMETER_KEYS', 'USER_ENERGY_UNITS', 'DM21ReferenceCalculation', 'link_label')

INPUT_FILE = 'input.json'
USER_ENERGY_UNITS = {'Ha': 1.0, 'hartree': 1.0, 'eV': 1 / 27.211386245988, 'kcal/mol': 1 / 627.5094740631}
PARAMETER_KEYS = {
    'basis',
    'charge',
    'multiplicity',
    'density_method',
    'reference_method',
    'label',
    'max_cycle',
    'cc_max_cycle',
    'reference_basis',
}

#: Keys of a batch's common ``parameters`` (charge, multiplicity and label belong to each species).
BATCH_PARAMETER_KEYS = PARAMETER_KEYS - {'charge', 'multiplicity', 'label'}
SPECIES_KEYS = {'label', 'symbols', 'positions', 'charge', 'multiplicity'}


def link_label(label: str) -> str:
    """A valid AiiDA link label for a species label: 'H+' -> 'H_plus', 'C2H6-' -> 'C2H6_minus'."""
    text = label.replace('+', '_plus_').replace('-', '_minus_')
    text = ''.join(c if c.isalnum() else '_' for c in text)
    parts = [p for p in text.split('_') if p]
    out = '_'.join(parts) or 'species'
    return out if not out[0].isdigit() else f's_{out}'


def validate_parameters(value: orm.Dict, _: t.Any = None) -> str | None:
    data = value.get_dict()
    unknown = sorted(set(data) - PARAMETER_KEYS)
    if unknown:
        return f'unknown parameters {unknown}; accepted: {sorted(PARAMETER_KEYS)}'
    if not isinstance(data.get('basis'), str) or not data['basis'].strip():
        return '`basis` (a PySCF basis name) is required'
    if not isinstance(data.get('charge', 0), int) or not isinstance(data.get('multiplicity', 1), int):
        return '`charge` and `multiplicity` must be integers'
    if data.get('multiplicity', 1) < 1:
        return '`multiplicity` must be >= 1'
    for key in ('max_cycle', 'cc_max_cycle'):
        value = data.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f'`{key}` must be a positive integer, got {value!r}'
    method = data.get('reference_method', 'ccsd(t)')
    if method not in REFERENCE_METHODS:
        return f'`reference_method` {method!r} is not one of {REFERENCE_METHODS}'
    if 'reference_basis' in data:
        reference_basis = data['reference_basis']
        if not isinstance(reference_basis, str) or not reference_basis.strip():
            return f'`reference_basis` must be a PySCF basis name, got {reference_basis!r}'
        if method == 'user':
            return '`reference_basis` goes with a computed reference energy, not with reference_method "user"'
    return density_method_problem(data.get('density_method', 'hf'))


def validate_user_energy(value: orm.SinglefileData, _: t.Any = None) -> str | None:
    try:
        data = json.loads(value.get_content())
        energy, unit = float(data['energy']), data.get('unit')
    except (ValueError, KeyError, TypeError) as exc:
        return f'user_energy must be a JSON file {{"energy": <number>, "unit": "Ha"|"eV"|"kcal/mol"}}: {exc}'
    if unit not in USER_ENERGY_UNITS:
        return f'user_energy unit {unit!r} is not one of {sorted(USER_ENERGY_UNITS)} (say which unit the number is in)'
    if not -1e6 < energy * USER_ENERGY_UNITS[unit] < 0:
        return f'user_energy {energy} {unit} is not a plausible total energy (must be negative)'
    return None


def _electron_problem(symbols: list[str], charge: int, multiplicity: int, method: str) -> str | None:
    from aiida_dm21.calculations.scf import ATOMIC_NUMBERS

    n_electrons = sum(ATOMIC_NUMBERS[s] for s in symbols) - charge
    if n_electrons != 0:  # a bare nucleus (H+) is a valid end point of a fractional-charge pair
        problem = _check_electrons(symbols, charge, multiplicity, 'UKS')
        if problem:
            return problem
    elif multiplicity != 1:
        return 'a system without electrons has multiplicity 1'
    if method == 'fci' and n_electrons > FCI_MAX_ELECTRONS:
        return f'FCI is limited to {FCI_MAX_ELECTRONS} electrons ({n_electrons} here): use ccsd(t)'
    return None


def _species_item_problem(item: t.Any, method: str) -> str | None:
    """Why one entry of a batch's ``species`` list would be refused, or ``None`` (no PySCF)."""
    import math

    from aiida_dm21.calculations.scf import ATOMIC_NUMBERS, check_geometry

    if not isinstance(item, dict) or not {'label', 'symbols', 'positions'} <= set(item):
        return f'each species needs label, symbols and positions, got {item!r}'
    extra = sorted(set(item) - SPECIES_KEYS)
    if extra:
        return f'unknown keys {extra} in species {item["label"]!r}; accepted: {sorted(SPECIES_KEYS)}'
    label, symbols, positions = item['label'], item['symbols'], item['positions']
    if not isinstance(label, str) or not label.strip():
        return f'a species label must be a non-empty string, got {label!r}'
    if not isinstance(symbols, list) or not symbols or not all(s in ATOMIC_NUMBERS for s in symbols):
        return f'species {label!r}: `symbols` must be a non-empty list of element symbols, got {symbols!r}'
    if (
        not isinstance(positions, list)
        or len(positions) != len(symbols)
        or not all(
            isinstance(p, list)
            and len(p) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in p)
            for p in positions
        )
    ):
        return f'species {label!r}: `positions` must be one finite [x, y, z] (Angstrom) per symbol'
    charge, multiplicity = item.get('charge', 0), item.get('multiplicity', 1)
    for key, value in (('charge', charge), ('multiplicity', multiplicity)):
        if isinstance(value, bool) or not isinstance(value, int):
            return f'species {label!r}: `{key}` must be an integer, got {value!r}'
    if multiplicity < 1:
        return f'species {label!r}: `multiplicity` must be >= 1'
    import numpy as np

    problem = check_geometry(symbols, np.array(positions, dtype=float)) or _electron_problem(
        symbols, charge, multiplicity, method
    )
    return f'species {label!r}: {problem}' if problem else None


def validate_species_list(value: orm.List, _: t.Any = None) -> str | None:
    """Port validator of a batch's ``species``: well-formed entries whose labels give distinct link labels."""
    items = value.get_list()
    if not items:
        return 'the species list of a batch is empty'
    keys: dict[str, str] = {}
    for item in items:
        problem = _species_item_problem(item, 'ccsd(t)')
        if problem:
            return problem
        key = link_label(item['label'])
        if key in keys:
            return f'species {keys[key]!r} and {item["label"]!r} both map to the output key {key!r}: rename one'
        keys[key] = item['label']
    return None


def validate_inputs(inputs: dict, _: t.Any = None) -> str | None:
    structure, parameters = inputs.get('structure'), inputs.get('parameters')
    if (structure is None) == ('species' not in inputs):
        return 'give either `structure` (one species) or `species` (a batch), not both or neither'
    if 'species' in inputs:
        if parameters is None or validate_parameters(parameters) or validate_species_list(inputs['species']):
            return None
        data = parameters.get_dict()
        own = sorted(set(data) - BATCH_PARAMETER_KEYS)
        if own:
            return f'the parameters {own} belong to each species of a batch, not to the common `parameters`'
        method = data.get('reference_method', 'ccsd(t)')
        if method == 'user' or 'user_energy' in inputs:
            return 'reference_method "user" (with user_energy) takes one species (`structure`), not a batch'
        for item in inputs['species'].get_list():
            problem = _species_item_problem(item, method)
            if problem:
                return problem
        return None
    if parameters is None or validate_structure(structure) or validate_parameters(parameters):
        return None
    data = parameters.get_dict()
    symbols, _ = molecule_of(structure)
    charge, multiplicity = data.get('charge', 0), data.get('multiplicity', 1)
    method = data.get('reference_method', 'ccsd(t)')
    problem = _electron_problem(symbols, charge, multiplicity, method)
    if problem:
        return problem
    if (method == 'user') != ('user_energy' in inputs):
        return 'reference_method "user" and the user_energy input go together'
    return None


class DM21ReferenceCalculation(CalcJob):
    """Density and reference energy of one integer-electron molecule or atom (PySCF)."""

    @classmethod
    def define(cls, spec):  # type: ignore[override]
        super().define(spec)
        spec.input(
            'structure',
            valid_type=orm.StructureData,
            required=False,
            validator=validate_structure,
            help='Molecule or atom (one species); or give `species` for a batch.',
        )
        spec.input(
            'species',
            valid_type=orm.List,
            required=False,
            validator=validate_species_list,
            help='A batch: [{label, symbols, positions (Angstrom), charge, multiplicity}, ...], computed one after '
            'the other in this job with the common `parameters` (no charge, multiplicity or label there).',
        )
        spec.input(
            'parameters',
            valid_type=orm.Dict,
            validator=validate_parameters,
            help='basis (required), charge (0), multiplicity (1), density_method ("hf" or a PySCF xc), '
            f'reference_method (one of {REFERENCE_METHODS}; default "ccsd(t)"), label, max_cycle (SCF cycles, '
            'then as many Newton iterations; 50), cc_max_cycle (CCSD iterations; 50), reference_basis (the basis '
            'of the reference energy when not `basis`: its own UHF, then the method; the density stays in `basis`).',
        )
        spec.input(
            'user_energy',
            valid_type=orm.SinglefileData,
            required=False,
            validator=validate_user_energy,
            help='Reference energy computed elsewhere: JSON {"energy": number, "unit": "Ha"|"eV"|"kcal/mol"}.',
        )
        spec.inputs.validator = validate_inputs
        options = spec.inputs['metadata']['options']
        options['resources'].default = {'num_machines': 1, 'num_mpiprocs_per_machine': 1}
        options['parser_name'].default = 'dm21.reference'
        options['output_filename'].default = 'aiida.out'
        spec.output(
            'output_parameters',
            valid_type=orm.Dict,
            help='Energies (Ha), energy terms, electron counts, convergence flags, package versions. Attached also '
            'when a step did not converge (exit 400), for inspection.',
        )
        spec.output(
            'output_arrays',
            valid_type=orm.ArrayData,
            help='dm, mo_coeff, mo_occ, mo_energy, fock per spin. Only for a converged, finite result.',
        )
        spec.output_namespace(
            'species',
            dynamic=True,
            required=False,
            help='A batch: species.<key>.output_parameters and species.<key>.output_arrays per species, as the '
            'single outputs (output_arrays only for a converged, finite result).',
        )
        spec.output(
            'species_status',
            valid_type=orm.Dict,
            required=False,
            help='A batch: {key: {label, status: converged|not_converged|failed, category, message}} per species.',
        )
        spec.default_output_node = 'output_parameters'
        # A failed reference is never reused from the cache: the scheduler's codes (110, 120, 140) already say so,
        # and none of these carries a result anyone should train on.
        failure = {'invalidates_cache': True}
        spec.exit_code(300, 'ERROR_MISSING_RESULTS', message='The runner wrote no results.json: {detail}', **failure)
        spec.exit_code(
            301, 'ERROR_UNREADABLE_RESULTS', message='results.json or arrays.npz is unreadable: {detail}', **failure
        )
        spec.exit_code(
            350, 'ERROR_RUNNER_FAILED', message='The reference runner failed ({category}): {detail}', **failure
        )
        spec.exit_code(
            400,
            'ERROR_REFERENCE_NOT_CONVERGED',
            message='The reference calculation did not converge ({steps}): it is kept out of training sets.',
            **failure,
        )
        spec.exit_code(410, 'ERROR_NAN_ENERGY', message='The reference energy is NaN or infinite.', **failure)
        spec.exit_code(
            411, 'ERROR_NON_FINITE_VALUE', message='`{key}` is NaN or infinite: nothing was stored.', **failure
        )
        spec.exit_code(
            430,
            'ERROR_SPECIES_FAILED',
            message='Species of the batch failed or did not converge: {labels}; the others are attached.',
            **failure,
        )
        spec.exit_code(420, 'ERROR_UNSUPPORTED_INPUT', message='The runner refused the input: {detail}', **failure)
        spec.exit_code(
            421,
            'ERROR_UNSUPPORTED_FORMAT_VERSION',
            message='The runner on the compute machine refused the input format: {detail}',
            **failure,
        )

    def prepare_for_submission(self, folder) -> datastructures.CalcInfo:
        data = self.inputs.parameters.get_dict()
        payload: dict[str, t.Any] = {
            'format_version': INPUT_FORMAT_VERSION,
            'basis': data['basis'],
            'density_method': data.get('density_method', 'hf'),
            'reference_method': data.get('reference_method', 'ccsd(t)'),
        }
        if 'species' in self.inputs:
            payload['species'] = [
                {
                    'label': item['label'],
                    'symbols': item['symbols'],
                    'positions': item['positions'],
                    'charge': item.get('charge', 0),
                    'spin': item.get('multiplicity', 1) - 1,
                }
                for item in self.inputs.species.get_list()
            ]
        else:
            symbols, positions = molecule_of(self.inputs.structure)
            payload.update(
                symbols=symbols,
                positions=positions,
                charge=data.get('charge', 0),
                spin=data.get('multiplicity', 1) - 1,
                label=data.get('label', ''),
            )
        for key in ('max_cycle', 'cc_max_cycle', 'reference_basis'):
            if key in data:
                payload[key] = data[key]
        if 'user_energy' in self.inputs:
            user = json.loads(self.inputs.user_energy.get_content())
            payload['user_energy'] = float(user['energy']) * USER_ENERGY_UNITS[user['unit']]
        with folder.open(INPUT_FILE, 'w') as handle:
            json.dump(payload, handle, indent=2)
        codeinfo = datastructures.CodeInfo()
        codeinfo.code_uuid = self.inputs.code.uuid
        codeinfo.cmdline_params = ['-m', 'aiida_dm21.runner.reference', INPUT_FILE]
        codeinfo.stdout_name = self.metadata.options.output_filename
        calcinfo = datastructures.CalcInfo()
        calcinfo.codes_info = [codeinfo]
        arrays = 'arrays_*.npz' if 'species' in self.inputs else ARRAYS_FILE
        calcinfo.retrieve_list = [RESULTS_FILE, arrays, self.metadata.options.output_filename]
        return calcinfo
