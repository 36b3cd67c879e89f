"""Parser of ``dm21.reference``: never raises on bad output, returns a named exit code instead."""

from __future__ import annotations

import io
import json
import math

import numpy as np
from aiida import orm
from aiida.parsers import Parser

from aiida_dm21.reference.integer import ARRAY_NAMES
from aiida_dm21.runner.reference import ARRAYS_FILE, RESULTS_FILE

__all__ = ('DM21ReferenceParser',)


class DM21ReferenceParser(Parser):
    def parse(self, **kwargs):
        retrieved = self.retrieved
        names = retrieved.base.repository.list_object_names()
        if RESULTS_FILE not in names:
            return self.exit_codes.ERROR_MISSING_RESULTS
        try:
            payload = json.loads(retrieved.base.repository.get_object_content(RESULTS_FILE))
        except (ValueError, UnicodeDecodeError) as exc:
            return self.exit_codes.ERROR_UNREADABLE_RESULTS.format(detail=str(exc))
        if not isinstance(payload, dict):
            return self.exit_codes.ERROR_UNREADABLE_RESULTS.format(detail='results.json is not an object')
        error = payload.get('error')
        if error:
            detail = str(error.get('message', error)) if isinstance(error, dict) else str(error)
            if isinstance(error, dict) and error.get('category') == 'unsupported_input':
                return self.exit_codes.ERROR_UNSUPPORTED_INPUT.format(detail=detail)
            return self.exit_codes.ERROR_RUNNER_FAILED.format(detail=detail)
        scalars, spec = payload.get('scalars'), payload.get('spec')
        if not isinstance(scalars, dict) or not isinstance(spec, dict) or ARRAYS_FILE not in names:
            return self.exit_codes.ERROR_UNREADABLE_RESULTS.format(detail='scalars, spec or arrays.npz missing')
        try:
            raw = retrieved.base.repository.get_object_content(ARRAYS_FILE, mode='rb')
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                arrays = {k: np.asarray(data[k]) for k in ARRAY_NAMES}
        except (OSError, ValueError, KeyError, EOFError) as exc:
            return self.exit_codes.ERROR_UNREADABLE_RESULTS.format(detail=f'arrays.npz: {exc}')
        energy = scalars.get('e_ref')
        if not isinstance(energy, (int, float)) or not math.isfinite(energy):
            return self.exit_codes.ERROR_NAN_ENERGY
        node = orm.ArrayData()
        for key, value in arrays.items():
            node.set_array(key, value)
        node.base.attributes.set('spec', spec)
        node.base.attributes.set('scalars', scalars)
        self.out('output_arrays', node)
        self.out('output_parameters', orm.Dict({**scalars, 'wall_s': payload.get('wall_s'), 'spec': spec}))
        return None
