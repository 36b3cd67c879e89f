"""Options shared by the ``launch`` commands of ``aiida-dm21 reference`` and ``aiida-dm21 train``.

The profile option is eager: it loads the profile before any other option is converted, so that aiida-core's
own parameter types (:class:`~aiida.cmdline.params.types.CodeParamType`,
:class:`~aiida.cmdline.params.types.DataParamType`) look codes and nodes up in that profile.  The scheduler
options become the ``metadata.options`` of every CalcJob the workchain runs.  Nothing here imports aiida-core
at import time (only click, for the ``aiida-dm21 --help`` path); the parameter types are built lazily.
"""

from __future__ import annotations

import typing as t

import click

from .aiida_support import load_profile

__all__ = ('code_option', 'computer_param_type', 'job_options', 'metadata_options', 'profile_first')

F = t.TypeVar('F', bound=t.Callable[..., t.Any])


def _load_profile(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if not ctx.resilient_parsing:  # not while the shell completes a word
        load_profile(value)
    return value


def profile_first(func: F) -> F:
    """``-p/--profile``, loaded before the other options are converted (not passed to the command)."""
    return click.option(
        '-p',
        '--profile',
        default=None,
        is_eager=True,
        expose_value=False,
        callback=_load_profile,
        help='AiiDA profile (default: the loaded or default profile).',
    )(func)


class _LazyParamType(click.ParamType):
    """An aiida-core parameter type made on first use, so that importing the CLI does not import aiida-core."""

    def __init__(self, name: str, factory: t.Callable[[], click.ParamType]) -> None:
        self.name = name
        self._factory = factory
        self._type: click.ParamType | None = None

    def convert(self, value: t.Any, param: click.Parameter | None, ctx: click.Context | None) -> t.Any:
        if self._type is None:
            self._type = self._factory()
        return self._type.convert(value, param, ctx)


def code_param_type() -> click.ParamType:
    """aiida-core's :class:`~aiida.cmdline.params.types.CodeParamType` (label, ``label@computer``, pk or UUID)."""

    def make() -> click.ParamType:
        from aiida.cmdline.params.types import CodeParamType

        return CodeParamType()

    return _LazyParamType('code', make)


def computer_param_type() -> click.ParamType:
    """aiida-core's :class:`~aiida.cmdline.params.types.ComputerParamType` (label, pk or UUID)."""

    def make() -> click.ParamType:
        from aiida.cmdline.params.types import ComputerParamType

        return ComputerParamType()

    return _LazyParamType('computer', make)


def data_param_type(entry_point: str, name: str) -> click.ParamType:
    """aiida-core's :class:`~aiida.cmdline.params.types.DataParamType` for nodes of ``entry_point`` only."""

    def make() -> click.ParamType:
        from aiida.cmdline.params.types import DataParamType

        return DataParamType(sub_classes=(entry_point,))

    return _LazyParamType(name, make)


def code_option(func: F) -> F:
    """``--code``: an AiiDA code (default: ``dm21-python@localhost``, created if missing)."""
    return click.option(
        '--code',
        type=code_param_type(),
        default=None,
        help='Code label, label@computer, pk or UUID (default: dm21-python@localhost, created).',
    )(func)


def job_options(func: F) -> F:
    """``--walltime``, ``--queue``, ``--num-cores``, ``--account`` and ``--daemon``."""
    for decorator in reversed(
        (
            click.option(
                '--walltime',
                default=None,
                type=click.IntRange(min=1),
                help='max_wallclock_seconds of each job (seconds, >= 1).',
            ),
            click.option('--queue', default=None, help='Scheduler queue or partition (queue_name) of each job.'),
            click.option('--account', default=None, help='Scheduler account (project) of each job.'),
            click.option(
                '--num-cores',
                default=None,
                type=click.IntRange(min=1),
                help='Cores of each job (resources.num_cores_per_mpiproc; Slurm --cpus-per-task): the runner '
                'sets its PyTorch, numba and PySCF threads from what the scheduler grants.',
            ),
            click.option(
                '--daemon', is_flag=True, help='Submit to the AiiDA daemon instead of running in this process.'
            ),
        )
    ):
        func = decorator(func)
    return func


def metadata_options(
    walltime: int | None, queue: str | None, account: str | None, num_cores: int | None
) -> dict[str, t.Any]:
    """The ``metadata.options`` of the jobs for these option values (only what was given)."""
    options: dict[str, t.Any] = {}
    if walltime is not None:
        options['max_wallclock_seconds'] = walltime
    if queue:
        options['queue_name'] = queue
    if account:
        options['account'] = account
    if num_cores is not None:
        options['resources'] = {'num_machines': 1, 'num_mpiprocs_per_machine': 1, 'num_cores_per_mpiproc': num_cores}
    return options
