"""``aiida-dm21`` commands that use an AiiDA profile: ``demo``, ``setup``, ``checkpoint list|show|export|lineage``.

The functions behind ``checkpoint list|show|export`` (:func:`load_checkpoint`, :func:`checkpoint_table`,
:func:`checkpoint_details`, :func:`export_checkpoint`) also serve ``verdi data dm21.checkpoint``
(:mod:`aiida_dm21.cli.verdi_data`).
"""

from __future__ import annotations

import json
import logging
import time
import typing as t
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .aiida_support import CODE_LABEL, console, ensure_code, load_profile, register_code
from .launch import computer_param_type

if t.TYPE_CHECKING:
    from ..data.checkpoint import DM21CheckpointData

PROFILE = click.option('-p', '--profile', default=None, help='AiiDA profile (default: the default profile).')


def _load_profile_creating(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if not ctx.resilient_parsing:  # before --computer is looked up in it; not while the shell completes a word
        load_profile(value, create=True)
    return value


@click.command('setup')
@click.option(
    '-p',
    '--profile',
    default=None,
    is_eager=True,
    expose_value=False,
    callback=_load_profile_creating,
    help='AiiDA profile (default: the loaded or default profile; a `verdi presto` one is made if there is none).',
)
@click.option(
    '--computer',
    type=computer_param_type(),
    default=None,
    help='AiiDA computer (label, pk or UUID) to register the code on (default: localhost, created if missing). '
    'Set up others with `verdi computer setup`.',
)
@click.option(
    '--python',
    'python',
    default=None,
    metavar='PATH',
    help='The Python on that computer that has aiida-dm21 installed (default on localhost: this Python; '
    'required on any other computer). `python` alone means the one on PATH after --prepend-text.',
)
@click.option('--label', default=CODE_LABEL, show_default=True, help='Label of the code.')
@click.option(
    '--prepend-text',
    default='',
    metavar='TEXT',
    help="Shell lines run before the Python in each job, e.g. 'module load python; source ~/dm21/bin/activate'.",
)
@click.option('--append-text', default='', metavar='TEXT', help='Shell lines run after the Python in each job.')
def setup(computer, python: str | None, label: str, prepend_text: str, append_text: str) -> None:
    """Register a Python with aiida-dm21 as an AiiDA code (default: this Python as dm21-python@localhost).

    Running it again with the same options reuses the code; a code of that label on that computer with another
    interpreter, --prepend-text or --append-text is refused (stored codes are never changed)."""
    code, created = register_code(computer, python, label, prepend_text, append_text)
    state = 'registered' if created else 'already registered:'
    click.echo(f'{state} code {code.full_label} (pk {code.pk}) -> {code.filepath_executable}')
    if not code.computer.is_configured:
        click.echo(
            f'note: computer {code.computer.label!r} is not configured for this user yet: '
            f'`verdi computer configure {code.computer.transport_type} {code.computer.label}`'
        )
    click.echo(
        f'use it: aiida-dm21 scf launch h2 --code {code.full_label}   |   '
        f'aiida-dm21 reference launch demo_train --code {code.full_label}   |   '
        f"in Python: orm.load_code('{code.full_label}')"
    )


@click.group('checkpoint')
def checkpoint() -> None:
    """Checkpoint nodes in the AiiDA database."""


# --- checkpoint list | show | export (shared with `verdi data dm21.checkpoint`) -----------------------------


def load_checkpoint(identifier: str | int) -> DM21CheckpointData:
    """The ``dm21.checkpoint`` node with this pk or UUID (a profile must be loaded).

    :raises click.ClickException: no such node, or a node of another type.
    """
    from aiida import orm
    from aiida.common.exceptions import MultipleObjectsError, NotExistent

    from ..data.checkpoint import DM21CheckpointData

    text = str(identifier).strip()
    try:
        node = orm.load_node(pk=int(text)) if text.isdigit() else orm.load_node(uuid=text)
    except (NotExistent, MultipleObjectsError, ValueError) as exc:
        raise click.ClickException(
            f'no checkpoint node {text!r}: {exc} (`aiida-dm21 checkpoint list` shows the stored ones)'
        ) from exc
    if not isinstance(node, DM21CheckpointData):
        raise click.ClickException(f'node {node.pk} is a {type(node).__name__}, not a dm21.checkpoint')
    return node


def stored_checkpoints(name: str | None = None) -> list[DM21CheckpointData]:
    """All stored checkpoint nodes (only those called ``name`` if given), oldest first."""
    from aiida import orm

    from ..data.checkpoint import DM21CheckpointData

    filters = {'attributes.name': name} if name is not None else {}
    builder = orm.QueryBuilder().append(DM21CheckpointData, filters=filters, tag='checkpoint')
    builder.order_by({'checkpoint': {'id': 'asc'}})
    return [row[0] for row in builder.all()]


def checkpoint_table(nodes: t.Sequence[DM21CheckpointData]) -> Table:
    """A table of checkpoint nodes: pk, name, source, parameters, weights sha256 prefix, creation time."""
    table = Table(title='dm21.checkpoint nodes')
    for column in ('pk', 'name', 'source', 'params', 'sha256', 'created'):
        table.add_column(column, justify='right' if column in ('pk', 'params') else 'left')
    for node in nodes:
        table.add_row(
            str(node.pk),
            node.name,
            node.checkpoint_source,
            f'{node.n_parameters:,}',
            (node.weights_sha256 or '')[:12],
            node.ctime.strftime('%Y-%m-%d %H:%M'),
        )
    return table


def node_details(node, title: str, extra: t.Sequence[tuple[str, str]] = ()) -> Table:
    """pk, UUID, creation time, label, the ``extra`` rows, then every attribute (nested values as JSON)."""
    table = Table(title=title, show_header=False)
    table.add_column('key', style='bold')
    table.add_column('value', overflow='fold')
    table.add_row('pk', str(node.pk))
    table.add_row('uuid', node.uuid)
    table.add_row('created', node.ctime.isoformat(timespec='seconds'))
    table.add_row('label', node.label or '')
    for key, value in extra:
        table.add_row(key, value)
    for key, value in sorted(node.base.attributes.all.items()):
        table.add_row(key, value if isinstance(value, str) else json.dumps(value))
    return table


def checkpoint_details(node: DM21CheckpointData) -> Table:
    """Every attribute of a checkpoint node (nested values as JSON), with its pk, UUID and file name."""
    return node_details(node, f'dm21.checkpoint<{node.pk}>')


def export_node_file(node, path: Path, overwrite: bool = False, name: str | None = None) -> Path:
    """Write the file of a single-file node (checkpoint, dataset) through its ``export`` to ``path``; a folder gets
    ``name`` (default: the node's file name).  Returns the file written.

    :raises click.ClickException: the file exists and ``overwrite`` is false, it cannot be written, or the node's
        exporter refuses its content (``ValueError``; then nothing is written).
    """
    target = path / (name or node.filename) if path.is_dir() else path
    if target.exists() and not overwrite:
        raise click.ClickException(f'{target} exists: use --overwrite to replace it')
    try:
        node.export(target, overwrite=overwrite)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f'cannot write {target}: {exc}') from exc
    return target


