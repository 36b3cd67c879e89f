"""A minimal reader of TensorFlow ``saved_model.pb`` files, without TensorFlow or the ``protobuf`` package.

It decodes the parts of ``SavedModel`` that describe a TF1-style graph (what DeepMind's DM21 TF-Hub modules
contain): the ``GraphDef`` nodes with their attributes (constants decoded to NumPy arrays) and the signatures
(named inputs and outputs). It is used to check, from DeepMind's published files, how the DM21 network is
built; it does not execute graphs.

Schema fragments used (field numbers from ``tensorflow/core/framework/*.proto`` and ``protobuf/*.proto``)::

    SavedModel   { saved_model_schema_version=1; repeated MetaGraphDef meta_graphs=2 }
    MetaGraphDef { MetaInfoDef meta_info_def=1; GraphDef graph_def=2; map<string, SignatureDef> signature_def=5 }
    MetaInfoDef  { repeated string tags=4; string tensorflow_version=5 }
    GraphDef     { repeated NodeDef node=1 }
    NodeDef      { string name=1; string op=2; repeated string input=3; string device=4; map<string, AttrValue> attr=5 }
    AttrValue    { ListValue list=1; bytes s=2; int64 i=3; float f=4; bool b=5; DataType type=6;
                   TensorShapeProto shape=7; TensorProto tensor=8; string placeholder=9; NameAttrList func=10 }
    TensorProto  { DataType dtype=1; TensorShapeProto tensor_shape=2; bytes tensor_content=4; float_val=5;
                   double_val=6; int_val=7; bytes string_val=8; int64_val=10; bool_val=11; half_val=13 }
    SignatureDef { map<string, TensorInfo> inputs=1; map<string, TensorInfo> outputs=2; string method_name=3 }
    TensorInfo   { string name=1; DataType dtype=2; TensorShapeProto tensor_shape=3 }
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aiida_dm21.functional._protobuf import (
    WIRE_FIXED32,
    WIRE_FIXED64,
    WIRE_LENGTH_DELIMITED,
    ProtobufDecodeError,
    as_double,
    as_float,
    as_int32,
    as_int64,
    decode_message,
    iter_fields,
    unpack_doubles,
    unpack_floats,
    unpack_varints,
)
from aiida_dm21.functional.tf_checkpoint import DTYPE_NAMES, NUMPY_DTYPES

__all__ = [
    'GraphFormatError',
    'GraphNode',
    'MetaGraph',
    'TensorInfo',
    'ancestors',
    'input_node_name',
    'read_graph_nodes',
    'read_saved_model',
]


class GraphFormatError(ValueError):
    """``saved_model.pb`` is missing or not a SavedModel this reader understands."""


@dataclass(frozen=True)
class GraphNode:
    """One ``NodeDef``. ``attrs`` values are decoded: tensors -> ``numpy.ndarray`` (or the raw bytes of string
    tensors as a list), types -> names such as ``'DT_FLOAT'``, shapes -> tuples (``-1`` unknown dimension, ``None``
    unknown rank), lists -> Python lists, ``s`` -> ``bytes``, functions -> their name."""

    name: str
    op: str
    inputs: list[str]
    device: str = ''
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorInfo:
    """A signature input or output: the graph tensor it names (``node:index``), its type and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class MetaGraph:
    tags: list[str]
    tensorflow_version: str
    nodes: list[GraphNode]
    signatures: dict[str, tuple[dict[str, TensorInfo], dict[str, TensorInfo]]]  # name -> (inputs, outputs)


def _last(fields: dict[int, list], number: int, default: Any = None) -> Any:
    values = fields.get(number)
    return values[-1] if values else default


