"""Fixtures of the AiiDA-layer tests: a temporary sqlite profile (AiiDA's own fixtures), checkpoints, codes, molecules.

AiiDA's fixtures (``aiida_profile``, ``aiida_localhost``, ``aiida_code_installed``, ``submit_and_await`` ...)
are imported here rather than listed in ``pytest_plugins``: pytest only honours ``pytest_plugins`` in the
top-level conftest, and there they would make every test of the project (also the core tests, which
must run without AiiDA) create a profile.  Imported into this conftest they serve ``tests/aiida`` only;
the autouse session fixture ``aiida_profile`` makes a throw-away ``core.sqlite_dos`` profile (no broker).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import typing as t
import uuid
from pathlib import Path

import pytest

try:
    from aiida.tools.pytest_fixtures import *  # noqa: F403 (AiiDA's fixtures, see the docstring)
except ImportError:  # no aiida-core (the core-only CI job): skip this folder instead of failing its collection
    collect_ignore_glob = ['test_*.py']

REPO = Path(__file__).resolve().parents[2]
UPSTREAM_CANDIDATES = (REPO.parent / 'shared' / 'dm21' / 'upstream', REPO / 'shared' / 'dm21' / 'upstream')
UPSTREAM = next((path for path in UPSTREAM_CANDIDATES if path.is_dir()), UPSTREAM_CANDIDATES[0])
DATA = REPO / 'tests' / 'data' / 'scf'


@pytest.fixture(scope='session')
def dm21_checkpoint_file(tmp_path_factory) -> Path:
    """DeepMind's DM21 converted once per session to the project's ``.safetensors`` format."""
    from aiida_dm21.functional.checkpoint import install_deepmind

    folder = UPSTREAM / 'DM21'
    if not folder.is_dir():
        pytest.skip(f'the DeepMind DM21 checkpoint folder is not available at {folder}')
    path, _ = install_deepmind(folder, tmp_path_factory.mktemp('weights'))
    return path


@pytest.fixture
def checkpoint_node(dm21_checkpoint_file):
    """The stored ``dm21.checkpoint`` node of DM21 (created once, then found again by its weights hash)."""
    from aiida_dm21.data.checkpoint import DM21CheckpointData

    return DM21CheckpointData.get_or_create(dm21_checkpoint_file)


@pytest.fixture
def python_code(aiida_code_installed):
    """An ``InstalledCode`` on localhost whose executable is this test session's Python."""
    return aiida_code_installed(
        label='dm21-python',
        default_calc_job_plugin='dm21.scf',
        filepath_executable=sys.executable,
    )


@pytest.fixture
def make_structure() -> t.Callable[..., t.Any]:
    """``make_structure([(symbol, (x, y, z)), ...], pbc=...)``: an unstored StructureData (Angstrom, no pbc)."""
    from aiida import orm

    def factory(atoms: list[tuple[str, tuple[float, float, float]]], pbc=(False, False, False), cell=None):
        structure = orm.StructureData(cell=cell or [[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]], pbc=pbc)
        for symbol, position in atoms:
            structure.append_atom(position=position, symbols=symbol)
        return structure

    return factory


@pytest.fixture
def count_nodes() -> t.Callable[[], int]:
    """Number of nodes in the profile (to check that a refused input stores nothing)."""
    from aiida import orm

    return lambda: orm.QueryBuilder().append(orm.Node).count()


@pytest.fixture
def retrieved_calc_node(aiida_localhost, tmp_path):
    """``factory(folder_name or path, exit_status=None, extra_files=None, plugin='dm21.scf')``: a stored CalcJobNode
    of ``plugin`` (parsed by the parser of that name) whose ``retrieved`` FolderData holds the files of
    ``tests/data/scf/<folder_name>`` (or of a path) and ``extra_files``; ``exit_status`` is what the scheduler's
    output parser would have set before parsing (e.g. 120 out of walltime)."""
    from aiida import orm
    from aiida.common.links import LinkType

    def factory(
        source: str | Path,
        exit_status: int | None = None,
        extra_files: dict[str, bytes] | None = None,
        plugin: str = 'dm21.scf',
    ):
        folder = tmp_path / 'retrieved'
        if folder.exists():
            shutil.rmtree(folder)
        source_path = Path(source) if isinstance(source, Path) else DATA / source
        if source_path.is_dir():
            shutil.copytree(source_path, folder)
        else:
            folder.mkdir()
        for name, content in (extra_files or {}).items():
            (folder / name).write_bytes(content)
        node = orm.CalcJobNode(computer=aiida_localhost, process_type=f'aiida.calculations:{plugin}')
        node.set_option('resources', {'num_machines': 1, 'num_mpiprocs_per_machine': 1})
        node.set_option('max_wallclock_seconds', 600)
        node.set_option('output_filename', 'aiida.out')
        node.set_option('parser_name', plugin)
        node.store()
        if exit_status is not None:
            node.set_exit_status(exit_status)
        retrieved = orm.FolderData()
        retrieved.base.repository.put_object_from_tree(str(folder))
        retrieved.base.links.add_incoming(node, link_type=LinkType.CREATE, link_label='retrieved')
        retrieved.store()
        return node

    return factory


