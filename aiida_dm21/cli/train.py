"""``aiida-dm21 train launch``: a ``dm21.train`` restart workchain on stored datasets from the command line.

DATASETS are ``dm21.dataset`` nodes (pk, UUID or label), e.g. the output of ``aiida-dm21 reference launch``;
``--heldout`` datasets are only evaluated.  ``--initial-checkpoint`` fine-tunes existing weights (a name of
installed weights such as DM21m, a ``dm21.checkpoint`` pk or a ``.safetensors`` file); without it the network
starts from a seeded random initialisation.  The hyper-parameters are checked here (the same check as the
CalcJob's, no PyTorch needed) before anything is stored.  Without ``--daemon`` the workchain runs in this
process (resumed after walltime like in the daemon; Ctrl-C kills it); with it, it is submitted.
"""

from __future__ import annotations

import typing as t

import click
from rich.console import Console

from .launch import code_option, data_param_type, job_options, metadata_options, profile_first
from .scf import resolve_code, resolve_functional, run_checked, submit_to_daemon

__all__ = ('train',)

DATASET = data_param_type('aiida.data:dm21.dataset', 'dataset')


@click.group('train')
def train() -> None:
    """Training of DM21-architecture functionals as AiiDA workchains (dm21.train)."""


@train.command('launch')
@click.argument('datasets', nargs=-1, required=True, type=DATASET)
@click.option('--heldout', multiple=True, type=DATASET, help='A dm21.dataset only evaluated (repeatable).')
@click.option('--epochs', default=20, show_default=True, type=click.IntRange(min=1), help='Training epochs.')
@click.option(
    '--learning-rate',
    '--lr',
    'learning_rate',
    default=1e-4,
    show_default=True,
    type=float,
    help='Adam learning rate (> 0, finite).',
)
@click.option('--batch-size', default=None, type=click.IntRange(min=1), help='Systems per Adam step (default 1).')
@click.option(
    '--grid-level',
    default=None,
    type=click.IntRange(0, 9),
    help="PySCF grid level of the training (3: the SCF's default; train on the grid you will run on).",
)
@click.option('--seed', default=None, type=click.IntRange(min=0), help='Random seed (default 0).')
@click.option('--name', default=None, help='Name of the trained checkpoint (default "trained").')
@click.option('--device', default=None, help='cpu (default), cuda or cuda:N: checked on the compute node.')
@click.option(
    '--initial-checkpoint',
    '-i',
    default=None,
    help='Fine-tune these weights: installed name (DM21m ...), dm21.checkpoint pk/UUID or .safetensors file '
    '(default: random initialisation).',
)
@code_option
@job_options
@profile_first
def launch(
    datasets: tuple[t.Any, ...],
    heldout: tuple[t.Any, ...],
    epochs: int,
    learning_rate: float,
    batch_size: int | None,
    grid_level: int | None,
    seed: int | None,
    name: str | None,
    device: str | None,
    initial_checkpoint: str | None,
    code,
    walltime: int | None,
    queue: str | None,
    account: str | None,
    num_cores: int | None,
    daemon: bool,
) -> None:
    """Train on the dm21.dataset nodes DATASETS (pk, UUID or label) with a dm21.train workchain."""
    from aiida import orm

    from ..calculations.train import validate_parameters
    from ..workflows.train import DM21TrainWorkChain

    given = {
        'epochs': epochs,
        'learning_rate': learning_rate,
        'batch_size': batch_size,
        'grid_level': grid_level,
        'seed': seed,
        'name': name,
        'device': device,
    }
    parameters = orm.Dict({key: value for key, value in given.items() if value is not None})
    problem = validate_parameters(parameters)  # TrainConfig's check: no PyTorch
    if problem:
        raise click.ClickException(f'the training parameters were refused: {problem}')
    overlap = {node.pk for node in datasets} & {node.pk for node in heldout}
    if overlap:
        pks = ', '.join(map(str, sorted(overlap)))
        raise click.ClickException(f'dataset(s) {pks} cannot be both trained on and held out')
    code = code if code is not None else resolve_code(None)
    checkpoint = resolve_functional(initial_checkpoint) if initial_checkpoint is not None else None

    builder = DM21TrainWorkChain.get_builder()
    builder.train.code = code
    builder.train.datasets = {f'dataset_{node.pk}': node for node in datasets}
    if heldout:
        builder.train.heldout = {f'dataset_{node.pk}': node for node in heldout}
    builder.train.parameters = parameters
    if checkpoint is not None:
        builder.train.initial_checkpoint = checkpoint
    options = metadata_options(walltime, queue, account, num_cores)
    if options:
        builder.train.metadata.options = options
    systems = sum(int(node.n_systems or 0) for node in datasets)
    start = f'from {checkpoint.name}<{checkpoint.pk}>' if checkpoint is not None else 'from random weights'
    what = f'{len(datasets)} dataset(s), {systems} systems, {epochs} epochs, lr {learning_rate:g}, {start}'

    if daemon:
        submit_to_daemon(builder, 'dm21.train', what)
        return
    results, node = run_checked(builder, 'dm21.train', what)
    trained = results['checkpoint']
    out = Console()
    out.print(
        f'dm21.train<{node.pk}> {what}: dm21.checkpoint<{trained.pk}> {trained.name!r} in {len(node.called)} job(s)',
        soft_wrap=True,
    )
    metrics = results['metrics'].get_dict()
    for split in ('train', 'validation', 'heldout'):
        before, after = metrics.get('before', {}).get(split), metrics.get('after', {}).get(split)
        if before and after and 'mae_all_mha' in before and 'mae_all_mha' in after:
            out.print(f'{split:>10} E_xc MAE: {before["mae_all_mha"]:.3f} -> {after["mae_all_mha"]:.3f} mHa')
    out.print(
        f'run it: aiida-dm21 scf launch water -f {trained.pk}   |   '
        f'lineage: aiida-dm21 checkpoint lineage {trained.pk}',
        soft_wrap=True,
    )