def export_checkpoint(node: DM21CheckpointData, path: Path, overwrite: bool = False) -> Path:
    """Write the node's ``.safetensors`` file (byte-identical) to ``path``; a folder gets the node's file name.

    :raises click.ClickException: see :func:`export_node_file`.
    """
    return export_node_file(node, path, overwrite)


@checkpoint.command('list')
@click.option('--name', default=None, help='Only checkpoints with this name (DM21, DM21m, a trained name ...).')
@PROFILE
def checkpoint_list_cmd(name: str | None, profile: str | None) -> None:
    """List the dm21.checkpoint nodes in the database."""
    load_profile(profile)
    nodes = stored_checkpoints(name)
    if not nodes:
        console.print('no dm21.checkpoint nodes' + (f' named {name!r}' if name else '') + ' in this profile')
        return
    Console().print(checkpoint_table(nodes))


@checkpoint.command('show')
@click.argument('identifier')
@PROFILE
def checkpoint_show_cmd(identifier: str, profile: str | None) -> None:
    """Show the attributes of the checkpoint IDENTIFIER (pk or UUID)."""
    load_profile(profile)
    Console().print(checkpoint_details(load_checkpoint(identifier)))


@checkpoint.command('export')
@click.argument('identifier')
@click.argument('path', type=click.Path(path_type=Path))
@click.option('--overwrite', is_flag=True, help='Replace an existing file.')
@PROFILE
def checkpoint_export_cmd(identifier: str, path: Path, overwrite: bool, profile: str | None) -> None:
    """Write the .safetensors file of the checkpoint IDENTIFIER (pk or UUID) to PATH (a file or a folder)."""
    load_profile(profile)
    target = export_checkpoint(load_checkpoint(identifier), path, overwrite)
    click.echo(f'wrote {target}')


