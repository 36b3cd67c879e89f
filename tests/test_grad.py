"""Analytic nuclear gradients of DM21 (functional/grad.py): against central finite differences of the converged
SCF energy, translational invariance, screening, grid response, scanners and refusals."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pyscf import gto

from aiida_dm21.functional.grad import RKSGradients, UKSGradients, nu_ip
from aiida_dm21.functional.scf import RKS, ROKS, UKS

pytestmark = pytest.mark.core

WATER = 'O 0 0 0.117790; H 0 0.755453 -0.471161; H 0 -0.755453 -0.471161'
# a sigma radical (X 2Sigma+): OH's degenerate open pi shell let the DIIS wander between pi_x, pi_y and their mixtures
# (stationary points 1e-5 Ha apart), and on one CI machine it ran out of cycles
BERYLLIUM_HYDRIDE = 'Be 0 0 0; H 0 0 1.34'
FD_STEP = 1e-3  # bohr
FD_TOLERANCE = 1e-5  # Ha/bohr


def _grid_response_available() -> bool:
    from pyscf.dft import gen_grid

    try:
        from pyscf.hessian.rks import get_dweight_dA  # noqa: F401
    except ImportError:
        return False
    return hasattr(gen_grid.Grids(gto.M(atom='H 0 0 0; H 0 0 0.74', verbose=0)), 'atm_idx')


# grid response needs PySCF grids that keep each point's atom (PySCF >= 2.5); CI also runs PySCF 2.3
needs_grid_response = pytest.mark.skipif(
    not _grid_response_available(), reason='this PySCF does not record the atom of each grid point'
)


@pytest.fixture(scope='module')
def network(upstream_dir):
    from aiida_dm21.functional.checkpoint import load_network

    return load_network(upstream_dir / 'DM21')[0]


def _scf(mol, network, dm0=None, level=4, **options):
    """A converged float64 DM21 SCF, tight enough for finite differences of its energy."""
    mf = (RKS if mol.spin == 0 else UKS)(mol, copy.deepcopy(network), network_dtype=torch.float64, **options)
    mf.grids.level = level
    # no pruning by density: the pruned grid would depend on each displaced geometry's density (a jump in the
    # energy of up to ~1e-8 Ha between the finite-difference points), and a UKS can then stall above 1e-10
    mf.small_rho_cutoff = 1e-20
    mf.conv_tol, mf.conv_tol_grad = 1e-10, 1e-6
    mf.kernel(dm0=dm0)
    assert mf.converged
    return mf


class _Reference:
    """A converged SCF at the reference geometry and its analytic gradient."""

    def __init__(self, atom, spin, network):
        self.mol = gto.M(atom=atom, basis='6-31g', spin=spin, verbose=0)
        self.network = network
        # float64 integrals too: float32 storage rounds nu, which makes the energy rough on the FD step's scale
        self.mf = _scf(self.mol, network, nu_dtype=torch.float64)
        self.grad = self.mf.nuc_grad_method()
        self.de = self.grad.kernel()

    def finite_difference(self, atom, xyz):
        energies = []
        for sign in (1, -1):
            coords = self.mol.atom_coords()
            coords[atom, xyz] += sign * FD_STEP
            mol = self.mol.set_geom_(coords, unit='Bohr', inplace=False)
            energies.append(_scf(mol, self.network, dm0=self.mf.make_rdm1(), nu_dtype=torch.float64).e_tot)
        return (energies[0] - energies[1]) / (2 * FD_STEP)


@pytest.fixture(scope='module')
def water(network):
    return _Reference(WATER, 0, network)


@pytest.fixture(scope='module')
def beryllium_hydride(network):
    return _Reference(BERYLLIUM_HYDRIDE, 1, network)


@needs_grid_response
@pytest.mark.slow
@pytest.mark.parametrize(('atom', 'xyz'), [(0, 2), (1, 1)], ids=['O-z', 'H-y'])
def test_rks_gradient_equals_finite_differences(water, atom, xyz):
    assert isinstance(water.grad, RKSGradients) and water.grad.grid_response
    numerical = water.finite_difference(atom, xyz)
    assert abs(water.de[atom, xyz] - numerical) < FD_TOLERANCE, (water.de[atom, xyz], numerical)


@needs_grid_response
@pytest.mark.slow
@pytest.mark.parametrize(('atom', 'xyz'), [(0, 2), (1, 2)], ids=['Be-z', 'H-z'])
def test_uks_gradient_equals_finite_differences(beryllium_hydride, atom, xyz):
    assert isinstance(beryllium_hydride.grad, UKSGradients)
    numerical = beryllium_hydride.finite_difference(atom, xyz)
    assert abs(beryllium_hydride.de[atom, xyz] - numerical) < FD_TOLERANCE, (beryllium_hydride.de[atom, xyz], numerical)


@needs_grid_response
@pytest.mark.slow
def test_grid_response_makes_the_gradient_translationally_invariant(water, beryllium_hydride):
    for ref in (water, beryllium_hydride):
        assert ref.de.shape == (ref.mol.natm, 3)
        assert abs(ref.de).max() > 1e-3  # a real force, not zeros
        np.testing.assert_allclose(ref.de.sum(0), 0.0, atol=1e-8)


@needs_grid_response
@pytest.mark.slow
def test_without_grid_response_the_gradient_is_approximate(water):
    """grid_response=False drops the moving-grid terms: close to the full gradient, not equal, not invariant."""
    water.grad.grid_response = False
    try:
        approximate = water.grad.kernel()
    finally:
        water.grad.grid_response = True
    difference = abs(approximate - water.de).max()
    assert 1e-6 < difference < 5e-3, difference  # measured: 2.1e-3 Ha/bohr at grids.level 4 (O z)
    assert abs(approximate.sum(0)).max() > 1e-6


def test_nu_derivative_integrals_equal_finite_differences_for_both_omegas():
    """int1e_grids_ip with env[PTR_RANGE_OMEGA] is the derivative of the nu integrals the features use."""
    from aiida_dm21.functional.numint import _unpack

    mol = gto.M(atom=WATER, basis='6-31g', verbose=0)
    coords = np.array([[0.1, 0.2, 0.3], [0.5, -0.3, 0.2], [-1.0, 0.4, -0.6]])
    shells = np.arange(mol.nbas)
    atom, xyz, h = 1, 1, 1e-4
    p0, p1 = mol.aoslice_by_atom()[atom, 2:]

    class _Omegas:  # DM21NumInt._nu needs only these attributes
        nu_dtype, device = torch.float64, torch.device('cpu')

    from aiida_dm21.functional.numint import DM21NumInt

    for omega in (0.0, 0.4):
        holder = _Omegas()
        holder.omegas = (omega,)
        nus = []
        for sign in (1, -1):
            c = mol.atom_coords()
            c[atom, xyz] += sign * h
            moved = mol.set_geom_(c, unit='Bohr', inplace=False)
            nus.append(_unpack(DM21NumInt._nu(holder, moved, coords, shells, mol.nao), mol.nao)[0].numpy())
        numerical = (nus[0] - nus[1]) / (2 * h)
        ip = nu_ip(mol, coords, shells, omega)[xyz]
        analytic = np.zeros_like(numerical)
        analytic[:, p0:p1, :] -= ip[:, p0:p1, :]
        analytic[:, :, p0:p1] -= ip[:, p0:p1, :].transpose(0, 2, 1)
        assert abs(numerical).max() > 1e-2
        np.testing.assert_allclose(analytic, numerical, atol=1e-7)


def _small_scf(network, atom=WATER, spin=0, basis='sto-3g', level=1, unrestricted=False, **options):
    mol = gto.M(atom=atom, basis=basis, spin=spin, verbose=0)
    mf = (UKS if spin or unrestricted else RKS)(mol, copy.deepcopy(network), **options)
    mf.grids.level = level
    mf.conv_tol, mf.conv_tol_grad = 1e-9, 1e-5
    mf.kernel()
    assert mf.converged
    return mf


def _butane():
    """A zig-zag n-butane (STO-3G, 30 AOs): long enough that screening leaves AO pairs out."""
    atoms = []
    for i in range(4):
        x, z, up = 1.27 * i, (0.44 if i % 2 else -0.44), (1 if i % 2 else -1)
        atoms += [('C', (x, 0, z)), ('H', (x, 0.88, z + up * 0.63)), ('H', (x, -0.88, z + up * 0.63))]
    return [*atoms, ('H', (-0.9, 0, -0.9)), ('H', (1.27 * 3 + 0.9, 0, 0.88))]


@needs_grid_response
def test_screened_gradient_follows_the_dense_one(network):
    """Screening (here 1e-3 Ha on a coarse grid) drops AO pairs from the local-HF integrals; the gradient follows.

    Both XC gradients at the screened SCF's density (the SCF-consistent dense gradient differed from the
    screened one by 8.8e-6 Ha/bohr, measured once; not repeated here for time).
    """
    from aiida_dm21.functional.grad import xc_gradient
    from aiida_dm21.functional.numint import DM21NumInt

    mf = _small_scf(network, atom=_butane(), screening=1e-3, level=0)
    plan = mf._numint._plan_cache
    kept = plan.kept_pairs / (plan.ngrid * plan.nao * (plan.nao + 1) / 2)
    assert kept < 0.99, kept
    dms = mf.make_rdm1()[None] / 2
    exc, screened = xc_gradient(mf._numint, mf.mol, mf.grids, dms)
    dense_numint = DM21NumInt(copy.deepcopy(network), screening=0.0)
    exc_dense, dense = xc_gradient(dense_numint, mf.mol, mf.grids, dms)
    assert 0 < abs(exc - exc_dense) < 1e-3
    difference = abs(screened - dense).max()
    assert 0 < difference < 1e-4, difference
    np.testing.assert_allclose(screened.sum(0), 0.0, atol=1e-8)


@pytest.fixture(scope='module')
def small_rks(network):
    """H2O/STO-3G on a coarse grid (float32 network): cheap, for what needs no finite differences."""
    mf = _small_scf(network)
    return mf, mf.nuc_grad_method().kernel()


@pytest.fixture(scope='module')
def small_uks(network):
    mf = _small_scf(network, spin=0, unrestricted=True)
    return mf, mf.nuc_grad_method().kernel()


@needs_grid_response
def test_scanner_gives_the_gradient_of_a_fresh_calculation(network, small_rks):
    """as_scanner() (geomeTRIC, ASE): a new geometry gets a new grid and integral cache, not the old one's."""
    mf = _small_scf(network)  # its own: the scanner changes the SCF object, its grid and cache
    de_start = small_rks[1]
    scanner = mf.nuc_grad_method().as_scanner()
    moved = mf.mol.atom_coords()
    moved[1, 1] += 0.05
    mol2 = mf.mol.set_geom_(moved, unit='Bohr', inplace=False)
    e_scan, de_scan = scanner(mol2)
    fresh = RKS(mol2, copy.deepcopy(network))
    fresh.grids.level = 1
    fresh.conv_tol, fresh.conv_tol_grad = 1e-9, 1e-5
    e_fresh = fresh.kernel()
    de_fresh = fresh.nuc_grad_method().kernel()
    assert abs(e_scan - e_fresh) < 1e-7
    np.testing.assert_allclose(de_scan, de_fresh, atol=2e-5)
    assert abs(de_scan - de_start).max() > 1e-3  # the geometry did change


