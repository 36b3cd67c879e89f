"""Profile, computer and code set-up shared by the AiiDA commands of ``aiida-dm21``."""

from __future__ import annotations

import subprocess
import sys
import typing as t
from pathlib import Path, PurePosixPath

import click
from rich.console import Console

console = Console(stderr=True)

CODE_LABEL = 'dm21-python'


def load_profile(profile: str | None = None, create: bool = False):
    """Load ``profile`` (or the default); with ``create``, make a ``verdi presto`` SQLite profile if there is none.

    Without ``profile``, a profile that is already loaded (by ``verdi``, a test fixture or a script) is used
    as it is: the commands never switch away from it unless a profile is named.
    """
    from aiida import load_profile as _load
    from aiida.common.exceptions import ProfileConfigurationError
    from aiida.manage import get_manager
    from aiida.manage.configuration import get_config

    loaded = get_manager().get_profile()
    if profile is None and loaded is not None:
        return loaded
    try:
        config = get_config(create=True)
        names = config.profile_names
    except Exception:
        names = []
    if not names and create:
        console.log('no AiiDA profile: creating one with `verdi presto` (SQLite storage, no services needed)')
        command = [sys.executable, '-m', 'aiida', 'presto', '--use-zeromq']
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f'`verdi presto` failed:\n{done.stdout}{done.stderr}')
        from aiida.manage.configuration import reset_config

        reset_config()  # re-read the configuration that presto just wrote
    try:
        return _load(profile, allow_switch=True)
    except ProfileConfigurationError as exc:
        raise SystemExit(f'cannot load an AiiDA profile: {exc}\nrun `verdi presto` first') from exc


def load_profile_if_available(profile: str | None = None):
    """The loaded profile, else ``profile`` or the default one if the AiiDA configuration has it, else ``None``.

    Never creates anything (no configuration folder, no profile): for commands that only *may* use AiiDA.
    :raises Exception: whatever loading a configured profile raises (a broken configuration).
    """
    try:
        from aiida.manage import get_manager
        from aiida.manage.configuration import get_config
    except ImportError:
        return None
    loaded = get_manager().get_profile()
    if profile is None and loaded is not None:
        return loaded
    from aiida.common.exceptions import ConfigurationError

    try:
        config = get_config(create=False)
    except ConfigurationError:
        return None
    name = profile or config.default_profile_name
    if name is None or name not in config.profile_names:
        if profile is not None:
            raise ConfigurationError(f'no AiiDA profile {profile!r}; profiles: {", ".join(config.profile_names)}')
        return None
    from aiida import load_profile as _load

    return _load(name, allow_switch=True)


def ensure_localhost():
    """The ``localhost`` computer, created and configured (core.local, core.direct) if missing."""
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        computer = orm.load_computer('localhost')
    except NotExistent:
        import tempfile

        computer = orm.Computer(
            label='localhost',
            hostname='localhost',
            transport_type='core.local',
            scheduler_type='core.direct',
            workdir=f'{tempfile.gettempdir()}/aiida_dm21_work',
        ).store()
        computer.set_minimum_job_poll_interval(0.0)
    if not computer.is_configured:
        computer.configure()
    return computer


def ensure_code(label: str = CODE_LABEL):
    """An InstalledCode on localhost running this Python (which has aiida-dm21 installed)."""
    from aiida import orm
    from aiida.common.exceptions import MultipleObjectsError, NotExistent

    computer = ensure_localhost()
    try:
        return orm.load_code(f'{label}@{computer.label}')
    except (NotExistent, MultipleObjectsError):
        pass
    code = orm.InstalledCode(
        label=label,
        computer=computer,
        filepath_executable=sys.executable,
        description=CODE_DESCRIPTION,
    )
    code.store()
    console.log(f'registered code {label}@{computer.label} -> {sys.executable}')
    return code


CODE_DESCRIPTION = 'Python with aiida-dm21 (runs aiida_dm21 runners on the compute node)'


