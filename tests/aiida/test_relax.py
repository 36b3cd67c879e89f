"""``dm21.relax``: input refusals, the parser on hand-made relax.json files, and a real relaxation of water."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip('aiida.engine')

from aiida import orm
from aiida.plugins import CalculationFactory, ParserFactory, WorkflowFactory

from aiida_dm21.calculations.relax import DM21RelaxCalculation, validate_relax_parameters
from aiida_dm21.parsers.relax import DM21RelaxParser
from aiida_dm21.workflows.relax import DM21RelaxWorkChain

pytestmark = pytest.mark.aiida

H2_STEPS = [[[0.0, 0.0, 0.0], [0.0, 0.0, 0.80]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.76]]]


def test_entry_points():
    assert CalculationFactory('dm21.relax') is DM21RelaxCalculation
    assert WorkflowFactory('dm21.relax') is DM21RelaxWorkChain
    assert ParserFactory('dm21.relax') is DM21RelaxParser
    assert DM21RelaxCalculation.spec().inputs['metadata']['options']['parser_name'].default == 'dm21.relax'


@pytest.mark.parametrize(
    ('settings', 'match'),
    [
        ({'steps': 10}, "unknown relax_parameters 'steps'"),
        ({'max_steps': 0}, 'integer >= 1'),
        ({'max_steps': 2.5}, 'integer >= 1'),
        ({'max_steps': True}, 'integer >= 1'),
        ({'convergence_gmax': -1e-4}, 'finite number > 0'),
        ({'convergence_gmax': 0}, 'finite number > 0'),
        ({'convergence_energy': float('nan')}, 'finite number > 0'),
        ({'convergence_drms': 'tight'}, 'finite number > 0'),
    ],
)
def test_bad_relax_parameters_are_refused(settings, match):
    assert match in validate_relax_parameters(orm.Dict(settings))


def test_smearing_is_refused_in_a_relaxation():
    """The analytic forces are those of integer occupations: ``smearing`` > 0 is refused, 0 passes; the dm21.scf
    checks still apply (a negative width)."""
    from aiida_dm21.calculations.relax import validate_relax_scf_parameters

    assert 'not supported in a geometry optimisation' in validate_relax_scf_parameters(
        orm.Dict({'basis': 'sto-3g', 'smearing': 0.02})
    )
    assert validate_relax_scf_parameters(orm.Dict({'basis': 'sto-3g', 'smearing': 0.0})) is None
    assert 'must be >= 0' in validate_relax_scf_parameters(orm.Dict({'basis': 'sto-3g', 'smearing': -1.0}))
    assert DM21RelaxCalculation.spec().inputs['parameters'].validator is validate_relax_scf_parameters


def test_good_relax_parameters_pass():
    assert validate_relax_parameters(orm.Dict({'max_steps': 5, 'convergence_gmax': 1e-4})) is None


def _relax_json(**overrides) -> bytes:
    data = {
        'symbols': ['H', 'H'],
        'positions': H2_STEPS,
        'energies': [-1.10, -1.12],
        'max_force': [0.02, 0.001],
        'steps': 2,
        'converged': True,
        'final_positions': H2_STEPS[-1],
    }
    data.update(overrides)
    return json.dumps(data).encode()


def _parse(node):
    return DM21RelaxParser.parse_from_node(node, store_provenance=False)


def test_parser_attaches_structure_and_trajectory(retrieved_calc_node):
    node = retrieved_calc_node('converged', extra_files={'relax.json': _relax_json()}, plugin='dm21.relax')
    results, calcfunction = _parse(node)
    assert calcfunction.is_finished_ok, calcfunction.exit_message
    structure = results['output_structure']
    assert np.allclose([site.position for site in structure.sites], H2_STEPS[-1])
    assert structure.pbc == (False, False, False)
    trajectory = results['output_trajectory']
    assert trajectory.numsteps == 2
    assert np.allclose(trajectory.get_array('energies'), [-1.10, -1.12])


def test_parser_not_converged_is_500_and_keeps_the_last_structure(retrieved_calc_node):
    content = _relax_json(converged=False, final_positions=None)
    results, calcfunction = _parse(
        retrieved_calc_node('converged', extra_files={'relax.json': content}, plugin='dm21.relax')
    )
    assert calcfunction.exit_status == 500 and '2 steps' in calcfunction.exit_message
    assert np.allclose([site.position for site in results['output_structure'].sites], H2_STEPS[-1])


def test_parser_never_stores_nan_from_the_trajectory(retrieved_calc_node):
    content = _relax_json(energies=[None, -1.12])  # the runner writes None for a non-finite energy
    results, calcfunction = _parse(
        retrieved_calc_node('converged', extra_files={'relax.json': content}, plugin='dm21.relax')
    )
    assert calcfunction.is_finished_ok
    assert 'energies' not in results['output_trajectory'].get_arraynames()


@pytest.mark.parametrize(
    ('content', 'match'),
    [
        (b'{not json', 'relax.json is not JSON'),
        (_relax_json(positions=[[[0.0, 0.0]]]), 'not 2 3-vectors per step'),
        (
            _relax_json(positions=[[[0.0, 0.0, float('nan')], [0.0, 0.0, 0.7]]], energies=[1.0], max_force=[0.0]),
            'non-finite positions',
        ),
        (_relax_json(energies=[-1.0]), 'energies does not have one entry per step'),
        (_relax_json(symbols='HH'), 'no list of element symbols'),
    ],
)
def test_parser_refuses_a_bad_relax_json(retrieved_calc_node, content, match):
    node = retrieved_calc_node('converged', extra_files={'relax.json': content}, plugin='dm21.relax')
    results, calcfunction = _parse(node)
    assert calcfunction.exit_status == 301 and match in calcfunction.exit_message
    assert 'output_structure' not in results


def test_not_aufbau_at_the_last_geometry_aborts_with_the_structure(
    python_code, checkpoint_node, make_structure, aiida_localhost
):
    """A relax job that ends 405 (the last SCF converged, with the Newton solver, to a non-aufbau state): the workchain
    aborts with 405 (no restart: smearing has no forces here), attaching the job's structure and parameters."""
    from aiida.common.links import LinkType
    from aiida.engine import ProcessState
    from aiida.engine.utils import instantiate_process
    from aiida.manage import get_manager

    structure = make_structure([('H', (0.0, 0.0, 0.0)), ('H', (0.0, 0.0, 0.74))])
    inputs = {
        'relax': {
            'code': python_code,
            'structure': structure,
            'checkpoint': checkpoint_node,
            'parameters': orm.Dict({'basis': 'sto-3g', 'newton': True}),
            'metadata': {'options': {'max_wallclock_seconds': 600}},
        }
    }
    process = instantiate_process(get_manager().get_runner(), DM21RelaxWorkChain, **inputs)
    process.setup()
    node = orm.CalcJobNode(computer=aiida_localhost, process_type='aiida.calculations:dm21.relax')
    node.set_process_label('DM21RelaxCalculation')
    node.set_option('resources', {'num_machines': 1, 'num_mpiprocs_per_machine': 1})
    node.store()
    node.set_process_state(ProcessState.FINISHED)
    node.set_exit_status(405)
    node.set_exit_message('an empty orbital lies 0.1462 Ha below a filled one')
    for label, output in [('output_parameters', orm.Dict({'aufbau': False})), ('output_structure', structure.clone())]:
        output.base.links.add_incoming(node, LinkType.CREATE, label)
        output.store()
    process.ctx.children = [node]
    process.ctx.iteration = 1
    process.node.base.extras.set('considered_handlers', [[]])
    result = process.inspect_process()
    assert result.status == DM21RelaxWorkChain.exit_codes.ERROR_NOT_AUFBAU.status == 405
    assert '0.1462 Ha' in result.message
    assert set(process.outputs) == {'output_parameters', 'output_structure'}


