"""AiiDA calculation plugins of aiida-dm21: ``dm21.scf`` (:class:`~.scf.DM21ScfCalculation`)."""

from .scf import DM21ScfCalculation

__all__ = ('DM21ScfCalculation',)
