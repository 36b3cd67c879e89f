"""``dm21.train`` WorkChain: a training that resumes after walltime, on ``BaseRestartWorkChain``.

When a ``dm21.train`` job stops for the walltime — cleanly, with its state saved (exit 310: before an epoch
that would not fit, or on the scheduler's SIGTERM at the time limit), or killed by the scheduler (120,
ERROR_SCHEDULER_OUT_OF_WALLTIME) — the next job gets the previous job's ``remote_folder`` as ``parent_folder``
and continues from the last saved epoch.  A failure that a
restart would only repeat (NaN loss 410, non-finite output 411, refused input 420/421) ends the
workchain at once with 404; any other failure follows AiiDA's unhandled-failure policy.
"""

from __future__ import annotations

from aiida import orm
from aiida.engine import BaseRestartWorkChain, ProcessHandlerReport, process_handler, while_

from aiida_dm21.calculations.train import DM21TrainCalculation

__all__ = ('DM21TrainWorkChain',)


class DM21TrainWorkChain(BaseRestartWorkChain):
    """Train a DM21-architecture functional, resubmitting from the saved state after walltime."""

    _process_class = DM21TrainCalculation

    @classmethod
    def define(cls, spec):  # type: ignore[override]
        super().define(spec)
        spec.expose_inputs(DM21TrainCalculation, namespace='train')
        spec.expose_outputs(DM21TrainCalculation)
        spec.outline(
            cls.setup,
            while_(cls.should_run_process)(cls.run_process, cls.inspect_process),
            cls.results,
        )
        spec.exit_code(403, 'ERROR_NO_STATE_TO_RESUME', message='The job stopped for walltime without a remote folder.')
        spec.exit_code(
            404,
            'ERROR_UNRECOVERABLE_FAILURE',
            message='The training failed in a way a restart would repeat (exit {status}): {message}',
        )

    def setup(self):
        super().setup()
        self.ctx.inputs = self.exposed_inputs(DM21TrainCalculation, 'train')

    @process_handler(
        priority=600,
        exit_codes=[
            DM21TrainCalculation.exit_codes.ERROR_NON_FINITE_LOSS,
            DM21TrainCalculation.exit_codes.ERROR_NON_FINITE_VALUE,
            DM21TrainCalculation.exit_codes.ERROR_UNSUPPORTED_INPUT,
            DM21TrainCalculation.exit_codes.ERROR_UNSUPPORTED_FORMAT_VERSION,
        ],
    )
    def handle_unrecoverable(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """Stop: the same inputs would give the same NaN or the same refusal again."""
        self.report(f'{node.process_label}<{node.pk}> failed with exit {node.exit_status}: {node.exit_message}')
        code = self.exit_codes.ERROR_UNRECOVERABLE_FAILURE.format(
            status=str(node.exit_status), message=node.exit_message
        )
        return ProcessHandlerReport(True, code)

    @process_handler(
        priority=500,
        exit_codes=[
            DM21TrainCalculation.exit_codes.ERROR_OUT_OF_WALLTIME,
            DM21TrainCalculation.exit_codes.ERROR_SCHEDULER_OUT_OF_WALLTIME,
        ],
    )
    def handle_walltime(self, node: orm.CalcJobNode) -> ProcessHandlerReport:
        """Resume from the saved state of the interrupted job."""
        if 'remote_folder' not in node.outputs:
            self.report(f'{node.process_label}<{node.pk}> stopped for walltime but left no remote folder')
            return ProcessHandlerReport(True, self.exit_codes.ERROR_NO_STATE_TO_RESUME)
        self.ctx.inputs.parent_folder = node.outputs.remote_folder
        self.report(
            f'{node.process_label}<{node.pk}> stopped for walltime ({node.exit_message}); '
            f'resuming from its saved state in remote_folder<{node.outputs.remote_folder.pk}>'
        )
        return ProcessHandlerReport(True)
