"""``dm21.reference``: one integer-electron reference calculation (density + FCI/CCSD(T)/user energy).

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
from aiida_dm21.reference.constants import FCI_MAX_ELECTRONS, REFERENCE_METHODS  # no PySCF
from aiida_dm21.runner.common import INPUT_FORMAT_VERSION
from aiida_dm21.runner.reference import ARRAYS_FILE, RESULTS_FILE

__all__ = ('USER_ENERGY_UNITS', 'DM21ReferenceCalculation')

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
}


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
    return None


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


def validate_inputs(inputs: dict, _: t.Any = None) -> str | None:
    structure, parameters = inputs.get('structure'), inputs.get('parameters')
    if structure is None or parameters is None or validate_structure(structure) or validate_parameters(parameters):
        return None
    data = parameters.get_dict()
    symbols, _ = molecule_of(structure)
    charge, multiplicity = data.get('charge', 0), data.get('multiplicity', 1)
    from aiida_dm21.calculations.scf import ATOMIC_NUMBERS

    n_electrons = sum(ATOMIC_NUMBERS[s] for s in symbols) - charge
    if n_electrons != 0:  # a bare nucleus (H+) is a valid end point of a fractional-charge pair
        problem = _check_electrons(symbols, charge, multiplicity, 'UKS')
        if problem:
            return problem
    elif multiplicity != 1:
        return 'a system without electrons has multiplicity 1'
    method = data.get('reference_method', 'ccsd(t)')
    if method == 'fci' and n_electrons > FCI_MAX_ELECTRONS:
        return f'FCI is limited to {FCI_MAX_ELECTRONS} electrons ({n_electrons} here): use ccsd(t)'
    if (method == 'user') != ('user_energy' in inputs):
        return 'reference_method "user" and the user_energy input go together'
    return None


class DM21ReferenceCalculation(CalcJob):
    """Density and reference energy of one integer-electron molecule or atom (PySCF)."""

    @classmethod
    def define(cls, spec):  # type: ignore[override]
        super().define(spec)
        spec.input('structure', valid_type=orm.StructureData, validator=validate_structure, help='Molecule or atom.')
        spec.input(
            'parameters',
            valid_type=orm.Dict,
            validator=validate_parameters,
            help='basis (required), charge (0), multiplicity (1), density_method ("hf" or a PySCF xc), '
            f'reference_method (one of {REFERENCE_METHODS}; default "ccsd(t)"), label, max_cycle (SCF cycles, '
            'then as many Newton iterations; 50), cc_max_cycle (CCSD iterations; 50).',
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
        spec.exit_code(420, 'ERROR_UNSUPPORTED_INPUT', message='The runner refused the input: {detail}', **failure)
        spec.exit_code(
            421,
            'ERROR_UNSUPPORTED_FORMAT_VERSION',
            message='The runner on the compute machine refused the input format: {detail}',
            **failure,
        )

    def prepare_for_submission(self, folder) -> datastructures.CalcInfo:
        data = self.inputs.parameters.get_dict()
        symbols, positions = molecule_of(self.inputs.structure)
        payload = {
            'format_version': INPUT_FORMAT_VERSION,
            'symbols': symbols,
            'positions': positions,
            'basis': data['basis'],
            'charge': data.get('charge', 0),
            'spin': data.get('multiplicity', 1) - 1,
            'density_method': data.get('density_method', 'hf'),
            'reference_method': data.get('reference_method', 'ccsd(t)'),
            'label': data.get('label', ''),
        }
        for key in ('max_cycle', 'cc_max_cycle'):
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
        calcinfo.retrieve_list = [RESULTS_FILE, ARRAYS_FILE, self.metadata.options.output_filename]
        return calcinfo
