"""Hard cases through the dm21.scf runner: an open-shell first-row transition-metal atom (DeepMind's issue #479:
V, Cr and Mn do not converge) either converges or ends as not converged with finite numbers, never NaN."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from aiida_dm21.runner import scf as runner

pytestmark = pytest.mark.core


def _strict_json(text: str):
    def refuse(constant: str):
        raise AssertionError(f'results.json holds {constant}')

    return json.loads(text, parse_constant=refuse)


def _finite_everywhere(value, where: str = 'results') -> None:
    if isinstance(value, float):
        assert math.isfinite(value), where
    elif isinstance(value, dict):
        for key, item in value.items():
            _finite_everywhere(item, f'{where}.{key}')
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _finite_everywhere(item, f'{where}[{i}]')


@pytest.fixture(scope='module')
def checkpoint(upstream_dir, tmp_path_factory):
    from aiida_dm21.functional.checkpoint import install_deepmind

    path, _ = install_deepmind(upstream_dir / 'DM21', tmp_path_factory.mktemp('weights'))
    return path


def test_vanadium_atom_converges_or_says_so(checkpoint, tmp_path):
    """V (4F, quartet), STO-3G, a few cycles: exit 0 or 3 (not converged), finite energy, density saved, no NaN.

    (The same with ``newton: True``, the exact-kernel Newton solver, passed too but took 508 s for 6 macro
    iterations on a loaded 2-core machine: too long for the suite.)
    """
    shutil.copy(checkpoint, tmp_path / 'model.safetensors')
    data = {
        'symbols': ['V'],
        'positions': [[0.0, 0.0, 0.0]],
        'basis': 'sto-3g',
        'multiplicity': 4,
        'grid_level': 1,
        'max_cycle': 6,
        'checkpoint': 'model.safetensors',
    }
    (tmp_path / 'input.json').write_text(json.dumps(data))
    status = runner.run(tmp_path / 'input.json', tmp_path)
    results = _strict_json((tmp_path / 'results.json').read_text())
    assert status in (runner.EXIT_CONVERGED, runner.EXIT_NOT_CONVERGED), results.get('error')
    assert results['converged'] is (status == runner.EXIT_CONVERGED)
    assert results['error'] is None
    # B3LYP (b3lyp5, UKS) gives -933.827 Ha for V/STO-3G; a DM21 energy within 1 Ha of it is a real one
    assert isinstance(results['e_tot'], float) and abs(results['e_tot'] + 933.827) < 1.0
    assert results['nelec'] == [13, 10]
    _finite_everywhere(results)
    assert (tmp_path / results['density_file']).is_file()


def _run_h2(tmp_path, checkpoint, **parameters):
    """Stretched H2 (3 Å, DeepMind's issue #316), 6-31G, grid level 1 unless given, through the runner."""
    shutil.copy(checkpoint, tmp_path / 'model.safetensors')
    data = {
        'symbols': ['H', 'H'],
        'positions': [[0.0, 0.0, 0.0], [0.0, 0.0, 3.0]],
        'basis': '6-31g',
        'grid_level': 1,
        'checkpoint': 'model.safetensors',
        **parameters,
    }
    (tmp_path / 'input.json').write_text(json.dumps(data))
    status = runner.run(tmp_path / 'input.json', tmp_path)
    results = _strict_json((tmp_path / 'results.json').read_text())
    _finite_everywhere(results)
    return status, results


@pytest.mark.slow
def test_stretched_h2_converges_with_fractional_occupations(checkpoint, tmp_path):
    """Fermi smearing (0.02 Ha) from the B3LYP guess: converged, σg and σu both partly filled, at two H atoms' energy.

    Without it DIIS oscillates (σg² <-> σu²: neither integer occupation is self-consistent for DM21 here) and the
    Newton solver lands on a non-aufbau state 90 mHa higher (test below; docs/core.md).  Measured at level 2:
    E = -1.00090 Ha, occupations 1.133 / 0.867, σg 0.0107 Ha below σu, 11-18 cycles (the first three damped by
    the runner's ``SMEARING_DAMP``; undamped 26-47, and once in CI not converged in 100).
    """
    # level 2: on level 1 the energy settles to 1e-6 Ha but then wanders by more (float32 network), past 70 cycles
    status, results = _run_h2(tmp_path, checkpoint, smearing=0.02, max_cycle=100, grid_level=2)
    assert status == runner.EXIT_CONVERGED, results.get('error')
    assert results['converged'] is True and results['scf_type'] == 'RKS'
    occupied = results['mo_occ'][0][:2]  # per spin orbital, in [0, 1]
    assert 0.5 < occupied[0] < 0.7 and 0.3 < occupied[1] < 0.5, occupied
    assert sum(results['mo_occ'][0]) == pytest.approx(1.0, abs=1e-8)  # one electron per spin
    assert results['e_tot'] == pytest.approx(-1.0009, abs=3e-3)  # 2 E(H) of DM21 is -1.00 Ha
    assert results['smearing'] == 0.02 and results['entropy'] > 0.0
    assert results['e_free'] == pytest.approx(results['e_tot'] - 0.02 * results['entropy'], abs=1e-10)
    assert results['aufbau'] is None and results['aufbau_violation'] is None  # not defined for fractional occupations
    assert 0.0 < results['homo_lumo_gap'] < 0.03  # σg and σu either side of the Fermi level, nearly degenerate


def test_a_smeared_scf_is_damped_unless_damp_is_given(checkpoint, tmp_path):
    """Smearing without ``damp``: the first 3 cycles damped by ``SMEARING_DAMP`` (DIIS from cycle 4); ``damp`` 0
    turns that off, another value wins; without smearing nothing is damped."""
    shutil.copy(checkpoint, tmp_path / 'model.safetensors')
    base = {'symbols': ['H', 'H'], 'positions': [[0, 0, 0], [0, 0, 3.0]], 'basis': '6-31g'}
    for parameters, damp in [
        ({'smearing': 0.02}, runner.SMEARING_DAMP),
        ({'smearing': 0.02, 'damp': 0.0}, 0.0),
        ({'smearing': 0.02, 'damp': 0.7}, 0.7),
        ({}, 0.0),
        ({'damp': 0.3}, 0.3),
    ]:
        (tmp_path / 'input.json').write_text(json.dumps({**base, 'checkpoint': 'model.safetensors', **parameters}))
        data = runner.read_input(tmp_path / 'input.json')
        mf, _ = runner.make_scf(runner.build_molecule(data), data, tmp_path / 'model.safetensors')
        assert mf.damp == damp, parameters
        assert mf.diis_start_cycle == (4 if damp else 1), parameters


@pytest.mark.slow
def test_newton_on_stretched_h2_converges_to_a_state_flagged_not_aufbau(checkpoint, tmp_path):
    """The exact-Hessian Newton solver converges stretched H2, but to a state with σu empty below the filled σg: the
    runner reports it (``aufbau`` False), and the CalcJob parser turns that into exit 405."""
    status, results = _run_h2(tmp_path, checkpoint, newton=True, max_cycle=8, conv_tol_grad=1e-4)
    assert status == runner.EXIT_CONVERGED, results.get('error')
    assert results['aufbau'] is False
    assert results['aufbau_violation'] > 0.05  # measured 0.146 Ha (UKS, level 1)
    assert results['e_tot'] > -0.95  # above the fractional-occupation state's -1.00 Ha


@pytest.mark.parametrize('scf_type', ['RKS', 'UKS'])
def test_smearing_on_a_gapped_molecule_changes_nothing_but_reports_itself(checkpoint, tmp_path, scf_type):
    """H2 at 0.74 Å (gap ~1 Ha): with 0.02 Ha smearing the occupations stay integer to 1e-10, the energy is the
    integer-occupation one, and results.json carries smearing, entropy and e_free (also on PySCF 2.3, where
    ``smearing_`` patches the object instead of making a new class)."""
    energies = []
    for smearing in (0.0, 0.02):
        workdir = tmp_path / f'{smearing}'
        workdir.mkdir()
        shutil.copy(checkpoint, workdir / 'model.safetensors')
        data = {'symbols': ['H', 'H'], 'positions': [[0, 0, 0], [0, 0, 0.74]], 'basis': 'sto-3g', 'grid_level': 0}
        data.update(checkpoint='model.safetensors', scf_type=scf_type, smearing=smearing)
        (workdir / 'input.json').write_text(json.dumps(data))
        assert runner.run(workdir / 'input.json', workdir) == runner.EXIT_CONVERGED
        results = _strict_json((workdir / 'results.json').read_text())
        energies.append(results['e_tot'])
        if smearing:
            assert results['smearing'] == smearing and 0.0 <= results['entropy'] < 1e-8
            assert results['e_free'] == pytest.approx(results['e_tot'], abs=1e-10)
            assert np.allclose(np.concatenate(results['mo_occ']), np.round(np.concatenate(results['mo_occ'])))
            assert results['aufbau'] is True and results['aufbau_violation'] < -0.5
        else:
            assert 'smearing' not in results and results['aufbau'] is True
    assert energies[1] == pytest.approx(energies[0], abs=2e-6)


def test_smearing_refusals(checkpoint, tmp_path):
    """Negative or NaN widths, and smearing with newton or with relax, are refused before any SCF."""
    for parameters, message in [
        ({'smearing': -0.01}, '`smearing` must be >= 0.0'),
        ({'smearing': float('nan')}, '`smearing` must be finite'),
        ({'smearing': 'hot'}, '`smearing` must be a number'),
        ({'smearing': 0.02, 'newton': True}, '`smearing` and `newton` cannot be combined'),
        ({'smearing': 0.02, 'relax': {}}, '`smearing` with `relax`'),
    ]:
        workdir = tmp_path / str(len(list(tmp_path.iterdir())))
        workdir.mkdir()
        shutil.copy(checkpoint, workdir / 'model.safetensors')
        data = {'symbols': ['H', 'H'], 'positions': [[0, 0, 0], [0, 0, 0.74]], 'basis': 'sto-3g'}
        data.update(checkpoint='model.safetensors', **parameters)
        (workdir / 'input.json').write_text(json.dumps(data))  # NaN: Python's json writes it, the runner refuses it
        assert runner.run(workdir / 'input.json', workdir) == runner.EXIT_BAD_INPUT
        results = json.loads((workdir / 'results.json').read_text())
        assert results['error']['category'] == 'unsupported_input'
        assert message in results['error']['message'], results['error']['message']
        assert results['density_file'] is None


F2_STRETCHED = {'symbols': ['F', 'F'], 'positions': [[0, 0, 0], [0, 0, 2.5]], 'basis': '6-31g'}


def test_broken_symmetry_guess_converges_stretched_f2(checkpoint, tmp_path):
    """F2 at 2.5 Å, UKS from ``b3lyp_broken_symmetry``: B3LYP's symmetric state is unstable (PySCF's stability
    analysis), the broken-symmetry one lies 0.086 Ha lower, and DM21 converges from it to ⟨S²⟩ ≈ 1.  From the
    symmetric guess the symmetry broke only through noise (52 cycles in one run, not converged in 100 in another).
    Measured at level 1: B3LYP -199.27524 -> -199.36128 -> -199.36190 Ha (⟨S²⟩ 0.989), DM21 -199.34424 Ha
    (⟨S²⟩ 0.987) in 6 cycles; 5 s in all."""
    shutil.copy(checkpoint, tmp_path / 'model.safetensors')
    data = {**F2_STRETCHED, 'checkpoint': 'model.safetensors', 'grid_level': 1, 'max_cycle': 100}
    data.update(scf_type='UKS', init_guess='b3lyp_broken_symmetry')
    (tmp_path / 'input.json').write_text(json.dumps(data))
    status = runner.run(tmp_path / 'input.json', tmp_path)
    results = _strict_json((tmp_path / 'results.json').read_text())
    assert status == runner.EXIT_CONVERGED, results.get('error')
    guess = results['guess']
    assert guess['init_guess'] == 'b3lyp_broken_symmetry' and guess['b3lyp_converged'] is True
    energies = guess['b3lyp_e_tot']
    assert len(energies) >= 2 and energies[0] - energies[1] > 0.05  # the first round broke the symmetry
    # The guess is the lowest state of the rounds: later rounds re-converge on a flat surface, within PySCF's
    # tolerances up or down by ~1e-7 Ha (the path depends on the thread count; CI once saw a rise).
    assert guess['b3lyp_e_guess'] == min(energies)
    assert guess['b3lyp_s2'] == pytest.approx(1.0, abs=0.1)
    assert results['s2'] == pytest.approx(1.0, abs=0.1)
    assert results['e_tot'] == pytest.approx(-199.3442, abs=5e-3)


def test_broken_symmetry_guess_of_a_stable_molecule_is_the_b3lyp_guess(checkpoint, tmp_path):
    """H2 at 0.74 Å: B3LYP's UKS state is stable, so the broken-symmetry guess is the ordinary one (one B3LYP
    energy, ⟨S²⟩ 0) and the DM21 energy is the one from ``b3lyp``."""
    energies = []
    for guess in ('b3lyp', 'b3lyp_broken_symmetry'):
        workdir = tmp_path / guess
        workdir.mkdir()
        shutil.copy(checkpoint, workdir / 'model.safetensors')
        data = {'symbols': ['H', 'H'], 'positions': [[0, 0, 0], [0, 0, 0.74]], 'basis': 'sto-3g', 'grid_level': 0}
        data.update(checkpoint='model.safetensors', scf_type='UKS', init_guess=guess)
        (workdir / 'input.json').write_text(json.dumps(data))
        assert runner.run(workdir / 'input.json', workdir) == runner.EXIT_CONVERGED
        results = _strict_json((workdir / 'results.json').read_text())
        energies.append(results['e_tot'])
        if guess == 'b3lyp':
            assert results['guess'] is None
        else:
            info = results['guess']
            assert info['b3lyp_stable'] is True and len(info['b3lyp_e_tot']) == 1
            assert info['b3lyp_s2'] == pytest.approx(0.0, abs=1e-8)
    assert energies[1] == pytest.approx(energies[0], abs=1e-8)


@pytest.mark.parametrize(
    ('scf_type', 'multiplicity', 'runs'),
    [('RKS', 1, 'runs RKS'), ('ROKS', 3, 'runs ROKS'), ('auto', 1, 'runs RKS (scf_type auto, multiplicity 1)')],
)
def test_broken_symmetry_guess_refused_for_restricted_scf(checkpoint, tmp_path, scf_type, multiplicity, runs):
    """A restricted SCF has one set of spatial orbitals: nothing to break; refused before any SCF."""
    shutil.copy(checkpoint, tmp_path / 'model.safetensors')
    data = {'symbols': ['O'], 'positions': [[0, 0, 0]], 'basis': 'sto-3g', 'checkpoint': 'model.safetensors'}
    data.update(scf_type=scf_type, multiplicity=multiplicity, init_guess='b3lyp_broken_symmetry')
    (tmp_path / 'input.json').write_text(json.dumps(data))
    assert runner.run(tmp_path / 'input.json', tmp_path) == runner.EXIT_BAD_INPUT
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['error']['category'] == 'unsupported_input'
    assert runs in results['error']['message'] and 'set scf_type UKS' in results['error']['message']
    assert results['density_file'] is None


def test_broken_symmetry_guess_accepted_where_unrestricted():
    assert runner.check_init_guess('b3lyp_broken_symmetry', 'UKS', 1) is None
    assert runner.check_init_guess('b3lyp_broken_symmetry', 'auto', 3) is None  # auto open shell runs UKS
    assert runner.check_init_guess('b3lyp', 'RKS', 1) is None


def test_broken_symmetry_guess_refused_by_the_functional_for_rks(checkpoint):
    from pyscf import gto

    from aiida_dm21.functional import scf

    mol = gto.M(atom='H 0 0 0; H 0 0 0.74', basis='sto-3g', verbose=0)
    for mf in (scf.RKS(mol, str(checkpoint)), scf.ROKS(mol, str(checkpoint))):
        with pytest.raises(ValueError, match='needs an unrestricted SCF'):
            scf.b3lyp_broken_symmetry_guess(mf)