@checkpoint.command('lineage')
@click.argument('identifier')
@PROFILE
def checkpoint_lineage_cmd(identifier: str, profile: str | None) -> None:
    """Print which calculations the checkpoint IDENTIFIER (pk or uuid) learned from, as a tree."""
    load_profile(profile)
    from ..provenance import checkpoint_lineage, lineage_tree

    node = load_checkpoint(identifier)  # a one-line error for a missing node or one of another type
    try:
        lineage = checkpoint_lineage(node)
    except ValueError as exc:  # a cycle in the provenance graph
        raise click.ClickException(f'cannot trace checkpoint<{node.pk}>: {exc}') from exc
    Console().print(lineage_tree(lineage))


def _demo_checkpoint(source: str | None):
    """DM21m as a checkpoint node (fetched and converted if needed): the demo fine-tunes it."""
    from ..data.checkpoint import DM21CheckpointData
    from ..functional.checkpoint import CheckpointError, fetch_deepmind, weights_dir
    from .main import _developer_mirror

    path = weights_dir() / 'DM21m.safetensors'
    if not path.is_file():
        console.log('DM21m weights not installed: fetching them')
        try:
            fetch_deepmind(['DM21m'], source or _developer_mirror(), progress=console.log)
        except CheckpointError as exc:
            raise click.ClickException(
                f'{exc}\nuse --source or $AIIDA_DM21_WEIGHTS_SOURCE to point at a mirror'
            ) from exc
    return DM21CheckpointData.get_or_create(path)


@click.command('demo')
@PROFILE
@click.option('--source', default=None, help="Where to fetch DeepMind's DM21m weights from if not installed.")
@click.option('--epochs', default=8, show_default=True, type=click.IntRange(min=1), help='Training epochs (>= 1).')
def demo(profile: str | None, source: str | None, epochs: int) -> None:
    """The whole loop, small: reference data (H, He; Li held out) -> fine-tune DM21m on FC/FS data ->
    DM21 SCF of Li with the new checkpoint -> lineage of the checkpoint."""
    start = time.perf_counter()
    load_profile(profile, create=True)
    from aiida import engine, orm
    from aiida.manage.caching import enable_caching

    from ..provenance import checkpoint_lineage, lineage_tree
    from ..workflows.pipeline import PipelineWorkChain

    code = ensure_code()
    initial = _demo_checkpoint(source)
    logging.getLogger('aiida').setLevel('REPORT')
    builder = PipelineWorkChain.get_builder()
    builder.code = code
    builder.initial_checkpoint = initial
    # one grid for training and SCF (the pipeline trains on the SCF's level): level 1 keeps the demo short
    builder.training = orm.Dict({'epochs': epochs, 'learning_rate': 1e-4, 'name': 'demo'})
    builder.scf_parameters = orm.Dict({'grid_level': 1})
    console.log(f'running dm21.pipeline (profile {orm.User.collection.get_default().email}): reports follow')
    with enable_caching(identifier='aiida.calculations:dm21.reference'):
        results, node = engine.run_get_node(builder)
    if not node.is_finished_ok:
        raise click.ClickException(
            f'the pipeline failed: exit {node.exit_status} {node.exit_message}; see `verdi process report {node.pk}`'
        )
    report = results['report'].get_dict()
    train = report['training']
    out = Console()
    out.rule('aiida-dm21 demo')
    out.print(f'pipeline: dm21.pipeline<{node.pk}> finished in {time.perf_counter() - start:.0f} s')
    for split in ('train', 'heldout'):
        before, after = train['before'].get(split, {}), train['after'].get(split, {})
        out.print(
            f'{split:>8} E_xc MAE: {before.get("mae_all_mha", float("nan")):8.2f} mHa (DM21m) -> '
            f'{after.get("mae_all_mha", float("nan")):8.2f} mHa (fine-tuned)'
            + (
                f'; fractional charge {before.get("mae_fc_mha"):.2f} -> {after.get("mae_fc_mha"):.2f} mHa'
                if 'mae_fc_mha' in before
                else ''
            )
        )
    for key, value in report['scf'].items():
        out.print(f'{key}: E = {value["e_tot"]:.8f} Ha (converged={value["converged"]})')
    checkpoint_node = results['checkpoint']
    out.print(f'\nlineage of the trained checkpoint (also: aiida-dm21 checkpoint lineage {checkpoint_node.pk}):')
    out.print(lineage_tree(checkpoint_lineage(checkpoint_node)))
