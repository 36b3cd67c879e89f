"""Fused element-wise kernels of the SCF's XC evaluation, compiled by numba (no AiiDA, no PyTorch).

Network (float32).  Between its matrix products the DM21 network does memory-bound element-wise work on
256-wide activations: skip connection, layer norm, ELU, tanh and their derivatives.  PyTorch runs each as
its own pass over memory, and on CPUs with AVX2 but no AVX-512 its ELU (``expm1`` from SLEEF) alone costs
40 % of a 256 x 256 matrix product.  Here each residual block's skip connection + layer norm + ELU is one
pass (:func:`layer_norm_elu`), its backward one more (:func:`elu_layer_norm_backward`), tanh one (:func:`tanh_`):

* layer-norm statistics are accumulated in float64 (PyTorch accumulates in float32), then the row is
  normalised, scaled and shifted in float32;
* ELU's negative branch is ``exp(y) - 1``, the formula TensorFlow documents for ``tf.nn.elu`` (the published
  DM21 graphs use it), with ``exp`` evaluated inline: Cody-Waite reduction by ln 2 and a degree-7
  polynomial, within 1.2 float32 ulp on [-87, 0] (measured), so the compiler can vectorise it;
* the backward pass recomputes the normalised input from the saved mean and 1/std instead of storing it.

Features (float64).  :func:`point_features` and :func:`point_potential` do the per-grid-point products of
``numint._block_features`` / ``numint._block_potential`` (densities, nu E, local HF energies, and the
right-hand factors of dE/dD) in one pass each instead of a dozen broadcast PyTorch operations.

Against float64 references these kernels are as accurate as PyTorch's (``tests/test_model.py``,
``tests/test_numint.py``).  :func:`available` says whether numba is importable and ``AIIDA_DM21_FUSED=0``
has not switched them off.  They compile on first use (a few seconds) and numba caches them on disk.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

__all__ = [
    'available',
    'elu_layer_norm_backward',
    'layer_norm_elu',
    'pack_index',
    'point_features',
    'point_potential',
    'tanh_',
]

try:  # numba is a dependency, but the network must still run where it cannot be imported
    import numba
    from llvmlite import ir
    from numba import njit, prange
    from numba.core import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only on platforms without numba wheels
    numba = None

_FASTMATH = {'reassoc', 'contract', 'nsz', 'arcp'}  # vectorisable sums; no assumptions about NaN or inf
#: Without ``reassoc``, for the kernels whose sums LLVM otherwise orders differently when numba loads them from
#: its disk cache than when it has just compiled them (numba/numba#10617: a cached ``parallel=True`` function is
#: optimised anew): the first SCF after a cold cache then gave other energies than the later ones (1e-8 Ha).
#: As fast here (they are memory-bound); ``tests/test_kernel_cache.py`` compares all kernels compiled and cached.
_FASTMATH_ORDERED = _FASTMATH - {'reassoc'}


_WORKING: bool | None = None


def available() -> bool:
    """True when the kernels are used: numba importable, ``AIIDA_DM21_FUSED`` not ``0``, and they work here.

    The first call compiles every kernel (or loads it from numba's cache) and checks it against numpy on a
    few rows; a kernel that fails to compile or disagrees switches all of them off for the process, with a
    warning, and PyTorch's operations are used instead.
    """
    global _WORKING
    if numba is None or os.environ.get('AIIDA_DM21_FUSED', '1') == '0':
        return False
    if _WORKING is None:
        try:
            _WORKING = _self_check()
        except Exception as exc:  # any failure of the JIT means: do not use it
            warnings.warn(f'aiida-dm21: numba kernels unavailable ({exc}); using PyTorch operations', stacklevel=2)
            _WORKING = False
    return _WORKING


def _self_check() -> bool:
    """Run each kernel once on small inputs (compiling it) and compare with numpy."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 16)).astype(np.float32)
    y = x.copy()
    tanh_(y)
    ok = np.allclose(y, np.tanh(x), rtol=1e-6, atol=1e-6)
    gamma, beta = np.ones(16, np.float32), np.zeros(16, np.float32)
    out, mean, rstd = np.empty_like(x), np.empty(3, np.float32), np.empty(3, np.float32)
    layer_norm_elu(x, x, gamma, beta, 1e-5, out, mean, rstd)
    z = 2.0 * x.astype(np.float64)
    norm = (z - z.mean(1, keepdims=True)) / np.sqrt(z.var(1, keepdims=True) + 1e-5)
    ok &= np.allclose(out, np.where(norm > 0, norm, np.expm1(norm)), rtol=1e-5, atol=1e-5)
    grad = np.empty_like(x)
    elu_layer_norm_backward(x, out, x, x, mean, rstd, gamma, grad)
    ok &= bool(np.isfinite(grad).all())
    ao, dm = rng.normal(size=(4, 5, 3)), rng.normal(size=(1, 3, 3))
    xs = np.ascontiguousarray(np.einsum('ga,sab->gsb', ao[0], dm))
    ys = np.ascontiguousarray(np.einsum('kga,sab->kgsb', ao[1:], dm))
    rho, grad_rho, tau = np.empty((5, 1)), np.empty((3, 5, 1)), np.empty((5, 1))
    for nu_dtype in (np.float64, np.float32):  # the SCF stores screened integrals in either
        idx = np.array([0, 2], dtype=np.int64)  # a screened subset of the AOs
        nu = rng.normal(size=(2, 5, 2, 2)).astype(nu_dtype)
        nu = nu + nu.transpose(0, 1, 3, 2)  # symmetric, as the integrals are
        rows, cols = np.tril_indices(2)
        nu_x, hfx = np.empty((2, 5, 1, 2)), np.empty((2, 5, 1))
        packed = np.ascontiguousarray(nu[:, :, rows, cols])
        point_features(ao, xs, ys, packed, np.ascontiguousarray(xs[..., idx]), rho, grad_rho, tau, nu_x, hfx)
        ok &= np.allclose(rho[:, 0], np.einsum('gb,gb->g', xs[:, 0], ao[0]))
        ok &= np.allclose(nu_x[:, :, 0], np.einsum('wgbd,gd->wgb', nu.astype(np.float64), xs[:, 0, idx]))
        rhs = np.empty((4, 5, 1, 3))
        point_potential(ao, nu_x, idx, rho, grad_rho, tau, hfx, rhs)
        expected = rho[:, 0, None] * ao[0] + 2.0 * np.einsum('kg,kgb->gb', grad_rho[:, :, 0], ao[1:])
        expected[:, idx] -= np.einsum('wg,wgb->gb', hfx[:, :, 0], nu_x[:, :, 0])
        ok &= np.allclose(rhs[0, :, 0], expected)
    full = np.asfortranarray(rng.normal(size=(5, 3, 3)))  # libcint's (g, k, k) layout, grid index fastest
    for dtype in (np.float64, np.float32):
        packed = np.empty((5, 6), dtype=dtype)
        _pack_grid_integrals(full.transpose(2, 1, 0), packed)
        rows, cols = np.tril_indices(3)
        ok &= np.array_equal(packed, full[:, rows, cols].astype(dtype))
    if not ok:
        warnings.warn('aiida-dm21: numba kernels disagree with numpy here; using PyTorch operations', stacklevel=3)
    return bool(ok)


def _compiled(func=None, *, fastmath: set[str] = _FASTMATH):
    """numba's parallel JIT, cached on disk where numba finds a writable place (else compiled per process).

    ``@_compiled`` with the flags :data:`_FASTMATH`, ``@_compiled(fastmath=...)`` with others.
    """
    if func is None:
        return lambda f: _compiled(f, fastmath=fastmath)
    try:
        return njit(parallel=True, fastmath=fastmath, cache=True)(func)
    except RuntimeError:  # no writable cache location (read-only install and home)
        return njit(parallel=True, fastmath=fastmath)(func)


if numba is not None:
    _LOG2E = np.float32(1.4426950408889634)
    _LN2_HI = np.float32(0.693145751953125)  # ln 2 split so that n * _LN2_HI is exact for |n| < 2^8
    _LN2_LO = np.float32(1.428606765330187e-06)

    @intrinsic
    def _float32_from_bits(typingctx, bits):
        """The float32 whose bits are the low 32 bits of an integer (an LLVM bitcast, vectorisable)."""
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            value = args[0]
            if value.type.width > 32:
                value = builder.trunc(value, ir.IntType(32))
            return builder.bitcast(value, ir.FloatType())

        return types.float32(bits), codegen

    @njit(inline='always', fastmath=_FASTMATH)
    def _exp_nonpositive(t):
        """exp(t) in float32 for -87 <= t <= 0."""
        n = np.floor(t * _LOG2E + np.float32(0.5))
        r = t - n * _LN2_HI - n * _LN2_LO  # |r| <= ln(2) / 2
        p = np.float32(1.0 / 5040.0)
        p = p * r + np.float32(1.0 / 720.0)
        p = p * r + np.float32(1.0 / 120.0)
        p = p * r + np.float32(1.0 / 24.0)
        p = p * r + np.float32(1.0 / 6.0)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        p = p * r + np.float32(1.0)
        return p * _float32_from_bits((np.int32(n) + 127) << 23)  # times 2**n, -126 <= n <= 0

    @njit(inline='always', fastmath=_FASTMATH)
    def _elu(y):
        """ELU in float32: y for y > 0, exp(y) - 1 otherwise (written branch-free so it vectorises)."""
        e = _exp_nonpositive(min(max(y, np.float32(-87.0)), np.float32(0.0)))
        return max(y, np.float32(0.0)) + (e - np.float32(1.0))

    @njit(inline='always', fastmath=_FASTMATH)
    def _tanh(x):
        """tanh in float32: Taylor series to x^13 for |x| < 0.3125, else 1 - 2 / (exp(2|x|) + 1), with the sign."""
        t = abs(x)
        t2 = x * x
        p = np.float32(21844.0 / 6081075.0)
        p = p * t2 + np.float32(-1382.0 / 155925.0)
        p = p * t2 + np.float32(62.0 / 2835.0)
        p = p * t2 + np.float32(-17.0 / 315.0)
        p = p * t2 + np.float32(2.0 / 15.0)
        p = p * t2 + np.float32(-1.0 / 3.0)
        small = x + x * t2 * p
        e = _exp_nonpositive(np.float32(-2.0) * min(t, np.float32(20.0)))  # exp(-2|x|) in (0, 1]
        large = (np.float32(1.0) - e) / (np.float32(1.0) + e)
        large = large if x >= 0 else -large
        return small if t < np.float32(0.3125) else large

    @_compiled
    def _tanh_inplace(x):  # pragma: no cover - compiled
        rows, width = x.shape
        for i in prange(rows):
            for j in range(width):
                x[i, j] = _tanh(x[i, j])

    @_compiled
    def _layer_norm_elu(a, b, gamma, beta, eps, out, mean, rstd):  # pragma: no cover - compiled
        rows, width = a.shape
        for i in prange(rows):
            total = 0.0
            for j in range(width):
                z = a[i, j] + b[i, j]
                out[i, j] = z  # the row of z stays in L1 for the next two passes
                total += z
            m = total / width
            var = 0.0
            for j in range(width):
                d = out[i, j] - m
                var += d * d
            rs = 1.0 / np.sqrt(var / width + eps)
            m32 = np.float32(m)
            rs32 = np.float32(rs)
            for j in range(width):
                out[i, j] = _elu((out[i, j] - m32) * rs32 * gamma[j] + beta[j])
            mean[i] = m32
            rstd[i] = rs32

    @_compiled(fastmath=_FASTMATH_ORDERED)
    def _elu_layer_norm_backward(grad_h, h, a, b, mean, rstd, gamma, grad_z):  # pragma: no cover - compiled
        rows, width = a.shape
        one = np.float32(1.0)
        for i in prange(rows):
            m = mean[i]
            rs = rstd[i]
            sum_g = 0.0
            sum_gx = 0.0
            for j in range(width):
                hv = h[i, j]
                g = grad_h[i, j] * (one if hv > 0 else hv + one) * gamma[j]  # ELU' = exp(y) = h + 1 below 0
                grad_z[i, j] = g
                sum_g += g
                sum_gx += g * (((a[i, j] + b[i, j]) - m) * rs)
            mean_g = np.float32(sum_g / width)
            mean_gx = np.float32(sum_gx / width)
            for j in range(width):
                grad_z[i, j] = rs * (grad_z[i, j] - mean_g - ((a[i, j] + b[i, j]) - m) * rs * mean_gx)

    @_compiled
    def _point_features(ao, x, y, nu, xs, rho, grad, tau, nu_x, hfx):  # pragma: no cover - compiled
        n_omega, points, nao = nu.shape[0], ao.shape[1], ao.shape[2]
        spins, n_kept = x.shape[1], xs.shape[2]
        for g in prange(points):
            for s in range(spins):
                r = 0.0
                gx = 0.0
                gy = 0.0
                gz = 0.0
                t = 0.0
                for b in range(nao):
                    xb = x[g, s, b]
                    r += xb * ao[0, g, b]
                    gx += xb * ao[1, g, b]
                    gy += xb * ao[2, g, b]
                    gz += xb * ao[3, g, b]
                    t += y[0, g, s, b] * ao[1, g, b] + y[1, g, s, b] * ao[2, g, b] + y[2, g, s, b] * ao[3, g, b]
                rho[g, s] = r
                grad[0, g, s] = 2.0 * gx
                grad[1, g, s] = 2.0 * gy
                grad[2, g, s] = 2.0 * gz
                tau[g, s] = 0.5 * t
                for w in range(n_omega):  # nu packed: lower triangle (b >= d) row by row
                    for b in range(n_kept):
                        nu_x[w, g, s, b] = 0.0
                    for b in range(n_kept):
                        xb = xs[g, s, b]
                        row = b * (b + 1) // 2
                        acc = 0.0
                        for d in range(b):
                            v = nu[w, g, row + d]
                            acc += v * xs[g, s, d]
                            nu_x[w, g, s, d] += v * xb
                        nu_x[w, g, s, b] += acc + nu[w, g, row + b] * xb
                    e = 0.0
                    for b in range(n_kept):
                        e += nu_x[w, g, s, b] * xs[g, s, b]
                    hfx[w, g, s] = -0.5 * e

    @_compiled(fastmath=_FASTMATH_ORDERED)
    def _point_potential(ao, nu_x, idx, v_rho, v_grad, v_tau, v_hf, out):  # pragma: no cover - compiled
        n_omega, points, spins, n_kept = nu_x.shape
        nao = ao.shape[2]
        for g in prange(points):
            for s in range(spins):
                c0 = v_rho[g, s]
                c1 = 2.0 * v_grad[0, g, s]
                c2 = 2.0 * v_grad[1, g, s]
                c3 = 2.0 * v_grad[2, g, s]
                half_tau = 0.5 * v_tau[g, s]
                for b in range(nao):
                    out[0, g, s, b] = c0 * ao[0, g, b] + c1 * ao[1, g, b] + c2 * ao[2, g, b] + c3 * ao[3, g, b]
                    out[1, g, s, b] = half_tau * ao[1, g, b]
                    out[2, g, s, b] = half_tau * ao[2, g, b]
                    out[3, g, s, b] = half_tau * ao[3, g, b]
                for j in range(n_kept):
                    value = 0.0
                    for w in range(n_omega):
                        value += v_hf[w, g, s] * nu_x[w, g, s, j]
                    out[0, g, s, idx[j]] -= value

    @_compiled
    def _pack_grid_integrals(a_t, out):  # pragma: no cover - compiled
        k, points = a_t.shape[1], a_t.shape[2]
        tile = 64
        for t in prange((points + tile - 1) // tile):
            start = t * tile
            stop = min(points, start + tile)
            for b in range(k):
                row = b * (b + 1) // 2
                for d in range(b + 1):
                    for g in range(start, stop):
                        out[g, row + d] = a_t[d, b, g]


def pack_grid_integrals(a: np.ndarray, out: np.ndarray) -> None:
    """``out[g, p] = a[g, b, d]`` for the packed lower triangle p = b (b + 1) / 2 + d (:func:`pack_index`).

    ``a`` is what libcint's ``int1e_grids`` returns through PySCF: shape (g, k, k) with the grid index
    fastest (Fortran order); gathering it with numpy's fancy indexing strides through memory and took a
    third of the integral time.  ``out`` (g, k (k + 1) / 2), float32 or float64, C-contiguous.
    """
    a_t = a.transpose(2, 1, 0)
    if numba is None or not a_t.flags['C_CONTIGUOUS'] or not available():
        rows, cols = pack_index(a.shape[1])
        out[...] = a[:, rows, cols]
        return
    _pack_grid_integrals(a_t, out)


def layer_norm_elu(a: np.ndarray, b: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float, out, mean, rstd):
    """``out = elu(layer_norm(a + b))`` row by row (float32, C-contiguous); saves each row's mean and 1/std.

    ``a + b`` is a residual block's linear output plus its skip connection: adding them here saves a pass.
    """
    _layer_norm_elu(a, b, gamma, beta, eps, out, mean, rstd)


def elu_layer_norm_backward(grad_h, h, a, b, mean, rstd, gamma, grad_z) -> None:
    """``grad_z = grad_h . d out/d z`` at ``z = a + b``, for ``h = out`` of :func:`layer_norm_elu` (float32)."""
    _elu_layer_norm_backward(grad_h, h, a, b, mean, rstd, gamma, grad_z)


def tanh_(x: np.ndarray) -> None:
    """``x = tanh(x)`` in place (float32, 2-D, C-contiguous)."""
    _tanh_inplace(x)


def point_features(ao, x, y, nu, xs, rho, grad, tau, nu_x, hfx) -> None:
    """Per grid point (float64): rho, grad rho, tau, nu E and the local-HF energy densities of each spin.

    ``ao`` (4, g, nao) AO values and gradients, ``x`` (g, ns, nao) = chi D, ``y`` (3, g, ns, nao) = grad chi D,
    ``xs`` (g, ns, k) = x[..., idx]: the E_b of the AOs that enter the local-HF energies (screening), ``nu``
    (n_omega, g, k (k + 1) / 2) the integrals over those AOs, the lower triangle (b >= d) packed row by row
    (:func:`pack_index`; float64 or float32, products accumulate in float64).
    Fills ``rho`` (g, ns), ``grad`` (3, g, ns), ``tau`` (g, ns), ``nu_x`` (n_omega, g, ns, k) and ``hfx``
    (n_omega, g, ns).
    """
    _point_features(ao, x, y, nu, xs, rho, grad, tau, nu_x, hfx)


def pack_index(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of each packed element of a symmetric k x k matrix (lower triangle, row by row)."""
    return np.tril_indices(k)


def point_potential(ao, nu_x, idx, v_rho, v_grad, v_tau, v_hf, out) -> None:
    """The right-hand factors of dE/dD = ao^T out, per grid point (float64), ``out`` (4, g, ns, nao).

    ``out[0]`` = dE/dx (x = chi D): v_rho chi + 2 v_grad . grad chi - sum_w v_hf nu_x (the last on the AOs
    ``idx`` that ``nu_x`` (n_omega, g, ns, k) belongs to);
    ``out[1:]`` = v_tau/2 grad chi (the tau term, d tau/dD = 1/2 grad chi grad chi^T).
    """
    _point_potential(ao, nu_x, idx, v_rho, v_grad, v_tau, v_hf, out)
