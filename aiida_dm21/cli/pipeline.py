"""``aiida-dm21 pipeline launch``: the whole loop (``dm21.pipeline``) from the command line.

Reference data of a training set and a held-out set -> training (``dm21.train`` workchain) -> DM21 SCF of the
held-out species with the new checkpoint (``dm21.scf`` workchains) -> report.  Each step has its own code
(``--reference-code``, ``--train-code``, ``--scf-code``; default ``--code``) and its own scheduler options: the
resource options take ``VALUE`` for every step or ``STEP=VALUE`` for one step (``reference``, ``train``,
``scf``), and may be repeated, the step's own value winning::

    aiida-dm21 pipeline launch --code dm21@cluster --walltime 3600 --walltime train=86400 \\
        --queue short --queue train=gpu --account proj42 --daemon

Without ``--daemon`` the pipeline runs in this process (Ctrl-C kills it and every calculation it started); with
it, the pipeline is submitted and the commands to follow it are printed.  Like ``scf launch``, the command loads
aiida-core only when it runs, and PyTorch, PySCF and numba never on this machine.
"""

from __future__ import annotations

import logging
import typing as t

import click
from rich.console import Console

from .aiida_cmds import PROFILE
from .aiida_support import console, load_profile
from .scf import Interrupted, resolve_code, resolve_functional, run_in_foreground, submit_to_daemon

__all__ = ('RESOURCE_OPTIONS', 'STEP_NAMES', 'StepValue', 'pipeline', 'step_options')

#: The steps of ``dm21.pipeline`` (the ``STEP`` of ``STEP_code`` and ``STEP_options``).
STEP_NAMES = ('reference', 'train', 'scf')
#: Command-line resource option -> ``metadata.options`` key (``num_mpiprocs`` goes into ``resources``).
RESOURCE_OPTIONS = {
    'walltime': 'max_wallclock_seconds',
    'queue': 'queue_name',
    'account': 'account',
    'qos': 'qos',
    'max_memory_kb': 'max_memory_kb',
    'num_mpiprocs': 'num_mpiprocs_per_machine',
}


class StepValue(click.ParamType):
    """``VALUE`` (every step) or ``STEP=VALUE`` (one step of :data:`STEP_NAMES`), VALUE of type ``kind``."""

    name = 'step_value'

    def __init__(self, kind: click.ParamType, metavar: str) -> None:
        self.kind = kind
        self.metavar = metavar

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:  # type: ignore[override]
        return f'[STEP=]{self.metavar}'

    def convert(
        self, value: t.Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str | None, t.Any]:
        if isinstance(value, tuple):
            return value
        step: str | None = None
        text = str(value)
        if '=' in text:
            step, text = text.split('=', 1)
            if step not in STEP_NAMES:
                self.fail(f'unknown step {step!r} in {value!r}; steps: {", ".join(STEP_NAMES)}', param, ctx)
        return step, self.kind.convert(text, param, ctx)


def step_options(given: t.Mapping[str, t.Sequence[tuple[str | None, t.Any]]]) -> dict[str, dict[str, t.Any]]:
    """The ``metadata.options`` of each step from the resource options (``{'walltime': [(None, 60), ('train',
    600)]}`` ...): every step gets the values without a step, then its own (the last one given wins)."""
    options: dict[str, dict[str, t.Any]] = {step: {} for step in STEP_NAMES}
    for name, values in given.items():
        key = RESOURCE_OPTIONS[name]
        for only in (False, True):  # the values for every step first, then each step's own
            for step, value in values:
                if (step is not None) != only:
                    continue
                for target in STEP_NAMES if step is None else (step,):
                    if key == 'num_mpiprocs_per_machine':
                        options[target]['resources'] = {'num_machines': 1, 'num_mpiprocs_per_machine': value}
                    else:
                        options[target][key] = value
    return options


def _resource(name: str, kind: click.ParamType, metavar: str, what: str):
    return click.option(
        f'--{name.replace("_", "-")}',
        name,
        type=StepValue(kind, metavar),
        multiple=True,
        help=f'{what}; VALUE for every step, or STEP=VALUE for one of {", ".join(STEP_NAMES)} (repeatable).',
    )


@click.group('pipeline')
def pipeline() -> None:
    """The whole loop as one AiiDA workchain (dm21.pipeline): reference data -> training -> held-out SCF."""


