"""Parser of ``dm21.reference``: never raises on bad output, returns a named exit code instead.

Nothing is stored unless every number is finite: ``orm.Dict`` refuses NaN, and a NaN that reached an
``ArrayData`` would reach the training sets.  A result whose density, Hartree-Fock, CCSD or FCI step did
not converge ends in 400 with ``output_parameters`` only (no ``output_arrays``), so no dataset can use it.
When the runner's files are missing or truncated and the scheduler reported a problem (110, 120, 140...),
the scheduler's exit code is returned.

A batch (``results.json`` with a ``species`` list) is parsed species by species with the same checks: each
converged, finite species gets ``species.<key>.output_parameters`` and ``species.<key>.output_arrays``, a
species that did not converge ``output_parameters`` only, a failed or malformed one nothing; every one
gets its entry in ``species_status``.  The job ends in 0 when all converged, in 430 listing the others
otherwise (the scheduler's code when it reported one and species are missing).
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
from aiida_dm21.runner.reference import ARRAYS_FILE, RESULTS_FILE, batch_arrays_file, unconverged_steps

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

    def __init__(self, node: orm.CalcJobNode) -> None:
        super().__init__(node)
        self._retrieved: orm.FolderData | None = None
        self._raw: dict[str, bytes] = {}  # files of a batch read ahead in one pass (see _prefetch)

    def _retrieved_node(self) -> orm.FolderData:
        """``self.retrieved``, looked up once (each ``self.retrieved`` is a link query)."""
        if self._retrieved is None:
            self._retrieved = self.retrieved
        return self._retrieved

    def _prefetch(self, names: list[str]) -> None:
        """Read the batch's array files of ``names`` in one pass of the object store (best effort)."""
        from aiida_dm21.data.objects import read_objects

        wanted = [name for name in names if name.startswith('arrays_') and name.endswith('.npz')]
        folder = self._retrieved_node()
        try:
            self._raw = dict(zip(wanted, read_objects([(folder, name) for name in wanted]), strict=True))
        except (OSError, ValueError, KeyError):
            self._raw = {}  # each file is read (and its problem reported) on its own

    def _read_payload(self, names: list[str]) -> dict[str, t.Any] | ExitCode:
        if RESULTS_FILE not in names:
            detail = f'{RESULTS_FILE} is not among the retrieved files ({", ".join(sorted(names)) or "none"})'
            return scheduler_exit_code(self) or self.exit_codes.ERROR_MISSING_RESULTS.format(detail=detail)
        try:
            payload = json.loads(self._retrieved_node().base.repository.get_object_content(RESULTS_FILE, mode='r'))
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

    def _load_arrays(self, names: list[str], name: str) -> dict[str, np.ndarray] | str:
        """The arrays of ``name``, or why they cannot be read."""
        if name not in names:
            return f'{name} was not retrieved'
        try:
            raw = self._raw.pop(name, None)
            if raw is None:
                raw = self._retrieved_node().base.repository.get_object_content(name, mode='rb')
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                arrays = {key: np.asarray(data[key]) for key in ARRAY_NAMES}
        except (OSError, ValueError, KeyError, EOFError) as exc:
            return f'{name}: {type(exc).__name__}: {exc}'
        if any(array.dtype.kind not in 'fiu' for array in arrays.values()):
            return f'{name} holds non-numeric arrays'
        return arrays

    def _read_arrays(self, names: list[str]) -> dict[str, np.ndarray] | ExitCode:
        arrays = self._load_arrays(names, ARRAYS_FILE)
        return self._unreadable(arrays) if isinstance(arrays, str) else arrays

    @staticmethod
    def _scalars_problem(scalars: t.Any, spec: t.Any) -> str | None:
        if not isinstance(scalars, dict) or not isinstance(spec, dict):
            return 'lacks the scalars or the spec'
        for key in (*REQUIRED_SCALARS, 'n_electrons', 'converged'):
            if key not in scalars:
                return f'the scalar {key!r} is missing'
        for key in REQUIRED_SCALARS:
            value = scalars[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f'the scalar {key!r} is {value!r}, not a number'
        return None

    def _expected_species(self) -> list[dict[str, t.Any]] | None:
        try:
            return self.node.inputs.species.get_list()
        except (AttributeError, NotExistent):
            return None

    def _parse_species(
        self, entry: t.Any, names: list[str], payload: dict[str, t.Any]
    ) -> tuple[dict[str, t.Any], dict[str, orm.Data]]:
        """One species of a batch -> its status entry and its output nodes (never raises on bad content)."""
        if not isinstance(entry, dict):
            return {'status': 'failed', 'category': 'unreadable', 'message': f'not an object: {entry!r:.200}'}, {}
        error = entry.get('error')
        if error is not None:
            if not isinstance(error, dict):
                error = {'category': 'internal_error', 'message': str(error)}
            category = str(error.get('category', 'internal_error'))
            return {'status': 'failed', 'category': category, 'message': str(error.get('message', error))}, {}
        scalars, spec = entry.get('scalars'), entry.get('spec')
        problem = self._scalars_problem(scalars, spec)
        if problem:
            return {'status': 'failed', 'category': 'unreadable', 'message': f'{RESULTS_FILE}: {problem}'}, {}
        if first_non_finite(scalars['e_ref']):
            return {
                'status': 'failed',
                'category': 'non_finite',
                'message': 'the reference energy is NaN or infinite',
            }, {}
        parameters = {
            **scalars,
            'spec': spec,
            'wall_s': entry.get('wall_s'),
            'versions': payload.get('versions'),
            'threads': payload.get('threads'),
            'format_version': payload.get('format_version'),
        }
        bad = first_non_finite(parameters)
        if bad:
            return {'status': 'failed', 'category': 'non_finite', 'message': f'`{bad}` is NaN or infinite'}, {}
        not_converged = unconverged_steps(scalars)
        if not_converged:
            message = f'not converged: {", ".join(not_converged)}'
            status = {'status': 'not_converged', 'category': 'not_converged', 'message': message}
            return status, {'output_parameters': orm.Dict(parameters)}
        index = entry.get('index')
        if isinstance(index, bool) or not isinstance(index, int):
            return {'status': 'failed', 'category': 'unreadable', 'message': f'bad species index {index!r}'}, {}
        name = batch_arrays_file(index)
        arrays = self._load_arrays(names, name)
        if isinstance(arrays, str):
            return {'status': 'failed', 'category': 'unreadable', 'message': arrays}, {}
        bad_array = first_non_finite_array(arrays)
        if bad_array:
            message = f'`{name}:{bad_array}` is NaN or infinite'
            return {'status': 'failed', 'category': 'non_finite', 'message': message}, {}
        node = orm.ArrayData()
        for key, value in arrays.items():
            node.set_array(key, value)
        node.base.attributes.set('spec', spec)
        node.base.attributes.set('scalars', scalars)
        status = {'status': 'converged', 'category': None, 'message': ''}
        return status, {'output_parameters': orm.Dict(parameters), 'output_arrays': node}

    def _parse_batch(self, payload: dict[str, t.Any], names: list[str]) -> ExitCode:
        from aiida_dm21.calculations.reference import link_label

        entries = payload['species']
        if not isinstance(entries, list):
            return self._unreadable(f'{RESULTS_FILE}: `species` is not a list')
        self._prefetch(names)
        expected = self._expected_species()
        labels = [item['label'] for item in expected] if expected else []
        for entry in entries:
            label = entry.get('label') if isinstance(entry, dict) else None
            if isinstance(label, str) and label not in labels:
                labels.append(label)
        found = {entry['label']: entry for entry in entries if isinstance(entry, dict) and 'label' in entry}
        statuses: dict[str, dict[str, t.Any]] = {}
        missing = []
        for label in labels:
            key = link_label(label)
            if label in found:
                status, outputs = self._parse_species(found[label], names, payload)
            else:
                missing.append(label)
                status, outputs = {'status': 'failed', 'category': 'missing', 'message': 'the job ended first'}, {}
            statuses[key] = {'label': label, **status}
            for name, node in outputs.items():
                self.out(f'species.{key}.{name}', node)
        self.out('species_status', orm.Dict(statuses))
        bad = [
            f'{s["label"]} ({s["category"]}: {s["message"]})' for s in statuses.values() if s['status'] != 'converged'
        ]
        if missing:
            scheduler = scheduler_exit_code(self)
            if scheduler is not None:
                return scheduler
        if bad:
            return self.exit_codes.ERROR_SPECIES_FAILED.format(labels='; '.join(bad))
        return ExitCode(0)

    def _parse(self) -> ExitCode:
        try:
            retrieved = self._retrieved_node()
        except NotExistent:
            return self.exit_codes.ERROR_NO_RETRIEVED_FOLDER
        names = retrieved.base.repository.list_object_names()
        payload = self._read_payload(names)
        if isinstance(payload, ExitCode):
            return payload
        if payload.get('error') is not None:
            return self._runner_error(payload['error'])
        if 'species' in payload:
            return self._parse_batch(payload, names)

        scalars, spec = payload.get('scalars'), payload.get('spec')
        problem = self._scalars_problem(scalars, spec)
        if problem:
            return self._unreadable(f'{RESULTS_FILE} {problem}' if problem.startswith('lacks') else problem)
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
