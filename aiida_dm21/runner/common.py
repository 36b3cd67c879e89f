"""What the compute-node programs share: package versions, thread counts from the scheduler, the input format check,
atomic JSON files (no AiiDA)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = (
    'INPUT_FORMAT_VERSION',
    'THREAD_VARIABLES',
    'InputFileError',
    'ThreadCountError',
    'apply_thread_count',
    'check_format_version',
    'package_versions',
    'read_json_object',
    'thread_count',
    'thread_summary',
    'write_json',
)

#: Version of the ``input.json`` / ``config.json`` layout the CalcJobs write and these runners read.
INPUT_FORMAT_VERSION = 1

_DISTRIBUTIONS = {'numpy': 'numpy', 'pyscf': 'pyscf', 'torch': 'torch'}


def package_versions() -> dict[str, str]:
    """Versions of python, numpy, pyscf, torch and aiida-dm21 on this machine (``'unknown'`` when not found).

    A package that is already imported reports its ``__version__``; otherwise the installed distribution's
    metadata is read, so that recording a version never imports PyTorch into a PySCF-only job.
    """
    import aiida_dm21

    found = {'python': platform.python_version(), 'aiida_dm21': aiida_dm21.__version__}
    for module, distribution in _DISTRIBUTIONS.items():
        try:
            loaded = sys.modules.get(module)
            found[module] = str(loaded.__version__) if loaded is not None else importlib.metadata.version(distribution)
        except Exception:  # a version is information, never a reason to fail
            found[module] = 'unknown'
    return found


#: Where the thread count comes from, first found first: Slurm, PBS/Torque (``PBS_NUM_PPN``), PBS Pro (``NCPUS``),
#: then whatever the job script exported as ``OMP_NUM_THREADS``.
THREAD_VARIABLES: tuple[str, ...] = ('SLURM_CPUS_PER_TASK', 'PBS_NUM_PPN', 'NCPUS', 'OMP_NUM_THREADS')

#: The libraries :func:`apply_thread_count` sets, in this order.  ``blas``: the BLAS pools numpy and scipy load
#: (their own OpenBLAS builds, each with a thread pool sized to every CPU of the node, not to the job), set with
#: threadpoolctl.
THREAD_LIBRARIES: tuple[str, ...] = ('torch', 'numba', 'pyscf', 'blas')


class ThreadCountError(ValueError):
    """A scheduler variable that should give the thread count is not a positive integer."""


def available_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask; the CPU count where there is no such call)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def thread_count(environ: Mapping[str, str] | None = None, processes: int = 1) -> dict[str, Any]:
    """The thread count the scheduler granted: ``{"count", "source", "granted", "available", "processes"}``.

    The first variable of :data:`THREAD_VARIABLES` that is set (and not empty) decides; ``OMP_NUM_THREADS`` may
    be an OpenMP list (``"8,2"``), whose first level counts.  ``count`` is that number, but never more than the
    CPUs this process may use (``available``; ``granted`` keeps the asked number), shared out between the
    ``processes`` of the job on this node (data-parallel training: ``torchrun``'s ``LOCAL_WORLD_SIZE``), at
    least 1 each.  With none set, ``count`` is ``None`` and ``source`` is ``"default"``: the libraries keep
    their own defaults.

    :raises ThreadCountError: the deciding variable is not a positive integer (``abc``, ``0``, ``-2``, ``2.5``):
        the job asked for something, and guessing what would silently over- or under-use the node.
    """
    environ = os.environ if environ is None else environ
    available = available_cpus()
    for name in THREAD_VARIABLES:
        raw = environ.get(name, '').strip()
        if not raw:
            continue
        text = raw.split(',')[0].strip() if name == 'OMP_NUM_THREADS' else raw
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            raise ThreadCountError(
                f'the job environment sets {name}={environ[name]!r}, which is not a positive integer number of '
                'threads: fix the scheduler resources or the job script (prepend_text), or unset it'
            )
        granted = int(text)
        count = max(1, min(granted, available) // max(1, processes))
        return {
            'count': count,
            'source': name,
            'granted': granted,
            'available': available,
            'processes': processes,
        }
    return {'count': None, 'source': 'default', 'granted': None, 'available': available, 'processes': processes}


def _limit_blas(count: int | None) -> int | None:
    """Set the BLAS pools that numpy and scipy loaded to ``count`` threads (threadpoolctl); the largest pool after.

    ``None`` where threadpoolctl cannot be imported or no BLAS library is loaded.  The limit holds for the rest of
    the process (threadpoolctl restores only when used as a context manager).
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # a dependency, but the runners must still run where it is missing
        return None
    import numpy  # noqa: F401  (load the BLAS libraries, so that threadpoolctl finds them)
    import scipy.linalg  # noqa: F401

    controller = ThreadpoolController()
    if count is not None:
        controller.limit(limits=count, user_api='blas')
    pools = [int(info['num_threads']) for info in controller.select(user_api='blas').info()]
    return max(pools) if pools else None


def apply_thread_count(
    libraries: Sequence[str] = THREAD_LIBRARIES, environ: Mapping[str, str] | None = None, processes: int = 1
) -> dict[str, Any]:
    """Set the threads of ``libraries`` (``torch``, ``numba``, ``pyscf``, ``blas``) to what the scheduler granted.

    Returns :func:`thread_count`'s record with ``libraries``: every library's thread count after the call (its
    default when nothing was granted), for the runner's output files.  ``torch`` and ``pyscf`` are imported
    when named; ``numba`` only if it can be imported (the kernels run without it), and never above its own
    ``NUMBA_NUM_THREADS`` ceiling (numba refuses more).

    :raises ThreadCountError: see :func:`thread_count`.
    """
    record = thread_count(environ, processes)
    count = record['count']
    found: dict[str, int | None] = {}
    for library in libraries:
        if library == 'torch':
            import torch

            if count is not None:
                torch.set_num_threads(count)
            found['torch'] = int(torch.get_num_threads())
        elif library == 'numba':
            try:
                import numba
            except ImportError:
                found['numba'] = None
                continue
            if count is not None:
                numba.set_num_threads(min(count, int(numba.config.NUMBA_NUM_THREADS)))
            found['numba'] = int(numba.get_num_threads())
        elif library == 'pyscf':
            from pyscf import lib

            found['pyscf'] = int(lib.num_threads(count) if count is not None else lib.num_threads())
        elif library == 'blas':
            found['blas'] = _limit_blas(count)
        else:
            raise ValueError(f'unknown library {library!r}: expected some of {", ".join(THREAD_LIBRARIES)}')
    record['libraries'] = found
    return record


def thread_summary(record: Mapping[str, Any]) -> str:
    """One line for the job's log: how many threads, from where, and each library's count."""
    libraries = ', '.join(f'{name} {value}' for name, value in record.get('libraries', {}).items())
    if record['count'] is None:
        origin = f'no scheduler variable set ({", ".join(THREAD_VARIABLES)}): library defaults'
    else:
        origin = f'{record["source"]}={record["granted"]}'
        if record['granted'] > record['available']:
            origin += f', capped to the {record["available"]} CPUs of this process'
        if record.get('processes', 1) > 1:
            origin += f', shared by {record["processes"]} processes: {record["count"]} each'
    return f'threads: {origin}' + (f' ({libraries})' if libraries else '')


class InputFileError(ValueError):
    """The input file of a runner is missing, not JSON, or not a JSON object."""


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; :class:`InputFileError` saying why when there is none."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputFileError(f'input file {path} does not exist') from exc
    except (OSError, ValueError) as exc:
        raise InputFileError(f'input file {path} is not valid JSON: {exc}') from exc
    if not isinstance(data, dict):
        raise InputFileError(f'input file {path} must hold a JSON object')
    return data


def check_format_version(data: dict[str, Any], name: str) -> str | None:
    """``None`` when ``data['format_version']`` is the one this package reads, else the reason to refuse ``name``."""
    found = data.get('format_version')
    if isinstance(found, int) and not isinstance(found, bool) and found == INPUT_FORMAT_VERSION:
        return None
    import aiida_dm21

    return (
        f'{name} has format_version {found!r}; aiida-dm21 {aiida_dm21.__version__} on this machine reads '
        f'format_version {INPUT_FORMAT_VERSION}: install the same aiida-dm21 version here and where the job was '
        'prepared'
    )


def write_json(path: Path, payload: dict[str, Any], *, allow_nan: bool = True) -> None:
    """Write ``payload`` to ``path`` through a temporary file, so that a killed job never leaves half a file."""
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=allow_nan))
    tmp.replace(path)