@pytest.fixture
def run_h2_scf(python_code, checkpoint_node):
    """``run_h2_scf(grid_level)``: a real in-process ``dm21.scf`` of H2/STO-3G with DM21; returns (results, node)."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_dm21.calculations.scf import DM21ScfCalculation

    def run(grid_level: int):
        structure = orm.StructureData(pbc=(False, False, False))
        for symbol, position in [('H', (0.0, 0.0, 0.0)), ('H', (0.0, 0.0, 0.74))]:
            structure.append_atom(symbols=symbol, position=position)
        results, node = run_get_node(
            DM21ScfCalculation,
            code=python_code,
            structure=structure,
            parameters=orm.Dict({'basis': 'sto-3g', 'grid_level': grid_level}),
            checkpoint=checkpoint_node,
            metadata={'options': {'max_wallclock_seconds': 600}},
        )
        assert node.is_finished_ok, (node.exit_status, node.exit_message)
        return results, node

    return run


# --- private AiiDA set-ups in subprocesses (backend_driver.py) ----------------------------------------------


def _driver_module():
    spec = importlib.util.spec_from_file_location('dm21_backend_driver', Path(__file__).with_name('backend_driver.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_DRIVER = _driver_module()
IsolatedAiida = _DRIVER.IsolatedAiida
PG, RABBITMQ = _DRIVER.PG, _DRIVER.RABBITMQ


@pytest.fixture
def isolated(tmp_path):
    """``isolated(profile)``: an :class:`IsolatedAiida` under ``tmp_path``; prints the time of each command after."""
    made = []

    def factory(profile: str):
        made.append(IsolatedAiida(tmp_path / 'aiida', profile))
        return made[-1]

    yield factory
    for aiida in made:
        print('\n'.join(f'{seconds:6.1f} s  {command}' for command, seconds in aiida.timings))


def _services_problem() -> str | None:
    """Why PostgreSQL or RabbitMQ cannot be used here, or ``None``."""
    try:
        import psycopg
    except ImportError:
        return 'psycopg is not installed'
    try:
        psycopg.connect(dbname='postgres', connect_timeout=5, **PG).close()
    except psycopg.Error as exc:
        return f'PostgreSQL is not reachable at {PG["host"]}:{PG["port"]} as {PG["user"]}: {exc}'
    try:
        socket.create_connection(RABBITMQ, timeout=5).close()
    except OSError as exc:
        return f'RabbitMQ is not reachable at {RABBITMQ[0]}:{RABBITMQ[1]}: {exc}'
    return None


def _rabbitmqctl(*args: str) -> bool:
    if shutil.which('rabbitmqctl') is None:
        return False
    done = subprocess.run(['rabbitmqctl', *args], capture_output=True, text=True, timeout=60, check=False)
    return done.returncode == 0


@pytest.fixture
def services():
    """A new PostgreSQL user and database and a RabbitMQ vhost (default vhost if ``rabbitmqctl`` cannot make
    one), all named ``dm21_test_<random>``; dropped afterwards."""
    problem = _services_problem()
    if problem:
        message = f'PostgreSQL + RabbitMQ test needs both services (start them with .ci/services.sh): {problem}'
        if os.environ.get('AIIDA_DM21_REQUIRE_SERVICES'):
            pytest.fail(message)  # CI starts the services: a skip there would hide a broken set-up
        pytest.skip(message)
    import psycopg
    from psycopg import sql

    name = f'dm21_test_{uuid.uuid4().hex[:10]}'
    password = uuid.uuid4().hex
    vhost = ''
    try:  # everything below is undone in `finally`, also after a partial setup
        with psycopg.connect(dbname='postgres', autocommit=True, **PG) as connection:
            connection.execute(sql.SQL('CREATE USER {} WITH PASSWORD {}').format(sql.Identifier(name), password))
            connection.execute(
                sql.SQL("CREATE DATABASE {} OWNER {} ENCODING 'UTF8' TEMPLATE template0").format(
                    sql.Identifier(name), sql.Identifier(name)
                )
            )
        if _rabbitmqctl('add_vhost', name):
            vhost = name
            if not _rabbitmqctl('set_permissions', '-p', vhost, 'guest', '.*', '.*', '.*'):
                _rabbitmqctl('delete_vhost', vhost)
                vhost = ''
        yield {'name': name, 'password': password, 'vhost': vhost}
    finally:
        if vhost:
            _rabbitmqctl('delete_vhost', vhost)
        with psycopg.connect(dbname='postgres', autocommit=True, **PG) as connection:
            connection.execute(sql.SQL('DROP DATABASE IF EXISTS {} WITH (FORCE)').format(sql.Identifier(name)))
            connection.execute(sql.SQL('DROP USER IF EXISTS {}').format(sql.Identifier(name)))


@pytest.fixture
def cli():
    """``cli(*args)``: run ``aiida-dm21 ARGS`` in this process (click's CliRunner); returns click's Result."""
    from click.testing import CliRunner

    from aiida_dm21.cli import main

    runner = CliRunner()
    return lambda *args: runner.invoke(main, [str(arg) for arg in args])
