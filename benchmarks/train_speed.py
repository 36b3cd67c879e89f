"""Training throughput and memory on CPU: per-system storage, and peak RSS and points/s against the number of systems.

    python benchmarks/train_speed.py [--grid-level 3] [--systems 10 100] [--batch-size 4]

Part 1, per system (a few fractional-charge systems of growing size): grid points, basis functions, the bytes the
old dense path held in memory for it (ν integrals 2 × g × nao² and AO values 4 × g × nao, float64: what
``training.loss.prepare_system`` keeps) against the bytes of its prepared files on disk (with and without the
regulariser's arrays), and the time of one training step with the regulariser.

Part 2, scaling: for N = ``--systems`` fractional-charge systems of Li+ -> Li (6-31G, HF densities, N different
δ), a fresh process prepares them into a folder and trains one epoch (mini-batches of ``--batch-size``, with the
regulariser); it reports the preparation time, the data on disk, the training points per second and the peak
resident memory (VmHWM) of the process.  Peak memory should not grow with N: the data is read system by system.

The floor: a training step with the regulariser runs the network forward, its gradient to the inputs (the
potential), and the backward pass of both to the weights: about 3 x the forward + input-gradient FLOPs per point
(``scf_speed.network_flops_per_point``).  Over the best measured float32 matmul rate (``scf_speed.matmul_rate``,
measured in this process before the epochs) that gives the floor points/s; ``floor x`` is floor / measured.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scf_speed import matmul_rate, network_flops_per_point  # benchmarks/ is the script's folder, on sys.path

from aiida_dm21.functional.model import DM21Network
from aiida_dm21.reference.fractional import fractional_charge_systems
from aiida_dm21.reference.integer import IntegerSpec, frame_molecule, run_integer_system
from aiida_dm21.training.loss import self_consistency_delta
from aiida_dm21.training.prepared import build_grids, compact_energy, prepare_dataset

SYSTEMS = {
    'H+ -> H (6-31G)': ('H 0 0 0', '6-31g', (1, 0), (0, 1)),
    'Li+ -> Li (6-31G)': ('Li 0 0 0', '6-31g', (1, 0), (0, 1)),
    'H2O+ -> H2O (6-31G)': ('O 0 0 0.1178; H 0 0.7555 -0.4712; H 0 -0.7555 -0.4712', '6-31g', (1, 1), (0, 0)),
    'C2H6+ -> C2H6 (cc-pVDZ)': (
        'C 0 0 0.7650; C 0 0 -0.7650; H 0 1.0139 1.1573; H 0.8781 -0.5070 1.1573; H -0.8781 -0.5070 1.1573; '
        'H 0 -1.0139 -1.1573; H -0.8781 0.5070 -1.1573; H 0.8781 0.5070 -1.1573',
        'cc-pvdz',
        (1, 1),
        (0, 0),
    ),
}
SCALING = 'Li+ -> Li (6-31G)'


def make_systems(atom, basis, low, high, deltas=(0.5,)):
    method = 'hf'
    lower = run_integer_system(IntegerSpec(atom=atom, basis=basis, charge=low[0], spin=low[1], reference_method=method))
    upper = run_integer_system(
        IntegerSpec(atom=atom, basis=basis, charge=high[0], spin=high[1], reference_method=method)
    )
    return fractional_charge_systems(lower, upper, deltas=deltas)


def _status_kb(key: str) -> int:
    with open('/proc/self/status') as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _step(network, cs) -> None:
    network.zero_grad(set_to_none=True)
    energy, v = compact_energy(network, cs, with_potential=True)
    loss = (energy - cs.target) ** 2 + self_consistency_delta(cs, v) ** 2
    loss.backward()


def per_system(level: int, repeat: int) -> None:
    network = DM21Network()
    header = (
        f'{"system":<24} {"points":>7} {"nao":>4} {"dense MB":>9} {"prepared MB":>11} {"no-reg MB":>9} '
        f'{"prep s":>7} {"step s":>7} {"points/s":>9}'
    )
    print(f'per system, grid level {level}')
    print(header)
    print('-' * len(header))
    for name, spec in SYSTEMS.items():
        system = make_systems(*spec)[0]
        mol = frame_molecule(system.atom, system.basis)
        g, nao = len(build_grids(mol, level).weights), mol.nao
        dense = (2 * g * nao * nao + 4 * g * nao) * 8 / 1e6  # what the dense path held: ν + AO values, float64
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            data = prepare_dataset([system], Path(tmp) / 'full', level)
            t_prep = time.perf_counter() - t0
            lean = prepare_dataset([system], Path(tmp) / 'lean', level, with_regulariser=False)
            full_mb, lean_mb = data.meta(0)['bytes'] / 1e6, lean.meta(0)['bytes'] / 1e6
            cs = data.load(0)
            if g > 150_000:
                t_step = float('nan')  # a few s per step on 2 cores: skipped
            else:
                _step(network, cs)
                start = time.perf_counter()
                for _ in range(repeat):
                    _step(network, cs)
                t_step = (time.perf_counter() - start) / repeat
        print(
            f'{name:<24} {g:>7} {nao:>4} {dense:>9.1f} {full_mb:>11.1f} {lean_mb:>9.2f} {t_prep:>7.1f} '
            f'{t_step:>7.3f} {g / t_step:>9.0f}'
        )


def _scaling_child(n: int, level: int, batch_size: int, queue) -> None:
    from aiida_dm21.training.config import TrainConfig
    from aiida_dm21.training.train import train

    torch.manual_seed(0)
    systems = make_systems(*SYSTEMS[SCALING], deltas=tuple(np.linspace(0.02, 0.98, n)))
    config = TrainConfig(epochs=1, grid_level=level, batch_size=batch_size, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / 'prepared'
        t0 = time.perf_counter()
        data = prepare_dataset(systems, folder, level)
        t_prep = time.perf_counter() - t0
        disk = sum(data.meta(i)['bytes'] for i in range(len(data))) / 1e9
        points = sum(data.n_points(i) for i in range(len(data)))
        base = _status_kb('VmRSS')
        result = train(systems, config, DM21Network(), prepared_dir=folder)
        epoch = float(result.history['wall_s'][0])
        queue.put((points, t_prep, disk, epoch, base / 1024.0, _status_kb('VmHWM') / 1024.0))


#: FLOPs of a training step with the regulariser over the forward + input-gradient FLOPs (see the docstring).
STEP_OVER_FORWARD_AND_INPUT_GRADIENT = 3.0


def floor_points_per_second() -> float:
    """The FLOP floor of training points/s on this machine (best matmul rate, fastest back end)."""
    rate = max(matmul_rate().values())
    flops = STEP_OVER_FORWARD_AND_INPUT_GRADIENT * network_flops_per_point(DM21Network())
    print(
        f'floor: {flops / 1e6:.2f} MFLOP per point per step ({STEP_OVER_FORWARD_AND_INPUT_GRADIENT:g} x forward + '
        f'input gradient) at {rate / 1e9:.1f} GFLOP/s (best float32 matmul) = {rate / flops:.0f} points/s'
    )
    return rate / flops


def scaling(counts, level: int, batch_size: int) -> None:
    print(f'\nscaling: {SCALING}, grid level {level}, batch size {batch_size}, one epoch with the regulariser')
    floor = floor_points_per_second()
    header = (
        f'{"systems":>7} {"points":>9} {"prep s":>7} {"disk GB":>8} {"epoch s":>8} {"points/s":>9} '
        f'{"floor x":>7} {"RSS before MB":>13} {"peak RSS MB":>11}'
    )
    print(header)
    print('-' * len(header))
    ctx = mp.get_context('spawn')
    for n in counts:
        queue = ctx.Queue()
        proc = ctx.Process(target=_scaling_child, args=(n, level, batch_size, queue))
        proc.start()
        points, t_prep, disk, epoch, base, peak = queue.get()
        proc.join()
        print(
            f'{n:>7} {points:>9} {t_prep:>7.1f} {disk:>8.2f} {epoch:>8.1f} {points / epoch:>9.0f} '
            f'{floor / (points / epoch):>7.1f} {base:>13.0f} {peak:>11.0f}'
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--grid-level', type=int, default=3)
    parser.add_argument('--repeat', type=int, default=2)
    parser.add_argument('--systems', type=int, nargs='*', default=[10, 100])
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--skip-per-system', action='store_true')
    args = parser.parse_args()
    print(f'threads: {torch.get_num_threads()}, network float32, prepared data float64')
    if not args.skip_per_system:
        per_system(args.grid_level, args.repeat)
    if args.systems:
        scaling(args.systems, args.grid_level, args.batch_size)


if __name__ == '__main__':
    main()
