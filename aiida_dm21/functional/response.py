"""The DM21 exchange-correlation kernel: second derivatives of E_xc by autograd (no AiiDA).

PySCF's second-order SCF (``mf.newton()``) and its orbital response need, for a trial density matrix
``dm1``, the change of the XC potential along it:

    v1 = d/d eps  dE_xc/dD [D0 + eps dm1]  at eps = 0   (the Hessian of E_xc contracted with dm1).

libxc cannot give it for a DM21 functional: E_xc depends on the density matrix through the local
Hartree-Fock features e_hf(r) = -1/2 sum_bd E_b(r) nu_bd(r) E_d(r) (E = chi D), not only through the
density on the grid.  Here it is an autograd Hessian-vector product on each grid block: the energy of the
block is written as a differentiable function of the spin density matrices (AO products, features, the
network, the energy densities), its gradient is taken with ``create_graph=True``, and the gradient's
directional derivative along ``dm1`` is a second backward pass.  Everything the SCF's XC evaluation
uses is the same here: the grid (pruned as the SCF pruned it), the blocks, the screened AOs and their
cached integrals (:class:`~.numint.DM21NumInt`), the network in its SCF precision.

Cost: one Hessian-vector product is about one SCF XC evaluation through autograd with a double backward
(measured in ``docs/core.md``); PySCF's Newton solver takes several per macro iteration.
"""

from __future__ import annotations

import numpy as np
import torch

from .model import LDA_X_FACTOR
from .numint import DM21NumInt, _ao_products, _feature_matrix, _unpack

__all__ = ['xc_kernel_product']

#: Densities are floored here in the LDA part of the energy: rho^(4/3) has an infinite second derivative at 0.
_RHO_FLOOR = 1e-14


def _block_energy(numint: DM21NumInt, ao: torch.Tensor, nu: torch.Tensor, idx: torch.Tensor, dm: torch.Tensor, weights):
    """E_xc of one block as a twice-differentiable function of the spin density matrices ``dm`` (ns, nao, nao)."""
    ao0, ao1 = ao[0], ao[1:]
    x = torch.matmul(ao0, dm)  # (ns, g, nao)
    rho = (x * ao0).sum(-1)  # (ns, g)
    grad = 2.0 * (x.unsqueeze(1) * ao1).sum(-1)  # (ns, 3, g)
    tau = 0.5 * (torch.matmul(ao1, dm.unsqueeze(1)) * ao1).sum(-1).sum(1)  # (ns, g)
    xs = x[..., idx]  # (ns, g, k)
    nu_full = _unpack(nu, len(idx)).to(dm.dtype)  # (n_omega, g, k, k)
    nu_x = torch.einsum('wgbd,sgd->swgb', nu_full, xs)
    hfx = -0.5 * (nu_x * xs.unsqueeze(1)).sum(-1)  # (ns, n_omega, g)
    rho, _, feats, parts = _feature_matrix(rho, grad, tau, hfx)
    # the same energy densities with rho floored in the LDA part (its clamp at 0 has no second derivative there)
    rho_floor = rho.clamp(min=_RHO_FLOOR)
    e_lda = LDA_X_FACTOR * (rho_floor[0] ** (4.0 / 3.0) + rho_floor[1] ** (4.0 / 3.0))
    parts = torch.cat([e_lda.unsqueeze(1), parts[:, 1:]], dim=1)
    f = numint.network(feats.to(numint.network_dtype)).to(dm.dtype)
    return (weights * (f * parts).sum(-1)).sum()


def xc_kernel_product(
    numint: DM21NumInt,
    mol,
    grids,
    dm0: np.ndarray,
    dm1: np.ndarray,
    *,
    restricted: bool,
    max_memory: float | None = None,
) -> np.ndarray:
    """The XC kernel of ``numint`` at ``dm0`` contracted with ``dm1``: the change of V_xc along ``dm1``.

    ``restricted``: ``dm0`` is the total density matrix (nao, nao) and ``dm1`` total-density perturbations
    (..., nao, nao); the result is d V_xc / d eps [D0 + eps dm1] with V_xc = dE_xc/dD (RKS's Fock matrix).
    Otherwise ``dm0`` is (2, nao, nao) and ``dm1`` (..., 2, nao, nao), and V_xc,s = dE_xc/dD_s.
    The antisymmetric part of ``dm1`` changes no density and is dropped; the result is symmetric.
    """
    dm0 = np.asarray(dm0, dtype=np.float64)
    dm1 = np.asarray(dm1, dtype=np.float64)
    nao = mol.nao
    if restricted:
        spin_dm = dm0.reshape(1, nao, nao) * 0.5  # D/2 serves both spin channels
        trials = dm1.reshape(-1, 1, nao, nao) * 0.5  # the spin density moves by half the total
    else:
        if dm0.shape != (2, nao, nao):
            raise ValueError(f'unrestricted dm0 must be (2, {nao}, {nao}), got {dm0.shape}')
        spin_dm = dm0
        trials = dm1.reshape(-1, 2, nao, nao)
    trials = 0.5 * (trials + trials.transpose(0, 1, 3, 2))
    device = numint.device
    dm = torch.from_numpy(np.ascontiguousarray(spin_dm)).to(device).requires_grad_(True)
    directions = [torch.from_numpy(np.ascontiguousarray(t)).to(device) for t in trials]
    out = [torch.zeros_like(d) for d in directions]
    plan = numint._plan(mol, grids, max_memory)
    with torch.enable_grad():
        for block in plan.blocks:
            ao = block.ao if block.ao is not None else numint._eval_ao(mol, block.coords)
            x, _ = _ao_products(ao, dm.detach())
            shells = numint._needed_shells(x, block, plan)
            nu, idx = numint._block_nu(mol, plan, block, shells)
            energy = _block_energy(numint, ao, nu, idx, dm, block.weights)
            (gradient,) = torch.autograd.grad(energy, dm, create_graph=True)
            for i, direction in enumerate(directions):
                (hvp,) = torch.autograd.grad(gradient, dm, grad_outputs=direction, retain_graph=i + 1 < len(directions))
                out[i] += hvp
    result = torch.stack(out).cpu().numpy()
    result = 0.5 * (result + result.transpose(0, 1, 3, 2))
    if not np.isfinite(result).all():
        raise FloatingPointError('the DM21 XC kernel produced non-finite values (a density matrix with NaN/inf?)')
    if restricted:
        # V_xc = dE/dD = 1/2 dE/dD_s, and D_s moves by dm1/2 (in the trials): one more 1/2 on the way out
        return (0.5 * result[:, 0]).reshape(dm1.shape)
    return result.reshape(dm1.shape)
