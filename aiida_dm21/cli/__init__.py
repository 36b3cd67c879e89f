"""The ``aiida-dm21`` command line."""

from .main import main

__all__ = ['main']
