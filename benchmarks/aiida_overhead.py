"""AiiDA's overhead on many tiny reference calculations: ``dm21.reference_data`` against a plain Python loop.

    python benchmarks/aiida_overhead.py [--n 50] [--batch-size 1 50] [--max-concurrent 1]

N tiny integer species (H, He+, He, Li+, Li2+ in turn: at most two electrons, FCI/6-31G, milliseconds of
PySCF each) go through the ``ReferenceDataWorkChain`` on the daemon-less in-process runner (``run_get_node``;
the CalcJobs run as ``python -m aiida_dm21.runner.reference`` on localhost through the ``core.direct``
scheduler, as a daemon would run them) once per ``--batch-size``, and the same PySCF work runs in one plain
Python loop calling the runner's compute function (:func:`aiida_dm21.runner.reference.compute`).  The
workchain's time includes everything AiiDA does: validating the inputs, storing nodes, writing job folders,
starting the job processes (each imports NumPy and PySCF), retrieving and parsing, and building the
dataset of the N integer systems.

Printed: N, batch size, CalcJobs, wall time AiiDA, wall time plain, species/s through AiiDA, AiiDA
processes (workchain, CalcJobs, calcfunction) per second, overhead % = (AiiDA - plain) / plain, and peak
RSS of this process (the workchain, its parsers) and of the largest job process.  A throw-away SQLite
profile (``verdi presto`` in a temporary AIIDA_PATH) is used unless ``--keep-profile`` names a folder;
``--storage psql`` makes a throw-away ``core.psql_dos`` profile instead, in a new database of the PostgreSQL
server at 127.0.0.1:5432 (user ``postgres``, trust authentication, as on this project's machines), dropped at
the end: the same work with PostgreSQL's commits instead of SQLite's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

#: (label stem, atom, charge, multiplicity): at most two electrons each
SPECIES_CYCLE = (
    ('H', 'H 0 0 0', 0, 2),
    ('He+', 'He 0 0 0', 1, 2),
    ('He', 'He 0 0 0', 0, 1),
    ('Li+', 'Li 0 0 0', 1, 1),
    ('Li2+', 'Li 0 0 0', 2, 2),
)
#: ``--species ten-electron``: closed-shell ten-electron ions and Ne, CCSD(T)/cc-pVTZ, 0.4-1.4 s of PySCF each: real
#: reference calculations, where the cost per species is what makes AiiDA's fixed cost per species small or not
TEN_ELECTRON_CYCLE = (
    ('Ne', 'Ne 0 0 0', 0, 1),
    ('F-', 'F 0 0 0', -1, 1),
    ('Na+', 'Na 0 0 0', 1, 1),
    ('Mg2+', 'Mg 0 0 0', 2, 1),
)
BASIS = '6-31g'
METHOD = 'fci'
#: ``--species``: (species cycle, basis, reference method)
SPECIES_SETS = {
    'tiny': (SPECIES_CYCLE, BASIS, METHOD),
    'ten-electron': (TEN_ELECTRON_CYCLE, 'cc-pvtz', 'ccsd(t)'),
}


def species(n: int, cycle: tuple = SPECIES_CYCLE) -> list[dict]:
    """``n`` species ``{label, atom, charge, multiplicity}`` cycling through ``cycle`` (:data:`SPECIES_CYCLE`)."""
    out = []
    for i in range(n):
        stem, atom, charge, multiplicity = cycle[i % len(cycle)]
        out.append({'label': f'{stem}_{i}', 'atom': atom, 'charge': charge, 'multiplicity': multiplicity})
    return out


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--n', type=_positive, default=50, help='number of species (default 50)')
    parser.add_argument(
        '--batch-size', type=_positive, nargs='+', default=[1, 50], help='species per CalcJob (default: 1 50)'
    )
    parser.add_argument('--max-concurrent', type=_positive, default=None, help='CalcJobs in flight (default: all)')
    parser.add_argument('--keep-profile', type=Path, default=None, help='AIIDA_PATH folder to use and keep')
    parser.add_argument(
        '--species',
        choices=tuple(SPECIES_SETS),
        default='tiny',
        help='tiny: H..Li2+ (<= 2 electrons), FCI/6-31G, ~20-40 ms each (default); ten-electron: Ne, F-, Na+, '
        'Mg2+, CCSD(T)/cc-pVTZ, 0.4-1.4 s each',
    )
    parser.add_argument(
        '--storage',
        choices=('sqlite', 'psql'),
        default='sqlite',
        help='profile storage: sqlite (verdi presto, default) or psql (core.psql_dos, PostgreSQL at 127.0.0.1)',
    )
    return parser.parse_args(argv)


def plain_loop(items: list[dict], basis: str = BASIS, method: str = METHOD) -> float:
    """The same PySCF work, in this process, one species after the other (after one untimed warm-up species);
    returns the wall time."""
    from aiida_dm21.runner.reference import compute
    from aiida_dm21.workflows.reference_data import atoms_of

    def run(item: dict) -> None:
        symbols, positions = atoms_of(item['atom'])
        compute(
            {
                'symbols': symbols,
                'positions': positions,
                'basis': basis,
                'charge': item['charge'],
                'spin': item['multiplicity'] - 1,
                'density_method': 'hf',
                'reference_method': method,
                'label': item['label'],
            }
        )

    with contextlib.redirect_stdout(io.StringIO()):  # the runner's progress lines
        run(items[0])  # warm: PySCF's first calculation in a process sets up tables the others reuse
        start = time.perf_counter()
        for item in items:
            run(item)
        return time.perf_counter() - start


def through_aiida(
    items: list[dict], batch_size: int, max_concurrent: int | None, basis: str = BASIS, method: str = METHOD
) -> tuple[float, int, int]:
    """The workchain on ``items``; returns (wall time, CalcJobs, processes)."""
    from aiida import orm
    from aiida.engine import run_get_node

    from aiida_dm21.cli.aiida_support import ensure_code
    from aiida_dm21.workflows.reference_data import ReferenceDataWorkChain

    inputs = {
        'code': ensure_code(),
        'species': orm.List(items),
        'fractional': orm.Dict({'integer': [item['label'] for item in items]}),
        'reference_method': orm.Str(method),
        'basis': orm.Str(basis),
        'batch_size': orm.Int(batch_size),
    }
    if max_concurrent is not None:
        inputs['max_concurrent'] = orm.Int(max_concurrent)
    start = time.perf_counter()
    _, node = run_get_node(ReferenceDataWorkChain, **inputs)
    wall = time.perf_counter() - start
    if not node.is_finished_ok:
        raise SystemExit(f'the workchain failed: {node.exit_status} {node.exit_message}')
    jobs = [c for c in node.called if isinstance(c, orm.CalcJobNode)]
    return wall, len(jobs), len(node.called) + 1


PG = {'host': '127.0.0.1', 'port': 5432, 'user': 'postgres'}


@contextlib.contextmanager
def psql_profile(root: Path):
    """A ``core.psql_dos`` profile (no broker: the workchain runs in this process) in a new database; the
    database is dropped on leaving."""
    import subprocess
    import uuid

    import psycopg

    name = f'dm21_overhead_{uuid.uuid4().hex[:10]}'
    connect = f'host={PG["host"]} port={PG["port"]} user={PG["user"]} dbname=postgres'
    with psycopg.connect(connect, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE {name}')
    try:
        command = [sys.executable, '-m', 'aiida', 'profile', 'setup', 'core.psql_dos', '--non-interactive']
        command += ['--profile-name', name, '--set-as-default', '--email', 'bench@dm21', '--first-name', 'DM21']
        command += ['--last-name', 'Bench', '--institution', 'aiida-dm21', '--broker', 'none']
        command += ['--database-hostname', PG['host'], '--database-port', str(PG['port'])]
        command += ['--database-username', PG['user'], '--database-password', '', '--database-name', name]
        command += ['--repository-uri', (root / 'repository').as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=300)
        if done.returncode != 0:
            raise SystemExit(f'verdi profile setup core.psql_dos failed:\n{done.stdout}{done.stderr}')
        # as `verdi presto` does for the SQLite profile: poll the jobs every second, not AiiDA's default 60 s
        command = [sys.executable, '-m', 'aiida', '-p', name, 'config', 'set', 'runner.poll.interval', '1']
        subprocess.run(command, capture_output=True, text=True, env=os.environ, timeout=120, check=True)
        yield name
    finally:
        with contextlib.suppress(Exception):
            from aiida.manage import get_manager

            get_manager().get_profile_storage().close()  # the database cannot be dropped while connected
        with psycopg.connect(connect, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault('OMP_NUM_THREADS', '1')  # the same single thread in the loop and in every job
    with tempfile.TemporaryDirectory(prefix='dm21-overhead-') as tmp, contextlib.ExitStack() as stack:
        os.environ['AIIDA_PATH'] = str(args.keep_profile or tmp)
        from aiida_dm21.cli.aiida_support import load_profile

        if args.storage == 'psql':
            load_profile(stack.enter_context(psql_profile(Path(os.environ['AIIDA_PATH']))))
        else:
            load_profile(create=True)
        cycle, basis, method = SPECIES_SETS[args.species]
        items = species(args.n, cycle)
        plain = plain_loop(items, basis, method)
        rows = []
        for batch_size in args.batch_size:
            wall, n_jobs, n_processes = through_aiida(items, batch_size, args.max_concurrent, basis, method)
            own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            rows.append(
                (args.n, batch_size, n_jobs, wall, plain, n_processes / wall, (wall - plain) / plain, own, child)
            )
            print(f'batch size {batch_size}: {wall:.1f} s through AiiDA, {plain:.1f} s plain', file=sys.stderr)
    concurrent = args.max_concurrent or 'all'
    print(
        f'\nN species ({args.species}), {method.upper()}/{basis}, max_concurrent={concurrent}, '
        f'OMP_NUM_THREADS={os.environ["OMP_NUM_THREADS"]}, storage {args.storage}'
    )
    header = (
        '| N | batch size | CalcJobs | wall AiiDA (s) | wall plain (s) | species/s AiiDA | processes/s | '
        'overhead % | peak RSS workchain (MiB) | peak RSS job (MiB) |'
    )
    print(header)
    print('|' + '---|' * (header.count('|') - 1))
    for n, batch, jobs, wall, plain_s, rate, overhead, own, child in rows:
        print(
            f'| {n} | {batch} | {jobs} | {wall:.1f} | {plain_s:.1f} | {n / wall:.1f} | {rate:.2f} | '
            f'{100 * overhead:.0f} | {own:.0f} | {child:.0f} |'
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
