"""Tests for the TensorFlow-free readers of DeepMind's DM21 checkpoints (tensor bundle + saved_model.pb).

The upstream files are used in place from ``../shared/dm21/upstream`` (never copied into the repository);
the tests that need them are skipped when that folder is absent. Corrupted inputs are made in ``tmp_path``,
either from copies of the upstream files or from small bundles written by the helpers below.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from aiida_dm21.functional._protobuf import ProtobufDecodeError, decode_message, read_varint
from aiida_dm21.functional.tf_checkpoint import (
    TABLE_MAGIC,
    CheckpointFormatError,
    mask_crc,
    read_tensor_bundle,
    snappy_decompress,
)
from aiida_dm21.functional.tf_graph import GraphFormatError, ancestors, read_graph_nodes, read_saved_model

UPSTREAM = Path(__file__).parents[1].parent / 'shared' / 'dm21' / 'upstream'
FUNCTIONALS = ['DM21', 'DM21m', 'DM21mc', 'DM21mu']
PREFIX = 'hub_wrapper/local_functional_v2/'
PLACEHOLDER = 'module_fn___/default/'

needs_upstream = pytest.mark.skipif(
    not (UPSTREAM / 'DM21' / 'variables' / 'variables.index').is_file(),
    reason=f'DeepMind DM21 checkpoints not found at {UPSTREAM} (the shared data folder is not mounted)',
)


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {
        f'{PREFIX}SquashUnprocessedData/linear/w': (11, 256),
        f'{PREFIX}SquashUnprocessedData/linear/b': (256,),
        f'{PREFIX}OutputLayer/linear/w': (256, 3),
        f'{PREFIX}OutputLayer/linear/b': (3,),
    }
    for i in range(6):
        block = f'{PREFIX}MLP/ResidualBlock' + (f'_{i}' if i else '')
        shapes[f'{block}/linear/w'] = (256, 256)
        shapes[f'{block}/linear/b'] = (256,)
        shapes[f'{block}/layer_norm/gamma'] = (256,)
        shapes[f'{block}/layer_norm/beta'] = (256,)
    return shapes


EXPECTED_SHAPES = _expected_shapes()


# --------------------------------------------------------------------------------------------------------------
# The upstream checkpoints
# --------------------------------------------------------------------------------------------------------------


@needs_upstream
@pytest.mark.parametrize('name', FUNCTIONALS)
def test_upstream_checkpoint_loads(name):
    """Every DM21 checkpoint loads (all block and tensor CRCs pass) with the 28 expected float32 variables."""
    tensors = read_tensor_bundle(UPSTREAM / name / 'variables' / 'variables')
    assert {k: v.shape for k, v in tensors.items()} == EXPECTED_SHAPES
    for key, value in tensors.items():
        assert value.dtype == np.float32, key
        assert np.all(np.isfinite(value)), key


@needs_upstream
def test_upstream_checkpoints_differ():
    """The four functionals share names and shapes but not weights."""
    reference = read_tensor_bundle(UPSTREAM / 'DM21' / 'variables' / 'variables')
    for name in FUNCTIONALS[1:]:
        other = read_tensor_bundle(UPSTREAM / name / 'variables' / 'variables')
        key = f'{PREFIX}OutputLayer/linear/w'
        assert not np.array_equal(reference[key], other[key]), name


@needs_upstream
def test_first_values_of_dm21():
    """Spot values, as read here; they pin the byte order and layout of the data file."""
    tensors = read_tensor_bundle(UPSTREAM / 'DM21' / 'variables' / 'variables')
    np.testing.assert_allclose(
        tensors[f'{PREFIX}SquashUnprocessedData/linear/w'][0, :3], [0.4960697, -0.02498221, 0.34590778], rtol=1e-6
    )
    np.testing.assert_allclose(
        tensors[f'{PREFIX}OutputLayer/linear/b'], [0.00573685, -0.02562436, -0.06511883], rtol=1e-5
    )


# --------------------------------------------------------------------------------------------------------------
# Facts about the DM21 graph, read from saved_model.pb
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def dm21_graph():
    if not (UPSTREAM / 'DM21' / 'saved_model.pb').is_file():
        pytest.skip(f'DeepMind DM21 saved_model.pb not found under {UPSTREAM}')
    meta = read_saved_model(UPSTREAM / 'DM21' / 'saved_model.pb')
    assert len(meta) == 1
    return meta[0], {node.name: node for node in meta[0].nodes}


def _const(nodes, name) -> float:
    node = nodes[name]
    assert node.op == 'Const', name
    return float(node.attrs['value'])


def _read_var(nodes, name) -> str:
    """Name of the variable behind a ReadVariableOp input."""
    node = nodes[name]
    assert node.op == 'ReadVariableOp', name
    return node.inputs[0]


def test_graph_signature(dm21_graph):
    meta, nodes = dm21_graph
    assert meta.tensorflow_version == '2.7.0'
    inputs, outputs = meta.signatures['default']
    assert set(meta.signatures) == {'default'}
    features = {key.removeprefix('tensor_dict$'): (info.name, info.shape) for key, info in inputs.items()}
    assert features == {
        'grid_coords': (f'{PLACEHOLDER}Placeholder:0', (-1, 3)),
        'grid_weights': (f'{PLACEHOLDER}Placeholder_1:0', (-1, 1)),
        'hfxa': (f'{PLACEHOLDER}Placeholder_2:0', (-1, 2)),
        'hfxb': (f'{PLACEHOLDER}Placeholder_3:0', (-1, 2)),
        'norm_grad_rho': (f'{PLACEHOLDER}Placeholder_4:0', (-1, 1)),
        'norm_grad_rho_a': (f'{PLACEHOLDER}Placeholder_5:0', (-1, 1)),
        'norm_grad_rho_b': (f'{PLACEHOLDER}Placeholder_6:0', (-1, 1)),
        'rho_a': (f'{PLACEHOLDER}Placeholder_7:0', (-1, 1)),
        'rho_b': (f'{PLACEHOLDER}Placeholder_8:0', (-1, 1)),
        'tau_a': (f'{PLACEHOLDER}Placeholder_9:0', (-1, 1)),
        'tau_b': (f'{PLACEHOLDER}Placeholder_10:0', (-1, 1)),
    }
    assert all(info.dtype == 'DT_FLOAT' for info in inputs.values())
    assert {k: (v.name, v.shape) for k, v in outputs.items()} == {
        'grid_contribution': (f'{PREFIX}OutputLayer/Sum:0', (-1,)),
        'system_contribution': (f'{PREFIX}Const_15:0', (1,)),
    }
    assert nodes[f'{PREFIX}Const_15'].attrs['value'].tolist() == [0.0]
    # No gradients in the module: the original code adds tf.gradients around it.
    assert not any('gradients' in name.lower() for name in nodes)
    # grid_coords and grid_weights are inputs the outputs do not use.
    forward = {n.name for n in ancestors(meta.nodes, [info.name for info in outputs.values()])}
    assert f'{PLACEHOLDER}Placeholder' not in forward and f'{PLACEHOLDER}Placeholder_1' not in forward
    # Everything is float32.
    for node in ancestors(meta.nodes, [outputs['grid_contribution'].name]):
        if node.op not in ('Const', 'ConcatV2', 'Mean', 'Sum'):
            assert node.attrs.get('T', node.attrs.get('dtype')) == 'DT_FLOAT', node.name


def test_graph_feature_order_and_log(dm21_graph):
    _, nodes = dm21_graph
    concat = nodes[f'{PREFIX}SquashUnprocessedData/concat_grid_tensors/concat']
    # rho_a, rho_b, |grad rho|^2, |grad rho_a|^2, |grad rho_b|^2, tau_a, tau_b, hfxa (2 columns), hfxb (2 columns)
    assert concat.op == 'ConcatV2' and concat.attrs['N'] == 9
    assert concat.inputs[:9] == [f'{PLACEHOLDER}Placeholder_{i}' for i in (7, 8, 4, 5, 6, 9, 10, 2, 3)]
    assert _const(nodes, concat.inputs[9]) == 1
    assert concat.attrs['_output_shapes'] == [(-1, 11)]
    # log((|x| + 1e-9) + 1e-4), in float32, in that order.
    abs_ = nodes[f'{PREFIX}SquashUnprocessedData/Abs']
    add = nodes[f'{PREFIX}SquashUnprocessedData/add']
    add_1 = nodes[f'{PREFIX}SquashUnprocessedData/add_1']
    log = nodes[f'{PREFIX}SquashUnprocessedData/Log']
    assert abs_.inputs == [concat.name] and add.inputs[0] == abs_.name and add_1.inputs[0] == add.name
    assert log.op == 'Log' and log.inputs == [add_1.name]
    assert _const(nodes, add.inputs[1]) == float(np.float32(1e-9))
    assert _const(nodes, add_1.inputs[1]) == float(np.float32(1e-4))
    # linear 11 -> 256 (x @ w + b, w stored as [in, out]), then tanh.
    matmul = nodes[f'{PREFIX}SquashUnprocessedData/linear/MatMul']
    assert matmul.inputs[0] == log.name and not matmul.attrs.get('transpose_b', False)
    assert _read_var(nodes, matmul.inputs[1]) == f'{PREFIX}SquashUnprocessedData/linear/w'
    tanh = nodes[f'{PREFIX}SquashUnprocessedData/Tanh']
    assert tanh.op == 'Tanh' and tanh.inputs == [f'{PREFIX}SquashUnprocessedData/linear/add']


def test_graph_residual_blocks(dm21_graph):
    """h <- elu(layer_norm(h + (h @ w + b))): the skip is added before the layer norm, eps = 1e-5."""
    _, nodes = dm21_graph
    previous = f'{PREFIX}SquashUnprocessedData/Tanh'
    for i in range(6):
        block = f'{PREFIX}MLP/ResidualBlock' + (f'_{i}' if i else '')
        matmul = nodes[f'{block}/linear/MatMul']
        assert matmul.inputs[0] == previous
        assert _read_var(nodes, matmul.inputs[1]) == f'{block}/linear/w'
        linear = nodes[f'{block}/linear/add']
        assert linear.inputs[0] == matmul.name and _read_var(nodes, linear.inputs[1]) == f'{block}/linear/b'
        skip = nodes[f'{block}/add']
        assert skip.op == 'AddV2' and skip.inputs == [linear.name, previous]
        ln = f'{block}/layer_norm'
        assert nodes[f'{ln}/moments/mean'].inputs[0] == skip.name
        assert nodes[f'{ln}/moments/mean'].attrs['keep_dims'] is True
        assert nodes[f'{ln}/moments/SquaredDifference'].inputs[0] == skip.name
        assert nodes[f'{ln}/moments/variance'].op == 'Mean'  # biased variance over the 256 features
        eps = nodes[f'{ln}/batchnorm/add']
        assert eps.inputs[0] == f'{ln}/moments/variance'
        assert _const(nodes, eps.inputs[1]) == float(np.float32(1e-5))
        assert nodes[f'{ln}/batchnorm/Rsqrt'].inputs == [eps.name]
        assert _read_var(nodes, nodes[f'{ln}/batchnorm/mul'].inputs[1]) == f'{ln}/gamma'
        assert _read_var(nodes, nodes[f'{ln}/batchnorm/sub'].inputs[0]) == f'{ln}/beta'
        assert nodes[f'{ln}/batchnorm/mul_1'].inputs[0] == skip.name
        elu = nodes[f'{block}/Elu']
        assert elu.op == 'Elu' and elu.inputs == [f'{ln}/batchnorm/add_1']
        previous = elu.name
    assert nodes[f'{PREFIX}OutputLayer/linear/MatMul'].inputs[0] == previous


def test_graph_output_and_xc_energy_density(dm21_graph):
    """e_xc = sum_i 2 sigmoid(y_i / 2) * [e_x^LDA, hfxa + hfxb] with e_x^LDA = c (rho_a^(4/3) + rho_b^(4/3))."""
    _, nodes = dm21_graph
    out = f'{PREFIX}OutputLayer'
    assert nodes[f'{out}/truediv'].op == 'RealDiv' and nodes[f'{out}/truediv'].inputs[0] == f'{out}/linear/add'
    assert _const(nodes, nodes[f'{out}/truediv'].inputs[1]) == 2.0
    assert nodes[f'{out}/Sigmoid'].inputs == [f'{out}/truediv']
    assert nodes[f'{out}/mul_2'].inputs[0] == f'{out}/Sigmoid' and _const(nodes, nodes[f'{out}/mul_2'].inputs[1]) == 2.0
    lda_coefficient = -0.75 * (6 / np.pi) ** (1 / 3)
    for pow_name, mul_name, rho in (('Pow', 'mul', 'Placeholder_7'), ('Pow_1', 'mul_1', 'Placeholder_8')):
        assert nodes[f'{out}/{pow_name}'].inputs[0] == f'{PLACEHOLDER}{rho}'
        assert _const(nodes, nodes[f'{out}/{pow_name}'].inputs[1]) == float(np.float32(4 / 3))
        assert nodes[f'{out}/{mul_name}'].inputs[0] == f'{out}/{pow_name}'
        assert _const(nodes, nodes[f'{out}/{mul_name}'].inputs[1]) == float(np.float32(lda_coefficient))
    assert nodes[f'{out}/add'].inputs == [f'{out}/mul', f'{out}/mul_1']
    assert nodes[f'{out}/add_1'].inputs == [f'{PLACEHOLDER}Placeholder_2', f'{PLACEHOLDER}Placeholder_3']
    assert nodes[f'{out}/concat'].inputs[:2] == [f'{out}/add', f'{out}/add_1']
    assert nodes[f'{out}/mul_3'].inputs == [f'{out}/mul_2', f'{out}/concat']
    total = nodes[f'{out}/Sum']
    assert total.inputs[0] == f'{out}/mul_3' and _const(nodes, total.inputs[1]) == 1
    assert total.attrs.get('keep_dims', False) is False


def test_graph_variables_match_checkpoint(dm21_graph):
    meta, _ = dm21_graph
    handles = {n.attrs['shared_name'].decode(): n.attrs['shape'] for n in meta.nodes if n.op == 'VarHandleOp'}
    assert handles == EXPECTED_SHAPES


@needs_upstream
def test_all_graphs_identical():
    """The four saved_model.pb files differ in bytes (map order) but decode to the same nodes."""

    def key(name):
        out = []
        for node in read_graph_nodes(UPSTREAM / name / 'saved_model.pb'):
            attrs = {
                k: (v.dtype.str, v.shape, v.tobytes()) if isinstance(v, np.ndarray) else v
                for k, v in node.attrs.items()
            }
            out.append((node.name, node.op, node.inputs, attrs))
        return out

    reference = key('DM21')
    for name in FUNCTIONALS[1:]:
        assert key(name) == reference, name


def test_missing_saved_model(tmp_path):
    with pytest.raises(GraphFormatError, match='not found'):
        read_graph_nodes(tmp_path / 'saved_model.pb')


# --------------------------------------------------------------------------------------------------------------
# Small bundles written here, to test the format handling and the error paths
# --------------------------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _fvarint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value & ((1 << 64) - 1))


def _fbytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _ffixed32(number: int, value: int) -> bytes:
    return _varint(number << 3 | 5) + value.to_bytes(4, 'little')


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    out = b''
    previous = b''
    for key, value in entries:
        shared = 0
        while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
            shared += 1
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value)) + key[shared:] + value
        previous = key
    return out + (0).to_bytes(4, 'little') + (1).to_bytes(4, 'little')


def _write_table(path: Path, entries: list[tuple[bytes, bytes]], compression: int = 0) -> None:
    data = bytearray()

    def add(contents: bytes, ctype: int = 0) -> bytes:
        offset = len(data)
        crc = mask_crc(google_crc32c.value(contents + bytes([ctype])))
        data.extend(contents + bytes([ctype]) + crc.to_bytes(4, 'little'))
        return _varint(offset) + _varint(len(contents))

    data_handle = add(_block(entries), compression)
    meta_handle = add(_block([]))
    index_handle = add(_block([(b'\xff', data_handle)]))
    footer = (meta_handle + index_handle).ljust(40, b'\0') + TABLE_MAGIC.to_bytes(8, 'little')
    path.write_bytes(bytes(data) + footer)


DT = {np.dtype('float32'): 1, np.dtype('float64'): 2, np.dtype('int32'): 3, np.dtype('int64'): 9}


def _write_bundle(prefix: Path, tensors: dict[str, np.ndarray], **overrides) -> None:
    """Write ``<prefix>.index`` and ``<prefix>.data-00000-of-00001``; ``overrides`` patch fields of every entry."""
    data = bytearray()
    entries = [(b'', _fvarint(1, 1) + _fbytes(3, _fvarint(1, 1)))]
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        raw = array.astype(array.dtype.newbyteorder('<')).tobytes()
        fields = {
            'dtype': DT.get(array.dtype, 7),
            'shape': array.shape,
            'offset': len(data),
            'size': len(raw),
            'crc32c': mask_crc(google_crc32c.value(raw)),
            'slices': None,
        }
        fields.update(overrides)
        shape = b''.join(_fbytes(2, _fvarint(1, d)) for d in fields['shape'])
        value = _fvarint(1, fields['dtype']) + _fbytes(2, shape) + _fvarint(4, fields['offset'])
        value += _fvarint(5, fields['size']) + _ffixed32(6, fields['crc32c'])
        if fields['slices'] is not None:
            value += _fbytes(7, fields['slices'])
        entries.append((name.encode(), value))
        data.extend(raw)
    _write_table(prefix.with_name(prefix.name + '.index'), entries)
    prefix.with_name(prefix.name + '.data-00000-of-00001').write_bytes(bytes(data))


@pytest.fixture
def small_bundle(tmp_path):
    prefix = tmp_path / 'variables'
    tensors = {
        'net/layer/w': np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        'net/layer/b': np.array([1.5, -2.25], dtype=np.float64),
        'net/step': np.array(42, dtype=np.int64),
        'net/counts': np.array([[1, -2, 3]], dtype=np.int32),
        'net/empty': np.zeros((0, 5), dtype=np.float32),
    }
    _write_bundle(prefix, tensors)
    return prefix, tensors


def test_roundtrip_uncompressed_bundle(small_bundle):
    prefix, tensors = small_bundle
    loaded = read_tensor_bundle(prefix)
    assert set(loaded) == set(tensors)
    for name, value in tensors.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape
        np.testing.assert_array_equal(loaded[name], value)


def test_snappy_decompress():
    # preamble 11; literal 'abc'; 1-byte-offset copy (length 4, offset 3); 2-byte-offset copy (length 4, offset 7)
    compressed = bytes([11, 2 << 2, *b'abc', 0b000_000_01, 3, (4 - 1) << 2 | 2, 7, 0])
    assert snappy_decompress(compressed) == b'abcabcaabca'
    with pytest.raises(ValueError, match='header says'):
        snappy_decompress(bytes([12]) + compressed[1:])
    with pytest.raises(ValueError, match='copy offset'):
        snappy_decompress(bytes([4, 0b000_000_01, 9]))


def test_protobuf_decoder_errors():
    assert read_varint(b'\xac\x02', 0) == (300, 2)
    with pytest.raises(ProtobufDecodeError, match='truncated varint'):
        read_varint(b'\x80', 0)
    with pytest.raises(ProtobufDecodeError, match='needs 5 bytes'):
        decode_message(_varint(1 << 3 | 2) + _varint(5) + b'ab')
    with pytest.raises(ProtobufDecodeError, match='wire type 3'):
        decode_message(_varint(1 << 3 | 3))


def _copy_upstream(tmp_path: Path) -> Path:
    target = tmp_path / 'variables'
    shutil.copytree(UPSTREAM / 'DM21' / 'variables', target)
    for path in target.iterdir():
        path.chmod(0o644)
    return target / 'variables'


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_missing_index(tmp_path):
    with pytest.raises(CheckpointFormatError, match=r'variables\.index: checkpoint index file not found'):
        read_tensor_bundle(tmp_path / 'variables')


def test_missing_data_file(small_bundle):
    prefix, _ = small_bundle
    prefix.with_name('variables.data-00000-of-00001').unlink()
    with pytest.raises(CheckpointFormatError, match=r'variables\.data-00000-of-00001: checkpoint data file not found'):
        read_tensor_bundle(prefix)


@needs_upstream
def test_truncated_index(tmp_path):
    prefix = _copy_upstream(tmp_path)
    index = prefix.with_name('variables.index')
    index.write_bytes(index.read_bytes()[:-10])
    with pytest.raises(CheckpointFormatError, match=r'bad SSTable magic.*truncated'):
        read_tensor_bundle(prefix)
    index.write_bytes(b'\0' * 20)
    with pytest.raises(CheckpointFormatError, match='shorter than the 48-byte SSTable footer'):
        read_tensor_bundle(prefix)


@needs_upstream
def test_truncated_data_file(tmp_path):
    prefix = _copy_upstream(tmp_path)
    data = prefix.with_name('variables.data-00000-of-00001')
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(
        CheckpointFormatError, match=r'past the end of the 1606568-byte file; the data file is truncated'
    ):
        read_tensor_bundle(prefix)


@needs_upstream
def test_corrupt_data_crc(tmp_path):
    prefix = _copy_upstream(tmp_path)
    _flip_byte(prefix.with_name('variables.data-00000-of-00001'), 5000)  # inside MLP/ResidualBlock/linear/w
    with pytest.raises(CheckpointFormatError, match=r"CRC32C mismatch for tensor '.*ResidualBlock/linear/w'"):
        read_tensor_bundle(prefix)


@needs_upstream
def test_corrupt_index_block_crc(tmp_path):
    prefix = _copy_upstream(tmp_path)
    _flip_byte(prefix.with_name('variables.index'), 20)  # inside the (Snappy-compressed) data block
    with pytest.raises(
        CheckpointFormatError, match=r'CRC32C mismatch in data block at offset 0.*index file is corrupt'
    ):
        read_tensor_bundle(prefix)


def test_size_shape_mismatch(tmp_path):
    prefix = tmp_path / 'variables'
    _write_bundle(prefix, {'w': np.ones((2, 3), dtype=np.float32)}, shape=(2, 4))
    with pytest.raises(
        CheckpointFormatError, match=r"'w' is stored as 24 bytes, but DT_FLOAT with shape \[2, 4\] needs 32"
    ):
        read_tensor_bundle(prefix)


def test_string_tensor_refused_or_skipped(tmp_path):
    prefix = tmp_path / 'variables'
    _write_bundle(prefix, {'w': np.ones(2, dtype=np.float32)}, dtype=7)  # DT_STRING
    with pytest.raises(CheckpointFormatError, match="'w' has unsupported type DT_STRING; pass skip_unsupported"):
        read_tensor_bundle(prefix)
    assert read_tensor_bundle(prefix, skip_unsupported=True) == {}


def test_sliced_tensor_refused(tmp_path):
    prefix = tmp_path / 'variables'
    _write_bundle(prefix, {'w': np.ones(2, dtype=np.float32)}, slices=b'')
    with pytest.raises(CheckpointFormatError, match='partitioned'):
        read_tensor_bundle(prefix)


def test_unknown_block_compression_refused(tmp_path):
    prefix = tmp_path / 'variables'
    _write_bundle(prefix, {'w': np.ones(2, dtype=np.float32)})
    index = prefix.with_name('variables.index')
    entries = [(b'', _fvarint(1, 1))]
    _write_table(index, entries, compression=2)
    with pytest.raises(CheckpointFormatError, match=r'compression type 2; only 0 \(none\) and 1 \(Snappy\)'):
        read_tensor_bundle(prefix)
