"""The numba kernels give the same bits when compiled in the process and when loaded from numba's disk cache.

numba optimises a ``parallel=True`` function loaded from its cache differently from one it has just compiled
(numba/numba#10617).  With the fast-math flag ``reassoc`` LLVM may then sum in another order: the float64 row sums
of ``elu_layer_norm_backward`` did, and the first SCF after a cold cache (the one that compiled the kernels) gave
another energy than every later one (1e-8 Ha after one cycle of stretched LiH, 5e-7 Ha three restarts later;
found by ``tests/aiida/test_daemon_restarts.py``).  Each kernel runs here in two fresh processes that share one
empty cache folder: the first compiles and writes it, the second loads it; their outputs must be identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('numba')

REPO = Path(__file__).resolve().parents[1]

#: every kernel on seeded inputs of the sizes the SCF uses (256-wide activations, a few hundred grid points)
SCRIPT = r"""
import sys
import numpy as np
from aiida_dm21.functional import kernels as k

assert k.available()
rng = np.random.default_rng(7)
rows, width = 512, 256
a, b = (rng.normal(size=(rows, width)).astype(np.float32) for _ in range(2))
gamma, beta = rng.normal(size=width).astype(np.float32), rng.normal(size=width).astype(np.float32)
out, mean, rstd = np.empty_like(a), np.empty(rows, np.float32), np.empty(rows, np.float32)
k.layer_norm_elu(a, b, gamma, beta, 1e-5, out, mean, rstd)
grad_h = rng.normal(size=(rows, width)).astype(np.float32)
grad_z = np.empty_like(a)
k.elu_layer_norm_backward(grad_h, out, a, b, mean, rstd, gamma, grad_z)
t = a.copy()
k.tanh_(t)
points, spins, nao, kept, n_omega = 300, 2, 24, 16, 2
ao = rng.normal(size=(4, points, nao))
dm = rng.normal(size=(spins, nao, nao))
x = np.ascontiguousarray(np.einsum('ga,sab->gsb', ao[0], dm))
y = np.ascontiguousarray(np.einsum('kga,sab->kgsb', ao[1:], dm))
idx = np.sort(rng.choice(nao, kept, replace=False)).astype(np.int64)
xs = np.ascontiguousarray(x[..., idx])
nu = rng.normal(size=(n_omega, points, kept * (kept + 1) // 2))
rho, grad, tau = np.empty((points, spins)), np.empty((3, points, spins)), np.empty((points, spins))
nu_x, hfx = np.empty((n_omega, points, spins, kept)), np.empty((n_omega, points, spins))
k.point_features(ao, x, y, nu, xs, rho, grad, tau, nu_x, hfx)
potential = np.empty((4, points, spins, nao))
k.point_potential(ao, nu_x, idx, rho, grad, tau, hfx, potential)
full = np.asfortranarray(rng.normal(size=(points, 8, 8)))
packed = np.empty((points, 36))
k.pack_grid_integrals(full, packed)
np.savez(sys.argv[1], out=out, mean=mean, rstd=rstd, grad_z=grad_z, tanh=t, rho=rho, grad=grad, tau=tau,
         nu_x=nu_x, hfx=hfx, potential=potential, packed=packed)
"""


def test_cached_kernels_equal_compiled_ones(tmp_path):
    env = {**os.environ, 'NUMBA_CACHE_DIR': str(tmp_path / 'cache'), 'AIIDA_DM21_FUSED': '1'}
    env['PYTHONPATH'] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get('PYTHONPATH')])])
    results = []
    for run in ('compiled', 'cached'):
        path = tmp_path / f'{run}.npz'
        subprocess.run([sys.executable, '-c', SCRIPT, str(path)], env=env, check=True, timeout=600)
        results.append(np.load(path))
        if run == 'compiled':  # the first process wrote the cache the second one loads
            assert list((tmp_path / 'cache').rglob('*.nbi')), 'numba wrote no cache'
    compiled, cached = results
    differ = {
        key: float(np.abs(compiled[key] - cached[key]).max())
        for key in compiled
        if not np.array_equal(compiled[key], cached[key])
    }
    assert not differ, f'outputs of the cached kernels differ from the compiled ones (largest difference): {differ}'
