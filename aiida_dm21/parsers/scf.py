"""Parser of ``dm21.scf`` jobs: ``results.json`` -> ``output_parameters``, ``density_matrix.npy`` -> ``output_density``.

It never raises on bad output: every missing, truncated or garbled file ends in a named exit code
(see :class:`~aiida_dm21.calculations.scf.DM21ScfCalculation`).  Unconverged runs (400) and runs the
runner stopped for the walltime (311) still get their outputs, so a restart can use the density.
"""

from __future__ import annotations

import io
import json
import math
import typing as t

import numpy as np
from aiida import orm
from aiida.common.exceptions import NotExistent
from aiida.engine import ExitCode
from aiida.parsers import Parser

from aiida_dm21.runner.scf import AU2EV, DENSITY_FILE, RESULTS_FILE

__all__ = ('DM21ScfParser',)

#: Keys copied from results.json into output_parameters (when present), besides the energy.
COPIED_KEYS: tuple[str, ...] = (
    'scf_type',
    'nao',
    'nelec',
    'functional',
    'dispersion',
    'e_disp',
    'mo_energy',
    'mo_occ',
    'homo',
    'lumo',
    'homo_lumo_gap',
    'homo_per_spin',
    'lumo_per_spin',
    'aufbau',
    'aufbau_violation',
    'smearing',
    'entropy',
    'e_free',
    'dipole',
    's2',
    's2_multiplicity',
    'guess',
    'timings',
    'versions',
    'threads',
    'restarted',
    'exit_status',
)


class InvalidResults(Exception):  # noqa: N818
    """results.json does not have the expected content."""


def _sanitize(value: t.Any, depth: int = 0) -> t.Any:
    """JSON-ish data that AiiDA can store: NaN/inf -> None, unknown objects -> str, bounded nesting."""
    if depth > 20:
        return None
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _sanitize(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_sanitize(v, depth + 1) for v in value]
    return str(value)


