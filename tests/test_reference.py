"""Integer reference calculations and fractional ensembles: real PySCF, checked against independent numbers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from pyscf import fci, gto, scf

from aiida_dm21.reference.dataset import DatasetError, load_dataset, save_dataset
from aiida_dm21.reference.fractional import (
    fractional_charge_systems,
    fractional_spin_systems,
    integer_system,
    natural_orbitals,
)
from aiida_dm21.reference.integer import IntegerSpec, ReferenceInputError, run_integer_system

pytestmark = pytest.mark.core

BASIS = '6-31g'


def _calc(label, atom, charge, spin, method='fci', **kwargs):
    return run_integer_system(
        IntegerSpec(atom=atom, basis=BASIS, charge=charge, spin=spin, reference_method=method, label=label, **kwargs)
    )


@pytest.fixture(scope='module')
def hydrogen():
    return {k: _calc(k, 'H 0 0 0', c, s) for k, (c, s) in {'H+': (1, 0), 'H': (0, 1), 'H-': (-1, 0)}.items()}


def test_integer_energies_and_terms(hydrogen):
    h = hydrogen['H']
    assert abs(h.e_ref - scf.UHF(gto.M(atom='H 0 0 0', basis=BASIS, spin=1, verbose=0)).kernel()) < 1e-9
    # one electron: E_xc exactly cancels the Hartree self-interaction
    assert abs(h.e_xc_target + h.e_hartree) < 1e-9
    proton = hydrogen['H+']
    assert proton.e_ref == 0.0 and proton.n_electrons == (0, 0) and not proton.dm.any()
    anion = hydrogen['H-']
    mol = gto.M(atom='H 0 0 0', basis=BASIS, charge=-1, verbose=0)
    assert abs(anion.e_ref - fci.FCI(scf.UHF(mol).run()).kernel()[0]) < 1e-8
    assert abs(anion.e_non_xc + anion.e_xc_target - anion.e_ref) < 1e-12


def test_ccsd_t_and_user_energies():
    li = _calc('Li', 'Li 0 0 0', 0, 1, method='ccsd(t)')
    assert li.extra['e_triples'] < 0 and abs(li.e_ref - li.extra['e_ccsd'] - li.extra['e_triples']) < 1e-12
    fci_li = _calc('Li', 'Li 0 0 0', 0, 1, method='fci')  # 3 electrons: CCSD(T) is nearly exact
    assert abs(li.e_ref - fci_li.e_ref) < 1e-5
    user = _calc('Li', 'Li 0 0 0', 0, 1, method='user', user_energy=-7.478)
    assert user.e_ref == -7.478 and abs(user.e_xc_target - (-7.478 - user.e_non_xc)) < 1e-12


def test_fractional_charge_ensembles_are_linear(hydrogen):
    systems = fractional_charge_systems(hydrogen['H'], hydrogen['H-'], deltas=(0.25, 0.5))
    h, anion = hydrogen['H'], hydrogen['H-']
    for system in systems:
        d = system.delta
        assert abs(system.e_ref - ((1 - d) * h.e_ref + d * anion.e_ref)) < 1e-12
        assert abs(system.n_electrons - (1 + d)) < 1e-8
        np.testing.assert_allclose(system.dm, (1 - d) * h.dm + d * anion.dm)
        # Hartree is quadratic in the ensemble density: not the interpolation of the end points
        assert abs(system.e_non_xc - ((1 - d) * h.e_non_xc + d * anion.e_non_xc)) > 1e-4
        assert system.sources == ('H', 'H-')
    proton = fractional_charge_systems(hydrogen['H+'], hydrogen['H'], deltas=(0.5,))[0]
    assert abs(proton.e_xc_target - (0.5 * h.e_xc_target + 0.25 * h.e_hartree)) < 1e-9  # J(δD) = δ² J(D)


def test_fractional_spin_keeps_the_pure_state_energy(hydrogen):
    half = fractional_spin_systems(hydrogen['H'], fractions=(0.5,))[0]
    assert half.e_ref == hydrogen['H'].e_ref
    np.testing.assert_allclose(half.dm[0], half.dm[1])
    assert abs(half.n_electrons - 1) < 1e-8


def test_natural_orbitals_reproduce_the_density(hydrogen):
    system = fractional_charge_systems(hydrogen['H'], hydrogen['H-'], deltas=(0.5,))[0]
    mol = gto.M(atom='H 0 0 0', basis=BASIS, spin=1, verbose=0)
    s = mol.intor('int1e_ovlp')
    for spin in range(2):
        c, n = system.no_coeff[spin], system.no_occ[spin]
        np.testing.assert_allclose(c.T @ s @ c, np.eye(len(n)), atol=1e-10)
        np.testing.assert_allclose((c * n) @ c.T, system.dm[spin], atol=1e-10)
    # for a converged integer system the natural orbitals are the canonical orbitals of its Fock matrix
    # (PySCF's own mo_energy can come from a DIIS-extrapolated Fock matrix: compare with F itself)
    fock = hydrogen['H'].fock[0]
    c, n, eps = natural_orbitals(s, hydrogen['H'].dm[0], fock)
    np.testing.assert_allclose(np.sort(eps), scipy.linalg.eigh(fock, s)[0], atol=1e-7)


def test_dataset_roundtrip_and_corruption(hydrogen, tmp_path):
    systems = [*fractional_charge_systems(hydrogen['H+'], hydrogen['H']), integer_system(hydrogen['H'])]
    meta = save_dataset(tmp_path / 'd.npz', systems, {'reference_method': 'fci'})
    assert meta['n_systems'] == 4 and meta['kinds'] == {'fc': 3, 'integer': 1} and meta['elements'] == ['H']
    loaded, meta2 = load_dataset(tmp_path / 'd.npz')
    assert meta2['checksum'] == meta['checksum']
    np.testing.assert_array_equal(loaded[1].dm, systems[1].dm)
    blob = bytearray((tmp_path / 'd.npz').read_bytes())
    (tmp_path / 'cut.npz').write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(DatasetError, match='not a readable dataset'):
        load_dataset(tmp_path / 'cut.npz')
    with pytest.raises(DatasetError, match='does not exist'):
        load_dataset(tmp_path / 'none.npz')


def test_bad_input_is_refused():
    with pytest.raises(ReferenceInputError, match='cannot build'):
        _calc('X', 'Xx 0 0 0', 0, 0)
    with pytest.raises(ReferenceInputError, match='cannot build'):
        _calc('H', 'H 0 0 0', 0, 0)  # one electron cannot be a singlet
    with pytest.raises(ReferenceInputError, match='FCI is limited'):
        _calc('Ne', 'Ne 0 0 0', 0, 0, method='fci')
    with pytest.raises(ReferenceInputError, match='unknown reference method'):
        _calc('H', 'H 0 0 0', 0, 1, method='mp7')
    with pytest.raises(ReferenceInputError, match='user_energy'):
        _calc('H', 'H 0 0 0', 0, 1, method='user')
    h = _calc('H', 'H 0 0 0', 0, 1)
    he = _calc('He', 'He 0 0 0', 0, 0)
    with pytest.raises(ValueError, match='not the same nuclei'):
        fractional_charge_systems(h, he)
    with pytest.raises(ValueError, match='strictly between 0 and 1'):
        fractional_charge_systems(_calc('H+', 'H 0 0 0', 1, 0), h, deltas=(1.0,))
    with pytest.raises(ValueError, match='no spin polarisation'):
        fractional_spin_systems(he)


def test_integer_result_save_load_roundtrip(tmp_path):
    """What the runner writes (results.json + arrays.npz) reads back to the same result (IntegerResult.from_parts)."""
    from aiida_dm21.reference.integer import IntegerResult

    result = _calc('Li', 'Li 0 0 0', 0, 1, method='ccsd(t)')
    result.save(tmp_path)
    loaded = IntegerResult.load(tmp_path)
    assert loaded.scalars() == result.scalars() and loaded.spec == result.spec
    for name, array in result.arrays().items():
        np.testing.assert_array_equal(loaded.arrays()[name], array)


@pytest.mark.parametrize('name', ['hf', 'pbe', 'scan', 'wb97x', 'B3LYP'])  # a LDA/GGA, a meta-GGA, an RSH, any case
def test_accepted_density_methods_run(name):
    """The plugins accept the names of ``DENSITY_METHODS``: a few of them run for real (H, STO-3G, FCI)."""
    from aiida_dm21.reference.constants import density_method_problem

    assert density_method_problem(name) is None
    result = run_integer_system(
        IntegerSpec(atom='H 0 0 0', basis='sto-3g', spin=1, density_method=name, reference_method='fci', label='H')
    )
    assert result.converged and np.isfinite(result.e_density_method)


def test_every_accepted_density_method_is_known_to_pyscf():
    """Every name the plugins accept is one PySCF's libxc interface parses (else it would fail on the node)."""
    from pyscf import dft

    from aiida_dm21.reference.constants import DENSITY_METHODS, density_method_problem

    for name in DENSITY_METHODS:
        if name != 'hf':
            dft.libxc.parse_xc(name)  # raises KeyError for a name libxc does not know
    for bad in ('no_such_xc', 'b2plyp', '', None, 3):
        assert 'is not one of: hf, lda' in density_method_problem(bad)


