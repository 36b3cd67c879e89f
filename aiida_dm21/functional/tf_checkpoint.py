"""Read TensorFlow "tensor bundle" checkpoints (``variables.index`` + ``variables.data-*``) without TensorFlow.

Format (TensorFlow ``core/util/tensor_bundle`` and ``core/lib/io/table``, a LevelDB SSTable):

* ``<prefix>.index`` is an SSTable. Its last 48 bytes are the footer: the metaindex and index block handles
  (two varints each: offset, size), zero padding to 40 bytes, then the 8-byte magic ``0xdb4775248b80fb57``
  (little-endian). The index block maps the last key of each data block to that block's handle.
* Every block is followed by a 5-byte trailer: the compression type (0 none, 1 Snappy) and the masked
  CRC32C of the block contents plus that type byte. TensorFlow writes Snappy-compressed blocks by default
  (DeepMind's DM21 checkpoints have them), so a small Snappy decompressor is included.
* A block is a run of entries ``varint shared, varint non_shared, varint value_len, key_delta, value``
  (keys prefix-compressed against the previous key), then an array of ``uint32`` restart offsets and
  their ``uint32`` count.
* The entry with the empty key is a ``BundleHeaderProto`` (num_shards=1, endianness=2, version=3); every
  other key is a tensor name whose value is a ``BundleEntryProto`` (dtype=1, shape=2, shard_id=3,
  offset=4, size=5, crc32c=6 fixed32, slices=7).
* ``<prefix>.data-SSSSS-of-NNNNN`` holds the raw tensor bytes; each entry's ``crc32c`` is the masked CRC32C
  of its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from aiida_dm21.functional._protobuf import (
    ProtobufDecodeError,
    as_int32,
    as_int64,
    decode_message,
    read_varint,
)

__all__ = ['CheckpointFormatError', 'TensorEntry', 'read_bundle_entries', 'read_tensor_bundle']

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two block handles padded to 40 bytes + 8 bytes of magic
BLOCK_TRAILER_SIZE = 5  # 1 byte compression type + 4 bytes masked crc32c
NO_COMPRESSION = 0
SNAPPY_COMPRESSION = 1
CRC_MASK_DELTA = 0xA282EAD8

# TensorFlow DataType enum values (types.proto) -> numpy dtype (little-endian form).
NUMPY_DTYPES: dict[int, np.dtype] = {
    1: np.dtype('<f4'),  # DT_FLOAT
    2: np.dtype('<f8'),  # DT_DOUBLE
    3: np.dtype('<i4'),  # DT_INT32
    4: np.dtype('u1'),  # DT_UINT8
    5: np.dtype('<i2'),  # DT_INT16
    6: np.dtype('i1'),  # DT_INT8
    9: np.dtype('<i8'),  # DT_INT64
    10: np.dtype('?'),  # DT_BOOL
    17: np.dtype('<u2'),  # DT_UINT16
    19: np.dtype('<f2'),  # DT_HALF
    22: np.dtype('<u4'),  # DT_UINT32
    23: np.dtype('<u8'),  # DT_UINT64
}
DTYPE_NAMES = {
    1: 'DT_FLOAT', 2: 'DT_DOUBLE', 3: 'DT_INT32', 4: 'DT_UINT8', 5: 'DT_INT16', 6: 'DT_INT8', 7: 'DT_STRING',
    8: 'DT_COMPLEX64', 9: 'DT_INT64', 10: 'DT_BOOL', 14: 'DT_BFLOAT16', 17: 'DT_UINT16', 18: 'DT_COMPLEX128',
    19: 'DT_HALF', 20: 'DT_RESOURCE', 21: 'DT_VARIANT', 22: 'DT_UINT32', 23: 'DT_UINT64',
}  # fmt: skip


class CheckpointFormatError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or uses a feature this reader does not support."""


