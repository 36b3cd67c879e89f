"""The anchor to the initial network (``anchor_weight`` α, L2-SP): + α Σ (θ − θ⁰)² on every training step.

Real FCI/6-31G hydrogen (H, H−) and the FC ensemble between them; the model is DeepMind's DM21m.
"""

from __future__ import annotations

import copy

import pytest
import torch

from aiida_dm21.reference.fractional import fractional_charge_systems, integer_system
from aiida_dm21.reference.integer import IntegerSpec, run_integer_system
from aiida_dm21.training.config import TrainConfig
from aiida_dm21.training.prepared import PreparedData, compact_energy
from aiida_dm21.training.train import train

pytestmark = pytest.mark.core

BASE = {'learning_rate': 1e-4, 'grid_level': 0, 'regulariser_weight': 0.0, 'batch_size': 3}


@pytest.fixture(scope='module')
def systems():
    def calc(label, charge, spin):
        spec = IntegerSpec(atom='H 0 0 0', basis='6-31g', charge=charge, spin=spin, reference_method='fci', label=label)
        return run_integer_system(spec)

    h, h_minus = calc('H', 0, 1), calc('H-', -1, 0)
    return [integer_system(h), integer_system(h_minus), *fractional_charge_systems(h, h_minus, deltas=(0.5,))]


@pytest.fixture(scope='module')
def dm21m(upstream_dir):
    from aiida_dm21.functional.checkpoint import load_network

    return load_network(upstream_dir / 'DM21m')[0]


def _data_gradient(network, data, n):
    """∇ Σ_i (E_i − t_i)² / n at the network's weights (every system in one batch), by autograd."""
    network = copy.deepcopy(network).float()
    objective = 0.0
    for i in range(n):
        cs = data.load(i, 'cpu', False)
        objective = objective + (compact_energy(network, cs, with_potential=False)[0] - cs.target) ** 2
    (objective / n).backward()
    return [p.grad.detach().double() for p in network.parameters()]


def test_the_anchor_adds_its_gradient_and_holds_the_network_near_its_start(systems, dm21m, tmp_path):
    """Step 1 starts at θ⁰ (no anchor force); step 2's gradient is the data's plus 2α(θ₁ − θ⁰), exactly; over more
    steps a strong anchor moves the network less, and `weight_change` (‖θ − θ⁰‖) is reported with or without it."""
    prepared = tmp_path / 'prepared'
    alpha = 50.0
    one = train(systems, TrainConfig.from_dict({**BASE, 'epochs': 1, 'anchor_weight': alpha}), dm21m,
                prepared_dir=prepared)  # fmt: skip
    two = train(systems, TrainConfig.from_dict({**BASE, 'epochs': 2, 'anchor_weight': alpha}), dm21m,
                prepared_dir=prepared)  # fmt: skip
    free = train(systems, TrainConfig.from_dict({**BASE, 'epochs': 2}), dm21m, prepared_dir=prepared)
    assert two.history['grad_norm'][0] == pytest.approx(free.history['grad_norm'][0], rel=1e-12)  # θ = θ⁰: no force
    theta0 = [p.detach().double() for p in dm21m.float().parameters()]
    theta1 = [p.detach().double() for p in one.network.parameters()]
    data = PreparedData(prepared)
    gradient = [
        g + 2 * alpha * (a - b) for g, a, b in zip(_data_gradient(one.network, data, 3), theta1, theta0, strict=True)
    ]
    expected = float(torch.sqrt(sum((g**2).sum() for g in gradient)))
    anchor_only = 2 * alpha * one.metrics['weight_change']
    assert anchor_only > 0.05 * expected  # the anchor's share is not lost in rounding: the check can fail
    assert two.history['grad_norm'][1] == pytest.approx(expected, rel=1e-5)
    assert one.metrics['weight_change'] == pytest.approx(
        float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(theta1, theta0, strict=True)))), rel=1e-6
    )
    # longer: the anchored network stays closer to DM21m than the free one
    strong = train(systems, TrainConfig.from_dict({**BASE, 'epochs': 6, 'anchor_weight': 1e4}), dm21m,
                   prepared_dir=prepared)  # fmt: skip
    loose = train(systems, TrainConfig.from_dict({**BASE, 'epochs': 6}), dm21m, prepared_dir=prepared)
    assert len(loose.history['weight_change']) == 6 and loose.metrics['weight_change'] > 0
    assert strong.metrics['weight_change'] < 0.5 * loose.metrics['weight_change'], (
        strong.history['weight_change'],
        loose.history['weight_change'],
    )
