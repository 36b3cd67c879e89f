"""DM21 features, energy and Fock matrix on a PySCF grid (no AiiDA).

The energy is E_xc[D] = sum_g w_g e_xc(x_g[D]) with the 11 features x_g of :mod:`.model`.  Everything
from the density matrices to E_xc is written in PyTorch, so the XC potential matrix is the exact
derivative dE_xc/dD from autograd: the semi-local part (what PySCF would assemble from
vrho/vsigma/vtau) and the local Hartree-Fock part (which no stock PySCF functional has) come out of
one backward pass.

Cost.  The local-HF features need nu_bd(r) = int chi_b(r') v_omega(|r - r'|) chi_d(r') dr' at every grid
point for both omegas: ``ngrid x nao^2`` three-centre integrals, by far the most expensive
ingredient, and independent of the density matrix.  DeepMind's code recomputes them at every SCF
iteration; here they are computed once per (molecule, grid) and cached for the whole SCF when they
fit in ``max_memory`` (MB), otherwise recomputed block by block (same result, more time).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from pyscf.dft import numint as pyscf_numint

from . import kernels
from .model import LDA_X_FACTOR, DM21Network, xc_energy_parts

__all__ = ['DM21NumInt', 'UnsupportedSystemError', 'XCResult', 'check_supported_molecule']


class UnsupportedSystemError(ValueError):
    """The molecule cannot be treated by the DM21 functionals (periodic cell, ECP, ...)."""


def check_supported_molecule(mol) -> None:
    """Raise :class:`UnsupportedSystemError` for systems DM21 cannot treat, with the reason."""
    if getattr(mol, 'a', None) is not None or type(mol).__module__.startswith('pyscf.pbc'):
        raise UnsupportedSystemError(
            'periodic cells are not supported by the DM21 functionals: the local Hartree-Fock features '
            'need molecular (open boundary) three-centre integrals; use a finite molecule'
        )
    if mol.has_ecp():
        raise UnsupportedSystemError(
            'effective core potentials are not supported: DM21 was trained on all-electron densities; '
            'use an all-electron basis set (e.g. cc-pVDZ, def2-SVP without ECP)'
        )
    nelec_a, nelec_b = mol.nelec
    if nelec_a < 0 or nelec_b < 0 or nelec_a + nelec_b <= 0:
        raise UnsupportedSystemError(
            f'charge {mol.charge} and spin {mol.spin} leave {nelec_a} alpha and {nelec_b} beta electrons'
        )


@dataclass
class XCResult:
    nelec: np.ndarray  # electrons per spin channel from numerical integration
    exc: float  # XC energy (Ha)
    vxc: np.ndarray  # (nspin, nao, nao) dE_xc/dD_spin


@dataclass
class _Block:
    weights: torch.Tensor  # (g,)
    ao: torch.Tensor  # (4, g, nao): value and x, y, z derivatives
    coords: np.ndarray  # (g, 3)
    nu: torch.Tensor | None  # (n_omega, g, nao, nao) when cached


@dataclass
class Timings:
    """Wall time (s) accumulated per phase over all evaluations."""

    integrals: float = 0.0
    features: float = 0.0
    network: float = 0.0
    potential: float = 0.0
    calls: int = 0

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ('integrals', 'features', 'network', 'potential', 'calls')}


class DM21NumInt(pyscf_numint.NumInt):
    """A PySCF ``NumInt`` that evaluates a DM21-architecture functional.

    It serves PySCF's ground-state entry points ``nr_rks`` and ``nr_uks`` (same signature from PySCF
    2.0 to 2.14), so it also works when assigned to a stock KS object: ``mf._numint = DM21NumInt(net)``
    with a non-hybrid ``mf.xc``.  PySCF's per-point entry points ``eval_xc``/``eval_xc_eff`` receive only
    the density on the grid, never the density matrix that the local-HF features need; they raise
    :class:`NotImplementedError` instead of returning something wrong.
    """

    def __init__(self, network: DM21Network, *, network_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.network = network.to(network_dtype).eval()
        self.network.requires_grad_(False)  # during SCF only the inputs need gradients
        self.network_dtype = network_dtype
        self.omegas = tuple(network.config.omegas)
        self.timings = Timings()
        self._cache_key: tuple | None = None
        self._blocks: list[_Block] = []

    # --- hybrid / type queries used by PySCF --------------------------------------------------------
    def rsh_and_hybrid_coeff(self, *args, **kwargs):
        return 0.0, 0.0, 0.0

    def rsh_coeff(self, *args, **kwargs):
        return 0.0, 0.0, 0.0

    def hybrid_coeff(self, *args, **kwargs):
        return 0.0

    def _xc_type(self, *args, **kwargs):
        return 'MGGA'

    def eval_xc(self, *args, **kwargs):
        raise NotImplementedError(
            'DM21 functionals depend on the density matrix through local Hartree-Fock features; they cannot '
            'be evaluated from the density on the grid alone (eval_xc). Use nr_rks/nr_uks (ground-state SCF).'
        )

    eval_xc_eff = eval_xc

    # --- PySCF entry points ------------------------------------------------------------------------
    def nr_rks(self, mol, grids, xc_code, dms, relativity=0, hermi=1, max_memory=2000, verbose=None):
        dm = _single_dm(dms, 2)
        result = self.evaluate(mol, grids, np.asarray(dm)[None] / 2.0, restricted=True, max_memory=max_memory)
        return float(result.nelec.sum()), result.exc, result.vxc[0]

    def nr_uks(self, mol, grids, xc_code, dms, relativity=0, hermi=1, max_memory=2000, verbose=None):
        dms = np.asarray(dms)
        if dms.ndim == 2:  # a restricted density matrix
            dms = np.stack([dms / 2.0, dms / 2.0])
        if dms.ndim != 3 or dms.shape[0] != 2:
            raise NotImplementedError('DM21NumInt.nr_uks takes one (alpha, beta) pair of density matrices')
        result = self.evaluate(mol, grids, dms, restricted=False, max_memory=max_memory)
        return result.nelec, result.exc, result.vxc

    # --- the evaluation proper -----------------------------------------------------------------------
    def evaluate(
        self, mol, grids, dms: np.ndarray, *, restricted: bool, max_memory: float = 4000, with_vxc: bool = True
    ) -> XCResult:
        """E_xc and dE_xc/dD for spin density matrices ``dms`` (``(1, nao, nao)`` = D/2 if restricted).

        For ``restricted`` the single matrix is used for both spin channels and the returned potential
        is dE_xc/dD_total (what PySCF's RKS Fock matrix needs).
        """
        check_supported_molecule(mol)
        if grids.coords is None:
            grids.build(with_non0tab=True)
        dm = torch.from_numpy(np.ascontiguousarray(dms, dtype=np.float64))
        nelec = np.zeros(2)
        exc = 0.0
        grad = torch.zeros_like(dm)
        t = self.timings
        for block in self._iter_blocks(mol, grids, max_memory):
            nu = block.nu
            if nu is None:
                t0 = time.perf_counter()
                nu = self._nu(mol, block.coords)
                t.integrals += time.perf_counter() - t0
            t0 = time.perf_counter()
            fb = _block_features(block.ao, nu, dm)
            t1 = time.perf_counter()
            energy_weights = block.weights[:, None] * fb.parts  # dE/df, (g, 3)
            x = fb.feats.to(self.network_dtype)
            if with_vxc:
                f, g_feats = self.network.forward_with_input_grad(x, energy_weights.to(x.dtype))
            else:
                f = self.network(x)
            t2 = time.perf_counter()
            f64 = f.to(torch.float64)
            exc += float((energy_weights * f64).sum())
            if with_vxc:
                grad += _block_potential(fb, block.ao, block.weights, f64, g_feats.to(torch.float64))
            t3 = time.perf_counter()
            t.features += t1 - t0
            t.network += t2 - t1
            t.potential += t3 - t2
            nelec += (block.weights[:, None] * fb.rho).sum(0).numpy()
        t.calls += 1
        vxc = None
        if with_vxc:
            grad = grad.numpy()
            vxc = 0.5 * (grad + grad.transpose(0, 2, 1))
            if restricted:
                vxc = vxc * 0.5  # D_a = D_b = D/2 both depend on D
        return XCResult(nelec=nelec, exc=exc, vxc=vxc)

    # --- grid blocks and integrals -------------------------------------------------------------------
    def _nu(self, mol, coords: np.ndarray) -> torch.Tensor:
        out = []
        for omega in self.omegas:
            with mol.with_range_coulomb(omega):
                out.append(mol.intor('int1e_grids', hermi=1, grids=coords))
        # PySCF returns the grid index fastest; every SCF iteration contracts over the AO indices, so store
        # (omega, g, b, d) contiguous once instead of letting each contraction copy the whole array again
        return torch.from_numpy(np.ascontiguousarray(np.stack(out)))

    def _iter_blocks(self, mol, grids, max_memory: float) -> Iterator[_Block]:
        key = (id(mol), mol.nao, id(grids.coords), len(grids.weights), self.omegas)
        if key == self._cache_key:
            yield from self._blocks
            return
        nao = mol.nao
        n_omega = len(self.omegas)
        ngrid = len(grids.weights)
        nu_bytes = 8.0 * ngrid * nao * nao * n_omega
        cache_nu = nu_bytes / 1e6 < 0.8 * max_memory
        # blocks of about 64 MB of nu integrals, at least 128 points
        blksize = int(max(128, min(ngrid, 64e6 / (8.0 * nao * nao * n_omega))))
        blocks = []
        for start in range(0, ngrid, blksize):
            coords = np.ascontiguousarray(grids.coords[start : start + blksize])
            ao = pyscf_numint.eval_ao(mol, coords, deriv=1)
            nu = None
            if cache_nu:
                t0 = time.perf_counter()
                nu = self._nu(mol, coords)
                self.timings.integrals += time.perf_counter() - t0
            block = _Block(
                weights=torch.from_numpy(np.ascontiguousarray(grids.weights[start : start + blksize])),
                ao=torch.from_numpy(np.ascontiguousarray(ao)),
                coords=coords,
                nu=nu,
            )
            blocks.append(block)
            yield block
        self._blocks = blocks
        self._cache_key = key

    def reset_cache(self) -> None:
        self._cache_key = None
        self._blocks = []


def _single_dm(dms, ndim: int):
    dms = np.asarray(dms)
    if dms.ndim != ndim:
        raise NotImplementedError(
            'DM21NumInt evaluates one density matrix at a time (ground-state SCF); response/TDDFT '
            'calculations with several density matrices are not supported'
        )
    return dms


class _LocalExchange(torch.autograd.Function):
    """e_hf[s, w, g] = -1/2 sum_bd E_sb(g) nu_wbd(g) E_sd(g), with its gradient -(nu E)_b from the forward pass.

    nu is symmetric in (b, d), so d e_hf / d E_b = -(nu E)_b: the backward pass reuses the product already
    formed in the forward pass instead of reading the (n_omega, g, nao, nao) integrals a second time,
    which is what generic autograd through an einsum would do.  No gradient flows to nu (a constant).
    """

    @staticmethod
    def forward(ctx, nu: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        xs = x.detach().permute(1, 2, 0).contiguous()  # (g, nao, ns)
        nu_x = torch.matmul(nu, xs.unsqueeze(0))  # (n_omega, g, nao, ns)
        ctx.save_for_backward(nu_x)
        return (-0.5 * (nu_x * xs.unsqueeze(0)).sum(2)).permute(2, 0, 1)  # (ns, n_omega, g)

    @staticmethod
    def backward(ctx, grad_hfx: torch.Tensor):
        (nu_x,) = ctx.saved_tensors
        grad_x = -(nu_x * grad_hfx.permute(1, 2, 0).unsqueeze(2)).sum(0)  # (g, nao, ns)
        return None, grad_x.permute(2, 0, 1)


def _features(ao: torch.Tensor, nu: torch.Tensor, dm: torch.Tensor):
    """Features from AO values ``(4, g, nao)``, nu ``(n_omega, g, nao, nao)`` and spin DMs ``(ns, nao, nao)``.

    ``ns`` is 1 for a restricted density (``dm`` = D/2 serves both spin channels) or 2.  Returns the
    spin densities ``(2, g)``, the feature matrix ``(g, 11)`` in :data:`.model.FEATURE_NAMES` order and
    the energy densities that the enhancement factors multiply, ``(g, 3)``.
    """
    ao0, ao1 = ao[0], ao[1:]
    x = torch.matmul(ao0, dm)  # (ns, g, nao): E_b(r) = sum_a chi_a(r) D_ab
    rho = (x * ao0).sum(-1)  # (ns, g)
    grad = 2.0 * (x.unsqueeze(1) * ao1).sum(-1)  # (ns, 3, g)
    tau = 0.5 * (torch.matmul(ao1, dm.unsqueeze(1)) * ao1).sum(-1).sum(1)  # (ns, g)
    hfx = _LocalExchange.apply(nu, x)  # (ns, n_omega, g)
    rho, _, feats, parts = _feature_matrix(rho, grad, tau, hfx)
    return rho, feats, parts


def _feature_matrix(rho: torch.Tensor, grad: torch.Tensor, tau: torch.Tensor, hfx: torch.Tensor):
    """The feature matrix and energy parts from per-spin quantities, spin index first.

    ``rho`` (ns, g), ``grad`` (ns, 3, g), ``tau`` (ns, g), ``hfx`` (ns, n_omega, g); ns = 1 (restricted: D/2
    serves both channels) is expanded to 2.  Returns rho (2, g), grad (2, 3, g), the features (g, 11) in
    :data:`.model.FEATURE_NAMES` order and the energy densities the enhancement factors multiply (g, 3).
    """
    if rho.shape[0] == 1:
        rho, grad, tau, hfx = rho.expand(2, -1), grad.expand(2, -1, -1), tau.expand(2, -1), hfx.expand(2, -1, -1)
    sigma_a = (grad[0] ** 2).sum(0)
    sigma_b = (grad[1] ** 2).sum(0)
    sigma = ((grad[0] + grad[1]) ** 2).sum(0)
    feats = torch.stack(
        [rho[0], rho[1], sigma, sigma_a, sigma_b, tau[0], tau[1], hfx[0, 0], hfx[0, 1], hfx[1, 0], hfx[1, 1]], dim=1
    )
    return rho, grad, feats, xc_energy_parts(rho[0], rho[1], hfx)


@dataclass
class _BlockFeatures:
    """One block's features and what the hand-written potential needs from the forward pass."""

    rho: torch.Tensor  # (g, 2) spin densities
    feats: torch.Tensor  # (g, 11) in FEATURE_NAMES order
    parts: torch.Tensor  # (g, 3) energy densities the enhancement factors multiply
    x: torch.Tensor  # (g, ns, nao): E_b(r) = sum_a chi_a(r) D_ab
    grad: torch.Tensor  # (3, g, 2) spin-density gradients
    nu_x: torch.Tensor  # (n_omega, g, ns, nao): (nu E)_b


def _block_features(ao: torch.Tensor, nu: torch.Tensor, dm: torch.Tensor) -> _BlockFeatures:
    """What :func:`_features` computes, without autograd, keeping the intermediates the potential reuses.

    ``dm`` is ``(ns, nao, nao)`` (ns = 1: D/2 serving both spin channels).  The AO contractions run as one
    matrix product over both spins (``dm`` side by side) and the per-point products as element-wise
    reductions, which is what makes this path cheaper than autograd through :func:`_features`.
    """
    ns, nao = dm.shape[0], dm.shape[-1]
    g = ao.shape[1]
    dm_cat = dm.permute(1, 0, 2).reshape(nao, ns * nao)  # [a, (s, b)]
    x = (ao[0] @ dm_cat).view(g, ns, nao)
    y = (ao[1:].reshape(3 * g, nao) @ dm_cat).view(3, g, ns, nao)
    if kernels.available():  # the per-point products in one compiled pass over the block
        rho, grad, tau = (
            torch.empty(g, ns, dtype=x.dtype),
            torch.empty(3, g, ns, dtype=x.dtype),
            torch.empty_like(x[..., 0]),
        )
        nu_x, hfx = torch.empty(nu.shape[0], g, ns, nao, dtype=x.dtype), torch.empty(nu.shape[0], g, ns, dtype=x.dtype)
        kernels.point_features(*(t.numpy() for t in (ao, x, y, nu, rho, grad, tau, nu_x, hfx)))
    else:
        dens = (x.unsqueeze(0) * ao.unsqueeze(2)).sum(-1)  # (4, g, ns): rho and half its gradient
        rho, grad = dens[0], 2.0 * dens[1:]
        tau = 0.5 * (y * ao[1:].unsqueeze(2)).sum(-1).sum(0)  # (g, ns)
        nu_x = torch.matmul(x.unsqueeze(0), nu)  # (n_omega, g, ns, nao); nu is symmetric in its AO indices
        hfx = -0.5 * (nu_x * x.unsqueeze(0)).sum(-1)  # (n_omega, g, ns)
    rho, grad, feats, parts = _feature_matrix(rho.t(), grad.permute(2, 0, 1), tau.t(), hfx.permute(2, 0, 1))
    return _BlockFeatures(rho=rho.t(), feats=feats, parts=parts, x=x, grad=grad.permute(1, 2, 0), nu_x=nu_x)


def _block_potential(
    fb: _BlockFeatures, ao: torch.Tensor, weights: torch.Tensor, f: torch.Tensor, g_feats: torch.Tensor
) -> torch.Tensor:
    """dE_xc/dD (ns, nao, nao) of one block, unsymmetrised, by the chain rule written out.

    ``f`` are the enhancement factors (g, 3) and ``g_feats`` = dE/dfeatures (g, 11) from the network, both
    float64.  E = sum_g w (f . parts) depends on the features through the network and on rho and the
    local-HF densities through ``parts`` as well.  With x = chi D: d rho/dx = chi, d grad rho/dx = 2 grad chi,
    d e_hf/dx = -nu x; tau depends on D directly: d tau/dD_ab = 1/2 grad chi_a . grad chi_b.
    """
    ns, nao = fb.x.shape[1], fb.x.shape[2]
    g = ao.shape[1]
    wf = weights[:, None] * f  # (g, 3)
    rho = fb.rho.clamp(min=0.0)
    v_rho = g_feats[:, 0:2] + wf[:, 0:1] * (LDA_X_FACTOR * 4.0 / 3.0) * rho ** (1.0 / 3.0)  # (g, 2)
    grad_total = fb.grad.sum(-1, keepdim=True)  # (3, g, 1)
    v_grad = 2.0 * (g_feats[:, 3:5] * fb.grad + g_feats[:, 2:3] * grad_total)  # (3, g, 2)
    v_tau = g_feats[:, 5:7]  # (g, 2)
    v_hf = torch.stack([g_feats[:, 7:9], g_feats[:, 9:11]], dim=-1) + wf[:, 1:3, None]  # (g, n_omega, 2)
    if ns == 1:  # one density matrix serves both channels: their derivatives add
        v_rho, v_grad, v_tau, v_hf = (v.sum(-1, keepdim=True) for v in (v_rho, v_grad, v_tau, v_hf))
    # dE/dD = chi^T dE/dx + sum_k grad_k chi^T (v_tau/2) grad_k chi: one product with all four AO components
    rhs = torch.empty(4, g, ns, nao, dtype=ao.dtype)
    if kernels.available():
        v_hf = v_hf.permute(1, 0, 2).contiguous()  # (n_omega, g, ns)
        kernels.point_potential(*(t.contiguous().numpy() for t in (ao, fb.nu_x, v_rho, v_grad, v_tau, v_hf, rhs)))
    else:
        rhs[0] = v_rho.unsqueeze(-1) * ao[0].unsqueeze(1)  # dE/dx (g, ns, nao)
        rhs[0] += 2.0 * (v_grad.unsqueeze(-1) * ao[1:].unsqueeze(2)).sum(0)
        rhs[0] -= (v_hf.permute(1, 0, 2).unsqueeze(-1) * fb.nu_x).sum(0)
        rhs[1:] = ao[1:].unsqueeze(2) * (0.5 * v_tau).unsqueeze(-1)
    out = ao.reshape(4 * g, nao).t() @ rhs.view(4 * g, ns * nao)  # (nao, ns * nao)
    return out.view(nao, ns, nao).permute(1, 0, 2)
