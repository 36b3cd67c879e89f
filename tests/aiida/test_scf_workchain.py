"""The ``dm21.scf`` workchain: real runs that fail and recover, and the routing of every exit code to its handler.

The real runs use LiH and H2 in STO-3G on grid level 0 from crude guesses, so each job takes seconds:

- not converged (400) three times, each restart from the last density: more cycles, then a level shift, then the
  second-order solver, which converges;
- stopped by the runner for the walltime (311) after one cycle, then restarted from that density with more time.

The handlers that abort (410, 420, 430), the scheduler's walltime codes (120, 310) and the transient failures
are driven with stored CalcJobNodes that carry those exit codes, through the workchain's own ``inspect_process``.
"""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip('aiida.engine')

from aiida import orm
from aiida.common.links import LinkType
from aiida.engine import ExitCode, ProcessState, run_get_node
from aiida.engine.utils import instantiate_process
from aiida.manage import get_manager
from aiida.plugins import WorkflowFactory

from aiida_dm21.workflows.scf import LEVEL_SHIFT, SMEARING, DM21ScfWorkChain

pytestmark = pytest.mark.aiida

H2O = [('O', (0.0, 0.0, 0.1178)), ('H', (0.0, 0.7555, -0.4712)), ('H', (0.0, -0.7555, -0.4712))]
H2 = [('H', (0.0, 0.0, 0.0)), ('H', (0.0, 0.0, 0.74))]
LIH_STRETCHED = [('Li', (0.0, 0.0, 0.0)), ('H', (0.0, 0.0, 2.4))]  # hard to converge from the 1e guess


@pytest.fixture
def scf_inputs(python_code, checkpoint_node, make_structure):
    """``scf_inputs(atoms=H2O, walltime=600, **parameters)``: workchain inputs in STO-3G on the coarsest grid."""

    def factory(atoms=H2O, walltime: int = 600, **parameters):
        return {
            'scf': {
                'code': python_code,
                'structure': make_structure(atoms),
                'checkpoint': checkpoint_node,
                'parameters': orm.Dict({'basis': 'sto-3g', 'grid_level': 0, **parameters}),
                'metadata': {'options': {'max_wallclock_seconds': walltime}},
            }
        }

    return factory


def reports(node: orm.WorkChainNode) -> list[str]:
    """The report lines of a process, oldest first (what ``verdi process report`` prints)."""
    logs = sorted(orm.Log.collection.get_logs_for(node), key=lambda log: log.time)
    return [log.message.split(']: ', 1)[-1] for log in logs]  # without the '[pk|class|step]: ' prefix


def children(node: orm.WorkChainNode) -> list[orm.CalcJobNode]:
    return sorted(node.called, key=lambda child: child.ctime)


def handlers_with_report(node: orm.WorkChainNode) -> list[list[str]]:
    """Per iteration: the handlers that returned a report (from the ``considered_handlers`` extra)."""
    considered = node.base.extras.get('considered_handlers')
    return [[name for name, report in iteration if report is not None] for iteration in considered]


def test_entry_point():
    assert WorkflowFactory('dm21.scf') is DM21ScfWorkChain


def test_handler_priorities_specific_before_generic():
    priorities = {handler.__name__: handler.priority for handler in DM21ScfWorkChain.get_process_handlers()}
    assert priorities == {
        'handle_nan_energy': 600,
        'handle_unsupported_input': 590,
        'handle_checkpoint_unreadable': 580,
        'handle_out_of_walltime': 500,
        'handle_not_aufbau': 450,
        'handle_scf_not_converged': 400,
        'handle_runner_failure': 100,
    }


# --- real runs ----------------------------------------------------------------------------------------------


