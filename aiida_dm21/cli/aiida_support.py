"""Profile, computer and code set-up shared by the AiiDA commands of ``aiida-dm21``."""

from __future__ import annotations

import subprocess
import sys

from rich.console import Console

console = Console(stderr=True)

CODE_LABEL = 'dm21-python'


def load_profile(profile: str | None = None, create: bool = False):
    """Load ``profile`` (or the default); with ``create``, make a ``verdi presto`` SQLite profile if there is none."""
    from aiida import load_profile as _load
    from aiida.common.exceptions import ProfileConfigurationError
    from aiida.manage.configuration import get_config

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
        description='Python with aiida-dm21 (runs aiida_dm21 runners on the compute node)',
    )
    code.store()
    console.log(f'registered code {label}@{computer.label} -> {sys.executable}')
    return code
