"""D3/D4 dispersion on DM21 SCFs: the energies and gradients are the dispersion library's own numbers."""

from __future__ import annotations

import numpy as np
import pytest
from pyscf import gto

from aiida_dm21.functional import dispersion
from aiida_dm21.functional.scf import KS, UKS

pytestmark = pytest.mark.core


@pytest.fixture(scope='module')
def dm21_network(upstream_dir):
    from aiida_dm21.functional.checkpoint import load_network

    return load_network(upstream_dir / 'DM21')[0]


WATER = 'O 0 0 0.1178; H 0 0.7555 -0.4712; H 0 -0.7555 -0.4712'


def _water(**kwargs):
    return gto.M(atom=WATER, basis='6-31g', verbose=0, **kwargs)


def _simple_dftd3(mol, damping: str, grad: bool = False):
    """simple-dftd3's own Python API (the `dftd3` package), independent of pyscf-dispersion's wrapper."""
    interface = pytest.importorskip('dftd3.interface')
    param = {'d3bj': interface.RationalDampingParam, 'd3zero': interface.ZeroDampingParam}[damping]
    model = interface.DispersionModel(mol.atom_charges(), mol.atom_coords())
    return model.get_dispersion(param(method='b3lyp', atm=False), grad=grad)


def test_d3bj_adds_the_library_energy_to_the_dm21_scf(dm21_network):
    mol = _water()
    plain = KS(mol, dm21_network)
    with_d3 = KS(mol, dm21_network, disp='d3bj')
    e_plain, e_d3 = plain.kernel(), with_d3.kernel()
    assert plain.converged and with_d3.converged
    reference = float(_simple_dftd3(mol, 'd3bj')['energy'])
    assert reference < 0
    assert abs((e_d3 - e_plain) - reference) < 1e-9  # a constant: the SCF path is the same
    assert with_d3.scf_summary['dispersion'] == pytest.approx(reference, abs=1e-12)


def test_unrestricted_and_zero_damping_and_d4(dm21_network):
    # BeH, a sigma radical: OH's degenerate open pi shell can keep a DIIS wandering near convergence
    mol = gto.M(atom='Be 0 0 0; H 0 0 1.34', basis='6-31g', spin=1, verbose=0)
    mf = UKS(mol, dm21_network, disp='d3zero')
    mf.kernel()
    assert mf.converged
    assert mf.get_dispersion() == pytest.approx(float(_simple_dftd3(mol, 'd3zero')['energy']), abs=1e-12)
    e_d4, _ = dispersion.dispersion(mol, 'd4')
    assert np.isfinite(e_d4) and e_d4 < 0 and abs(e_d4 - mf.get_dispersion()) > 1e-6  # another model


@pytest.mark.parametrize('version', ['d3bj', 'd4'])
def test_dispersion_gradient_is_the_derivative_of_its_energy(version):
    mol = _water()
    _, grad = dispersion.dispersion(mol, version, gradient=True)
    coords, step = mol.atom_coords(), 1e-4
    for atom, axis in ((0, 2), (1, 1)):
        energies = []
        for sign in (1, -1):
            moved = coords.copy()
            moved[atom, axis] += sign * step
            energies.append(dispersion.dispersion(mol.set_geom_(moved, unit='Bohr', inplace=False), version)[0])
        assert grad[atom, axis] == pytest.approx((energies[0] - energies[1]) / (2 * step), abs=1e-9)
    if version == 'd3bj':
        assert np.allclose(grad, _simple_dftd3(mol, 'd3bj', grad=True)['gradient'], atol=1e-12)


@pytest.mark.parametrize('bad', ['d3', 'b3lyp-d3bj', 'D5', 3, ['d3bj'], 'd3bj:pbe'])
def test_unknown_dispersion_is_refused_with_the_choices(dm21_network, bad):
    with pytest.raises(ValueError, match='d3bj, d3zero'):
        KS(_water(), dm21_network, disp=bad)


def test_no_dispersion_spellings_and_a_late_bad_setting(dm21_network):
    for none in (None, False, '', 'none', 'None'):
        assert dispersion.check_disp(none) is None
    assert dispersion.check_disp(' D3BJ ') == 'd3bj'
    mf = KS(_water(), dm21_network)
    assert mf.get_dispersion() == 0.0
    mf.disp = 'd3-bj'  # set after construction: refused when the energy is needed, not silently ignored
    with pytest.raises(ValueError, match='unknown dispersion'):
        mf.kernel()


def test_dm21_gradient_carries_the_dispersion_gradient(dm21_network):
    """With disp, the nuclear gradient is the one without plus the library's dE_disp/dR (to rounding)."""
    mol = gto.M(atom=WATER, basis='sto-3g', verbose=0)
    plain, with_d3 = KS(mol, dm21_network), KS(mol, dm21_network, disp='d3bj')
    for mf in (plain, with_d3):
        mf.grids.level = 1
        mf.conv_tol = 1e-10
        mf.kernel()
    grads = [mf.nuc_grad_method() for mf in (plain, with_d3)]
    for grad in grads:
        grad.grid_response = False  # the same for both (and PySCF < 2.5 has no per-point atoms for it)
    g_plain, g_d3 = (grad.kernel() for grad in grads)
    _, expected = dispersion.dispersion(mol, 'd3bj', gradient=True)
    assert np.abs(expected).max() > 1e-7
    assert np.allclose(g_d3 - g_plain, expected, atol=1e-8)
