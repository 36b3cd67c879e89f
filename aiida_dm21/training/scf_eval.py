"""Self-consistent evaluation of a functional during training (no AiiDA): held-out SCF energies, an FC curve.

The training loop compares E_xc at fixed (reference) densities; this module runs the functional the way
it is used, self-consistently (:func:`aiida_dm21.functional.scf.KS` on the training grid level):

* ``scf_evaluation``: SCF energies of held-out species against their reference energies (error in mHa,
  MAE over the converged ones);
* ``fractional_evaluation``: E(N+δ) of a held-out atom at δ = 0, ¼, ½, ¾, 1
  (:func:`aiida_dm21.functional.fractional.fractional_charge_curve`) and its largest deviation from the
  straight line between the integer ends (mHa).

Every number is finite or ``None`` (an SCF that ended in NaN: a random initial network can): metrics.json
never holds a NaN.  :func:`plot_curves` draws the curves of the initial and trained functional in one PNG.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np

from .config import FRACTIONAL_DELTAS, TrainConfig

__all__ = ['check_molecules', 'evaluate_scf', 'plot_curves']

HA_TO_MHA = 1000.0


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _molecule(entry: dict):
    from ..reference.integer import build_molecule

    return build_molecule(entry['atom'], entry['basis'], entry.get('charge', 0), entry.get('spin', 0))


def check_molecules(config: TrainConfig) -> None:
    """Build every evaluation molecule once (PySCF), so a bad one is refused before any training."""
    for entry in config.scf_evaluation:
        _molecule(entry)
    if config.fractional_evaluation is not None:
        _molecule(config.fractional_evaluation)


def _cpu_copy(network):
    import torch

    net = copy.deepcopy(network).cpu().to(torch.float32).eval()
    net.requires_grad_(False)
    return net


def _scf_energy(network, entry: dict, grid_level: int) -> tuple[float | None, bool, int]:
    from ..functional.scf import KS

    mol = _molecule(entry)
    mf = KS(mol, network)
    mf.grids.level = grid_level
    mf.verbose = 0
    cycles = 0

    def count(envs):
        nonlocal cycles
        cycles += 1

    mf.callback = count
    energy = mf.kernel()
    return _finite(energy), bool(mf.converged), cycles


def evaluate_scf(network, config: TrainConfig, say=None) -> dict:
    """``{'species': ..., 'fractional_charge': ...}`` for ``config``'s evaluation settings (empty: none asked)."""
    say = say or (lambda message: None)
    out: dict = {}
    if not config.scf_evaluation and config.fractional_evaluation is None:
        return out
    net = _cpu_copy(network)
    if config.scf_evaluation:
        rows, errors = [], []
        for entry in config.scf_evaluation:
            label = entry.get('label') or entry['atom']
            energy, converged, cycles = _scf_energy(net, entry, config.grid_level)
            error = None if energy is None else (energy - float(entry['e_ref'])) * HA_TO_MHA
            rows.append(
                {
                    'label': label,
                    'energy': energy,
                    'e_ref': float(entry['e_ref']),
                    'error_mha': error,
                    'converged': converged,
                    'cycles': cycles,
                }
            )
            if error is not None and converged:
                errors.append(abs(error))
            say(f'SCF evaluation {label}: E = {energy} Ha, error {error} mHa, converged {converged}')
        out['species'] = rows
        out['scf_mae_mha'] = float(np.mean(errors)) if errors else None
        out['scf_n_converged'] = len(errors)
    if config.fractional_evaluation is not None:
        out['fractional_charge'] = _fractional(net, config)
        say(f'fractional-charge curve: max |deviation| {out["fractional_charge"]["max_abs_deviation_mha"]} mHa')
    return out


def _fractional(network, config: TrainConfig) -> dict:
    from ..functional.fractional import Functional, fractional_charge_curve

    spec = config.fractional_evaluation
    mol = _molecule(spec)
    func = Functional(label=config.name, network=network)
    curve = fractional_charge_curve(
        mol, func, FRACTIONAL_DELTAS, spin_next=spec.get('spin_next'), grid_level=config.grid_level
    )
    deviation = curve.deviation * HA_TO_MHA
    finite = bool(np.all(np.isfinite(curve.energy)))
    return {
        'label': spec.get('label') or spec['atom'],
        'system': curve.system,
        'basis': curve.basis,
        'grid_level': curve.grid_level,
        'delta': [float(d) for d in curve.delta],
        'n_alpha': [float(x) for x in curve.n_alpha],
        'n_beta': [float(x) for x in curve.n_beta],
        'energy': [_finite(e) for e in curve.energy],
        'reference': [_finite(e) for e in curve.reference],
        'deviation_mha': [_finite(d) for d in deviation],
        'max_abs_deviation_mha': _finite(np.max(np.abs(deviation))) if finite else None,
        'converged': [bool(c) for c in curve.converged],
        'cycles': [int(c) for c in curve.cycles],
        'all_converged': curve.all_converged,
    }


def plot_curves(curves: dict[str, dict], path: str | Path) -> Path | None:
    """PNG of the ``fractional_charge`` records in ``curves`` (label -> record); None if none is finite."""
    from ..functional.fractional import FractionalCurve, plot_fractional_curves

    drawn = []
    for label, rec in curves.items():
        if rec is None or rec.get('max_abs_deviation_mha') is None:
            continue
        drawn.append(
            FractionalCurve(
                kind='charge',
                functional=label,
                system=rec['system'],
                basis=rec['basis'],
                grid_level=rec['grid_level'],
                delta=np.asarray(rec['delta']),
                n_alpha=np.asarray(rec['n_alpha']),
                n_beta=np.asarray(rec['n_beta']),
                energy=np.asarray(rec['energy'], dtype=float),
                reference=np.asarray(rec['reference'], dtype=float),
                converged=np.asarray(rec['converged'], dtype=bool),
                cycles=np.asarray(rec['cycles']),
            )
        )
    if not drawn:
        return None
    return plot_fractional_curves(drawn, path)
