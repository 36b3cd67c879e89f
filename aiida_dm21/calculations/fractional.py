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
from aiida_dm21.data.objects import read_arrays
from aiida_dm21.reference.constants import ARRAY_NAMES
from aiida_dm21.reference.dataset import save_dataset

if t.TYPE_CHECKING:
    from aiida_dm21.reference.integer import IntegerResult

# The systems are built with PySCF (aiida_dm21.reference.fractional): imported inside the calcfunction, so that
# importing the workflows (on the submitting machine) does not import PySCF.

__all__ = ('build_fractional_dataset', 'integer_result_from_node', 'integer_results_from_nodes')


def integer_result_from_node(node: orm.ArrayData) -> IntegerResult:
    """The core :class:`IntegerResult` of a ``dm21.reference`` ``output_arrays`` node."""
    return integer_results_from_nodes({'': node})['']


def integer_results_from_nodes(nodes: t.Mapping[str, orm.ArrayData]) -> dict[str, IntegerResult]:
    """:func:`integer_result_from_node` of every node, their arrays read in one pass of the object store."""
    from aiida_dm21.reference.integer import IntegerResult

    labels = list(nodes)
    arrays = read_arrays([nodes[label] for label in labels], ARRAY_NAMES)
    return {
        label: IntegerResult.from_parts(
            nodes[label].base.attributes.get('spec'), nodes[label].base.attributes.get('scalars'), values
        )
        for label, values in zip(labels, arrays, strict=True)
    }


@calcfunction
def build_fractional_dataset(parameters: orm.Dict, **integer: orm.ArrayData) -> DM21DatasetData:
    """FC/FS (and optionally integer) training systems from integer calculations.

    ``parameters``: ``fractional_charge`` — list of [lower label, upper label] pairs (N and N+1
    electrons); ``fractional_spin`` — labels of spin-polarised systems; ``integer`` — labels to include
    as integer systems; ``deltas`` (default [0.25, 0.5, 0.75]); ``spin_fractions`` (default [0.25, 0.5]).
    """
    from aiida_dm21.reference.fractional import fractional_charge_systems, fractional_spin_systems, integer_system

    p = parameters.get_dict()
    results = integer_results_from_nodes(integer)
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
