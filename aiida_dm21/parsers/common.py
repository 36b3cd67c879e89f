"""Checks shared by the parsers: the scheduler's verdict on the job, and finiteness of every number to be stored."""

from __future__ import annotations

import math
import typing as t

import numpy as np
from aiida.engine import ExitCode
from aiida.parsers import Parser

__all__ = ('NeverRaisingParser', 'first_non_finite', 'first_non_finite_array', 'scheduler_exit_code')


def scheduler_exit_code(parser: Parser) -> ExitCode | None:
    """The exit code the scheduler's output parser put on the node before this parser ran, if it found a problem.

    ``CalcJob.parse`` runs the scheduler's ``parse_output`` first and sets its exit status (110 out of memory,
    120 out of walltime, 131 invalid account, 140 node failure: the ``ERROR_SCHEDULER_*`` codes of ``CalcJob``)
    on the node; a parser whose own outputs are missing or truncated returns that code instead of its own, so
    that the real cause (and the handlers and caching rules attached to it) is kept.
    """
    status = parser.node.exit_status
    if not status:
        return None
    try:
        code = parser.exit_codes(status)
    except ValueError:
        return None
    label = next((key for key, value in parser.exit_codes.items() if value.status == status), '')
    if not label.startswith('ERROR_SCHEDULER_'):
        return None
    message = parser.node.exit_message or code.message
    return ExitCode(code.status, message, invalidates_cache=code.invalidates_cache)


def first_non_finite(value: t.Any, path: str = '') -> str | None:
    """Path (``after.train.mae_all_mha``, ``n_electrons[1]``) of the first NaN or infinite number in ``value``.

    ``value`` is what ``json.loads`` returns (Python's reader accepts ``NaN`` and ``Infinity``); ``None`` when
    every number is finite.  ``orm.Dict`` refuses NaN, so this runs before anything is stored.
    """
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    if isinstance(value, (int, float)):
        return None if math.isfinite(value) else (path or '<value>')
    if isinstance(value, dict):
        for key, item in value.items():
            found = first_non_finite(item, f'{path}.{key}' if path else str(key))
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = first_non_finite(item, f'{path}[{index}]')
            if found:
                return found
        return None
    return None


def first_non_finite_array(arrays: t.Mapping[str, np.ndarray]) -> str | None:
    """Name of the first numeric array holding a NaN or infinite entry, ``None`` when all are finite."""
    for name, array in arrays.items():
        if array.dtype.kind in 'fc' and not np.all(np.isfinite(array)):
            return name
    return None


class NeverRaisingParser(Parser):
    """A parser whose ``parse`` always ends in an exit code: ``_parse`` does the work, any exception it lets out
    becomes the exit code named :attr:`UNREADABLE` (with the error as its ``detail``), as does
    :meth:`_unreadable` for truncated output unless the scheduler's code explains it."""

    UNREADABLE: t.ClassVar[str]

    def parse(self, **kwargs: t.Any) -> ExitCode:
        try:
            return self._parse()
        except Exception as exc:  # a parser must end with an exit code, never a traceback
            self.logger.exception('unexpected error while parsing')
            return self.exit_codes[self.UNREADABLE].format(detail=f'parser error {type(exc).__name__}: {exc}')

    def _parse(self) -> ExitCode:
        raise NotImplementedError

    def _unreadable(self, detail: str) -> ExitCode:
        """The :attr:`UNREADABLE` code, or the scheduler's code when it explains the truncated output."""
        return scheduler_exit_code(self) or self.exit_codes[self.UNREADABLE].format(detail=detail)