@dataclass(frozen=True)
class TensorEntry:
    """One ``BundleEntryProto``: where a tensor lives in the data file(s) and how to check it."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked, as stored
    has_slices: bool

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, f'dtype enum {self.dtype}')


def mask_crc(crc: int) -> int:
    """LevelDB/TensorFlow CRC masking: rotate right by 15 bits and add a constant (mod 2**32)."""
    crc &= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + CRC_MASK_DELTA) & 0xFFFFFFFF


def snappy_decompress(data: bytes) -> bytes:
    """Decompress a raw (unframed) Snappy buffer; raise ``ValueError`` if it is malformed."""
    expected, pos = read_varint(data, 0)
    out = bytearray()
    end = len(data)
    while pos < end:
        tag = data[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal
            length = tag >> 2
            if length >= 60:
                nbytes = length - 59
                if pos + nbytes > end:
                    raise ValueError('truncated literal length')
                length = int.from_bytes(data[pos : pos + nbytes], 'little')
                pos += nbytes
            length += 1
            if pos + length > end:
                raise ValueError('literal runs past the end of the buffer')
            out += data[pos : pos + length]
            pos += length
            continue
        if kind == 1:  # copy, 11-bit offset
            if pos + 1 > end:
                raise ValueError('truncated copy')
            length = 4 + ((tag >> 2) & 7)
            offset = ((tag >> 5) << 8) | data[pos]
            pos += 1
        else:  # copy, 16- or 32-bit offset
            nbytes = 2 if kind == 2 else 4
            if pos + nbytes > end:
                raise ValueError('truncated copy')
            length = 1 + (tag >> 2)
            offset = int.from_bytes(data[pos : pos + nbytes], 'little')
            pos += nbytes
        if offset == 0 or offset > len(out):
            raise ValueError(f'copy offset {offset} outside the {len(out)} bytes decoded so far')
        start = len(out) - offset
        if offset >= length:
            out += out[start : start + length]
        else:  # overlapping copy: repeat the last `offset` bytes
            for i in range(length):
                out.append(out[start + i])
    if len(out) != expected:
        raise ValueError(f'decompressed to {len(out)} bytes, header says {expected}')
    return bytes(out)


def _read_block(index: bytes, offset: int, size: int, path: Path, what: str) -> bytes:
    """Return the (decompressed) contents of the block at ``offset``, after checking its trailer CRC."""
    end = offset + size + BLOCK_TRAILER_SIZE
    if offset < 0 or size < 0 or end > len(index) - FOOTER_SIZE:
        raise CheckpointFormatError(
            f'{path}: {what} block at offset {offset} with size {size} (+{BLOCK_TRAILER_SIZE} trailer bytes) '
            f'runs past the end of the table data ({len(index) - FOOTER_SIZE} bytes); the file is truncated or corrupt'
        )
    contents = index[offset : offset + size]
    compression = index[offset + size]
    stored_crc = int.from_bytes(index[offset + size + 1 : end], 'little')
    actual_crc = mask_crc(google_crc32c.value(contents + bytes([compression])))
    if stored_crc != actual_crc:
        raise CheckpointFormatError(
            f'{path}: CRC32C mismatch in {what} block at offset {offset} (stored {stored_crc:#010x}, '
            f'computed {actual_crc:#010x}); the index file is corrupt'
        )
    if compression == NO_COMPRESSION:
        return contents
    if compression == SNAPPY_COMPRESSION:
        try:
            return snappy_decompress(contents)
        except (ValueError, IndexError) as exc:
            raise CheckpointFormatError(f'{path}: bad Snappy data in {what} block at offset {offset}: {exc}') from exc
    raise CheckpointFormatError(
        f'{path}: {what} block at offset {offset} uses compression type {compression}; only 0 (none) and 1 '
        '(Snappy) are supported'
    )


def _block_entries(block: bytes, path: Path, what: str) -> list[tuple[bytes, bytes]]:
    """Decode the prefix-compressed ``(key, value)`` entries of one block."""
    if len(block) < 4:
        raise CheckpointFormatError(f'{path}: {what} block is {len(block)} bytes, too short for a restart count')
    num_restarts = int.from_bytes(block[-4:], 'little')
    restarts_start = len(block) - 4 - 4 * num_restarts
    if num_restarts < 1 or restarts_start < 0:
        raise CheckpointFormatError(f'{path}: {what} block has an invalid restart count {num_restarts}')
    entries = []
    key = b''
    pos = 0
    try:
        while pos < restarts_start:
            shared, pos = read_varint(block, pos)
            non_shared, pos = read_varint(block, pos)
            value_length, pos = read_varint(block, pos)
            if shared > len(key) or pos + non_shared + value_length > restarts_start:
                raise CheckpointFormatError(f'{path}: malformed entry at byte {pos} of the {what} block')
            key = key[:shared] + block[pos : pos + non_shared]
            pos += non_shared
            entries.append((key, block[pos : pos + value_length]))
            pos += value_length
    except ProtobufDecodeError as exc:
        raise CheckpointFormatError(f'{path}: malformed entry in the {what} block: {exc}') from exc
    return entries


def _decode_handle(buf: bytes, pos: int, path: Path, what: str) -> tuple[int, int, int]:
    try:
        offset, pos = read_varint(buf, pos)
        size, pos = read_varint(buf, pos)
    except ProtobufDecodeError as exc:
        raise CheckpointFormatError(f'{path}: bad {what} block handle: {exc}') from exc
    return offset, size, pos


def _read_table(path: Path) -> list[tuple[bytes, bytes]]:
    """All ``(key, value)`` pairs of an SSTable file, in order."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointFormatError(f'{path}: checkpoint index file not found') from None
    if len(data) < FOOTER_SIZE:
        raise CheckpointFormatError(
            f'{path}: file is {len(data)} bytes, shorter than the {FOOTER_SIZE}-byte SSTable footer; truncated?'
        )
    footer = data[-FOOTER_SIZE:]
    magic = int.from_bytes(footer[-8:], 'little')
    if magic != TABLE_MAGIC:
        raise CheckpointFormatError(
            f'{path}: bad SSTable magic {magic:#018x} (expected {TABLE_MAGIC:#018x}) in the last 8 bytes; '
            'the index file is truncated or is not a TensorFlow checkpoint index'
        )
    _, _, pos = _decode_handle(footer, 0, path, 'metaindex')
    index_offset, index_size, _ = _decode_handle(footer, pos, path, 'index')
    index_block = _read_block(data, index_offset, index_size, path, 'index')
    entries = []
    for _, handle in _block_entries(index_block, path, 'index'):
        offset, size, _ = _decode_handle(handle, 0, path, 'data')
        block = _read_block(data, offset, size, path, 'data')
        entries.extend(_block_entries(block, path, f'data (offset {offset})'))
    return entries


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    fields = decode_message(buf)
    if fields.get(3, [0])[-1]:
        raise ValueError('shape has unknown rank')
    return tuple(as_int64(decode_message(dim).get(1, [0])[-1]) for dim in fields.get(2, []))


