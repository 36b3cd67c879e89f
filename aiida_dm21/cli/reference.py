"""``aiida-dm21 reference launch``: a ``dm21.reference_data`` workchain (reference data -> dataset) from the
command line.

SET_NAME is a built-in species set (:data:`aiida_dm21.reference.sets.SPECIES_SETS`); every species becomes one
``dm21.reference`` CalcJob and the workchain builds the fractional ``dm21.dataset`` from them.  Without
``--daemon`` it runs in this process (Ctrl-C kills it and its calculations) and the dataset's pk is printed;
with it, the workchain is submitted to the daemon.
"""

from __future__ import annotations

import typing as t

import click
from rich.console import Console

from ..reference.sets import SPECIES_SETS  # plain data: no PySCF
from .launch import code_option, job_options, metadata_options, profile_first
from .scf import resolve_code, run_checked, submit_to_daemon

__all__ = ('REFERENCE_METHODS', 'reference')

#: What ``dm21.reference`` computes the reference energy with.
REFERENCE_METHODS = ('fci', 'ccsd(t)', 'ccsd', 'hf')


@click.group('reference')
def reference() -> None:
    """Reference data for training as AiiDA workchains (dm21.reference_data)."""


@reference.command('launch')
@click.argument('set_name', type=click.Choice(list(SPECIES_SETS)), metavar='SET_NAME')
@click.option('--basis', '-b', default='6-31g', show_default=True, help='PySCF basis of every species.')
@click.option(
    '--reference-method',
    default=None,
    type=click.Choice(REFERENCE_METHODS),
    help="Reference energies from this method (default: the set's own, else ccsd(t)).",
)
@click.option(
    '--reference-basis',
    default=None,
    help='Compute the reference energies in this basis (e.g. cc-pvqz) on the --basis densities (default: --basis).',
)
@click.option(
    '--max-cycle', default=None, type=click.IntRange(min=1), help='SCF iteration limit of every species (default 50).'
)
@click.option(
    '--batch-size',
    default=None,
    type=click.IntRange(min=1),
    help='Species per dm21.reference job (>= 1; default 1: one job per species). Larger batches mean fewer '
    'scheduler jobs for sets of many small species.',
)
@click.option(
    '--max-concurrent',
    default=None,
    type=click.IntRange(min=1),
    help='At most this many dm21.reference jobs in flight at once (>= 1; default: all at once).',
)
@click.option(
    '--max-retries',
    default=None,
    type=click.IntRange(min=0),
    help='How often a failed species is retried alone, in a job of its own (>= 0; default 1; 0: never).',
)
@code_option
@job_options
@profile_first
def launch(
    set_name: str,
    basis: str,
    reference_method: str | None,
    reference_basis: str | None,
    max_cycle: int | None,
    batch_size: int | None,
    max_concurrent: int | None,
    max_retries: int | None,
    code,
    walltime: int | None,
    queue: str | None,
    account: str | None,
    num_cores: int | None,
    daemon: bool,
) -> None:
    """Run a dm21.reference_data workchain on the built-in species set SET_NAME and build its dm21.dataset.

    Sets: demo_train (H, He; FCI), demo_heldout (Li; FCI), light, dm21_like,
    light_train (light's H..N, H2, LiH), light_heldout (light's O, F), light_ne_train (light_train + Ne+, Ne)."""
    from aiida import orm

    from ..workflows.reference_data import ReferenceDataWorkChain

    code = code if code is not None else resolve_code(None)
    builder = ReferenceDataWorkChain.get_builder()
    try:
        builder.code = code
        builder.set_name = orm.Str(set_name)
        builder.basis = orm.Str(basis)
        if reference_method is not None:
            builder.reference_method = orm.Str(reference_method)
        if reference_basis is not None:
            builder.reference_basis = orm.Str(reference_basis)
        if max_cycle is not None:
            builder.iterations = orm.Dict({'max_cycle': max_cycle})
        for name, value in (
            ('batch_size', batch_size),
            ('max_concurrent', max_concurrent),
            ('max_retries', max_retries),
        ):
            if value is not None:
                builder[name] = orm.Int(value)
        options = metadata_options(walltime, queue, account, num_cores)
        if options:
            builder.options = orm.Dict(options)
    except ValueError as exc:  # a port refused a value's type
        raise click.ClickException(f'the inputs were refused: {exc}') from exc
    problem = _inputs_problem(builder)
    if problem:
        raise click.ClickException(f'the inputs were refused: {problem}')
    species = SPECIES_SETS[set_name]['species']
    method = reference_method or SPECIES_SETS[set_name].get('reference_method', 'ccsd(t)')
    energies = f'{method}/{reference_basis}' if reference_basis else method
    what = f'{set_name}/{basis} ({energies}, {len(species)} species)'

    if daemon:
        submit_to_daemon(builder, 'dm21.reference_data', what)
        return
    results, node = run_checked(builder, 'dm21.reference_data', what)
    dataset = results['dataset']
    kinds = ', '.join(f'{count} {kind}' for kind, count in (dataset.kinds or {}).items())
    Console().print(
        f'dm21.reference_data<{node.pk}> {what}: dm21.dataset<{dataset.pk}> with {dataset.n_systems} systems '
        f'({kinds})\ntrain on it: aiida-dm21 train launch {dataset.pk}   |   '
        f'show it: verdi data dm21.dataset show {dataset.pk}',
        soft_wrap=True,
    )


def _inputs_problem(builder) -> str | None:
    """What the workchain's input validators refuse (species, basis, method ...), before anything is stored."""
    from ..workflows.reference_data import validate_inputs

    inputs: dict[str, t.Any] = {key: builder[key] for key in builder if key != 'metadata'}
    try:
        return validate_inputs(inputs)
    except Exception as exc:  # a validator that cannot cope with the value: say so, do not trace back
        return f'{type(exc).__name__}: {exc}'
