"""``dm21.dataset``: a set of fixed-density training systems (one ``.npz`` in the node's repository).

Attributes (queryable): ``n_systems``, ``kinds`` (counts of integer / fc / fs), ``elements``, ``basis``,
``labels``, ``reference_method`` and ``checksum`` (sha256 of the content, also the caching key).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import typing as t

from aiida.orm import SinglefileData
from aiida.orm.nodes.caching import NodeCaching

from aiida_dm21.reference.dataset import DatasetError, load_dataset

if t.TYPE_CHECKING:
    from aiida_dm21.reference.system import TrainingSystem

__all__ = ('DM21DatasetData',)

ATTRIBUTES = ('n_systems', 'kinds', 'elements', 'basis', 'labels', 'checksum', 'reference_method')


class _DatasetCaching(NodeCaching):
    """The hash of a dataset is its class and content checksum: file name, other attributes and repository layout
    do not enter, so two nodes holding the same systems are the same input for the caching of what uses them."""

    def get_objects_to_hash(self) -> dict[str, t.Any]:
        checksum = self._node.base.attributes.get('checksum', None)
        if not checksum:  # not a file written by save_dataset: hash like any other node
            return super().get_objects_to_hash()
        return {'class': str(self._node.__class__), 'checksum': checksum}


class DM21DatasetData(SinglefileData):
    """Training systems (densities, targets, natural orbitals) built from integer reference calculations."""

    _CLS_NODE_CACHING = _DatasetCaching
    DEFAULT_FILENAME = 'dataset.npz'

    def set_file(self, file, filename: str | None = None, **kwargs) -> None:  # type: ignore[override]
        if hasattr(file, 'read'):
            content = file.read()
            if isinstance(content, str):
                raise TypeError('the dataset stream must be opened in binary mode')
            with tempfile.TemporaryDirectory(prefix='dm21-dataset-') as tmp:
                path = pathlib.Path(tmp) / self.DEFAULT_FILENAME
                path.write_bytes(content)
                self._set_checked(path, filename, **kwargs)
            return
        if not isinstance(file, (str, pathlib.PurePath)):
            raise TypeError(f'expected a path or a binary file-like object, got {type(file).__name__}')
        self._set_checked(pathlib.Path(file), filename, **kwargs)

    def _set_checked(self, path: pathlib.Path, filename: str | None, **kwargs) -> None:
        """Validate the dataset file at ``path`` (format, checksum, finite values), then keep it."""
        try:
            _, meta = load_dataset(path)
        except DatasetError as exc:
            raise ValueError(f'not a valid dm21 dataset: {exc}') from exc
        super().set_file(str(path), filename=filename or self.DEFAULT_FILENAME, **kwargs)
        for key in ATTRIBUTES:
            self.base.attributes.set(key, meta.get(key))

    def __getattr__(self, name: str) -> t.Any:
        if name in ATTRIBUTES:
            return self.base.attributes.get(name, None)
        raise AttributeError(name)

    def export(  # type: ignore[override]
        self, path: str | os.PathLike, fileformat: str | None = None, overwrite: bool = False, **kwargs: t.Any
    ) -> list[str]:
        """Write the dataset's ``.npz`` (byte-identical, what the training runner reads) to ``path``; ``[path]``.

        The content is checked against the node's ``checksum`` before the file appears: a damaged repository
        file raises ``ValueError`` and leaves nothing at ``path``.

        :param fileformat: only ``'npz'`` (the default, whatever the extension of ``path``).
        :param overwrite: replace an existing file.
        """
        return super().export(os.fspath(path), fileformat=fileformat or 'npz', overwrite=overwrite, **kwargs)

    def _prepare_npz(self, main_file_name: str = '', **kwargs: t.Any) -> tuple[bytes, dict]:
        """Exporter for :meth:`export` (``fileformat='npz'``): the stored bytes, once they match the checksum."""
        content = self.get_content(mode='rb')
        name = f'dm21.dataset<{self.pk if self.is_stored else "unstored"}>'
        try:
            _, meta = _load_content(content)
        except DatasetError as exc:
            raise ValueError(f'{name} holds a damaged file: {exc}') from exc
        if self.checksum and meta.get('checksum') != self.checksum:
            raise ValueError(f"{name}: the file's checksum {meta.get('checksum')} is not the node's {self.checksum}")
        return content, {}

    def load_systems(self) -> list[TrainingSystem]:
        """The training systems, read back and checked against the checksum."""
        return _load_content(self.get_content(mode='rb'))[0]


def _load_content(content: bytes) -> tuple[list[TrainingSystem], dict]:
    """:func:`~aiida_dm21.reference.dataset.load_dataset` of a dataset file's bytes (through a temporary file: it
    reads a path)."""
    with tempfile.TemporaryDirectory(prefix='dm21-dataset-') as tmp:
        path = pathlib.Path(tmp) / DM21DatasetData.DEFAULT_FILENAME
        path.write_bytes(content)
        return load_dataset(path)