def test_a_reference_basis_moves_the_energy_not_the_density():
    """CCSD(T) in cc-pVTZ on the 6-31G density: e_ref (and so the E_xc target) is cc-pVTZ's, the rest 6-31G's."""
    from pyscf import cc

    plain = _calc('He', 'He 0 0 0', 0, 0, method='ccsd(t)')
    moved = _calc('He', 'He 0 0 0', 0, 0, method='ccsd(t)', reference_basis='cc-pvtz')
    mol = gto.M(atom='He 0 0 0', basis='cc-pvtz', verbose=0)
    hf = scf.UHF(mol).run(conv_tol=1e-10)
    mycc = cc.UCCSD(hf).run()
    assert abs(moved.e_ref - (mycc.e_tot + mycc.ccsd_t())) < 1e-8
    assert moved.e_ref < plain.e_ref - 1e-2  # cc-pVTZ holds far more of He's correlation energy than 6-31G
    assert abs(moved.extra['e_hf'] - hf.e_tot) < 1e-9 and moved.extra['hf_converged']
    assert moved.extra['reference_basis'] == 'cc-pvtz' and 'reference_basis' not in plain.extra
    np.testing.assert_allclose(moved.dm, plain.dm, atol=1e-8)  # the density (and its basis) is 6-31G's
    assert moved.dm.shape[-1] == gto.M(atom='He 0 0 0', basis=BASIS, verbose=0).nao
    assert abs(moved.e_non_xc - plain.e_non_xc) < 1e-8
    assert abs((moved.e_xc_target - plain.e_xc_target) - (moved.e_ref - plain.e_ref)) < 1e-10
    # one electron: the reference is the exact (HF) energy in the reference basis; no electron: unchanged
    h = _calc('H', 'H 0 0 0', 0, 1, reference_basis='cc-pvtz')
    assert abs(h.e_ref - scf.UHF(gto.M(atom='H 0 0 0', basis='cc-pvtz', spin=1, verbose=0)).kernel()) < 1e-9
    assert _calc('H+', 'H 0 0 0', 1, 0, reference_basis='cc-pvtz').e_ref == 0.0
    # the same basis twice is the plain calculation
    same = _calc('He', 'He 0 0 0', 0, 0, method='ccsd(t)', reference_basis=BASIS)
    assert same.e_ref == pytest.approx(plain.e_ref, abs=1e-10) and 'reference_basis' not in same.extra


