"""A small decoder for the protobuf wire format.

Only what is needed to read TensorFlow's checkpoint index entries and ``saved_model.pb`` without the
``protobuf`` package: varints, fixed 32/64-bit fields and length-delimited fields. Messages are decoded
into ``{field_number: [value, ...]}`` dictionaries; what a field *means* (its type in the ``.proto``
schema) is up to the caller, helped by the conversion functions below.

Wire types (https://protobuf.dev/programming-guides/encoding/):

* 0 varint -> ``int`` (unsigned; use :func:`as_int64` / :func:`as_int32` for signed fields)
* 1 fixed64 -> ``int`` (unsigned; use :func:`as_double` for ``double`` fields)
* 2 length-delimited -> ``bytes`` (strings, bytes, sub-messages, packed repeated scalars)
* 5 fixed32 -> ``int`` (unsigned; use :func:`as_float` for ``float`` fields)

Groups (wire types 3 and 4) are deprecated and not used by the messages we read; they are refused.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

__all__ = [
    'ProtobufDecodeError',
    'as_double',
    'as_float',
    'as_int32',
    'as_int64',
    'decode_message',
    'iter_fields',
    'read_varint',
    'unpack_doubles',
    'unpack_floats',
    'unpack_varints',
]

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LENGTH_DELIMITED = 2
WIRE_FIXED32 = 5

FieldValue = int | bytes


class ProtobufDecodeError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode the base-128 varint at ``buf[pos:]``; return ``(value, position after it)``."""
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise ProtobufDecodeError(f'truncated varint at byte {pos}')
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ProtobufDecodeError(f'varint longer than 10 bytes ending at byte {pos}')


def iter_fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, FieldValue]]:
    """Yield ``(field_number, wire_type, value)`` for each field of the serialised message ``buf``."""
    buf = bytes(buf)
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ProtobufDecodeError(f'field number 0 at byte {pos}')
        if wire == WIRE_VARINT:
            value, pos = read_varint(buf, pos)
        elif wire == WIRE_FIXED64:
            if pos + 8 > end:
                raise ProtobufDecodeError(f'truncated fixed64 field {field} at byte {pos}')
            value = int.from_bytes(buf[pos : pos + 8], 'little')
            pos += 8
        elif wire == WIRE_LENGTH_DELIMITED:
            length, pos = read_varint(buf, pos)
            if pos + length > end:
                raise ProtobufDecodeError(
                    f'length-delimited field {field} at byte {pos} needs {length} bytes, only {end - pos} left'
                )
            value = buf[pos : pos + length]
            pos += length
        elif wire == WIRE_FIXED32:
            if pos + 4 > end:
                raise ProtobufDecodeError(f'truncated fixed32 field {field} at byte {pos}')
            value = int.from_bytes(buf[pos : pos + 4], 'little')
            pos += 4
        else:
            raise ProtobufDecodeError(f'unsupported wire type {wire} (field {field}) at byte {pos}')
        yield field, wire, value


def decode_message(buf: bytes | memoryview) -> dict[int, list[FieldValue]]:
    """Decode one message level into ``{field_number: [values in order]}`` (sub-messages stay bytes)."""
    fields: dict[int, list[FieldValue]] = {}
    for field, _, value in iter_fields(buf):
        fields.setdefault(field, []).append(value)
    return fields


def as_int64(value: int) -> int:
    """Reinterpret an unsigned varint as a two's-complement ``int64`` (protobuf ``int64``/``int32``/enum)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def as_int32(value: int) -> int:
    """Reinterpret a varint as ``int32`` (negative ``int32`` values are sign-extended to 64 bits on the wire)."""
    value &= (1 << 32) - 1
    return value - (1 << 32) if value >= 1 << 31 else value


def as_float(value: int) -> float:
    """Reinterpret a fixed32 field as an IEEE ``float``."""
    return struct.unpack('<f', value.to_bytes(4, 'little'))[0]


def as_double(value: int) -> float:
    """Reinterpret a fixed64 field as an IEEE ``double``."""
    return struct.unpack('<d', value.to_bytes(8, 'little'))[0]


def unpack_varints(buf: bytes) -> list[int]:
    """Decode a packed repeated varint field (unsigned values)."""
    out = []
    pos = 0
    while pos < len(buf):
        value, pos = read_varint(buf, pos)
        out.append(value)
    return out


def unpack_floats(buf: bytes) -> list[float]:
    """Decode a packed repeated ``float`` field."""
    if len(buf) % 4:
        raise ProtobufDecodeError(f'packed float field of {len(buf)} bytes is not a multiple of 4')
    return list(struct.unpack(f'<{len(buf) // 4}f', buf))


def unpack_doubles(buf: bytes) -> list[float]:
    """Decode a packed repeated ``double`` field."""
    if len(buf) % 8:
        raise ProtobufDecodeError(f'packed double field of {len(buf)} bytes is not a multiple of 8')
    return list(struct.unpack(f'<{len(buf) // 8}d', buf))