def test_not_converged_three_strategies_then_converged(scf_inputs):
    """Stretched LiH, max_cycle 1 from the core-Hamiltonian guess: 400 three times (the energy is still mHa away
    after the level-shifted run), then the Newton solver converges."""
    inputs = scf_inputs(LIH_STRETCHED, max_cycle=1, init_guess='1e')
    results, node = run_get_node(DM21ScfWorkChain, **inputs)
    assert node.is_finished_ok, (node.exit_status, node.exit_message, reports(node))
    runs = children(node)
    assert [run.exit_status for run in runs] == [400, 400, 400, 0]
    parameters = [run.inputs.parameters.get_dict() for run in runs]
    assert [p['max_cycle'] for p in parameters] == [1, 2, 4, 8]
    assert [p.get('level_shift', 0.0) for p in parameters] == [0.0, 0.0, LEVEL_SHIFT, LEVEL_SHIFT]
    assert [p.get('newton', False) for p in parameters] == [False, False, False, True]
    for before, after in itertools.pairwise(runs):
        assert after.inputs.restart_density.uuid == before.outputs.output_density.uuid
    assert results['output_parameters']['converged'] is True
    assert results['output_density'].uuid == runs[-1].outputs.output_density.uuid
    assert handlers_with_report(node) == [['handle_scf_not_converged']] * 3 + [[]]

    lines = reports(node)
    pks = [run.pk for run in runs]
    expected = [
        f'DM21ScfCalculation<{pks[0]}> did not converge (exit 400): restarting from the density of '
        f'DM21ScfCalculation<{pks[0]}> after 1 cycles, max_cycle -> 2',
        f'DM21ScfCalculation<{pks[1]}> did not converge (exit 400): restarting from the density of '
        f'DM21ScfCalculation<{pks[1]}> after 2 cycles, max_cycle -> 4, level_shift -> 0.25 Ha',
        f'DM21ScfCalculation<{pks[2]}> did not converge (exit 400): restarting from the density of '
        f'DM21ScfCalculation<{pks[2]}> after 4 cycles, max_cycle -> 8, second-order solver (newton: True)',
    ]
    for line in expected:
        assert line in lines, '\n'.join(lines)
    print('\n'.join(lines))


def test_runner_walltime_stop_then_restart(scf_inputs):
    """A 1 s walltime: the runner stops after the first cycle (311) and saves the density; the walltime handler
    (not a generic one) restarts from it with walltime_factor times the time, and that run converges."""
    inputs = scf_inputs(H2, walltime=1, init_guess='minao')
    inputs['walltime_factor'] = 300.0
    results, node = run_get_node(DM21ScfWorkChain, **inputs)
    assert node.is_finished_ok, (node.exit_status, node.exit_message, reports(node))
    first, second = children(node)
    assert first.exit_status == 311
    assert first.outputs.output_parameters['error']['category'] == 'walltime'
    assert second.exit_status == 0
    assert second.inputs.restart_density.uuid == first.outputs.output_density.uuid
    assert second.get_option('max_wallclock_seconds') == 300
    assert results['output_parameters']['converged'] is True
    assert handlers_with_report(node) == [['handle_out_of_walltime'], []]
    cycles = first.outputs.output_parameters['cycles']
    line = (
        f'DM21ScfCalculation<{first.pk}> ran out of walltime (exit 311): restarting from the density of '
        f'DM21ScfCalculation<{first.pk}> after {cycles} cycles; max_wallclock_seconds 1 -> 300 (walltime_factor 300)'
    )
    lines = reports(node)
    assert line in lines, '\n'.join(lines)
    print('\n'.join(lines))


def test_runner_keeps_a_cycle_that_converged_at_the_deadline(tmp_path, dm21_checkpoint_file):
    """Past the deadline, a cycle that converged ends the run normally: a walltime stop there would make every
    walltime restart from a converged density fail again."""
    import json
    import shutil

    from aiida_dm21.runner.scf import run

    shutil.copy(dm21_checkpoint_file, tmp_path / 'checkpoint.safetensors')
    data = {'symbols': ['H', 'H'], 'positions': [[0, 0, 0], [0, 0, 0.74]], 'basis': 'sto-3g', 'grid_level': 0}
    (tmp_path / 'input.json').write_text(json.dumps({**data, 'init_guess': 'minao'}))
    assert run(tmp_path / 'input.json', tmp_path) == 0
    shutil.copy(tmp_path / 'density_matrix.npy', tmp_path / 'restart.npy')
    restart = {**data, 'restart_density': 'restart.npy', 'walltime_seconds': 1e-3}  # the deadline has passed
    (tmp_path / 'input.json').write_text(json.dumps(restart))
    assert run(tmp_path / 'input.json', tmp_path) == 0
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['converged'] is True and results['error'] is None and results['cycles'] == 1


# --- every exit code to its handler, through inspect_process ---------------------------------------------------


@pytest.fixture
def workchain(scf_inputs):
    """``workchain(**inputs)``: an instantiated (not running) DM21ScfWorkChain after its ``setup`` step."""

    def factory(**extra):
        inputs = scf_inputs()
        inputs.update(extra)
        process = instantiate_process(get_manager().get_runner(), DM21ScfWorkChain, **inputs)
        process.setup()
        return process

    return factory


