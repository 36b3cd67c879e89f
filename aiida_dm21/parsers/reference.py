"""Parser of ``dm21.reference``: never raises on bad output, returns a named exit code instead.

Nothing is stored unless every number is finite: ``orm.Dict`` refuses NaN, and a NaN that reached an
``ArrayData`` would reach the training sets.  A result whose density, Hartree-Fock, CCSD or FCI step did
not converge ends in 400 with ``output_parameters`` only (no ``output_arrays``), so no dataset can use it.
When the runner's files are missing or truncated and the scheduler reported a problem (110, 120, 140...),
the scheduler's exit code is returned.
"""

from __future__ import annotations

import io
import json
import typing as t

import numpy as np
from aiida import orm
from aiida.common.exceptions import NotExistent
from aiida.engine import ExitCode

from aiida_dm21.parsers.common import NeverRaisingParser, first_non_finite, first_non_finite_array, scheduler_exit_code
from aiida_dm21.reference.constants import ARRAY_NAMES  # no PySCF
from aiida_dm21.runner.reference import ARRAYS_FILE, RESULTS_FILE, unconverged_steps

__all__ = ('REQUIRED_SCALARS', 'DM21ReferenceParser')

#: Numbers every result must have (what :meth:`IntegerResult.from_parts` reads), besides ``n_electrons``.
REQUIRED_SCALARS = (
    'e_ref',
    'e_density_method',
    'e_kinetic',
    'e_nuclear_attraction',
    'e_hartree',
    'e_nuclear_repulsion',
    'e_non_xc',
    'e_xc_target',
)


class DM21ReferenceParser(NeverRaisingParser):
    """``results.json`` -> ``output_parameters``, ``arrays.npz`` -> ``output_arrays`` (with spec and scalars)."""

    UNREADABLE = 'ERROR_UNREADABLE_RESULTS'

    def _read_payload(self, names: list[str]) -> dict[str, t.Any] | ExitCode:
        if RESULTS_FILE not in names:
            detail = f'{RESULTS_FILE} is not among the retrieved files ({", ".join(sorted(names)) or "none"})'
            return scheduler_exit_code(self) or self.exit_codes.ERROR_MISSING_RESULTS.format(detail=detail)
        try:
            payload = json.loads(self.retrieved.base.repository.get_object_content(RESULTS_FILE, mode='r'))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            return self._unreadable(f'{RESULTS_FILE}: {type(exc).__name__}: {exc}')
        if not isinstance(payload, dict):
            return self._unreadable(f'{RESULTS_FILE} is not a JSON object')
        return payload

    def _runner_error(self, error: t.Any) -> ExitCode:
        if not isinstance(error, dict):
            error = {'category': 'internal_error', 'message': str(error)}
        category, detail = str(error.get('category', 'internal_error')), str(error.get('message', error))
        if category == 'unsupported_input':
            return self.exit_codes.ERROR_UNSUPPORTED_INPUT.format(detail=detail)
        if category == 'unsupported_format':
            return self.exit_codes.ERROR_UNSUPPORTED_FORMAT_VERSION.format(detail=detail)
        scheduler = scheduler_exit_code(self)  # e.g. a MemoryError the scheduler also saw as out of memory
        return scheduler or self.exit_codes.ERROR_RUNNER_FAILED.format(category=category, detail=detail)

    def _read_arrays(self, names: list[str]) -> dict[str, np.ndarray] | ExitCode:
        if ARRAYS_FILE not in names:
            return self._unreadable(f'{ARRAYS_FILE} was not retrieved')
        try:
            raw = self.retrieved.base.repository.get_object_content(ARRAYS_FILE, mode='rb')
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                arrays = {name: np.asarray(data[name]) for name in ARRAY_NAMES}
        except (OSError, ValueError, KeyError, EOFError) as exc:
            return self._unreadable(f'{ARRAYS_FILE}: {type(exc).__name__}: {exc}')
        if any(array.dtype.kind not in 'fiu' for array in arrays.values()):
            return self._unreadable(f'{ARRAYS_FILE} holds non-numeric arrays')
        return arrays

    def _parse(self) -> ExitCode:
        try:
            retrieved = self.retrieved
        except NotExistent:
            return self.exit_codes.ERROR_NO_RETRIEVED_FOLDER
        names = retrieved.base.repository.list_object_names()
        payload = self._read_payload(names)
        if isinstance(payload, ExitCode):
            return payload
        if payload.get('error') is not None:
            return self._runner_error(payload['error'])

        scalars, spec = payload.get('scalars'), payload.get('spec')
        if not isinstance(scalars, dict) or not isinstance(spec, dict):
            return self._unreadable(f'{RESULTS_FILE} lacks the scalars or the spec')
        for key in (*REQUIRED_SCALARS, 'n_electrons', 'converged'):
            if key not in scalars:
                return self._unreadable(f'the scalar {key!r} is missing')
        for key in REQUIRED_SCALARS:
            value = scalars[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return self._unreadable(f'the scalar {key!r} is {value!r}, not a number')
        if first_non_finite(scalars['e_ref']):
            return self.exit_codes.ERROR_NAN_ENERGY
        parameters = {
            **scalars,
            'spec': spec,
            'wall_s': payload.get('wall_s'),
            'versions': payload.get('versions'),
            'threads': payload.get('threads'),
            'format_version': payload.get('format_version'),
        }
        bad = first_non_finite(parameters)
        if bad:
            return self.exit_codes.ERROR_NON_FINITE_VALUE.format(key=bad)
        not_converged = unconverged_steps(scalars)
        if not_converged:
            self.out('output_parameters', orm.Dict(parameters))
            return self.exit_codes.ERROR_REFERENCE_NOT_CONVERGED.format(steps=', '.join(not_converged))

        arrays = self._read_arrays(names)
        if isinstance(arrays, ExitCode):
            return arrays
        bad_array = first_non_finite_array(arrays)
        if bad_array:
            return self.exit_codes.ERROR_NON_FINITE_VALUE.format(key=f'{ARRAYS_FILE}:{bad_array}')

        node = orm.ArrayData()
        for key, value in arrays.items():
            node.set_array(key, value)
        node.base.attributes.set('spec', spec)
        node.base.attributes.set('scalars', scalars)
        output_parameters = orm.Dict(parameters)
        self.out('output_arrays', node)
        self.out('output_parameters', output_parameters)
        return ExitCode(0)
