"""The project's checkpoint format, and conversion of DeepMind's published DM21 weights into it.

A checkpoint is ONE ``.safetensors`` file: the network's tensors plus a JSON document in the
safetensors header metadata (key ``aiida_dm21``) with the architecture, feature list, omega values,
source, upstream hashes and format version.  safetensors only ever parses a JSON header and raw
little-endian buffers, so loading a checkpoint can never execute code (unlike ``torch.load``/pickle).

``weights_sha256`` identifies the *content*: sha256 over the tensors (sorted by name; dtype, shape and
bytes of each).  It does not depend on how the file was written, so AiiDA can key caching and
``get_or_create`` on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

# the format itself (header, hash, architecture checks) needs no PyTorch: the AiiDA plugins use it directly
from .checkpoint_format import (
    ENV_SOURCE,
    ENV_WEIGHTS_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_KEY,
    PUBLISHED_FUNCTIONALS,
    CheckpointError,
    check_checkpoint_name,
    check_finite,
    check_tensors,
    expected_shapes,
    read_safetensors,
    weights_dir,
    weights_sha256,
)
from .model import FEATURE_NAMES, DM21Config, DM21Network
from .tf_checkpoint import CheckpointFormatError, read_tensor_bundle

__all__ = [
    'ENV_SOURCE',
    'ENV_WEIGHTS_DIR',
    'FORMAT_NAME',
    'FORMAT_VERSION',
    'PUBLISHED_FUNCTIONALS',
    'UPSTREAM_SHA256',
    'CheckpointError',
    'check_checkpoint_name',
    'check_finite',
    'expected_shapes',
    'fetch_deepmind',
    'import_deepmind',
    'load_network',
    'read_checkpoint',
    'save_checkpoint',
    'weights_dir',
    'weights_sha256',
]

#: Where DeepMind publishes the checkpoints (Apache-2.0), one folder per functional.
UPSTREAM_URL = (
    'https://raw.githubusercontent.com/google-deepmind/deepmind-research/master/'
    'density_functional_approximation_dm21/density_functional_approximation_dm21/checkpoints'
)
UPSTREAM_FILES = (
    'saved_model.pb',
    'tfhub_module.pb',
    'smart_module.pb',
    'variables/variables.index',
    'variables/variables.data-00000-of-00001',
)
#: Pinned sha256 of every published file: ``fetch`` and ``import`` refuse anything else.
UPSTREAM_SHA256: dict[str, dict[str, str]] = {
    'DM21': {
        'saved_model.pb': '17dfe6a6b29ed78a1a1b2629d30e0290856d6bea91a9bc4e445558d14215320a',
        'smart_module.pb': '2daf0d8125b8704372dc71135c7e91e4b9790b816f77d39b3063ccb5c0cae7cd',
        'tfhub_module.pb': '2d88972e9536ba54deed37db380728b3c58eab9bca1d173ae523098b0774cdf5',
        'variables/variables.data-00000-of-00001': 'b4cb392a9b6de8385f98347dc2e134d492060a7835ec4dc0fc7ff11d72fdb2b9',
        'variables/variables.index': '5918c6ce71365eed6fe4e9e7dc9a996e598fb061cb6d7eae14b12f27a69d63df',
    },
    'DM21m': {
        'saved_model.pb': '050d778fb8ced365e62cb571000b94a594be3a9483c27112959ec6589646557f',
        'smart_module.pb': '9a35da924d16699338d30986b813dee963c47aa07198874cfa0a35ae6b740ff2',
        'tfhub_module.pb': '2d88972e9536ba54deed37db380728b3c58eab9bca1d173ae523098b0774cdf5',
        'variables/variables.data-00000-of-00001': '61e5814cab7e953a9b732f291494670b70cf96d4681f59ae8f4403526a20cfdb',
        'variables/variables.index': '384a0651340ff6b9fe9e93dfbaf0478ceb1e39c5ab4c58dd617d67ff27833feb',
    },
    'DM21mc': {
        'saved_model.pb': '9bb0da9df797bd8ccc027975c9e701b948220fdfea8d926bbaaad74c2aace037',
        'smart_module.pb': '1ac647fa08687a29e4250380a24fdb9a511d2e04a15598c2d36de69cb7183fba',
        'tfhub_module.pb': '2d88972e9536ba54deed37db380728b3c58eab9bca1d173ae523098b0774cdf5',
        'variables/variables.data-00000-of-00001': 'ade31ae97b5b19c3706daf925d734338339b0e1979a7f51dce6d613acddd30e5',
        'variables/variables.index': '7dac9b16a5ca2ce82795f3b13dfd9eb0a44356bac488cc96286bc87f68362bba',
    },
    'DM21mu': {
        'saved_model.pb': '85afa121d127be2c334ad42b867825fa694981ac37b7a8ddf2b4fd5b940657be',
        'smart_module.pb': 'd5de95f040582d0f4081d658b8437c2f6fd18ab23ab6ce77c356e5b8ecce15c2',
        'tfhub_module.pb': '2d88972e9536ba54deed37db380728b3c58eab9bca1d173ae523098b0774cdf5',
        'variables/variables.data-00000-of-00001': 'f8f8677e00c1a32383064b86f77c107545f761cd23628e32ff88d9856160f735',
        'variables/variables.index': 'cd408fd152d42cf68df605ff186b5b981d5c7189b4a0026f2caec6e5d81834e1',
    },
}

# --- the project's format -----------------------------------------------------------------------------


def save_checkpoint(path: str | Path, network: DM21Network, metadata: Mapping[str, Any] | None = None) -> dict:
    """Write ``network`` to ``path`` (atomically) and return the full metadata written."""
    path = Path(path)
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in network.state_dict().items()}
    check_finite(tensors, f'refusing to write {path}')
    meta = dict(metadata or {})
    meta.update(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        architecture=network.config.to_dict(),
        feature_names=list(FEATURE_NAMES),
        omegas=list(network.config.omegas),
        n_parameters=network.n_parameters,
        weights_sha256=weights_sha256(tensors),
    )
    meta.setdefault('name', path.stem)
    meta.setdefault('source', 'unknown')
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f'.{path.name}.', delete=False) as handle:
        tmp = Path(handle.name)
    try:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return meta


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a checkpoint file, validated (format, version, hash, shapes)."""
    return read_safetensors(path, 'pt')


