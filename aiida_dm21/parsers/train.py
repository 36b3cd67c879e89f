"""Parser of ``dm21.train``: checkpoint node, loss curves and metrics; never raises on bad output.

The runner's own verdicts come first: ``error.json`` (a categorised failure, e.g. a NaN loss -> 410) and
``interrupted.json`` (stopped for the walltime with its state saved -> 310).  In a data-parallel (``torchrun``)
run, every failed process writes its own error file and the earliest is the cause; and a process killed outright
(SIGKILL, a segfault) leaves only torchrun's report on stderr, "Root Cause (first observed failure)" with its exit
code: its siblings, stopped by torchrun's SIGTERM, wrote ``interrupted.json`` as for the walltime, but the job
failed (350, ``worker_failed``) and resuming it would only fail again.  When the outputs are missing
or truncated and the scheduler reported a problem (110 out of memory, 120 out of walltime, 140 node
failure, set on the node before parsing), the scheduler's code is returned, which the training workchain
restarts from.  Nothing is stored unless every metric, every loss-curve value and every weight is finite.
"""

from __future__ import annotations

import fnmatch
import io
import json
import re
import signal
import tempfile
import typing as t
from pathlib import Path

import numpy as np
from aiida import orm
from aiida.common.exceptions import NotExistent
from aiida.engine import ExitCode

from aiida_dm21.data.checkpoint import DM21CheckpointData
from aiida_dm21.parsers.common import NeverRaisingParser, first_non_finite, first_non_finite_array, scheduler_exit_code
from aiida_dm21.training.config import ERROR_FILE, EXIT_INTERRUPTED, RANK_ERROR_PATTERN, STOP_SIGNALS

__all__ = ('DM21TrainParser',)

CHECKPOINT_FILE = 'checkpoint.safetensors'
HISTORY_FILE = 'history.npz'
METRICS_FILE = 'metrics.json'
INTERRUPTED_FILE = 'interrupted.json'
FRACTIONAL_PLOT = 'fractional_curve.png'
SCHEDULER_STDERR = '_scheduler-stderr.txt'
#: exit codes of a torchrun worker that stopped for a stop signal: the runner's own, or the signal itself (-signum)
_STOPPED = {EXIT_INTERRUPTED, *(-int(getattr(signal, name)) for name in STOP_SIGNALS)}
_ROOT_CAUSE = re.compile(
    r'Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)[^\n]*'
    r'(?:.*?traceback\s*:\s*([^\n]*))?',
    re.S,
)


def worker_failure(stderr: str) -> str | None:
    """What killed a torchrun worker, from torchrun's ChildFailedError report in ``stderr``; ``None`` when there is
    no such report or its root cause is a worker that stopped for a stop signal (the walltime)."""
    if 'ChildFailedError' not in stderr:
        return None
    match = _ROOT_CAUSE.search(stderr)
    if match is None:
        return 'torchrun reported a failed process (no root cause given)'
    rank, code, trace = int(match.group(1)), int(match.group(2)), (match.group(3) or '').strip()
    if code in _STOPPED:
        return None
    return f'process {rank} of the data-parallel run exited with code {code}' + (f' ({trace})' if trace else '')


