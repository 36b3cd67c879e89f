#!/usr/bin/env bash
# GPU check of the DM21 SCF (issue 9): GPU vs CPU SCF time for H2O/cc-pVDZ and C4H6/6-31G*, and the energy
# difference between the two.  Run on a machine with one CUDA GPU, from the repository root, after README
# command 1 (or with PY pointing at a Python that has aiida-dm21 and a CUDA build of PyTorch):
#     bash benchmarks/gpu_check.sh
# Budget: under 5 minutes from a cold start.  On a machine without a GPU it stops at once with the refusal.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -c 'import ase' 2>/dev/null || "$PY" -m pip install -q ase
for name in DM21; do
    "$PY" -c "from aiida_dm21.cli import main; main()" weights list 2>/dev/null | grep -q "^$name\b" \
        || "$PY" -c "from aiida_dm21.cli import main; main()" weights import "../shared/dm21/upstream/$name" >/dev/null
done
exec "$PY" - <<'PYEOF'
import sys
import time

import torch
from ase.build import molecule
from pyscf import dft, gto

from aiida_dm21.functional.numint import check_device
from aiida_dm21.functional.scf import KS, treutler_ahlrichs_original

try:
    check_device('cuda')
except Exception as exc:  # no GPU here: say so and stop, never time a CPU run as a GPU one
    sys.exit(f'gpu_check: {exc}')
print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)
c4h6 = molecule('bicyclobutane')
systems = {
    'H2O/cc-pVDZ': ('O 0 0 0.117790; H 0 0.755453 -0.471161; H 0 -0.755453 -0.471161', 'cc-pvdz'),
    'C4H6/6-31G*': ([(s, tuple(p)) for s, p in zip(c4h6.get_chemical_symbols(), c4h6.positions)], '6-31g*'),
}
print(f'{"system":<14} {"CPU s (cyc)":>12} {"GPU s (cyc)":>12} {"speed-up":>9} {"E_GPU - E_CPU (Ha)":>19}')
for label, (atom, basis) in systems.items():
    mol = gto.M(atom=atom, basis=basis, verbose=0)
    b3 = dft.RKS(mol, xc='b3lyp5')
    b3.grids.level = 3
    b3.grids.radi_method = treutler_ahlrichs_original
    dm = b3.run().make_rdm1()
    row = {}
    for device in ('cpu', 'cuda'):
        mf = KS(mol, 'DM21', device=device)
        if device == 'cuda':  # warm-up: CUDA context and kernels, not part of the SCF
            KS(gto.M(atom='H 0 0 0; H 0 0 0.74', basis='sto-3g', verbose=0), 'DM21', device=device).kernel()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        energy = mf.kernel(dm0=dm)
        row[device] = (time.perf_counter() - t0, mf.cycles, energy)
    (tc, cc, ec), (tg, cg, eg) = row['cpu'], row['cuda']
    print(f'{label:<14} {tc:>7.2f} ({cc:>2}) {tg:>7.2f} ({cg:>2}) {tc / tg:>8.1f}x {eg - ec:>+19.2e}', flush=True)
PYEOF
