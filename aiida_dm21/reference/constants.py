"""Names shared by the reference calculations and the AiiDA plugins, without PySCF (standard library only).

:mod:`aiida_dm21.reference.integer` (which runs PySCF) re-exports them; the plugin layer imports them from here so
that validating inputs on the submitting machine does not import PySCF.
"""

from __future__ import annotations

__all__ = [
    'ARRAY_NAMES',
    'DENSITY_METHODS',
    'FCI_MAX_ELECTRONS',
    'REFERENCE_METHODS',
    'ReferenceInputError',
    'density_method_problem',
]

REFERENCE_METHODS = ('fci', 'ccsd(t)', 'ccsd', 'hf', 'user')
FCI_MAX_ELECTRONS = 4
#: What the density of a reference calculation may come from (case-insensitive): Hartree-Fock (``hf``) or one of
#: these exchange-correlation functionals, as PySCF's libxc interface names them (UKS).  A name PySCF does not
#: know would fail only on the compute node, so the plugins refuse anything else when a calculation is launched.
DENSITY_METHODS = (
    'hf',
    'lda',
    'svwn',
    'blyp',
    'bp86',
    'pbe',
    'tpss',
    'scan',
    'r2scan',
    'b3lyp',
    'b3lyp5',
    'pbe0',
    'tpssh',
    'm06',
    'm06-2x',
    'wb97x',
    'cam-b3lyp',
)
#: The arrays of an :class:`IntegerResult` (files, AiiDA ArrayData): density, orbitals, occupations, energies, Fock.
ARRAY_NAMES = ('dm', 'mo_coeff', 'mo_occ', 'mo_energy', 'fock')


class ReferenceInputError(ValueError):
    """Bad input for a reference calculation (unknown element, impossible charge/spin, bad method...)."""


def density_method_problem(value: object) -> str | None:
    """Why ``value`` is not an accepted ``density_method`` (:data:`DENSITY_METHODS`, any case), or ``None``."""
    if not isinstance(value, str) or value.strip().lower() not in DENSITY_METHODS:
        return f'`density_method` {value!r} is not one of: {", ".join(DENSITY_METHODS)} (case-insensitive)'
    return None