@pytest.fixture
def failed_run(aiida_localhost):
    """``failed_run(exit_status, density=False, cycles=3)``: a stored, finished dm21.scf CalcJobNode."""
    import numpy as np

    def factory(exit_status: int, density: bool = False, cycles: int = 3) -> orm.CalcJobNode:
        node = orm.CalcJobNode(computer=aiida_localhost, process_type='aiida.calculations:dm21.scf')
        node.set_process_label('DM21ScfCalculation')
        node.set_option('resources', {'num_machines': 1, 'num_mpiprocs_per_machine': 1})
        node.set_option('max_wallclock_seconds', 600)
        node.store()
        node.set_process_state(ProcessState.FINISHED)
        node.set_exit_status(exit_status)
        node.set_exit_message(f'exit message of {exit_status}')
        if density:
            output = orm.Dict({'cycles': cycles, 'converged': False})
            output.base.links.add_incoming(node, LinkType.CREATE, 'output_parameters')
            output.store()
            array = orm.ArrayData({'density_matrix': np.eye(7)})
            array.base.links.add_incoming(node, LinkType.CREATE, 'output_density')
            array.store()
        return node

    return factory


def inspect(process, *runs: orm.CalcJobNode) -> ExitCode:
    """Let the workchain inspect ``runs[-1]`` as if it had run all ``runs``."""
    process.ctx.children = list(runs)
    process.ctx.iteration = len(runs)
    process.node.base.extras.set('considered_handlers', [[] for _ in runs])
    result = process.inspect_process()
    assert result is not None, 'every failure must be handled'
    return result


@pytest.mark.parametrize('exit_status', [120, 310, 311])
def test_every_walltime_code_reaches_the_walltime_handler(workchain, failed_run, exit_status):
    """120 (AiiDA's scheduler code), 310 and 311: the walltime handler runs; no generic handler swallows them."""
    process = workchain(walltime_factor=2.0)
    earlier = failed_run(400, density=True, cycles=5)
    assert inspect(process, earlier, failed_run(exit_status)).status == 0
    assert handlers_with_report(process.node)[-1] == ['handle_out_of_walltime']
    assert process.ctx.inputs.restart_density.uuid == earlier.outputs.output_density.uuid
    assert process.ctx.inputs.metadata['options']['max_wallclock_seconds'] == 1200
    assert f'ran out of walltime (exit {exit_status}): restarting from the density of' in reports(process.node)[-2]


def test_walltime_without_any_density_restarts_from_the_guess(workchain, failed_run):
    process = workchain()
    assert inspect(process, failed_run(310)).status == 0
    assert 'restart_density' not in process.ctx.inputs
    assert process.ctx.inputs.metadata['options']['max_wallclock_seconds'] == 600  # walltime_factor 1: kept
    assert 'no run produced a density: restarting from the initial guess' in reports(process.node)[-2]


@pytest.mark.parametrize(
    ('exit_status', 'handler', 'name'),
    [
        (410, 'handle_nan_energy', 'ERROR_NAN_ENERGY'),
        (420, 'handle_unsupported_input', 'ERROR_UNSUPPORTED_INPUT'),
        (430, 'handle_checkpoint_unreadable', 'ERROR_CHECKPOINT_UNREADABLE'),
    ],
)
def test_unrecoverable_codes_abort(workchain, failed_run, exit_status, handler, name):
    process = workchain()
    run = failed_run(exit_status)
    result = inspect(process, run)
    assert result.status == DM21ScfWorkChain.exit_codes[name].status == exit_status
    assert f'DM21ScfCalculation<{run.pk}>' in result.message
    assert handlers_with_report(process.node) == [[handler]]
    assert f'DM21ScfCalculation<{run.pk}> exit {exit_status}: no restart, aborting' in reports(process.node)[-1]


def test_abort_wins_over_max_iterations(workchain, failed_run):
    """On the last allowed iteration the handler's exit code is kept, not ERROR_MAXIMUM_ITERATIONS_EXCEEDED."""
    process = workchain(max_iterations=orm.Int(1))
    assert inspect(process, failed_run(410)).status == 410


