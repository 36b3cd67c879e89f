"""Cost of DM21 analytic nuclear gradients against the SCF they follow: SCF time, gradient time, ratio, peak RSS.

    python benchmarks/gradient_speed.py [--systems h2o c4h6] [--timeout 3600] [--no-grid-response]

Each system runs in a fresh process (so its peak RSS is its own): the DM21 SCF with default settings (float32
network, screening, memory budget, B3LYP initial guess, grids.level 3), then ``mf.nuc_grad_method().kernel()``
(grid response on, the default).  Printed per system: grid points, nao, SCF s (cycles), gradient s, their
ratio, the gradient's split (the XC part, which this package computes, against the rest: PySCF's one-electron,
Coulomb and overlap derivatives), the sum of the gradient over atoms (translational invariance) and the peak
RSS of the process.  Geometries: H2O (as in ``scf_speed.py``), bicyclobutane from ASE's G2 set.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time

SYSTEMS: dict[str, tuple] = {
    'h2o': ('H2O/cc-pVDZ', 'water', 'cc-pvdz'),
    'c4h6': ('C4H6/6-31G*', 'bicyclobutane', '6-31g*'),
}


def _atoms(name: str):
    if name == 'water':
        return 'O 0 0 0.117790; H 0 0.755453 -0.471161; H 0 -0.755453 -0.471161'
    from ase.build import molecule

    atoms = molecule(name)
    return [(s, tuple(p)) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions, strict=True)]


def _run_one(key: str, grid_response: bool, queue) -> None:
    from pyscf import gto

    from aiida_dm21.functional import grad as dm21_grad
    from aiida_dm21.functional.scf import KS

    label, name, basis = SYSTEMS[key]
    mol = gto.M(atom=_atoms(name), basis=basis, verbose=0)
    mf = KS(mol, 'DM21')
    t0 = time.perf_counter()
    mf.kernel()
    t_scf = time.perf_counter() - t0
    xc_seconds = []
    original = dm21_grad.xc_gradient

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            xc_seconds.append(time.perf_counter() - t)

    dm21_grad.xc_gradient = timed
    try:
        g = mf.nuc_grad_method()
        g.grid_response = grid_response
        t0 = time.perf_counter()
        de = g.kernel()
        t_grad = time.perf_counter() - t0
    finally:
        dm21_grad.xc_gradient = original
    queue.put(
        {
            'key': key,
            'system': label,
            'atoms': mol.natm,
            'ngrid': len(mf.grids.weights),
            'nao': mol.nao,
            'scf_s': t_scf,
            'cycles': mf.cycles,
            'converged': bool(mf.converged),
            'grad_s': t_grad,
            'xc_s': sum(xc_seconds),
            'max_sum': float(abs(de.sum(0)).max()),
            'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,  # KiB on Linux
        }
    )


def run_system(key: str, grid_response: bool, timeout: float) -> dict:
    ctx = multiprocessing.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_one, args=(key, grid_response, queue))
    proc.start()
    try:
        return queue.get(timeout=timeout)
    except Exception:
        proc.kill()
        return {'key': key, 'system': SYSTEMS[key][0], 'error': f'no result within {timeout:.0f} s (or it crashed)'}
    finally:
        proc.join(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--systems', nargs='+', choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument('--timeout', type=float, default=3600.0, help='seconds per system (default 3600)')
    parser.add_argument('--no-grid-response', action='store_true', help='gradients without the grid response')
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error('--timeout must be positive')
    print(
        f'{"system":<14} {"atoms":>5} {"grid":>7} {"nao":>4} {"SCF s (cyc)":>12} {"grad s":>7} {"grad/SCF":>8} '
        f'{"XC s":>6} {"rest s":>6} {"|sum|":>8} {"peak GB":>7}'
    )
    for key in args.systems:
        row = run_system(key, not args.no_grid_response, args.timeout)
        if 'error' in row:
            print(f'{row["system"]:<14} {row["error"]}', flush=True)
            continue
        print(
            f'{row["system"]:<14} {row["atoms"]:>5} {row["ngrid"]:>7} {row["nao"]:>4} '
            f'{row["scf_s"]:>7.1f} ({row["cycles"]:>2}) {row["grad_s"]:>7.1f} {row["grad_s"] / row["scf_s"]:>8.2f} '
            f'{row["xc_s"]:>6.1f} {row["grad_s"] - row["xc_s"]:>6.1f} {row["max_sum"]:>8.1e} '
            f'{row["peak_rss_gb"]:>7.2f}',
            flush=True,
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
