"""Fractional-charge and fractional-spin SCF (``aiida_dm21.functional.fractional``) and its command.

Real PySCF calculations on the H atom in cc-pVDZ on level-1 grids (kept small for speed; docs/fractional.md
has the converged-grid numbers).  Measured values quoted in comments are from PySCF 2.14 / torch 2.13.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from pyscf import dft, gto

from aiida_dm21.cli import main
from aiida_dm21.functional.fractional import (
    FractionalCurve,
    UnknownFunctionalError,
    aufbau_occupation,
    fractional_charge_curve,
    fractional_spin_curve,
    plot_fractional_curves,
    resolve_functional,
    run_fractional_point,
    write_table,
)
from aiida_dm21.functional.scf import UKS, treutler_ahlrichs_original

pytestmark = pytest.mark.core

BASIS = 'cc-pvdz'
GRID = 1
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _h(charge: int = 0, spin: int = 1) -> gto.Mole:
    return gto.M(atom='H 0 0 0', basis=BASIS, charge=charge, spin=spin, verbose=0)


def _integer_uks(mol: gto.Mole, xc: str) -> float:
    """An ordinary PySCF UKS energy on the same grids, for comparison with the curves' end points."""
    mf = dft.UKS(mol)
    mf.xc = xc
    mf.grids.level = GRID
    mf.grids.radi_method = treutler_ahlrichs_original
    mf.small_rho_cutoff = 1e-20
    mf.conv_tol = 1e-11
    return float(mf.kernel())


@pytest.fixture(scope='module')
def dm21(upstream_dir):
    return resolve_functional(upstream_dir / 'DM21')


@pytest.fixture(scope='module')
def b3lyp_charge() -> FractionalCurve:
    return fractional_charge_curve(_h(charge=1, spin=0), 'b3lyp5', 5, grid_level=GRID)


@pytest.fixture(scope='module')
def b3lyp_spin() -> FractionalCurve:
    return fractional_spin_curve(_h(), 'b3lyp5', [0.5], grid_level=GRID)


def test_aufbau_occupation():
    np.testing.assert_array_equal(aufbau_occupation(2.25, 5), [1, 1, 0.25, 0, 0])
    np.testing.assert_array_equal(aufbau_occupation(0.0, 2), [0, 0])
    np.testing.assert_array_equal(aufbau_occupation(1.0 - 1e-13, 2), [1, 0])
    with pytest.raises(ValueError, match='need 3 orbitals'):
        aufbau_occupation(2.5, 2)


def test_end_points_are_the_integer_energies(b3lyp_charge):
    # H+ -> H: 0 electrons is a bare proton, E = 0 without an SCF; 1 electron is the ordinary H atom.
    assert b3lyp_charge.energy[0] == 0.0 and b3lyp_charge.cycles[0] == 0 and b3lyp_charge.converged[0]
    assert b3lyp_charge.energy[-1] == pytest.approx(_integer_uks(_h(), 'b3lyp5'), abs=1e-6)
    # H -> H-: the fraction goes to beta (pairing); both ends are ordinary SCFs.
    anion = fractional_charge_curve(_h(), 'b3lyp5', [0.0, 1.0], grid_level=GRID)
    assert anion.all_converged
    np.testing.assert_allclose(anion.n_alpha, [1, 1])
    np.testing.assert_allclose(anion.n_beta, [0, 1])
    assert anion.energy[0] == pytest.approx(_integer_uks(_h(), 'b3lyp5'), abs=1e-6)
    assert anion.energy[1] == pytest.approx(_integer_uks(_h(charge=-1, spin=0), 'b3lyp5'), abs=1e-6)


def test_fractional_density_has_the_fractional_electron_count():
    mol = _h()
    point = run_fractional_point(mol, 'b3lyp5', 0.3, 0.0, grid_level=GRID)
    s = mol.intor('int1e_ovlp')
    assert point.converged
    assert np.einsum('ij,ji', point.dm[0], s) == pytest.approx(0.3, abs=1e-10)
    assert np.einsum('ij,ji', point.dm[1], s) == pytest.approx(0.0, abs=1e-12)


def test_b3lyp_sags_below_the_straight_line(b3lyp_charge):
    curve = b3lyp_charge
    assert curve.all_converged
    np.testing.assert_allclose(curve.delta, [0, 0.25, 0.5, 0.75, 1])
    assert np.all(curve.deviation[1:-1] < -0.02)  # measured -29.8, -43.3, -33.6 mHa
    assert np.all(np.diff(curve.energy, 2) > 0)  # convex
    assert -0.060 < curve.deviation_at(0.5) < -0.030  # measured -43.3 mHa (-43.2 in aug-cc-pVQZ)
    with pytest.raises(ValueError, match='was not computed'):
        curve.deviation_at(0.1)