@pipeline.command('launch')
@click.option(
    '--code', 'code_spec', default=None, help='Code label or pk of every step (default: dm21-python@localhost).'
)
@click.option('--reference-code', default=None, help='Code of the reference calculations (default: --code).')
@click.option('--train-code', default=None, help='Code of the training (default: --code).')
@click.option('--scf-code', default=None, help='Code of the held-out SCFs (default: --code).')
@click.option('--train-set', default='demo_train', show_default=True, help='Built-in species set to train on.')
@click.option('--heldout-set', default='demo_heldout', show_default=True, help='Built-in set only evaluated.')
@click.option('--basis', '-b', default='6-31g', show_default=True, help='PySCF basis of every step.')
@click.option(
    '--initial-checkpoint',
    default=None,
    help='Fine-tune these weights (installed name such as DM21m, a .safetensors file or a checkpoint pk); '
    'default: train from random weights.',
)
@click.option('--epochs', default=8, show_default=True, type=click.IntRange(min=1), help='Training epochs.')
@click.option('--learning-rate', default=1e-4, show_default=True, type=click.FloatRange(min=0.0, min_open=True))
@click.option('--grid-level', default=2, show_default=True, type=click.IntRange(0, 9), help='Grid of training and SCF.')
@_resource('walltime', click.IntRange(min=1), 'SECONDS', 'max_wallclock_seconds of each job')
@_resource('queue', click.STRING, 'NAME', 'Scheduler queue (partition)')
@_resource('account', click.STRING, 'NAME', 'Scheduler account (project) to charge')
@_resource('qos', click.STRING, 'NAME', 'Scheduler quality of service')
@_resource('max_memory_kb', click.IntRange(min=1), 'KB', 'Memory of each job in kB')
@_resource('num_mpiprocs', click.IntRange(min=1), 'N', 'Processes on one machine (resources)')
@click.option('--daemon', is_flag=True, help='Submit to the AiiDA daemon instead of running in this process.')
@PROFILE
def launch(
    code_spec: str | None,
    reference_code: str | None,
    train_code: str | None,
    scf_code: str | None,
    train_set: str,
    heldout_set: str,
    basis: str,
    initial_checkpoint: str | None,
    epochs: int,
    learning_rate: float,
    grid_level: int,
    daemon: bool,
    profile: str | None,
    **resources: tuple[tuple[str | None, t.Any], ...],
) -> None:
    """Run dm21.pipeline: reference data of --train-set and --heldout-set, training, SCF of the held-out species."""
    load_profile(profile)
    from aiida import orm

    from ..workflows.pipeline import PipelineWorkChain

    builder = PipelineWorkChain.get_builder()
    builder.code = resolve_code(code_spec)
    for step, spec in (('reference', reference_code), ('train', train_code), ('scf', scf_code)):
        if spec is not None:
            builder[f'{step}_code'] = resolve_code(spec)
    for step, options in step_options(resources).items():
        if options:
            builder[f'{step}_options'] = orm.Dict(options)
    builder.train_set = orm.Str(train_set)
    builder.heldout_set = orm.Str(heldout_set)
    builder.basis = orm.Str(basis)
    builder.training = orm.Dict({'epochs': epochs, 'learning_rate': learning_rate})
    builder.scf_parameters = orm.Dict({'grid_level': grid_level})
    if initial_checkpoint is not None:
        builder.initial_checkpoint = resolve_functional(initial_checkpoint)
    problem = PipelineWorkChain.spec().inputs.validate(builder._inputs(prune=True))
    if problem is not None:  # before anything is submitted or run
        raise click.ClickException(f'the inputs were refused: {problem.message}')
    what = f'{train_set} -> {heldout_set} ({basis})'

    if daemon:
        submit_to_daemon(builder, 'dm21.pipeline', what)
        return

    logging.getLogger('aiida').setLevel('REPORT')
    from aiida.common.exceptions import ValidationError

    try:
        with console.status(f'dm21.pipeline {what}: running in this process ...'):
            results, node = run_in_foreground(builder)
    except (ValueError, ValidationError) as exc:  # refused when the process was made (checked above already)
        raise click.ClickException(f'the inputs were refused: {exc}') from exc
    if node.is_killed:
        raise Interrupted(f'interrupted: dm21.pipeline<{node.pk}> was killed; see `verdi process report {node.pk}`')
    if not node.is_finished_ok:
        raise click.ClickException(
            f'dm21.pipeline<{node.pk}> failed: exit {node.exit_status} {node.exit_message}; '
            f'see `verdi process report {node.pk}`'
        )
    report = results['report'].get_dict()
    out = Console()
    heldout = {when: report['training'].get(when, {}).get('heldout', {}) for when in ('before', 'after')}
    out.print(
        f'dm21.pipeline<{node.pk}> {what}: held-out fractional-charge MAE '
        f'{heldout["before"].get("mae_fc_mha")} -> {heldout["after"].get("mae_fc_mha")} mHa',
        soft_wrap=True,
    )
    for key, value in report['scf'].items():
        out.print(f'{key}: E = {value["e_tot"]:.8f} Ha (converged={value["converged"]})')
    checkpoint = results['checkpoint']
    out.print(f'trained checkpoint<{checkpoint.pk}>: its lineage with `aiida-dm21 checkpoint lineage {checkpoint.pk}`')
