"""Shared fixtures: DeepMind's published checkpoints from ../shared (never copied into the repository)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
UPSTREAM = SHARED / 'dm21' / 'upstream'


@pytest.fixture(scope='session')
def upstream_dir() -> Path:
    if not (UPSTREAM / 'DM21' / 'variables' / 'variables.index').is_file():
        pytest.skip(f'DeepMind checkpoints not found at {UPSTREAM}')
    return UPSTREAM


@pytest.fixture(scope='session')
def installed_weights(upstream_dir, tmp_path_factory) -> Path:
    """All four published functionals converted into a private weights folder."""
    from aiida_dm21.functional.checkpoint import PUBLISHED_FUNCTIONALS, install_deepmind

    dest = tmp_path_factory.mktemp('weights')
    for name in PUBLISHED_FUNCTIONALS:
        install_deepmind(upstream_dir / name, dest)
    return dest


@pytest.fixture
def weights_env(installed_weights, monkeypatch) -> Path:
    """Point name lookup (``KS(mol, 'DM21')``) at the converted weights."""
    monkeypatch.setenv('AIIDA_DM21_WEIGHTS_DIR', str(installed_weights))
    return installed_weights