def test_dm21_is_nearly_linear(dm21, b3lyp_charge):
    curve = fractional_charge_curve(_h(charge=1, spin=0), dm21, [0.5], grid_level=GRID)
    assert curve.all_converged
    mf = UKS(_h(), dm21.network)
    mf.grids.level = GRID
    mf.conv_tol = 1e-9
    mf.conv_tol_grad = 1e-4
    assert curve.energy[-1] == pytest.approx(mf.kernel(), abs=1e-6)
    # measured: DM21 -1.07 mHa, B3LYP -43.3 mHa (ratio 0.025)
    assert abs(curve.deviation_at(0.5)) < 0.1 * abs(b3lyp_charge.deviation_at(0.5))


def test_fractional_spin_error(dm21, b3lyp_spin):
    # half an alpha + half a beta electron: exact E = E(H); B3LYP is far above (static correlation error)
    assert b3lyp_spin.all_converged
    np.testing.assert_allclose(b3lyp_spin.n_alpha, [1, 0.5])
    np.testing.assert_allclose(b3lyp_spin.n_beta, [0, 0.5])
    assert 0.040 < b3lyp_spin.deviation_at(0.5) < 0.070  # measured +55.2 mHa
    curve = fractional_spin_curve(_h(), dm21, [0.5], grid_level=GRID)
    assert curve.all_converged
    # measured: DM21 +0.36 mHa, B3LYP +55.2 mHa (ratio 0.007)
    assert abs(curve.deviation_at(0.5)) < 0.05 * b3lyp_spin.deviation_at(0.5)


def test_bad_input_is_rejected():
    cation = _h(charge=1, spin=0)
    with pytest.raises(ValueError, match=r'must lie in \[0, 1\]'):
        fractional_charge_curve(cation, 'b3lyp5', [0.5, 1.5])
    with pytest.raises(ValueError, match=r'must lie in \[0, 1\]'):
        fractional_charge_curve(cation, 'b3lyp5', [-0.1])
    with pytest.raises(ValueError, match=r'must lie in \[0, 0.5\]'):
        fractional_spin_curve(_h(), 'b3lyp5', [0.75])
    with pytest.raises(ValueError, match='at least 2 points'):
        fractional_charge_curve(cation, 'b3lyp5', 0)
    with pytest.raises(ValueError, match='no delta values'):
        fractional_charge_curve(cation, 'b3lyp5', [])
    with pytest.raises(UnknownFunctionalError, match="unknown functional 'nosuchxc'"):
        fractional_charge_curve(cation, 'nosuchxc', 3)
    with pytest.raises(ValueError, match='unknown functional'):
        resolve_functional('DM99')
    with pytest.raises(ValueError, match='must differ from spin 0 by 1'):
        fractional_charge_curve(cation, 'b3lyp5', 3, spin_next=2)
    with pytest.raises(ValueError, match='open-shell'):
        fractional_spin_curve(cation, 'b3lyp5', 3)


def test_png_and_tables(b3lyp_charge, b3lyp_spin, tmp_path):
    pytest.importorskip('matplotlib')
    png = plot_fractional_curves([b3lyp_charge], tmp_path / 'fc.png')
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    assert plot_fractional_curves([b3lyp_spin], tmp_path / 'fs.png', raw_panel=False).read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match='cannot mix'):
        plot_fractional_curves([b3lyp_charge, b3lyp_spin], tmp_path / 'mixed.png')
    data = json.loads(write_table([b3lyp_charge, b3lyp_spin], tmp_path / 't.json').read_text())
    assert data['summary'][0]['deviation_at_0.5_mha'] == pytest.approx(b3lyp_charge.deviation_at(0.5) * 1000)
    assert len(data['points']) == 5 + 2
    lines = write_table([b3lyp_charge], tmp_path / 't.csv').read_text().splitlines()
    assert lines[0].startswith('functional,kind,system') and len(lines) == 6
    with pytest.raises(ValueError, match=r'\.csv or \.json'):
        write_table([b3lyp_charge], tmp_path / 't.txt')


def test_command(tmp_path):
    pytest.importorskip('matplotlib')
    png, table = tmp_path / 'h.png', tmp_path / 'h.csv'
    args = ['fractional-curve', 'h', '-f', 'b3lyp5', '-b', BASIS, '--grid-level', str(GRID), '--points', '2']
    result = CliRunner().invoke(main, [*args, '-o', str(png), '--table', str(table)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    rows = table.read_text().splitlines()
    assert len(rows) == 4  # header + delta 0, 0.5 (always added), 1
    assert '-43.3' in result.output  # the delta = 0.5 deviation in mHa
    result = CliRunner().invoke(main, [*args[:-1], '0', '-o', str(png)])
    assert result.exit_code == 2 and 'at least 2 points' in result.output
    result = CliRunner().invoke(main, ['fractional-curve', 'h', '-f', 'nosuchxc', '-o', str(png)])
    assert result.exit_code == 1 and 'unknown functional' in result.output
    result = CliRunner().invoke(main, ['fractional-curve', 'h', '-f', 'b3lyp5', '-o', str(tmp_path / 'h.jpg')])
    assert result.exit_code == 2 and 'PNG' in result.output
