"""``dm21.relax``: geometry optimisation of a molecule with a DM21 functional (geomeTRIC on the compute node).

The same inputs as :class:`~aiida_dm21.calculations.scf.DM21ScfCalculation` (the SCF settings at every
geometry) plus ``relax_parameters`` (optimiser settings, :data:`aiida_dm21.runner.relax.RELAX_DEFAULTS`).
It runs the SCF runner with a ``relax`` block; the outputs are those of an SCF at the final geometry plus
``output_structure`` (the relaxed molecule) and ``output_trajectory`` (every geometry the optimiser asked
for, with its energy and largest gradient component).
"""

from __future__ import annotations

import json
import math
import typing as t

from aiida import orm

from aiida_dm21.calculations.scf import DM21ScfCalculation, validate_parameters
from aiida_dm21.runner.relax import RELAX_DEFAULTS, RELAX_FILE  # numpy only: no PySCF or PyTorch

if t.TYPE_CHECKING:
    from aiida.common import datastructures
    from aiida.common.folders import Folder

__all__ = ('DM21RelaxCalculation', 'validate_relax_parameters')


def validate_relax_parameters(value: orm.Dict, _: t.Any = None) -> str | None:
    """Port validator: known keys; ``max_steps`` an integer >= 1; the thresholds finite numbers > 0."""
    data = value.get_dict()
    unknown = sorted(set(data) - set(RELAX_DEFAULTS))
    if unknown:
        return f'unknown relax_parameters {", ".join(map(repr, unknown))}; accepted: {", ".join(RELAX_DEFAULTS)}'
    for key, item in data.items():
        if key == 'max_steps':
            if type(item) is not int or item < 1:
                return f'relax_parameters `max_steps` must be an integer >= 1, got {item!r}'
        elif isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item) or item <= 0:
            return f'relax_parameters `{key}` must be a finite number > 0, got {item!r}'
    return None


def validate_relax_scf_parameters(value: orm.Dict, _: t.Any = None) -> str | None:
    """The ``dm21.scf`` parameter checks, and no ``smearing``: the forces are those of integer occupations."""
    problem = validate_parameters(value)
    if problem:
        return problem
    if value.get_dict().get('smearing'):
        return '`smearing` is not supported in a geometry optimisation: the analytic forces need integer occupations'
    return None


class DM21RelaxCalculation(DM21ScfCalculation):
    """Geometry optimisation with a DM21-architecture functional: analytic gradients, geomeTRIC's optimiser."""

    @classmethod
    def define(cls, spec):  # type: ignore[override]
        super().define(spec)
        spec.input(
            'relax_parameters',
            valid_type=orm.Dict,
            required=False,
            validator=validate_relax_parameters,
            help='Optimiser settings (geomeTRIC names; defaults in brackets): '
            + ', '.join(f'{key} ({value})' for key, value in RELAX_DEFAULTS.items())
            + '. Energies in Ha, gradients in Ha/bohr, displacements in Angstrom.',
        )
        spec.inputs['metadata']['options']['parser_name'].default = 'dm21.relax'
        spec.inputs['parameters'].validator = validate_relax_scf_parameters
        spec.output(
            'output_structure',
            valid_type=orm.StructureData,
            required=False,
            help='The relaxed molecule (the last geometry when the optimiser did not converge, for a restart).',
        )
        spec.output(
            'output_trajectory',
            valid_type=orm.TrajectoryData,
            required=False,
            help='Every geometry of the optimisation (Angstrom), with arrays "energies" (Ha) and "max_force" '
            '(Ha/bohr).',
        )
        spec.exit_code(
            500,
            'ERROR_RELAX_NOT_CONVERGED',
            message='The optimiser did not converge in {steps} steps; the last structure is attached for a restart.',
        )
        spec.exit_code(
            501,
            'ERROR_RELAX_FAILED',
            message='The optimisation stopped with an error after {steps} steps: {detail}; '
            'the last structure is attached for a restart.',
            invalidates_cache=True,
        )

    def prepare_for_submission(self, folder: Folder) -> datastructures.CalcInfo:
        """The SCF job's files, with the optimiser settings added to ``input.json``."""
        calcinfo = super().prepare_for_submission(folder)
        name = self.inputs.metadata.options.input_filename
        with folder.open(name, 'r', encoding='utf8') as handle:
            payload = json.load(handle)
        settings = self.inputs.relax_parameters.get_dict() if 'relax_parameters' in self.inputs else {}
        payload['relax'] = {**RELAX_DEFAULTS, **settings}
        with folder.open(name, 'w', encoding='utf8') as handle:
            json.dump(payload, handle, indent=2)
        calcinfo.retrieve_list = [*calcinfo.retrieve_list, RELAX_FILE]
        return calcinfo
