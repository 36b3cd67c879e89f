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


# --- export: the .npz back out, checked ---------------------------------------------------------------------------


def test_export_writes_the_stored_file_and_it_loads(tmp_path, hydrogen_atom):
    from aiida_dm21.reference.dataset import load_dataset

    node = _dataset(tmp_path, [hydrogen_atom], 'a.npz', 'dataset.npz').store()
    target = tmp_path / 'out' / 'copy.npz'
    target.parent.mkdir()
    assert node.export(target) == [str(target)]
    assert target.read_bytes() == node.get_content(mode='rb')
    systems, meta = load_dataset(target)
    assert meta['checksum'] == node.checksum and [s.label for s in systems] == ['H']
    with pytest.raises(OSError, match='already found'):
        node.export(target)
    node.export(target, overwrite=True)


@pytest.mark.parametrize('damage', ['garbage', 'other-dataset'])
def test_export_refuses_a_file_that_is_not_the_checksummed_one(tmp_path, hydrogen_atom, damage):
    """A repository file that is not a dataset, or another valid dataset than the node's checksum says: a
    ValueError naming the node, and no file written."""
    import dataclasses
    import io

    node = _dataset(tmp_path, [hydrogen_atom], 'a.npz', 'dataset.npz')  # unstored: its file can still change
    if damage == 'garbage':
        content = b'not a zip file'
    else:
        other = tmp_path / 'other.npz'
        save_dataset(other, [dataclasses.replace(hydrogen_atom, label='H2')], {'reference_method': 'fci'})
        content = other.read_bytes()
    node.base.repository.put_object_from_filelike(io.BytesIO(content), 'dataset.npz')
    target = tmp_path / 'out.npz'
    with pytest.raises(ValueError, match=r'dm21\.dataset<unstored>: the file|dm21\.dataset<unstored> holds a damaged'):
        node.export(target)
    assert not target.exists()


def test_verdi_data_dm21_dataset_export(tmp_path, hydrogen_atom):
    from click.testing import CliRunner

    from aiida_dm21.cli.verdi_data import dataset_data

    node = _dataset(tmp_path, [hydrogen_atom], 'a.npz', 'dataset.npz').store()
    assert set(dataset_data.list_commands(None)) == {'list', 'show', 'export'}
    runner = CliRunner()
    folder = tmp_path / 'folder'
    folder.mkdir()
    result = runner.invoke(dataset_data, ['export', str(node.pk), str(folder)])
    assert result.exit_code == 0, result.output
    written = folder / f'dm21-dataset-{node.pk}.npz'
    assert written.read_bytes() == node.get_content(mode='rb')
    assert '1 systems' in result.output and node.checksum[:12] in result.output
    result = runner.invoke(dataset_data, ['export', str(node.pk), str(written)])
    assert result.exit_code != 0 and 'exists: use --overwrite' in result.output
    result = runner.invoke(dataset_data, ['export', str(node.pk), str(written), '--overwrite'])
    assert result.exit_code == 0, result.output
