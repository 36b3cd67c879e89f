"""Compute-node runner of one integer-electron reference calculation: ``python -m aiida_dm21.runner.reference``.

No AiiDA import.  Reads ``input.json``: ``format_version`` (must be
:data:`~aiida_dm21.runner.common.INPUT_FORMAT_VERSION`), ``symbols``, ``positions`` in Angstrom, ``basis``,
``charge``, ``spin`` = 2S, ``density_method``, ``reference_method``, optional ``user_energy`` in Ha,
``label``, optional ``max_cycle``, ``cc_max_cycle`` and ``reference_basis`` (the basis of the reference energy
when not ``basis``); runs
:func:`aiida_dm21.reference.integer.run_integer_system` and writes ``arrays.npz``, then ``results.json``
(each through a temporary file: a present ``results.json`` means complete files).

``results.json`` always holds ``format_version``, ``versions`` (python, numpy, pyscf, torch, aiida_dm21),
``threads`` (PySCF's OpenMP threads, from the scheduler: :func:`~aiida_dm21.runner.common.apply_thread_count`;
``null`` when the job environment's count was refused) and ``error``: ``null``, or ``{"category", "message",
"type"}`` with a category of :data:`ERROR_CATEGORIES`.
After a calculation it also holds ``spec``, ``scalars`` (energies in Ha; ``converged`` and
``*_converged`` for every iterative step) and ``wall_s``.

With ``species`` (a list of ``{label, symbols, positions, charge, spin}``) instead of ``symbols`` and
``positions``, the job is a batch: :func:`run_batch`.

Exit status: 0 done and converged, 3 done but a step did not converge, 2 bad input or input format,
1 anything else.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any

from aiida_dm21.runner.common import (
    InputFileError,
    ThreadCountError,
    apply_thread_count,
    check_format_version,
    package_versions,
    read_json_object,
    thread_summary,
    write_json,
)

__all__ = (
    'ARRAYS_FILE',
    'ERROR_CATEGORIES',
    'RESULTS_FILE',
    'batch_arrays_file',
    'compute',
    'main',
    'run_batch',
    'unconverged_steps',
)

RESULTS_FILE = 'results.json'
ARRAYS_FILE = 'arrays.npz'
RESULTS_FORMAT_VERSION = 1

#: Error categories written to ``results.json["error"]["category"]``.
ERROR_CATEGORIES: dict[str, str] = {
    'unsupported_input': 'the input cannot be treated (bad input.json, element, charge/spin, method, a thread '
    'count of the job environment that is not a positive integer...)',
    'unsupported_format': 'input.json has a format_version this aiida-dm21 does not read',
    'internal_error': 'an unexpected error in the runner or in PySCF',
}

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_CONVERGED = 3


class RunnerError(Exception):
    """A failure with a category for ``results.json``."""

    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category
        self.message = message


def unconverged_steps(scalars: dict[str, Any]) -> list[str]:
    """The convergence flags (``converged``, ``ccsd_converged``...) of ``scalars`` that are not ``True``."""
    return [key for key, value in scalars.items() if (key == 'converged' or key.endswith('_converged')) and not value]


def read_input(path: Path) -> dict[str, Any]:
    """``input.json``, checked for its format version and the keys the runner needs."""
    try:
        data = read_json_object(path)
    except InputFileError as exc:
        raise RunnerError('unsupported_input', str(exc)) from exc
    problem = check_format_version(data, str(path.name))
    if problem:
        raise RunnerError('unsupported_format', problem)
    needed = ('basis',) if 'species' in data else ('symbols', 'positions', 'basis')
    missing = [key for key in needed if key not in data]
    if missing:
        raise RunnerError('unsupported_input', f'input file {path} lacks {", ".join(missing)}')
    for key in ('max_cycle', 'cc_max_cycle'):
        value = data.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RunnerError('unsupported_input', f'`{key}` must be a positive integer, got {value!r}')
    reference_basis = data.get('reference_basis')
    if reference_basis is not None and (not isinstance(reference_basis, str) or not reference_basis.strip()):
        raise RunnerError('unsupported_input', f'`reference_basis` must be a basis name, got {reference_basis!r}')
    return data


def _save_arrays(folder: Path, arrays: dict[str, Any], name: str = ARRAYS_FILE) -> None:
    import numpy as np

    tmp = folder / (name + '.tmp')
    with tmp.open('wb') as handle:
        np.savez(handle, **arrays)
    tmp.replace(folder / name)


def batch_arrays_file(index: int) -> str:
    """The arrays file of species ``index`` of a batch: ``arrays_0.npz``, ``arrays_1.npz``..."""
    return f'arrays_{index}.npz'


def compute(data: dict[str, Any]):
    """One species: ``symbols``, ``positions`` (Angstrom), ``basis``, ``charge``, ``spin`` = 2S, ``density_method``,
    ``reference_method``, ``reference_basis``, ``user_energy``, ``label``, ``max_cycle``, ``cc_max_cycle`` ->
    ``(IntegerSpec,
    IntegerResult)`` (:func:`aiida_dm21.reference.integer.run_integer_system`).

    :raises RunnerError: ``unsupported_input`` for a bad geometry, parameters or an input PySCF refuses.
    """
    from aiida_dm21.reference.integer import IntegerSpec, ReferenceInputError, run_integer_system

    try:
        atom = '; '.join(
            f'{s} {x:.10f} {y:.10f} {z:.10f}' for s, (x, y, z) in zip(data['symbols'], data['positions'], strict=True)
        )
        spec = IntegerSpec(
            atom=atom,
            basis=data['basis'],
            charge=int(data.get('charge', 0)),
            spin=int(data.get('spin', 0)),
            density_method=data.get('density_method', 'hf'),
            reference_method=data.get('reference_method', 'ccsd(t)'),
            user_energy=data.get('user_energy'),
            label=data.get('label', ''),
            max_cycle=int(data.get('max_cycle', 50)),
            cc_max_cycle=int(data.get('cc_max_cycle', 50)),
            reference_basis=data.get('reference_basis'),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RunnerError('unsupported_input', f'bad geometry or parameters: {exc}') from exc
    print(f'reference calculation {spec.label}: {spec.reference_method} on a {spec.density_method} density', flush=True)
    try:
        result = run_integer_system(spec)
    except ReferenceInputError as exc:
        raise RunnerError('unsupported_input', str(exc)) from exc
    return spec, result


def _error_entry(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, RunnerError):
        return {'category': exc.category, 'message': exc.message, 'type': 'RunnerError'}
    return {
        'category': 'internal_error',
        'message': f'{type(exc).__name__}: {exc}',
        'type': type(exc).__name__,
        'traceback': traceback.format_exc(limit=20),
    }


def run_batch(folder: Path, data: dict[str, Any], payload: dict[str, Any], start: float) -> int:
    """A batch: ``data['species']`` is a list of ``{label, symbols, positions, charge, spin}``, the other keys are
    common to all.  Every species is computed in turn; a failure of one is recorded in its own entry
    (``error``) and the next one runs.  ``results.json`` is rewritten after each species (a job cut by the
    walltime keeps the finished ones) and holds ``species``: a list, in input order, of ``{index, label,
    error, exit_status, wall_s}`` plus ``spec`` and ``scalars`` after a calculation; the arrays of species
    ``i`` are in ``arrays_<i>.npz``.

    Exit status: 0 all converged, 3 none failed but some did not converge, 1 some failed.
    """
    species = data['species']
    if not isinstance(species, list) or not species or not all(isinstance(item, dict) for item in species):
        raise RunnerError('unsupported_input', '`species` must be a non-empty list of objects')
    common = {key: value for key, value in data.items() if key not in ('species', 'format_version')}
    payload['species'] = []
    statuses = []
    for index, item in enumerate(species):
        begin = time.perf_counter()
        entry: dict[str, Any] = {'index': index, 'label': item.get('label', ''), 'error': None}
        try:
            spec, result = compute({**common, **item})
            _save_arrays(folder, result.arrays(), batch_arrays_file(index))
            entry['spec'] = spec.to_dict()
            entry['scalars'] = result.scalars()
            entry['exit_status'] = EXIT_NOT_CONVERGED if unconverged_steps(entry['scalars']) else EXIT_OK
        except Exception as exc:  # one species failing must not stop the others
            entry['error'] = _error_entry(exc)
            entry['exit_status'] = EXIT_BAD_INPUT if isinstance(exc, RunnerError) else EXIT_FAILED
            print(f'species {entry["label"]}: {entry["error"]["category"]}: {entry["error"]["message"]}', flush=True)
        entry['wall_s'] = time.perf_counter() - begin
        payload['species'].append(entry)
        statuses.append(entry['exit_status'])
        payload['wall_s'] = time.perf_counter() - start
        write_json(folder / RESULTS_FILE, payload)
    status = EXIT_OK
    if any(s in (EXIT_FAILED, EXIT_BAD_INPUT) for s in statuses):
        status = EXIT_FAILED
    elif EXIT_NOT_CONVERGED in statuses:
        status = EXIT_NOT_CONVERGED
    payload['exit_status'] = status
    write_json(folder / RESULTS_FILE, payload)
    return status


def run(path: Path) -> int:
    """Run the calculation described by ``path``; write the result files next to it; return the exit status."""
    folder = path.parent
    start = time.perf_counter()
    payload: dict[str, Any] = {
        'format_version': RESULTS_FORMAT_VERSION,
        'error': None,
        'versions': package_versions(),
        'threads': None,
    }
    status = EXIT_FAILED
    try:
        try:  # PySCF only: a reference job never imports PyTorch
            payload['threads'] = apply_thread_count(('pyscf', 'blas'))
        except ThreadCountError as exc:
            raise RunnerError('unsupported_input', str(exc)) from exc
        print(thread_summary(payload['threads']), flush=True)
        data = read_input(path)
        if 'species' in data:
            return run_batch(folder, data, payload, start)
        spec, result = compute(data)
        _save_arrays(folder, result.arrays())
        payload['spec'] = spec.to_dict()
        payload['scalars'] = result.scalars()
        not_converged = unconverged_steps(payload['scalars'])
        status = EXIT_NOT_CONVERGED if not_converged else EXIT_OK
        print(f'E_ref = {result.e_ref:.10f} Ha, E_xc target = {result.e_xc_target:.10f} Ha', flush=True)
        if not_converged:
            print(f'not converged: {", ".join(not_converged)}', file=sys.stderr, flush=True)
    except RunnerError as exc:
        payload['error'] = {'category': exc.category, 'message': exc.message, 'type': 'RunnerError'}
        status = EXIT_BAD_INPUT
    except Exception as exc:  # every failure ends in a categorised results.json
        payload['error'] = {
            'category': 'internal_error',
            'message': f'{type(exc).__name__}: {exc}',
            'type': type(exc).__name__,
            'traceback': traceback.format_exc(limit=20),
        }
        status = EXIT_FAILED
    payload['wall_s'] = time.perf_counter() - start
    payload['exit_status'] = status
    write_json(folder / RESULTS_FILE, payload)
    if payload['error'] is not None:
        print(f'aiida-dm21 reference runner: {payload["error"]["category"]}: {payload["error"]["message"]}')
    return status


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python -m aiida_dm21.runner.reference [input.json]``."""
    argv = sys.argv[1:] if argv is None else argv
    return run(Path(argv[0] if argv else 'input.json'))


if __name__ == '__main__':
    sys.exit(main())
