"""Per-system energy and self-consistency regulariser for training (no AiiDA).

For a fixed density D (a training system) the model gives E_xc[D] = Σ_g w_g f(x_g[D]) · parts_g[D].
The loss of a system is (E_xc − E_xc^target)² + λ ΔE², with the regulariser

    ΔE = ½ Σ_σ Σ_ij (n_i − n_j)(ε_i − ε_j) / ((ε_i − ε_j)² + η²) · F_ij²,   F_ij = C_iᵀ F_σ C_j,

the second-order estimate of how much the energy would still change if the functional were run
self-consistently from D (occupations n and orbitals C are the system's input orbitals;
F_σ = h + J[D] + V_xc,σ[D] with the model's own potential V_xc = ∂E_xc/∂D_σ).  The orbital energies ε
of the denominator are, by default (``orbital_energies='model'``), the model's own, ε_i = F_ii (the
diagonal of the model's Fock matrix in the input orbitals: differentiable, and within rounding the
eigenvalues of F canonicalised in the occupied and virtual blocks); ``'reference'`` uses the input
orbitals' energies (the reference method's, e.g. UHF), whose larger gaps under-estimate the relaxation
(docs/training.md: 70 % of a real SCF's relaxation for LiH, 85 % with the model's).  η regularises
near-degenerate pairs (a plain 1/(ε_i − ε_j) would diverge).  V_xc is differentiated w.r.t. the
network weights through a double backward pass.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from pyscf import dft

from ..functional.numint import _features
from ..functional.scf import treutler_ahlrichs_original
from ..reference.fractional import TrainingSystem
from ..reference.integer import frame_molecule

__all__ = ['ORBITAL_ENERGIES', 'PreparedSystem', 'prepare_system', 'self_consistency_delta', 'system_energy']


@dataclasses.dataclass
class PreparedSystem:
    """A training system with its grid quantities, as torch tensors on ``device``."""

    system: TrainingSystem
    weights: torch.Tensor  # (g,)
    ao: torch.Tensor  # (4, g, nao)
    nu: torch.Tensor  # (n_omega, g, nao, nao)
    dm: torch.Tensor  # (2, nao, nao)
    no_coeff: torch.Tensor
    no_occ: torch.Tensor
    no_energy: torch.Tensor
    h_core_j: torch.Tensor
    target: float

    @property
    def n_points(self) -> int:
        return int(self.weights.shape[0])


def prepare_system(
    system: TrainingSystem, grid_level: int = 1, omegas=(0.0, 0.4), device: str | torch.device = 'cpu'
) -> PreparedSystem:
    """Grid, AO values and ν integrals of one system (computed once: the density is fixed)."""
    mol = frame_molecule(system.atom, system.basis)
    grids = dft.gen_grid.Grids(mol)
    grids.level = grid_level
    grids.radi_method = treutler_ahlrichs_original
    grids.build()
    ao = dft.numint.eval_ao(mol, grids.coords, deriv=1)
    nus = []
    for omega in omegas:
        with mol.with_range_coulomb(omega):
            nus.append(mol.intor('int1e_grids', hermi=1, grids=grids.coords))

    def t(a):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64, device=device)

    return PreparedSystem(
        system=system,
        weights=t(grids.weights),
        ao=t(ao),
        nu=t(np.stack(nus)),
        dm=t(system.dm),
        no_coeff=t(system.no_coeff),
        no_occ=t(system.no_occ),
        no_energy=t(system.no_energy),
        h_core_j=t(system.h_core_j),
        target=float(system.e_xc_target),
    )


def system_energy(network: torch.nn.Module, ps: PreparedSystem, with_potential: bool = False):
    """E_xc (scalar tensor, differentiable w.r.t. the weights) and, if asked, V_xc (2, nao, nao), differentiable too."""
    dtype = next(network.parameters()).dtype
    if not with_potential:
        with torch.no_grad():
            _, feats, parts = _features(ps.ao, ps.nu, ps.dm)
        f = network(feats.to(dtype)).to(torch.float64)
        return (ps.weights * (f * parts).sum(-1)).sum(), None
    dm = ps.dm.clone().requires_grad_(True)
    _, feats, parts = _features(ps.ao, ps.nu, dm)
    x = feats.detach().to(dtype).requires_grad_(True)
    f = network(x).to(torch.float64)
    energy = (ps.weights * (f * parts.detach()).sum(-1)).sum()
    (g_x,) = torch.autograd.grad(energy, x, create_graph=True)
    (v,) = torch.autograd.grad(
        [feats, parts], dm, grad_outputs=[g_x.to(torch.float64), ps.weights[:, None] * f], create_graph=True
    )
    return energy, 0.5 * (v + v.transpose(-1, -2))


#: ``orbital_energies`` of :func:`self_consistency_delta` (and ``TrainConfig.regulariser_orbital_energies``).
ORBITAL_ENERGIES = ('model', 'reference')


def self_consistency_delta(
    ps: PreparedSystem, v_xc: torch.Tensor, eta: float = 1e-2, orbital_energies: str = 'model'
) -> torch.Tensor:
    """Second-order energy change ΔE (Ha) of one SCF step from the system's density with the model's Fock matrix.

    ``orbital_energies``: ``'model'`` (ε_i = F_ii of the model's Fock matrix) or ``'reference'`` (the input
    orbitals' own energies, the reference method's).
    """
    if orbital_energies not in ORBITAL_ENERGIES:
        raise ValueError(f'orbital_energies must be one of {ORBITAL_ENERGIES}, got {orbital_energies!r}')
    fock = ps.h_core_j + v_xc  # (2, nao, nao)
    f_no = ps.no_coeff.transpose(-1, -2) @ fock @ ps.no_coeff
    dn = ps.no_occ[:, :, None] - ps.no_occ[:, None, :]
    eps = torch.diagonal(f_no, dim1=-2, dim2=-1) if orbital_energies == 'model' else ps.no_energy
    de = eps[:, :, None] - eps[:, None, :]
    return 0.5 * (dn * de / (de * de + eta * eta) * f_no * f_no).sum()
