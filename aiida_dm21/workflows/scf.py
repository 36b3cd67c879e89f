"""``dm21.scf`` workchain: a ``dm21.scf`` calculation that restarts itself until it converges.

:class:`DM21ScfWorkChain` runs :class:`~aiida_dm21.calculations.scf.DM21ScfCalculation` (inputs in the
namespace ``scf``) in the loop of AiiDA's :class:`~aiida.engine.BaseRestartWorkChain`.  After each
failed run the process handlers below look at the exit code, from the highest priority down, and the
first that recognises it decides (each handles its own exit codes only, then stops the search):

=========================  ========  =======================================================================
exit code of the job       priority  action
=========================  ========  =======================================================================
410 NaN energy             600       abort: ``ERROR_NAN_ENERGY`` (410)
420 unsupported input      590       abort: ``ERROR_UNSUPPORTED_INPUT`` (420)
430 checkpoint unreadable  580       abort: ``ERROR_CHECKPOINT_UNREADABLE`` (430)
120, 310, 311 walltime     500       restart from the last density there is (× ``walltime_factor`` walltime)
405 not aufbau             450       converged to a state with an empty orbital below a filled one: restart
                                     from the initial guess with fractional occupations (``smearing``); abort
                                     (405) if they were on already
400 not converged          400       restart from its density with ``max_cycle`` × 2, the 2nd time also a level
                                     shift, the 3rd also the second-order solver (``newton``), the 4th from the
                                     initial guess with fractional occupations instead, the 5th (``scf_type``
                                     ``auto``, singlet) unrestricted from a broken-symmetry B3LYP guess; then
                                     abort (400)
300-302, 350, 140          100       restart once from the last density; a second time in a row abort (350)
=========================  ========  =======================================================================

Strategies the user has set already (``newton``, ``smearing``) are skipped.  Fractional occupations (Fermi-Dirac
smearing of :data:`SMEARING` Ha) are what converges stretched bonds: for stretched H2 no integer occupation is
self-consistent with DM21 (DIIS oscillates between the σg² and σu² states; the Newton solver finds a state with a
virtual orbital below the HOMO), while the fractional one is, at two H atoms' energy (docs/core.md).  Stretched F2
(2.5 Å) converges in neither restricted form but unrestricted, in the broken-symmetry state (⟨S²⟩ ≈ 1): the last
strategy, for a singlet that ran restricted because ``scf_type`` was ``auto``, starts it from B3LYP's
broken-symmetry state (``init_guess`` ``b3lyp_broken_symmetry``; from the symmetric guess the symmetry breaks only
through numerical noise, not in every run).

Every handler says in the workchain's report (``verdi process report``) what it changed.
"""

from __future__ import annotations

import typing as t

from aiida import orm
from aiida.common import AttributeDict
from aiida.engine import BaseRestartWorkChain, ExitCode, ProcessHandlerReport, process_handler, while_

from aiida_dm21.calculations.scf import PARAMETERS, DM21ScfCalculation
from aiida_dm21.data.checkpoint import DM21CheckpointData
from aiida_dm21.workflows.protocols import ProtocolError, ProtocolMixin

__all__ = ('DM21ScfWorkChain', 'ProtocolError')

_CODES = DM21ScfCalculation.exit_codes
#: The level shift (Ha) of the second convergence strategy (or twice the one already set, if larger).
LEVEL_SHIFT = 0.25
#: The Fermi-Dirac smearing width (Ha) of the fractional-occupation strategy.  From the B3LYP guess, with the
#: runner's default damping of a smeared SCF (``SMEARING_DAMP``), it converged stretched H2 (2.6-4.0 Å, 6-31G, RKS,
#: level 2 and 3) in 8-22 cycles in every try (undamped: 26-47, and once not in CI: docs/core.md); 0.01 Ha
#: diverged from that guess, and from the 0.02 Ha density converged only sometimes.
SMEARING = 0.02
#: The initial guess of the unrestricted strategy: B3LYP with its spin symmetry broken where that lowers its
#: energy (PySCF's stability analysis).  From the symmetric B3LYP guess stretched F2's DM21 UKS broke the symmetry
#: only through numerical noise: converged in 52 cycles in one run, not in 100 in another (CI).
BROKEN_SYMMETRY_GUESS = 'b3lyp_broken_symmetry'
#: Default of ``max_iterations``: the first run, the five convergence strategies, two walltime or transient restarts.
MAX_ITERATIONS = 8
#: Failures that may not happen again on a second try (the job, the node or the file system failed).
TRANSIENT_EXIT_CODES: list[ExitCode] = [
    _CODES.ERROR_MISSING_RESULTS,
    _CODES.ERROR_INVALID_RESULTS,
    _CODES.ERROR_MISSING_DENSITY,
    _CODES.ERROR_RUNNER_FAILED,
    _CODES.ERROR_SCHEDULER_NODE_FAILURE,
]
TRANSIENT_CODES: frozenset[int] = frozenset(code.status for code in TRANSIENT_EXIT_CODES)


