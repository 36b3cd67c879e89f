"""The ``dm21.checkpoint`` data type: validation, attributes, deduplication, caching hash, network and export."""

from __future__ import annotations

import io
import json
import shutil

import pytest

pytest.importorskip('aiida.engine')

import torch
from aiida import orm
from aiida.plugins import DataFactory
from safetensors.torch import save_file

from aiida_dm21.data.checkpoint import DM21CheckpointData, DM21CheckpointError
from aiida_dm21.functional.checkpoint import load_network, read_checkpoint, save_checkpoint

pytestmark = pytest.mark.aiida


@pytest.fixture(scope='module')
def perturbed_file(dm21_checkpoint_file, tmp_path_factory):
    """A checkpoint whose weights differ from DM21's in one number."""
    network, _ = load_network(dm21_checkpoint_file)
    with torch.no_grad():
        network.output_layer.bias[0] += 1e-3
    path = tmp_path_factory.mktemp('perturbed') / 'perturbed.safetensors'
    save_checkpoint(path, network, {'name': 'perturbed', 'source': 'trained'})
    return path


def test_entry_point():
    assert DataFactory('dm21.checkpoint') is DM21CheckpointData


def test_attributes_from_file(dm21_checkpoint_file):
    _, meta = read_checkpoint(dm21_checkpoint_file)
    node = DM21CheckpointData(dm21_checkpoint_file)
    assert node.filename == 'DM21.safetensors'
    assert node.name == 'DM21'
    assert node.checkpoint_source == 'deepmind:DM21'
    assert node.base.attributes.get('source') == 'deepmind:DM21'
    for key in ('architecture', 'n_parameters', 'feature_names', 'omegas', 'weights_sha256', 'format_version'):
        assert node.base.attributes.get(key) == meta[key], key
    assert node.upstream_sha256 == meta['upstream_sha256']
    assert node.n_parameters == 401667
    assert node.get_content('rb') == dm21_checkpoint_file.read_bytes()


