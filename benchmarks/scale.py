"""How DM21's SCF cost grows with the molecule: grid points, nao, B3LYP and DM21 SCF time, peak memory, nu path.

    python benchmarks/scale.py [--systems h2o c4h6 ...] [--device cpu|cuda] [--timeout 3600]

Each system runs in a fresh process (so its peak RSS is its own): a B3LYP (``b3lyp5``) SCF from PySCF's
default guess, then the DM21 SCF from that converged density on the same grid (level 3, original Treutler
grids), with default settings (screening, memory budget).  Printed per system: grid points, nao, B3LYP s
(cycles), DM21 s (cycles), DM21/B3LYP, peak RSS of the process, and the local-HF integral path the SCF
logged (what was kept and cached, and why).  Then the log-log slope of time against the number of atoms
over the linear alkanes, for DM21 and for B3LYP.  Geometries: ASE's G2 set (bicyclobutane, benzene), S22
(the adenine-thymine Watson-Crick pair), and ideal zig-zag alkanes built here.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import resource
import sys
import time

ALKANES = (2, 4, 8, 16)


def alkane(n: int) -> list[tuple[str, tuple[float, float, float]]]:
    """C_nH_{2n+2}, all-trans zig-zag (C-C 1.53 A, C-H 1.09 A, tetrahedral angles)."""
    half = 1.53 * math.sin(math.radians(109.47 / 2))
    rise = 1.53 * math.cos(math.radians(109.47 / 2))
    atoms = []
    for i in range(n):
        x, z, up = half * i, (rise / 2 if i % 2 else -rise / 2), (1 if i % 2 else -1)
        atoms.append(('C', (x, 0.0, z)))
        for side in (1, -1):
            atoms.append(('H', (x, side * 0.890, z + up * 0.629)))
    z0, zn = -rise / 2, (rise / 2 if (n - 1) % 2 else -rise / 2)
    atoms.append(('H', (-1.027, 0.0, z0 - 0.363 if n > 1 else z0 - 1.09)))
    atoms.append(('H', (half * (n - 1) + 1.027, 0.0, zn + (0.363 if (n - 1) % 2 else -0.363))))
    return atoms


def _ase_atoms(kind: str, name: str):
    if kind == 'g2':
        from ase.build import molecule

        atoms = molecule(name)
    else:
        from ase.collections import s22

        atoms = s22[name]
    return [(s, tuple(p)) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions, strict=True)]


SYSTEMS: dict[str, tuple] = {
    'h2o': ('H2O/cc-pVDZ', lambda: 'O 0 0 0.117790; H 0 0.755453 -0.471161; H 0 -0.755453 -0.471161', 'cc-pvdz'),
    'c4h6': ('C4H6/6-31G*', lambda: _ase_atoms('g2', 'bicyclobutane'), '6-31g*'),
    'c4h6-tz': ('C4H6/cc-pVTZ', lambda: _ase_atoms('g2', 'bicyclobutane'), 'cc-pvtz'),
    'benzene': ('C6H6/cc-pVDZ', lambda: _ase_atoms('g2', 'C6H6'), 'cc-pvdz'),
    **{f'c{n}': (f'C{n}H{2 * n + 2}/6-31G*', (lambda n=n: alkane(n)), '6-31g*') for n in ALKANES},
    'at': ('adenine-thymine/def2-SVP', lambda: _ase_atoms('s22', 'Adenine-thymine_Watson-Crick_complex'), 'def2-svp'),
}


def _run_one(key: str, device: str, queue) -> None:
    import io

    from pyscf import dft, gto

    from aiida_dm21.functional.scf import KS, treutler_ahlrichs_original

    label, atoms, basis = SYSTEMS[key]
    mol = gto.M(atom=atoms(), basis=basis, verbose=0)
    b3 = dft.RKS(mol)
    b3.xc = 'b3lyp5'
    b3.grids.level = 3
    b3.grids.radi_method = treutler_ahlrichs_original
    t0 = time.perf_counter()
    b3.kernel()
    t_b3 = time.perf_counter() - t0
    b3_cycles = b3.cycles
    dm = b3.make_rdm1()
    log = io.StringIO()
    mol.verbose, mol.stdout = 3, log  # the SCF's one line on the integral path, nothing else at this level
    mf = KS(mol, 'DM21', device=device)
    mf.stdout = log
    t0 = time.perf_counter()
    mf.kernel(dm0=dm)
    t_dm21 = time.perf_counter() - t0
    path = next((line for line in log.getvalue().splitlines() if line.startswith('DM21 local-HF')), '?')
    queue.put(
        {
            'key': key,
            'system': label,
            'atoms': mol.natm,
            'ngrid': len(mf.grids.weights),
            'nao': mol.nao,
            'b3lyp_s': t_b3,
            'b3lyp_cycles': b3_cycles,
            'dm21_s': t_dm21,
            'dm21_cycles': mf.cycles,
            'converged': bool(mf.converged),
            'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,  # KiB on Linux
            'timings': mf._numint.timings.as_dict(),
            'path': path.split('; ', 1)[1] if '; ' in path else path,
        }
    )


def run_system(key: str, device: str, timeout: float) -> dict:
    ctx = multiprocessing.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_one, args=(key, device, queue))
    proc.start()
    try:
        return queue.get(timeout=timeout)
    except Exception:
        proc.kill()
        return {'key': key, 'system': SYSTEMS[key][0], 'error': f'no result within {timeout:.0f} s (or it crashed)'}
    finally:
        proc.join(5)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(time) against log(atoms)."""
    xs, ys = [math.log(a) for a, _ in points], [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--systems', nargs='+', choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N (refused where there is no GPU)')
    parser.add_argument('--timeout', type=float, default=3600.0, help='seconds per system (default 3600)')
    parser.add_argument('--json', help='also write the rows to this file')
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error('--timeout must be positive')
    if args.device != 'cpu':
        from aiida_dm21.functional.numint import DeviceUnavailableError, check_device

        try:
            check_device(args.device)
        except (ValueError, DeviceUnavailableError) as exc:
            parser.error(str(exc))
    header = (
        f'{"system":<26} {"atoms":>5} {"grid":>8} {"nao":>5} {"B3LYP s (cyc)":>14} {"DM21 s (cyc)":>14} '
        f'{"ratio":>6} {"peak GB":>8}  nu path'
    )
    print(header)
    rows = []
    for key in args.systems:
        row = run_system(key, args.device, args.timeout)
        rows.append(row)
        if 'error' in row:
            print(f'{row["system"]:<26} {row["error"]}', flush=True)
            continue
        print(
            f'{row["system"]:<26} {row["atoms"]:>5} {row["ngrid"]:>8} {row["nao"]:>5} '
            f'{row["b3lyp_s"]:>9.1f} ({row["b3lyp_cycles"]:>2}) {row["dm21_s"]:>9.1f} ({row["dm21_cycles"]:>2}) '
            f'{row["dm21_s"] / row["b3lyp_s"]:>6.1f} {row["peak_rss_gb"]:>8.2f}  {row["path"]}',
            flush=True,
        )
    alkanes = [r for r in rows if r['key'] in {f'c{n}' for n in ALKANES} and 'error' not in r]
    if len(alkanes) >= 2:
        dm21 = slope([(r['atoms'], r['dm21_s']) for r in alkanes])
        b3lyp = slope([(r['atoms'], r['b3lyp_s']) for r in alkanes])
        print(f'alkanes ({len(alkanes)}): log-log slope of time vs atoms: DM21 {dm21:.2f}, B3LYP {b3lyp:.2f}')
    if args.json:
        with open(args.json, 'w') as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