def read_bundle_entries(variables_prefix: str | Path) -> tuple[dict[str, int], dict[str, TensorEntry]]:
    """Parse ``<prefix>.index``; return the bundle header fields and the tensor entries by name.

    The header dict has ``num_shards``, ``endianness`` (0 little, 1 big) and ``version`` (producer).
    """
    prefix = Path(variables_prefix)
    index_path = prefix.with_name(prefix.name + '.index')
    header: dict[str, int] | None = None
    entries: dict[str, TensorEntry] = {}
    for key, value in _read_table(index_path):
        try:
            fields = decode_message(value)
            if key == b'':
                version = decode_message(fields[3][-1]) if 3 in fields else {}
                header = {
                    'num_shards': as_int32(fields.get(1, [0])[-1]),
                    'endianness': fields.get(2, [0])[-1],
                    'version': as_int32(version.get(1, [0])[-1]),
                }
                continue
            name = key.decode('utf-8')
            entries[name] = TensorEntry(
                name=name,
                dtype=fields.get(1, [0])[-1],
                shape=_parse_shape(fields[2][-1]) if 2 in fields else (),
                shard_id=as_int32(fields.get(3, [0])[-1]),
                offset=as_int64(fields.get(4, [0])[-1]),
                size=as_int64(fields.get(5, [0])[-1]),
                crc32c=fields.get(6, [0])[-1],
                has_slices=7 in fields,
            )
        except (ProtobufDecodeError, ValueError, KeyError, UnicodeDecodeError) as exc:
            raise CheckpointFormatError(f'{index_path}: cannot decode the entry for key {key!r}: {exc}') from exc
    if header is None:
        raise CheckpointFormatError(f'{index_path}: no bundle header (entry with the empty key)')
    if header['num_shards'] < 1:
        raise CheckpointFormatError(f'{index_path}: bundle header says num_shards={header["num_shards"]}')
    if header['endianness'] not in (0, 1):
        raise CheckpointFormatError(f'{index_path}: unknown endianness {header["endianness"]} in bundle header')
    return header, entries