def test_a_bad_reference_basis_is_refused():
    with pytest.raises(ReferenceInputError, match=r"cannot build 'He 0 0 0'/no-such-basis"):
        _calc('He', 'He 0 0 0', 0, 0, method='ccsd(t)', reference_basis='no-such-basis')
    with pytest.raises(ReferenceInputError, match='effective core potentials for I'):
        spec = IntegerSpec(atom='I 0 0 0', basis='sto-3g', spin=1, reference_method='hf', reference_basis='def2-svp')
        run_integer_system(spec)
    with pytest.raises(ReferenceInputError, match='not with "user"'):
        _calc('Li', 'Li 0 0 0', 0, 1, method='user', user_energy=-7.478, reference_basis='cc-pvtz')


@pytest.mark.parametrize('value', [3, '', '   ', ['cc-pvtz']])
def test_the_runner_refuses_a_reference_basis_that_is_not_a_name(tmp_path, value):
    import json

    from aiida_dm21.runner.common import INPUT_FORMAT_VERSION
    from aiida_dm21.runner.reference import RunnerError, read_input

    path = tmp_path / 'input.json'
    data = {'format_version': INPUT_FORMAT_VERSION, 'symbols': ['He'], 'positions': [[0, 0, 0]], 'basis': '6-31g'}
    path.write_text(json.dumps({**data, 'reference_basis': value}))
    with pytest.raises(RunnerError, match='`reference_basis` must be a basis name') as info:
        read_input(path)
    assert info.value.category == 'unsupported_input'
    path.write_text(json.dumps({**data, 'reference_basis': 'cc-pvtz'}))
    assert read_input(path)['reference_basis'] == 'cc-pvtz'


@pytest.mark.parametrize(
    ('name', 'value', 'message'),
    [
        ('deltas', [0.5, 1.0], '`deltas`: 1.0 is outside (0.0, 1.0)'),
        ('deltas', [0], '`deltas`: 0 is outside (0.0, 1.0)'),
        ('deltas', [-0.25], '`deltas`: -0.25 is outside (0.0, 1.0)'),
        ('deltas', [float('nan')], '`deltas` must hold finite numbers in (0.0, 1.0), got nan'),
        ('deltas', [True], '`deltas` must hold finite numbers in (0.0, 1.0), got True'),
        ('deltas', ['0.5'], "`deltas` must hold finite numbers in (0.0, 1.0), got '0.5'"),
        ('deltas', [], '`deltas` must be a non-empty list of numbers in (0.0, 1.0), got []'),
        ('deltas', 0.5, '`deltas` must be a non-empty list of numbers in (0.0, 1.0), got 0.5'),
        ('spin_fractions', [0.6], '`spin_fractions`: 0.6 is outside (0.0, 0.5]'),
        ('spin_fractions', [0.0], '`spin_fractions`: 0.0 is outside (0.0, 0.5]'),
        ('spin_fractions', [float('inf')], '`spin_fractions` must hold finite numbers in (0.0, 0.5], got inf'),
    ],
)
def test_fractions_outside_their_interval_are_named(name, value, message):
    """The one interval check of FC δ and FS fractions (the workchain's and the scripts'), without PySCF or AiiDA:
    each refusal with the input it exists to refuse; the edges that belong (δ near 0 and 1, a spin fraction of ½)
    pass."""
    from aiida_dm21.reference.constants import fractions_problem

    assert fractions_problem(name, value) == message
    assert fractions_problem('deltas', [1e-9, 0.5, 1 - 1e-9]) is None
    assert fractions_problem('spin_fractions', [1e-9, 0.25, 0.5]) is None