def _scalars(buf: bytes, number: int, kind: str) -> list:
    """Collect repeated scalar field ``number`` of message ``buf``, packed or not.

    ``kind``: 'varint' (signed int64), 'uvarint', 'float' or 'double'.
    """
    out: list = []
    for num, wire, value in iter_fields(buf):
        if num != number:
            continue
        if wire == WIRE_LENGTH_DELIMITED:
            if kind == 'float':
                out.extend(unpack_floats(value))
            elif kind == 'double':
                out.extend(unpack_doubles(value))
            elif kind == 'uvarint':
                out.extend(unpack_varints(value))
            else:
                out.extend(as_int64(v) for v in unpack_varints(value))
        elif wire == WIRE_FIXED32 and kind == 'float':
            out.append(as_float(value))
        elif wire == WIRE_FIXED64 and kind == 'double':
            out.append(as_double(value))
        elif kind == 'uvarint':
            out.append(value)
        else:
            out.append(as_int64(value))
    return out


def _dtype_name(enum: int) -> str:
    return DTYPE_NAMES.get(enum, f'DT_{enum}')


def decode_shape(buf: bytes) -> tuple[int, ...] | None:
    """``TensorShapeProto`` -> tuple of dimensions (-1 for unknown), or ``None`` if the rank is unknown."""
    fields = decode_message(buf)
    if _last(fields, 3, 0):
        return None
    return tuple(as_int64(_last(decode_message(dim), 1, 0)) for dim in fields.get(2, []))


def decode_tensor(buf: bytes) -> np.ndarray | list[bytes]:
    """``TensorProto`` -> NumPy array (string tensors -> list of bytes)."""
    fields = decode_message(buf)
    dtype_enum = _last(fields, 1, 0)
    shape = decode_shape(_last(fields, 2, b'')) or ()
    if dtype_enum == 7:  # DT_STRING
        return list(fields.get(8, []))
    dtype = NUMPY_DTYPES.get(dtype_enum)
    if dtype is None:
        raise GraphFormatError(f'constant of type {_dtype_name(dtype_enum)} is not supported')
    count = int(np.prod(shape, dtype=np.int64))
    content = _last(fields, 4)
    if content is not None:
        return np.frombuffer(content, dtype=dtype).reshape(shape).copy()
    if dtype_enum == 1:
        values = _scalars(buf, 5, 'float')
    elif dtype_enum == 2:
        values = _scalars(buf, 6, 'double')
    elif dtype_enum in (9, 23):
        values = _scalars(buf, 10, 'varint')
    elif dtype_enum == 10:
        values = [bool(v) for v in _scalars(buf, 11, 'uvarint')]
    elif dtype_enum == 19:  # half_val holds the float16 bit patterns
        values = list(np.array(_scalars(buf, 13, 'uvarint'), dtype=np.uint16).view(np.float16))
    else:  # int32, int16, int8, uint8, uint16, uint32
        values = [as_int32(v) for v in _scalars(buf, 7, 'uvarint')]
    # TensorFlow fills a tensor from fewer values by repeating the last one (a splat for a single value).
    if len(values) < count:
        values = values + [values[-1] if values else 0] * (count - len(values))
    return np.array(values[:count], dtype=dtype).reshape(shape)


def _decode_list(buf: bytes) -> list:
    fields = decode_message(buf)
    out: list = []
    out += [s for s in fields.get(2, [])]
    out += _scalars(buf, 3, 'varint')
    out += _scalars(buf, 4, 'float')
    out += [bool(v) for v in _scalars(buf, 5, 'uvarint')]
    out += [_dtype_name(t) for t in _scalars(buf, 6, 'uvarint')]
    out += [decode_shape(s) for s in fields.get(7, [])]
    out += [decode_tensor(t) for t in fields.get(8, [])]
    out += [_last(decode_message(f), 1, b'').decode() for f in fields.get(9, [])]
    return out


def decode_attr_value(buf: bytes) -> Any:
    """``AttrValue`` -> Python value (see :class:`GraphNode`)."""
    for number, wire, value in iter_fields(buf):
        if number == 1:
            return _decode_list(value)
        if number == 2:
            return value
        if number == 3:
            return as_int64(value)
        if number == 4 and wire == WIRE_FIXED32:
            return as_float(value)
        if number == 5:
            return bool(value)
        if number == 6:
            return _dtype_name(value)
        if number == 7:
            return decode_shape(value)
        if number == 8:
            return decode_tensor(value)
        if number == 9:
            return value.decode()
        if number == 10:
            return _last(decode_message(value), 1, b'').decode()
    return None


