"""The ``dm21.scf`` CalcJob: real runs on localhost (direct scheduler, this Python) and refused inputs.

Molecules are tiny (H2, H2O in STO-3G on coarse grids) so the whole file stays well under a minute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('aiida.engine')

from aiida import orm
from aiida.engine import run_get_node
from aiida.plugins import CalculationFactory

from aiida_dm21.calculations.scf import (
    PARAMETERS,
    DM21ScfCalculation,
    resolve_parameters,
    validate_parameters,
)
from aiida_dm21.runner.scf import AU2EV

pytestmark = pytest.mark.aiida

H2 = [('H', (0.0, 0.0, 0.0)), ('H', (0.0, 0.0, 0.74))]
H2O = [('O', (0.0, 0.0, 0.1178)), ('H', (0.0, 0.7555, -0.4712)), ('H', (0.0, -0.7555, -0.4712))]


@pytest.fixture
def inputs(python_code, checkpoint_node, make_structure):
    """``inputs(atoms=H2, **parameters)``: inputs of a small dm21.scf run (STO-3G, coarsest grid by default)."""

    def factory(atoms=None, structure=None, **parameters):
        parameters = {'basis': 'sto-3g', 'grid_level': 0, **parameters}
        return {
            'code': python_code,
            'structure': structure if structure is not None else make_structure(atoms or H2),
            'parameters': orm.Dict(parameters),
            'checkpoint': checkpoint_node,
            'metadata': {'options': {'max_wallclock_seconds': 600}},
        }

    return factory


def core_energy(atoms, checkpoint_file, **settings) -> float:
    from pyscf import gto

    from aiida_dm21.functional.scf import KS

    mol = gto.M(atom=[(s, p) for s, p in atoms], basis='sto-3g', unit='Angstrom', verbose=0)
    mf = KS(mol, checkpoint_file)
    mf.grids.level = settings.get('grid_level', 3)
    return mf.kernel()


def test_entry_point():
    assert CalculationFactory('dm21.scf') is DM21ScfCalculation


def test_h2_end_to_end_matches_core(inputs, dm21_checkpoint_file):
    results, node = run_get_node(DM21ScfCalculation, **inputs())
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    parameters = results['output_parameters'].get_dict()
    reference = core_energy(H2, dm21_checkpoint_file, grid_level=0)
    assert abs(parameters['e_tot'] - reference) < 1e-6
    assert parameters['e_tot_ev'] == pytest.approx(parameters['e_tot'] * AU2EV)
    assert parameters['converged'] is True
    assert parameters['scf_type'] == 'RKS'
    assert parameters['functional']['weights_sha256'] == inputs()['checkpoint'].weights_sha256
    assert parameters['homo'] < parameters['lumo']
    assert np.allclose(parameters['dipole'], 0.0, atol=1e-4)
    assert set(parameters['versions']) >= {'pyscf', 'torch', 'numpy', 'aiida_dm21'}
    assert parameters['timings']['total'] > 0
    density = results['output_density'].get_array('density_matrix')
    assert density.shape == (2, 2)
    # the job folder: input.json with the geometry in Angstrom; the checkpoint came by local copy
    written = json.loads(node.base.repository.get_object_content('input.json'))
    assert written['symbols'] == ['H', 'H']
    assert written['positions'][1] == [0.0, 0.0, 0.74]
    assert written['checkpoint'] == 'checkpoint.safetensors'
    assert written['conv_tol'] == PARAMETERS['conv_tol'].default
    assert 'checkpoint.safetensors' not in node.base.repository.list_object_names()

    # caching: the same weights stored again under another file name give the same job hash
    from aiida.manage.caching import enable_caching

    from aiida_dm21.data.checkpoint import DM21CheckpointData

    again = inputs()
    again['checkpoint'] = DM21CheckpointData(dm21_checkpoint_file, filename='renamed').store()
    assert again['checkpoint'].pk != node.inputs.checkpoint.pk
    with enable_caching(identifier='aiida.calculations:dm21.scf'):
        results, cached = run_get_node(DM21ScfCalculation, **again)
    assert cached.base.caching.is_created_from_cache
    assert cached.base.caching.get_cache_source() == node.uuid
    assert results['output_parameters']['e_tot'] == parameters['e_tot']


def test_dispersion_reaches_the_output_and_is_the_libraries(inputs):
    """dispersion d3bj: e_tot carries E_D3(BJ) with B3LYP's parameters, reported as e_disp (simple-dftd3's own API)."""
    interface = pytest.importorskip('dftd3.interface')
    from pyscf import gto

    plain, _ = run_get_node(DM21ScfCalculation, **inputs(H2O))
    results, node = run_get_node(DM21ScfCalculation, **inputs(H2O, dispersion='d3bj'))
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    parameters = results['output_parameters'].get_dict()
    mol = gto.M(atom=[(s, p) for s, p in H2O], unit='Angstrom', verbose=0)
    model = interface.DispersionModel(mol.atom_charges(), mol.atom_coords())
    e_d3 = float(model.get_dispersion(interface.RationalDampingParam(method='b3lyp'), grad=False)['energy'])
    assert parameters['dispersion'] == 'd3bj'
    assert parameters['e_disp'] == pytest.approx(e_d3, abs=1e-12)
    assert parameters['e_tot'] - plain['output_parameters']['e_tot'] == pytest.approx(e_d3, abs=1e-8)
    assert plain['output_parameters']['dispersion'] == 'none'
    assert plain['output_parameters']['e_disp'] == 0.0


def test_unconverged_then_restart(inputs):
    """max_cycle 2 from a crude guess: exit 400 with a density; restarting from it converges."""
    first_inputs = inputs(H2O, max_cycle=2, init_guess='minao')
    results, first = run_get_node(DM21ScfCalculation, **first_inputs)
    assert first.exit_status == 400, first.exit_message
    assert results['output_parameters']['converged'] is False
    density = results['output_density']
    assert density.get_array('density_matrix').shape == (7, 7)

    restart = DM21ScfCalculation.get_builder()  # as in docs/aiida.md
    restart.code = first.inputs.code
    restart.structure = first.inputs.structure
    restart.checkpoint = first.inputs.checkpoint
    restart.parameters = orm.Dict({**first.inputs.parameters.get_dict(), 'max_cycle': 50})
    restart.restart_density = density
    results, second = run_get_node(restart)
    assert second.is_finished_ok, second.exit_message
    assert results['output_parameters']['restarted'] is True
    assert results['output_parameters']['converged'] is True
    written = json.loads(second.base.repository.get_object_content('input.json'))
    assert written['restart_density'] == 'restart_dm.npy'
    assert 'restart_dm.npy' in second.base.repository.list_object_names()


def test_dry_run_writes_job_folder(inputs, make_structure, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a dry run writes its folder under ./submit_test
    unrestricted = inputs(H2O, charge=1, multiplicity=2, scf_type='UKS')
    unrestricted['restart_density'] = orm.ArrayData({'density_matrix': np.zeros((2, 7, 7))})
    unrestricted['metadata'].update(dry_run=True, store_provenance=False)
    _, node = run_get_node(DM21ScfCalculation, **unrestricted)
    folder = Path(node.dry_run_info['folder'])
    written = json.loads((folder / 'input.json').read_text())
    assert written == {
        **resolve_parameters({'basis': 'sto-3g', 'grid_level': 0, 'charge': 1, 'multiplicity': 2, 'scf_type': 'UKS'}),
        'format_version': 1,
        'symbols': ['O', 'H', 'H'],
        'positions': [list(p) for _, p in H2O],
        'units': 'Angstrom',
        'checkpoint': 'checkpoint.safetensors',
        'restart_density': 'restart_dm.npy',
        'walltime_seconds': 600,
        'max_memory_mb': None,
    }
    assert np.load(folder / 'restart_dm.npy').shape == (2, 7, 7)
    assert (folder / 'checkpoint.safetensors').read_bytes() == unrestricted['checkpoint'].get_content('rb')
    script = (folder / '_aiidasubmit.sh').read_text()
    assert f"'{sys.executable}' '-m' 'aiida_dm21.runner.scf' 'input.json'" in script
    assert "> 'aiida.out'" in script


# --- refused inputs: nothing stored ---------------------------------------------------------------------


def _refused(inputs_dict, count_nodes, match):
    before = count_nodes()
    with pytest.raises(ValueError, match=match):
        run_get_node(DM21ScfCalculation, **inputs_dict)
    assert count_nodes() == before, 'a refused input left nodes behind'


def test_unknown_element_symbol_refused_by_structuredata(make_structure):
    from aiida.common.exceptions import UnsupportedSpeciesError

    with pytest.raises(UnsupportedSpeciesError):
        make_structure([('Xx', (0.0, 0.0, 0.0))])


def test_placeholder_element_refused(inputs, make_structure, count_nodes):
    structure = make_structure([('H', (0.0, 0.0, 0.0)), ('X', (0.0, 0.0, 0.74))])
    _refused(inputs(structure=structure), count_nodes, "unknown element 'X'")


def test_periodic_structure_refused(inputs, make_structure, count_nodes):
    structure = make_structure(H2, pbc=(True, False, False))
    _refused(inputs(structure=structure), count_nodes, r'periodic \(pbc=\(True, False, False\)\)')


def test_alloy_refused(inputs, count_nodes):
    structure = orm.StructureData(pbc=(False, False, False))
    structure.append_atom(position=(0, 0, 0), symbols=('H', 'Li'), weights=(0.5, 0.5), name='HLi')
    _refused(inputs(structure=structure), count_nodes, 'alloy')


@pytest.mark.parametrize(
    ('atoms', 'parameters', 'match'),
    [
        (H2, {'multiplicity': 2}, 'charge 0 and multiplicity 2 are impossible for HH: 2 electrons need an odd'),
        (H2, {'charge': 1}, 'charge 1 and multiplicity 1 are impossible for HH: 1 electrons need an even'),
        (H2, {'charge': 2}, 'leaves 0 electrons'),
        (H2, {'multiplicity': 5}, 'impossible'),
        (H2O, {'multiplicity': 3, 'scf_type': 'RKS'}, 'RKS needs multiplicity 1'),
        (H2, {'color': 'blue'}, "unknown parameters 'color'"),
        (H2, {'basis': 3}, '`basis` must be str'),
        (H2, {'basis': '  '}, 'must not be empty'),
        (H2, {'charge': 0.5}, '`charge` must be int'),
        (H2, {'charge': True}, '`charge` must be int'),
        (H2, {'grid_level': 12}, 'outside'),
        (H2, {'conv_tol': -1.0}, 'must be > 0'),
        (H2, {'scf_type': 'GHF'}, "'GHF' is not one of"),
        (H2, {'init_guess': 'chk'}, "'chk' is not one of"),
        (H2, {'damp': 1.0}, 'outside'),
        (H2, {'newton': 'yes'}, '`newton` must be bool'),
        (H2, {'open_shell_direction': 'up'}, "neither 'lowest' nor a non-zero 3-vector"),
        (H2, {'open_shell_direction': [0, 0, 0]}, "neither 'lowest' nor a non-zero 3-vector"),
        (H2, {'basis': 'no-such-basis'}, "basis 'no-such-basis' cannot be used"),
        (H2, {'device': 'gpu'}, "'gpu' is not a device"),
        (H2, {'device': 'cuda:x'}, "'cuda:x' is not a device"),
        (H2, {'device': 0}, '`device` must be str'),
        (H2, {'screening': -1e-6}, 'must be >= 0'),
        (H2, {'screening': float('inf')}, '`screening` must be a finite number'),
        (H2, {'screening': float('nan')}, '`screening` must be a finite number'),
        (H2, {'screening': 'tight'}, '`screening` must be float or int'),
        (H2, {'dispersion': 'd3'}, "'d3' is not one of 'none', 'd3bj'"),
        (H2, {'dispersion': 'b3lyp-d3bj'}, "'b3lyp-d3bj' is not one of"),
        (H2, {'dispersion': True}, '`dispersion` must be str'),
    ],
)
def test_bad_parameters_refused(inputs, count_nodes, atoms, parameters, match):
    _refused(inputs(atoms, **parameters), count_nodes, match)


def test_missing_basis_refused(inputs, count_nodes):
    bad = inputs()
    bad['parameters'] = orm.Dict({'charge': 0})
    _refused(bad, count_nodes, '`basis` is required')


@pytest.mark.parametrize(
    ('array', 'match'),
    [
        ({'density_matrix': np.zeros((3, 3))}, 'restart_density is for 3 basis functions'),
        ({'density_matrix': np.zeros((2, 3))}, 'expected \\(nao, nao\\)'),
        ({'other': np.zeros((2, 2))}, 'no array named "density_matrix"'),
    ],
)
def test_bad_restart_density_refused(inputs, count_nodes, array, match):
    bad = inputs()
    bad['restart_density'] = orm.ArrayData(array)
    _refused(bad, count_nodes, match)


def test_validate_parameters_direct():
    assert validate_parameters({'basis': 'sto-3g'}) is None
    # a CPU-only submitting machine may ask for a GPU: only the form is checked here, the GPU on the node
    assert validate_parameters({'basis': 'sto-3g', 'device': 'cuda:1', 'screening': 0}) is None
    assert validate_parameters({'basis': 'sto-3g', 'conv_tol': 1e-8, 'newton': True, 'level_shift': 0.2}) is None
    assert validate_parameters({'basis': 'sto-3g', 'open_shell_direction': 'lowest'}) is None
    assert validate_parameters({'basis': 'sto-3g', 'dispersion': 'd3bj'}) is None
    assert validate_parameters({'basis': 'sto-3g', 'open_shell_direction': [0, 0.5, 1]}) is None
    message = validate_parameters({'basis': 'sto-3g', 'a': 1, 'b': 2})
    assert "'a', 'b'" in message
    assert 'accepted: basis, charge' in message


def test_screening_default_is_the_cores():
    """The plugin layer states the default without importing PyTorch; it must be the core's."""
    from aiida_dm21.calculations.scf import PARAMETERS
    from aiida_dm21.functional.numint import DEFAULT_SCREENING

    assert PARAMETERS['screening'].default == DEFAULT_SCREENING
