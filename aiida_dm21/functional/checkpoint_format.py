"""The checkpoint format without PyTorch: names, header metadata, content hash and architecture checks.

A checkpoint is one ``.safetensors`` file (see :mod:`aiida_dm21.functional.checkpoint`).  Everything needed to
*validate* one -- its format and version, ``weights_sha256``, finite values, tensor names and shapes against the
architecture -- needs only NumPy and ``safetensors`` (read with ``framework='numpy'``), so the AiiDA plugin layer
(the ``dm21.checkpoint`` data node) checks files on a submitting machine without PyTorch.  Building the network
from them is :func:`aiida_dm21.functional.checkpoint.network_from_tensors` (PyTorch).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from .architecture import FEATURE_NAMES, DM21Config

__all__ = [
    'ENV_SOURCE',
    'ENV_WEIGHTS_DIR',
    'FORMAT_NAME',
    'FORMAT_VERSION',
    'METADATA_KEY',
    'PUBLISHED_FUNCTIONALS',
    'CheckpointError',
    'check_checkpoint_name',
    'check_finite',
    'check_tensors',
    'expected_shapes',
    'read_checkpoint_arrays',
    'weights_dir',
    'weights_sha256',
]

FORMAT_NAME = 'aiida-dm21-checkpoint'
FORMAT_VERSION = 1
METADATA_KEY = 'aiida_dm21'

PUBLISHED_FUNCTIONALS = ('DM21', 'DM21m', 'DM21mc', 'DM21mu')

ENV_WEIGHTS_DIR = 'AIIDA_DM21_WEIGHTS_DIR'
ENV_SOURCE = 'AIIDA_DM21_WEIGHTS_SOURCE'


class CheckpointError(ValueError):
    """A checkpoint file or upstream folder is missing, corrupt, or not what it claims to be."""


def weights_dir() -> Path:
    """Where named checkpoints live: ``$AIIDA_DM21_WEIGHTS_DIR`` or ``~/.cache/aiida-dm21/weights``."""
    env = os.environ.get(ENV_WEIGHTS_DIR)
    return Path(env) if env else Path.home() / '.cache' / 'aiida-dm21' / 'weights'


def check_checkpoint_name(name: object) -> str:
    """``name`` if it can name a checkpoint file ``<name>.safetensors`` inside the weights folder.

    :raises CheckpointError: not a string, empty, ``.``/``..``, starting with a dot, or holding a path separator or
        a control character (a name must never place the file outside the folder).
    """
    if not isinstance(name, str) or not name.strip():
        raise CheckpointError(f'a checkpoint name must be a non-empty string, got {name!r}')
    separators = {'/', '\\', os.sep} | ({os.altsep} if os.altsep else set())
    if (
        name != name.strip()
        or name.startswith('.')
        or any(sep in name for sep in separators)
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    ):
        raise CheckpointError(
            f'checkpoint name {name!r} cannot be a file name in the weights folder: use letters, digits, '
            "'-', '_' or '+' (no path separators, no leading dot, no surrounding spaces)"
        )
    return name


def _torch_tensor_type() -> type | None:
    """``torch.Tensor`` when PyTorch is already imported (a value can only be a tensor then), else ``None``."""
    torch = sys.modules.get('torch')
    return getattr(torch, 'Tensor', None) if torch is not None else None


def _as_numpy(value: Any) -> np.ndarray:
    tensor_type = _torch_tensor_type()
    if tensor_type is not None and isinstance(value, tensor_type):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def check_finite(tensors: Mapping[str, Any], origin: str) -> None:
    """Refuse tensors (PyTorch tensors or NumPy arrays) with NaN or infinite entries, naming them.

    :raises CheckpointError: some tensor is not finite.
    """
    tensor_type = _torch_tensor_type()
    bad = []
    for name in sorted(tensors):
        value = tensors[name]
        if tensor_type is not None and isinstance(value, tensor_type):
            torch = sys.modules['torch']
            tensor = value.detach()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(f'{name} ({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} values)')
            continue
        array = np.asarray(value)
        if np.issubdtype(array.dtype, np.floating) and not bool(np.isfinite(array).all()):
            bad.append(f'{name} ({int((~np.isfinite(array)).sum())} of {array.size} values)')
    if bad:
        raise CheckpointError(f'{origin}: NaN or infinite weights in {", ".join(bad[:4])}: not a usable network')


def weights_sha256(tensors: Mapping[str, Any]) -> str:
    """Content hash of a set of tensors (PyTorch or NumPy), independent of file layout.

    sha256 over the tensors sorted by name: ``'<name>|<numpy dtype str>|<shape list>|'`` then the C-order bytes.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(_as_numpy(tensors[name]))
        digest.update(f'{name}|{array.dtype.str}|{list(array.shape)}|'.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def read_safetensors(path: str | Path, framework: str) -> tuple[dict[str, Any], dict]:
    """Tensors and metadata of a checkpoint file, validated (format, version, hash, finite values).

    :param framework: ``'numpy'`` (NumPy arrays: no PyTorch) or ``'pt'`` (PyTorch tensors).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint file {path} does not exist')
    try:
        with safe_open(str(path), framework=framework) as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f'{path} is not a readable safetensors checkpoint (truncated or corrupt?): {exc}'
        ) from exc
    if METADATA_KEY not in header:
        raise CheckpointError(f'{path} has no {METADATA_KEY!r} metadata: not an aiida-dm21 checkpoint')
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f'{path}: metadata is not valid JSON: {exc}') from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f'{path}: the {METADATA_KEY!r} metadata must be a JSON object, got {type(meta).__name__}')
    if meta.get('format') != FORMAT_NAME:
        raise CheckpointError(f'{path}: format {meta.get("format")!r} is not {FORMAT_NAME!r}')
    if meta.get('format_version') != FORMAT_VERSION:
        raise CheckpointError(
            f'{path}: format version {meta.get("format_version")} is not supported '
            f'(this package reads {FORMAT_VERSION})'
        )
    digest = weights_sha256(tensors)
    if digest != meta.get('weights_sha256'):
        raise CheckpointError(
            f'{path}: weights sha256 {digest} does not match the recorded {meta.get("weights_sha256")}'
        )
    check_finite(tensors, str(path))
    return tensors, meta


def read_checkpoint_arrays(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Like :func:`aiida_dm21.functional.checkpoint.read_checkpoint`, with NumPy arrays (no PyTorch)."""
    return read_safetensors(path, 'numpy')


def expected_shapes(config: DM21Config) -> dict[str, tuple[int, ...]]:
    """The state-dict tensor shapes of the DM21 network with ``config`` (without allocating the network)."""
    h, n_in, n_out = config.hidden, config.n_features, config.n_outputs
    shapes: dict[str, tuple[int, ...]] = {
        'input_layer.weight': (h, n_in),
        'input_layer.bias': (h,),
        'output_layer.weight': (n_out, h),
        'output_layer.bias': (n_out,),
    }
    for i in range(config.n_blocks):
        shapes[f'blocks.{i}.linear.weight'] = (h, h)
        shapes[f'blocks.{i}.linear.bias'] = (h,)
        shapes[f'blocks.{i}.norm.weight'] = (h,)
        shapes[f'blocks.{i}.norm.bias'] = (h,)
    return shapes


def check_tensors(tensors: Mapping[str, Any], meta: Mapping[str, Any], origin: str) -> DM21Config:
    """The architecture of a checkpoint's tensors and metadata, every part checked (no network is built).

    :raises CheckpointError: an impossible architecture, metadata that contradicts it (omegas, feature names),
        tensors of the wrong names or shapes, or NaN/infinite weights; ``origin`` names the file in the message.
    """
    try:
        config = DM21Config.from_dict(meta.get('architecture', {}))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f'{origin}: bad architecture description: {exc}') from exc
    if 'omegas' in meta and not _same_numbers(meta['omegas'], config.omegas):
        raise CheckpointError(
            f'{origin}: the metadata says omegas {meta["omegas"]!r} but the architecture has {list(config.omegas)}'
        )
    if 'feature_names' in meta and list(meta['feature_names'] or []) != list(FEATURE_NAMES):
        raise CheckpointError(
            f'{origin}: feature_names {meta["feature_names"]!r} are not the DM21 features {list(FEATURE_NAMES)}'
        )
    # the shapes first, from the configuration: a huge `hidden` must not allocate a huge network
    expected = expected_shapes(config)
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        details = '; '.join(
            f'{label}: {items[:4]}'
            for label, items in (('missing', missing), ('unexpected', extra), ('wrong shape', wrong))
            if items
        )
        raise CheckpointError(f'{origin}: tensors do not fit the DM21 architecture ({details})')
    check_finite(tensors, origin)
    return config


def _same_numbers(given: object, expected: tuple[float, ...]) -> bool:
    try:
        values = [float(x) for x in given]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return False
    return values == list(expected)