@needs_grid_response
def test_uks_gradient_of_a_closed_shell_is_close_to_rks(small_rks, small_uks):
    assert isinstance(small_uks[0].nuc_grad_method(), UKSGradients)
    # the network is not exactly alpha/beta symmetric (test_numint): the densities differ slightly
    difference = abs(small_uks[1] - small_rks[1]).max()
    assert difference < 2e-4, difference
    np.testing.assert_allclose(small_uks[1].sum(0), 0.0, atol=1e-8)


@needs_grid_response
def test_gradient_pass_integrates_the_scf_energy(small_rks, small_uks):
    """The gradient follows the SCF's evaluation: same grid, blocks and screened shells, hence the same E_xc."""
    from aiida_dm21.functional.grad import xc_gradient

    for mf in (small_rks[0], small_uks[0]):
        dm = mf.make_rdm1()
        if dm.ndim == 2:
            exc_scf = mf._numint.nr_rks(mf.mol, mf.grids, '', dm)[1]
            dms = dm[None] / 2
        else:
            exc_scf = mf._numint.nr_uks(mf.mol, mf.grids, '', dm)[1]
            dms = dm
        exc, de = xc_gradient(mf._numint, mf.mol, mf.grids, dms, grid_response=True)
        assert abs(exc - exc_scf) < 1e-10, (exc, exc_scf)
        assert abs(exc - mf.scf_summary['exc']) < 1e-6  # and the converged SCF's
        assert de.shape == (mf.mol.natm, 3) and np.isfinite(de).all()
        np.testing.assert_allclose(de.sum(0), 0.0, atol=1e-8)  # the XC part alone is invariant too


