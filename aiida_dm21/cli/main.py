"""``aiida-dm21``: the package's command line.

The ``weights`` and ``run`` commands need no AiiDA profile: they work on files only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from ..functional.dispersion import VERSIONS as DISPERSION_VERSIONS  # numpy only

console = Console(stderr=True)

#: PySCF's integration grid levels.
GRID_LEVEL = click.IntRange(0, 9)

#: Small molecules for ``run``/``demo`` by name (geometries in Angstrom).
MOLECULES: dict[str, dict] = {
    'water': {'atom': 'O 0 0 0.117790; H 0 0.755453 -0.471161; H 0 -0.755453 -0.471161', 'spin': 0},
    'h2': {'atom': 'H 0 0 0; H 0 0 0.7414', 'spin': 0},
    'h': {'atom': 'H 0 0 0', 'spin': 1},
    'ch3': {'atom': 'C 0 0 0; H 1.079 0 0; H -0.5395 0.934441 0; H -0.5395 -0.934441 0', 'spin': 1},
    'ne': {'atom': 'Ne 0 0 0', 'spin': 0},
}


@click.group(context_settings={'help_option_names': ['-h', '--help']})
@click.version_option(package_name='aiida-dm21')
def main() -> None:
    """Train, run and trace DM21-style neural exchange-correlation functionals."""


# --- weights -------------------------------------------------------------------------------------------


@main.group()
def weights() -> None:
    """Install DeepMind's published DM21 weights in the project's safe format."""


def _dest_option(func):
    return click.option(
        '--dest',
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help='Folder for the converted .safetensors files (default: $AIIDA_DM21_WEIGHTS_DIR or '
        '~/.cache/aiida-dm21/weights).',
    )(func)


def _print_installed(results) -> None:
    table = Table(title='installed checkpoints')
    for column in ('name', 'source', 'parameters', 'weights sha256', 'file'):
        table.add_column(column)
    for path, meta in results:
        table.add_row(meta['name'], meta['source'], str(meta['n_parameters']), meta['weights_sha256'][:16], str(path))
    Console().print(table)


from .aiida_support import store_options  # noqa: E402 (needs click and rich only)


@weights.command('import')
@click.argument('path', type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option('--name', default=None, help='Name to install under (default: identified from the file hashes).')
@click.option('--no-verify', is_flag=True, help='Accept files that are not byte-identical to a published checkpoint.')
@_dest_option
@store_options
def weights_import(
    path: Path, name: str | None, no_verify: bool, dest: Path | None, store: bool | None, profile: str | None
) -> None:
    """Convert a local DeepMind TF-Hub module folder PATH (no TensorFlow needed)."""
    from ..functional.checkpoint import CheckpointError, install_deepmind
    from .aiida_support import store_checkpoint_files

    try:
        result = install_deepmind(path, dest, name=name, verify=not no_verify)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    _print_installed([result])
    store_checkpoint_files([result[0]], store, profile)


@weights.command('fetch')
@click.argument('names', nargs=-1)
@click.option(
    '--source',
    default=None,
    help='Base URL or folder holding <NAME>/variables/... (a mirror, e.g. file:///data/dm21); '
    "default: $AIIDA_DM21_WEIGHTS_SOURCE or DeepMind's GitHub repository.",
)
@_dest_option
@store_options
def weights_fetch(
    names: tuple[str, ...], source: str | None, dest: Path | None, store: bool | None, profile: str | None
) -> None:
    """Download NAMES (default: DM21 DM21m DM21mc DM21mu), check the pinned sha256, convert."""
    from ..functional.checkpoint import PUBLISHED_FUNCTIONALS, CheckpointError, fetch_deepmind
    from .aiida_support import store_checkpoint_files

    try:
        results = fetch_deepmind(names or PUBLISHED_FUNCTIONALS, source, dest, progress=lambda m: console.log(m))
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    _print_installed(results)
    store_checkpoint_files([path for path, _ in results], store, profile)


@weights.command('list')
def weights_list() -> None:
    """List the checkpoints in the weights folder."""
    from ..functional.checkpoint import CheckpointError, read_checkpoint, weights_dir

    results = []
    for path in sorted(weights_dir().glob('*.safetensors')):
        try:
            results.append((path, read_checkpoint(path)[1]))
        except CheckpointError as exc:
            console.print(f'[red]unreadable[/red] {path}: {exc}')
    _print_installed(results)


# --- SCF without AiiDA ---------------------------------------------------------------------------------


def _build_molecule(molecule: str, basis: str, charge: int, spin: int | None):
    from pyscf import gto

    if molecule.lower() in MOLECULES:
        entry = MOLECULES[molecule.lower()]
        atom, default_spin = entry['atom'], entry['spin']
    elif Path(molecule).is_file():
        atom, default_spin = Path(molecule).read_text(), None
    else:
        atom, default_spin = molecule, None
    try:
        mol = gto.M(
            atom=atom,
            basis=basis,
            charge=charge,
            spin=default_spin if spin is None else spin,
            verbose=0,
            unit='Angstrom',
        )
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise click.ClickException(f'cannot build the molecule: {exc}') from exc
    return check_molecule(mol, basis)


def check_molecule(mol, basis: str):
    """``mol`` if DM21 can treat it, else a :class:`click.ClickException` saying why.

    Refused: atoms (nearly) on top of each other, a basis that brings effective core potentials (PySCF would
    run all electrons in a basis made for the valence ones: a wrong energy) and more electrons of one spin than
    basis functions.
    """
    from pyscf.data.nist import BOHR

    from ..runner.scf import basis_ecp, check_geometry, check_occupations

    symbols = [mol.atom_pure_symbol(i) for i in range(mol.natm)]
    problem = check_geometry(symbols, mol.atom_coords() * BOHR)
    if problem:
        raise click.ClickException(problem)
    ecp = basis_ecp(basis, symbols)
    if ecp:
        raise click.ClickException(
            f'basis {basis!r} brings effective core potentials for {", ".join(sorted(ecp))}: DM21 needs an '
            'all-electron basis set (e.g. cc-pVDZ, or def2 up to Kr)'
        )
    problem = check_occupations(mol.nelec, mol.nao_nr(), basis)
    if problem:
        raise click.ClickException(problem)
    return mol


@main.command('run')
@click.argument('molecule')
@click.option(
    '--functional', '-f', default='DM21', show_default=True, help='DM21, DM21m, DM21mc, DM21mu or a checkpoint.'
)
@click.option('--basis', '-b', default='cc-pvdz', show_default=True)
@click.option('--charge', default=0, show_default=True, type=int, help='Total charge.')
@click.option(
    '--spin',
    default=None,
    type=click.IntRange(min=0),
    help='2S (number of unpaired electrons, >= 0); default from the molecule.',
)
@click.option('--grid-level', default=3, show_default=True, type=GRID_LEVEL, help='PySCF grid level, 0 to 9.')
@click.option(
    '--device', default='cpu', show_default=True, help='cpu, cuda or cuda:N (refused where there is no such GPU).'
)
@click.option(
    '--disp',
    default='none',
    show_default=True,
    type=click.Choice(['none', *DISPERSION_VERSIONS]),
    help="Empirical dispersion with B3LYP's parameters (DM21's convention).",
)
@click.option('--json', 'as_json', is_flag=True, help='Print the results as JSON.')
def run_scf(
    molecule: str,
    functional: str,
    basis: str,
    charge: int,
    spin: int | None,
    grid_level: int,
    device: str,
    disp: str,
    as_json: bool,
):
    """Run a DM21 SCF in this process (no AiiDA) on MOLECULE: a name (water, h2, h, ch3, ne), an xyz file
    or a PySCF atom string."""
    from ..functional.checkpoint import CheckpointError
    from ..functional.numint import DeviceUnavailableError, UnsupportedSystemError
    from ..functional.scf import KS

    mol = _build_molecule(molecule, basis, charge, spin)
    try:
        mf = KS(mol, functional, device=device, disp=disp)
    except (CheckpointError, UnsupportedSystemError, DeviceUnavailableError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    mf.grids.level = grid_level
    start = time.perf_counter()
    with console.status(f'{type(mf).__name__[4:]} {functional}/{basis}: B3LYP guess, then DM21 SCF ...'):
        try:
            energy = mf.kernel()
        except (ValueError, RuntimeError, ArithmeticError, np.linalg.LinAlgError) as exc:
            raise click.ClickException(f'the SCF failed: {type(exc).__name__}: {exc}') from exc
    if not np.isfinite(energy):
        raise click.ClickException(
            f'the SCF gave a non-finite energy ({energy}): check the functional, the grid and the geometry'
        )
    result = {
        'molecule': molecule,
        'functional': mf.functional,
        'basis': basis,
        'scf': type(mf).__name__[4:],
        'e_tot': float(energy),
        'converged': bool(mf.converged),
        'ngrid': len(mf.grids.weights),
        'wall_s': round(time.perf_counter() - start, 2),
        'device': device,
        'dispersion': disp,
        'e_disp': float(mf.get_dispersion()),
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(
            f'{result["functional"]} {result["scf"]} {molecule}/{basis}: E = {energy:.10f} Ha '
            f'(converged={mf.converged}, {result["ngrid"]} grid points, {result["wall_s"]} s)'
        )
    if not mf.converged:
        sys.exit(3)


def _developer_mirror() -> str | None:
    """$AIIDA_DM21_WEIGHTS_SOURCE, else the read-only mirror beside a development checkout
    (``../shared/dm21/upstream``) if present, else None (DeepMind's repository)."""
    import os

    from ..functional.checkpoint import ENV_SOURCE

    if os.environ.get(ENV_SOURCE):
        return os.environ[ENV_SOURCE]
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base.parent / 'shared' / 'dm21' / 'upstream'
        if candidate.is_dir():
            return str(candidate)
    return None


from .fractional import fractional_curve as _fractional_curve  # noqa: E402

main.add_command(_fractional_curve)


from .aiida_cmds import checkpoint, demo, setup  # noqa: E402 (commands that need aiida-core, imported lazily inside)

main.add_command(demo)
main.add_command(setup)
main.add_command(checkpoint)


from .scf import scf as _scf  # noqa: E402 (`scf launch`: needs aiida-core, imported lazily inside)

main.add_command(_scf)


from .pipeline import pipeline as _pipeline  # noqa: E402 (`pipeline launch`: needs aiida-core, imported lazily inside)

main.add_command(_pipeline)

from .reference import reference as _reference  # noqa: E402 (`reference launch`: aiida-core imported lazily inside)
from .train import train as _train  # noqa: E402 (`train launch`: aiida-core imported lazily inside)

main.add_command(_reference)
main.add_command(_train)
