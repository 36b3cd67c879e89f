"""Reading many files of stored nodes' repositories in one pass of the object store.

``node.base.repository.get_object_content`` (and ``ArrayData.get_array``) look every object up in the object store
on its own, about 10 ms each on a SQLite profile; a batch of hundreds of species reads thousands of them.
:func:`read_objects` asks the storage backend for all of them at once (``iter_object_streams``).
"""

from __future__ import annotations

import io
import typing as t

import numpy as np
from aiida import orm
from aiida.manage import get_manager

__all__ = ('read_arrays', 'read_objects')


def read_objects(requests: t.Sequence[tuple[orm.Node, str]]) -> list[bytes]:
    """The content of every (node, file name) of ``requests``, in their order.

    :raises FileNotFoundError: if a node has no such file.
    """
    out: list[bytes | None] = [None] * len(requests)
    keys: dict[int, str] = {}
    for i, (node, name) in enumerate(requests):
        key = node.base.repository.get_object(name).key if node.is_stored else None
        if key is None:  # not stored yet (no object-store key): read it the ordinary way
            out[i] = node.base.repository.get_object_content(name, mode='rb')
        else:
            keys[i] = key
    if keys:
        backend = get_manager().get_profile_storage().get_repository()
        content = {key: stream.read() for key, stream in backend.iter_object_streams(set(keys.values()))}
        for i, key in keys.items():
            out[i] = content[key]
    return t.cast(list[bytes], out)


def read_arrays(nodes: t.Sequence[orm.ArrayData], names: t.Sequence[str]) -> list[dict[str, np.ndarray]]:
    """The arrays ``names`` of every ``ArrayData`` of ``nodes``, in their order (one object-store pass).

    :raises KeyError: if a node lacks one of the arrays.
    """
    for node in nodes:
        stored = node.base.repository.list_object_names()
        missing = [name for name in names if f'{name}.npy' not in stored]
        if missing:
            raise KeyError(f'Array with name `{missing[0]}` not found in ArrayData<{node.pk}>')
    raw = iter(read_objects([(node, f'{name}.npy') for node in nodes for name in names]))
    return [{name: np.load(io.BytesIO(next(raw)), allow_pickle=False) for name in names} for _ in nodes]