def validate_walltime_factor(value: orm.Float, _: t.Any = None) -> str | None:
    """``walltime_factor`` is a finite number >= 1."""
    if not value.value >= 1.0 or value.value == float('inf'):
        return f'walltime_factor must be a finite number >= 1, got {value.value}'
    return None


def validate_max_iterations(value: orm.Int, _: t.Any = None) -> str | None:
    """``max_iterations`` is at least 1 (with 0 the workchain would end without a result)."""
    if value.value < 1:
        return f'max_iterations must be an integer >= 1 (the most runs in all), got {value.value}'
    return None


def _electrons(structure: orm.StructureData, charge: int) -> int:
    from aiida_dm21.calculations.scf import ATOMIC_NUMBERS, molecule_of

    symbols, _ = molecule_of(structure)
    return sum(ATOMIC_NUMBERS.get(symbol, 0) for symbol in symbols) - charge


class DM21ScfWorkChain(ProtocolMixin, BaseRestartWorkChain):
    """A DM21 SCF of a molecule that restarts from its last density when it does not converge or runs out of time."""

    _process_class = DM21ScfCalculation
    _protocol_file = 'scf.yaml'

    @classmethod
    def define(cls, spec):  # type: ignore[override]
        super().define(spec)
        spec.expose_inputs(
            DM21ScfCalculation,
            namespace='scf',
            namespace_options={'help': 'Inputs of the dm21.scf calculation (the first run; restarts change them).'},
        )
        spec.input(
            'walltime_factor',
            valid_type=orm.Float,
            default=lambda: orm.Float(1.0),
            serializer=orm.to_aiida_type,
            validator=validate_walltime_factor,
            help='After a run stopped for the walltime, multiply `scf.metadata.options.max_wallclock_seconds` by this '
            'for the restart (1: keep it, the right choice when the queue has a hard limit).',
        )
        spec.inputs['max_iterations'].validator = validate_max_iterations
        # the first run, the five convergence strategies, and two more for walltime or transient failures
        spec.inputs['max_iterations'].default = lambda: orm.Int(MAX_ITERATIONS)
        spec.outline(
            cls.setup,
            while_(cls.should_run_process)(
                cls.run_process,
                cls.inspect_process,
            ),
            cls.results,
        )
        spec.expose_outputs(DM21ScfCalculation)
        spec.exit_code(
            350,
            'ERROR_RUNNER_FAILED',
            message='{process}<{pk}> failed (exit {exit_status}: {exit_message}) for the second time in a row; '
            'not retrying.',
        )
        spec.exit_code(
            400,
            'ERROR_SCF_NOT_CONVERGED',
            message='The SCF did not converge with any strategy (more cycles, level shift, second-order solver, '
            'fractional occupations, unrestricted); '
            'the last energy and density are attached.',
        )
        spec.exit_code(
            405,
            'ERROR_NOT_AUFBAU',
            message='{process}<{pk}> converged, with fractional occupations too, to a state that is not aufbau '
            '({exit_message}); the outputs are attached.',
        )
        spec.exit_code(
            410,
            'ERROR_NAN_ENERGY',
            message='{process}<{pk}> gave a NaN or infinite energy: a restart would repeat it, check the functional, '
            'grid and geometry.',
        )
        spec.exit_code(
            420,
            'ERROR_UNSUPPORTED_INPUT',
            message='{process}<{pk}>: {exit_message} (a restart would fail the same way)',
        )
        spec.exit_code(
            430,
            'ERROR_CHECKPOINT_UNREADABLE',
            message='{process}<{pk}>: {exit_message} (a restart would fail the same way)',
        )

    # --- protocols ----------------------------------------------------------------------------------------

    @classmethod
    def get_builder_from_protocol(
        cls,
        code: orm.AbstractCode,
        structure: orm.StructureData,
        checkpoint: DM21CheckpointData,
        protocol: str | None = None,
        overrides: t.Mapping[str, t.Any] | None = None,
        *,
        charge: int | None = None,
        multiplicity: int | None = None,
        options: t.Mapping[str, t.Any] | None = None,
    ):
        """A builder with the inputs of ``protocol`` (``fast``, ``balanced`` or ``stringent``; see ``scf.yaml``).

        :param code: the Python interpreter with aiida-dm21 installed.
        :param structure: the molecule (no periodic boundary conditions).
        :param checkpoint: the network.
        :param protocol: the protocol name (default: :meth:`get_default_protocol`, ``balanced``).
        :param overrides: inputs deep-merged over the protocol's, e.g.
            ``{'scf': {'parameters': {'basis': 'cc-pvdz'}}, 'max_iterations': 3}``.
        :param charge: total charge (default 0).
        :param multiplicity: 2S + 1 (default: 1 for an even number of electrons, 2 for an odd one).
        :param options: ``metadata.options`` of the calculations, merged over the protocol's.
        :raises ProtocolError: unknown protocol, or an override key that is not an input.
        """
        inputs = cls.get_protocol_inputs(protocol, overrides)
        scf = inputs.setdefault('scf', {})
        parameters = scf.setdefault('parameters', {})
        if charge is not None:
            parameters['charge'] = int(charge)
        if multiplicity is not None:
            parameters['multiplicity'] = int(multiplicity)
        elif 'multiplicity' not in parameters:
            parameters['multiplicity'] = 1 + _electrons(structure, parameters.get('charge', 0)) % 2
        if options:
            scf.setdefault('metadata', {})['options'] = {**scf.get('metadata', {}).get('options', {}), **options}
        check_inputs(cls.spec().inputs, inputs)  # the protocol file, the overrides and the options

        builder = cls.get_builder()
        builder.scf.code = code
        builder.scf.structure = structure
        builder.scf.checkpoint = checkpoint
        for key, value in scf.items():
            if key == 'parameters':
                builder.scf.parameters = orm.Dict(value)
            elif key == 'metadata':
                builder.scf.metadata = value
            else:
                builder.scf[key] = value
        for key, value in inputs.items():
            if key != 'scf':
                builder[key] = value
        return builder

    # --- the loop -----------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Inputs of the first run; the convergence strategies start at zero."""
        super().setup()
        self.ctx.inputs = AttributeDict(self.exposed_inputs(DM21ScfCalculation, 'scf'))
        self.ctx.inputs.parameters = self.ctx.inputs.parameters.get_dict()
        metadata = dict(self.ctx.inputs.get('metadata', {}))
        metadata['options'] = dict(metadata.get('options', {}))
        self.ctx.inputs.metadata = metadata
        self.ctx.convergence_stage = 0
        self.ctx.runner_failures = 0

    def inspect_process(self) -> ExitCode | None:
        """As the base class; a run that did not fail the transient way resets the count of transient failures."""
        node = self.ctx.children[self.ctx.iteration - 1]
        if node.exit_status not in TRANSIENT_CODES:
            self.ctx.runner_failures = 0
        return super().inspect_process()

    # --- helpers ------------------------------------------------------------------------------------------

    def _parameter(self, key: str) -> t.Any:
        value = self.ctx.inputs.parameters.get(key)
        return PARAMETERS[key].default if value is None else value

    def _latest_density(self) -> tuple[orm.ArrayData, orm.CalcJobNode] | None:
        """The ``output_density`` of the most recent run that has one, and that run."""
        for child in reversed(self.ctx.children):
            if 'output_density' in child.outputs:
                return child.outputs.output_density, child
        return None

    def _restart_from_latest_density(self) -> str:
        """Set ``restart_density`` to the latest density; a phrase for the report saying where it comes from."""
        found = self._latest_density()
        if found is None:
            if 'restart_density' in self.ctx.inputs:
                return 'no run produced a density: restarting from the given restart_density'
            return 'no run produced a density: restarting from the initial guess'
        density, source = found
        self.ctx.inputs.restart_density = density
        cycles = source.outputs.output_parameters.get('cycles') if 'output_parameters' in source.outputs else None
        after = f' after {cycles} cycles' if cycles is not None else ''
        return f'restarting from the density of {source.process_label}<{source.pk}>{after}'

    def _abort(self, error: ExitCode, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """Stop with ``error``; its message may use the run's ``process``, ``pk``, ``exit_status``, ``exit_message``."""
        formatted = error.format(
            process=node.process_label, pk=node.pk, exit_status=node.exit_status, exit_message=node.exit_message
        )
        # Finished: the base class then returns this exit code at once (not ERROR_MAXIMUM_ITERATIONS_EXCEEDED).
        self.ctx.is_finished = True
        label = f'{node.process_label}<{node.pk}>'
        self.report(f'{label} exit {node.exit_status}: no restart, aborting ({formatted.message})')
        return ProcessHandlerReport(True, formatted)

    # --- handlers, highest priority first -----------------------------------------------------------------

    @process_handler(priority=600, exit_codes=[_CODES.ERROR_NAN_ENERGY])
    def handle_nan_energy(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """NaN or infinite energy: the same inputs would give it again, abort."""
        return self._abort(self.exit_codes.ERROR_NAN_ENERGY, node)

    @process_handler(priority=590, exit_codes=[_CODES.ERROR_UNSUPPORTED_INPUT])
    def handle_unsupported_input(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """The runner refused the input (e.g. a basis missing on the compute machine): abort."""
        return self._abort(self.exit_codes.ERROR_UNSUPPORTED_INPUT, node)

    @process_handler(priority=580, exit_codes=[_CODES.ERROR_CHECKPOINT_UNREADABLE])
    def handle_checkpoint_unreadable(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """The checkpoint did not load on the compute machine: abort."""
        return self._abort(self.exit_codes.ERROR_CHECKPOINT_UNREADABLE, node)

    @process_handler(
        priority=500,
        exit_codes=[
            _CODES.ERROR_SCHEDULER_OUT_OF_WALLTIME,
            _CODES.ERROR_OUT_OF_WALLTIME,
            _CODES.ERROR_OUT_OF_WALLTIME_PARTIAL,
        ],
    )
    def handle_out_of_walltime(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """Out of walltime (scheduler 120, 310, or the runner stopped in time, 311): restart from the last density."""
        where = self._restart_from_latest_density()
        change = ''
        factor = self.inputs.walltime_factor.value
        options = self.ctx.inputs.metadata['options']
        walltime = options.get('max_wallclock_seconds') or node.get_option('max_wallclock_seconds')
        if factor > 1.0 and walltime:
            new = options['max_wallclock_seconds'] = round(walltime * factor)
            change = f'; max_wallclock_seconds {walltime} -> {new} (walltime_factor {factor:g})'
        self.report(f'{node.process_label}<{node.pk}> ran out of walltime (exit {node.exit_status}): {where}{change}')
        return ProcessHandlerReport(True)

    def _from_initial_guess(self, **settings: t.Any) -> int:
        """Restart from the initial guess with ``settings`` and the integer-occupation aids off (no Newton, no level
        shift) and at least 100 cycles; the new ``max_cycle``.  An oscillating or non-aufbau density is a poor start
        for a strategy that changes the state model."""
        parameters = self.ctx.inputs.parameters
        parameters.update(newton=False, level_shift=0.0, **settings)
        parameters['max_cycle'] = max(self._parameter('max_cycle'), 100)
        self.ctx.inputs.pop('restart_density', None)
        return parameters['max_cycle']

    def _fractional_occupations(self) -> str:
        """Switch to fractional occupations from the initial guess (no Newton, no level shift); what changed.  The
        strategies before it are then behind: a later 400 goes on with the unrestricted one."""
        self.ctx.convergence_stage = max(self.ctx.convergence_stage, 4)
        max_cycle = self._from_initial_guess(smearing=SMEARING)
        return (
            f'fractional occupations (smearing -> {SMEARING:g} Ha, newton and level shift off, '
            f'max_cycle -> {max_cycle}) from the initial guess'
        )

    @process_handler(priority=450, exit_codes=[_CODES.ERROR_NOT_AUFBAU])
    def handle_not_aufbau(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """Converged, but an empty orbital lies below a filled one: not the ground state.  Fractional occupations from
        the initial guess; if they were on already, abort (the outputs attached)."""
        if self._parameter('smearing'):
            self.out_many(self.exposed_outputs(node, DM21ScfCalculation))
            return self._abort(self.exit_codes.ERROR_NOT_AUFBAU, node)
        outputs = node.outputs.output_parameters if 'output_parameters' in node.outputs else {}
        violation = outputs.get('aufbau_violation')
        below = f'an empty orbital {violation:.4f} Ha below a filled one' if isinstance(violation, float) else 'no gap'
        change = self._fractional_occupations()
        self.report(f'{node.process_label}<{node.pk}> converged to a state that is not aufbau ({below}): {change}')
        return ProcessHandlerReport(True)

    @process_handler(priority=400, exit_codes=[_CODES.ERROR_SCF_NOT_CONVERGED])
    def handle_scf_not_converged(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """Not converged: restart from its density with twice the cycles, then also 2) a level shift, 3) the Newton
        solver; 4) from the initial guess with fractional occupations; 5) for a singlet run restricted by
        ``scf_type`` ``auto``, unrestricted from the broken-symmetry B3LYP guess; not converged after that: abort,
        with the last run's outputs attached.  A strategy already on (``newton``, ``smearing``, UKS) is skipped."""
        parameters = self.ctx.inputs.parameters
        while True:
            self.ctx.convergence_stage += 1
            stage = self.ctx.convergence_stage
            if stage == 1:
                parameters['max_cycle'] = 2 * self._parameter('max_cycle')
                change = f'max_cycle -> {parameters["max_cycle"]}'
            elif stage == 2:
                parameters['max_cycle'] = 2 * self._parameter('max_cycle')
                parameters['level_shift'] = max(LEVEL_SHIFT, 2 * self._parameter('level_shift'))
                change = f'max_cycle -> {parameters["max_cycle"]}, level_shift -> {parameters["level_shift"]:g} Ha'
            elif stage == 3:
                if self._parameter('newton') or self._parameter('smearing'):
                    continue  # on already, or not possible with fractional occupations
                parameters['max_cycle'] = 2 * self._parameter('max_cycle')
                parameters['newton'] = True
                change = f'max_cycle -> {parameters["max_cycle"]}, second-order solver (newton: True)'
            elif stage == 4:
                if self._parameter('smearing'):
                    continue
                change = self._fractional_occupations()
                self.report(f'{node.process_label}<{node.pk}> did not converge (exit 400): {change}')
                return ProcessHandlerReport(True)
            elif stage == 5:
                if self._parameter('scf_type') != 'auto' or self._parameter('multiplicity') != 1:
                    continue  # restricted asked for, or unrestricted already
                max_cycle = self._from_initial_guess(scf_type='UKS', smearing=0.0, init_guess=BROKEN_SYMMETRY_GUESS)
                self.report(
                    f'{node.process_label}<{node.pk}> did not converge (exit 400): unrestricted (scf_type -> UKS, '
                    f'init_guess -> {BROKEN_SYMMETRY_GUESS}; smearing, newton and level shift off, max_cycle -> '
                    f'{max_cycle})'
                )
                return ProcessHandlerReport(True)
            else:
                self.out_many(self.exposed_outputs(node, DM21ScfCalculation))  # the last energy and density
                return self._abort(self.exit_codes.ERROR_SCF_NOT_CONVERGED, node)
            break
        where = self._restart_from_latest_density()
        self.report(f'{node.process_label}<{node.pk}> did not converge (exit 400): {where}, {change}')
        return ProcessHandlerReport(True)

    @process_handler(priority=100, exit_codes=TRANSIENT_EXIT_CODES)
    def handle_runner_failure(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """Missing or garbled output, a runner exception, a node failure: one retry from the last density."""
        self.ctx.runner_failures += 1
        if self.ctx.runner_failures > 1:
            return self._abort(self.exit_codes.ERROR_RUNNER_FAILED, node)
        where = self._restart_from_latest_density()
        self.report(
            f'{node.process_label}<{node.pk}> failed (exit {node.exit_status}: {node.exit_message}): '
            f'retrying once, {where}'
        )
        return ProcessHandlerReport(True)


def check_inputs(namespace: t.Any, inputs: t.Mapping[str, t.Any], path: str = '') -> None:
    """Every key of ``inputs`` is a port of ``namespace`` (recursively), and ``parameters`` keys are known.

    :raises ProtocolError: naming the first unknown key with its full path and the accepted keys.
    """
    from plumpy.ports import PortNamespace

    for key, value in inputs.items():
        where = f'{path}{key}'
        if key not in namespace:  # also in dynamic namespaces: a protocol only sets declared ports
            accepted = ', '.join(sorted(namespace))
            raise ProtocolError(f'unknown input {where!r} in the protocol or overrides; accepted here: {accepted}')
        port = namespace[key]
        if isinstance(port, PortNamespace) and isinstance(value, t.Mapping):
            check_inputs(port, value, f'{where}.')
        elif key == 'parameters' and isinstance(value, t.Mapping) and path.endswith('scf.'):
            unknown = sorted(set(value) - set(PARAMETERS))
            if unknown:
                raise ProtocolError(
                    f'unknown parameter(s) {", ".join(repr(f"{where}.{u}") for u in unknown)}; '
                    f'accepted: {", ".join(PARAMETERS)}'
                )
