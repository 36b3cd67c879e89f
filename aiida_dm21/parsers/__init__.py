"""AiiDA parsers of aiida-dm21: ``dm21.scf`` (:class:`~.scf.DM21ScfParser`)."""

from .scf import DM21ScfParser

__all__ = ('DM21ScfParser',)
