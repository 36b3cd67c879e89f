"""``aiida-dm21 scf launch``: a ``dm21.scf`` workchain from the command line.

STRUCTURE is a molecule name of :data:`aiida_dm21.cli.main.MOLECULES`, an xyz file or the pk of a StructureData;
the functional is a checkpoint node pk, the name of installed weights (stored as a ``dm21.checkpoint`` node
when needed) or a ``.safetensors`` file.  Without ``--daemon`` the workchain runs in this process and the
energy is printed; with it, the workchain is submitted to the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import typing as t
from pathlib import Path

import click
from rich.console import Console

from .aiida_cmds import PROFILE, load_checkpoint, stored_checkpoints
from .aiida_support import console, ensure_code, load_profile

if t.TYPE_CHECKING:
    from aiida import orm

    from ..data.checkpoint import DM21CheckpointData

__all__ = (
    'Interrupted',
    'resolve_code',
    'resolve_functional',
    'resolve_structure',
    'run_checked',
    'run_in_foreground',
    'scf',
    'submit_to_daemon',
)


def read_xyz(path: Path) -> list[tuple[str, list[float]]]:
    """Atoms of an xyz file: an optional count line and comment line, then ``symbol x y z`` (Angstrom).

    :raises click.ClickException: a line that is not ``symbol x y z``, or no atoms at all.
    """
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f'{path} is not a readable xyz text file: {exc}') from exc
    if lines and lines[0].strip().isdigit():
        lines = lines[2:]
    atoms = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            symbol = fields[0]
            position = [float(x) for x in fields[1:4]]
            if len(position) != 3:
                raise ValueError('fewer than three coordinates')
        except ValueError as exc:
            message = f'{path}: atom line {number} {line.strip()!r} is not "symbol x y z": {exc}'
            raise click.ClickException(message) from exc
        atoms.append((symbol.capitalize() if symbol.isalpha() else symbol, position))
    if not atoms:
        raise click.ClickException(f'{path}: no atoms')
    return atoms


def resolve_structure(spec: str) -> tuple[orm.StructureData, int | None]:
    """The molecule named by ``spec`` and its default multiplicity (``None`` if it has none).

    ``spec`` is a name of :data:`~aiida_dm21.cli.main.MOLECULES` (case-insensitive), an xyz file or the pk of a
    stored StructureData, tried in that order.

    :raises click.ClickException: none of these, or a pk of another node type.
    """
    from aiida.common.exceptions import UnsupportedSpeciesError

    from ..workflows.reference_data import structure_from_atom, structure_from_atoms
    from .main import MOLECULES

    if spec.lower() in MOLECULES:
        entry = MOLECULES[spec.lower()]
        return structure_from_atom(entry['atom']), entry['spin'] + 1
    path = Path(spec)
    if path.is_file():
        try:
            return structure_from_atoms(read_xyz(path)), None
        except UnsupportedSpeciesError as exc:
            raise click.ClickException(f'{path}: {exc}') from exc
    if spec.isdigit():
        from aiida import orm
        from aiida.common.exceptions import NotExistent

        try:
            node = orm.load_node(int(spec))
        except NotExistent as exc:
            raise click.ClickException(f'no node with pk {spec} for the structure') from exc
        if not isinstance(node, orm.StructureData):
            raise click.ClickException(f'node {spec} is a {type(node).__name__}, not a StructureData')
        return node, None
    known = ', '.join(MOLECULES)
    raise click.ClickException(
        f'unknown structure {spec!r}: not a molecule name ({known}), not an existing xyz file, not a StructureData pk'
    )


def resolve_functional(spec: str) -> DM21CheckpointData:
    """The checkpoint node for ``spec``: a node pk or UUID, a ``.safetensors`` file, or the name of a functional.

    A name is looked up in the weights folder (``aiida-dm21 weights fetch`` puts DeepMind's there; the file is
    stored as a node, or the node with the same weights is reused), then among stored nodes of that name.

    :raises click.ClickException: a missing pk, an unreadable file, or a name that is neither installed nor stored.
    """
    from ..data.checkpoint import DM21CheckpointData, DM21CheckpointError
    from ..functional.checkpoint import weights_dir

    path = Path(spec)
    if spec.endswith('.safetensors') or path.is_file():
        try:
            return DM21CheckpointData.get_or_create(path)
        except DM21CheckpointError as exc:
            raise click.ClickException(str(exc)) from exc
    if spec.isdigit() or (len(spec) >= 8 and all(c in '0123456789abcdef-' for c in spec.lower())):
        return load_checkpoint(spec)
    installed = weights_dir() / f'{spec}.safetensors'
    if installed.is_file():
        try:
            return DM21CheckpointData.get_or_create(installed)
        except DM21CheckpointError as exc:
            raise click.ClickException(str(exc)) from exc
    stored = stored_checkpoints(spec)
    distinct = {node.weights_sha256: node for node in stored}
    if len(distinct) == 1:
        return stored[0]
    if len(distinct) > 1:
        pks = ', '.join(str(node.pk) for node in distinct.values())
        raise click.ClickException(f'several checkpoints are called {spec!r} (pks {pks}): give a pk')
    raise click.ClickException(
        f'functional {spec!r} is not installed ({installed} does not exist) and no stored checkpoint has that name: '
        f'run `aiida-dm21 weights fetch {spec}`, or give a .safetensors file or a checkpoint pk'
    )


def resolve_code(spec: str | None):
    """The code to run with: ``spec`` (label, ``label@computer`` or pk) or ``dm21-python@localhost`` (created)."""
    if spec is None:
        return ensure_code()
    from aiida import orm
    from aiida.common.exceptions import MultipleObjectsError, NotExistent

    try:
        return orm.load_code(spec)
    except (NotExistent, MultipleObjectsError, ValueError) as exc:
        raise click.ClickException(f'no code {spec!r}: {exc} (see `verdi code list`)') from exc


@click.group('scf')
def scf() -> None:
    """DM21 SCF calculations as AiiDA workchains (dm21.scf)."""


@scf.command('launch')
@click.argument('structure')
@click.option(
    '--functional',
    '-f',
    default='DM21',
    show_default=True,
    help='Installed weights name (DM21, DM21m ...), a .safetensors file, or a dm21.checkpoint pk.',
)
@click.option('--basis', '-b', default=None, help="PySCF basis name (default: the protocol's).")
@click.option(
    '--protocol',
    default='balanced',
    show_default=True,
    help='fast, balanced or stringent: basis, grid and thresholds (aiida_dm21/workflows/protocols/scf.yaml).',
)
@click.option('--charge', default=0, show_default=True, type=int, help='Total charge.')
@click.option(
    '--multiplicity',
    default=None,
    type=click.IntRange(min=1),
    help='2S + 1 (default: from the molecule name, else 1 or 2 by electron count).',
)
@click.option('--grid-level', default=None, type=click.IntRange(0, 9), help="Grid level (default: the protocol's).")
@click.option('--walltime', default=None, type=click.IntRange(min=1), help='max_wallclock_seconds of each job.')
@click.option('--device', default=None, help='cpu, cuda or cuda:N (checked on the compute node; default cpu).')
@click.option('--code', 'code_spec', default=None, help='Code label or pk (default: dm21-python@localhost, created).')
@click.option('--daemon', is_flag=True, help='Submit to the AiiDA daemon instead of running in this process.')
@PROFILE
def launch(
    structure: str,
    functional: str,
    basis: str | None,
    protocol: str,
    charge: int,
    multiplicity: int | None,
    grid_level: int | None,
    walltime: int | None,
    device: str | None,
    code_spec: str | None,
    daemon: bool,
    profile: str | None,
) -> None:
    """Run a dm21.scf workchain on STRUCTURE: a molecule name (water, h2, h, ch3, ne), an xyz file or a
    StructureData pk."""
    load_profile(profile)
    from ..workflows.protocols import ProtocolError
    from ..workflows.scf import DM21ScfWorkChain

    molecule, default_multiplicity = resolve_structure(structure)
    checkpoint = resolve_functional(functional)
    code = resolve_code(code_spec)
    parameters: dict[str, t.Any] = {}
    if basis is not None:
        parameters['basis'] = basis
    if grid_level is not None:
        parameters['grid_level'] = grid_level
    if device is not None:
        parameters['device'] = device
    overrides: dict[str, t.Any] = {'scf': {'parameters': parameters}} if parameters else {}
    try:
        builder = DM21ScfWorkChain.get_builder_from_protocol(
            code,
            molecule,
            checkpoint,
            protocol=protocol,
            overrides=overrides,
            charge=charge,
            # a named molecule's multiplicity is for its neutral state; charged: from the electron count
            multiplicity=multiplicity if multiplicity is not None else (default_multiplicity if not charge else None),
            options={'max_wallclock_seconds': walltime} if walltime else None,
        )
    except ProtocolError as exc:
        raise click.ClickException(str(exc)) from exc
    except ValueError as exc:  # an input port refused a value when the builder was filled (e.g. the structure)
        message = str(exc).removeprefix('invalid attribute value ')
        raise click.ClickException(f'the inputs were refused: {message}') from exc
    parameters = builder.scf.parameters.get_dict()
    what = f'{checkpoint.name}/{parameters["basis"]} {molecule.get_formula()} ({protocol})'

    if daemon:
        submit_to_daemon(builder, 'dm21.scf', what)
        return
    results, node = run_checked(builder, 'dm21.scf', what)
    output = results['output_parameters'].get_dict()
    Console().print(
        f'dm21.scf<{node.pk}> {what}: E = {output["e_tot"]:.10f} Ha ({output["e_tot_ev"]:.6f} eV), '
        f'{output.get("scf_type")}, {output.get("cycles")} cycles in the last of '
        f'{len(node.called)} run(s)',
        soft_wrap=True,
    )


def run_checked(builder, label: str, what: str) -> tuple[dict[str, t.Any], orm.ProcessNode]:
    """Run ``builder`` in this process (:func:`run_in_foreground`) with its reports shown; its outputs and node.

    ``label`` (``dm21.scf``) and ``what`` (a short description) go into the status line and the messages.

    :raises click.ClickException: the inputs were refused, or the process failed (exit status and message).
    :raises Interrupted: it was killed by Ctrl-C or SIGTERM (exit status 130).
    """
    from aiida.common.exceptions import ValidationError

    logging.getLogger('aiida').setLevel('REPORT')  # the workchain's reports, e.g. what a restart changes
    try:
        with console.status(f'{label} {what}: running in this process ...'):
            results, node = run_in_foreground(builder)
    except (ValueError, ValidationError) as exc:  # the inputs were refused before anything ran
        raise click.ClickException(f'the inputs were refused: {exc}') from exc
    if node.is_killed:
        raise Interrupted(
            f'interrupted: {label}<{node.pk}> was killed, with the calculations it had started; '
            f'see `verdi process report {node.pk}`'
        )
    if not node.is_finished_ok:
        raise click.ClickException(
            f'{label}<{node.pk}> failed: exit {node.exit_status} {node.exit_message}; '
            f'see `verdi process report {node.pk}`'
        )
    return results, node


class Interrupted(click.ClickException):
    """The foreground run was interrupted (Ctrl-C or SIGTERM): exit status 130, as for a shell's SIGINT."""

    exit_code = 130


