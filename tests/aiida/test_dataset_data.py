"""The ``dm21.dataset`` data type: its caching hash is its content checksum (aiida-core's current hashing API)."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip('aiida.engine')

from aiida_dm21.data.dataset import DM21DatasetData
from aiida_dm21.reference.dataset import save_dataset
from aiida_dm21.reference.fractional import integer_system
from aiida_dm21.reference.integer import IntegerSpec, run_integer_system

pytestmark = pytest.mark.aiida


@pytest.fixture(scope='module')
def hydrogen_atom():
    """A real one-electron reference calculation (H, STO-3G, FCI = HF), as a training system."""
    spec = IntegerSpec(atom='H 0 0 0', basis='sto-3g', spin=1, reference_method='fci', label='H')
    return integer_system(run_integer_system(spec))


def _dataset(tmp_path, systems, name: str, filename: str) -> DM21DatasetData:
    path = tmp_path / name
    save_dataset(path, systems, {'reference_method': 'fci'})
    return DM21DatasetData(file=str(path), filename=filename)


def test_same_checksum_same_hash(tmp_path, hydrogen_atom):
    a = _dataset(tmp_path, [hydrogen_atom], 'a.npz', 'first.npz')
    b = _dataset(tmp_path, [hydrogen_atom], 'b.npz', 'second.npz')  # same systems, another file name
    assert a.checksum == b.checksum
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no deprecated hashing hook may be involved
        hash_a, hash_b = a.base.caching._compute_hash(), b.base.caching._compute_hash()
    assert hash_a is not None and hash_a == hash_b
    objects = a.base.caching.get_objects_to_hash()
    assert objects['checksum'] == a.checksum
    assert 'first.npz' not in str(objects)
    a.store()
    b.store()
    assert a.base.caching.get_hash() == b.base.caching.get_hash() == hash_a


def test_different_checksum_different_hash(tmp_path, hydrogen_atom):
    import dataclasses

    relabelled = dataclasses.replace(hydrogen_atom, label='H-again')
    a = _dataset(tmp_path, [hydrogen_atom], 'a.npz', 'same.npz')
    b = _dataset(tmp_path, [relabelled], 'b.npz', 'same.npz')
    assert a.checksum != b.checksum
    assert a.base.caching._compute_hash() != b.base.caching._compute_hash()
