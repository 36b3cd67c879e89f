"""``verdi data dm21.checkpoint list|show|export`` and ``verdi data dm21.dataset list|show|export``: ``verdi data``
plugins.

Registered through the ``aiida.cmdline.data`` entry points ``dm21.checkpoint`` and ``dm21.dataset``; the
checkpoint commands do their work with the same functions as ``aiida-dm21 checkpoint list|show|export``
(:mod:`aiida_dm21.cli.aiida_cmds`).  As for every ``verdi`` command, the profile is the one given to
``verdi -p`` (or the default one).
"""

from __future__ import annotations

import typing as t
from pathlib import Path

import click
from aiida.cmdline.commands.cmd_data import verdi_data
from aiida.cmdline.params import arguments, types
from aiida.cmdline.utils import decorators, echo

from .aiida_cmds import (
    checkpoint_details,
    checkpoint_table,
    export_checkpoint,
    export_node_file,
    node_details,
    stored_checkpoints,
)

if t.TYPE_CHECKING:
    from rich.table import Table

    from ..data.dataset import DM21DatasetData

__all__ = (
    'checkpoint_data',
    'dataset_data',
    'dataset_details',
    'dataset_table',
    'export_dataset',
    'stored_datasets',
)

CHECKPOINT = arguments.DATUM(type=types.DataParamType(sub_classes=('aiida.data:dm21.checkpoint',)))
DATASET = arguments.DATUM(type=types.DataParamType(sub_classes=('aiida.data:dm21.dataset',)))


def _export(write: t.Callable[[], Path], details: str) -> None:
    """Run an export, reporting the file written (with ``details``) or the reason as verdi does."""
    try:
        target = write()
    except click.ClickException as exc:
        echo.echo_critical(exc.message)
    else:
        echo.echo_success(f'wrote {target}{details}')


def _print(renderable) -> None:
    from rich.console import Console

    Console().print(renderable)


@verdi_data.group('dm21.checkpoint')
def checkpoint_data() -> None:
    """Work with dm21.checkpoint nodes (DM21-architecture network checkpoints)."""


@checkpoint_data.command('list')
@click.option('--name', default=None, help='Only checkpoints with this name (DM21, DM21m, a trained name ...).')
@decorators.with_dbenv()
def checkpoint_data_list(name: str | None) -> None:
    """List the dm21.checkpoint nodes: pk, name, source, parameters, weights hash, creation time."""
    nodes = stored_checkpoints(name)
    if not nodes:
        echo.echo_report('no dm21.checkpoint nodes' + (f' named {name!r}' if name else ''))
        return
    _print(checkpoint_table(nodes))


@checkpoint_data.command('show')
@CHECKPOINT
@decorators.with_dbenv()
def checkpoint_data_show(datum) -> None:
    """Show the attributes of a dm21.checkpoint node (pk, UUID or label)."""
    _print(checkpoint_details(datum))


def _export_command(group: click.Group, datum: t.Callable):
    """``group``'s ``export`` command: the node argument ``datum``, ``PATH`` and ``--overwrite``, with the profile."""

    def decorate(func: t.Callable) -> click.Command:
        func = decorators.with_dbenv()(func)
        func = click.option('--overwrite', is_flag=True, help='Replace an existing file.')(func)
        func = click.argument('path', type=click.Path(path_type=Path))(func)
        return group.command('export')(datum(func))

    return decorate


@_export_command(checkpoint_data, CHECKPOINT)
def checkpoint_data_export(datum, path: Path, overwrite: bool) -> None:
    """Write the .safetensors file of a dm21.checkpoint node to PATH (a file or a folder)."""
    _export(lambda: export_checkpoint(datum, path, overwrite), '')


# --- dm21.dataset -------------------------------------------------------------------------------------------------


def stored_datasets(basis: str | None = None, element: str | None = None) -> list[DM21DatasetData]:
    """The stored ``dm21.dataset`` nodes, oldest first; only those in ``basis`` / holding ``element`` if given."""
    from aiida import orm

    from ..data.dataset import DM21DatasetData

    builder = orm.QueryBuilder().append(DM21DatasetData, tag='dataset')
    builder.order_by({'dataset': {'id': 'asc'}})
    nodes = [row[0] for row in builder.all()]
    # basis and elements are JSON lists: filtered here, the same way on every storage backend
    if basis is not None:
        nodes = [node for node in nodes if basis.lower() in (b.lower() for b in _as_list(node.basis))]
    if element is not None:
        nodes = [node for node in nodes if element in _as_list(node.elements)]
    return nodes


