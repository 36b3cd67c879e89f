"""``dm21.relax`` workchain: a DM21 geometry optimisation that restarts from its last structure when it fails.

:class:`DM21RelaxWorkChain` runs :class:`~aiida_dm21.calculations.relax.DM21RelaxCalculation` (inputs in
the namespace ``relax``) in the loop of AiiDA's :class:`~aiida.engine.BaseRestartWorkChain`.  Outputs:
``output_structure`` (the relaxed molecule), ``output_trajectory``, ``output_parameters`` (the SCF at the
final geometry: ``e_tot`` …) and ``output_density``.  Handlers, highest priority first:

=============================  ========  ===================================================================
exit code of the job           priority  action
=============================  ========  ===================================================================
405, 410, 420, 430             600       abort: a restart would fail the same way (405: the last SCF converged
                                         to a non-aufbau state; the structure is attached)
120, 310, 311 walltime         500       restart from the last structure and density
500 optimiser not converged    450       restart from the last structure and density (another ``max_steps``)
400, 501 SCF failed at a step  400       restart from the last structure with ``max_cycle`` × 2 and a level
                                         shift, the 2nd time the second-order solver; then abort (501)
300-302, 350, 140              100       restart once; a second time in a row abort (350)
=============================  ========  ===================================================================
"""

from __future__ import annotations

from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import BaseRestartWorkChain, ExitCode, ProcessHandlerReport, process_handler, while_

from aiida_dm21.calculations.relax import DM21RelaxCalculation
from aiida_dm21.calculations.scf import PARAMETERS
from aiida_dm21.workflows.scf import LEVEL_SHIFT, validate_max_iterations

__all__ = ('DM21RelaxWorkChain',)

_CODES = DM21RelaxCalculation.exit_codes
_TRANSIENT = [
    _CODES.ERROR_MISSING_RESULTS,
    _CODES.ERROR_INVALID_RESULTS,
    _CODES.ERROR_MISSING_DENSITY,
    _CODES.ERROR_RUNNER_FAILED,
    _CODES.ERROR_SCHEDULER_NODE_FAILURE,
]