def register_code(
    computer=None,
    python: str | None = None,
    label: str = CODE_LABEL,
    prepend_text: str = '',
    append_text: str = '',
) -> tuple[t.Any, bool]:
    """The InstalledCode ``label@computer`` running ``python``: ``(code, created)``.

    ``computer`` is an ``orm.Computer`` (default: ``localhost``, created if missing); ``python`` the interpreter with
    aiida-dm21 on that computer (default on ``localhost``: this Python; required on any other computer).  A code
    of that label that already exists on the computer is reused if it runs the same interpreter with the same
    ``prepend_text`` and ``append_text``; a stored code is never changed.

    :raises click.ClickException: no ``python`` for a computer other than localhost, a ``core.local`` computer
        without that interpreter, several codes of that label, or one of that label set up differently.
    """
    from aiida import orm

    if computer is None:
        computer = ensure_localhost()
    if not label or '@' in label:
        raise click.ClickException(f'--label must be a non-empty code label without "@", got {label!r}')
    if python is None:
        if computer.label != 'localhost':
            raise click.ClickException(
                f'--python is required for computer {computer.label!r}: the path of the Python on that computer '
                'that has aiida-dm21 installed (e.g. --python /home/me/dm21/bin/python, or --python python with '
                'a --prepend-text that activates its environment)'
            )
        python = sys.executable
    if not python.strip():
        raise click.ClickException('--python must not be empty')
    full_label = f'{label}@{computer.label}'
    builder = orm.QueryBuilder().append(orm.Computer, filters={'id': computer.pk}, tag='computer')
    builder.append(orm.AbstractCode, with_computer='computer', filters={'label': label})
    existing = [row[0] for row in builder.all()]
    if len(existing) > 1:
        pks = ', '.join(str(code.pk) for code in existing)
        raise click.ClickException(
            f'{len(existing)} codes are called {full_label} (pk {pks}): pass another --label, or remove the extra '
            'ones (`verdi code delete PK`)'
        )
    python = str(PurePosixPath(python.strip()))  # as InstalledCode stores it: '/a/b/' and '/a//b' are '/a/b'
    wanted = {'executable': python, 'prepend_text': prepend_text, 'append_text': append_text}
    if existing:
        code = existing[0]
        if not isinstance(code, orm.InstalledCode):
            raise click.ClickException(
                f'code {full_label} (pk {code.pk}) exists and is a {type(code).__name__}, not an installed code: '
                'pass another --label'
            )
        stored = {
            'executable': str(code.filepath_executable),
            'prepend_text': code.prepend_text or '',
            'append_text': code.append_text or '',
        }
        different = [key for key in wanted if stored[key] != wanted[key]]
        if different:
            lines = '\n'.join(f'  {key}: stored {stored[key]!r}, asked {wanted[key]!r}' for key in different)
            raise click.ClickException(
                f'code {full_label} (pk {code.pk}) exists with a different set-up (a stored code is never '
                f'changed):\n{lines}\npass another --label, or remove the old code first '
                f'(`verdi code delete {code.pk}`; only if no calculation used it)'
            )
        return code, False
    if computer.transport_type == 'core.local' and Path(python).is_absolute() and not Path(python).is_file():
        raise click.ClickException(
            f'--python {python}: no such file on this machine (computer {computer.label!r} uses core.local)'
        )
    code = orm.InstalledCode(
        label=label,
        computer=computer,
        filepath_executable=python,
        prepend_text=prepend_text,
        append_text=append_text,
        description=CODE_DESCRIPTION,
    )
    code.store()
    return code, True


def store_options(func):
    """``--store/--no-store`` and ``--profile`` of the ``weights`` commands."""
    func = click.option(
        '--profile',
        '-p',
        default=None,
        help='AiiDA profile to store the checkpoints in (default: the loaded or default profile).',
    )(func)
    return click.option(
        '--store/--no-store',
        default=None,
        help='Also store each checkpoint as a dm21.checkpoint node in AiiDA (default: when a profile can be '
        'loaded). --no-store only writes the files and never touches AiiDA.',
    )(func)


def store_checkpoint_files(paths: list[Path], store: bool | None, profile: str | None) -> None:
    """Store the checkpoint files as ``dm21.checkpoint`` nodes: always with ``store``, never with ``False``,
    and with ``None`` only when an AiiDA profile can be loaded (a note otherwise)."""
    if store is False:
        return
    try:
        loaded = load_profile_if_available(profile)
        if loaded is None:
            raise RuntimeError('no AiiDA profile is configured (`aiida-dm21 setup` or `verdi presto` makes one)')
        from ..data.checkpoint import DM21CheckpointData

        for path in paths:
            candidate = DM21CheckpointData(path)
            existing = DM21CheckpointData.find(candidate.weights_sha256, architecture=candidate)
            node = existing or DM21CheckpointData.get_or_create(path)
            state = 'already stored as' if existing else 'stored as'
            console.print(f'{path.name}: {state} dm21.checkpoint<{node.pk}> in profile {loaded.name!r}')
    except Exception as exc:  # no aiida-core, no profile, storage not reachable ...
        if store:
            raise click.ClickException(f'cannot store the checkpoints in AiiDA: {type(exc).__name__}: {exc}') from exc
        console.print(f'not stored in AiiDA ({exc}); the files are installed (use --no-store to skip this step)')
