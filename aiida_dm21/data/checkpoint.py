"""``dm21.checkpoint``: a DM21-architecture network checkpoint (one ``.safetensors`` file) as an AiiDA data node.

The file is kept byte-for-byte in the node's repository; what it contains (name, source, architecture,
number of parameters, feature names, omegas, content hash, format version, upstream hashes) is copied
into attributes so it can be queried without opening the file::

    from aiida_dm21.data.checkpoint import DM21CheckpointData
    node = DM21CheckpointData.get_or_create('/path/to/DM21.safetensors')  # stored, deduplicated
    node.name, node.weights_sha256, node.n_parameters
    network = node.load_network()

A file is validated when it is set, with the checks of :func:`aiida_dm21.functional.checkpoint.read_checkpoint`
and :func:`~aiida_dm21.functional.checkpoint.network_from_tensors` done on NumPy arrays
(:mod:`aiida_dm21.functional.checkpoint_format`: no PyTorch is imported): a truncated, corrupt or foreign file
raises :class:`DM21CheckpointError` and nothing is put in the node.  Only :meth:`load_network` needs PyTorch.

Identity is what the network computes, not the filename: the *content* of the weights (``weights_sha256``)
and the metadata that changes the function (``architecture`` with its omegas, ``omegas``, ``feature_names``).
:meth:`get_or_create` returns an existing node with the same identity, and the caching hash of the node is
built from it.
"""

from __future__ import annotations

import io
import os
import pathlib
import tempfile
import typing as t

from aiida.common import exceptions
from aiida.orm import QueryBuilder, SinglefileData
from aiida.orm.nodes.caching import NodeCaching
from aiida.orm.pydantic import OrmMetadataField

# the torch-free half of the checkpoint format: validating a file on the submitting machine needs no PyTorch
from aiida_dm21.functional.checkpoint_format import (
    CheckpointError,
    check_checkpoint_name,
    check_tensors,
    read_checkpoint_arrays,
)

if t.TYPE_CHECKING:
    from aiida_dm21.functional.model import DM21Network

__all__ = ('DM21CheckpointData', 'DM21CheckpointError')

Source: t.TypeAlias = 'str | os.PathLike[str] | t.BinaryIO'

#: Attributes copied from the checkpoint metadata (``upstream_sha256`` only when the file has it).
METADATA_ATTRIBUTES: tuple[str, ...] = (
    'name',
    'source',
    'architecture',
    'n_parameters',
    'feature_names',
    'omegas',
    'weights_sha256',
    'format_version',
)
OPTIONAL_METADATA_ATTRIBUTES: tuple[str, ...] = ('upstream_sha256',)


class DM21CheckpointError(ValueError):
    """The file given to :class:`DM21CheckpointData` is not a valid aiida-dm21 checkpoint."""


def _read_source(source: Source) -> tuple[bytes, str | None]:
    """The bytes of ``source`` (a path or a binary stream) and its file name when it has one."""
    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        if not path.is_file():
            raise DM21CheckpointError(f'checkpoint file {path} does not exist or is not a file')
        return path.read_bytes(), path.name
    if not hasattr(source, 'read'):
        raise TypeError(f'expected a path or a binary file-like object, got {type(source).__name__}')
    content = source.read()
    if isinstance(content, str):
        raise TypeError('the checkpoint stream must be opened in binary mode')
    name = getattr(source, 'name', None)
    return bytes(content), (os.path.basename(name) if isinstance(name, str) and name else None)


def _validate_content(content: bytes, origin: str) -> dict[str, t.Any]:
    """Validate checkpoint bytes (format, version, hash, architecture, shapes, finite values); return the metadata.

    The core reader's checks on NumPy arrays: PyTorch is not imported.
    """
    # safetensors reads from a file: write the bytes to a private temporary file for the check.
    with tempfile.TemporaryDirectory(prefix='dm21-checkpoint-') as tmp:
        path = pathlib.Path(tmp) / 'checkpoint.safetensors'
        path.write_bytes(content)
        try:
            tensors, metadata = read_checkpoint_arrays(path)
            check_tensors(tensors, metadata, origin)
        except CheckpointError as exc:
            message = str(exc).replace(str(path), origin)
            raise DM21CheckpointError(f'refusing {origin}: {message}') from exc
    missing = [key for key in METADATA_ATTRIBUTES if key not in metadata]
    if missing:
        raise DM21CheckpointError(f'refusing {origin}: the checkpoint metadata lacks {", ".join(missing)}')
    return metadata


#: The attributes that make the function a checkpoint computes: the weights and what the network does with them
#: (the architecture holds the omegas of the local-HF features, the layer-norm epsilon and the input offsets).
IDENTITY_ATTRIBUTES: tuple[str, ...] = ('weights_sha256', 'architecture', 'omegas', 'feature_names', 'format_version')


