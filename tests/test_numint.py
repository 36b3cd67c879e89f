"""Science checks of the SCF integration: the potential is the derivative of the energy, spin
conventions agree, PySCF's NumInt interface works, and unsupported input is refused clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pyscf import dft, gto

from aiida_dm21.functional import kernels
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
    assert (mf.init_guess, mf.conv_tol, mf.conv_tol_grad, mf.small_rho_cutoff) == ('b3lyp', 1e-6, 1e-3, 1e-7)
    mf.conv_tol = 1e-8  # overridable like any PySCF attribute
    assert mf.conv_tol == 1e-8


def test_default_density_pruning_drops_points_not_energy(dm21_network):
    """PySCF's small_rho_cutoff (1e-7, the default here too) drops grid points, and moves E_DM21 by < 1e-7 Ha."""
    mol = gto.M(atom='O 0 0 0.1178; H 0 0.7555 -0.4712; H 0 -0.7555 -0.4712', basis='6-31g', verbose=0)
    pruned, full = RKS(mol, dm21_network), RKS(mol, dm21_network)
    full.small_rho_cutoff = 1e-20
    e_pruned, e_full = pruned.kernel(), full.kernel()
    assert pruned.converged and full.converged
    assert len(pruned.grids.weights) < 0.95 * len(full.grids.weights)
    assert abs(e_pruned - e_full) < 1e-7


@pytest.mark.parametrize('dtype', [np.float64, np.float32])
def test_packed_grid_integrals_equal_numpy_indexing(dtype):
    """kernels.pack_grid_integrals on libcint's own output equals the fancy-indexed lower triangle."""
    mol = _lih()
    coords = np.random.default_rng(1).normal(size=(37, 3))
    full = mol.intor('int1e_grids', grids=coords, hermi=1)  # (g, nao, nao), grid index fastest
    rows, cols = kernels.pack_index(mol.nao)
    expected = full[:, rows, cols].astype(dtype)
    packed = np.empty_like(expected)
    kernels.pack_grid_integrals(full, packed)
    assert np.array_equal(packed, expected)
    packed[...] = 0.0
    kernels.pack_grid_integrals(np.ascontiguousarray(full), packed)  # another layout: the numpy path
    assert np.array_equal(packed, expected)


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
    with pytest.raises(NotImplementedError, match='gradients of DM21 ROKS'):  # RKS/UKS: tests/test_grad.py
        ROKS(_lih(), dm21_network).nuc_grad_method()


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


# --- screened, budgeted local-HF integrals ---------------------------------------------------------------


def _octane():
    """A zig-zag n-octane (STO-3G, 58 AOs, 11 A long): long enough that screening leaves AOs out."""
    atoms = []
    for i in range(8):
        x, z, up = 1.27 * i, (0.44 if i % 2 else -0.44), (1 if i % 2 else -1)
        atoms += [('C', (x, 0, z)), ('H', (x, 0.88, z + up * 0.63)), ('H', (x, -0.88, z + up * 0.63))]
    atoms += [('H', (-0.9, 0, -0.9)), ('H', (1.27 * 7 + 0.9, 0, 0.88))]
    return gto.M(atom=atoms, basis='sto-3g', verbose=0)


@pytest.fixture(scope='module')
def octane_case():
    mol = _octane()
    grids = dft.gen_grid.Grids(mol)
    grids.level = 0
    grids.build(with_non0tab=True)
    dm = dft.RKS(mol, xc='b3lyp5').run(conv_tol=1e-7).make_rdm1()
    return mol, grids, dm


def _evaluate(network, case, **options):
    mol, grids, dm = case
    ni = DM21NumInt(network, **options)
    result = ni.evaluate(mol, grids, dm[None] / 2, restricted=True)
    return ni, result


@pytest.fixture(scope='module')
def octane_dense(dm21_network, octane_case):
    return _evaluate(dm21_network, octane_case, screening=0.0, nu_dtype=torch.float64)[1]


@pytest.mark.parametrize('threshold', [1e-5, 1e-4])
def test_screened_energy_and_potential_follow_the_dense_ones(dm21_network, octane_case, octane_dense, threshold):
    """Screening leaves AOs out (checked) and E_xc stays within the threshold of the dense evaluation.

    The threshold is an estimate of the error bound; measured errors are 300-3,000x smaller (docs/core.md).
    """
    ni, screened = _evaluate(dm21_network, octane_case, screening=threshold)
    plan = ni._plan_cache
    assert plan.kept_pairs < 0.999 * plan.ngrid * plan.nao * (plan.nao + 1) / 2  # something was screened out
    error = abs(screened.exc - octane_dense.exc)
    print(f'screening {threshold:g}: kept {plan.describe(ni).split("keeps ")[1][:6]}, |dE_xc| = {error:.1e} Ha')
    assert error < min(1e-6, threshold)
    assert np.abs(screened.vxc - octane_dense.vxc).max() < 1e-4


def test_default_screening_and_float32_storage_equal_dense_to_1e6(dm21_network, octane_case, octane_dense):
    _, default = _evaluate(dm21_network, octane_case)
    assert abs(default.exc - octane_dense.exc) < 1e-6