#: Seconds to wait for a calculation that was in the middle of a step when it was told to die.
KILL_TIMEOUT = 30.0


def run_in_foreground(builder) -> tuple[dict[str, t.Any], orm.ProcessNode]:
    """Run ``builder`` in this process, like :func:`aiida.engine.run_get_node`; an interrupt kills it all.

    AiiDA's own foreground run kills the process it runs from inside the SIGINT handler, which can land in the
    middle of a database transaction, and without a broker (a ``verdi presto`` profile, or any profile with no
    daemon connection) it cannot reach the processes that one started: the ``dm21.scf`` CalcJob stayed *waiting*
    forever and its job kept running.  Here Ctrl-C (or SIGTERM) only schedules the kill on the event loop, where
    it runs between two steps; every process the runner starts is recorded, and once the workchain is killed the
    unfinished ones are killed too (AiiDA cancels their scheduler jobs).  A node that still is not terminated
    then is marked killed and sealed.
    """
    import signal

    from aiida.engine.utils import loop_scope
    from aiida.manage import get_manager
    from plumpy.exceptions import KilledError

    runner = get_manager().get_runner()
    started: list[t.Any] = []
    instantiate = runner.instantiate_process

    def recording(process, **inputs):
        instance = instantiate(process, **inputs)
        started.append(instance)
        return instance

    runner.instantiate_process = recording  # type: ignore[method-assign]
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with loop_scope(runner.loop):
            process = runner.instantiate_process(builder)
            message = f'Killed: {process.node.process_label}<{process.node.pk}> was interrupted'

            def kill_root() -> None:
                if not process.has_terminated() and not process.is_killing:
                    console.print(f'[red]interrupted[/red]: killing {process.node.process_label}<{process.node.pk}>')
                    process.kill(msg_text=message)

            def on_signal(_signum: int, _frame: t.Any) -> None:
                runner.loop.call_soon_threadsafe(kill_root)  # never inside the handler: it may be mid-transaction

            for signum in handlers:
                signal.signal(signum, on_signal)
            with contextlib.suppress(KilledError):  # what execute() raises for a killed process
                process.execute()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        del runner.instantiate_process  # the class's method again
    if process.node.is_killed:
        kill_started(runner, started, message)
    return process.outputs, process.node


