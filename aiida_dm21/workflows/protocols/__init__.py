"""Protocols: named sets of default inputs for the workflows, stored as YAML files beside this module.

A protocol file has ``default_inputs`` (shared by every protocol), ``default_protocol`` and ``protocols``
(each with a ``description`` and the inputs it changes).  :class:`ProtocolMixin` reads them; a workflow
class names its file with ``_protocol_file`` and builds its inputs in ``get_builder_from_protocol``.
"""

from __future__ import annotations

import copy
import functools
import pathlib
import typing as t

__all__ = ('ProtocolError', 'ProtocolMixin', 'recursive_merge')

PROTOCOLS_DIR = pathlib.Path(__file__).resolve().parent


class ProtocolError(ValueError):
    """An unknown protocol or an override that does not fit the inputs."""


def recursive_merge(base: t.Mapping[str, t.Any], update: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """A deep copy of ``base`` with ``update`` merged in: nested mappings are merged, anything else replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, t.Mapping) and isinstance(merged.get(key), t.Mapping):
            merged[key] = recursive_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@functools.lru_cache(maxsize=8)
def _read(path: pathlib.Path) -> dict[str, t.Any]:
    import yaml

    with path.open(encoding='utf8') as handle:
        data = yaml.safe_load(handle)
    for key in ('default_inputs', 'default_protocol', 'protocols'):
        if key not in data:
            raise ProtocolError(f'protocol file {path} lacks `{key}`')
    return data


class ProtocolMixin:
    """Reads the protocol file ``_protocol_file`` (a name in this folder) of a workflow class."""

    _protocol_file: t.ClassVar[str]

    @classmethod
    def _load_protocol_file(cls) -> dict[str, t.Any]:
        return copy.deepcopy(_read(PROTOCOLS_DIR / cls._protocol_file))

    @classmethod
    def get_default_protocol(cls) -> str:
        """The protocol used when none is given."""
        return cls._load_protocol_file()['default_protocol']

    @classmethod
    def get_available_protocols(cls) -> dict[str, dict[str, str]]:
        """``{name: {'description': ...}}`` for every protocol."""
        protocols = cls._load_protocol_file()['protocols']
        return {name: {'description': spec.get('description', '')} for name, spec in protocols.items()}

    @classmethod
    def get_protocol_inputs(
        cls, protocol: str | None = None, overrides: t.Mapping[str, t.Any] | None = None
    ) -> dict[str, t.Any]:
        """The inputs of ``protocol`` (default inputs, then the protocol's own, then ``overrides``), deep-merged.

        :raises ProtocolError: ``protocol`` is not one of :meth:`get_available_protocols`.
        """
        data = cls._load_protocol_file()
        name = protocol if protocol is not None else data['default_protocol']
        if name not in data['protocols']:
            available = ', '.join(data['protocols'])
            raise ProtocolError(f'unknown protocol {name!r}; available protocols: {available}')
        specific = {key: value for key, value in data['protocols'][name].items() if key != 'description'}
        inputs = recursive_merge(data['default_inputs'], specific)
        return recursive_merge(inputs, overrides or {})
