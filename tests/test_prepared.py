"""Prepared training data: the compact per-point arrays give the dense path's loss and gradient, on disk, reused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aiida_dm21.functional.model import DM21Network
from aiida_dm21.reference.fractional import fractional_charge_systems, integer_system
from aiida_dm21.reference.integer import IntegerSpec, run_integer_system
from aiida_dm21.training import prepared as prep
from aiida_dm21.training.loss import prepare_system, self_consistency_delta, system_energy
from aiida_dm21.training.prepared import PreparedData, compact_energy, evaluate_fast, prepare_dataset

pytestmark = pytest.mark.core


@pytest.fixture(scope='module')
def lithium():
    """Li+ -> Li at δ = 0.5 (HF densities, 6-31G): both spin channels, 9 AOs, an open shell."""

    def calc(charge, spin):
        spec = IntegerSpec(atom='Li 0 0 0', basis='6-31g', charge=charge, spin=spin, reference_method='hf')
        return run_integer_system(spec)

    low, high = calc(1, 0), calc(0, 1)
    return [fractional_charge_systems(low, high, deltas=(0.5,))[0], integer_system(high)]


@pytest.fixture(scope='module')
def network():
    torch.manual_seed(3)
    return DM21Network().float()


def _loss_and_gradient(network, energy_fn, obj, regulariser: bool):
    network.zero_grad(set_to_none=True)
    energy, v = energy_fn(network, obj, with_potential=regulariser)
    loss = (energy - obj.target) ** 2
    if regulariser:
        loss = loss + 0.7 * self_consistency_delta(obj, v, 1e-2) ** 2
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in network.parameters()]).clone()
    return float(energy.detach()), None if v is None else v.detach().clone(), float(loss.detach()), grad


@pytest.mark.parametrize('regulariser', [True, False])
def test_compact_path_equals_the_dense_path(lithium, network, tmp_path, regulariser):
    """E_xc, V_xc, the loss and its gradient from the prepared arrays equal the dense-ν path to rounding."""
    system = lithium[0]
    dense = prepare_system(system, grid_level=1)
    data = prepare_dataset([system], tmp_path, grid_level=1, with_regulariser=regulariser)
    compact = data.load(0, with_regulariser=regulariser)
    assert compact.n_points == dense.n_points and compact.target == dense.target
    e_d, v_d, l_d, g_d = _loss_and_gradient(network, system_energy, dense, regulariser)
    e_c, v_c, l_c, g_c = _loss_and_gradient(network, compact_energy, compact, regulariser)
    print(f'E {e_d - e_c:.1e} Ha, loss {(l_d - l_c) / l_d:.1e} rel, grad {float((g_d - g_c).norm() / g_d.norm()):.1e}')
    assert abs(e_d - e_c) < 1e-12
    assert abs(l_d - l_c) <= 1e-12 * abs(l_d)
    torch.testing.assert_close(g_c, g_d, rtol=1e-6, atol=1e-9 * float(g_d.abs().max()))
    if regulariser:
        torch.testing.assert_close(v_c, v_d, rtol=0, atol=1e-12)
        # the evaluation path (the SCF's hand-written input gradient, no autograd graph) agrees to float32
        energy, v = evaluate_fast(network, compact, with_potential=True)
        assert abs(energy - e_d) < 1e-6
        torch.testing.assert_close(v, v_d, rtol=0, atol=1e-6)


def test_blocks_do_not_change_the_arrays(lithium, tmp_path, monkeypatch):
    """Preparing in many small blocks (a few dozen points) gives the arrays of one big block."""
    one = prepare_dataset(lithium[:1], tmp_path / 'one', grid_level=0)
    monkeypatch.setattr(prep, 'BLOCK_BYTES', 1.0)  # the 64-point minimum: dozens of blocks
    many = prepare_dataset(lithium[:1], tmp_path / 'many', grid_level=0)
    a, b = one.load(0), many.load(0)
    for name in ('weights', 'feats', 'parts', 'ao', 'nu_x', 'grad'):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-13, atol=1e-15)


def test_format_reuse_and_keys(lithium, tmp_path):
    folder = tmp_path / 'prepared'
    messages = []
    data = prepare_dataset(lithium, folder, grid_level=0, progress=messages.append)
    assert '2 systems computed, 0 reused' in messages[-1]
    index = json.loads((folder / 'index.json').read_text())
    assert index['format'] == 'aiida-dm21-prepared' and index['format_version'] == 1
    assert index['grid'] == {'level': 0, 'radi_method': 'treutler_ahlrichs_original', 'prune': 'nwchem_prune'}
    assert [s['label'] for s in index['systems']] == [s.label for s in lithium]
    assert len(index['content_sha256']) == 64
    meta = data.meta(0)
    nao, g = meta['nao'], meta['n_points']
    assert meta['arrays']['ao'] == [g, 4, nao] and meta['arrays']['nu_x'] == [g, 2, 2, nao]
    for path in (folder / index['systems'][0]['folder']).glob('*.npy'):
        np.load(path, allow_pickle=False)  # plain arrays, no pickle
    # a second preparation (another epoch, job or resume) reuses everything and writes the same index
    stamp = {p: p.stat().st_mtime_ns for p in folder.rglob('*.npy')}
    again = prepare_dataset(lithium, folder, grid_level=0, progress=messages.append)
    assert '0 systems computed, 2 reused' in messages[-1]
    assert again.index == data.index and stamp == {p: p.stat().st_mtime_ns for p in folder.rglob('*.npy')}
    # data without the regulariser arrays serves a λ = 0 run but is redone for a run that needs them
    lean = prepare_dataset(lithium[:1], tmp_path / 'lean', grid_level=0, with_regulariser=False)
    assert lean.meta(0)['bytes'] < 0.2 * meta['bytes']
    with pytest.raises(prep.PreparedDataError, match='without the regulariser'):
        lean.load(0, with_regulariser=True)
    prepare_dataset(lithium[:1], tmp_path / 'lean', grid_level=0, with_regulariser=True, progress=messages.append)
    assert '1 systems computed' in messages[-1]
    # another grid is another key; an incomplete system (no meta.json: killed while writing) is redone
    other = prepare_dataset(lithium, folder, grid_level=1, progress=messages.append)
    assert '2 systems computed' in messages[-1] and other.index['content_sha256'] != data.index['content_sha256']
    (folder / index['systems'][1]['folder'] / 'meta.json').unlink()
    prepare_dataset(lithium, folder, grid_level=0, progress=messages.append)
    assert '1 systems computed, 1 reused' in messages[-1]


def test_unreadable_folders_are_refused(tmp_path):
    with pytest.raises(prep.PreparedDataError, match=r'no readable index\.json'):
        PreparedData(tmp_path)
    (tmp_path / 'index.json').write_text(json.dumps({'format': 'aiida-dm21-prepared', 'format_version': 99}))
    with pytest.raises(prep.PreparedDataError, match='format version 99'):
        PreparedData(tmp_path)
