"""Parser of ``dm21.relax``: the SCF parser's outputs, plus the relaxed structure and the trajectory."""

from __future__ import annotations

import json
import typing as t

import numpy as np
from aiida import orm
from aiida.engine import ExitCode

from aiida_dm21.parsers.common import first_non_finite
from aiida_dm21.parsers.scf import DM21ScfParser
from aiida_dm21.runner.relax import RELAX_FILE

__all__ = ('DM21RelaxParser',)


class DM21RelaxParser(DM21ScfParser):
    """Reads ``relax.json`` after the SCF outputs; never raises (a bad file is reported as 301)."""

    def _parse(self) -> ExitCode:
        status = super()._parse()
        if status.status == self.exit_codes.ERROR_NO_RETRIEVED_FOLDER.status:
            return status
        trajectory = self._read_trajectory()
        if isinstance(trajectory, str):
            return self.exit_codes.ERROR_INVALID_RESULTS.format(detail=trajectory)
        if trajectory is None:  # the runner refused the input before the optimiser started
            return status
        steps = len(trajectory['positions'])
        last = trajectory.get('final_positions') or (trajectory['positions'][-1] if steps else None)
        if last is not None:
            self.out('output_structure', self._structure(np.asarray(last, dtype=float), trajectory['symbols']))
        if steps:
            self.out('output_trajectory', self._trajectory(trajectory))
        if status.status == self.exit_codes.ERROR_RUNNER_FAILED.status:
            results = self._read_results()
            error = results.get('error') if isinstance(results, dict) else None
            if isinstance(error, dict) and error.get('category') == 'relax_failed':
                return self.exit_codes.ERROR_RELAX_FAILED.format(steps=steps, detail=error.get('message', '?'))
        if status.status == 0 and not trajectory.get('converged'):
            return self.exit_codes.ERROR_RELAX_NOT_CONVERGED.format(steps=steps)
        return status

    def _read_trajectory(self) -> dict[str, t.Any] | str | None:
        if RELAX_FILE not in self.retrieved.base.repository.list_object_names():
            return None
        try:
            data = json.loads(self.retrieved.base.repository.get_object_content(RELAX_FILE))
        except (ValueError, UnicodeDecodeError) as exc:
            return f'{RELAX_FILE} is not JSON: {exc}'
        if not isinstance(data, dict) or not isinstance(data.get('positions'), list):
            return f'{RELAX_FILE} has no list of positions'
        symbols = data.get('symbols')
        if not isinstance(symbols, list) or not symbols or not all(isinstance(x, str) for x in symbols):
            return f'{RELAX_FILE} has no list of element symbols'
        natm = len(symbols)
        structure = self.node.inputs.structure if 'structure' in self.node.inputs else None
        if structure is not None and len(structure.sites) != natm:
            return f'{RELAX_FILE} is for {natm} atoms, the input structure has {len(structure.sites)}'
        try:
            positions = np.asarray(data['positions'], dtype=float).reshape(-1, natm, 3)
            final = data.get('final_positions')
            if final is not None:
                final = np.asarray(final, dtype=float).reshape(natm, 3)
        except (TypeError, ValueError) as exc:
            return f'{RELAX_FILE}: positions are not {natm} 3-vectors per step: {exc}'
        if not np.isfinite(positions).all() or (final is not None and not np.isfinite(final).all()):
            return f'{RELAX_FILE} holds non-finite positions'
        for key in ('energies', 'max_force'):
            values = data.get(key)
            if not isinstance(values, list) or len(values) != len(positions):
                return f'{RELAX_FILE}: {key} does not have one entry per step'
        data['positions'] = positions.tolist()
        return data

    def _structure(self, positions: np.ndarray, symbols: list[str]) -> orm.StructureData:
        if 'structure' in self.node.inputs:  # keeps the input's kinds and names
            structure = self.node.inputs.structure.clone()
            structure.reset_sites_positions(positions.tolist())
            return structure
        structure = orm.StructureData(pbc=(False, False, False))
        for symbol, position in zip(symbols, positions.tolist(), strict=True):
            structure.append_atom(symbols=symbol, position=position)
        return structure

    def _trajectory(self, data: dict[str, t.Any]) -> orm.TrajectoryData:
        trajectory = orm.TrajectoryData()
        trajectory.set_trajectory(list(data['symbols']), np.asarray(data['positions'], dtype=float))
        for key in ('energies', 'max_force'):
            # a step whose energy was not finite (None in relax.json) leaves the whole array out: never NaN stored
            values = [np.nan if v is None else float(v) for v in data[key]]
            if first_non_finite(values) is None:
                trajectory.set_array(key, np.asarray(values))
        return trajectory
