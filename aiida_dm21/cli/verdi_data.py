"""``verdi data dm21.checkpoint list|show|export``: the checkpoint commands as a ``verdi data`` plugin.

Registered through the ``aiida.cmdline.data`` entry point ``dm21.checkpoint``; the work is done by the same
functions as ``aiida-dm21 checkpoint list|show|export`` (:mod:`aiida_dm21.cli.aiida_cmds`).  As for every
``verdi`` command, the profile is the one given to ``verdi -p`` (or the default one).
"""

from __future__ import annotations

from pathlib import Path

import click
from aiida.cmdline.commands.cmd_data import verdi_data
from aiida.cmdline.params import arguments, types
from aiida.cmdline.utils import decorators, echo

from .aiida_cmds import checkpoint_details, checkpoint_table, export_checkpoint, stored_checkpoints

__all__ = ('checkpoint_data',)

CHECKPOINT = arguments.DATUM(type=types.DataParamType(sub_classes=('aiida.data:dm21.checkpoint',)))


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


@checkpoint_data.command('export')
@CHECKPOINT
@click.argument('path', type=click.Path(path_type=Path))
@click.option('--overwrite', is_flag=True, help='Replace an existing file.')
@decorators.with_dbenv()
def checkpoint_data_export(datum, path: Path, overwrite: bool) -> None:
    """Write the .safetensors file of a dm21.checkpoint node to PATH (a file or a folder)."""
    try:
        target = export_checkpoint(datum, path, overwrite)
    except click.ClickException as exc:
        echo.echo_critical(exc.message)
    else:
        echo.echo_success(f'wrote {target}')
