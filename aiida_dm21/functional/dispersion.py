"""Empirical dispersion for DM21 the PySCF way: D3 (and D4) through ``pyscf-dispersion``, with B3LYP's parameters.

DM21 has no dispersion parameters of its own; DeepMind's paper (and the DM21 users' practice) add D3(BJ)
with the parameters fitted for B3LYP, the functional DM21 starts from.  This module turns a short name
(:data:`VERSIONS`) into the library call, and nothing else: the energies and gradients are the library's
(simple-dftd3 / dftd4 through ``pyscf.dispersion``), checked against simple-dftd3's own Python API in
``tests/test_dispersion.py``.

    mf = aiida_dm21.KS(mol, 'DM21', disp='d3bj')    # or mf.disp = 'd3bj' before kernel()
    mf.kernel()                                     # e_tot includes E_disp; mf.scf_summary['dispersion']
"""

from __future__ import annotations

import numpy as np

__all__ = ['PARAMETER_SET', 'VERSIONS', 'DispersionUnavailableError', 'check_disp', 'dispersion']

#: The accepted dispersion corrections: D3 with Becke-Johnson (``d3bj``) or zero damping (``d3zero``), their
#: modified forms (``d3bjm``, ``d3zerom``), optimised power (``d3op``) and D4 (``d4``, with its three-body term).
VERSIONS: tuple[str, ...] = ('d3bj', 'd3zero', 'd3bjm', 'd3zerom', 'd3op', 'd4')

#: The functional whose damping parameters are used (DM21's convention).
PARAMETER_SET = 'b3lyp'


class DispersionUnavailableError(RuntimeError):
    """The dispersion library (``pyscf-dispersion``) cannot be imported here."""


def check_disp(disp: object) -> str | None:
    """The normalised dispersion name (lower case), or None for none (None, False, '' or 'none').

    :raises ValueError: anything else that is not one of :data:`VERSIONS` (the message lists them).
    """
    if disp is None or disp is False or (isinstance(disp, str) and disp.strip().lower() in ('', 'none')):
        return None
    if not isinstance(disp, str) or disp.strip().lower() not in VERSIONS:
        raise ValueError(
            f'unknown dispersion correction {disp!r}: use one of {", ".join(VERSIONS)} '
            f"(with {PARAMETER_SET.upper()}'s parameters, DM21's convention) or None"
        )
    return disp.strip().lower()


def dispersion(mol, disp: str, gradient: bool = False) -> tuple[float, np.ndarray | None]:
    """E_disp (Ha) of ``mol`` and, with ``gradient``, dE_disp/dR (natm, 3) in Ha/bohr.

    :raises ValueError: ``disp`` is not one of :data:`VERSIONS`.
    :raises DispersionUnavailableError: ``pyscf-dispersion`` is not installed.
    """
    version = check_disp(disp)
    if version is None:
        raise ValueError('no dispersion correction was asked for (disp is None)')
    try:
        if version == 'd4':
            from pyscf.dispersion.dftd4 import DFTD4Dispersion as Model
        else:
            from pyscf.dispersion.dftd3 import DFTD3Dispersion as Model
    except ImportError as exc:  # pragma: no cover - pyscf-dispersion is a dependency
        raise DispersionUnavailableError(
            f'dispersion {version!r} needs the pyscf-dispersion package (`pip install pyscf-dispersion`): {exc}'
        ) from exc
    if version == 'd4':
        model = Model(mol, xc=PARAMETER_SET, atm=True)
    else:
        model = Model(mol, xc=PARAMETER_SET, version=version, atm=False)
    result = model.get_dispersion(grad=gradient)
    energy = float(result['energy'])
    grad = np.asarray(result['gradient'], dtype=np.float64).reshape(mol.natm, 3) if gradient else None
    if not np.isfinite(energy) or (grad is not None and not np.isfinite(grad).all()):
        raise FloatingPointError(f'the {version} dispersion of this molecule is not finite (E = {energy})')
    return energy, grad
