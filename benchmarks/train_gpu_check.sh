#!/usr/bin/env bash
# GPU check of the training (issue 10): grid points per second of the training step (forward + the
# regulariser's double backward) on the GPU against the CPU, on the same prepared data, and the loss
# difference after the same steps.  Run on a machine with one CUDA GPU, from the repository root, after
# README command 1 (or with PY pointing at a Python that has aiida-dm21 and a CUDA build of PyTorch):
#     bash benchmarks/train_gpu_check.sh
# Budget: under 5 minutes from a cold start.  On a machine without a GPU it stops at once with the refusal.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" - <<'PYEOF'
import sys
import tempfile
import time

import torch

from aiida_dm21.reference.fractional import fractional_charge_systems, fractional_spin_systems
from aiida_dm21.reference.integer import IntegerSpec, run_integer_system
from aiida_dm21.training.config import TrainConfig
from aiida_dm21.training.prepared import PreparedData
from aiida_dm21.training.train import train

try:
    TrainConfig.from_dict({'device': 'cuda'}).check_device()
except ValueError as exc:  # no GPU here: say so and stop, never time a CPU run as a GPU one
    sys.exit(f'train_gpu_check: {exc}')
print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)


def calc(atom, basis, charge, spin):
    return run_integer_system(IntegerSpec(atom=atom, basis=basis, charge=charge, spin=spin, reference_method='ccsd'))


li_plus, li, li_minus = calc('Li 0 0 0', '6-31g', 1, 0), calc('Li 0 0 0', '6-31g', 0, 1), calc('Li 0 0 0', '6-31g', -1, 0)
systems = (
    fractional_charge_systems(li_plus, li, deltas=(0.25, 0.5, 0.75))
    + fractional_charge_systems(li, li_minus, deltas=(0.25, 0.5, 0.75))
    + fractional_spin_systems(li, fractions=(0.5,))
)
hyper = {'epochs': 2, 'learning_rate': 1e-4, 'grid_level': 3, 'seed': 0, 'batch_size': 2}
print(f'{len(systems)} Li FC/FS systems (6-31G, CCSD references), grid level 3, {hyper["epochs"]} epochs')
with tempfile.TemporaryDirectory() as prepared:
    train(systems, TrainConfig.from_dict({**hyper, 'epochs': 0}), prepared_dir=prepared)  # prepare once
    data = PreparedData(prepared)
    per_epoch = sum(data.n_points(i) for i in range(len(systems)))
    rows = {}
    for device in ('cpu', 'cuda'):
        config = TrainConfig.from_dict({**hyper, 'device': device})
        t0 = time.perf_counter()
        result = train(systems, config, prepared_dir=prepared)
        if device == 'cuda':
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rows[device] = (seconds, float(result.history['loss'][-1]))
    (tc, lc), (tg, lg) = rows['cpu'], rows['cuda']
    points = per_epoch * hyper['epochs']

    def rate(seconds):
        return f'{points / seconds:,.0f}'

    print(f'{"device":<6} {"s":>8} {"points/s":>12} {"final loss":>14}')
    print(f'{"cpu":<6} {tc:>8.1f} {rate(tc):>12} {lc:>14.6e}')
    print(f'{"cuda":<6} {tg:>8.1f} {rate(tg):>12} {lg:>14.6e}')
    print(f'speed-up {tc / tg:.1f}x; final loss GPU - CPU {lg - lc:+.2e} (float32 reductions differ)')
PYEOF
