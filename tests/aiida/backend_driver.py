"""Driver run as a subprocess by ``test_backends.py`` and ``test_archive.py``, in a profile of its own.

It is executed with the test session's Python under a private ``AIIDA_PATH`` (never the in-process test
profile) and loads that folder's default profile.  Each command prints one JSON object as the last line of
its stdout::

    python backend_driver.py submit --checkpoint DM21.safetensors [--grid-level 1] [--wait TIMEOUT]  # -> {"pk" ...}
    python backend_driver.py wait --pk PK [--timeout 90]          # -> state, exit status, outputs, e_tot ...
    python backend_driver.py inspect-import --uuid UUID           # -> links, checkpoint attributes, re-run energy

``submit`` sets up what a fresh profile lacks (a ``localhost`` computer with ``core.local``/``core.direct`` and
an ``InstalledCode`` ``dm21-python`` whose executable is this Python), stores the checkpoint and submits one
``dm21.scf`` of H2/STO-3G to the daemon (``aiida.engine.submit``).

The tests import :class:`IsolatedAiida` from this file (by path): the test-side handle of such a private
``AIIDA_PATH``, which runs ``verdi``, this driver and the daemon there and always stops the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

H2 = [('H', (0.0, 0.0, 0.0)), ('H', (0.0, 0.0, 0.74))]


def _load():
    from aiida import load_profile

    return load_profile()


def _localhost():
    """The ``localhost`` computer (``verdi presto`` makes one; a ``verdi profile setup`` profile has none)."""
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        computer = orm.load_computer('localhost')
    except NotExistent:
        workdir = _config_dir() / 'scratch'
        computer = orm.Computer(
            label='localhost',
            hostname='localhost',
            transport_type='core.local',
            scheduler_type='core.direct',
            workdir=str(workdir),
        ).store()
        computer.set_default_mpiprocs_per_machine(1)
    if not computer.is_configured:
        computer.configure(safe_interval=0)
    computer.set_minimum_job_poll_interval(0.5)
    return computer


def _config_dir() -> Path:
    from aiida.manage.configuration import get_config

    return Path(get_config().dirpath)


def _code(computer):
    from aiida import orm
    from aiida.common.exceptions import NotExistent

    try:
        return orm.load_code('dm21-python@localhost')
    except NotExistent:
        return orm.InstalledCode(
            label='dm21-python',
            computer=computer,
            filepath_executable=sys.executable,
            default_calc_job_plugin='dm21.scf',
        ).store()


def submit(args) -> dict:
    _load()
    from aiida import orm
    from aiida.engine import submit as submit_process
    from aiida.plugins import CalculationFactory, DataFactory

    computer = _localhost()
    structure = orm.StructureData(pbc=(False, False, False))
    for symbol, position in H2:
        structure.append_atom(symbols=symbol, position=position)
    builder = CalculationFactory('dm21.scf').get_builder()
    builder.code = _code(computer)
    builder.structure = structure
    builder.checkpoint = DataFactory('dm21.checkpoint').get_or_create(args.checkpoint)
    builder.parameters = orm.Dict({'basis': 'sto-3g', 'grid_level': args.grid_level})
    builder.metadata.options.max_wallclock_seconds = 600
    node = submit_process(builder)
    result = {'pk': node.pk, 'uuid': node.uuid}
    if args.wait is not None:
        result.update(_wait(node.pk, args.wait))
    return result


def _state(pk: int) -> tuple[str | None, int | None]:
    """Process state and exit status read with a fresh query (another process, the daemon, writes them)."""
    from aiida import orm
    from aiida.manage import get_manager

    session = get_manager().get_profile_storage().get_session()
    session.rollback()  # end the read transaction so the next query sees the daemon's commits
    builder = orm.QueryBuilder().append(
        orm.ProcessNode, filters={'id': pk}, project=['attributes.process_state', 'attributes.exit_status']
    )
    state, exit_status = builder.one()
    return state, exit_status


def wait(args) -> dict:
    _load()
    return _wait(args.pk, args.timeout)


def _wait(pk: int, timeout: float) -> dict:
    """Wait until the process ``pk`` is terminated (or ``timeout`` s have passed); what it produced."""
    from aiida import orm

    start = time.monotonic()
    state = None
    while time.monotonic() - start < timeout:
        state, _ = _state(pk)
        if state in ('finished', 'excepted', 'killed'):
            break
        time.sleep(0.5)
    waited = time.monotonic() - start
    node = orm.load_node(pk)
    result = {
        'process_state': state,
        'waited_s': round(waited, 1),
        'exit_status': node.exit_status,
        'exit_message': node.exit_message,
        'outputs': sorted(node.base.links.get_outgoing().all_link_labels()),
        'storage_backend': node.backend.profile.storage_backend,
        'broker_backend': node.backend.profile.process_control_backend,
        'checkpoint_sha256': node.inputs.checkpoint.weights_sha256,
    }
    if 'output_parameters' in node.outputs:
        parameters = node.outputs.output_parameters.get_dict()
        result['e_tot'] = parameters['e_tot']
        result['converged'] = parameters['converged']
        result['functional_sha256'] = parameters['functional']['weights_sha256']
    return result


def _energy_from_inputs(calc, network) -> float:
    """The core ``KS(mol, network)`` on the molecule and settings of a ``dm21.scf`` node."""
    from pyscf import gto

    from aiida_dm21.functional.scf import KS

    structure = calc.inputs.structure
    parameters = calc.inputs.parameters.get_dict()
    atoms = [(site.kind_name, site.position) for site in structure.sites]
    spin = parameters.get('multiplicity', 1) - 1
    mol = gto.M(atom=atoms, basis=parameters['basis'], charge=parameters.get('charge', 0), spin=spin, unit='Angstrom')
    mol.verbose = 0
    mf = KS(mol, network)
    mf.grids.level = parameters.get('grid_level', 3)
    return float(mf.kernel())


def inspect_import(args) -> dict:
    """What an imported ``dm21.scf`` node looks like in this (fresh) profile."""
    _load()
    from aiida import orm

    calc = orm.load_node(args.uuid)
    checkpoint = calc.inputs.checkpoint
    incoming = {(entry.link_label, entry.node.uuid) for entry in calc.base.links.get_incoming().all()}
    outgoing = {entry.link_label: entry.node.uuid for entry in calc.base.links.get_outgoing().all()}
    content = checkpoint.get_content(mode='rb')
    network = checkpoint.load_network()
    return {
        'n_nodes': orm.QueryBuilder().append(orm.Node).count(),
        'process_type': calc.process_type,
        'exit_status': calc.exit_status,
        'incoming': sorted(incoming),
        'outgoing': outgoing,
        'checkpoint_class': type(checkpoint).__name__,
        'checkpoint_uuid': checkpoint.uuid,
        'checkpoint_attributes': checkpoint.base.attributes.all,
        'checkpoint_file_sha256': hashlib.sha256(content).hexdigest(),
        'n_network_parameters': sum(p.numel() for p in network.parameters()),
        'archived_e_tot': calc.outputs.output_parameters['e_tot'],
        'rerun_e_tot': _energy_from_inputs(calc, network),
    }


# --- the test side: a private AIIDA_PATH driven through subprocesses ---------------------------------------


class IsolatedAiida:
    """A private ``AIIDA_PATH`` (``root``) whose profile ``profile`` is used only through subprocesses.

    ``verdi`` runs as ``python -m aiida`` with this Python; ``PATH`` starts with this Python's folder so that the
    daemon (which launches ``verdi`` workers by name) uses the same environment.  ``AIIDA_PROFILE`` of the caller
    is dropped: the subprocesses see only ``root``'s configuration, never the in-process test profile.
    """

    def __init__(self, root: Path, profile: str) -> None:
        self.root = Path(root)
        self.profile = profile
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = {key: value for key, value in os.environ.items() if key not in ('AIIDA_PATH', 'AIIDA_PROFILE')}
        self.env['AIIDA_PATH'] = str(self.root)
        self.env['PATH'] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get('PATH', '')])
        self.env['PYTHONUNBUFFERED'] = '1'
        self.timings: list[tuple[str, float]] = []  # (command, seconds), for the record

    @property
    def config_dir(self) -> Path:
        return self.root / '.aiida'

    def run(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout
        )
        label = ' '.join(args).replace(str(Path(__file__).resolve()), 'backend_driver.py')
        self.timings.append((label, round(time.monotonic() - start, 1)))
        if check and done.returncode != 0:
            raise AssertionError(
                f'`{" ".join(args)}` failed ({done.returncode})\n--- stdout\n{done.stdout[-3000:]}'
                f'\n--- stderr\n{done.stderr[-3000:]}\n{self.logs()}'
            )
        return done

    def verdi(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        return self.run('-m', 'aiida', *args, timeout=timeout, check=check)

    def driver(self, *args: str, timeout: float = 300) -> dict:
        """Run a command of this driver in the profile; its JSON answer."""
        done = self.run(str(Path(__file__).resolve()), *args, timeout=timeout)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def logs(self, tail: int = 4000) -> str:
        """The last lines of the daemon's logs (for failure messages)."""
        parts = []
        for path in sorted((self.config_dir / 'daemon' / 'log').glob('*.log')):
            parts.append(f'--- {path.name}\n{path.read_text(errors="replace")[-tail:]}')
        return '\n'.join(parts)

    # --- the daemon --------------------------------------------------------------------------------------------

    def _daemon_processes(self) -> list:
        """The circus process of this profile's daemon and its descendants (workers, ZeroMQ broker)."""
        try:
            import psutil
        except ImportError:  # pragma: no cover (circus, hence aiida-core, depends on psutil)
            return []
        pid_file = self.config_dir / 'daemon' / f'circus-{self.profile}.pid'
        try:
            circus = psutil.Process(int(pid_file.read_text().strip()))
            return [circus, *circus.children(recursive=True)]
        except (OSError, ValueError, psutil.Error):
            return []

    @contextlib.contextmanager
    def daemon(self, workers: int = 1) -> t.Iterator[float]:
        """``verdi daemon start``; yields the seconds it took.  Always ``verdi daemon stop`` on exit, and ends any
        process of this daemon that is still alive after it (by PID, recorded while it ran)."""
        processes: list = []
        sockets_file = self.config_dir / 'daemon' / f'circus-{self.profile}.sockets'
        try:
            start = time.monotonic()
            self.verdi('-p', self.profile, 'daemon', 'start', '--timeout', '60', str(workers), timeout=120)
            elapsed = time.monotonic() - start
            processes = self._daemon_processes()
            yield elapsed
        finally:
            processes += [p for p in self._daemon_processes() if p not in processes]
            # circus's sockets live in a temporary folder outside AIIDA_PATH (path length); it stays behind
            sockets = Path(sockets_file.read_text().strip()) if sockets_file.is_file() else None
            self.verdi('-p', self.profile, 'daemon', 'stop', '--timeout', '60', timeout=120, check=False)
            _end_processes(processes)
            if sockets is not None and sockets.parent == Path(tempfile.gettempdir()):
                shutil.rmtree(sockets, ignore_errors=True)


def _end_processes(processes: list, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, the given ``psutil`` processes that are still running (ours: the test's daemon)."""
    if not processes:
        return
    import psutil

    alive = [p for p in processes if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest='command', required=True)
    one = commands.add_parser('submit')
    one.add_argument('--checkpoint', required=True)
    one.add_argument('--grid-level', type=int, default=0)
    one.add_argument('--wait', type=float, metavar='TIMEOUT', help='then wait for the process, as `wait` does')
    one.set_defaults(func=submit)
    one = commands.add_parser('wait')
    one.add_argument('--pk', type=int, required=True)
    one.add_argument('--timeout', type=float, default=90.0)
    one.set_defaults(func=wait)
    one = commands.add_parser('inspect-import')
    one.add_argument('--uuid', required=True)
    one.set_defaults(func=inspect_import)
    args = parser.parse_args(argv)
    result = args.func(args)
    print(json.dumps(result, default=str))
    return 0


if __name__ == '__main__':
    sys.exit(main())
