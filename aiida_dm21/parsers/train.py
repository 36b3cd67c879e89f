"""Parser of ``dm21.train``: checkpoint node, loss curves and metrics; never raises on bad output."""

from __future__ import annotations

import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
from aiida import orm
from aiida.parsers import Parser

from aiida_dm21.data.checkpoint import DM21CheckpointData

__all__ = ('DM21TrainParser',)


class DM21TrainParser(Parser):
    def parse(self, **kwargs):
        retrieved = self.retrieved
        names = retrieved.base.repository.list_object_names()
        output = retrieved.base.repository.get_object_content('aiida.out') if 'aiida.out' in names else ''
        if 'non-finite loss' in output:
            return self.exit_codes.ERROR_NON_FINITE_LOSS
        if 'interrupted.json' in names:
            try:
                epochs = json.loads(retrieved.base.repository.get_object_content('interrupted.json'))['epochs_done']
            except (ValueError, KeyError, TypeError):
                epochs = '?'
            return self.exit_codes.ERROR_OUT_OF_WALLTIME.format(epochs=epochs)
        exit_status = self.node.exit_status if self.node.is_finished else None
        scheduler_walltime = getattr(self.exit_codes, 'ERROR_SCHEDULER_OUT_OF_WALLTIME', None)
        for name in ('checkpoint.safetensors', 'history.npz', 'metrics.json'):
            if name not in names:
                if scheduler_walltime is not None and exit_status == scheduler_walltime.status:
                    return self.exit_codes.ERROR_OUT_OF_WALLTIME.format(epochs='?')
                return self.exit_codes.ERROR_MISSING_OUTPUT.format(detail=name)
        try:
            metrics = json.loads(retrieved.base.repository.get_object_content('metrics.json'))
            raw = retrieved.base.repository.get_object_content('history.npz', mode='rb')
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                history = {k: np.asarray(data[k]) for k in data.files}
        except (ValueError, OSError, EOFError) as exc:
            return self.exit_codes.ERROR_UNREADABLE_OUTPUT.format(detail=str(exc))
        if any(not math.isfinite(x) for x in history.get('loss', [])):
            return self.exit_codes.ERROR_NON_FINITE_LOSS
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / 'checkpoint.safetensors'
            path.write_bytes(retrieved.base.repository.get_object_content('checkpoint.safetensors', mode='rb'))
            try:
                checkpoint = DM21CheckpointData(file=str(path))
            except ValueError as exc:
                return self.exit_codes.ERROR_UNREADABLE_OUTPUT.format(detail=f'checkpoint: {exc}')
        curves = orm.ArrayData()
        for key, value in history.items():
            curves.set_array(key, value)
        self.out('checkpoint', checkpoint)
        self.out('loss_curves', curves)
        self.out('metrics', orm.Dict(metrics))
        return None
