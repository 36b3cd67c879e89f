"""Exact conditions of the fractional systems as reference-free residuals (no PyTorch, no AiiDA).

A fractional-charge system (N+δ electrons, the ensemble of the N and N+1 densities) must have the energy
(1−δ) E(N) + δ E(N+1); a fractional-spin ensemble the energy of its pure state.  With the model's total energy
E = E_non-xc + E_xc^model at each system's fixed density, the residual of the condition is

    FC:  r = E(N+δ) − (1−δ) E(N) − δ E(N+1),          FS:  r = E(ensemble) − E(pure state),

and r = 0 for the exact functional.  No reference energy enters r: it is the model's deviation from linearity
(FC) or from spin constancy (FS) at these densities, whatever the reference method or basis, so it can be fitted
(``constraint_weight``) without also fitting a basis set's missing correlation.  The training works with the
errors err = E_xc^model − E_xc^target, E_xc^target = E_ref − E_non-xc; in those

    r = err_i − Σ_j c_j err_j + (E_ref,i − Σ_j c_j E_ref,j),

where the last term (the :attr:`Condition.offset`) is 0 when the fractional system's reference was built from
these sources, and cancels the reference energies when it was not.  A condition needs the integer systems the
fractional one was built from (its ``sources``) among the prepared systems (any split: there they only provide
endpoint energies).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from ..reference.system import TrainingSystem

__all__ = ['Condition', 'constraint_table']


@dataclasses.dataclass(frozen=True)
class Condition:
    """r_i = err_i − Σ_j c_j err_j + offset, over the systems j (indices) of :attr:`terms` ``((j, c_j), ...)``."""

    terms: tuple[tuple[int, float], ...]
    offset: float  # E_ref,i − Σ_j c_j E_ref,j (Ha)

    def residual(self, error_i, error_of: Callable[[int], float]):
        """r from the error of system i (a float or a tensor) and ``error_of(j)`` of the sources."""
        return error_i - sum(c * error_of(j) for j, c in self.terms) + self.offset


def constraint_table(systems: Sequence[TrainingSystem]) -> tuple[dict[int, Condition], list[str]]:
    """The :class:`Condition` of every fractional system i of ``systems`` whose sources are there, ``{i: ...}``;
    and the labels of the fractional systems left out (a source missing or ambiguous).

    A source is the integer system of that label (``kind == 'integer'``); a label that several integer systems
    share with different densities' targets is ambiguous.
    """
    by_label: dict[str, list[int]] = {}
    for j, system in enumerate(systems):
        if system.kind == 'integer':
            by_label.setdefault(system.label, []).append(j)
    table: dict[int, Condition] = {}
    left_out = []
    for i, system in enumerate(systems):
        if system.kind not in ('fc', 'fs'):
            continue
        indices = []
        for label in system.sources:
            found = by_label.get(label, [])
            distinct = {(round(systems[j].e_xc_target, 10), round(systems[j].e_ref, 10)) for j in found}
            indices.append(found[0] if len(distinct) == 1 else None)
        if None in indices or len(indices) != (2 if system.kind == 'fc' else 1):
            left_out.append(system.label)
            continue
        if system.kind == 'fc':  # sources: the N and the N+1 system; delta: the share of N+1
            terms = ((indices[0], 1.0 - system.delta), (indices[1], system.delta))
        else:
            terms = ((indices[0], 1.0),)
        offset = system.e_ref - sum(c * systems[j].e_ref for j, c in terms)
        table[i] = Condition(terms=terms, offset=float(offset))
    return table, left_out
