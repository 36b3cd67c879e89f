"""Names shared by the reference calculations and the AiiDA plugins, without PySCF (standard library only).

:mod:`aiida_dm21.reference.integer` (which runs PySCF) re-exports them; the plugin layer imports them from here so
that validating inputs on the submitting machine does not import PySCF.
"""

from __future__ import annotations

__all__ = ['ARRAY_NAMES', 'FCI_MAX_ELECTRONS', 'REFERENCE_METHODS', 'ReferenceInputError']

REFERENCE_METHODS = ('fci', 'ccsd(t)', 'ccsd', 'hf', 'user')
FCI_MAX_ELECTRONS = 4
#: The arrays of an :class:`IntegerResult` (files, AiiDA ArrayData): density, orbitals, occupations, energies, Fock.
ARRAY_NAMES = ('dm', 'mo_coeff', 'mo_occ', 'mo_energy', 'fock')


class ReferenceInputError(ValueError):
    """Bad input for a reference calculation (unknown element, impossible charge/spin, bad method...)."""
