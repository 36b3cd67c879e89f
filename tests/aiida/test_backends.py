"""``dm21.scf`` on the storage backends and brokers a user can choose, each with a real H2/STO-3G run.

(a) ``core.sqlite_dos`` without a broker, ``engine.run`` in this process: what ``verdi presto`` gives when no
    service is needed (the in-process test profile of ``conftest.py`` is exactly that).
(b) ``core.sqlite_dos`` + the ZeroMQ broker (``verdi presto --use-zeromq``), ``submit`` to the daemon.
(c) ``core.psql_dos`` + RabbitMQ (``verdi profile setup core.psql_dos``), ``submit`` to the daemon.

(b) and (c) have a profile and a daemon of their own: they run in subprocesses under a private ``AIIDA_PATH``
(``backend_driver.py``, the fixtures ``isolated`` and ``services`` of ``conftest.py``), so they never touch the
in-process profile.  (c) needs PostgreSQL at 127.0.0.1:5432 (trust authentication for the user ``postgres``) and
RabbitMQ at 127.0.0.1:5672 (guest/guest), as started by ``.ci/services.sh``; it creates a database, a user and a
RabbitMQ vhost with unique names and removes them after.
"""

from __future__ import annotations

import uuid

import pytest

pytest.importorskip('aiida.engine')


pytestmark = [pytest.mark.aiida, pytest.mark.slow]

H2 = [('H', (0.0, 0.0, 0.0)), ('H', (0.0, 0.0, 0.74))]
OUTPUTS = ['output_density', 'output_parameters', 'remote_folder', 'retrieved']


@pytest.fixture(scope='module')
def reference_energy(dm21_checkpoint_file) -> float:
    """H2/STO-3G, grid level 0, with the core ``KS`` in this process."""
    from pyscf import gto

    from aiida_dm21.functional.scf import KS

    mol = gto.M(atom=H2, basis='sto-3g', unit='Angstrom', verbose=0)
    mf = KS(mol, dm21_checkpoint_file)
    mf.grids.level = 0
    return float(mf.kernel())


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
    aiida.setup_sqlite_zeromq()
    with aiida.daemon():
        result = aiida.driver('submit', '--checkpoint', str(dm21_checkpoint_file), '--wait', '240')
        _check(result, reference_energy, 'core.sqlite_dos', 'core.zeromq', aiida.logs())


# --- (c) PostgreSQL + RabbitMQ, daemon -----------------------------------------------------------------------


def test_postgres_rabbitmq_daemon(isolated, services, dm21_checkpoint_file, reference_energy):
    """``core.psql_dos`` + ``core.rabbitmq``; submitted before the daemon starts (the task waits in RabbitMQ)."""
    aiida = isolated(services['name'].replace('_', '-'))
    aiida.setup_psql_rabbitmq(services)
    submitted = aiida.driver('submit', '--checkpoint', str(dm21_checkpoint_file))
    with aiida.daemon():
        result = aiida.driver('wait', '--pk', str(submitted['pk']), '--timeout', '240')
        _check(result, reference_energy, 'core.psql_dos', 'core.rabbitmq', aiida.logs())