def test_roks_gradients_are_refused(network):
    mol = gto.M(atom='O 0 0 0; H 0 0 0.97', basis='sto-3g', spin=1, verbose=0)
    mf = ROKS(mol, copy.deepcopy(network))
    with pytest.raises(NotImplementedError, match='ROKS'):
        mf.nuc_grad_method()
    with pytest.raises(NotImplementedError, match='ROKS'):
        mf.Gradients()


@needs_grid_response
def test_grid_response_refuses_a_partition_it_has_no_derivative_for():
    from pyscf.dft import gen_grid

    from aiida_dm21.functional.grad import _weight_derivatives

    mol = gto.M(atom=WATER, basis='sto-3g', verbose=0)
    grids = gen_grid.Grids(mol)
    grids.level, grids.becke_scheme = 0, gen_grid.becke_lko
    grids.build()
    with pytest.raises(NotImplementedError, match='original Becke partition'):
        _weight_derivatives(mol, grids)
    grids.becke_scheme = gen_grid.original_becke
    grids.build()
    dw = _weight_derivatives(mol, grids)(slice(0, 50))
    assert dw.shape == (mol.natm, 3, 50) and abs(dw).max() > 0
    np.testing.assert_allclose(dw.sum(0), 0.0, atol=1e-12)  # weights move with the molecule as a whole
