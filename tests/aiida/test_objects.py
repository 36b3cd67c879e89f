"""``aiida_dm21.data.objects``: many repository files read in one object-store pass give what one-by-one reads give."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip('aiida.engine')

from aiida import orm

from aiida_dm21.data.objects import read_arrays, read_objects

pytestmark = pytest.mark.aiida


def _arrays(seed: int) -> orm.ArrayData:
    rng = np.random.default_rng(seed)
    node = orm.ArrayData()
    node.set_array('a', rng.normal(size=(3, 4)))
    node.set_array('b', np.arange(seed + 2))
    return node


def test_read_arrays_matches_get_array_stored_and_not():
    stored = [_arrays(i).store() for i in range(3)]
    same = _arrays(0).store()  # identical content: one object-store key shared by two nodes
    fresh = _arrays(7)  # not stored: read the ordinary way
    nodes = [*stored, same, fresh]
    result = read_arrays(nodes, ['a', 'b'])
    assert len(result) == len(nodes)
    for node, arrays in zip(nodes, result, strict=True):
        assert set(arrays) == {'a', 'b'}
        for name in ('a', 'b'):
            np.testing.assert_array_equal(arrays[name], node.get_array(name))


def test_read_objects_keeps_the_order_and_refuses_a_missing_array():
    folder = orm.FolderData()
    folder.base.repository.put_object_from_bytes(b'one', 'x.txt')
    folder.base.repository.put_object_from_bytes(b'two', 'y.txt')
    folder.store()
    assert read_objects([(folder, 'y.txt'), (folder, 'x.txt'), (folder, 'y.txt')]) == [b'two', b'one', b'two']
    assert read_objects([]) == []
    with pytest.raises(KeyError, match='`c`'):
        read_arrays([_arrays(1).store()], ['a', 'c'])
    with pytest.raises(FileNotFoundError):
        read_objects([(folder, 'z.txt')])
