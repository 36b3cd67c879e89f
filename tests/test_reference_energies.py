"""Every energy computed with DeepMind's original DM21 code (../shared/dm21/reference_energies.json)
is reproduced within 1e-5 Ha by the PyTorch implementation, RKS and UKS, all four functionals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pyscf import gto

from aiida_dm21.functional.scf import DM21RKS, DM21UKS, KS

TOLERANCE = 1e-5  # Ha, from the issue; observed |error| <= 8e-7

REFERENCE_ENERGIES = Path(__file__).resolve().parents[2] / 'shared' / 'dm21' / 'reference_energies.json'
RECORDS = json.loads(REFERENCE_ENERGIES.read_text())['records'] if REFERENCE_ENERGIES.is_file() else []


def _param(record):
    marks = [pytest.mark.core]
    if record['nao'] >= 14:
        marks.append(pytest.mark.slow)
    return pytest.param(record, id=f'{record["system"]}-{record["functional"]}', marks=marks)


@pytest.mark.skipif(not RECORDS, reason='reference_energies.json not found in ../shared')
@pytest.mark.parametrize('record', [_param(r) for r in RECORDS])
def test_reference_energy(record, upstream_dir):
    mol = gto.M(
        atom=record['atom'],
        basis=record['basis'],
        charge=record['charge'],
        spin=record['spin'],
        unit=record.get('unit', 'Angstrom'),
        verbose=0,
    )
    mf = KS(mol, upstream_dir / record['functional'])
    assert isinstance(mf, DM21RKS if record['scf'] == 'RKS' else DM21UKS)
    mf.grids.level = record['grid_level']
    mf.conv_tol = record['conv_tol']
    mf.conv_tol_grad = record['conv_tol_grad']
    mf.small_rho_cutoff = record['small_rho_cutoff']
    assert record['dm0'] == 'B3LYP' and mf.init_guess == 'b3lyp'
    energy = mf.kernel()
    assert mf.converged
    assert len(mf.grids.weights) == record['ngrid'], 'not the grid DeepMind used'
    assert abs(energy - record['e_tot']) < TOLERANCE, f'{energy} vs {record["e_tot"]}'
