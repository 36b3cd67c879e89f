"""Science checks of the SCF integration: the potential is the derivative of the energy, spin
conventions agree, PySCF's NumInt interface works, and unsupported input is refused clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pyscf import dft, gto

from aiida_dm21.functional.checkpoint import CheckpointError
from aiida_dm21.functional.numint import DM21NumInt, UnsupportedSystemError
from aiida_dm21.functional.scf import DM21RKS, DM21UKS, KS, RKS, ROKS, UKS

pytestmark = pytest.mark.core

WATER = 'O 0 0 0.117790; H 0 0.755453 -0.471161; H 0 -0.755453 -0.471161'


@pytest.fixture(scope='module')
def dm21_network(upstream_dir):
    from aiida_dm21.functional.checkpoint import load_network

    return load_network(upstream_dir / 'DM21')[0]


def _lih(spin=0, charge=0):
    return gto.M(atom='Li 0 0 0; H 0 0 1.6', basis='sto-3g', spin=spin, charge=charge, verbose=0)


@pytest.mark.parametrize('restricted', [True, False])
def test_potential_is_the_derivative_of_the_energy(dm21_network, restricted):
    """tr(V dD) equals the central finite difference of E_xc along a random symmetric direction (float64 net)."""
    mol = _lih()
    grids = dft.gen_grid.Grids(mol)
    grids.level = 1
    grids.build()
    ni = DM21NumInt(dm21_network, network_dtype=torch.float64)
    mf = dft.RKS(mol, xc='b3lyp5')
    mf.grids = grids
    mf.kernel()
    dm = mf.make_rdm1()
    rng = np.random.default_rng(1)
    direction = rng.normal(size=dm.shape) * 0.01
    direction = direction + direction.T
    h = 1e-4
    if restricted:
        dms = dm[None] / 2
        _, _, v = ni.nr_rks(mol, grids, '', dm)
        slope = np.einsum('ij,ij', v, direction)
        e = [ni.nr_rks(mol, grids, '', dm + s * h * direction)[1] for s in (1, -1)]
    else:
        dms = np.stack([dm * 0.6, dm * 0.4])
        _, _, v = ni.nr_uks(mol, grids, '', dms)
        slope = np.einsum('ij,ij', v[0], direction)  # perturb alpha only
        e = [ni.nr_uks(mol, grids, '', dms + s * h * np.stack([direction, 0 * direction]))[1] for s in (1, -1)]
    numerical = (e[0] - e[1]) / (2 * h)
    assert abs(slope - numerical) < 1e-6 * max(1.0, abs(slope)), (slope, numerical)


def test_restricted_and_unrestricted_agree_for_a_closed_shell(dm21_network):
    # The published network is not exactly symmetric under alpha <-> beta (it was trained, not constrained):
    # dE/drho_a != dE/drho_b at rho_a = rho_b, so UKS drifts slightly off the RKS density, to ~1e-6 Ha
    # lower energies (H2: 9e-7 Ha, also with a float64 network; LiH at 1.6 A: 4.5e-6 Ha).
    mol = gto.M(atom='H 0 0 0; H 0 0 0.74', basis='6-31g', verbose=0)
    rks = RKS(mol, dm21_network)
    uks = UKS(mol, dm21_network)
    for mf in (rks, uks):
        mf.conv_tol, mf.conv_tol_grad = 1e-9, 1e-5
    e_rks = rks.kernel()
    e_uks = uks.kernel()
    assert rks.converged and uks.converged
    assert 0 <= e_rks - e_uks < 2e-6
    dm_a, dm_b = uks.make_rdm1()
    np.testing.assert_allclose(dm_a, dm_b, atol=1e-3)
    n, exc, v = rks._numint.nr_uks(mol, rks.grids, '', np.stack([rks.make_rdm1() / 2] * 2))
    n2, exc2, v2 = rks._numint.nr_rks(mol, rks.grids, '', rks.make_rdm1())
    assert abs(exc - exc2) < 1e-10 and abs(n.sum() - n2) < 1e-10 and abs(n2 - mol.nelectron) < 1e-4
    np.testing.assert_allclose((v[0] + v[1]) / 2, v2, atol=1e-10)  # RKS potential: mean of the spin channels
    assert abs(v[0] - v[1]).max() > 1e-4  # ... which differ: the asymmetry described above


def test_stock_pyscf_ks_with_dm21_numint(dm21_network):
    """The NumInt interface alone (mf._numint = DM21NumInt) gives the same SCF as DM21RKS."""
    mol = _lih()
    ours = RKS(mol, dm21_network)
    ours.init_guess = 'minao'
    e_ours = ours.kernel()
    stock = dft.RKS(mol)  # xc stays a non-hybrid LDA string: PySCF builds J only
    stock._numint = DM21NumInt(dm21_network)
    stock.grids.radi_method = ours.grids.radi_method
    stock.small_rho_cutoff = 1e-20
    stock.conv_tol = ours.conv_tol
    e_stock = stock.kernel()
    assert abs(e_ours - e_stock) < 1e-6
    with pytest.raises(NotImplementedError, match='density matrix'):
        stock._numint.eval_xc_eff('', np.zeros((6, 4)))


def _li_atom():
    return gto.M(atom='Li 0 0 0', basis='6-31g', spin=1, verbose=0)


def test_roks_runs_and_lies_above_uks(dm21_network):
    mol = _li_atom()
    uks = UKS(mol, dm21_network)
    roks = ROKS(mol, dm21_network)
    e_u, e_r = uks.kernel(), roks.kernel()
    assert uks.converged and roks.converged
    assert e_r >= e_u - 1e-6
    assert abs(e_r - e_u) < 5e-3


def test_ks_dispatch_and_names(weights_env):
    assert isinstance(KS(_lih(), 'DM21'), DM21RKS)
    mf = KS(_lih(spin=1, charge=1), 'DM21m')
    assert isinstance(mf, DM21UKS) and mf.functional == 'DM21m'
    assert mf.checkpoint_metadata['source'] == 'deepmind:DM21m'


def test_defaults_are_documented_values(dm21_network):
    mf = RKS(_lih(), dm21_network)
    assert (mf.init_guess, mf.conv_tol, mf.conv_tol_grad, mf.small_rho_cutoff) == ('b3lyp', 1e-6, 1e-3, 1e-20)
    mf.conv_tol = 1e-8  # overridable like any PySCF attribute
    assert mf.conv_tol == 1e-8


def test_bad_input_is_refused_clearly(dm21_network, tmp_path):
    with pytest.raises(ValueError, match='closed-shell'):
        RKS(_lih(spin=2), dm21_network)
    with pytest.raises(RuntimeError, match='not consistent'):
        gto.M(atom='Li 0 0 0; H 0 0 1.6', basis='sto-3g', spin=1)  # 4 electrons cannot have 2S = 1
    with pytest.raises(UnsupportedSystemError, match='effective core potentials'):
        KS(gto.M(atom='I 0 0 0; H 0 0 1.6', basis='def2-svp', ecp='def2-svp', verbose=0), dm21_network)
    from pyscf.pbc import gto as pbcgto

    cell = pbcgto.M(atom='H 0 0 0; H 0 0 0.74', basis='sto-3g', a=np.eye(3) * 5, verbose=0)
    with pytest.raises(UnsupportedSystemError, match='periodic'):
        KS(cell, dm21_network)
    with pytest.raises(CheckpointError, match='unknown functional'):
        KS(_lih(), 'B3LYP-DM')
    with pytest.raises(CheckpointError, match='does not exist'):
        KS(_lih(), tmp_path / 'missing.safetensors')
    with pytest.raises(NotImplementedError, match='nuclear gradients'):
        RKS(_lih(), dm21_network).nuc_grad_method()


def test_integral_cache_follows_the_grid(dm21_network):
    mol = _lih()
    mf = RKS(mol, dm21_network)
    mf.init_guess = 'minao'
    mf.grids.level = 1
    e1 = mf.kernel()
    calls = mf._numint.timings.calls
    assert calls > 2
    mf.grids.level = 2
    mf.grids.build()
    mf.kernel()
    assert len(mf._numint._blocks[0].weights) <= len(mf.grids.weights)
    assert sum(len(b.weights) for b in mf._numint._blocks) == len(mf.grids.weights)
    assert abs(mf.e_tot - e1) < 1e-3


@pytest.mark.parametrize('spin', [0, 1])
def test_newton_solver_reaches_the_same_energy(dm21_network, spin):
    """mf.newton() works (Coulomb-only response as approximate Hessian) and lands on the DIIS solution."""
    mol = gto.M(atom='Li 0 0 0; H 0 0 1.6', basis='sto-3g', verbose=0) if spin == 0 else _li_atom()
    plain = KS(mol, dm21_network)
    plain.init_guess = 'minao'
    plain.conv_tol = 1e-8
    e_plain = plain.kernel()
    second = KS(mol, dm21_network).newton()
    second.init_guess = 'minao'
    second.conv_tol = 1e-8
    e_second = second.kernel()
    assert plain.converged and second.converged
    assert abs(e_plain - e_second) < 1e-6


@pytest.mark.parametrize('screened', [False, True], ids=['all-AOs', 'AO-subset'])
@pytest.mark.parametrize('fused', [False, True], ids=['torch', 'numba'])
@pytest.mark.parametrize('ns', [1, 2])
def test_hand_written_features_and_potential_equal_autograd(ns, fused, screened, monkeypatch):
    """The SCF's hand-written feature map and chain rule equal autograd through ``_features`` (what training uses).

    With ``screened``, the local-HF part runs over a subset of the AOs (packed integrals over those only): that
    must equal the full evaluation with the integrals of every other AO set to zero.
    """
    from aiida_dm21.functional import kernels
    from aiida_dm21.functional.numint import _block_features, _block_potential, _features, pack

    monkeypatch.setenv('AIIDA_DM21_FUSED', '1' if fused else '0')
    if kernels.available() != fused:
        pytest.skip('numba is not importable')

    mol = gto.M(atom=WATER, basis='6-31g*', spin=0, verbose=0)
    grids = dft.gen_grid.Grids(mol)
    grids.level = 1
    grids.build()
    coords, weights = grids.coords[:3000], torch.from_numpy(grids.weights[:3000])
    ao = torch.from_numpy(np.ascontiguousarray(dft.numint.eval_ao(mol, coords, deriv=1)))
    nus = []
    for omega in (0.0, 0.4):
        with mol.with_range_coulomb(omega):
            nus.append(mol.intor('int1e_grids', hermi=1, grids=coords))
    nu = torch.from_numpy(np.ascontiguousarray(np.stack(nus)))
    idx = torch.arange(mol.nao)
    if screened:
        idx = torch.tensor([0, 1, 2, 5, 6, 7, 8, 11, 14, 17])  # an uneven subset, as screening leaves
        outside = torch.ones(mol.nao, dtype=torch.bool)
        outside[idx] = False
        nu = nu.clone()
        nu[:, :, outside, :] = 0.0
        nu[:, :, :, outside] = 0.0
    mf = dft.UKS(mol, xc='b3lyp5').run(conv_tol=1e-6)
    dm_ab = mf.make_rdm1()
    dm_np = dm_ab[:1] if ns == 1 else np.stack([dm_ab[0] * 1.1, dm_ab[1] * 0.8])  # unequal spins for ns = 2
    rng = np.random.default_rng(0)
    f = torch.from_numpy(rng.uniform(0.5, 1.5, size=(len(weights), 3)))
    g_feats = torch.from_numpy(rng.normal(size=(len(weights), 11)))

    dm = torch.from_numpy(np.ascontiguousarray(dm_np)).requires_grad_(True)
    rho, feats, parts = _features(ao, nu, dm)
    surrogate = (weights[:, None] * parts * f).sum() + (feats * g_feats).sum()
    (expected,) = torch.autograd.grad(surrogate, dm)

    fb = _block_features(ao, pack(nu[:, :, idx][:, :, :, idx]), dm.detach(), idx=idx)
    torch.testing.assert_close(fb.feats, feats.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fb.parts, parts.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fb.rho.t(), rho.detach(), rtol=1e-12, atol=1e-14)
    got = _block_potential(fb, ao, weights, f, g_feats)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
