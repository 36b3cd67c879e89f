"""Data-parallel training over torch.distributed (gloo, CPU): 2 processes follow the 1-process loss curve."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aiida_dm21.reference.fractional import fractional_charge_systems, fractional_spin_systems
from aiida_dm21.reference.integer import IntegerSpec, run_integer_system
from aiida_dm21.training.config import TrainConfig
from aiida_dm21.training.train import train

pytestmark = pytest.mark.core

CONFIG = {'epochs': 3, 'learning_rate': 3e-4, 'grid_level': 0, 'seed': 2, 'batch_size': 4, 'max_grad_norm': 1.0}


def _systems():
    def calc(charge, spin):
        return run_integer_system(
            IntegerSpec(atom='H 0 0 0', basis='6-31g', charge=charge, spin=spin, reference_method='fci')
        )

    h_plus, h, h_minus = calc(1, 0), calc(0, 1), calc(-1, 0)
    return (
        fractional_charge_systems(h_plus, h, deltas=(0.25, 0.75))
        + fractional_charge_systems(h, h_minus, deltas=(0.5,))
        + fractional_spin_systems(h, fractions=(0.5,))
    )


def _worker(rank: int, world: int, rendezvous: str, systems, prepared: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{rendezvous}', rank=rank, world_size=world)
    try:
        result = train(systems, TrainConfig.from_dict(CONFIG), prepared_dir=prepared)
        if rank == 0:
            history = {k: v.tolist() for k, v in result.history.items() if k != 'wall_s'}
            weights = {k: v.flatten()[:50].tolist() for k, v in result.network.state_dict().items()}
            with open(out, 'w') as handle:
                json.dump({'history': history, 'weights': weights}, handle)
    finally:
        dist.destroy_process_group()


def test_two_processes_follow_the_single_process_curve(tmp_path):
    import torch.multiprocessing as mp

    systems = _systems()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each worker
    try:
        single = train(systems, TrainConfig.from_dict(CONFIG), prepared_dir=tmp_path / 'prepared')
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / 'parallel.json'
    mp.spawn(
        _worker,
        args=(2, str(tmp_path / 'rendezvous'), systems, str(tmp_path / 'prepared'), str(out)),
        nprocs=2,
        join=True,
    )
    parallel = json.loads(out.read_text())
    for key in ('loss', 'energy_loss', 'regulariser', 'grad_norm', 'learning_rate'):
        np.testing.assert_allclose(parallel['history'][key], single.history[key], rtol=1e-5, err_msg=key)
    for key, value in single.network.state_dict().items():
        np.testing.assert_allclose(parallel['weights'][key], value.flatten()[:50].numpy(), rtol=1e-4, atol=1e-6)