def _identity(attributes: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """The identity of a checkpoint (see :data:`IDENTITY_ATTRIBUTES`), omegas as floats so ``0`` equals ``0.0``."""
    identity = {key: attributes.get(key, None) for key in IDENTITY_ATTRIBUTES}
    architecture = dict(identity['architecture'] or {})
    if 'omegas' in architecture:
        architecture['omegas'] = [float(w) for w in architecture['omegas']]
    identity['architecture'] = architecture
    if identity['omegas'] is not None:
        identity['omegas'] = [float(w) for w in identity['omegas']]
    return identity


class DM21CheckpointCaching(NodeCaching):
    """Caching hash of a checkpoint: its class and its identity (weights and architecture), not the filename."""

    def get_objects_to_hash(self) -> dict[str, t.Any]:
        node = self._node
        return {'class': str(node.__class__), **_identity(node.base.attributes.all)}


class DM21CheckpointData(SinglefileData):
    """A DM21-architecture network checkpoint (``.safetensors``), validated, with its metadata as attributes."""

    DEFAULT_FILENAME = 'checkpoint.safetensors'

    _CLS_NODE_CACHING = DM21CheckpointCaching

    class AttributesModel(SinglefileData.AttributesModel):
        name: str = OrmMetadataField(description='Name of the functional (e.g. DM21)', read_only=True)
        source: str = OrmMetadataField(  # type: ignore[assignment]
            description="Where the weights come from ('deepmind:DM21', 'trained', ...)", read_only=True
        )
        architecture: dict = OrmMetadataField(description='Hyper-parameters of the network', read_only=True)
        n_parameters: int = OrmMetadataField(description='Number of network parameters', read_only=True)
        feature_names: list[str] = OrmMetadataField(description='Order of the input features', read_only=True)
        omegas: list[float] = OrmMetadataField(description='Range-separation omegas of the HF features', read_only=True)
        weights_sha256: str = OrmMetadataField(description='sha256 of the tensors (content identity)', read_only=True)
        format_version: int = OrmMetadataField(description='Version of the checkpoint format', read_only=True)
        upstream_sha256: dict | None = OrmMetadataField(
            None, description="sha256 of DeepMind's published files, for converted checkpoints", read_only=True
        )

    def __init__(
        self,
        file: Source | None = None,
        filename: str | pathlib.Path | None = None,
        **kwargs: t.Any,
    ) -> None:
        """A checkpoint node from a ``.safetensors`` file path or binary stream (validated first).

        :param file: path (absolute or relative) or binary file-like object of the checkpoint.
        :param filename: name under which the file is stored (default: the source's name, else
            ``checkpoint.safetensors``).
        :raises DM21CheckpointError: the file is missing, corrupt, or not an aiida-dm21 checkpoint.
        """
        if 'content' in kwargs:
            raise TypeError('pass the checkpoint as `file` (a path or a binary stream), not `content`')
        # Validate before the node exists: a refused file leaves nothing behind, not even an unstored node.
        prepared = self._prepare(file, filename) if file is not None else None
        super().__init__(None, **kwargs)
        if prepared is not None:
            self._set_prepared(*prepared)

    @classmethod
    def _prepare(cls, file: Source, filename: str | pathlib.Path | None) -> tuple[bytes, str, dict[str, t.Any]]:
        """Content, repository file name and metadata of a checkpoint source, validated."""
        content, source_name = _read_source(file)
        metadata = _validate_content(content, source_name or 'the checkpoint stream')
        key = pathlib.PurePath(filename).name if filename is not None else source_name or cls.DEFAULT_FILENAME
        if not key.endswith('.safetensors'):
            key = f'{key}.safetensors'
        try:
            check_checkpoint_name(key[: -len('.safetensors')])
        except CheckpointError as exc:
            raise DM21CheckpointError(f'refusing the file name {filename or source_name!r}: {exc}') from exc
        return content, key, metadata

    def _set_prepared(self, content: bytes, key: str, metadata: dict[str, t.Any]) -> None:
        super().set_file(io.BytesIO(content), filename=key)
        for attribute in METADATA_ATTRIBUTES:
            self.base.attributes.set(attribute, metadata[attribute])
        for attribute in OPTIONAL_METADATA_ATTRIBUTES:
            if metadata.get(attribute) is not None:
                self.base.attributes.set(attribute, metadata[attribute])
            elif attribute in self.base.attributes.all:
                self.base.attributes.delete(attribute)

    def set_file(self, file: Source, filename: str | pathlib.Path | None = None) -> None:  # type: ignore[override]
        """Validate the checkpoint and store it in the repository, with its metadata as attributes."""
        self._set_prepared(*self._prepare(file, filename))

    def _validate(self) -> bool:
        """Before storing: one valid checkpoint file whose content hash is the ``weights_sha256`` attribute."""
        super()._validate()
        missing = [key for key in METADATA_ATTRIBUTES if self.base.attributes.get(key, None) is None]
        if missing:
            raise exceptions.ValidationError(f'checkpoint node lacks the attributes {", ".join(missing)}: set a file')
        try:
            metadata = _validate_content(self.get_content(mode='rb'), self.filename)
        except DM21CheckpointError as exc:
            raise exceptions.ValidationError(str(exc)) from exc
        if metadata['weights_sha256'] != self.weights_sha256:
            raise exceptions.ValidationError(
                f'the file holds weights {metadata["weights_sha256"]}, the node says {self.weights_sha256}'
            )
        return True

    # --- construction with deduplication ----------------------------------------------------------------

    @classmethod
    def get_or_create(cls, source: Source, filename: str | None = None) -> DM21CheckpointData:
        """The stored node holding these weights: an existing one with the same ``weights_sha256``, else a new one.

        :param source: path or binary stream of a ``.safetensors`` checkpoint.
        :param filename: name for the file in a newly created node.
        :raises DM21CheckpointError: the file is not a valid checkpoint (nothing is stored).
        """
        content, key, metadata = cls._prepare(source, filename)
        existing = cls.find(metadata['weights_sha256'], architecture=metadata)
        if existing is not None:
            return existing
        node = cls()
        node._set_prepared(content, key, metadata)
        return node.store()

    @classmethod
    def find(
        cls, weights_sha256: str, architecture: t.Mapping[str, t.Any] | DM21CheckpointData | None = None
    ) -> DM21CheckpointData | None:
        """The oldest stored checkpoint node with this content hash, or ``None``.

        :param architecture: the rest of the identity: a checkpoint's metadata (or a node) whose architecture,
            omegas and feature names the node must have too.  Without it, any node with these tensors.
        """
        builder = QueryBuilder().append(
            cls, filters={'attributes.weights_sha256': weights_sha256}, project='*', tag='checkpoint'
        )
        builder.order_by({'checkpoint': {'id': 'asc'}})
        if architecture is None:
            found = builder.first()
            return found[0] if found else None
        attributes = architecture.base.attributes.all if isinstance(architecture, DM21CheckpointData) else architecture
        wanted = _identity({**dict(attributes), 'weights_sha256': weights_sha256})
        for (node,) in builder.iterall():
            if _identity(node.base.attributes.all) == wanted:
                return node
        return None

    # --- properties ---------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Name of the functional (``DM21``, ``DM21m`` ..., or the name given when training)."""
        return self.base.attributes.get('name')

    @property
    def checkpoint_source(self) -> str:
        """Where the weights come from (``deepmind:DM21``, ``trained`` ...)."""
        return self.base.attributes.get('source')

    @property
    def architecture(self) -> dict:
        return self.base.attributes.get('architecture')

    @property
    def n_parameters(self) -> int:
        return self.base.attributes.get('n_parameters')

    @property
    def feature_names(self) -> list[str]:
        return self.base.attributes.get('feature_names')

    @property
    def omegas(self) -> list[float]:
        return self.base.attributes.get('omegas')

    @property
    def weights_sha256(self) -> str:
        """Content hash of the weights (independent of file name and layout)."""
        return self.base.attributes.get('weights_sha256')

    @property
    def format_version(self) -> int:
        return self.base.attributes.get('format_version')

    @property
    def upstream_sha256(self) -> dict | None:
        """sha256 of the DeepMind files a converted checkpoint came from, or ``None``."""
        return self.base.attributes.get('upstream_sha256', None)

    # --- using the weights --------------------------------------------------------------------------------

    def load_network(self) -> DM21Network:
        """The PyTorch :class:`~aiida_dm21.functional.model.DM21Network` of this checkpoint (validated again)."""
        from aiida_dm21.functional.checkpoint import load_network

        with self.as_path() as path:
            try:
                network, _ = load_network(pathlib.Path(path))
            except CheckpointError as exc:
                raise DM21CheckpointError(f'the file of node {self.pk} does not load: {exc}') from exc
        return network

    def export(  # type: ignore[override]
        self, path: str | os.PathLike, fileformat: str | None = None, overwrite: bool = False, **kwargs: t.Any
    ) -> list[str]:
        """Write the checkpoint file (byte-identical) to ``path``; returns ``[path]``.

        :param fileformat: only ``'safetensors'`` (the default, whatever the extension of ``path``).
        :param overwrite: replace an existing file.
        """
        return super().export(os.fspath(path), fileformat=fileformat or 'safetensors', overwrite=overwrite, **kwargs)

    def _prepare_safetensors(self, main_file_name: str = '', **kwargs: t.Any) -> tuple[bytes, dict]:
        """Exporter for :meth:`export` (``fileformat='safetensors'``)."""
        return self.get_content(mode='rb'), {}
