"""Does fitting the exact conditions (``constraint_weight`` μ) carry linearity to elements the training never saw?

The numerical core only (no AiiDA): CCSD(T) references of the built-in ``light_train`` species (H..N atoms and
cations, H2/H2+, LiH/LiH+) and ``light_heldout`` (O+/O, F+/F), densities UHF/6-31G, targets in
``--reference-basis``; every FC/FS source among the integer systems (what the conditions need).  DM21m is
fine-tuned once per μ with the same seed, data and schedule, and the table gives, per split, the fixed-density
MAE of E_xc (FC, FS, integer: these carry the reference's basis-set error) and the mean |r| of the conditions
(r FC = E(N+δ) − (1−δ)E(N) − δE(N+1), r FS = E(ens) − E(pure) of the model's own total energies: no reference
in them).  The held-out r FC is what a self-consistent FC curve of O or F would show as its deviation from the
straight line, at fixed densities.

    python benchmarks/exact_conditions.py                       # μ = 0, 1, 10; cc-pVTZ targets; ~15 min, 2 cores
    python benchmarks/exact_conditions.py --weights 0,10 --epochs 3 --reference-basis none
    python benchmarks/exact_conditions.py --weights 0,100 --epochs 4 --reference-basis none --scf-curve
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

from aiida_dm21.functional.checkpoint import load_network
from aiida_dm21.reference.constants import fractions_problem
from aiida_dm21.reference.fractional import fractional_charge_systems, fractional_spin_systems, integer_system
from aiida_dm21.reference.integer import IntegerSpec, run_integer_system
from aiida_dm21.reference.sets import get_set
from aiida_dm21.training.config import TrainConfig
from aiida_dm21.training.scf_eval import evaluate_scf
from aiida_dm21.training.train import train

BASIS = '6-31g'
KEYS = ('fc', 'fs', 'integer', 'constraint_fc', 'constraint_fs')
CURVE = {'atom': 'O 0 0 0', 'basis': BASIS, 'charge': 1, 'spin': 3, 'spin_next': 2, 'label': 'O+ -> O'}


def _weights(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(',') if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: expected numbers separated by commas') from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f'{text!r}: every weight must be a finite number >= 0')
    return values


def _fractions(text: str) -> list[float]:
    """argparse type of ``--deltas``: refused as ``dm21.reference_data`` refuses its ``deltas``."""
    try:
        values = [float(x) for x in text.split(',') if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r}: expected numbers separated by commas') from None
    problem = fractions_problem('deltas', values)
    if problem:
        raise argparse.ArgumentTypeError(f'{text!r}: {problem}')
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--weights', type=_weights, default=[0.0, 1.0, 10.0], help='values of μ (default 0,1,10)')
    parser.add_argument('--reference-basis', default='cc-pvtz', help='basis of the CCSD(T) targets; none: 6-31G')
    parser.add_argument('--epochs', type=int, default=5)
    parser.add_argument('--learning-rate', type=float, default=1e-4)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--grid-level', type=int, default=1)
    parser.add_argument('--deltas', type=_fractions, default=[0.25, 0.5, 0.75], help='FC fractions δ')
    parser.add_argument('--workdir', type=Path, default=Path('exact_conditions_work'), help='prepared data go here')
    parser.add_argument('--summary', type=Path, default=None, help='write the results as JSON to this file')
    parser.add_argument(
        '--scf-curve',
        action='store_true',
        help='also the self-consistent O+ -> O curve E(N+δ), δ = 0, ¼ … 1, of DM21m and of each trained network',
    )
    args = parser.parse_args(argv)
    if args.reference_basis.lower() in ('none', BASIS):
        args.reference_basis = None
    return args


def build(set_name: str, reference_basis: str | None, deltas: list[float], say) -> list:
    """The set's integer systems (every FC/FS source among them), then its FC and FS systems."""
    definition = get_set(set_name)
    results = {}
    for species in definition['species']:
        t = time.perf_counter()
        spec = IntegerSpec(
            atom=species['atom'],
            basis=BASIS,
            charge=species['charge'],
            spin=species['multiplicity'] - 1,
            reference_method=definition['reference_method'],
            reference_basis=reference_basis,
            label=species['label'],
        )
        result = results[species['label']] = run_integer_system(spec)
        say(f'  {set_name} {species["label"]}: E_ref {result.e_ref:.6f} ({time.perf_counter() - t:.1f} s)')
    systems = [integer_system(result) for result in results.values()]
    for lower, upper in definition['fractional_charge']:
        systems += fractional_charge_systems(results[lower], results[upper], deltas=deltas)
    for label in definition['fractional_spin']:
        systems += fractional_spin_systems(results[label], fractions=(0.5,))
    return systems