def read_tensor_bundle(variables_prefix: str | Path, *, skip_unsupported: bool = False) -> dict[str, np.ndarray]:
    """Load every tensor of a TensorFlow tensor-bundle checkpoint as NumPy arrays, checking sizes and CRCs.

    ``variables_prefix`` is the path without suffix, e.g. ``<module>/variables/variables`` for the files
    ``variables.index`` and ``variables.data-00000-of-00001`` in ``<module>/variables``.

    Tensors of types other than numeric/bool (strings, resources, variants, complex, bfloat16) and partitioned
    (sliced) variables raise :class:`CheckpointFormatError`, unless ``skip_unsupported`` is true, in which case
    they are left out of the result. Every other malformation raises :class:`CheckpointFormatError` too.
    """
    prefix = Path(variables_prefix)
    header, entries = read_bundle_entries(prefix)
    num_shards = header['num_shards']
    shards: dict[int, bytes] = {}
    tensors: dict[str, np.ndarray] = {}
    for name, entry in entries.items():
        dtype = NUMPY_DTYPES.get(entry.dtype)
        problem = None
        if entry.has_slices:
            problem = 'is a partitioned (sliced) variable'
        elif dtype is None:
            problem = f'has unsupported type {entry.dtype_name}'
        if problem:
            if skip_unsupported:
                continue
            raise CheckpointFormatError(
                f'{prefix}.index: tensor {name!r} {problem}; pass skip_unsupported=True to leave it out'
            )
        if not 0 <= entry.shard_id < num_shards:
            raise CheckpointFormatError(
                f'{prefix}.index: tensor {name!r} is in shard {entry.shard_id}, but there are {num_shards} shards'
            )
        data_path = prefix.with_name(f'{prefix.name}.data-{entry.shard_id:05d}-of-{num_shards:05d}')
        if entry.shard_id not in shards:
            try:
                shards[entry.shard_id] = data_path.read_bytes()
            except FileNotFoundError:
                raise CheckpointFormatError(f'{data_path}: checkpoint data file not found') from None
        data = shards[entry.shard_id]
        if any(d < 0 for d in entry.shape):
            raise CheckpointFormatError(f'{prefix}.index: tensor {name!r} has a negative dimension {entry.shape}')
        expected = dtype.itemsize * int(np.prod(entry.shape, dtype=np.int64))
        if entry.size != expected:
            raise CheckpointFormatError(
                f'{prefix}.index: tensor {name!r} is stored as {entry.size} bytes, but {entry.dtype_name} with '
                f'shape {list(entry.shape)} needs {expected} bytes'
            )
        if entry.offset < 0 or entry.offset + entry.size > len(data):
            raise CheckpointFormatError(
                f'{data_path}: tensor {name!r} lies at bytes {entry.offset}..{entry.offset + entry.size}, past the '
                f'end of the {len(data)}-byte file; the data file is truncated'
            )
        raw = data[entry.offset : entry.offset + entry.size]
        crc = mask_crc(google_crc32c.value(raw))
        if crc != entry.crc32c:
            raise CheckpointFormatError(
                f'{data_path}: CRC32C mismatch for tensor {name!r} at bytes {entry.offset}..'
                f'{entry.offset + entry.size} (index says {entry.crc32c:#010x}, data gives {crc:#010x}); '
                'the data file is corrupt or does not belong to this index'
            )
        file_dtype = dtype.newbyteorder('>') if header['endianness'] == 1 else dtype
        tensors[name] = np.frombuffer(raw, dtype=file_dtype).astype(dtype).reshape(entry.shape)
    return tensors
