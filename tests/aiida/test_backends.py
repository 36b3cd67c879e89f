"""``dm21.scf`` on the storage backends and brokers a user can choose, each with a real H2/STO-3G run.

(a) ``core.sqlite_dos`` without a broker, ``engine.run`` in this process: what ``verdi presto`` gives when no
    service is needed (the in-process test profile of ``conftest.py`` is exactly that).
(b) ``core.sqlite_dos`` + the ZeroMQ broker (``verdi presto --use-zeromq``), ``submit`` to the daemon.
(c) ``core.psql_dos`` + RabbitMQ (``verdi profile setup core.psql_dos``), ``submit`` to the daemon.

(b) and (c) have a profile and a daemon of their own: they run in subprocesses under a private ``AIIDA_PATH``
(``backend_driver.py``), so they never touch the in-process profile.  (c) needs PostgreSQL at 127.0.0.1:5432
(trust authentication for the user ``postgres``) and RabbitMQ at 127.0.0.1:5672 (guest/guest), as started by
``.ci/services.sh``; it creates a database, a user and a RabbitMQ vhost with unique names and removes them after.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

pytest.importorskip('aiida.engine')


pytestmark = [pytest.mark.aiida, pytest.mark.slow]

H2 = [('H', (0.0, 0.0, 0.0)), ('H', (0.0, 0.0, 0.74))]
OUTPUTS = ['output_density', 'output_parameters', 'remote_folder', 'retrieved']
PG = {'host': '127.0.0.1', 'port': 5432, 'user': 'postgres'}
RABBITMQ = ('127.0.0.1', 5672)


def _driver_module():
    spec = importlib.util.spec_from_file_location('dm21_backend_driver', Path(__file__).with_name('backend_driver.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IsolatedAiida = _driver_module().IsolatedAiida


@pytest.fixture(scope='module')
def reference_energy(dm21_checkpoint_file) -> float:
    """H2/STO-3G, grid level 0, with the core ``KS`` in this process."""
    from pyscf import gto

    from aiida_dm21.functional.scf import KS

    mol = gto.M(atom=H2, basis='sto-3g', unit='Angstrom', verbose=0)
    mf = KS(mol, dm21_checkpoint_file)
    mf.grids.level = 0
    return float(mf.kernel())


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


def _check(result: dict, reference: float, storage: str, broker: str, logs: str) -> None:
    assert result['process_state'] == 'finished', f'{result}\n{logs}'
    assert result['exit_status'] == 0, f'{result}\n{logs}'
    assert result['storage_backend'] == storage
    assert result['broker_backend'] == broker
    assert result['outputs'] == OUTPUTS
    assert result['converged'] is True
    assert result['functional_sha256'] == result['checkpoint_sha256']
    assert abs(result['e_tot'] - reference) < 1e-6


# --- (a) sqlite, no broker, in process -----------------------------------------------------------------------


def test_sqlite_no_broker_run_in_process(aiida_profile, run_h2_scf, checkpoint_node, reference_energy):
    """The default of ``verdi presto`` without services: SQLite storage, ``engine.run`` in this process, no broker."""
    assert aiida_profile.storage_backend == 'core.sqlite_dos'
    assert aiida_profile.process_control_backend is None
    results, _ = run_h2_scf(grid_level=0)
    assert sorted(results) == ['output_density', 'output_parameters', 'remote_folder', 'retrieved']
    assert abs(results['output_parameters']['e_tot'] - reference_energy) < 1e-6


# --- (b) sqlite + ZeroMQ, daemon -----------------------------------------------------------------------------


def test_sqlite_zeromq_daemon(isolated, dm21_checkpoint_file, reference_energy):
    """``verdi presto --use-zeromq``; the ZeroMQ broker runs inside the daemon, so the daemon starts first."""
    aiida = isolated(f'dm21-zmq-{uuid.uuid4().hex[:8]}')
    aiida.verdi('presto', '--non-interactive', '--use-zeromq', '--profile-name', aiida.profile, '--email', 'dm21@test')
    with aiida.daemon():
        result = aiida.driver('submit', '--checkpoint', str(dm21_checkpoint_file), '--wait', '240')
        _check(result, reference_energy, 'core.sqlite_dos', 'core.zeromq', aiida.logs())


# --- (c) PostgreSQL + RabbitMQ, daemon -----------------------------------------------------------------------


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


def test_postgres_rabbitmq_daemon(isolated, services, dm21_checkpoint_file, reference_energy):
    """``core.psql_dos`` + ``core.rabbitmq``; submitted before the daemon starts (the task waits in RabbitMQ)."""
    aiida = isolated(services['name'].replace('_', '-'))
    aiida.verdi(
        'profile', 'setup', 'core.psql_dos', '--non-interactive', '--profile-name', aiida.profile,
        '--set-as-default', '--email', 'dm21@test', '--first-name', 'DM21', '--last-name', 'Test',
        '--institution', 'aiida-dm21', '--database-hostname', PG['host'], '--database-port', str(PG['port']),
        '--database-username', services['name'], '--database-password', services['password'],
        '--database-name', services['name'], '--repository-uri', (aiida.root / 'repository').as_uri(),
        '--broker', 'core.rabbitmq',
    )  # fmt: skip
    if services['vhost']:  # `--broker core.rabbitmq` above took the defaults (guest@127.0.0.1:5672, vhost '/')
        aiida.verdi(
            'profile', 'configure-broker', 'core.rabbitmq', aiida.profile, '--non-interactive', '--force',
            '--broker-protocol', 'amqp', '--broker-username', 'guest', '--broker-password', 'guest',
            '--broker-host', RABBITMQ[0], '--broker-port', str(RABBITMQ[1]),
            '--broker-virtual-host', services['vhost'],
        )  # fmt: skip
    submitted = aiida.driver('submit', '--checkpoint', str(dm21_checkpoint_file))
    with aiida.daemon():
        result = aiida.driver('wait', '--pk', str(submitted['pk']), '--timeout', '240')
        _check(result, reference_energy, 'core.psql_dos', 'core.rabbitmq', aiida.logs())
