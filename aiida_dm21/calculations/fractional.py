"""``dm21.fractional_dataset``: a calcfunction that combines integer reference calculations into a dataset.

Its inputs are the ``output_arrays`` nodes of ``dm21.reference`` calculations (a namespace keyed by
label), so the provenance graph links every fractional system to the exact calculations it came from.
"""

from __future__ import annotations

import tempfile
import typing as t
from pathlib import Path

from aiida import orm
from aiida.engine import calcfunction

from aiida_dm21.data.dataset import DM21DatasetData
from aiida_dm21.reference.constants import ARRAY_NAMES
from aiida_dm21.reference.dataset import save_dataset

if t.TYPE_CHECKING:
    from aiida_dm21.reference.integer import IntegerResult

# The systems are built with PySCF (aiida_dm21.reference.fractional): imported inside the calcfunction, so that
# importing the workflows (on the submitting machine) does not import PySCF.

__all__ = ('build_fractional_dataset', 'integer_result_from_node')


def integer_result_from_node(node: orm.ArrayData) -> IntegerResult:
    """The core :class:`IntegerResult` of a ``dm21.reference`` ``output_arrays`` node."""
    from aiida_dm21.reference.integer import IntegerResult

    arrays = {name: node.get_array(name) for name in ARRAY_NAMES}
    return IntegerResult.from_parts(node.base.attributes.get('spec'), node.base.attributes.get('scalars'), arrays)


@calcfunction
def build_fractional_dataset(parameters: orm.Dict, **integer: orm.ArrayData) -> DM21DatasetData:
    """FC/FS (and optionally integer) training systems from integer calculations.

    ``parameters``: ``fractional_charge`` — list of [lower label, upper label] pairs (N and N+1
    electrons); ``fractional_spin`` — labels of spin-polarised systems; ``integer`` — labels to include
    as integer systems; ``deltas`` (default [0.25, 0.5, 0.75]); ``spin_fractions`` (default [0.25, 0.5]).
    """
    from aiida_dm21.reference.fractional import fractional_charge_systems, fractional_spin_systems, integer_system

    p = parameters.get_dict()
    results = {label: integer_result_from_node(node) for label, node in integer.items()}
    missing = {lab for pair in p.get('fractional_charge', []) for lab in pair} | set(p.get('fractional_spin', []))
    missing |= set(p.get('integer', []))
    missing -= set(results)
    if missing:
        raise ValueError(f'labels {sorted(missing)} are not among the integer calculations {sorted(results)}')
    systems = []
    for label in p.get('integer', []):
        systems.append(integer_system(results[label]))
    for lower, upper in p.get('fractional_charge', []):
        systems.extend(fractional_charge_systems(results[lower], results[upper], p.get('deltas', (0.25, 0.5, 0.75))))
    for label in p.get('fractional_spin', []):
        systems.extend(fractional_spin_systems(results[label], p.get('spin_fractions', (0.25, 0.5))))
    methods = sorted({r.spec.reference_method for r in results.values()})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'dataset.npz'
        save_dataset(path, systems, {'reference_method': ','.join(methods)})
        return DM21DatasetData(file=str(path))