def _energy(value: t.Any) -> float | None:
    """The total energy as a finite float, ``None`` when NaN/inf/null; :class:`InvalidResults` when not a number."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidResults(f'e_tot is a boolean ({value!r})')
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError as exc:
            raise InvalidResults(f'e_tot is not a number ({value!r})') from exc
    if not isinstance(value, (int, float)):
        raise InvalidResults(f'e_tot is not a number ({type(value).__name__})')
    number = float(value)
    return number if math.isfinite(number) else None


def _ev(value: t.Any) -> float | None:
    return value * AU2EV if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class DM21ScfParser(Parser):
    """Turns the runner's files into ``output_parameters`` and ``output_density``."""

    def parse(self, **kwargs: t.Any) -> ExitCode:
        try:
            return self._parse()
        except Exception as exc:  # a parser must end with an exit code, never a traceback
            self.logger.exception('unexpected error while parsing')
            return self.exit_codes.ERROR_INVALID_RESULTS.format(detail=f'parser error {type(exc).__name__}: {exc}')

    # --- steps ----------------------------------------------------------------------------------------------

    def _scheduler_walltime(self) -> bool:
        walltime = self.exit_codes.ERROR_SCHEDULER_OUT_OF_WALLTIME.status
        return self.node.exit_status == walltime

    def _read_results(self) -> dict[str, t.Any] | ExitCode:
        names = self.retrieved.base.repository.list_object_names()
        if RESULTS_FILE not in names:
            if self._scheduler_walltime():
                return self.exit_codes.ERROR_OUT_OF_WALLTIME
            detail = f'{RESULTS_FILE} is not among the retrieved files ({", ".join(sorted(names)) or "none"})'
            return self.exit_codes.ERROR_MISSING_RESULTS.format(detail=detail)
        try:
            text = self.retrieved.base.repository.get_object_content(RESULTS_FILE, mode='r')
            results = json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            return self.exit_codes.ERROR_INVALID_RESULTS.format(detail=f'{type(exc).__name__}: {exc}')
        if not isinstance(results, dict):
            detail = f'expected a JSON object, found {type(results).__name__}'
            return self.exit_codes.ERROR_INVALID_RESULTS.format(detail=detail)
        return results

    def _read_density(self, nao: t.Any) -> np.ndarray | str:
        """The density matrix, or a string saying why there is none."""
        if DENSITY_FILE not in self.retrieved.base.repository.list_object_names():
            return f'{DENSITY_FILE} was not retrieved'
        try:
            content = self.retrieved.base.repository.get_object_content(DENSITY_FILE, mode='rb')
            array = np.load(io.BytesIO(content), allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            return f'{DENSITY_FILE} is not a readable .npy array ({type(exc).__name__}: {exc})'
        if not isinstance(array, np.ndarray) or array.dtype.kind not in 'fiu':
            return f'{DENSITY_FILE} does not hold a numeric array'
        shape = array.shape
        square = len(shape) == 2 and shape[0] == shape[1]
        spin_pair = len(shape) == 3 and shape[0] == 2 and shape[1] == shape[2]
        if not (square or spin_pair):
            return f'{DENSITY_FILE} has shape {shape}, expected (nao, nao) or (2, nao, nao)'
        if isinstance(nao, int) and not isinstance(nao, bool) and shape[-1] != nao:
            return f'{DENSITY_FILE} has shape {shape} but the basis has {nao} functions'
        if not np.all(np.isfinite(array)):
            return f'{DENSITY_FILE} contains NaN or infinite values'
        return array.astype(float)

    def _output_parameters(self, results: dict[str, t.Any], e_tot: float | None) -> dict[str, t.Any]:
        converged = results.get('converged')
        cycles = results.get('cycles')
        parameters: dict[str, t.Any] = {
            'e_tot': e_tot,
            'e_tot_ev': _ev(e_tot),
            'energy_units': 'Ha (e_tot), eV (e_tot_ev)',
            'converged': bool(converged) if isinstance(converged, bool) else False,
            'cycles': cycles if isinstance(cycles, int) and not isinstance(cycles, bool) else None,
        }
        for key in COPIED_KEYS:
            if key in results:
                parameters[key] = _sanitize(results[key])
        for key in ('homo', 'lumo', 'homo_lumo_gap'):
            if key in parameters:
                parameters[f'{key}_ev'] = _ev(parameters[key])
        if 'dipole' in parameters:
            parameters['dipole_units'] = 'Debye'
        if isinstance(results.get('error'), dict):
            parameters['error'] = _sanitize(results['error'])
        return parameters

    def _attach(self, parameters: dict[str, t.Any], density: np.ndarray | str) -> None:
        self.out('output_parameters', orm.Dict(parameters))
        if isinstance(density, np.ndarray):
            self.out('output_density', orm.ArrayData({'density_matrix': density}))

    def _parse(self) -> ExitCode:
        try:
            _ = self.retrieved
        except NotExistent:
            return self.exit_codes.ERROR_NO_RETRIEVED_FOLDER

        results = self._read_results()
        if isinstance(results, ExitCode):
            return results

        error = results.get('error')
        if error is not None:
            if not isinstance(error, dict):
                error = {'category': 'internal_error', 'message': str(error)}
            category = str(error.get('category', 'internal_error'))
            detail = str(error.get('message', 'no message'))
            if category == 'unsupported_input':
                return self.exit_codes.ERROR_UNSUPPORTED_INPUT.format(detail=detail)
            if category == 'checkpoint_unreadable':
                return self.exit_codes.ERROR_CHECKPOINT_UNREADABLE.format(detail=detail)
            if category == 'walltime':
                try:
                    e_tot = _energy(results.get('e_tot'))
                except InvalidResults:
                    e_tot = None
                density = self._read_density(results.get('nao'))
                self._attach(self._output_parameters(results, e_tot), density)
                cycles = results.get('cycles', '?')
                return self.exit_codes.ERROR_OUT_OF_WALLTIME_PARTIAL.format(cycles=cycles, detail=detail)
            return self.exit_codes.ERROR_RUNNER_FAILED.format(category=category, detail=detail)

        for key in ('e_tot', 'converged'):
            if key not in results:
                return self.exit_codes.ERROR_INVALID_RESULTS.format(detail=f'the field {key!r} is missing')
        if not isinstance(results['converged'], bool):
            detail = f'converged is {results["converged"]!r}, not a boolean'
            return self.exit_codes.ERROR_INVALID_RESULTS.format(detail=detail)
        try:
            e_tot = _energy(results['e_tot'])
        except InvalidResults as exc:
            return self.exit_codes.ERROR_INVALID_RESULTS.format(detail=str(exc))

        parameters = self._output_parameters(results, e_tot)
        if e_tot is None:
            self.out('output_parameters', orm.Dict(parameters))
            return self.exit_codes.ERROR_NAN_ENERGY

        density = self._read_density(results.get('nao'))
        if isinstance(density, str):
            return self.exit_codes.ERROR_MISSING_DENSITY.format(detail=density)
        self._attach(parameters, density)

        if not parameters['converged']:
            return self.exit_codes.ERROR_SCF_NOT_CONVERGED.format(cycles=parameters['cycles'])
        if parameters.get('aufbau') is False:
            violation = parameters.get('aufbau_violation')
            return self.exit_codes.ERROR_NOT_AUFBAU.format(
                violation=f'{violation:.4f}' if isinstance(violation, float) else '?'
            )
        return ExitCode(0)