def test_from_stream_and_relative_path(dm21_checkpoint_file, monkeypatch):
    from_bytes = DM21CheckpointData(io.BytesIO(dm21_checkpoint_file.read_bytes()))
    assert from_bytes.filename == 'checkpoint.safetensors'
    with dm21_checkpoint_file.open('rb') as handle:
        from_handle = DM21CheckpointData(handle, filename='custom')
    assert from_handle.filename == 'custom.safetensors'
    monkeypatch.chdir(dm21_checkpoint_file.parent)
    relative = DM21CheckpointData(dm21_checkpoint_file.name)
    assert relative.weights_sha256 == from_bytes.weights_sha256 == from_handle.weights_sha256


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flipped_weight(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # a byte of the last tensor: the recorded weights hash no longer matches
    return bytes(flipped)


@pytest.mark.parametrize(
    ('label', 'make', 'match'),
    [
        ('empty', lambda data: b'', 'not a readable safetensors'),
        ('garbage', lambda data: b'this is not a checkpoint at all' * 10, 'not a readable safetensors'),
        ('truncated', _truncated, 'not a readable safetensors'),
        ('tampered', _flipped_weight, 'does not match'),
    ],
)
def test_corrupt_file_is_refused(dm21_checkpoint_file, tmp_path, count_nodes, label, make, match):
    bad = tmp_path / f'{label}.safetensors'
    bad.write_bytes(make(dm21_checkpoint_file.read_bytes()))
    before = count_nodes()
    with pytest.raises(DM21CheckpointError, match=match):
        DM21CheckpointData(bad)
    with pytest.raises(DM21CheckpointError, match=match):
        DM21CheckpointData.get_or_create(bad)
    assert count_nodes() == before


def test_foreign_safetensors_is_refused(tmp_path, count_nodes):
    path = tmp_path / 'other.safetensors'
    save_file({'w': torch.zeros(3)}, str(path), metadata={'framework': 'something else'})
    before = count_nodes()
    with pytest.raises(DM21CheckpointError, match='not an aiida-dm21 checkpoint'):
        DM21CheckpointData(path)
    assert count_nodes() == before


def test_wrong_architecture_is_refused(tmp_path):
    """Consistent file (hash matches) whose tensors do not fit the declared architecture."""
    path = tmp_path / 'shapes.safetensors'
    from aiida_dm21.functional.checkpoint import FORMAT_NAME, FORMAT_VERSION, METADATA_KEY, weights_sha256

    tensors = {'input_layer.weight': torch.zeros(4, 11)}
    meta = {'format': FORMAT_NAME, 'format_version': FORMAT_VERSION, 'weights_sha256': weights_sha256(tensors)}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(DM21CheckpointError, match='do not fit the DM21 architecture'):
        DM21CheckpointData(path)


def test_missing_file(tmp_path):
    with pytest.raises(DM21CheckpointError, match='does not exist'):
        DM21CheckpointData(tmp_path / 'absent.safetensors')


def test_empty_or_tampered_node_cannot_be_stored(dm21_checkpoint_file):
    from aiida.common.exceptions import ValidationError

    with pytest.raises(ValidationError):
        DM21CheckpointData().store()
    node = DM21CheckpointData(dm21_checkpoint_file)
    node.base.repository.put_object_from_filelike(io.BytesIO(b'garbage'), node.filename)
    with pytest.raises(ValidationError, match='not a readable safetensors'):
        node.store()
    node = DM21CheckpointData(dm21_checkpoint_file)
    node.base.attributes.set('weights_sha256', '0' * 64)
    with pytest.raises(ValidationError, match='the node says 0000'):
        node.store()


def test_get_or_create_deduplicates_on_weights(dm21_checkpoint_file, perturbed_file, tmp_path, count_nodes):
    first = DM21CheckpointData.get_or_create(dm21_checkpoint_file)
    assert first.is_stored
    before = count_nodes()
    renamed = tmp_path / 'renamed-copy.safetensors'
    shutil.copyfile(dm21_checkpoint_file, renamed)
    assert DM21CheckpointData.get_or_create(renamed).pk == first.pk
    with dm21_checkpoint_file.open('rb') as handle:
        assert DM21CheckpointData.get_or_create(handle).pk == first.pk
    assert count_nodes() == before
    other = DM21CheckpointData.get_or_create(perturbed_file)
    assert other.pk != first.pk
    assert other.name == 'perturbed'
    assert other.checkpoint_source == 'trained'
    assert count_nodes() == before + 1
    found = (
        orm.QueryBuilder()
        .append(DM21CheckpointData, filters={'attributes.weights_sha256': first.weights_sha256}, project='id')
        .all(flat=True)
    )
    assert first.pk in found
    assert DM21CheckpointData.find(other.weights_sha256).pk == other.pk
    assert DM21CheckpointData.find('0' * 64) is None


def test_caching_hash_ignores_filename(dm21_checkpoint_file, perturbed_file):
    a = DM21CheckpointData(dm21_checkpoint_file, filename='a.safetensors')
    b = DM21CheckpointData(io.BytesIO(dm21_checkpoint_file.read_bytes()), filename='b.safetensors')
    c = DM21CheckpointData(perturbed_file)
    hash_a, hash_b, hash_c = (node.base.caching._compute_hash() for node in (a, b, c))
    assert hash_a == hash_b
    assert hash_a != hash_c
    objects = a.base.caching.get_objects_to_hash()
    assert objects['weights_sha256'] == a.weights_sha256
    assert 'filename' not in json.dumps(objects, default=str)


def test_load_network_matches_core(checkpoint_node, dm21_checkpoint_file):
    network = checkpoint_node.load_network()
    reference, _ = load_network(dm21_checkpoint_file)
    assert network.n_parameters == checkpoint_node.n_parameters
    features = torch.rand(5, 11, generator=torch.Generator().manual_seed(0)) * 0.5
    with torch.no_grad():
        assert torch.equal(network(features), reference(features))


def test_export(checkpoint_node, dm21_checkpoint_file, tmp_path):
    target = tmp_path / 'exported.bin'
    assert checkpoint_node.export(target) == [str(target)]
    assert target.read_bytes() == dm21_checkpoint_file.read_bytes()
    with pytest.raises(OSError, match='already'):
        checkpoint_node.export(target)
    checkpoint_node.export(target, overwrite=True)
    read_checkpoint(target)  # a valid checkpoint again


def test_stored_node_reloads(checkpoint_node):
    loaded = orm.load_node(checkpoint_node.pk)
    assert isinstance(loaded, DM21CheckpointData)
    assert loaded.weights_sha256 == checkpoint_node.weights_sha256
    assert loaded.base.caching.get_hash() == checkpoint_node.base.caching.get_hash()
