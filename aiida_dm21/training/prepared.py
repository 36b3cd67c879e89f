"""Prepared training data: what fixed-density training needs per grid point, on disk, read per mini-batch.

At a fixed density D every quantity the loss needs is a fixed array over the grid, except the network's
enhancement factors f and their input derivatives.  With x_g the 11 features, w_g the weights and p_g the
three energy densities of :func:`~aiida_dm21.functional.model.xc_energy_parts`,

    E_xc = Σ_g w_g f(x_g) · p_g.

The self-consistency regulariser needs V_σ = ∂E_xc/∂D_σ.  By the chain rule (the same one
:func:`~aiida_dm21.functional.numint._block_potential` writes out for the SCF), with E_σ = χᵀ D_σ and
G = ∂E/∂x = w (∂f/∂x)ᵀ p (from the network),

    V_σ,ab = Σ_g χ_a(g) r_σ,b(g) + Σ_g Σ_k ∂_k χ_a(g) (½ v_τσ(g)) ∂_k χ_b(g),    then symmetrised, where
    r_σ = v_ρσ χ + 2 Σ_k v_∇σ,k ∂_k χ − Σ_ω v_hf,σω (ν_ω E_σ),
    v_ρσ = G_ρσ + w f_1 (4/3) c_LDA ρ_σ^⅓,  v_∇σ = 2 (G_σσσ ∇ρ_σ + G_σ ∇ρ),  v_τσ = G_τσ,
    v_hf,σω = G_hf,σω + w f_(1+ω).

So besides x, w and p only χ and ∇χ (4 × nao per point), the products ν_ω E_σ (n_ω × 2 × nao per point) and
the spin-density gradients ∇ρ_σ (3 × 2) are needed: never ν itself (n_ω × nao² per point).  They are computed
block by block (the dense ν of one block at a time), written once per system to ``.npy`` files and
memory-mapped when a mini-batch needs them.  ``tests/test_prepared.py`` holds E_xc, V_xc, the loss and its
gradient equal to the dense path of :mod:`.loss` to rounding.

Layout of a prepared folder::

    index.json                  format, version, grid, omegas, the systems in order, content_sha256
    systems/<key>/meta.json     label, kind, target, n_points, nao, arrays (written last: the system is complete)
    systems/<key>/<name>.npy    weights (g,), feats (g, 11), parts (g, 3)                         float64
                                ao (g, 4, nao), nu_x (g, n_ω, 2, nao), grad (g, 3, 2)   if with regulariser
                                no_coeff, no_occ, no_energy, h_core_j                    the input orbitals

``<key>`` is the sha256 of what the arrays depend on (the system's density, orbitals and target, the grid,
omegas and this format's version): a folder is reused across epochs, jobs and resumes, and by any other
dataset with the same system.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from pyscf import dft

from ..functional.model import LDA_X_FACTOR
from ..functional.numint import _features
from ..functional.scf import treutler_ahlrichs_original
from ..reference.fractional import TrainingSystem
from ..reference.integer import frame_molecule

__all__ = [
    'PREPARED_FORMAT',
    'PREPARED_FORMAT_VERSION',
    'CompactSystem',
    'PreparedData',
    'PreparedDataError',
    'compact_energy',
    'compact_potential',
    'grid_spec',
    'prepare_dataset',
    'prepare_system_files',
    'system_key',
]

PREPARED_FORMAT = 'aiida-dm21-prepared'
PREPARED_FORMAT_VERSION = 1
INDEX_FILE = 'index.json'
META_FILE = 'meta.json'
ENERGY_ARRAYS = ('weights', 'feats', 'parts')
REGULARISER_ARRAYS = ('ao', 'nu_x', 'grad')
ORBITAL_ARRAYS = ('no_coeff', 'no_occ', 'no_energy', 'h_core_j')
BLOCK_BYTES = 64e6  # dense float64 ν of one block during preparation


class PreparedDataError(ValueError):
    """A prepared-data folder that cannot be used (wrong format, missing or inconsistent files)."""


def build_grids(mol, level: int):
    """The training grid: PySCF's ``Grids`` at ``level`` with the SCF's radial method (no pruning by density)."""
    grids = dft.gen_grid.Grids(mol)
    grids.level = level
    grids.radi_method = treutler_ahlrichs_original
    grids.build()
    return grids


def grid_spec(level: int) -> dict:
    """What identifies the training grid, as recorded in prepared data and in the checkpoint metadata."""
    prune = dft.gen_grid.Grids.prune
    return {
        'level': int(level),
        'radi_method': treutler_ahlrichs_original.__name__,
        'prune': getattr(prune, '__name__', str(prune)),
    }


def system_key(system: TrainingSystem, grid: dict, omegas: Sequence[float]) -> str:
    """sha256 of everything a system's prepared arrays depend on."""
    digest = hashlib.sha256()
    head = {
        'format': PREPARED_FORMAT,
        'format_version': PREPARED_FORMAT_VERSION,
        'grid': grid,
        'omegas': [float(w) for w in omegas],
        'atom': system.atom,
        'basis': system.basis,
        'kind': system.kind,
        'label': system.label,
        'target': float(system.e_xc_target),
    }
    digest.update(json.dumps(head, sort_keys=True).encode())
    for name in ('dm', *ORBITAL_ARRAYS):
        array = np.ascontiguousarray(getattr(system, name), dtype=np.float64)
        digest.update(repr(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _open(path: Path, shape: tuple[int, ...]) -> np.memmap:
    return np.lib.format.open_memmap(path, mode='w+', dtype=np.float64, shape=shape)


def prepare_system_files(
    system: TrainingSystem,
    folder: str | Path,
    grid_level: int,
    omegas: Sequence[float] = (0.0, 0.4),
    with_regulariser: bool = True,
    key: str | None = None,
) -> dict:
    """Compute one system's prepared arrays into ``folder`` (created; written block by block) and return its meta.

    Peak memory: one block's dense ν (:data:`BLOCK_BYTES`) and AO values, not the system's whole grid.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mol = frame_molecule(system.atom, system.basis)
    grids = build_grids(mol, grid_level)
    # plain ints: PySCF 2.3's mol.nao is a numpy integer, which json refuses
    ngrid, nao, n_omega = len(grids.weights), int(mol.nao), len(omegas)
    arrays = {
        'weights': _open(folder / 'weights.npy', (ngrid,)),
        'feats': _open(folder / 'feats.npy', (ngrid, 11)),
        'parts': _open(folder / 'parts.npy', (ngrid, 3)),
    }
    if with_regulariser:
        arrays['ao'] = _open(folder / 'ao.npy', (ngrid, 4, nao))
        arrays['nu_x'] = _open(folder / 'nu_x.npy', (ngrid, n_omega, 2, nao))
        arrays['grad'] = _open(folder / 'grad.npy', (ngrid, 3, 2))
    dm = torch.as_tensor(np.ascontiguousarray(system.dm), dtype=torch.float64)
    block = int(max(64, min(ngrid, BLOCK_BYTES / (8.0 * n_omega * nao * nao))))
    for start in range(0, ngrid, block):
        stop = min(ngrid, start + block)
        coords = np.ascontiguousarray(grids.coords[start:stop])
        ao = torch.from_numpy(np.ascontiguousarray(dft.numint.eval_ao(mol, coords, deriv=1)))  # (4, b, nao)
        nus = []
        for omega in omegas:
            with mol.with_range_coulomb(omega):
                nus.append(mol.intor('int1e_grids', hermi=1, grids=coords))
        nu = torch.from_numpy(np.stack(nus))  # (n_omega, b, nao, nao)
        with torch.no_grad():
            _, feats, parts = _features(ao, nu, dm)
        arrays['weights'][start:stop] = grids.weights[start:stop]
        arrays['feats'][start:stop] = feats.numpy()
        arrays['parts'][start:stop] = parts.numpy()
        if with_regulariser:
            x = torch.matmul(ao[0], dm)  # (2, b, nao): E_σ = χᵀ D_σ
            nu_x = torch.matmul(nu, x.permute(1, 2, 0).unsqueeze(0))  # (n_omega, b, nao, 2)
            grad = 2.0 * (x.unsqueeze(1) * ao[1:]).sum(-1)  # (2, 3, b)
            arrays['ao'][start:stop] = ao.permute(1, 0, 2).numpy()
            arrays['nu_x'][start:stop] = nu_x.permute(1, 0, 3, 2).numpy()
            arrays['grad'][start:stop] = grad.permute(2, 1, 0).numpy()
        del nu, nus
    for array in arrays.values():
        array.flush()
    del arrays
    for name in ORBITAL_ARRAYS:
        np.save(folder / f'{name}.npy', np.ascontiguousarray(getattr(system, name), dtype=np.float64))
    names = (*ENERGY_ARRAYS, *(REGULARISER_ARRAYS if with_regulariser else ()), *ORBITAL_ARRAYS)
    meta = {
        'key': key or system_key(system, grid_spec(grid_level), omegas),
        'label': system.label,
        'kind': system.kind,
        'target': float(system.e_xc_target),
        'n_points': ngrid,
        'nao': nao,
        'with_regulariser': bool(with_regulariser),
        'arrays': {n: list(np.load(folder / f'{n}.npy', mmap_mode='r').shape) for n in names},
        'bytes': sum((folder / f'{n}.npy').stat().st_size for n in names),
    }
    tmp = folder / (META_FILE + '.tmp')
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / META_FILE)  # last: a folder with meta.json is complete
    return meta


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None


def prepare_dataset(
    systems: Sequence[TrainingSystem],
    folder: str | Path,
    grid_level: int,
    omegas: Sequence[float] = (0.0, 0.4),
    with_regulariser: bool = True,
    progress: Callable[[str], None] | None = None,
) -> PreparedData:
    """Prepare ``systems`` into ``folder`` (reusing every system already there) and write its index."""
    folder = Path(folder)
    (folder / 'systems').mkdir(parents=True, exist_ok=True)
    grid = grid_spec(grid_level)
    say = progress or (lambda message: None)
    entries, made, reused = [], 0, 0
    for system in systems:
        key = system_key(system, grid, omegas)
        target = folder / 'systems' / key
        meta = _read_meta(target)
        if meta is None or meta.get('key') != key or (with_regulariser and not meta.get('with_regulariser')):
            tmp = folder / 'systems' / f'.{key}.{os.getpid()}.tmp'
            shutil.rmtree(tmp, ignore_errors=True)
            meta = prepare_system_files(system, tmp, grid_level, omegas, with_regulariser, key)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            made += 1
        else:
            reused += 1
        entries.append({'folder': f'systems/{key}', **{k: meta[k] for k in ('key', 'label', 'kind', 'target')}})
    content = hashlib.sha256(json.dumps([grid, list(omegas), [e['key'] for e in entries]]).encode()).hexdigest()
    index = {
        'format': PREPARED_FORMAT,
        'format_version': PREPARED_FORMAT_VERSION,
        'grid': grid,
        'omegas': [float(w) for w in omegas],
        'with_regulariser': bool(with_regulariser),
        'content_sha256': content,
        'systems': entries,
    }
    tmp = folder / (INDEX_FILE + '.tmp')
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(folder / INDEX_FILE)
    say(f'prepared data in {folder}: {made} systems computed, {reused} reused (grid level {grid_level})')
    return PreparedData(folder)


@dataclasses.dataclass
class CompactSystem:
    """One system's prepared arrays as torch tensors (float64) on a device."""

    label: str
    kind: str
    target: float
    weights: torch.Tensor  # (g,)
    feats: torch.Tensor  # (g, 11)
    parts: torch.Tensor  # (g, 3)
    no_coeff: torch.Tensor  # (2, nao, nao)
    no_occ: torch.Tensor  # (2, nao)
    no_energy: torch.Tensor  # (2, nao)
    h_core_j: torch.Tensor  # (nao, nao)
    ao: torch.Tensor | None = None  # (g, 4, nao)
    nu_x: torch.Tensor | None = None  # (g, n_omega, 2, nao)
    grad: torch.Tensor | None = None  # (g, 3, 2)

    @property
    def n_points(self) -> int:
        return int(self.weights.shape[0])

    @property
    def has_regulariser(self) -> bool:
        return self.ao is not None


class PreparedData:
    """A prepared folder (:func:`prepare_dataset`): its index, and each system loaded on demand."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            index = json.loads((self.folder / INDEX_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise PreparedDataError(f'{self.folder}: no readable {INDEX_FILE}: {exc}') from exc
        if not isinstance(index, dict) or index.get('format') != PREPARED_FORMAT:
            raise PreparedDataError(f'{self.folder}: not {PREPARED_FORMAT!r} data')
        if index.get('format_version') != PREPARED_FORMAT_VERSION:
            raise PreparedDataError(
                f'{self.folder}: prepared-data format version {index.get("format_version")!r}; this aiida-dm21 '
                f'reads {PREPARED_FORMAT_VERSION}'
            )
        self.index = index
        self.systems: list[dict] = index['systems']
        self.grid: dict = index['grid']

    def __len__(self) -> int:
        return len(self.systems)

    def meta(self, i: int) -> dict:
        meta = _read_meta(self.folder / self.systems[i]['folder'])
        if meta is None or meta.get('key') != self.systems[i]['key']:
            raise PreparedDataError(f'{self.folder}: system {self.systems[i]["label"]} is missing or incomplete')
        return meta

    def n_points(self, i: int) -> int:
        return int(self.meta(i)['n_points'])

    def load(self, i: int, device: str | torch.device = 'cpu', with_regulariser: bool = True) -> CompactSystem:
        """System ``i`` read from its memory-mapped files (only the arrays asked for)."""
        entry = self.systems[i]
        meta = self.meta(i)
        if with_regulariser and not meta.get('with_regulariser'):
            raise PreparedDataError(f'{self.folder}: {entry["label"]} was prepared without the regulariser arrays')
        base = self.folder / entry['folder']

        def read(name: str) -> torch.Tensor:
            mapped = np.load(base / f'{name}.npy', mmap_mode='r')
            return torch.from_numpy(np.array(mapped, dtype=np.float64)).to(device)

        names = (*ENERGY_ARRAYS, *ORBITAL_ARRAYS, *(REGULARISER_ARRAYS if with_regulariser else ()))
        tensors = {name: read(name) for name in names}
        return CompactSystem(label=entry['label'], kind=entry['kind'], target=float(entry['target']), **tensors)


def compact_energy(network: torch.nn.Module, cs: CompactSystem, with_potential: bool = False):
    """E_xc (scalar, differentiable w.r.t. the weights) and, if asked, V_xc (2, nao, nao), differentiable too."""
    dtype = next(network.parameters()).dtype
    x = cs.feats.detach().to(dtype)
    if not with_potential:
        f = network(x).to(torch.float64)
        return (cs.weights * (f * cs.parts).sum(-1)).sum(), None
    x = x.detach().requires_grad_(True)
    f = network(x).to(torch.float64)
    energy = (cs.weights * (f * cs.parts).sum(-1)).sum()
    (g_x,) = torch.autograd.grad(energy, x, create_graph=True)
    return energy, compact_potential(cs, f, g_x.to(torch.float64))


def compact_potential(cs: CompactSystem, f: torch.Tensor, g: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """V_xc = ∂E_xc/∂D_σ (2, nao, nao), symmetrised, from f (g, 3) and G = ∂E/∂x (g, 11) (module docstring)."""
    if not cs.has_regulariser:
        raise PreparedDataError(f'{cs.label}: prepared without the regulariser arrays (χ, ν E, ∇ρ)')
    nao = cs.ao.shape[-1]
    wf = cs.weights[:, None] * f
    rho = cs.feats[:, 0:2].clamp(min=0.0)
    v_rho = g[:, 0:2] + wf[:, 0:1] * (LDA_X_FACTOR * 4.0 / 3.0) * rho ** (1.0 / 3.0)  # (g, 2)
    grad = cs.grad  # (g, 3, 2)
    v_grad = 2.0 * (g[:, None, 3:5] * grad + g[:, None, 2:3] * grad.sum(-1, keepdim=True))  # (g, 3, 2)
    v_tau = 0.5 * g[:, 5:7]  # (g, 2)
    v_hf = torch.stack([g[:, 7:9], g[:, 9:11]], dim=-1) + wf[:, 1:3, None]  # (g, n_omega, 2)
    out = None
    for start in range(0, cs.n_points, chunk):
        s = slice(start, start + chunk)
        ao = cs.ao[s]  # (b, 4, nao), contiguous
        ao0, ao1 = ao[:, 0], ao[:, 1:]
        r0 = (
            v_rho[s, :, None] * ao0[:, None, :]
            + 2.0 * (v_grad[s, :, :, None] * ao1[:, :, None, :]).sum(1)
            - (v_hf[s, :, :, None] * cs.nu_x[s]).sum(1)
        )  # (b, 2, nao)
        r1 = ao1[:, :, None, :] * v_tau[s, None, :, None]  # (b, 3, 2, nao)
        rhs = torch.cat([r0[:, None], r1], dim=1)  # (b, 4, 2, nao)
        part = ao.reshape(-1, nao).t() @ rhs.reshape(-1, 2 * nao)
        out = part if out is None else out + part
    v = out.view(nao, 2, nao).permute(1, 0, 2)
    return 0.5 * (v + v.transpose(-1, -2))


def evaluate_fast(network, cs: CompactSystem, with_potential: bool) -> tuple[float, torch.Tensor | None]:
    """E_xc and V_xc without an autograd graph (evaluation, validation): the SCF's hand-written input gradient."""
    dtype = next(network.parameters()).dtype
    x = cs.feats.to(dtype)
    with torch.no_grad():
        if not with_potential:
            f = network(x).to(torch.float64)
            return float((cs.weights * (f * cs.parts).sum(-1)).sum()), None
        energy_weights = cs.weights[:, None] * cs.parts
        if dtype == torch.float32 and x.device.type == 'cpu':
            f, g_x = network.forward_with_input_grad(x.contiguous(), energy_weights.to(dtype).contiguous())
        else:
            f, g_x = None, None
    if f is None:  # float64 networks and GPUs: autograd
        energy, v = compact_energy(network, cs, with_potential=True)
        return float(energy.detach()), v.detach()
    f64 = f.to(torch.float64)
    energy = float((energy_weights * f64).sum())
    with torch.no_grad():
        v = compact_potential(cs, f64, g_x.to(torch.float64))
    return energy, v
