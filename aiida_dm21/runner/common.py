"""What the compute-node programs share: package versions, the input format check, atomic JSON files (no AiiDA)."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any

__all__ = (
    'INPUT_FORMAT_VERSION',
    'InputFileError',
    'check_format_version',
    'package_versions',
    'read_json_object',
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
