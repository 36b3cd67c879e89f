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
    for orbital_energies in ('reference', 'model'):
        delta = float(self_consistency_delta(ps, v.detach(), eta=1e-12, orbital_energies=orbital_energies))
        total = 0.0
        for spin in range(2):
            c, n, eps = (x.numpy() for x in (ps.no_coeff[spin], ps.no_occ[spin], ps.no_energy[spin]))
            f = c.T @ (ps.h_core_j.numpy() + v[spin].detach().numpy()) @ c
            if orbital_energies == 'model':  # the model's own orbital energies: the diagonal of its Fock matrix
                eps = np.diag(f)
            for i in range(len(n)):
                for j in range(len(n)):
                    if i != j and abs(n[i] - n[j]) > 1e-12:
                        total += 0.5 * (n[i] - n[j]) / (eps[i] - eps[j]) * f[i, j] ** 2
        assert abs(delta - total) < 1e-10 and delta < 0, orbital_energies
    with pytest.raises(ValueError, match='orbital_energies must be one of'):
        self_consistency_delta(ps, v.detach(), orbital_energies='uhf')


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


# --- the optimiser loop ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ('parameters', 'match'),
    [
        ({'batch_size': -1}, '`batch_size` must be an integer >= 1'),
        ({'batch_size': 0}, '`batch_size` must be an integer >= 1'),
        ({'batch_size': 2.0}, '`batch_size` must be an integer'),
        ({'batch_size': True}, '`batch_size` must be an integer'),
        ({'validation_fraction': 1.0}, '`validation_fraction` must be < 1'),
        ({'validation_fraction': float('nan')}, '`validation_fraction` must be a finite number'),
        ({'validation_fraction': -0.1}, '`validation_fraction` must be a finite number >= 0'),
        ({'learning_rate': float('nan')}, '`learning_rate` must be a finite number > 0'),
        ({'learning_rate': -1}, '`learning_rate` must be a finite number > 0'),
        ({'max_grad_norm': float('inf')}, '`max_grad_norm` must be a finite number'),
        ({'max_grad_norm': -1.0}, '`max_grad_norm` must be a finite number >= 0'),
        ({'regulariser_weight': float('nan')}, '`regulariser_weight` must be a finite number'),
        ({'constraint_weight': float('nan')}, '`constraint_weight` must be a finite number'),
        ({'constraint_weight': -1.0}, '`constraint_weight` must be a finite number >= 0'),
        ({'anchor_weight': float('inf')}, '`anchor_weight` must be a finite number'),
        ({'anchor_weight': -0.5}, '`anchor_weight` must be a finite number >= 0'),
        ({'anchor_weight': '1'}, '`anchor_weight` must be a finite number >= 0'),
        ({'patience': -1}, '`patience` must be an integer >= 0'),
        ({'patience': 3}, '`patience` .* needs a validation split'),
        ({'warmup_epochs': -2}, '`warmup_epochs` must be an integer >= 0'),
        ({'lr_schedule': 'exponential'}, '`lr_schedule` must be one of'),
        ({'kind_weights': {'fractional': 1.0}}, 'unknown kinds'),
        ({'kind_weights': {'fc': -1.0}}, r"`kind_weights\['fc'\]` must be a finite number >= 0"),
        ({'kind_weights': {'fs': float('nan')}}, r"`kind_weights\['fs'\]` must be a finite number"),
        ({'kind_weights': [1, 2]}, '`kind_weights` must map'),
        ({'grid_level': 10}, '`grid_level` must be a PySCF grid level 0-9'),
        ({'epochs': 1.5}, '`epochs` must be an integer'),
        ({'epochs': 1, 'lr': 1}, 'unknown training hyper-parameters'),
        ({'regulariser_orbital_energies': 'uhf'}, '`regulariser_orbital_energies` must be one of'),
    ],
)
def test_bad_hyperparameters_are_refused(parameters, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(parameters)


def test_defaults_and_kind_weights_merge():
    config = TrainConfig.from_dict({'kind_weights': {'fs': 2.0}})
    assert config.kind_weights == {'integer': 1.0, 'fc': 1.0, 'fs': 2.0}
    assert config.grid_level == 3  # the SCF's level
    assert (config.batch_size, config.lr_schedule, config.max_grad_norm, config.validation_fraction) == (
        1,
        'constant',
        0.0,
        0.0,
    )


def test_config_module_does_not_import_torch():
    """The CalcJob validates its parameters with TrainConfig: that must not pull in PyTorch."""
    import subprocess
    import sys

    code = 'import sys, aiida_dm21.training.config as c; c.TrainConfig.from_dict({}); print("torch" in sys.modules)'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == 'False'


def test_learning_rate_schedule():
    from aiida_dm21.training.config import learning_rate_at

    config = TrainConfig(epochs=4, learning_rate=1.0, warmup_epochs=1, lr_schedule='cosine')
    rates = [learning_rate_at(config, step, steps_per_epoch=2) for step in range(8)]
    np.testing.assert_allclose(rates[:2], [0.5, 1.0])  # linear warm-up over the first epoch's 2 steps
    np.testing.assert_allclose(rates[2:], 0.5 * (1 + np.cos(np.pi * np.arange(6) / 6)))
    constant = TrainConfig(epochs=4, learning_rate=0.1)
    assert {learning_rate_at(constant, step, 3) for step in range(12)} == {0.1}


LOOP = {
    'epochs': 3,
    'learning_rate': 3e-4,
    'grid_level': 0,
    'seed': 11,
    'save_every': 1,
    'batch_size': 2,
    'lr_schedule': 'cosine',
    'warmup_epochs': 1,
    'max_grad_norm': 0.05,
    'kind_weights': {'fs': 2.0},
    'validation_fraction': 0.25,
    'patience': 5,
}


def test_optimiser_loop_is_deterministic_and_resumes_bit_for_bit(systems, dm21m, tmp_path):
    """Mini-batches, kind weights, warm-up + cosine, clipping and a validation split: the same under a seed, and a
    run interrupted after every epoch (a new job each time) ends exactly where the uninterrupted run does."""
    four = [*systems, systems[0]]  # 4 systems: 3 train in batches of 2 (2 steps per epoch), 1 validates
    config = TrainConfig.from_dict(LOOP)
    prepared = tmp_path / 'prepared'
    a = train(four, config, dm21m, prepared_dir=prepared)
    messages = []
    b = train(four, config, dm21m, prepared_dir=prepared, progress=messages.append)
    assert any('0 systems computed, 4 reused' in m for m in messages)  # prepared once, reused by the next run
    for key, value in a.network.state_dict().items():
        torch.testing.assert_close(value, b.network.state_dict()[key], rtol=0, atol=0)
    for key in a.history:
        if key != 'wall_s':
            np.testing.assert_array_equal(a.history[key], b.history[key])
    assert a.metrics['n_train_systems'] == 3 and a.metrics['n_validation_systems'] == 1
    assert a.history['validation_loss'].shape == (3,) and a.history['learning_rate'][0] == pytest.approx(3e-4)
    assert a.history['learning_rate'][-1] < 3e-4  # cosine decay after the warm-up epoch
    assert a.metrics['best_epoch'] in (0, 1, 2, 3)
    state = tmp_path / 'state'
    jobs = 0
    while True:
        jobs += 1
        result = train(
            four, TrainConfig.from_dict({**LOOP, 'epochs_per_job': 1}), dm21m, state_dir=state, prepared_dir=prepared
        )
        if not result.interrupted:
            break
    assert jobs == 3
    for key, value in a.network.state_dict().items():
        torch.testing.assert_close(value, result.network.state_dict()[key], rtol=0, atol=0)
    for key in a.history:
        if key != 'wall_s':
            np.testing.assert_array_equal(a.history[key], result.history[key])
    assert result.metrics['best_epoch'] == a.metrics['best_epoch']


def test_kind_weights_and_clipping(systems, dm21m):
    """Weight 0 for every kind present leaves the weights untouched; clipping to a tiny norm all but freezes them."""
    base = {'epochs': 1, 'learning_rate': 1e-3, 'grid_level': 0, 'regulariser_weight': 0.0, 'batch_size': 3}
    frozen = train(systems, TrainConfig.from_dict({**base, 'kind_weights': {'fc': 0.0, 'fs': 0.0}}), dm21m)
    moved = train(systems, TrainConfig.from_dict(base), dm21m)
    clipped = train(systems, TrainConfig.from_dict({**base, 'max_grad_norm': 1e-12}), dm21m)
    initial = dm21m.state_dict()

    def change(result):
        return max(float((v - initial[k]).abs().max()) for k, v in result.network.state_dict().items())

    assert change(frozen) == 0.0
    assert change(moved) > 5e-4  # one Adam step of 1e-3
    assert change(clipped) < 1e-6  # Adam's steps shrink to lr · g / (|g| + eps) once g is clipped below eps
    # one step per epoch: the recorded norm is that step's, before clipping
    assert clipped.history['grad_norm'][0] == pytest.approx(moved.history['grad_norm'][0], rel=1e-6)


def test_early_stopping_returns_the_best_weights(systems, dm21m):
    """A learning rate far too large: the validation loss rises, training stops after `patience` epochs and the
    returned network is the best one seen (here the initial model)."""
    config = TrainConfig.from_dict(
        {'epochs': 10, 'learning_rate': 0.05, 'grid_level': 0, 'validation_fraction': 0.34, 'patience': 2}
    )
    result = train(systems, config, dm21m)
    assert result.metrics['stopped_early_at_epoch'] < 10
    assert len(result.history['epoch']) == result.metrics['stopped_early_at_epoch']
    best = result.metrics['best_epoch']
    assert result.metrics['best_validation_loss'] == min(
        [result.history['validation_loss'].min(), result.metrics['best_validation_loss']]
    )
    if best == 0:
        for key, value in dm21m.state_dict().items():
            torch.testing.assert_close(result.network.state_dict()[key], value.float(), rtol=0, atol=0)
    else:
        assert result.history['validation_loss'][best - 1] == result.metrics['best_validation_loss']


def test_scf_on_another_grid_says_so(dm21m, tmp_path):
    """A checkpoint trained on level 1 used on level 3: a warning in the SCF log; on level 1: none."""
    import io

    from pyscf import gto

    from aiida_dm21 import KS
    from aiida_dm21.functional.checkpoint import save_checkpoint

    path = tmp_path / 'trained.safetensors'
    grid = {'level': 1, 'radi_method': 'treutler_ahlrichs_original', 'prune': 'nwchem_prune'}
    save_checkpoint(path, dm21m, {'name': 'trained', 'source': 'trained', 'training': {'grid': grid}})
    mol = gto.M(atom='H 0 0 0', basis='sto-3g', spin=1, verbose=3)
    for level, expected in ((3, True), (1, False)):
        mf = KS(mol, str(path))
        mf.grids.level = level
        mf.stdout = io.StringIO()
        mf._grids_ready(mol, np.zeros((2, 1, 1)))
        log = mf.stdout.getvalue()
        assert ('trained on another grid' in log and 'level 3 (trained on level 1)' in log) is expected, log


@pytest.mark.parametrize('bad', ['gpu', 'cuda:', 'cuda:x', 'CPU', 3])
def test_train_config_refuses_what_is_not_a_device(bad):
    from aiida_dm21.training.config import TrainConfig

    with pytest.raises(ValueError, match='device name'):
        TrainConfig.from_dict({'device': bad})


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_cuda_passes_the_form_check_and_is_refused_where_it_runs():
    from aiida_dm21.training.config import TrainConfig

    config = TrainConfig.from_dict({'device': 'cuda:1'})  # what a CPU-only login node must accept
    with pytest.raises(ValueError, match='sees no such CUDA GPU'):
        config.check_device()
    TrainConfig.from_dict({'device': 'cpu'}).check_device()