class DM21TrainParser(NeverRaisingParser):
    """``checkpoint.safetensors`` -> ``checkpoint``, ``history.npz`` -> ``loss_curves``, ``metrics.json``,
    ``fractional_curve.png`` (if written) -> ``fractional_plot``."""

    UNREADABLE = 'ERROR_UNREADABLE_OUTPUT'

    def _json(self, name: str) -> t.Any:
        return json.loads(self.retrieved.base.repository.get_object_content(name, mode='r'))

    def _runner_error(self, names: list[str]) -> ExitCode:
        """The verdict of the error files ``names`` (error.json, error_rank<k>.json): the earliest one's."""
        errors = []
        for name in names:
            try:
                error = self._json(name).get('error')
            except (OSError, ValueError, UnicodeDecodeError, AttributeError) as exc:
                return self._unreadable(f'{name}: {type(exc).__name__}: {exc}')
            if not isinstance(error, dict):
                error = {'category': 'internal_error', 'message': str(error)}
            when = error.get('time')
            errors.append((when if isinstance(when, (int, float)) else float('inf'), name != ERROR_FILE, name, error))
        _, _, name, error = min(errors, key=lambda item: item[:3])
        category, detail = str(error.get('category', 'internal_error')), str(error.get('message', 'no message'))
        if name != ERROR_FILE:
            detail = f'process {error.get("rank", name)}: {detail}'
        if category == 'non_finite_loss':
            return self.exit_codes.ERROR_NON_FINITE_LOSS.format(detail=detail)
        if category == 'unsupported_input':
            return self.exit_codes.ERROR_UNSUPPORTED_INPUT.format(detail=detail)
        if category == 'unsupported_format':
            return self.exit_codes.ERROR_UNSUPPORTED_FORMAT_VERSION.format(detail=detail)
        return scheduler_exit_code(self) or self.exit_codes.ERROR_RUNNER_FAILED.format(category=category, detail=detail)

    def _stderr(self) -> str:
        name = self.node.get_option('scheduler_stderr') or SCHEDULER_STDERR
        try:
            return self.retrieved.base.repository.get_object_content(name, mode='r')
        except (OSError, ValueError, UnicodeDecodeError):
            return ''

    def _interrupted(self) -> ExitCode:
        failure = worker_failure(self._stderr())
        if failure is not None:
            return self.exit_codes.ERROR_RUNNER_FAILED.format(category='worker_failed', detail=failure)
        try:
            epochs = self._json(INTERRUPTED_FILE)['epochs_done']
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
            epochs = '?'
        return self.exit_codes.ERROR_OUT_OF_WALLTIME.format(epochs=epochs)

    def _parse(self) -> ExitCode:
        try:
            retrieved = self.retrieved
        except NotExistent:
            return self.exit_codes.ERROR_NO_RETRIEVED_FOLDER
        names = retrieved.base.repository.list_object_names()
        errors = [name for name in names if name == ERROR_FILE or fnmatch.fnmatch(name, RANK_ERROR_PATTERN)]
        if errors:
            return self._runner_error(sorted(errors))
        if INTERRUPTED_FILE in names:
            return self._interrupted()
        for name in (CHECKPOINT_FILE, HISTORY_FILE, METRICS_FILE):
            if name not in names:
                return scheduler_exit_code(self) or self.exit_codes.ERROR_MISSING_OUTPUT.format(detail=name)

        try:
            metrics = self._json(METRICS_FILE)
            raw = retrieved.base.repository.get_object_content(HISTORY_FILE, mode='rb')
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                history = {k: np.asarray(data[k]) for k in data.files}
            weights = retrieved.base.repository.get_object_content(CHECKPOINT_FILE, mode='rb')
        except (ValueError, OSError, EOFError, UnicodeDecodeError, RecursionError) as exc:
            return self._unreadable(f'{type(exc).__name__}: {exc}')
        if not isinstance(metrics, dict):
            return self._unreadable(f'{METRICS_FILE} is not a JSON object')
        if 'loss' not in history or any(array.dtype.kind not in 'fiu' for array in history.values()):
            return self._unreadable(f'{HISTORY_FILE} has no numeric loss curve')

        loss = np.asarray(history['loss'], dtype=float)
        if not np.all(np.isfinite(loss)):
            epoch = int(np.flatnonzero(~np.isfinite(loss))[0]) + 1
            return self.exit_codes.ERROR_NON_FINITE_LOSS.format(detail=f'{HISTORY_FILE}: loss of epoch {epoch}')
        bad = first_non_finite_array(history)
        if bad:
            return self.exit_codes.ERROR_NON_FINITE_VALUE.format(key=f'{HISTORY_FILE}:{bad}')
        bad = first_non_finite(metrics)
        if bad:
            return self.exit_codes.ERROR_NON_FINITE_VALUE.format(key=f'{METRICS_FILE}:{bad}')
        bad = _non_finite_weight(weights)
        if bad:
            return self.exit_codes.ERROR_NON_FINITE_VALUE.format(key=f'{CHECKPOINT_FILE}:{bad}')

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / CHECKPOINT_FILE
            path.write_bytes(weights)
            try:
                checkpoint = DM21CheckpointData(file=str(path))
            except ValueError as exc:
                return self._unreadable(f'checkpoint: {exc}')
        curves = orm.ArrayData()
        for key, value in history.items():
            curves.set_array(key, value)
        metrics_node = orm.Dict(metrics)
        if FRACTIONAL_PLOT in names:
            png = retrieved.base.repository.get_object_content(FRACTIONAL_PLOT, mode='rb')
            if not png.startswith(b'\x89PNG'):
                return self._unreadable(f'{FRACTIONAL_PLOT} is not a PNG image')
            self.out('fractional_plot', orm.SinglefileData(io.BytesIO(png), filename=FRACTIONAL_PLOT))
        self.out('checkpoint', checkpoint)
        self.out('loss_curves', curves)
        self.out('metrics', metrics_node)
        return ExitCode(0)


def _non_finite_weight(content: bytes) -> str | None:
    """Name of the first tensor of a ``.safetensors`` file with a NaN or infinite entry (``None``: all finite).

    An unreadable file is left to :class:`DM21CheckpointData`, which says what is wrong with it.
    """
    try:
        from safetensors.numpy import load

        tensors = load(content)
    except Exception:  # an unreadable file is reported by the checkpoint validation
        return None
    return first_non_finite_array(tensors)
