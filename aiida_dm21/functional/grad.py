"""Analytic nuclear gradients of DM21 functionals (RKS and UKS; no AiiDA).

:class:`RKSGradients` and :class:`UKSGradients` are PySCF gradient objects (``kernel()``, ``as_scanner()``,
``grad_elec``...): PySCF's code does the one-electron, Coulomb, overlap (Pulay) and nuclear terms, and
only the exchange-correlation part is replaced.  Since the local-HF features depend on the nuclear positions
in a way that cannot be put in the form of a potential matrix <d chi|v|chi>, the whole XC gradient is
computed here per atom (:func:`xc_gradient`), handed over in ``get_veff``'s result as the tag ``de_xc``,
and added by ``extra_force``.

The energy is E_xc = sum_g w_g e(x_g) (:mod:`.numint`).  Its derivative with respect to atom A has three
parts:

* **the basis functions** centred on A (always): every feature depends on chi_a(r_g) and grad chi_a(r_g),
  and d chi_a/dR_A = -grad chi_a for the AOs a on A.  With the adjoints dE/d chi_a and dE/d grad chi_a of a
  grid point (from rho, grad rho, tau, and e_hf through E = chi D), this needs the AO second derivatives,
  as PySCF's GGA/meta-GGA gradients do.  The local-HF energies e_s^omega(r) = -1/2 sum_bd E_b nu_bd(r) E_d
  also depend on A through nu: d nu_bd/dR_A = -<d b|v_omega(r)|d> - <b|v_omega(r)|d d> for b, d on A,
  from libcint's ``int1e_grids_ip`` with the range-separation omega set in ``env[PTR_RANGE_OMEGA]`` as
  :meth:`.DM21NumInt._nu` does (checked against finite differences of nu in ``tests/test_grad.py``).
* **the grid points** moving with their atom (``grid_response``): e(r_g) depends on the positions only
  through differences r_g - R_B, so d e/d r_g = -sum_B d e/d R_B, the sum over all AOs of the terms above.
* **the Becke partition weights** (``grid_response``): sum_g (d w_g/d R_A) e(x_g), with PySCF's weight
  derivatives for the sorted (and pruned) SCF grid (``pyscf.hessian.rks.get_dweight_dA``).

The gradient follows the SCF's evaluation exactly: the same grid (after ``small_rho_cutoff`` pruning), the
same blocks, the same screened shells per block (the integral cache of the SCF is reused, or the shells
chosen again from the converged density matrix, as the SCF's last evaluation did) and the same network
precision; it is the derivative of the screened energy.  The network's derivative with respect to the
features is its vector-Jacobian product (:meth:`.DM21Network.forward_with_input_grad`), as in the SCF.

``grid_response`` defaults to True here (PySCF's default is False): without it the gradient misses the
moving-grid terms and is not translationally invariant; for DM21 this is not small (H2O/6-31G, grids.level 4:
2.1e-3 Ha/bohr on O, the forces summing to 2.1e-3 instead of 0).  With it the gradient is the derivative of
the energy the SCF computes (central finite differences: within 5e-8 Ha/bohr, ``tests/test_grad.py``), at
little extra cost.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from pyscf import gto, lib
from pyscf.dft import gen_grid
from pyscf.dft import numint as pyscf_numint
from pyscf.grad import rks as rks_grad
from pyscf.grad import uks as uks_grad
from pyscf.lib import logger

from . import dispersion
from .numint import DM21NumInt, _ao_products, _block_features, _point_derivatives

__all__ = ['RKSGradients', 'UKSGradients', 'gradients', 'nu_ip', 'xc_gradient']

# PySCF's order of the AO second derivatives: xx, xy, xz, yy, yz, zz after the value and the gradient
_HESSIAN_INDEX = ((4, 5, 6), (5, 7, 8), (6, 8, 9))


def xc_gradient(
    ni: DM21NumInt,
    mol,
    grids,
    dms: np.ndarray,
    *,
    grid_response: bool = True,
    max_memory: float | None = None,
) -> tuple[float, np.ndarray]:
    """E_xc and dE_xc/dR (natm, 3) in Ha/bohr for spin density matrices ``dms`` on the SCF's grid.

    ``dms`` is ``(1, nao, nao)`` = D/2 for a restricted density (one matrix serving both spin channels) or
    ``(2, nao, nao)``, as in :meth:`.DM21NumInt.evaluate`; ``grids`` the grid the energy was computed on.
    """
    device = ni.device
    dm = torch.from_numpy(np.ascontiguousarray(dms, dtype=np.float64)).to(device)
    natm, nao = mol.natm, mol.nao
    plan = ni._plan(mol, grids, max_memory)
    ao_atom = np.empty(nao, dtype=np.int64)
    for atom, (_, _, p0, p1) in enumerate(mol.aoslice_by_atom()):
        ao_atom[p0:p1] = atom
    ao_atom_t = torch.from_numpy(ao_atom).to(device)
    ao_shell = np.repeat(np.arange(len(plan.ao_loc) - 1), np.diff(plan.ao_loc))
    weight_derivatives = _weight_derivatives(mol, grids) if grid_response else None
    de = torch.zeros(natm, 3, dtype=torch.float64, device=device)
    exc = torch.zeros((), dtype=torch.float64, device=device)
    start = 0
    for block in plan.blocks:
        g = len(block.weights)
        points = slice(start, start + g)
        start += g
        ao2 = torch.from_numpy(pyscf_numint.eval_ao(mol, block.coords, deriv=2)).to(device)  # (10, g, nao)
        ao = ao2[:4]
        xy = _ao_products(ao, dm)
        shells = ni._needed_shells(xy[0], block, plan)
        nu, idx = ni._block_nu(mol, plan, block, shells)  # what the SCF's energy used
        fb = _block_features(ao, nu, dm, idx=idx, xy=xy)
        energy_weights = block.weights[:, None] * fb.parts
        feats = fb.feats.to(ni.network_dtype)
        f, g_feats = ni.network.forward_with_input_grad(feats, energy_weights.to(feats.dtype))
        f = f.to(torch.float64)
        exc += (energy_weights * f).sum()
        v = _point_derivatives(fb, block.weights, f, g_feats.to(torch.float64))
        force = _basis_force(fb, ao2, dm, xy, *v)  # (3, g, nao): dE/dR of the AO centres, per point and AO
        kept_shells = np.unique(ao_shell[idx.cpu().numpy()])
        force[:, :, idx] += _integral_force(ni, mol, block.coords, kept_shells, fb, v[3])
        de.index_add_(0, ao_atom_t, force.sum(1).t())
        if grid_response:
            owner = torch.from_numpy(grids.atm_idx[points].astype(np.int64)).to(device)
            real = owner >= 0  # padding points (weight 0) belong to no atom
            de.index_add_(0, owner[real], -force.sum(-1).t()[real])  # the point moves with its atom
            dw = torch.from_numpy(weight_derivatives(points)).to(device)  # (natm, 3, g)
            de += dw @ (f * fb.parts).sum(1)  # the partition weights change
    return float(exc), de.cpu().numpy()


def _basis_force(fb, ao2, dm, xy, v_rho, v_grad, v_tau, v_hf) -> torch.Tensor:
    """(3, g, nao): the derivative of the block's energy with respect to the centre of each AO (fixed nu).

    With the adjoints A0_a = dE/d chi_a and A_ia = dE/d(d_i chi_a) of each grid point, d chi_a/dR = -grad chi_a
    gives -(A0_a d_j chi_a + sum_i A_ia d_i d_j chi_a) for the j-th coordinate of a's centre.  Per spin,
    rho = chi D chi, grad rho = 2 grad chi D chi, tau = 1/2 grad chi D grad chi and e_hf = -1/2 E nu E with
    E = chi D contribute A0 = 2 v_rho x + 2 v_grad . y - D (v_hf nu E) and A_i = 2 v_grad_i x + v_tau y_i
    (x = chi D, y = grad chi D).
    """
    x, y = xy  # (g, ns, nao), (3, g, ns, nao)
    g, ns, nao = x.shape
    ao = ao2[:4]
    hf = (v_hf.permute(1, 0, 2).unsqueeze(-1) * fb.nu_x).sum(0)  # (g, ns, k): sum_w v_hf^w (nu^w E)_b
    hf_full = torch.zeros(g, ns, nao, dtype=x.dtype, device=x.device)
    hf_full.index_add_(-1, fb.idx, hf)
    d_hf = torch.einsum('gsb,sab->gsa', hf_full, dm)  # D symmetric
    a0 = (2.0 * v_rho.unsqueeze(-1) * x + 2.0 * (v_grad.unsqueeze(-1) * y).sum(0) - d_hf).sum(1)  # (g, nao)
    a1 = (2.0 * v_grad.unsqueeze(-1) * x.unsqueeze(0) + v_tau.unsqueeze(-1) * y).sum(2)  # (3, g, nao)
    force = torch.empty(3, g, nao, dtype=x.dtype, device=x.device)
    for j in range(3):
        force[j] = -(a0 * ao[1 + j] + sum(a1[i] * ao2[_HESSIAN_INDEX[i][j]] for i in range(3)))
    return force


def _integral_force(ni: DM21NumInt, mol, coords: np.ndarray, shells: np.ndarray, fb, v_hf) -> torch.Tensor:
    """(3, g, k): the derivative of the block's energy through nu with respect to the centre of each kept AO b.

    d e_s/dR_b = sum_d E_b <d b|v_omega(r)|d> E_d for each omega, weighted by v_hf = dE/de_s^omega; the
    integrals over the kept shells only (those the energy used), in float64.
    """
    g, k = len(coords), len(fb.idx)
    out = torch.zeros(3, g, k, dtype=torch.float64, device=fb.x.device)
    if k == 0:
        return out
    xs = fb.x[..., fb.idx]  # (g, ns, k)
    for w, omega in enumerate(ni.omegas):
        ip = torch.from_numpy(nu_ip(mol, coords, shells, omega)).to(xs.device)
        ip_e = torch.matmul(ip, xs.transpose(1, 2).unsqueeze(0))  # (3, g, k, ns)
        out += (ip_e * (xs * v_hf[:, w, :].unsqueeze(-1)).transpose(1, 2).unsqueeze(0)).sum(-1)
    return out


def nu_ip(mol, coords: np.ndarray, shells: np.ndarray, omega: float) -> np.ndarray:
    """<d_j b|v_omega(r)|d> (3, g, k, k) over the AOs of ``shells`` at the points ``coords`` (float64).

    v_omega(r) = erf(omega |r' - r|) / |r' - r| (1 / |r' - r| for omega = 0), set as :meth:`.DM21NumInt._nu`
    sets it; d nu_bd/dR_A = -ip_bd [b on A] - ip_db [d on A].
    """
    g = len(coords)
    bas = np.ascontiguousarray(mol._bas[shells])
    env = np.append(mol._env, np.asarray(coords, dtype=np.float64).ravel())
    env[gto.mole.NGRIDS] = g
    env[gto.mole.PTR_GRIDS] = env.size - 3 * g
    env[gto.mole.PTR_RANGE_OMEGA] = omega
    return gto.moleintor.getints(mol._add_suffix('int1e_grids_ip'), mol._atm, bas, env, comp=3, hermi=0)


def _weight_derivatives(mol, grids):
    """A function of a slice of the grid's points giving dw_g/dR (natm, 3, g) of the Becke partition weights.

    PySCF's own derivative for sorted, pruned grids (the hessian code's ``get_dweight_dA``), which reads
    each point's atom and quadrature weight from the grid (PySCF >= 2.5 grids keep them).
    """
    try:
        from pyscf.hessian.rks import get_dweight_dA
    except ImportError:  # pragma: no cover - PySCF without it
        get_dweight_dA = None
    if get_dweight_dA is None or getattr(grids, 'atm_idx', None) is None:
        raise NotImplementedError(
            'grid_response needs PySCF grids that record the atom of each point (PySCF >= 2.5); '
            'set grid_response = False for the approximate gradient without grid response'
        )
    if grids.becke_scheme is not gen_grid.original_becke:
        raise NotImplementedError(
            f'grid_response is implemented for the original Becke partition only, the grid uses '
            f'{getattr(grids.becke_scheme, "__name__", grids.becke_scheme)}; set grid_response = False'
        )
    natm = mol.natm

    def block(points: slice) -> np.ndarray:
        atoms = grids.atm_idx[points]
        real = atoms >= 0
        out = np.zeros((natm, 3, len(atoms)))
        if real.any():
            sub = SimpleNamespace(
                coords=np.ascontiguousarray(grids.coords[points][real]),
                atm_idx=np.ascontiguousarray(atoms[real], dtype=np.int32),
                quadrature_weights=np.ascontiguousarray(grids.quadrature_weights[points][real]),
                becke_scheme=grids.becke_scheme,
                radii_adjust=grids.radii_adjust,
                atomic_radii=grids.atomic_radii,
            )
            out[:, :, real] = get_dweight_dA(mol, sub)
        return out

    return block


class _DM21GradientsMixin:
    """The XC part of PySCF's KS gradients, replaced by :func:`xc_gradient`."""

    grid_response = True

    def _xc_gradient(self, mol, dms: np.ndarray, restricted: bool) -> np.ndarray:
        mf = self.base
        grids = self.grids if self.grids is not None else mf.grids
        if grids.coords is None:
            if grids is mf.grids:
                mf._grids_ready(mol, dms)  # the SCF's grid, pruned as the SCF prunes it
            else:
                grids.build(with_non0tab=True)
        max_memory = None  # as in the SCF: let DM21NumInt decide unless the user set max_memory
        if mf.max_memory != lib.param.MAX_MEMORY:
            max_memory = mf.max_memory - lib.current_memory()[0]
        t0 = (logger.process_clock(), logger.perf_counter())
        spin_dms = dms[None] / 2.0 if restricted else dms
        exc, de = xc_gradient(
            mf._numint, mol, grids, spin_dms, grid_response=bool(self.grid_response), max_memory=max_memory
        )
        logger.timer(self, 'DM21 XC gradient', *t0)
        logger.debug(self, 'DM21 E_xc on the gradient grid = %.12f; sum of XC gradient %s', exc, de.sum(0))
        return de

    def _dispersion_gradient(self, mol) -> np.ndarray:
        """dE_disp/dR (natm, 3) of the SCF's ``disp`` (the library's analytic gradient), zeros without it."""
        version = dispersion.check_disp(getattr(self.base, 'disp', None))
        if version is None:
            return np.zeros((mol.natm, 3))
        return dispersion.dispersion(mol, version, gradient=True)[1]

    def extra_force(self, atom_id, envs):
        """The whole XC gradient of the atom (computed in ``get_veff``), grid response included when asked, and the
        dispersion gradient when the SCF has ``disp``."""
        return envs['vhf'].de_xc[atom_id] + envs['vhf'].de_disp[atom_id]


class RKSGradients(_DM21GradientsMixin, rks_grad.Gradients):
    """Nuclear gradients of a restricted DM21 Kohn-Sham calculation (``grid_response`` default True)."""

    def get_veff(self, mol=None, dm=None):
        """Coulomb part as PySCF's (3, nao, nao), tagged with the XC gradient ``de_xc`` (natm, 3)."""
        mol = self.mol if mol is None else mol
        dm = np.asarray(self.base.make_rdm1() if dm is None else dm)
        vj = self.get_j(mol, dm)
        de_xc = self._xc_gradient(mol, dm, restricted=True)
        return lib.tag_array(vj, de_xc=de_xc, de_disp=self._dispersion_gradient(mol))


class UKSGradients(_DM21GradientsMixin, uks_grad.Gradients):
    """Nuclear gradients of an unrestricted DM21 Kohn-Sham calculation (``grid_response`` default True)."""

    def get_veff(self, mol=None, dm=None):
        """Coulomb part as PySCF's (2, 3, nao, nao), tagged with the XC gradient ``de_xc`` (natm, 3)."""
        mol = self.mol if mol is None else mol
        dm = np.asarray(self.base.make_rdm1() if dm is None else dm)
        if dm.ndim == 2:
            dm = np.stack([dm * 0.5, dm * 0.5])
        vj = self.get_j(mol, dm)
        vj = np.repeat((vj[0] + vj[1])[None], 2, axis=0)
        de_xc = self._xc_gradient(mol, dm, restricted=False)
        return lib.tag_array(vj, de_xc=de_xc, de_disp=self._dispersion_gradient(mol))


def gradients(mf):
    """The gradient object of a DM21 SCF: :class:`RKSGradients` or :class:`UKSGradients`; ROKS is refused."""
    from pyscf.dft import roks, uks

    if isinstance(mf, roks.ROKS):
        raise NotImplementedError(
            'analytic gradients of DM21 ROKS are not implemented (PySCF has no ROKS gradients either); '
            'use UKS, or finite differences of the ROKS energy'
        )
    if isinstance(mf, uks.UKS):
        return UKSGradients(mf)
    return RKSGradients(mf)
