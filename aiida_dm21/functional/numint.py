"""DM21 features, energy and Fock matrix on a PySCF grid (no AiiDA).

The energy is E_xc[D] = sum_g w_g e_xc(x_g[D]) with the 11 features x_g of :mod:`.model`.  The SCF path
(:func:`_block_features`, :func:`_block_potential`) writes the chain rule to dE_xc/dD out by hand; the
training path (:func:`_features`) runs the same map through autograd (it needs higher derivatives), and
the tests hold the two equal.

Cost.  The local-HF features need nu_bd(r) = int chi_b(r') v_omega(|r - r'|) chi_d(r') dr' at every grid
point for both omegas: ``ngrid x nao^2`` three-centre integrals, by far the most expensive ingredient, and
independent of the density matrix.  DeepMind's code recomputes them at every SCF iteration.  Here they are
screened (only the AOs whose E_b = (chi D)_b matter, per grid block: :meth:`DM21NumInt._needed_shells`),
stored packed in float32, and cached between evaluations within a memory budget that follows the machine
(or ``max_memory`` when the user sets it); what does not fit is recomputed block by block.  One log line
says which path was taken (docs/core.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pyscf import gto
from pyscf import lib as pyscf_lib
from pyscf.dft import numint as pyscf_numint
from pyscf.lib import logger

from . import kernels
from .model import LDA_X_FACTOR, DM21Network, xc_energy_parts

__all__ = [
    'DEFAULT_SCREENING',
    'DM21NumInt',
    'DeviceUnavailableError',
    'UnsupportedSystemError',
    'XCResult',
    'available_memory_mb',
    'check_device',
    'check_screening',
    'check_supported_molecule',
]

#: Default screening threshold (Ha): a bound on the E_xc error from the AOs left out of the local-HF
#: energies, summed over the grid (see :meth:`DM21NumInt._needed_shells`).
DEFAULT_SCREENING: float = 1e-5


#: Share of the available memory (RAM, or free GPU memory) that the integral cache may take by default: the rest
#: is for the SCF's own work (AO blocks, J, the B3LYP guess, PySCF's DIIS), so that the peak stays near 1/3.
CACHE_MEMORY_FRACTION: float = 0.3


class UnsupportedSystemError(ValueError):
    """The molecule cannot be treated by the DM21 functionals (periodic cell, ECP, ...)."""


class DeviceUnavailableError(RuntimeError):
    """A device was requested that this machine (or this PyTorch build) does not have."""


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`, refusing what cannot run here (never a silent CPU fallback)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == 'cpu':
        return dev
    if dev.type != 'cuda':
        raise ValueError(f"device: {device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        build = 'a CPU-only build' if torch.version.cuda is None else f'built for CUDA {torch.version.cuda}'
        raise DeviceUnavailableError(
            f'device {device!r} was requested, but PyTorch ({torch.__version__}, {build}) sees no CUDA GPU on '
            f'this machine; run on a machine with a GPU, or use device="cpu"'
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise DeviceUnavailableError(f'device {device!r} was requested, but this machine has {count} CUDA GPU(s)')
    return dev


def check_screening(value: float) -> float:
    """A screening threshold: finite and >= 0 (0 switches screening off: the dense evaluation)."""
    try:
        threshold = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f'screening must be a number >= 0, got {value!r}') from exc
    if not np.isfinite(threshold) or threshold < 0.0:
        raise ValueError(f'screening must be finite and >= 0 (0: dense), got {value!r}')
    return threshold


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
    ao: torch.Tensor | None  # (4, g, nao): value and x, y, z derivatives, when cached
    coords: np.ndarray  # (g, 3)
    nu: torch.Tensor | None = None  # (n_omega, g, k (k + 1) / 2) screened integrals, packed, when cached
    nu_shells: np.ndarray | None = None  # the shells nu covers
    nu_idx: torch.Tensor | None = None  # (k,) their AOs


@dataclass
class Timings:
    """Wall time (s) accumulated per phase over all evaluations."""

    integrals: float = 0.0  # screening decisions and nu integrals (cached or computed)
    integrals_computed: float = 0.0  # of which computing nu integrals
    features: float = 0.0
    network: float = 0.0
    potential: float = 0.0
    calls: int = 0

    def as_dict(self) -> dict:
        keys = ('integrals', 'integrals_computed', 'features', 'network', 'potential', 'calls')
        return {k: getattr(self, k) for k in keys}


class DM21NumInt(pyscf_numint.NumInt):
    """A PySCF ``NumInt`` that evaluates a DM21-architecture functional.

    It serves PySCF's ground-state entry points ``nr_rks`` and ``nr_uks`` (same signature from PySCF
    2.0 to 2.14), so it also works when assigned to a stock KS object: ``mf._numint = DM21NumInt(net)``
    with a non-hybrid ``mf.xc``.  PySCF's per-point entry points ``eval_xc``/``eval_xc_eff`` receive only
    the density on the grid, never the density matrix that the local-HF features need; they raise
    :class:`NotImplementedError` instead of returning something wrong.
    """

    def __init__(
        self,
        network: DM21Network,
        *,
        network_dtype: torch.dtype = torch.float32,
        screening: float = DEFAULT_SCREENING,
        nu_dtype: torch.dtype = torch.float32,
        memory_budget_mb: float | None = None,
        device: str | torch.device = 'cpu',
    ) -> None:
        super().__init__()
        self.device = check_device(device)
        self.network = network.to(device=self.device, dtype=network_dtype).eval()
        self.network.requires_grad_(False)  # during SCF only the inputs need gradients
        self.network_dtype = network_dtype
        self.omegas = tuple(network.config.omegas)
        self.screening = check_screening(screening)
        if nu_dtype not in (torch.float32, torch.float64):
            raise ValueError(f'nu_dtype must be torch.float32 or torch.float64, got {nu_dtype}')
        self.nu_dtype = nu_dtype
        self.memory_budget_mb = memory_budget_mb
        self.timings = Timings()
        self._cache_key: tuple | None = None
        self._plan_cache: _Plan | None = None

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
    def nr_rks(self, mol, grids, xc_code, dms, relativity=0, hermi=1, max_memory=None, verbose=None):
        dm = _single_dm(dms, 2)
        result = self.evaluate(mol, grids, np.asarray(dm)[None] / 2.0, restricted=True, max_memory=max_memory)
        return float(result.nelec.sum()), result.exc, result.vxc[0]

    def nr_uks(self, mol, grids, xc_code, dms, relativity=0, hermi=1, max_memory=None, verbose=None):
        dms = np.asarray(dms)
        if dms.ndim == 2:  # a restricted density matrix
            dms = np.stack([dms / 2.0, dms / 2.0])
        if dms.ndim != 3 or dms.shape[0] != 2:
            raise NotImplementedError('DM21NumInt.nr_uks takes one (alpha, beta) pair of density matrices')
        result = self.evaluate(mol, grids, dms, restricted=False, max_memory=max_memory)
        return result.nelec, result.exc, result.vxc

    # --- the evaluation proper -----------------------------------------------------------------------
    def evaluate(
        self,
        mol,
        grids,
        dms: np.ndarray,
        *,
        restricted: bool,
        max_memory: float | None = None,
        with_vxc: bool = True,
    ) -> XCResult:
        """E_xc and dE_xc/dD for spin density matrices ``dms`` (``(1, nao, nao)`` = D/2 if restricted).

        For ``restricted`` the single matrix is used for both spin channels and the returned potential
        is dE_xc/dD_total (what PySCF's RKS Fock matrix needs).  ``max_memory`` (MB) bounds what is cached
        between evaluations (AO values, screened nu integrals); None: :data:`CACHE_MEMORY_FRACTION` of the memory
        available to this process (:func:`available_memory_mb`), or :attr:`memory_budget_mb` when set.
        """
        check_supported_molecule(mol)
        if grids.coords is None:
            grids.build(with_non0tab=True)
        device = self.device
        dm = torch.from_numpy(np.ascontiguousarray(dms, dtype=np.float64)).to(device)
        nelec = torch.zeros(2, dtype=torch.float64, device=device)
        exc = torch.zeros((), dtype=torch.float64, device=device)
        grad = torch.zeros_like(dm)
        t = self.timings
        plan = self._plan(mol, grids, max_memory)
        for block in plan.blocks:
            t0 = time.perf_counter()
            ao = block.ao if block.ao is not None else self._eval_ao(mol, block.coords)
            xy = _ao_products(ao, dm)
            shells = self._needed_shells(xy[0], block, plan)
            t1 = time.perf_counter()
            nu, idx = self._block_nu(mol, plan, block, shells)
            t2 = time.perf_counter()
            fb = _block_features(ao, nu, dm, idx=idx, xy=xy)
            t3 = time.perf_counter()
            energy_weights = block.weights[:, None] * fb.parts  # dE/df, (g, 3)
            x = fb.feats.to(self.network_dtype)
            if with_vxc:
                f, g_feats = self.network.forward_with_input_grad(x, energy_weights.to(x.dtype))
            else:
                f = self.network(x)
            t4 = time.perf_counter()
            f64 = f.to(torch.float64)
            exc += (energy_weights * f64).sum()
            if with_vxc:
                grad += _block_potential(fb, ao, block.weights, f64, g_feats.to(torch.float64))
            t5 = time.perf_counter()
            t.integrals += t2 - t1
            t.features += (t1 - t0) + (t3 - t2)
            t.network += t4 - t3
            t.potential += t5 - t4
            nelec += (block.weights[:, None] * fb.rho).sum(0)
        t.calls += 1
        if not plan.reported:
            plan.reported = True
            logger.note(mol, '%s', plan.describe(self))
        vxc = None
        if with_vxc:
            grad = grad.cpu().numpy()
            vxc = 0.5 * (grad + grad.transpose(0, 2, 1))
            if restricted:
                vxc = vxc * 0.5  # D_a = D_b = D/2 both depend on D
        return XCResult(nelec=nelec.cpu().numpy(), exc=float(exc), vxc=vxc)

    # --- grid blocks, screening and integrals --------------------------------------------------------
    def _eval_ao(self, mol, coords: np.ndarray) -> torch.Tensor:
        ao = pyscf_numint.eval_ao(mol, coords, deriv=1)
        return torch.from_numpy(np.ascontiguousarray(ao)).to(self.device)

    def _needed_shells(self, x: torch.Tensor, block: _Block, plan: _Plan) -> np.ndarray:
        """The shells whose AOs must enter the block's local-HF energies for the density in ``x`` = chi D.

        Dropping AO b from e_hf(r) = -1/2 sum_bd E_b nu_bd E_d (E = chi D) changes E_xc by about
        sum_r w(r) |E_b(r)| |(nu E)_b(r)|.  nu_bd(r) vanishes where chi_b and chi_d do not overlap, so
        |(nu E)_b| is estimated by sum_d |S_bd| |E_d| (S: the overlap of the normalised AOs), and
        s_b = sum_r w |E_b| sum_d |S_bd| |E_d| estimates what b contributes.  Shells are dropped, smallest s
        first, while their summed s stays within this block's share (its fraction of the grid points) of
        :attr:`screening` (Ha).  The estimate is checked against the dense evaluation in the tests.
        """
        nshell = len(plan.ao_loc) - 1
        if self.screening <= 0.0:
            return np.arange(nshell)
        size = x.abs()  # (g, ns, nao)
        score = (block.weights[:, None, None] * size * (size @ plan.abs_overlap)).sum((0, 1)).cpu().numpy()
        per_shell = np.add.reduceat(score, plan.ao_loc[:-1])
        order = np.argsort(per_shell, kind='stable')
        share = len(block.weights) / plan.ngrid
        dropped = np.cumsum(per_shell[order]) <= self.screening * share
        return np.sort(order[~dropped])

    def _block_nu(self, mol, plan: _Plan, block: _Block, shells: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The screened integrals of ``block`` over (at least) ``shells``, from the cache or computed.

        A cached entry that covers the shells the density needs now is reused as it is (more AOs than
        needed only make it more exact); one that does not is recomputed over the union, so the screening
        follows the density matrix as the SCF moves.
        """
        if block.nu is not None:
            if np.isin(shells, block.nu_shells, assume_unique=True).all():
                return block.nu, block.nu_idx
            shells = np.union1d(shells, block.nu_shells)
            plan.cached_bytes -= block.nu.numel() * block.nu.element_size()
            block.nu = block.nu_shells = block.nu_idx = None
            plan.regrown += 1
        idx = plan.shell_aos(shells).to(self.device)
        t0 = time.perf_counter()
        nu = self._nu(mol, block.coords, shells, len(idx))
        self.timings.integrals_computed += time.perf_counter() - t0
        plan.record(block, shells, nu, idx)
        return nu, idx

    def _nu(self, mol, coords: np.ndarray, shells: np.ndarray, k: int) -> torch.Tensor:
        """nu_bd(r) (n_omega, g, k (k + 1) / 2) for the AOs of ``shells`` at ``coords``, packed, in :attr:`nu_dtype`.

        libcint is handed the sub-list of shells directly (their atoms and exponents stay in ``mol._env``), so
        screened-out shells cost nothing.  PySCF returns the grid index fastest; every evaluation contracts
        over the AO indices, so (omega, g, b, d) is stored contiguous once (:func:`kernels.pack_grid_integrals`),
        from one scratch buffer that both omegas reuse.
        """
        g = len(coords)
        out = np.empty((len(self.omegas), g, k * (k + 1) // 2), dtype=_numpy_dtype(self.nu_dtype))
        if k:
            scratch = np.empty(g * k * k)
            bas = np.ascontiguousarray(mol._bas[shells])
            env = np.append(mol._env, coords.ravel())
            env[gto.mole.NGRIDS] = g
            env[gto.mole.PTR_GRIDS] = env.size - coords.size
            intor = mol._add_suffix('int1e_grids')
            for i, omega in enumerate(self.omegas):
                env[gto.mole.PTR_RANGE_OMEGA] = omega
                full = gto.moleintor.getints(intor, mol._atm, bas, env, hermi=1, out=scratch)
                kernels.pack_grid_integrals(full, out[i])
        return torch.from_numpy(out).to(self.device)

    def _plan(self, mol, grids, max_memory: float | None) -> _Plan:
        key = (id(mol), mol.nao, id(grids.coords), len(grids.weights), self.omegas, self.screening, self.nu_dtype)
        if key == self._cache_key and self._plan_cache is not None:
            return self._plan_cache
        budget_mb, why = self._budget(max_memory)
        plan = _Plan.build(mol, grids, self, budget_mb, why)
        self._plan_cache, self._cache_key = plan, key
        return plan

    def _budget(self, max_memory: float | None) -> tuple[float, str]:
        if self.memory_budget_mb is not None:
            return float(self.memory_budget_mb), 'memory_budget_mb'
        if max_memory is not None:
            return max(0.0, float(max_memory)), 'max_memory'
        if self.device.type == 'cuda':
            free, _ = torch.cuda.mem_get_info(self.device)
            return CACHE_MEMORY_FRACTION * free / 1e6, f'{CACHE_MEMORY_FRACTION:.0%} of the free GPU memory'
        return CACHE_MEMORY_FRACTION * available_memory_mb(), f'{CACHE_MEMORY_FRACTION:.0%} of the available memory'

    def reset_cache(self) -> None:
        self._cache_key = None
        self._plan_cache = None

    @property
    def _blocks(self) -> list[_Block]:
        return [] if self._plan_cache is None else self._plan_cache.blocks


@dataclass
class _Plan:
    """The grid in blocks, what of it is cached, and the numbers for the log line."""

    blocks: list[_Block]
    ao_loc: np.ndarray  # shell -> first AO
    abs_overlap: torch.Tensor  # |S| of the normalised AOs (nao, nao), for the screening estimate
    nao: int
    ngrid: int
    budget_bytes: float
    budget_why: str
    ao_cached: bool
    cached_bytes: float = 0.0  # AO values and nu integrals held now
    nu_bytes_needed: float = 0.0  # what the screened nu of every block takes (first evaluation)
    kept_pairs: float = 0.0  # sum over blocks of g * k^2
    uncached_blocks: int = 0
    regrown: int = 0
    reported: bool = False

    @classmethod
    def build(cls, mol, grids, numint: DM21NumInt, budget_mb: float, why: str) -> _Plan:
        nao, ngrid = mol.nao, len(grids.weights)
        # blocks of about 64 MB of dense float64 nu integrals, between 128 and 1,024 points: small enough that
        # the screening sees a compact piece of space (the grid is sorted into boxes), large for the network
        blksize = int(max(128, min(1024, ngrid, 64e6 / (8.0 * nao * nao * len(numint.omegas)))))
        budget = budget_mb * 1e6
        ao_bytes = 4 * ngrid * nao * 8.0
        ao_cached = ao_bytes <= 0.5 * budget  # AO values first: every evaluation needs them
        plan = cls(
            blocks=[],
            ao_loc=mol.ao_loc_nr(cart=mol.cart),
            abs_overlap=_abs_normalised_overlap(mol).to(numint.device),
            nao=nao,
            ngrid=ngrid,
            budget_bytes=budget,
            budget_why=why,
            ao_cached=ao_cached,
            cached_bytes=ao_bytes if ao_cached else 0.0,
        )
        for start in range(0, ngrid, blksize):
            coords = np.ascontiguousarray(grids.coords[start : start + blksize])
            weights = torch.from_numpy(np.ascontiguousarray(grids.weights[start : start + blksize]))
            ao = numint._eval_ao(mol, coords) if ao_cached else None
            plan.blocks.append(_Block(weights=weights.to(numint.device), ao=ao, coords=coords))
        return plan

    def shell_aos(self, shells: np.ndarray) -> torch.Tensor:
        loc = self.ao_loc
        if len(shells) == 0:
            return torch.zeros(0, dtype=torch.int64)
        idx = np.concatenate([np.arange(loc[i], loc[i + 1]) for i in shells])
        return torch.from_numpy(idx.astype(np.int64))

    def record(self, block: _Block, shells: np.ndarray, nu: torch.Tensor, idx: torch.Tensor) -> None:
        nbytes = nu.numel() * nu.element_size()
        if not self.reported:
            self.nu_bytes_needed += nbytes
            self.kept_pairs += len(block.weights) * len(idx) * (len(idx) + 1) / 2
        if self.cached_bytes + nbytes <= self.budget_bytes:
            block.nu, block.nu_shells, block.nu_idx = nu, shells, idx.to(nu.device)
            self.cached_bytes += nbytes
        elif not self.reported:
            self.uncached_blocks += 1

    def describe(self, numint: DM21NumInt) -> str:
        gb = 1e-9
        kept = self.kept_pairs / max(1.0, self.ngrid * self.nao * (self.nao + 1) / 2)
        n = len(self.blocks)
        if self.uncached_blocks == 0:
            path = 'all cached'
        elif self.uncached_blocks == n:
            path = 'not cached: recomputed at every evaluation'
        else:
            path = f'cached for {n - self.uncached_blocks} of {n} blocks, the rest recomputed at every evaluation'
        screening = f'to {numint.screening:.0e} Ha' if numint.screening > 0 else 'off (dense)'
        return (
            f'DM21 local-HF integrals: {self.ngrid} grid points in {n} blocks, nao {self.nao}; screening '
            f'{screening} keeps {100 * kept:.1f}% of the AO pairs; nu {self.nu_bytes_needed * gb:.2f} GB '
            f'({str(numint.nu_dtype).removeprefix("torch.")}), AO values '
            f'{4 * self.ngrid * self.nao * 8 * gb:.2f} GB ({"cached" if self.ao_cached else "recomputed"}); '
            f'budget {self.budget_bytes * gb:.2f} GB ({self.budget_why}) -> {path}'
        )


def _abs_normalised_overlap(mol) -> torch.Tensor:
    s = mol.intor_symmetric('int1e_ovlp')
    norm = 1.0 / np.sqrt(np.diag(s))
    return torch.from_numpy(np.abs(s * norm[:, None] * norm[None, :]))


def available_memory_mb() -> float:
    """Memory this process may still use (MB): the kernel's MemAvailable, or the cgroup's limit if tighter.

    Under Slurm (and containers) the job's cgroup caps its memory below what the node has free.
    """
    available = float('inf')
    try:
        for line in Path('/proc/meminfo').read_text().splitlines():
            if line.startswith('MemAvailable:'):
                available = float(line.split()[1]) / 1024.0
                break
    except OSError:
        pass
    for limit_file, usage_file in (
        ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current'),
        ('/sys/fs/cgroup/memory/memory.limit_in_bytes', '/sys/fs/cgroup/memory/memory.usage_in_bytes'),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = float(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and float(limit) < 2**60:
            available = min(available, (float(limit) - usage) / 1e6)
    if not np.isfinite(available):  # no /proc (not Linux): what PySCF would assume
        available = float(pyscf_lib.param.MAX_MEMORY)
    return max(0.0, available)


def _numpy_dtype(dtype: torch.dtype):
    return {torch.float64: np.float64, torch.float32: np.float32}[dtype]


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
    nu_x: torch.Tensor  # (n_omega, g, ns, k): (nu E)_b for the AOs b in idx
    idx: torch.Tensor  # (k,) the AOs that enter the local-HF energies


def _ao_products(ao: torch.Tensor, dm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = chi D ``(g, ns, nao)`` and y = grad chi D ``(3, g, ns, nao)``: one matrix product over both spins."""
    ns, nao = dm.shape[0], dm.shape[-1]
    g = ao.shape[1]
    dm_cat = dm.permute(1, 0, 2).reshape(nao, ns * nao)  # [a, (s, b)]
    x = (ao[0] @ dm_cat).view(g, ns, nao)
    y = (ao[1:].reshape(3 * g, nao) @ dm_cat).view(3, g, ns, nao)
    return x, y


def _block_features(
    ao: torch.Tensor,
    nu: torch.Tensor,
    dm: torch.Tensor,
    idx: torch.Tensor | None = None,
    xy: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> _BlockFeatures:
    """What :func:`_features` computes, without autograd, keeping the intermediates the potential reuses.

    ``dm`` is ``(ns, nao, nao)`` (ns = 1: D/2 serving both spin channels).  ``idx`` (k,) lists the AOs b whose
    E_b(r) = (chi D)_b enter the local-HF energies, ``nu`` ``(n_omega, g, k (k + 1) / 2)`` holds the integrals
    over them, packed (:func:`pack`; screening, :class:`DM21NumInt`); None means all AOs.  ``xy`` passes
    :func:`_ao_products` when the caller has formed them already.  The AO contractions run as one matrix
    product over both spins and the per-point products as element-wise reductions, which is what makes this
    path cheaper than autograd.
    """
    x, y = _ao_products(ao, dm) if xy is None else xy
    g, ns, nao = x.shape
    if idx is None:
        idx = torch.arange(nao)
    n_omega, k = nu.shape[0], len(idx)
    if kernels.available() and x.device.type == 'cpu':  # the per-point products in one compiled pass
        rho, grad, tau = (
            torch.empty(g, ns, dtype=x.dtype),
            torch.empty(3, g, ns, dtype=x.dtype),
            torch.empty_like(x[..., 0]),
        )
        nu_x, hfx = torch.empty(n_omega, g, ns, k, dtype=x.dtype), torch.empty(n_omega, g, ns, dtype=x.dtype)
        xs = x[..., idx].contiguous()  # gathered once: the kernel's inner loops then run over contiguous rows
        kernels.point_features(*(t.numpy() for t in (ao, x, y, nu, xs, rho, grad, tau, nu_x, hfx)))
    else:
        dens = (x.unsqueeze(0) * ao.unsqueeze(2)).sum(-1)  # (4, g, ns): rho and half its gradient
        rho, grad = dens[0], 2.0 * dens[1:]
        tau = 0.5 * (y * ao[1:].unsqueeze(2)).sum(-1).sum(0)  # (g, ns)
        xs = x[..., idx].unsqueeze(0)  # (1, g, ns, k)
        nu_x = torch.matmul(xs, _unpack(nu, k).to(x.dtype))  # (n_omega, g, ns, k); nu is symmetric
        hfx = -0.5 * (nu_x * xs).sum(-1)  # (n_omega, g, ns)
    rho, grad, feats, parts = _feature_matrix(rho.t(), grad.permute(2, 0, 1), tau.t(), hfx.permute(2, 0, 1))
    return _BlockFeatures(rho=rho.t(), feats=feats, parts=parts, x=x, grad=grad.permute(1, 2, 0), nu_x=nu_x, idx=idx)


def _unpack(nu: torch.Tensor, k: int) -> torch.Tensor:
    """(..., k (k + 1) / 2) packed lower triangles -> (..., k, k) symmetric matrices."""
    rows, cols = kernels.pack_index(k)
    where = np.empty((k, k), dtype=np.int64)
    where[rows, cols] = where[cols, rows] = np.arange(len(rows))
    return nu[..., torch.from_numpy(where).to(nu.device)]


def pack(nu: torch.Tensor) -> torch.Tensor:
    """(..., k, k) symmetric -> (..., k (k + 1) / 2): the lower triangle row by row, as the kernels read it."""
    rows, cols = kernels.pack_index(nu.shape[-1])
    return nu[..., torch.from_numpy(rows), torch.from_numpy(cols)].contiguous()


def _point_derivatives(
    fb: _BlockFeatures, weights: torch.Tensor, f: torch.Tensor, g_feats: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dE/drho_s (g, ns), dE/dgrad rho_s (3, g, ns), dE/dtau_s (g, ns) and dE/de_hf^omega_s (g, n_omega, ns) of a block.

    E = sum_g w (f . parts): through the network (``g_feats`` = dE/dfeatures, (g, 11)) and through ``parts``
    (rho and the local-HF densities); ``f`` the enhancement factors (g, 3).  For ns = 1 (one density matrix
    serving both spin channels) the two channels' derivatives are added.  Shared by the potential
    (:func:`_block_potential`) and the nuclear gradient (:mod:`.grad`).
    """
    wf = weights[:, None] * f  # (g, 3)
    rho = fb.rho.clamp(min=0.0)
    v_rho = g_feats[:, 0:2] + wf[:, 0:1] * (LDA_X_FACTOR * 4.0 / 3.0) * rho ** (1.0 / 3.0)  # (g, 2)
    grad_total = fb.grad.sum(-1, keepdim=True)  # (3, g, 1)
    v_grad = 2.0 * (g_feats[:, 3:5] * fb.grad + g_feats[:, 2:3] * grad_total)  # (3, g, 2)
    v_tau = g_feats[:, 5:7]  # (g, 2)
    v_hf = torch.stack([g_feats[:, 7:9], g_feats[:, 9:11]], dim=-1) + wf[:, 1:3, None]  # (g, n_omega, 2)
    if fb.x.shape[1] == 1:  # one density matrix serves both channels: their derivatives add
        v_rho, v_grad, v_tau, v_hf = (v.sum(-1, keepdim=True) for v in (v_rho, v_grad, v_tau, v_hf))
    return v_rho, v_grad, v_tau, v_hf


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
    v_rho, v_grad, v_tau, v_hf = _point_derivatives(fb, weights, f, g_feats)
    # dE/dD = chi^T dE/dx + sum_k grad_k chi^T (v_tau/2) grad_k chi: one product with all four AO components
    rhs = torch.empty(4, g, ns, nao, dtype=ao.dtype, device=ao.device)
    if kernels.available() and ao.device.type == 'cpu':
        v_hf = v_hf.permute(1, 0, 2).contiguous()  # (n_omega, g, ns)
        args = (ao, fb.nu_x, fb.idx, v_rho, v_grad, v_tau, v_hf, rhs)
        kernels.point_potential(*(t.contiguous().numpy() for t in args))
    else:
        rhs[0] = v_rho.unsqueeze(-1) * ao[0].unsqueeze(1)  # dE/dx (g, ns, nao)
        rhs[0] += 2.0 * (v_grad.unsqueeze(-1) * ao[1:].unsqueeze(2)).sum(0)
        rhs[0].index_add_(-1, fb.idx, -(v_hf.permute(1, 0, 2).unsqueeze(-1) * fb.nu_x).sum(0))
        rhs[1:] = ao[1:].unsqueeze(2) * (0.5 * v_tau).unsqueeze(-1)
    out = ao.reshape(4 * g, nao).t() @ rhs.view(4 * g, ns * nao)  # (nao, ns * nao)
    return out.view(nao, ns, nao).permute(1, 0, 2)