def network_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], origin: str) -> DM21Network:
    """The network of a checkpoint's tensors and metadata, every part checked against the architecture.

    :raises CheckpointError: an impossible architecture, metadata that contradicts it (omegas, feature names),
        tensors of the wrong names or shapes, or NaN/infinite weights; ``origin`` names the file in the message.
    """
    config = check_tensors(tensors, meta, origin)
    network = DM21Network(config)
    network.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    return network


def load_network(spec: str | Path) -> tuple[DM21Network, dict]:
    """A network and its metadata from a name (``DM21`` ...), a ``.safetensors`` file or a DeepMind folder."""
    path = Path(spec)
    if isinstance(spec, str) and not path.exists() and '/' not in spec and not spec.endswith('.safetensors'):
        candidate = weights_dir() / f'{spec}.safetensors'
        if not candidate.is_file():
            known = ', '.join(PUBLISHED_FUNCTIONALS)
            if spec not in PUBLISHED_FUNCTIONALS:
                raise CheckpointError(
                    f'unknown functional {spec!r}: not one of {known} and no checkpoint {candidate} exists'
                )
            raise CheckpointError(
                f'the weights of {spec} are not installed (looked for {candidate}): run '
                f'`aiida-dm21 weights fetch {spec}` or `aiida-dm21 weights import PATH`'
            )
        path = candidate
    if path.is_dir():
        tensors, meta = import_deepmind(path)
        return network_from_tensors(tensors, meta, str(path)), meta
    tensors, meta = read_checkpoint(path)
    return network_from_tensors(tensors, meta, str(path)), meta


# --- DeepMind's TF-Hub folders ------------------------------------------------------------------------

_TF_PREFIX = 'hub_wrapper/local_functional_v2/'


def _tf_to_torch_names(n_blocks: int = 6) -> dict[str, tuple[str, bool]]:
    """TF variable name -> (state-dict name, transpose?)."""
    mapping = {
        'SquashUnprocessedData/linear/w': ('input_layer.weight', True),
        'SquashUnprocessedData/linear/b': ('input_layer.bias', False),
        'OutputLayer/linear/w': ('output_layer.weight', True),
        'OutputLayer/linear/b': ('output_layer.bias', False),
    }
    for i in range(n_blocks):
        tf_block = 'MLP/ResidualBlock' + (f'_{i}' if i else '')
        mapping[f'{tf_block}/linear/w'] = (f'blocks.{i}.linear.weight', True)
        mapping[f'{tf_block}/linear/b'] = (f'blocks.{i}.linear.bias', False)
        mapping[f'{tf_block}/layer_norm/gamma'] = (f'blocks.{i}.norm.weight', False)
        mapping[f'{tf_block}/layer_norm/beta'] = (f'blocks.{i}.norm.bias', False)
    return {_TF_PREFIX + k: v for k, v in mapping.items()}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open('rb') as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _identify(hashes: Mapping[str, str]) -> str | None:
    for name, pinned in UPSTREAM_SHA256.items():
        if all(hashes.get(f) == h for f, h in pinned.items() if f in hashes):
            return name
    return None


