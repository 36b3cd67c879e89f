"""PySCF SCF objects that run a DM21-architecture functional: :func:`KS`, :func:`RKS`, :func:`UKS`, :func:`ROKS`.

They are ordinary PySCF ``RKS``/``UKS``/``ROKS`` objects (``kernel()``, ``e_tot``, ``converged``,
``make_rdm1()``, ``analyze()``...) whose ``get_veff`` builds J with PySCF and the whole XC part
(semi-local and local-HF) with :class:`~aiida_dm21.functional.numint.DM21NumInt`.  Exact exchange (K)
is never built: DM21 contains its HF-like terms itself.

Defaults follow DeepMind's recommendations for DM21 and are attributes you can change:

==================  ==========  ==========================================================
attribute           default     why
==================  ==========  ==========================================================
``init_guess``      ``'b3lyp'`` start from a converged B3LYP (VWN5) density on the same grid;
                                ``'b3lyp_broken_symmetry'`` (UKS): from its spin-symmetry-broken
                                state where there is a lower one (:func:`b3lyp_broken_symmetry_guess`)
``conv_tol``        1e-6        energy change (Ha); the network is float32, 1e-7 is the floor
``conv_tol_grad``   1e-3        orbital gradient; tighter is rarely reachable in float32
``small_rho_cutoff``1e-7        PySCF's default: drop the points that hold < 1e-7 electrons in all
                                (17 % of C4H6/6-31G*'s grid; E_DM21 moves by 2e-8 Ha)
``grids.level``     3           PySCF's default
``grids.radi_method``           Treutler-Ahlrichs with xi = 1 (PySCF <= 2.6 grids, DeepMind's)
``open_shell_direction`` None   open-shell atoms (UKS/ROKS) only: ``'lowest'`` starts from the lowest
                                B3LYP state over the orientations of the open shell, a 3-vector
                                from the open shell along that direction; None: wherever PySCF's
                                B3LYP lands (path-dependent: see :mod:`.atoms`)
==================  ==========  ==========================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np
from pyscf import dft, lib
from pyscf.dft import radi
from pyscf.dft import roks as pyscf_roks
from pyscf.dft import uks as pyscf_uks
from pyscf.lib import logger

from . import dispersion, molecule
from .checkpoint import CheckpointError, check_finite, load_network
from .model import DM21Network
from .numint import DM21NumInt, UnsupportedSystemError, check_supported_molecule

__all__ = ['KS', 'RKS', 'ROKS', 'UKS', 'b3lyp_guess', 'b3lyp_solver']

FunctionalSpec = str | Path | DM21Network


def treutler_ahlrichs_original(n, *args, **kwargs):
    """Treutler-Ahlrichs radial grid with xi = 1 for every element, as in PySCF <= 2.6.

    PySCF 2.7 switched to element-specific xi (``radi.ATOM_SPECIFIC_TREUTLER_GRIDS``), which changes
    the grids (and, through pruning, the point counts) of every ``level``.  DeepMind's reference
    energies were made with the original grids; this keeps them on every PySCF version.
    """
    flag = getattr(radi, 'ATOM_SPECIFIC_TREUTLER_GRIDS', None)
    if flag is None:
        return radi.treutler_ahlrichs(n, *args, **kwargs)
    radi.ATOM_SPECIFIC_TREUTLER_GRIDS = False
    try:
        return radi.treutler_ahlrichs(n, *args, **kwargs)
    finally:
        radi.ATOM_SPECIFIC_TREUTLER_GRIDS = flag


def b3lyp_solver(mf, mol=None):
    """An unconverged B3LYP (VWN5 flavour, as DeepMind's code used) SCF of ``mf``'s kind and grid settings.

    ``mol`` (default ``mf.mol``) may differ from ``mf.mol`` in its symmetry setting: PySCF < 2.5 picks the
    symmetry-adapted class when the SCF object is made, so the molecule is passed here, not set later.
    """
    mol = mf.mol if mol is None else mol
    if isinstance(mf, pyscf_roks.ROKS):
        guess = dft.ROKS(mol)
    elif isinstance(mf, pyscf_uks.UKS):
        guess = dft.UKS(mol)
    else:
        guess = dft.RKS(mol)
    guess.xc = 'b3lyp5'
    guess.grids.level = mf.grids.level
    guess.grids.atom_grid = mf.grids.atom_grid
    guess.grids.prune = mf.grids.prune
    guess.grids.radi_method = mf.grids.radi_method
    guess.small_rho_cutoff = mf.small_rho_cutoff
    guess.max_memory = mf.max_memory
    guess.verbose = min(mf.verbose, logger.NOTE) - 1 if mf.verbose > 0 else 0
    return guess


def b3lyp_guess(mf) -> np.ndarray:
    """Converged B3LYP (VWN5 flavour, as DeepMind's code used) density matrix on ``mf``'s grid settings."""
    guess = b3lyp_solver(mf)
    guess.kernel()
    logger.info(mf, 'B3LYP initial guess: E = %.10f (converged=%s)', guess.e_tot, guess.converged)
    return guess.make_rdm1()


#: The most rounds of PySCF's stability analysis (follow the lowest instability, re-converge) in
#: :func:`b3lyp_broken_symmetry_guess`; stretched F2 (2.5 Å, 6-31G) needs one (E -0.086 Ha, <S^2> 0 -> 0.97), the
#: next rounds move it by 6e-4 and 1e-6 Ha.
BROKEN_SYMMETRY_ROUNDS = 3
#: Ha: a stability round that lowers the B3LYP energy by less than this ends the search.
BROKEN_SYMMETRY_TOLERANCE = 1e-5


def b3lyp_broken_symmetry_guess(mf) -> np.ndarray:
    """Converged unrestricted B3LYP density that breaks the spin symmetry where that lowers the energy.

    The B3LYP UKS from PySCF's guess keeps the alpha and beta densities equal when they start equal (a singlet's
    guess), even where a stretched bond wants them apart: a saddle point.  PySCF's internal stability analysis
    (``mf.stability()``, the UKS orbital Hessian) finds the direction down from it; B3LYP is converged again from
    there, at most :data:`BROKEN_SYMMETRY_ROUNDS` times, until it is stable or gains less than
    :data:`BROKEN_SYMMETRY_TOLERANCE`; the lowest-energy state of the rounds is the guess.  A state that is
    stable at once is returned as it is (a closed-shell molecule near equilibrium: the ordinary B3LYP guess).  Only
    for UKS (``ValueError`` otherwise): RKS and ROKS have one set of spatial orbitals.  ``mf.guess_info`` records
    the rounds' energies, the guess's energy (``b3lyp_e_guess``) and its ⟨S²⟩.
    """
    if not isinstance(mf, pyscf_uks.UKS):  # PySCF's ROKS is not a UKS
        raise ValueError(
            'init_guess b3lyp_broken_symmetry needs an unrestricted SCF (UKS): a restricted one has one set of '
            'spatial orbitals for both spins'
        )
    guess = b3lyp_solver(mf)
    guess.kernel()

    def state():  # energy, density, converged, <S^2> of the guess's current state
        return float(guess.e_tot), guess.make_rdm1(), bool(guess.converged), float(guess.spin_square()[0])

    best = state()
    energies = [best[0]]
    stable = False
    for _ in range(BROKEN_SYMMETRY_ROUNDS):
        mo, _, stable, _ = guess.stability(return_status=True)
        if stable:
            break
        guess.kernel(dm0=guess.make_rdm1(mo, guess.mo_occ))
        energies.append(float(guess.e_tot))
        if energies[-1] < best[0]:
            best = state()
        # A round that gains little (or loses: a flat surface near an instability re-converges within PySCF's
        # tolerances, up or down by 1e-7 Ha, and the path depends on the thread count) ends the search.
        if energies[-2] - energies[-1] < BROKEN_SYMMETRY_TOLERANCE:
            break
    e_guess, dm, converged, s2 = best
    mf.guess_info = {
        'init_guess': 'b3lyp_broken_symmetry',
        'b3lyp_e_tot': energies,
        'b3lyp_e_guess': e_guess,
        'b3lyp_converged': converged,
        'b3lyp_stable': bool(stable),
        'b3lyp_s2': s2,
    }
    logger.info(
        mf,
        'B3LYP broken-symmetry guess: E = %s; the lowest (%.10f, <S^2> = %.4f) is the guess; stable=%s',
        ', '.join(f'{e:.10f}' for e in energies),
        e_guess,
        s2,
        stable,
    )
    return dm


class _DM21Mixin:
    """What the DM21 SCF classes add to PySCF's KS classes."""

    _keys: ClassVar[set[str]] = {
        'functional',
        'network',
        'checkpoint_metadata',
        'open_shell_direction',
        'disp',
        'guess_info',
    }

    def _setup_dm21(self, functional: FunctionalSpec, network_dtype, disp: str | None = None, **numint_options) -> None:
        check_supported_molecule(self.mol)
        disp = dispersion.check_disp(disp)
        if isinstance(functional, DM21Network):
            network, metadata = functional, {'name': 'in-memory network'}
            check_finite(dict(network.state_dict()), 'the network')
        elif isinstance(functional, (str, Path)):
            network, metadata = load_network(functional)
        else:
            raise CheckpointError(
                f'functional must be a name (DM21, DM21m, DM21mc, DM21mu), a checkpoint path or a DM21Network, '
                f'got {functional!r} ({type(functional).__name__})'
            )
        self.functional = metadata.get('name', str(functional))
        self.checkpoint_metadata = metadata
        self.network = network
        self.guess_info = None  # what a guess that is more than one SCF did (b3lyp_broken_symmetry_guess)
        self._numint = DM21NumInt(network, network_dtype=network_dtype, **numint_options)
        self.xc = self.functional  # for display only: get_veff below never hands xc to libxc
        self.init_guess = 'b3lyp'
        self.open_shell_direction = None
        self.conv_tol = 1e-6
        self.conv_tol_grad = 1e-3
        self.small_rho_cutoff = 1e-7  # PySCF's default; DeepMind's records set their own (1e-20)
        self.grids.radi_method = treutler_ahlrichs_original
        self.disp = disp

    # Dispersion (``disp``: :data:`.dispersion.VERSIONS`, B3LYP's parameters) is added here, not by PySCF: its
    # own machinery (PySCF >= 2.5) would look the parameters up under the name in ``xc`` ('DM21'), which the
    # dispersion libraries do not know, and PySCF 2.3/2.4 have none.
    def energy_tot(self, dm=None, h1e=None, vhf=None):
        e_tot = super().energy_tot(dm, h1e, vhf)
        if dispersion.check_disp(self.disp) is None:
            return e_tot
        e_disp = self.get_dispersion()
        self.scf_summary['dispersion'] = e_disp
        return e_tot + e_disp

    def get_dispersion(self, disp=None, with_3body=None, verbose=None) -> float:
        """E_disp (Ha) of ``disp`` (default :attr:`disp`) at the current geometry; 0 without dispersion."""
        version = dispersion.check_disp(self.disp if disp is None else disp)
        if version is None:
            return 0.0
        key = (version, self.mol.atom_coords().tobytes(), self.mol.atom_charges().tobytes())
        cached = getattr(self, '_disp_cache', None)
        if cached is None or cached[0] != key:
            cached = (key, dispersion.dispersion(self.mol, version)[0])
            self._disp_cache = cached
        return cached[1]

    # PySCF asks libxc about ``xc`` in these; DM21 is neither non-local nor a libxc hybrid.
    def do_nlc(self):
        return False

    def do_disp(self):
        return False

    def dump_flags(self, verbose=None):
        from pyscf.scf import hf

        hf.SCF.dump_flags(self, verbose)
        log = logger.new_logger(self, verbose)
        log.info('DM21 functional = %s (%s)', self.functional, self.checkpoint_metadata.get('source', '?'))
        log.info('small_rho_cutoff = %g', self.small_rho_cutoff)
        if dispersion.check_disp(self.disp):
            log.info('dispersion = %s (%s parameters)', self.disp, dispersion.PARAMETER_SET)
        self.grids.dump_flags(verbose)
        return self

    def get_init_guess(self, mol=None, key='minao', **kwargs):
        if isinstance(key, str) and key.lower() == 'b3lyp':
            from . import atoms  # atoms builds on this module's B3LYP solver

            if self.open_shell_direction is None or not atoms.is_open_shell_atom(self.mol):
                return b3lyp_guess(self)
            try:
                direction = atoms.parse_direction(self.open_shell_direction)
            except ValueError as exc:
                raise ValueError(f'open_shell_direction: {exc}') from exc
            if direction == 'lowest':
                return atoms.lowest_guess(self).dm
            return atoms.oriented_guess(self, direction)[0]
        if isinstance(key, str) and key.lower() == 'b3lyp_broken_symmetry':
            return b3lyp_broken_symmetry_guess(self)
        return super().get_init_guess(mol, key, **kwargs)

    def _dm21_veff(self, mol, dm, hermi: int, unrestricted: bool):
        """J (PySCF) + the DM21 XC potential, tagged as PySCF's KS code expects (ecoul, exc, vj, vk=None)."""
        mol = mol or self.mol
        dm = np.asarray(self.make_rdm1() if dm is None else dm)
        if unrestricted and dm.ndim == 2:
            dm = np.stack([dm * 0.5, dm * 0.5])
        self._grids_ready(mol, dm)
        max_memory = None  # PySCF's fixed default (4,000 MB) says nothing about this machine: let DM21NumInt decide
        if self.max_memory != lib.param.MAX_MEMORY or 'PYSCF_MAX_MEMORY' in os.environ:
            max_memory = self.max_memory - lib.current_memory()[0]
        evaluate = self._numint.nr_uks if unrestricted else self._numint.nr_rks
        n, exc, vxc = evaluate(mol, self.grids, self.xc, dm, max_memory=max_memory)
        logger.debug(self, 'nelec by numeric integration = %s', n)
        dm_total = dm[0] + dm[1] if unrestricted else dm
        vj = self.get_j(mol, dm_total, hermi)
        ecoul = np.einsum('ij,ji', dm_total, vj).real * 0.5
        return lib.tag_array(vxc + vj, ecoul=ecoul, exc=exc, vj=vj, vk=None)

    def _grids_ready(self, mol, dm):
        # PySCF's initialize_grids asks libxc about ``xc``; build the grid ourselves instead.
        if self.grids.coords is None:
            self._check_training_grid()
            self.grids.build(with_non0tab=True)
            if self.small_rho_cutoff > 1e-20:
                dm_total = dm[0] + dm[1] if np.ndim(dm) == 3 else dm
                self.grids = dft.rks.prune_small_rho_grids_(self, mol, dm_total, self.grids)

    def _check_training_grid(self) -> None:
        """Warn when this SCF's grid is not the one the checkpoint was trained on (its ``training.grid`` metadata).

        A network fitted on one grid makes errors of the size of the fit on another (LiH/6-31G, DM21m: E_xc differs
        by 1.8 mHa between levels 1 and 3).
        """
        training = self.checkpoint_metadata.get('training')
        grid = training.get('grid') if isinstance(training, dict) else None
        if not isinstance(grid, dict) or 'level' not in grid:
            return
        radi = getattr(self.grids.radi_method, '__name__', str(self.grids.radi_method))
        differences = []
        if grid['level'] != self.grids.level:
            differences.append(f'level {self.grids.level} (trained on level {grid["level"]})')
        if grid.get('radi_method') not in (None, radi):
            differences.append(f'radial method {radi} (trained on {grid["radi_method"]})')
        if differences:
            logger.warn(
                self,
                'DM21 functional %s was trained on another grid than this SCF uses: %s; the energies carry the '
                'difference (set mf.grids.level to match the training)',
                self.functional,
                ', '.join(differences),
            )

    #: The XC part of the orbital response (``mf.newton()``, CPHF): ``'exact'`` is the DM21 kernel by autograd
    #: (:mod:`.response`, a true Newton method), ``'coulomb'`` leaves it out (cheaper, an approximate Hessian).
    xc_response: str = 'exact'

    def gen_response(self, mo_coeff=None, mo_occ=None, singlet=None, hermi=0, max_memory=None, with_nlc=True):
        """The orbital response for ``mf.newton()``: J of the trial density plus the exact DM21 XC kernel.

        The kernel (second derivative of E_xc contracted with the trial density matrix) comes from autograd
        Hessian-vector products through the network and the local-HF features (:mod:`.response`);
        ``xc_response = 'coulomb'`` leaves it out (the Newton iterations then converge to the same point, the
        orbital gradient being exact, only more slowly).  Excited-state (TDDFT) kernels are not implemented.
        """
        if singlet is not None:
            raise NotImplementedError('TDDFT response kernels are not implemented for DM21 functionals')
        if self.xc_response not in ('exact', 'coulomb'):
            raise ValueError(f"xc_response must be 'exact' or 'coulomb', got {self.xc_response!r}")
        from .response import xc_kernel_product

        mol = self.mol
        unrestricted = not isinstance(self, dft.rks.RKS) or isinstance(self, pyscf_roks.ROKS)
        mo_coeff = self.mo_coeff if mo_coeff is None else mo_coeff
        mo_occ = self.mo_occ if mo_occ is None else mo_occ
        dm0 = np.asarray(self.make_rdm1(mo_coeff, mo_occ))
        if unrestricted and dm0.ndim == 2:
            dm0 = np.stack([dm0 * 0.5, dm0 * 0.5])
        self._grids_ready(mol, dm0)
        exact = self.xc_response == 'exact'

        def vind(dm1):
            dm1 = np.asarray(dm1)
            if unrestricted:
                vj = self.get_j(mol, dm1[..., 0, :, :] + dm1[..., 1, :, :], hermi=hermi)
                v1 = np.stack([vj, vj], axis=-3)
            else:
                v1 = self.get_j(mol, dm1, hermi=hermi)
            if exact:
                v1 = v1 + xc_kernel_product(self._numint, mol, self.grids, dm0, dm1, restricted=not unrestricted)
            return v1

        return vind

    def nuc_grad_method(self):
        """Analytic nuclear gradients (RKS, UKS): a PySCF gradients object, see :mod:`.grad`; ROKS is refused."""
        from .grad import gradients

        return gradients(self)

    Gradients = nuc_grad_method

    def reset(self, mol=None):
        """PySCF's reset (scanners call it for each new geometry), and the integral cache with it."""
        self._numint.reset_cache()
        return super().reset(mol)

    def stability(self, *args, **kwargs):
        raise NotImplementedError('stability analysis needs second functional derivatives, not implemented for DM21')

    def to_gpu(self):
        raise NotImplementedError("DM21 runs on a GPU through PyTorch: aiida_dm21.KS(mol, functional, device='cuda')")


class DM21RKS(_DM21Mixin, dft.rks.RKS):
    """Restricted Kohn-Sham with a DM21 functional."""

    def __init__(self, mol, functional: FunctionalSpec = 'DM21', network_dtype=None, **numint_options):
        dft.rks.RKS.__init__(self, mol)
        self._setup_dm21(functional, network_dtype or _default_dtype(), **numint_options)

    def get_veff(self, mol=None, dm=None, dm_last=0, vhf_last=0, hermi=1):
        return self._dm21_veff(mol, dm, hermi, unrestricted=False)


class _UnrestrictedVeff:
    def get_veff(self, mol=None, dm=None, dm_last=0, vhf_last=0, hermi=1):
        return self._dm21_veff(mol, dm, hermi, unrestricted=True)


class DM21UKS(_DM21Mixin, _UnrestrictedVeff, dft.uks.UKS):
    """Unrestricted Kohn-Sham with a DM21 functional."""

    def __init__(self, mol, functional: FunctionalSpec = 'DM21', network_dtype=None, **numint_options):
        dft.uks.UKS.__init__(self, mol)
        self._setup_dm21(functional, network_dtype or _default_dtype(), **numint_options)


class DM21ROKS(_DM21Mixin, _UnrestrictedVeff, pyscf_roks.ROKS):
    """Restricted open-shell Kohn-Sham with a DM21 functional."""

    def __init__(self, mol, functional: FunctionalSpec = 'DM21', network_dtype=None, **numint_options):
        pyscf_roks.ROKS.__init__(self, mol)
        self._setup_dm21(functional, network_dtype or _default_dtype(), **numint_options)


def _default_dtype():
    import torch

    return torch.float32


def _check_mol(mol) -> None:
    if not getattr(mol, '_built', True) or mol._atm is None or len(mol._atm) == 0:
        raise ValueError('the molecule is not built: call mol.build() first')
    check_supported_molecule(mol)
    ecp = molecule.missing_ecp(mol)
    if ecp:
        raise UnsupportedSystemError(
            f'the basis of {", ".join(sorted(ecp))} ({", ".join(sorted(set(ecp.values())))}) is made for an effective '
            'core potential, but the molecule was built without it (ecp=): all electrons would run in a valence '
            'basis; DM21 needs an all-electron basis set (e.g. cc-pVDZ, or x2c-SVPall / ANO for heavy elements)'
        )
    symbols = [mol.atom_pure_symbol(i) for i in range(mol.natm)]
    problem = molecule.check_geometry(symbols, mol.atom_coords(unit='Angstrom')) or molecule.check_occupations(
        mol.nelec, mol.nao_nr(), str(mol.basis)
    )
    if problem:
        raise UnsupportedSystemError(problem)


def RKS(mol, functional: FunctionalSpec = 'DM21', **kwargs) -> DM21RKS:  # noqa: N802 (PySCF naming)
    """Restricted KS with a DM21 functional: a name (DM21, DM21m, DM21mc, DM21mu), a checkpoint path or a network."""
    _check_mol(mol)
    if mol.spin != 0:
        raise ValueError(f'RKS needs a closed-shell molecule, got spin (2S) = {mol.spin}: use UKS or ROKS')
    return DM21RKS(mol, functional, **kwargs)


def UKS(mol, functional: FunctionalSpec = 'DM21', **kwargs) -> DM21UKS:  # noqa: N802
    """Unrestricted KS with a DM21 functional."""
    _check_mol(mol)
    return DM21UKS(mol, functional, **kwargs)


def ROKS(mol, functional: FunctionalSpec = 'DM21', **kwargs) -> DM21ROKS:  # noqa: N802
    """Restricted open-shell KS with a DM21 functional."""
    _check_mol(mol)
    return DM21ROKS(mol, functional, **kwargs)


def KS(mol, functional: FunctionalSpec = 'DM21', **kwargs):  # noqa: N802
    """RKS for a closed-shell molecule (``mol.spin == 0``), UKS otherwise — like ``pyscf.dft.KS``."""
    return RKS(mol, functional, **kwargs) if mol.spin == 0 else UKS(mol, functional, **kwargs)
