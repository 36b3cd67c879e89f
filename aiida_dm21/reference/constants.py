"""Names shared by the reference calculations and the AiiDA plugins, without PySCF (standard library only).

:mod:`aiida_dm21.reference.integer` (which runs PySCF) re-exports them; the plugin layer imports them from here so
that validating inputs on the submitting machine does not import PySCF.
"""

from __future__ import annotations

import math
import typing as t

__all__ = [
    'ARRAY_NAMES',
    'DENSITY_METHODS',
    'FCI_MAX_ELECTRONS',
    'FRACTION_BOUNDS',
    'REFERENCE_METHODS',
    'ReferenceInputError',
    'density_method_problem',
    'fractions_problem',
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


#: (low, high, whether high is excluded) of the ``deltas`` (FC) and ``spin_fractions`` (FS) of a reference set
FRACTION_BOUNDS = {'deltas': (0.0, 1.0, True), 'spin_fractions': (0.0, 0.5, False)}


def fractions_problem(name: str, value: t.Any) -> str | None:
    """Why ``value`` cannot be ``name`` (``deltas`` or ``spin_fractions``, as inputs of ``dm21.reference_data`` or
    options of the benchmark scripts), or ``None``: a non-empty list of finite numbers within
    :data:`FRACTION_BOUNDS`."""
    low, high, high_open = FRACTION_BOUNDS[name]
    interval = f'({low}, {high}{")" if high_open else "]"}'
    if not isinstance(value, list) or not value:
        return f'`{name}` must be a non-empty list of numbers in {interval}, got {value!r}'
    for x in value:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            return f'`{name}` must hold finite numbers in {interval}, got {x!r}'
        if not (low < x < high or (x == high and not high_open)):
            return f'`{name}`: {x!r} is outside {interval}'
    return None