def _decode_map(entries: Iterable[bytes]) -> dict[str, bytes]:
    out = {}
    for entry in entries:
        fields = decode_message(entry)
        out[_last(fields, 1, b'').decode()] = _last(fields, 2, b'')
    return out


def decode_node(buf: bytes) -> GraphNode:
    fields = decode_message(buf)
    attrs = {key: decode_attr_value(value) for key, value in _decode_map(fields.get(5, [])).items()}
    return GraphNode(
        name=_last(fields, 1, b'').decode(),
        op=_last(fields, 2, b'').decode(),
        inputs=[i.decode() for i in fields.get(3, [])],
        device=_last(fields, 4, b'').decode(),
        attrs=attrs,
    )


def _decode_tensor_info(buf: bytes) -> TensorInfo:
    fields = decode_message(buf)
    shape_buf = _last(fields, 3)
    return TensorInfo(
        name=_last(fields, 1, b'').decode(),
        dtype=_dtype_name(_last(fields, 2, 0)),
        shape=decode_shape(shape_buf) if shape_buf is not None else None,
    )


def read_saved_model(saved_model_pb: str | Path) -> list[MetaGraph]:
    """Decode every meta graph of a ``saved_model.pb``: tags, TensorFlow version, nodes and signatures."""
    path = Path(saved_model_pb)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GraphFormatError(f'{path}: saved model file not found') from None
    try:
        metas = []
        for meta_buf in decode_message(data).get(2, []):
            meta = decode_message(meta_buf)
            info = decode_message(_last(meta, 1, b''))
            graph = decode_message(_last(meta, 2, b''))
            signatures = {}
            for name, sig_buf in _decode_map(meta.get(5, [])).items():
                sig = decode_message(sig_buf)
                inputs = {k: _decode_tensor_info(v) for k, v in _decode_map(sig.get(1, [])).items()}
                outputs = {k: _decode_tensor_info(v) for k, v in _decode_map(sig.get(2, [])).items()}
                signatures[name] = (inputs, outputs)
            metas.append(
                MetaGraph(
                    tags=[t.decode() for t in info.get(4, [])],
                    tensorflow_version=_last(info, 5, b'').decode(),
                    nodes=[decode_node(n) for n in graph.get(1, [])],
                    signatures=signatures,
                )
            )
    except (ProtobufDecodeError, UnicodeDecodeError) as exc:
        raise GraphFormatError(f'{path}: not a well-formed SavedModel: {exc}') from exc
    if not metas:
        raise GraphFormatError(f'{path}: SavedModel has no meta graphs')
    return metas


def read_graph_nodes(saved_model_pb: str | Path, meta_graph: int = 0) -> list[GraphNode]:
    """The ``GraphDef`` nodes of meta graph number ``meta_graph`` (default: the first) of a ``saved_model.pb``."""
    metas = read_saved_model(saved_model_pb)
    if not 0 <= meta_graph < len(metas):
        raise GraphFormatError(f'{saved_model_pb}: has {len(metas)} meta graphs, asked for number {meta_graph}')
    return metas[meta_graph].nodes


def input_node_name(ref: str) -> str:
    """The node name in an input reference: ``'^ctrl'`` -> ``'ctrl'``, ``'node:1'`` -> ``'node'``."""
    return ref.lstrip('^').split(':', 1)[0]


def ancestors(nodes: list[GraphNode], targets: Iterable[str]) -> list[GraphNode]:
    """The nodes that the tensors or nodes ``targets`` depend on (themselves included), in graph order.

    Use it to separate the forward computation from initialisers, regularisers and other training leftovers.
    """
    by_name = {node.name: node for node in nodes}
    seen: set[str] = set()
    stack = [input_node_name(t) for t in targets]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        if name not in by_name:
            raise GraphFormatError(f'graph has no node named {name!r}')
        seen.add(name)
        stack.extend(input_node_name(i) for i in by_name[name].inputs)
    return [node for node in nodes if node.name in seen]
