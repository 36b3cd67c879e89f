"""AiiDA data types of aiida-dm21: ``dm21.checkpoint`` (:class:`~.checkpoint.DM21CheckpointData`)."""

from .checkpoint import DM21CheckpointData, DM21CheckpointError

__all__ = ('DM21CheckpointData', 'DM21CheckpointError')
