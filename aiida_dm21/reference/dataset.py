"""The dataset file: training systems in one ``.npz`` (no pickle) with a JSON description inside."""

from __future__ import annotations

import hashlib
import json
import numbers
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .system import TrainingSystem  # not .fractional: reading a dataset needs no PySCF

__all__ = ['DATASET_FORMAT', 'DatasetError', 'dataset_summary', 'load_dataset', 'save_dataset']

DATASET_FORMAT = 'aiida-dm21-dataset'
DATASET_VERSION = 1
_ARRAYS = ('dm', 'no_coeff', 'no_occ', 'no_energy', 'h_core_j')


class DatasetError(ValueError):
    """A dataset file is missing, corrupt or not a dataset."""


def _checksum(systems: Sequence[TrainingSystem]) -> str:
    digest = hashlib.sha256()
    for system in systems:
        digest.update(json.dumps(system.scalars(), sort_keys=True).encode())
        for name in _ARRAYS:
            digest.update(np.ascontiguousarray(getattr(system, name), dtype=np.float64).tobytes())
    return digest.hexdigest()


def dataset_summary(systems: Sequence[TrainingSystem]) -> dict:
    """What a dataset node shows as attributes."""
    elements = set()
    for system in systems:
        for part in system.atom.replace('\n', ';').split(';'):
            if part.strip():
                elements.add(part.split()[0])
    kinds: dict[str, int] = {}
    for system in systems:
        kinds[system.kind] = kinds.get(system.kind, 0) + 1
    return {
        'n_systems': len(systems),
        'kinds': kinds,
        'elements': sorted(elements),
        'basis': sorted({s.basis for s in systems}),
        'labels': [s.label for s in systems],
        'checksum': _checksum(systems),
    }


def save_dataset(path: str | Path, systems: Sequence[TrainingSystem], metadata: dict | None = None) -> dict:
    """Write the systems to ``path`` (.npz); returns the description stored in it."""
    if not systems:
        raise DatasetError('a dataset needs at least one system')
    check_finite_systems(systems, f'refusing to write {path}')
    meta = {'format': DATASET_FORMAT, 'format_version': DATASET_VERSION, **(metadata or {})}
    meta.update(dataset_summary(systems))
    meta['systems'] = [s.scalars() for s in systems]
    arrays = {f's{i}_{name}': getattr(s, name) for i, s in enumerate(systems) for name in _ARRAYS}
    arrays['meta'] = np.array(json.dumps(meta, sort_keys=True))
    path = Path(path)
    with path.open('wb') as handle:
        np.savez_compressed(handle, **arrays)
    return meta


def load_dataset(path: str | Path) -> tuple[list[TrainingSystem], dict]:
    """Systems and description of a dataset file, checked against its checksum."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f'dataset file {path} does not exist')
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data['meta']))
            arrays = {k: data[k] for k in data.files if k != 'meta'}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f'{path} is not a readable dataset file: {exc}') from exc
    if (
        not isinstance(meta, dict)
        or meta.get('format') != DATASET_FORMAT
        or meta.get('format_version') != DATASET_VERSION
    ):
        raise DatasetError(f'{path}: not an {DATASET_FORMAT} v{DATASET_VERSION} file')
    if not isinstance(meta.get('systems'), list):
        raise DatasetError(f'{path}: the description lists no systems')
    systems = []
    for i, scalars in enumerate(meta['systems']):
        try:
            values = dict(scalars)
            values['sources'] = tuple(values['sources'])
        except (TypeError, ValueError, KeyError) as exc:
            raise DatasetError(f'{path}: system {i} has a malformed description: {exc}') from exc
        try:
            values.update({name: arrays[f's{i}_{name}'] for name in _ARRAYS})
        except KeyError as exc:
            raise DatasetError(f'{path}: system {i} lacks array {exc}') from exc
        try:
            systems.append(TrainingSystem(**values))
        except TypeError as exc:
            raise DatasetError(f'{path}: system {i} has a malformed description: {exc}') from exc
    if _checksum(systems) != meta.get('checksum'):
        raise DatasetError(f'{path}: content does not match its checksum (corrupt or edited)')
    check_finite_systems(systems, str(path))
    return systems, meta


def check_finite_systems(systems: Sequence[TrainingSystem], origin: str) -> None:
    """Refuse systems with a NaN or infinite energy or array entry (training on them makes every weight NaN).

    :raises DatasetError: naming the first such system and field.
    """
    for system in systems:
        for name in ('delta', 'n_electrons', 'e_ref', 'e_non_xc', 'e_xc_target'):
            value = getattr(system, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
                raise DatasetError(f'{origin}: system {system.label!r} has a non-finite {name} ({value!r})')
        for name in _ARRAYS:
            array = np.asarray(getattr(system, name))
            if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
                raise DatasetError(f'{origin}: system {system.label!r} has NaN or infinite values in {name}')