def test_cache_within_budget_gives_the_same_energy_and_says_so(dm21_network, octane_case, octane_dense):
    """A budget too small for every block caches some, recomputes the rest, and the log line says which."""
    mol, grids, dm = octane_case
    full, _ = _evaluate(dm21_network, octane_case, screening=0.0, nu_dtype=torch.float64)
    needed_mb = full._plan_cache.nu_bytes_needed / 1e6
    ao_mb = 4 * len(grids.weights) * mol.nao * 8 / 1e6
    ni, first = _evaluate(dm21_network, octane_case, screening=0.0, nu_dtype=torch.float64,
                          memory_budget_mb=2 * ao_mb + 0.5 * needed_mb)  # fmt: skip
    line = ni._plan_cache.describe(ni)
    assert 'budget' in line and 'memory_budget_mb' in line
    assert 'blocks, the rest recomputed at every evaluation' in line, line
    second = ni.evaluate(mol, grids, dm[None] / 2, restricted=True)  # half from the cache, half recomputed
    assert first.exc == pytest.approx(octane_dense.exc, abs=1e-12)
    assert second.exc == pytest.approx(octane_dense.exc, abs=1e-12)
    nothing, _ = _evaluate(dm21_network, octane_case, screening=0.0, memory_budget_mb=0.0)
    assert 'not cached: recomputed at every evaluation' in nothing._plan_cache.describe(nothing)


def test_cached_screening_follows_the_density_matrix(dm21_network, octane_case):
    """Reusing cached screened integrals for a new density gives what a fresh evaluation of it gives."""
    mol, grids, dm = octane_case
    ni, _ = _evaluate(dm21_network, octane_case, screening=1e-4)
    other = dm + 0.05 * np.random.default_rng(1).normal(size=dm.shape) * (np.abs(dm) > 0)
    other = 0.5 * (other + other.T)
    reused = ni.evaluate(mol, grids, other[None] / 2, restricted=True)
    fresh = DM21NumInt(dm21_network, screening=1e-4).evaluate(mol, grids, other[None] / 2, restricted=True)
    assert reused.exc == pytest.approx(fresh.exc, abs=1e-9)


def test_scf_logs_the_integral_path_and_uses_max_memory_when_set(dm21_network, tmp_path):
    mol = gto.M(atom=WATER, basis='sto-3g', verbose=3, output=str(tmp_path / 'scf.log'))
    mf = RKS(mol, dm21_network)
    mf.init_guess = 'minao'
    mf.grids.level = 0
    mf.max_memory = 1.0  # MB: far too little to cache anything
    mf.kernel()
    log = (tmp_path / 'scf.log').read_text()
    lines = [line for line in log.splitlines() if line.startswith('DM21 local-HF integrals')]
    assert len(lines) == 1, log  # one line, at the start of the SCF
    assert 'max_memory' in lines[0] and 'not cached' in lines[0]
    automatic = RKS(gto.M(atom=WATER, basis='sto-3g', verbose=0), dm21_network)
    automatic.grids.level = 0
    automatic.init_guess = 'minao'
    automatic.kernel()
    assert automatic._numint._plan_cache.budget_why == '30% of the available memory'
    assert automatic.e_tot == pytest.approx(mf.e_tot, abs=1e-6)


@pytest.mark.parametrize('bad', [-1e-6, float('nan'), float('inf'), 'tight', None])
def test_bad_screening_thresholds_are_refused(dm21_network, bad):
    with pytest.raises(ValueError, match='screening must be'):
        DM21NumInt(dm21_network, screening=bad)
    with pytest.raises(ValueError, match='screening must be'):
        RKS(_lih(), dm21_network, screening=bad)


def test_bad_nu_dtype_is_refused(dm21_network):
    with pytest.raises(ValueError, match='nu_dtype'):
        DM21NumInt(dm21_network, nu_dtype=torch.float16)


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_cuda_is_refused_on_a_machine_without_gpu(dm21_network):
    """A GPU request on a CPU-only machine is refused when the SCF object is made, never run on the CPU."""
    from aiida_dm21.functional.numint import DeviceUnavailableError

    for device in ('cuda', 'cuda:0'):
        with pytest.raises(DeviceUnavailableError, match='sees no CUDA GPU'):
            RKS(_lih(), dm21_network, device=device)
    with pytest.raises(ValueError, match='not a device name'):
        RKS(_lih(), dm21_network, device='gpu please')
    with pytest.raises(ValueError, match='not supported'):
        RKS(_lih(), dm21_network, device='meta')


def test_available_memory_is_positive_and_bounded():
    from aiida_dm21.functional.numint import available_memory_mb

    mb = available_memory_mb()
    assert 0 < mb < 1e8


def test_pytorch_path_equals_the_compiled_one(dm21_network, octane_case, monkeypatch):
    """The GPU runs the PyTorch branch of the screened evaluation: on the CPU it must give what the kernels give."""
    from aiida_dm21.functional import kernels

    if not kernels.available():
        pytest.skip('numba is not importable: only the PyTorch path exists here')
    _, compiled = _evaluate(dm21_network, octane_case, screening=1e-4)
    monkeypatch.setenv('AIIDA_DM21_FUSED', '0')
    assert not kernels.available()
    _, pytorch = _evaluate(dm21_network, octane_case, screening=1e-4)
    assert pytorch.exc == pytest.approx(compiled.exc, abs=1e-7)  # float32 network: PyTorch vs fused element-wise
    np.testing.assert_allclose(pytorch.vxc, compiled.vxc, atol=1e-6)
    np.testing.assert_allclose(pytorch.nelec, compiled.nelec, rtol=1e-12)