def kill_started(runner, processes: t.Sequence[t.Any], message: str) -> None:
    """Kill every process instance of ``processes`` that has not terminated, then mark any leftover node killed.

    AiiDA's ``Process.kill`` of a CalcJob cancels its scheduler job through tasks on the runner's event loop, so it
    is called from a coroutine on that loop (with plumpy's sync/async bridge where plumpy has one).
    """
    import asyncio

    from aiida.engine import ProcessState

    try:
        from plumpy.greenback_bridge import run_with_portal
    except ImportError:  # plumpy < 0.26 nests event loops instead: a plain call from a coroutine

        async def run_with_portal(fn, *args, **kwargs):  # type: ignore[misc]
            return fn(*args, **kwargs)

    async def kill(process) -> None:
        result = await run_with_portal(process.kill, msg_text=message)
        if asyncio.isfuture(result):  # it was in the middle of a step: wait for it to stop, a while
            await asyncio.wait_for(asyncio.shield(result), KILL_TIMEOUT)

    for process in processes:
        if process.has_terminated():
            continue
        try:
            runner.run_until_complete(kill(process))
        except Exception as exc:  # keep going: every other process must still be killed
            console.print(f'[yellow]could not kill {process.node.process_label}<{process.node.pk}>: {exc}[/yellow]')
    for process in processes:
        node = process.node
        if not node.is_terminated:
            node.set_process_state(ProcessState.KILLED)
            node.set_process_status(message)
        if not node.is_sealed:
            node.seal()


def submit_to_daemon(builder, label: str, what: str) -> orm.ProcessNode:
    """Submit ``builder`` to the daemon, print its pk and how to follow it (``label<pk> what``); its node.

    :raises click.ClickException: it cannot be submitted (no broker, broker not reachable ...).
    """
    from aiida import engine
    from aiida.engine.daemon.client import get_daemon_client

    try:
        node = engine.submit(builder)
    except Exception as exc:  # no broker configured, broker not reachable ...
        raise click.ClickException(
            f'cannot submit to the daemon: {type(exc).__name__}: {exc}\n'
            'run without --daemon to run in this process, or configure a broker (`verdi profile configure-broker`)'
        ) from exc
    click.echo(f'submitted {label}<{node.pk}> {what}')
    click.echo(f'follow it with: verdi process status {node.pk}   |   verdi process report {node.pk}')
    click.echo(f'results: verdi process show {node.pk}')
    try:
        running = get_daemon_client().is_daemon_running
    except Exception:  # a profile without a broker or daemon settings
        running = False
    if not running:
        console.print('[yellow]the daemon is not running[/yellow]: start it with `verdi daemon start`')
    return node