def test_not_converged_after_every_strategy_aborts_with_outputs(workchain, failed_run):
    process = workchain()
    runs = [failed_run(400, density=True) for _ in range(6)]
    for count in range(1, 4):
        assert inspect(process, *runs[:count]).status == 0
        assert process.ctx.inputs.restart_density.uuid == runs[count - 1].outputs.output_density.uuid
    assert process.ctx.inputs.parameters['newton'] is True
    # the 4th: fractional occupations from the initial guess, the Newton solver and the level shift off
    assert inspect(process, *runs[:4]).status == 0
    parameters = process.ctx.inputs.parameters
    assert (parameters['smearing'], parameters['newton'], parameters['level_shift']) == (SMEARING, False, 0.0)
    assert parameters['max_cycle'] == 400  # 50 x 2 x 2 x 2, kept (at least 100)
    assert 'restart_density' not in process.ctx.inputs
    assert 'fractional occupations (smearing -> 0.02 Ha' in reports(process.node)[-2]
    # the 5th: a singlet that ran restricted because scf_type is auto: unrestricted, integer occupations
    assert inspect(process, *runs[:5]).status == 0
    assert (parameters['scf_type'], parameters['smearing'], parameters['newton']) == ('UKS', 0.0, False)
    assert parameters['init_guess'] == 'b3lyp_broken_symmetry'
    assert 'restart_density' not in process.ctx.inputs
    assert 'unrestricted (scf_type -> UKS, init_guess -> b3lyp_broken_symmetry' in reports(process.node)[-2]
    result = inspect(process, *runs)
    assert result.status == 400
    assert 'did not converge with any strategy' in result.message
    # attached as outputs (the engine links them when the step ends)
    assert {label: output.uuid for label, output in process.outputs.items()} == {
        'output_parameters': runs[-1].outputs.output_parameters.uuid,
        'output_density': runs[-1].outputs.output_density.uuid,
    }


def test_newton_given_from_the_start_skips_that_strategy(workchain, failed_run, scf_inputs):
    process = workchain(scf=scf_inputs(newton=True, scf_type='RKS')['scf'])
    runs = [failed_run(400, density=True) for _ in range(4)]
    assert inspect(process, *runs[:1]).status == 0  # max_cycle x 2
    assert inspect(process, *runs[:2]).status == 0  # level shift
    assert inspect(process, *runs[:3]).status == 0  # Newton on already: fractional occupations next
    assert process.ctx.inputs.parameters['smearing'] == SMEARING
    assert process.ctx.inputs.parameters['newton'] is False
    assert inspect(process, *runs).status == 400  # RKS asked for: no unrestricted strategy, nothing left to try


def test_smearing_given_from_the_start_skips_newton_and_smearing(workchain, failed_run, scf_inputs):
    """With fractional occupations on from the start, neither the Newton solver (integer occupations only) nor the
    smearing strategy is tried: after more cycles and the level shift, unrestricted (scf_type auto), then abort."""
    process = workchain(scf=scf_inputs(smearing=0.01)['scf'])
    runs = [failed_run(400, density=True) for _ in range(4)]
    assert inspect(process, *runs[:1]).status == 0
    assert inspect(process, *runs[:2]).status == 0
    assert process.ctx.inputs.parameters['smearing'] == 0.01
    assert 'newton' not in process.ctx.inputs.parameters
    assert inspect(process, *runs[:3]).status == 0
    assert process.ctx.inputs.parameters['scf_type'] == 'UKS'
    assert inspect(process, *runs).status == 400


def test_not_aufbau_switches_to_fractional_occupations_then_aborts(workchain, failed_run):
    """405 (converged, an empty orbital below a filled one): fractional occupations from the initial guess; a 405
    with them on already aborts with the outputs attached."""
    process = workchain()
    first = failed_run(405, density=True)
    assert inspect(process, first).status == 0
    assert handlers_with_report(process.node) == [['handle_not_aufbau']]
    assert process.ctx.inputs.parameters['smearing'] == SMEARING
    assert 'restart_density' not in process.ctx.inputs
    assert 'converged to a state that is not aufbau' in reports(process.node)[-2]
    result = inspect(process, first, failed_run(405, density=True))
    assert result.status == DM21ScfWorkChain.exit_codes.ERROR_NOT_AUFBAU.status == 405
    assert set(process.outputs) == {'output_parameters', 'output_density'}


def test_smearing_and_newton_together_refused(scf_inputs):
    inputs = scf_inputs(H2, smearing=0.02, newton=True)
    with pytest.raises(ValueError, match='`smearing` and `newton` cannot be combined'):
        run_get_node(DM21ScfWorkChain, **inputs)


H2_STRETCHED = [('H', (0.0, 0.0, 0.0)), ('H', (0.0, 0.0, 3.0))]