def import_deepmind(folder: str | Path, name: str | None = None, verify: bool = True) -> tuple[dict, dict]:
    """Tensors (state-dict names) and metadata from one of DeepMind's TF-Hub module folders, without TensorFlow.

    ``verify``: the files must be byte-identical to the published ones (pinned sha256).  ``name`` is
    inferred from the hashes (or the folder name when ``verify`` is off).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f'{folder} is not a directory (expected a DM21 TF-Hub module folder)')
    for required in ('variables/variables.index', 'variables/variables.data-00000-of-00001'):
        if not (folder / required).is_file():
            raise CheckpointError(f'{folder} lacks {required}: not a complete DM21 TF-Hub module folder')
    hashes = {f: _sha256_file(folder / f) for f in UPSTREAM_FILES if (folder / f).is_file()}
    identified = _identify(hashes)
    if name is None:
        name = identified or folder.name
    if verify:
        pinned = UPSTREAM_SHA256.get(name)
        if pinned is None:
            raise CheckpointError(
                f'{folder}: these files match none of the published {", ".join(PUBLISHED_FUNCTIONALS)} '
                'checkpoints (sha256); pass verify=False (--no-verify) to import unpublished weights'
            )
        bad = [f for f, h in pinned.items() if f in hashes and hashes[f] != h]
        if bad:
            raise CheckpointError(
                f'{folder}: sha256 mismatch for {", ".join(bad)} (expected the published {name} files)'
            )
    try:
        raw = read_tensor_bundle(folder / 'variables' / 'variables')
    except CheckpointFormatError as exc:
        raise CheckpointError(str(exc)) from exc
    mapping = _tf_to_torch_names()
    unknown = sorted(set(raw) - set(mapping))
    missing = sorted(set(mapping) - set(raw))
    if unknown or missing:
        raise CheckpointError(f'{folder}: unexpected variables {unknown[:4]} / missing variables {missing[:4]}')
    tensors = {}
    for tf_name, (torch_name, transpose) in mapping.items():
        array = raw[tf_name]
        tensors[torch_name] = torch.from_numpy(np.ascontiguousarray(array.T if transpose else array))
    meta = {
        'name': name,
        'source': f'deepmind:{name}',
        'upstream_sha256': hashes,
        'architecture': DM21Config().to_dict(),
        'format': FORMAT_NAME,
        'format_version': FORMAT_VERSION,
        'weights_sha256': weights_sha256(tensors),
    }
    return tensors, meta  # shapes are checked where a network is built from them (network_from_tensors)


def install_deepmind(folder: str | Path, dest_dir: str | Path | None = None, **kwargs) -> tuple[Path, dict]:
    """Convert a DeepMind folder into ``<dest_dir>/<name>.safetensors``; returns the path and metadata."""
    if kwargs.get('name') is not None:
        check_checkpoint_name(kwargs['name'])
    tensors, meta = import_deepmind(folder, **kwargs)
    check_checkpoint_name(meta['name'])  # also a name taken from the folder (with verify=False)
    network = network_from_tensors(tensors, meta, str(folder))
    dest = Path(dest_dir) if dest_dir else weights_dir()
    path = dest / f'{meta["name"]}.safetensors'
    keep = {k: meta[k] for k in ('name', 'source', 'upstream_sha256')}
    return path, save_checkpoint(path, network, keep)


def default_source() -> str:
    """``$AIIDA_DM21_WEIGHTS_SOURCE``, else DeepMind's repository."""
    return os.environ.get(ENV_SOURCE) or UPSTREAM_URL


def fetch_deepmind(
    names: Iterable[str] = PUBLISHED_FUNCTIONALS,
    source: str | None = None,
    dest_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[tuple[Path, dict]]:
    """Download (or copy from a mirror: ``file://`` URL or plain path) and convert published checkpoints."""
    source = source or default_source()
    results = []
    for name in names:
        if name not in UPSTREAM_SHA256:
            raise CheckpointError(f'unknown functional {name!r}: choose from {", ".join(PUBLISHED_FUNCTIONALS)}')
        with tempfile.TemporaryDirectory(prefix=f'dm21-{name}-') as tmp:
            for relative, pinned in UPSTREAM_SHA256[name].items():
                target = Path(tmp) / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                url = _join(source, f'{name}/{relative}')
                if progress:
                    progress(f'{name}: {relative} <- {url}')
                _download(url, target)
                digest = _sha256_file(target)
                if digest != pinned:
                    raise CheckpointError(f'sha256 mismatch for {url}: got {digest}, expected {pinned}')
            results.append(install_deepmind(tmp, dest_dir, name=name))
    return results


def _join(source: str, relative: str) -> str:
    if '://' not in source:
        source = Path(source).resolve().as_uri()
    return source.rstrip('/') + '/' + urllib.parse.quote(relative)


def _download(url: str, target: Path) -> None:
    try:
        if url.startswith('file://'):
            local = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
            shutil.copyfile(local, target)
        else:
            with urllib.request.urlopen(url, timeout=60) as response, target.open('wb') as handle:
                shutil.copyfileobj(response, handle)
    except (OSError, urllib.error.URLError) as exc:
        raise CheckpointError(f'could not fetch {url}: {exc}') from exc