def _cell(before: dict, after: dict, key: str) -> str:
    b, a = before.get(f'mae_{key}_mha'), after.get(f'mae_{key}_mha')
    return '-' if b is None else f'{b:.1f} -> {a:.1f}'


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = print
    start = time.perf_counter()
    network = load_network('DM21m')[0]
    say(f'references: CCSD(T)/{args.reference_basis or BASIS} on UHF/{BASIS} densities')
    train_systems = build('light_train', args.reference_basis, args.deltas, say)
    heldout = build('light_heldout', args.reference_basis, args.deltas, say)
    prepared = args.workdir / f'prepared-level{args.grid_level}'
    rows = {}
    curves = {}

    def curve(name: str, net) -> None:  # on the training grid
        config = TrainConfig.from_dict({'grid_level': args.grid_level, 'fractional_evaluation': CURVE})
        curves[name] = evaluate_scf(net, config)['fractional_charge']

    if args.scf_curve:
        curve('DM21m', network)
    for mu in args.weights:
        config = TrainConfig.from_dict(
            {
                'epochs': args.epochs,
                'learning_rate': args.learning_rate,
                'batch_size': args.batch_size,
                'grid_level': args.grid_level,
                'lr_schedule': 'cosine',
                'warmup_epochs': 1,
                'max_grad_norm': 1.0,
                'regulariser_weight': 1.0,
                'constraint_weight': mu,
                'seed': 0,
            }
        )
        t = time.perf_counter()
        result = train(train_systems, config, network, heldout=heldout, prepared_dir=prepared, progress=None)
        rows[mu] = {'metrics': result.metrics, 'wall_s': time.perf_counter() - t}
        say(f'μ = {mu:g}: trained in {rows[mu]["wall_s"]:.0f} s')
        if args.scf_curve:
            curve(f'μ = {mu:g}', result.network)
    print(
        f'\n== fixed-density MAE (mHa), DM21m -> fine-tuned ({len(train_systems)} training systems, '
        f'{len(heldout)} held out; {args.epochs} epochs; targets CCSD(T)/{args.reference_basis or BASIS}) =='
    )
    print(f'{"μ":>5} {"split":<8} ' + ' '.join(f'{k:>15}' for k in ('FC', 'FS', 'integer', 'r FC', 'r FS')))
    for mu, row in rows.items():
        for split in ('train', 'heldout'):
            b, a = row['metrics']['before'][split], row['metrics']['after'][split]
            print(f'{mu:>5g} {split:<8} ' + ' '.join(f'{_cell(b, a, k):>15}' for k in KEYS))
    if 0.0 in rows:
        base = rows[0.0]['metrics']['after']['heldout']
        for mu, row in rows.items():
            if mu > 0:
                after = row['metrics']['after']['heldout']
                ratios = ', '.join(
                    f'{k} {after[f"mae_{k}_mha"] / base[f"mae_{k}_mha"]:.2f}' for k in ('constraint_fc', 'fc', 'fs')
                )
                print(f'held-out after, μ = {mu:g} / μ = 0: {ratios}')
    if curves:
        print(f'\n== SCF {CURVE["label"]} (grid level {args.grid_level}): E(N+δ) − linear (mHa), δ = 0, ¼, ½, ¾, 1 ==')
        for name, fc in curves.items():
            points = ' '.join(
                f'{d:7.2f}{"" if ok else "*"}' for d, ok in zip(fc['deviation_mha'], fc['converged'], strict=True)
            )
            print(f'{name:<10} {points}   max {fc["max_abs_deviation_mha"]:.2f}   (* not converged)')
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f'peak RSS {peak:.0f} MB; total {time.perf_counter() - start:.0f} s')
    if args.summary:
        results = {'training': {str(k): v for k, v in rows.items()}, 'scf_curves': curves}
        args.summary.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == '__main__':
    sys.exit(main())
