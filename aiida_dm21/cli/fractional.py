"""``aiida-dm21 fractional-curve``: E versus fractional electron number (or spin), as a PNG and a table."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .main import GRID_LEVEL, MOLECULES, check_molecule, console

__all__ = ['fractional_curve']

#: Default basis: diffuse and large enough for cations and anions of first-row atoms and for the H atom
#: (the H-atom B3LYP deviation at δ = 0.5 changes by < 0.2 mHa from cc-pVDZ to aug-cc-pVQZ).
DEFAULT_BASIS = 'aug-cc-pvtz'


def _molecule(molecule: str, basis: str, charge: int, spin: int | None):
    """The molecule by name (``h``, ``water``...), xyz file or PySCF atom string, in the N-electron state.

    Without ``spin``: the named molecule's own spin if it is neutral, else the lowest spin (PySCF's
    ``spin=None``: 0 or 1 unpaired electron).
    """
    from pyscf import gto

    entry = MOLECULES.get(molecule.lower())
    if entry is not None:
        atom = entry['atom']
        if spin is None and charge == 0:
            spin = entry['spin']
    elif Path(molecule).is_file():
        atom = Path(molecule).read_text()
    else:
        atom = molecule
    try:
        mol = gto.M(atom=atom, basis=basis, charge=charge, spin=spin, verbose=0, unit='Angstrom')
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise click.ClickException(f'cannot build the molecule: {exc}') from exc
    return check_molecule(mol, basis)


def _highlight(delta: float, value: float) -> str:
    text = f'{value:+.3f}'
    return f'[bold yellow]{text}[/bold yellow]' if abs(delta - 0.5) < 1e-9 else text


def _print_tables(curves, kind: str) -> None:
    out = Console()
    first = curves[0]
    label = 'N' if kind == 'charge' else 'x'
    table = Table(title=f'E − {"straight line" if kind == "charge" else "E(pure spin state)"} (mHa)')
    table.add_column('δ' if kind == 'charge' else 'x', justify='right')
    table.add_column(label if kind == 'charge' else 'nα, nβ', justify='right')
    for curve in curves:
        table.add_column(curve.functional, justify='right')
    for i, delta in enumerate(first.delta):
        where = f'{first.n_electrons[i]:.3f}' if kind == 'charge' else f'{first.n_alpha[i]:.2f}, {first.n_beta[i]:.2f}'
        cells = []
        for curve in curves:
            cell = _highlight(delta, curve.deviation[i] * 1000.0)
            cells.append(cell if curve.converged[i] else f'{cell} [red](not converged)[/red]')
        style = 'bold' if abs(delta - 0.5) < 1e-9 else None
        table.add_row(f'{delta:.3f}', where, *cells, style=style)
    out.print(table)

    summary = Table(title=f'{first.system}; {first.basis}, grid level {first.grid_level}')
    ends = ('E(N) Ha', 'E(N+1) Ha') if kind == 'charge' else ('E(pure) Ha', 'E(x=½) Ha')
    for column in ('functional', *ends, 'dev(½) mHa', 'max|dev| mHa', 'converged'):
        summary.add_column(column, justify='left' if column == 'functional' else 'right')
    for curve in curves:
        summary.add_row(
            curve.functional,
            f'{curve.energy[0]:.6f}',
            f'{curve.energy[-1]:.6f}',
            f'[bold yellow]{curve.deviation_at(0.5) * 1000.0:+.3f}[/bold yellow]',
            f'{np.max(np.abs(curve.deviation)) * 1000.0:.3f}',
            f'{int(curve.converged.sum())}/{len(curve.converged)}',
        )
    out.print(summary)


@click.command('fractional-curve')
@click.argument('molecule', default='h')
@click.option(
    '--functional',
    '-f',
    'functionals',
    multiple=True,
    help='Repeatable. A DM21 name (DM21, DM21m, DM21mc, DM21mu), checkpoint or DeepMind folder, or an XC '
    'string PySCF knows (b3lyp5, pbe, hf ...).  [default: -f DM21 -f b3lyp5]',
)
@click.option('--kind', type=click.Choice(['charge', 'spin']), default='charge', show_default=True)
@click.option('--basis', '-b', default=DEFAULT_BASIS, show_default=True)
@click.option(
    '--charge',
    type=int,
    default=None,
    help='Charge of the N-electron state [default: 1 for --kind charge (cation to neutral), 0 for spin].',
)
@click.option(
    '--spin', type=click.IntRange(min=0), default=None, help='2S of the N-electron state [default: from the molecule].'
)
@click.option(
    '--spin-next',
    type=click.IntRange(min=0),
    default=None,
    help='2S of the N+1-electron state (charge only) [default: spin − 1, or 1 from a closed shell].',
)
@click.option(
    '--points',
    type=int,
    default=None,
    help='Evenly spaced points from 0 to 1 (charge) or 0 to 0.5 (spin); 0.5 is always added. '
    '[default: 11 for charge, 6 for spin]',
)
@click.option(
    '--grid-level',
    default=3,
    show_default=True,
    type=GRID_LEVEL,
    help='PySCF grid level 0-9, the same for every functional.',
)
@click.option(
    '--output',
    '-o',
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help='PNG file [default: fractional_<kind>.png].',
)
@click.option(
    '--table', 'table_path', type=click.Path(dir_okay=False, path_type=Path), default=None, help='.csv or .json file.'
)
@click.option('--title', default=None, help='Title of the figure.')
def fractional_curve(
    molecule: str,
    functionals: tuple[str, ...],
    kind: str,
    basis: str,
    charge: int | None,
    spin: int | None,
    spin_next: int | None,
    points: int | None,
    grid_level: int,
    output: Path | None,
    table_path: Path | None,
    title: str | None,
) -> None:
    """E against a fractional number of electrons (or fractional spin) for MOLECULE [default: h].

    \b
    --kind charge: E(N+δ) from the N-electron state (--charge/--spin) to the N+1 one, and its
                   deviation from the straight line between them (exact: 0; B3LYP sags below it).
    --kind spin:   E with x of an α electron moved to β (x = 0 ... 0.5) minus E(pure state) (exact: 0).
    Each point is a fixed-occupation UKS SCF; see docs/fractional.md.  Exits with status 3 if a
    point did not converge (the PNG and table are still written).
    """
    from ..functional.checkpoint import CheckpointError
    from ..functional.fractional import (
        fractional_charge_curve,
        fractional_spin_curve,
        plot_fractional_curves,
        resolve_functional,
        write_table,
    )
    from ..functional.numint import UnsupportedSystemError

    if charge is None:
        charge = 1 if kind == 'charge' else 0
    n_points = points if points is not None else (11 if kind == 'charge' else 6)
    if n_points < 2:
        raise click.BadParameter(f'need at least 2 points (the two ends), got {n_points}', param_hint='--points')
    if spin_next is not None and kind != 'charge':
        raise click.BadParameter('only for --kind charge', param_hint='--spin-next')
    if table_path is not None and table_path.suffix.lower() not in {'.csv', '.json'}:
        raise click.BadParameter(f'use a .csv or .json file, got {table_path.name!r}', param_hint='--table')
    output = output or Path(f'fractional_{kind}.png')
    if output.suffix.lower() != '.png':
        raise click.BadParameter(f'the picture is a PNG, got {output.name!r}', param_hint='--output')
    upper = 1.0 if kind == 'charge' else 0.5
    fractions = np.union1d(np.linspace(0.0, upper, n_points), [0.5])

    mol = _molecule(molecule, basis, charge, spin)  # the input first: a bad molecule is refused whatever is installed
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise click.ClickException("the picture needs matplotlib: pip install 'aiida-dm21[plot]'") from exc
    try:
        resolved = [resolve_functional(spec) for spec in (functionals or ('DM21', 'b3lyp5'))]
    except (CheckpointError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc

    curves = []
    columns = (TextColumn('{task.description}'), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        for func in resolved:
            task = progress.add_task(f'{func.label:>10}: SCF points', total=len(fractions))
            try:
                if kind == 'charge':
                    curve = fractional_charge_curve(
                        mol,
                        func,
                        fractions,
                        spin_next=spin_next,
                        grid_level=grid_level,
                        progress=lambda _p, task=task: progress.advance(task),
                    )
                else:
                    curve = fractional_spin_curve(
                        mol,
                        func,
                        fractions,
                        grid_level=grid_level,
                        progress=lambda _p, task=task: progress.advance(task),
                    )
            except (UnsupportedSystemError, ValueError) as exc:
                raise click.ClickException(str(exc)) from exc
            curves.append(curve)

    _print_tables(curves, kind)
    png = plot_fractional_curves(curves, output, title=title)
    console.print(f'picture: {png}')
    if table_path is not None:
        console.print(f'table: {write_table(curves, table_path)}')
    if not all(curve.all_converged for curve in curves):
        console.print('[red]some points did not converge (marked in the table and circled in red in the PNG)[/red]')
        sys.exit(3)
