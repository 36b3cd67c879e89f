"""Training: the loss and its regulariser, determinism with a seed, resuming, and that it learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pyscf import dft

from aiida_dm21.functional.numint import DM21NumInt
from aiida_dm21.functional.scf import treutler_ahlrichs_original
from aiida_dm21.reference.fractional import fractional_charge_systems, fractional_spin_systems
from aiida_dm21.reference.integer import IntegerSpec, frame_molecule, run_integer_system
from aiida_dm21.training.loss import prepare_system, self_consistency_delta, system_energy
from aiida_dm21.training.train import TrainConfig, train

pytestmark = pytest.mark.core


def _calc(label, atom, charge, spin):
    return run_integer_system(
        IntegerSpec(atom=atom, basis='6-31g', charge=charge, spin=spin, reference_method='fci', label=label)
    )


@pytest.fixture(scope='module')
def systems():
    h_plus, h, h_minus = _calc('H+', 'H 0 0 0', 1, 0), _calc('H', 'H 0 0 0', 0, 1), _calc('H-', 'H 0 0 0', -1, 0)
    return (
        fractional_charge_systems(h_plus, h, deltas=(0.5,))
        + fractional_charge_systems(h, h_minus, deltas=(0.5,))
        + fractional_spin_systems(h, fractions=(0.5,))
    )


@pytest.fixture(scope='module')
def dm21m(upstream_dir):
    from aiida_dm21.functional.checkpoint import load_network

    return load_network(upstream_dir / 'DM21m')[0]


def test_training_energy_and_potential_match_the_scf_path(systems, dm21m):
    """The training code's E_xc and V_xc are exactly what the SCF's DM21NumInt computes for the same density."""
    system = systems[1]
    ps = prepare_system(system, grid_level=1)
    net = dm21m.float()
    energy, v = system_energy(net, ps, with_potential=True)
    mol = frame_molecule(system.atom, system.basis)
    grids = dft.gen_grid.Grids(mol)
    grids.level = 1
    grids.radi_method = treutler_ahlrichs_original
    grids.build()
    # the same integrals as training (float64, no screening: those are checked against this dense path in
    # tests/test_numint.py)
    _, exc, vxc = DM21NumInt(net, nu_dtype=torch.float64, screening=0.0).nr_uks(mol, grids, '', system.dm)
    # the float32 network runs on different GEMMs here (autograd: MKL; SCF: oneDNN where available), which
    # round differently: 1.6e-9 Ha observed for this 0.39 Ha E_xc on an AMD EPYC, 1.5e-8 on an Intel Xeon
    # (AVX-512), i.e. 4e-8 relative, below float32's 6e-8 resolution
    print(f'E_xc(training) - E_xc(SCF) = {float(energy) - exc:.2e} Ha')
    assert abs(float(energy) - exc) < 4e-8
    np.testing.assert_allclose(v.detach().numpy(), vxc, atol=1e-7)


def test_regulariser_is_the_second_order_energy_change(systems, dm21m):
    """ΔE matches a brute-force evaluation: one SCF step from D with the model's Fock matrix, to second order."""
    ps = prepare_system(systems[1], grid_level=1)
    _, v = system_energy(dm21m.float(), ps, with_potential=True)
    delta = float(self_consistency_delta(ps, v.detach(), eta=1e-12))
    total = 0.0
    for spin in range(2):
        c, n, eps = (x.numpy() for x in (ps.no_coeff[spin], ps.no_occ[spin], ps.no_energy[spin]))
        f = c.T @ (ps.h_core_j.numpy() + v[spin].detach().numpy()) @ c
        for i in range(len(n)):
            for j in range(len(n)):
                if i != j and abs(n[i] - n[j]) > 1e-12:
                    total += 0.5 * (n[i] - n[j]) / (eps[i] - eps[j]) * f[i, j] ** 2
    assert abs(delta - total) < 1e-10 and delta < 0


def test_training_is_deterministic_and_resumable(systems, dm21m, tmp_path):
    config = TrainConfig(epochs=2, learning_rate=1e-4, grid_level=0, seed=7, save_every=1)
    a = train(systems, config, dm21m)
    b = train(systems, config, dm21m)
    for key, value in a.network.state_dict().items():
        torch.testing.assert_close(value, b.network.state_dict()[key], rtol=0, atol=0)
    np.testing.assert_array_equal(a.history['loss'], b.history['loss'])
    # stop after 1 epoch, resume for the second: same weights as the uninterrupted run
    state = tmp_path / 'state'
    train(
        systems, TrainConfig(epochs=1, learning_rate=1e-4, grid_level=0, seed=7, save_every=1), dm21m, state_dir=state
    )
    resumed = train(systems, config, dm21m, state_dir=state)
    for key, value in a.network.state_dict().items():
        torch.testing.assert_close(value, resumed.network.state_dict()[key], rtol=0, atol=0)
    np.testing.assert_array_equal(a.history['loss'], resumed.history['loss'])


def test_training_lowers_the_fractional_error(systems, dm21m):
    config = TrainConfig(epochs=6, learning_rate=1e-4, grid_level=0, seed=0, regulariser_weight=1.0)
    result = train(systems, config, dm21m)
    before, after = result.metrics['before']['train'], result.metrics['after']['train']
    assert after['mae_all_mha'] < 0.5 * before['mae_all_mha']  # measured: 40.9 -> 10.5 mHa
    assert result.history['loss'][-1] < result.history['loss'][0]


def test_no_training_systems():
    with pytest.raises(ValueError, match='no training systems'):
        train([], TrainConfig())