def test_water_relaxes_through_aiida_and_restarts_after_max_steps(python_code, checkpoint_node, make_structure):
    """dm21.relax workflow on water (DM21, STO-3G, grid 1): max_steps 2 ends the first job with 500, the handler
    restarts from its last structure, the second converges; the relaxed structure is an output node."""
    water = [('O', (0.0, 0.0, 0.13)), ('H', (0.0, 0.80, -0.50)), ('H', (0.0, -0.80, -0.50))]
    builder = DM21RelaxWorkChain.get_builder()
    builder.relax.code = python_code
    builder.relax.structure = make_structure(water)
    builder.relax.checkpoint = checkpoint_node
    builder.relax.parameters = orm.Dict({'basis': 'sto-3g', 'grid_level': 1, 'conv_tol': 1e-9})
    builder.relax.relax_parameters = orm.Dict({'max_steps': 2})
    builder.relax.metadata = {
        'options': {'max_wallclock_seconds': 1800, 'resources': {'num_machines': 1, 'num_mpiprocs_per_machine': 1}}
    }
    builder.max_iterations = orm.Int(6)
    from aiida.engine import run_get_node

    results, node = run_get_node(builder)
    assert node.is_finished_ok, (node.exit_status, node.exit_message)
    jobs = sorted((c for c in node.called if isinstance(c, orm.CalcJobNode)), key=lambda c: c.ctime)
    assert jobs[0].exit_status == 500 and len(jobs) >= 2
    assert jobs[1].inputs.structure.pk == jobs[0].outputs.output_structure.pk
    relaxed = results['output_structure']
    positions = np.array([site.position for site in relaxed.sites])
    oh = [np.linalg.norm(positions[i] - positions[0]) for i in (1, 2)]
    assert abs(oh[0] - oh[1]) < 2e-3 and 0.95 < oh[0] < 1.1  # symmetric, a sensible O-H bond (Angstrom)
    energies = results['output_trajectory'].get_array('energies')
    start = jobs[0].outputs.output_trajectory.get_array('energies')[0]
    assert results['output_parameters']['e_tot'] < start - 1e-4  # relaxing lowered the energy
    assert results['output_parameters']['e_tot'] == pytest.approx(energies[-1], abs=1e-6)
