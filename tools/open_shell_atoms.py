"""Reproduce the open-shell-atom analysis of docs/core.md: starting states vs DeepMind's reference runs.

    python tools/open_shell_atoms.py [--scan]

For the C/STO-3G and O/cc-pVDZ triplet records of ``../shared/dm21/reference_energies.json``: the B3LYP
energy of the symmetric state (open shell on a grid axis) and of the lowest state over
``atoms.DEFAULT_DIRECTIONS``, each against the record's ``e_b3lyp_same_grid``, and the DM21 energy from
the documented start against DeepMind's.  ``--scan`` also prints the B3LYP energy of every direction.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyscf
from pyscf import gto

from aiida_dm21.functional import atoms
from aiida_dm21.functional.scf import KS

SHARED = Path(__file__).resolve().parents[2] / 'shared' / 'dm21'
START = {'C_sto3g': 'symmetric', 'O_trip': 'lowest'}  # as in tests/test_reference_energies.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--scan', action='store_true', help='print the B3LYP energy of every scanned direction')
    args = parser.parse_args()
    records = json.loads((SHARED / 'reference_energies.json').read_text())['records']
    print(f'PySCF {pyscf.__version__}')
    for system, choice in START.items():
        recs = [r for r in records if r['system'] == system]
        first = recs[0]
        mol = gto.M(atom=first['atom'], basis=first['basis'], spin=first['spin'], verbose=0)
        mf = KS(mol, SHARED / 'upstream' / first['functional'])
        t0 = time.perf_counter()
        dm_sym, e_sym = atoms.oriented_guess(mf, (0.0, 0.0, 1.0))
        scan = atoms.lowest_guess(mf)
        elapsed = time.perf_counter() - t0
        best = np.round(scan.directions[scan.best], 3)
        print(f'\n{system}: B3LYP symmetric {e_sym:.10f}, lowest {scan.energy:.10f} along {best}')
        print(f'  spread over {len(scan.energies)} directions {scan.spread:.2e} Ha ({elapsed:.0f} s for both starts)')
        if args.scan:
            for direction, energy in zip(scan.directions, scan.energies, strict=True):
                print(f'    {np.round(direction, 3)}  {energy:.10f}')
        dm0, e0 = (dm_sym, e_sym) if choice == 'symmetric' else (scan.dm, scan.energy)
        for record in recs:
            mf = KS(mol, SHARED / 'upstream' / record['functional'])
            mf.conv_tol, mf.conv_tol_grad = record['conv_tol'], record['conv_tol_grad']
            energy = mf.kernel(dm0=dm0)
            print(
                f'  {record["functional"]:<7} start={choice:<9} '
                f'B3LYP vs record {e0 - record["e_b3lyp_same_grid"]:+.1e}  '
                f'DM21 vs DeepMind {energy - record["e_tot"]:+.2e} Ha  converged={mf.converged}'
            )


if __name__ == '__main__':
    main()
