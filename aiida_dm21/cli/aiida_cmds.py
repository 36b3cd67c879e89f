"""``aiida-dm21`` commands that use an AiiDA profile: ``demo``, ``setup``, ``checkpoint lineage``."""

from __future__ import annotations

import logging
import time

import click
from rich.console import Console

from .aiida_support import console, ensure_code, load_profile

PROFILE = click.option('-p', '--profile', default=None, help='AiiDA profile (default: the default profile).')


@click.command('setup')
@PROFILE
def setup(profile: str | None) -> None:
    """Register this Python as the code `dm21-python` on `localhost` (creating both if missing)."""
    load_profile(profile, create=True)
    code = ensure_code()
    click.echo(f'code {code.full_label} (pk {code.pk}) -> {code.filepath_executable}')


@click.group('checkpoint')
def checkpoint() -> None:
    """Checkpoint nodes in the AiiDA database."""


@checkpoint.command('lineage')
@click.argument('identifier')
@PROFILE
def checkpoint_lineage_cmd(identifier: str, profile: str | None) -> None:
    """Print which calculations the checkpoint IDENTIFIER (pk or uuid) learned from, as a tree."""
    load_profile(profile)
    from aiida.common.exceptions import NotExistent

    from ..provenance import checkpoint_lineage, lineage_tree

    try:
        lineage = checkpoint_lineage(int(identifier) if identifier.isdigit() else identifier)
    except NotExistent as exc:
        raise click.ClickException(f'no node {identifier}: {exc}') from exc
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
@click.option('--epochs', default=8, show_default=True, help='Training epochs.')
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
    builder.training = orm.Dict({'epochs': epochs, 'learning_rate': 1e-4, 'grid_level': 1, 'name': 'demo'})
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