@pytest.mark.slow
def test_stretched_h2_converges_through_the_restart_chain(scf_inputs):
    """H2 at 3 Å (DeepMind's issue #316), 6-31G, level 2, with the Newton solver asked for: it converges, to a state
    with σu empty below the filled σg (405); the handler restarts from the B3LYP guess with fractional occupations,
    which converge at two H atoms' energy."""
    inputs = scf_inputs(H2_STRETCHED, basis='6-31g', grid_level=2, newton=True, max_cycle=8, conv_tol_grad=1e-4)
    results, node = run_get_node(DM21ScfWorkChain, **inputs)
    assert node.is_finished_ok, (node.exit_status, node.exit_message, reports(node))
    runs = children(node)
    assert [run.exit_status for run in runs] == [405, 0]
    assert runs[0].outputs.output_parameters['aufbau'] is False
    assert 'restart_density' not in runs[1].inputs
    output = results['output_parameters']
    assert output['smearing'] == SMEARING and output['converged'] is True
    assert output['e_tot'] == pytest.approx(-1.0009, abs=3e-3)
    assert output['e_tot'] < runs[0].outputs.output_parameters['e_tot'] - 0.05
    assert handlers_with_report(node) == [['handle_not_aufbau'], []]


F2_STRETCHED = [('F', (0.0, 0.0, 0.0)), ('F', (0.0, 0.0, 2.5))]


@pytest.mark.slow
def test_stretched_f2_converges_through_the_restart_chain(scf_inputs):
    """F2 at 2.5 Å (DeepMind's issue #316), 6-31G, level 1, scf_type auto: restricted, DIIS oscillates (more cycles,
    level shift), the Newton solver and fractional occupations do not give the ground state either; unrestricted
    from B3LYP's broken-symmetry state, DIIS converges to DM21's (⟨S²⟩ ≈ 1), ~0.07 Ha below B3LYP's symmetric one."""
    inputs = scf_inputs(F2_STRETCHED, basis='6-31g', grid_level=1, max_cycle=5)
    results, node = run_get_node(DM21ScfWorkChain, **inputs)
    assert node.is_finished_ok, (node.exit_status, node.exit_message, reports(node))
    # A run stopped for the walltime (311; the Newton step on a loaded machine) is resumed with the same settings
    # and more time: a step of the chain, not a rung.  The chain itself is what is asserted.
    statuses = [run.exit_status for run in children(node)]
    runs = [run for run in children(node) if run.exit_status != 311]
    # measured: [400, 400, 400, 405, 400, 0] (Newton lands on a non-aufbau state, smearing does not converge)
    assert [run.exit_status for run in runs][-1] == 0 and len(runs) == 6, statuses
    assert {run.exit_status for run in runs[:-1]} <= {400, 405}, statuses
    assert runs[-2].inputs.parameters['smearing'] == SMEARING
    last = runs[-1].inputs.parameters
    assert (last['scf_type'], last['init_guess']) == ('UKS', 'b3lyp_broken_symmetry')
    assert all(run.inputs.parameters.get('scf_type', 'auto') == 'auto' for run in runs[:-1])
    output = results['output_parameters']
    assert output['scf_type'] == 'UKS' and output['converged'] is True
    assert output['s2'] == pytest.approx(1.0, abs=0.1)
    assert output['guess']['b3lyp_s2'] == pytest.approx(1.0, abs=0.1)  # the guess broke the symmetry, not noise
    assert output['e_tot'] == pytest.approx(-199.3442, abs=5e-3)  # measured: level 1 (-199.34424, 0.987)


@pytest.mark.parametrize('exit_status', [300, 301, 302, 350, 140])
def test_transient_failure_retried_once(workchain, failed_run, exit_status):
    process = workchain()
    first = failed_run(exit_status)
    assert inspect(process, first).status == 0
    assert handlers_with_report(process.node) == [['handle_runner_failure']]
    assert f'failed (exit {exit_status}: exit message of {exit_status}): retrying once' in reports(process.node)[-2]
    result = inspect(process, first, failed_run(exit_status))
    assert result.status == 350
    assert 'for the second time in a row' in result.message


def test_walltime_factor_validated(scf_inputs):
    inputs = scf_inputs()
    inputs['walltime_factor'] = 0.5
    with pytest.raises(ValueError, match='walltime_factor must be a finite number >= 1'):
        run_get_node(DM21ScfWorkChain, **inputs)
