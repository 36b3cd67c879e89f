"""Training throughput on CPU: grid points per second for one training step, and peak memory per system.

    python benchmarks/train_speed.py [--grid-level 1] [--repeat 3]

For a few fractional-charge systems of growing size it prints, per system: grid points, basis functions,
the time of (a) forward only, (b) forward + backward of the energy loss, (c) forward + backward of the
energy loss plus the self-consistency regulariser (double backward through the network), the points
per second of (c), the ratio (c)/(b), and the peak resident memory of a fresh process doing one step
(measured in a child process so systems don't share a high-water mark).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch

from aiida_dm21.functional.model import DM21Network
from aiida_dm21.reference.fractional import fractional_charge_systems
from aiida_dm21.reference.integer import IntegerSpec, run_integer_system
from aiida_dm21.training.loss import prepare_system, self_consistency_delta, system_energy

SYSTEMS = {
    'H+ -> H (6-31G)': ('H 0 0 0', '6-31g', (1, 0), (0, 1)),
    'Li+ -> Li (6-31G)': ('Li 0 0 0', '6-31g', (1, 0), (0, 1)),
    'H2O+ -> H2O (6-31G)': ('O 0 0 0.1178; H 0 0.7555 -0.4712; H 0 -0.7555 -0.4712', '6-31g', (1, 1), (0, 0)),
}


def make_system(atom, basis, low, high):
    method = 'hf'
    lower = run_integer_system(IntegerSpec(atom=atom, basis=basis, charge=low[0], spin=low[1], reference_method=method))
    upper = run_integer_system(
        IntegerSpec(atom=atom, basis=basis, charge=high[0], spin=high[1], reference_method=method)
    )
    return fractional_charge_systems(lower, upper, deltas=(0.5,))[0]


def step(network, ps, mode: str) -> None:
    network.zero_grad(set_to_none=True)
    if mode == 'forward':
        with torch.no_grad():
            system_energy(network, ps)
        return
    energy, v = system_energy(network, ps, with_potential=mode == 'regulariser')
    loss = (energy - ps.target) ** 2
    if mode == 'regulariser':
        loss = loss + self_consistency_delta(ps, v) ** 2
    loss.backward()


def timed(network, ps, mode: str, repeat: int) -> float:
    step(network, ps, mode)
    start = time.perf_counter()
    for _ in range(repeat):
        step(network, ps, mode)
    return (time.perf_counter() - start) / repeat


def _status_kb(key: str) -> int:
    with open('/proc/self/status') as handle:
        for line in handle:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _peak_child(args, queue) -> None:
    atom, basis, low, high, level = args
    network = DM21Network()
    system = make_system(atom, basis, low, high)
    with open('/proc/self/clear_refs', 'w') as handle:  # reset the high-water mark (Linux)
        handle.write('5')
    base = _status_kb('VmRSS')
    ps = prepare_system(system, level)
    step(network, ps, 'regulariser')
    queue.put((_status_kb('VmHWM') - base) / 1024.0)


def peak_memory_mb(spec, level: int) -> float:
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=((*spec, level), queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--grid-level', type=int, default=1)
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    network = DM21Network()
    print(f'threads: {torch.get_num_threads()}, grid level {args.grid_level}, network float32')
    header = (
        f'{"system":<22} {"points":>7} {"nao":>4} {"fwd s":>7} {"fwd+bwd s":>9} {"+reg s":>7} '
        f'{"points/s (+reg)":>15} {"reg/bwd":>7} {"peak MB":>8}'
    )
    print(header)
    print('-' * len(header))
    for name, spec in SYSTEMS.items():
        ps = prepare_system(make_system(*spec), args.grid_level)
        t_fwd = timed(network, ps, 'forward', args.repeat)
        t_bwd = timed(network, ps, 'energy', args.repeat)
        t_reg = timed(network, ps, 'regulariser', args.repeat)
        peak = peak_memory_mb(spec, args.grid_level)
        print(
            f'{name:<22} {ps.n_points:>7} {ps.dm.shape[-1]:>4} {t_fwd:>7.3f} {t_bwd:>9.3f} {t_reg:>7.3f} '
            f'{ps.n_points / t_reg:>15.0f} {t_reg / t_bwd:>7.2f} {peak:>8.0f}'
        )


if __name__ == '__main__':
    main()