class DM21RelaxWorkChain(BaseRestartWorkChain):
    """Relax a molecule with a DM21 functional; restart from the last geometry after optimiser or SCF failures."""

    _process_class = DM21RelaxCalculation

    @classmethod
    def define(cls, spec):  # type: ignore[override]
        super().define(spec)
        spec.expose_inputs(
            DM21RelaxCalculation,
            namespace='relax',
            namespace_options={'help': 'Inputs of the dm21.relax calculation (the first run; restarts change them).'},
        )
        spec.inputs['max_iterations'].validator = validate_max_iterations
        spec.outline(cls.setup, while_(cls.should_run_process)(cls.run_process, cls.inspect_process), cls.results)
        spec.expose_outputs(DM21RelaxCalculation)
        spec.exit_code(350, 'ERROR_RUNNER_FAILED', message='{process}<{pk}> failed twice in a row: {exit_message}')
        spec.exit_code(
            405,
            'ERROR_NOT_AUFBAU',
            message='{process}<{pk}>: {exit_message} (the geometry is that of a state other than the ground state; '
            'not retried: fractional occupations have no analytic forces here)',
        )
        spec.exit_code(410, 'ERROR_NAN_ENERGY', message='{process}<{pk}>: {exit_message} (a restart would repeat it)')
        spec.exit_code(420, 'ERROR_UNSUPPORTED_INPUT', message='{process}<{pk}>: {exit_message} (not retried)')
        spec.exit_code(430, 'ERROR_CHECKPOINT_UNREADABLE', message='{process}<{pk}>: {exit_message} (not retried)')
        spec.exit_code(
            501,
            'ERROR_RELAX_FAILED',
            message='The SCF failed at a geometry with every strategy (more cycles, level shift, second-order '
            'solver); the last structure is attached.',
        )

    def setup(self) -> None:
        super().setup()
        self.ctx.inputs = AttributeDict(self.exposed_inputs(DM21RelaxCalculation, 'relax'))
        self.ctx.inputs.parameters = self.ctx.inputs.parameters.get_dict()
        self.ctx.scf_stage = 0
        self.ctx.runner_failures = 0

    def inspect_process(self) -> ExitCode | None:
        node = self.ctx.children[self.ctx.iteration - 1]
        if node.exit_status not in {code.status for code in _TRANSIENT}:
            self.ctx.runner_failures = 0
        return super().inspect_process()

    # --- helpers ------------------------------------------------------------------------------------------

    def _restart_from_last(self, node: orm.CalcJobNode) -> str:
        """Continue from the last structure and density the runs produced; a phrase for the report."""
        said = []
        for child in reversed(self.ctx.children):
            if 'output_structure' in child.outputs:
                self.ctx.inputs.structure = child.outputs.output_structure
                said.append(f'the last structure of {child.process_label}<{child.pk}>')
                break
        for child in reversed(self.ctx.children):
            if 'output_density' in child.outputs:
                self.ctx.inputs.restart_density = child.outputs.output_density
                said.append('its density')
                break
        return 'restarting from ' + (' and '.join(said) if said else 'the input structure')

    def _abort(self, error: ExitCode, node: orm.CalcJobNode) -> ProcessHandlerReport:
        formatted = error.format(process=node.process_label, pk=node.pk, exit_message=node.exit_message)
        self.ctx.is_finished = True
        self.report(f'{node.process_label}<{node.pk}> exit {node.exit_status}: aborting ({formatted.message})')
        return ProcessHandlerReport(True, formatted)

    # --- handlers -----------------------------------------------------------------------------------------

    @process_handler(
        priority=600,
        exit_codes=[
            _CODES.ERROR_NAN_ENERGY,
            _CODES.ERROR_UNSUPPORTED_INPUT,
            _CODES.ERROR_CHECKPOINT_UNREADABLE,
            _CODES.ERROR_NOT_AUFBAU,
        ],
    )
    def handle_fatal(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """The same inputs would fail the same way: abort with the job's own exit code.  A 405 (the last SCF
        converged to a non-aufbau state, which only the Newton solver reaches) too: the structure is attached."""
        if node.exit_status == _CODES.ERROR_NOT_AUFBAU.status:
            self.out_many(self.exposed_outputs(node, DM21RelaxCalculation))
        error = {
            _CODES.ERROR_NOT_AUFBAU.status: self.exit_codes.ERROR_NOT_AUFBAU,
            _CODES.ERROR_NAN_ENERGY.status: self.exit_codes.ERROR_NAN_ENERGY,
            _CODES.ERROR_UNSUPPORTED_INPUT.status: self.exit_codes.ERROR_UNSUPPORTED_INPUT,
        }.get(node.exit_status, self.exit_codes.ERROR_CHECKPOINT_UNREADABLE)
        return self._abort(error, node)

    @process_handler(
        priority=500,
        exit_codes=[
            _CODES.ERROR_SCHEDULER_OUT_OF_WALLTIME,
            _CODES.ERROR_OUT_OF_WALLTIME,
            _CODES.ERROR_OUT_OF_WALLTIME_PARTIAL,
        ],
    )
    def handle_out_of_walltime(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """Out of walltime: continue from where it got to."""
        self.report(f'{node.process_label}<{node.pk}> ran out of walltime: {self._restart_from_last(node)}')
        return ProcessHandlerReport(True)

    @process_handler(priority=450, exit_codes=[_CODES.ERROR_RELAX_NOT_CONVERGED])
    def handle_relax_not_converged(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """The optimiser used its steps without converging: another round from the last geometry."""
        self.report(f'{node.process_label}<{node.pk}> {node.exit_message}: {self._restart_from_last(node)}')
        return ProcessHandlerReport(True)

    @process_handler(priority=400, exit_codes=[_CODES.ERROR_SCF_NOT_CONVERGED, _CODES.ERROR_RELAX_FAILED])
    def handle_scf_failure(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """An SCF did not converge at some geometry: more cycles and a level shift, then the Newton solver."""
        parameters = self.ctx.inputs.parameters
        self.ctx.scf_stage += 1
        max_cycle = parameters.get('max_cycle') or PARAMETERS['max_cycle'].default
        if self.ctx.scf_stage == 1:
            parameters['max_cycle'] = 2 * max_cycle
            parameters['level_shift'] = max(LEVEL_SHIFT, parameters.get('level_shift') or 0.0)
            change = f'max_cycle -> {parameters["max_cycle"]}, level_shift -> {parameters["level_shift"]:g} Ha'
        elif self.ctx.scf_stage == 2 and not parameters.get('newton'):
            parameters['max_cycle'] = 2 * max_cycle
            parameters['newton'] = True
            change = f'max_cycle -> {parameters["max_cycle"]}, second-order solver (newton: True)'
        else:
            self.out_many(self.exposed_outputs(node, DM21RelaxCalculation))
            return self._abort(self.exit_codes.ERROR_RELAX_FAILED, node)
        self.report(
            f'{node.process_label}<{node.pk}> exit {node.exit_status}: {self._restart_from_last(node)}, {change}'
        )
        return ProcessHandlerReport(True)

    @process_handler(priority=100, exit_codes=_TRANSIENT)
    def handle_runner_failure(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """Missing or garbled output, a runner exception, a node failure: one retry."""
        self.ctx.runner_failures += 1
        if self.ctx.runner_failures > 1:
            return self._abort(self.exit_codes.ERROR_RUNNER_FAILED, node)
        self.report(
            f'{node.process_label}<{node.pk}> failed ({node.exit_message}): retrying once, '
            f'{self._restart_from_last(node)}'
        )
        return ProcessHandlerReport(True)