def _as_list(value: t.Any) -> list[str]:
    """An attribute that is a list of names (or one name, or nothing) as a list of strings."""
    if value is None:
        return []
    return [str(item) for item in value] if isinstance(value, (list, tuple)) else [str(value)]


def _kinds(node: DM21DatasetData) -> str:
    return ', '.join(f'{count} {kind}' for kind, count in sorted((node.kinds or {}).items()))


def dataset_table(nodes: t.Sequence[DM21DatasetData]) -> Table:
    """A table of dataset nodes: pk, label, systems and their kinds, elements, basis, method, checksum, created."""
    from rich.table import Table

    table = Table(title='dm21.dataset nodes')
    for column in ('pk', 'label', 'systems', 'kinds', 'elements', 'basis', 'method', 'checksum', 'created'):
        table.add_column(column, justify='right' if column in ('pk', 'systems') else 'left')
    for node in nodes:
        table.add_row(
            str(node.pk),
            node.label or '',
            str(node.n_systems),
            _kinds(node),
            ' '.join(_as_list(node.elements)),
            ' '.join(_as_list(node.basis)),
            ' '.join(_as_list(node.reference_method)),
            (node.checksum or '')[:12],
            node.ctime.strftime('%Y-%m-%d %H:%M'),
        )
    return table


def dataset_details(node: DM21DatasetData) -> Table:
    """Every attribute of a dataset node (nested values as JSON), with its pk, UUID, file and what made it."""
    return node_details(node, f'dm21.dataset<{node.pk}>', [('created by', _provenance(node))])


def _provenance(node: DM21DatasetData) -> str:
    """``build_fractional_dataset<12> in ReferenceDataWorkChain<7>``, or that nothing recorded made it."""
    creator = node.creator
    if creator is None:
        return '(stored by hand)'
    text = f'{creator.process_label}<{creator.pk}>'
    caller = creator.caller
    return text + (f' in {caller.process_label}<{caller.pk}>' if caller is not None else '')


@verdi_data.group('dm21.dataset')
def dataset_data() -> None:
    """Work with dm21.dataset nodes (fixed-density training systems from reference calculations)."""


@dataset_data.command('list')
@click.option('--basis', default=None, help='Only datasets in this basis (e.g. 6-31g).')
@click.option('--element', default=None, help='Only datasets with systems of this element (e.g. Li).')
@decorators.with_dbenv()
def dataset_data_list(basis: str | None, element: str | None) -> None:
    """List the dm21.dataset nodes: pk, label, systems, kinds, elements, basis, method, checksum, creation time."""
    nodes = stored_datasets(basis, element)
    if not nodes:
        filters = ' and '.join(f'{key} {value!r}' for key, value in (('basis', basis), ('element', element)) if value)
        echo.echo_report('no dm21.dataset nodes' + (f' with {filters}' if filters else ''))
        return
    _print(dataset_table(nodes))


@dataset_data.command('show')
@DATASET
@decorators.with_dbenv()
def dataset_data_show(datum) -> None:
    """Show the attributes of a dm21.dataset node (pk, UUID or label)."""
    _print(dataset_details(datum))


@_export_command(dataset_data, DATASET)
def dataset_data_export(datum, path: Path, overwrite: bool) -> None:
    """Write the .npz of a dm21.dataset node to PATH (a file, or a folder: dm21-dataset-PK.npz in it), checked
    against its checksum; the training runner (``python -m aiida_dm21.training.train``) reads it as it is."""
    _export(
        lambda: export_dataset(datum, path, overwrite),
        f' ({datum.n_systems} systems, checksum {(datum.checksum or "")[:12]})',
    )


def export_dataset(node: DM21DatasetData, path: Path, overwrite: bool = False) -> Path:
    """Write the node's ``.npz`` to ``path`` (a folder gets ``dm21-dataset-<pk>.npz``); the file written.

    :raises click.ClickException: see :func:`~aiida_dm21.cli.aiida_cmds.export_node_file`; also when the stored
        file does not match the node's checksum (then nothing is written).
    """
    return export_node_file(node, path, overwrite, name=f'dm21-dataset-{node.pk}.npz')
