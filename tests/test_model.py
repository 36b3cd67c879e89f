"""The network, the checkpoint format and the conversion of DeepMind's weights."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from aiida_dm21.functional import checkpoint as ck
from aiida_dm21.functional import kernels
from aiida_dm21.functional import model as model_module
from aiida_dm21.functional.model import FEATURE_NAMES, LDA_X_FACTOR, DM21Config, DM21Network

pytestmark = pytest.mark.core


def test_architecture_facts():
    net = DM21Network()
    # 11*256+256 + 6*(256*256+256 + 2*256) + 256*3+3
    assert net.n_parameters == 11 * 256 + 256 + 6 * (256 * 256 + 256 + 512) + 256 * 3 + 3
    assert len(FEATURE_NAMES) == 11
    assert math.isclose(LDA_X_FACTOR, -0.9305257363491, rel_tol=1e-12)
    f = net(torch.randn(50, 11).abs())
    assert f.shape == (50, 3) and bool(((f > 0) & (f < 2)).all())


def test_published_weights_load_and_match_tf_values(upstream_dir):
    from aiida_dm21.functional.tf_checkpoint import read_tensor_bundle

    tensors, meta = ck.import_deepmind(upstream_dir / 'DM21')
    raw = read_tensor_bundle(upstream_dir / 'DM21' / 'variables' / 'variables')
    w_tf = raw['hub_wrapper/local_functional_v2/MLP/ResidualBlock_3/linear/w']
    np.testing.assert_array_equal(tensors['blocks.3.linear.weight'].numpy(), w_tf.T)
    assert meta['source'] == 'deepmind:DM21'
    assert (
        meta['upstream_sha256']['variables/variables.index'] == ck.UPSTREAM_SHA256['DM21']['variables/variables.index']
    )


def test_each_published_folder_is_identified_by_its_hashes(upstream_dir):
    for name in ck.PUBLISHED_FUNCTIONALS:
        _, meta = ck.import_deepmind(upstream_dir / name)
        assert meta['name'] == name


def test_checkpoint_roundtrip_is_exact_and_content_hashed(tmp_path):
    torch.manual_seed(0)
    net = DM21Network()
    meta = ck.save_checkpoint(tmp_path / 'a.safetensors', net, {'name': 'a', 'source': 'trained'})
    ck.save_checkpoint(tmp_path / 'b.safetensors', net, {'name': 'b', 'source': 'trained'})
    loaded, meta_a = ck.load_network(tmp_path / 'a.safetensors')
    _, meta_b = ck.read_checkpoint(tmp_path / 'b.safetensors')
    assert meta_a['weights_sha256'] == meta_b['weights_sha256'] == meta['weights_sha256']
    x = torch.rand(7, 11)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert meta_a['architecture'] == DM21Config().to_dict()
    assert meta_a['feature_names'] == list(FEATURE_NAMES)


def test_checkpoint_is_not_pickle(tmp_path):
    ck.save_checkpoint(tmp_path / 'a.safetensors', DM21Network(), {'source': 'trained'})
    header_len = int.from_bytes((tmp_path / 'a.safetensors').read_bytes()[:8], 'little')
    header = json.loads((tmp_path / 'a.safetensors').read_bytes()[8 : 8 + header_len])
    assert 'aiida_dm21' in header['__metadata__']


@pytest.mark.parametrize(
    ('damage', 'message'),
    [
        ('truncate', 'truncated or corrupt'),
        ('missing', 'does not exist'),
        ('no_metadata', 'not an aiida-dm21 checkpoint'),
        ('wrong_shape', 'do not fit the DM21 architecture'),
        ('tampered', 'does not match the recorded'),
        ('future_version', 'not supported'),
    ],
)
def test_bad_checkpoints_are_refused_clearly(tmp_path, damage, message):
    path = tmp_path / 'c.safetensors'
    meta = ck.save_checkpoint(path, DM21Network(), {'source': 'trained'})
    tensors, _ = ck.read_checkpoint(path)
    if damage == 'truncate':
        path.write_bytes(path.read_bytes()[:-1000])
    elif damage == 'missing':
        path.unlink()
    elif damage == 'no_metadata':
        save_file(tensors, str(path))
    elif damage == 'wrong_shape':
        tensors['output_layer.weight'] = torch.zeros(4, 256)
        tensors['output_layer.bias'] = torch.zeros(4)
        meta['weights_sha256'] = ck.weights_sha256(tensors)
        save_file(tensors, str(path), metadata={'aiida_dm21': json.dumps(meta)})
    elif damage == 'tampered':
        tensors['output_layer.bias'] = tensors['output_layer.bias'] + 1
        save_file(tensors, str(path), metadata={'aiida_dm21': json.dumps(meta)})
    elif damage == 'future_version':
        meta['format_version'] = 99
        save_file(tensors, str(path), metadata={'aiida_dm21': json.dumps(meta)})
    with pytest.raises(ck.CheckpointError, match=message):
        ck.load_network(path)


def test_upstream_folder_errors(upstream_dir, tmp_path):
    copy = tmp_path / 'custom'
    shutil.copytree(upstream_dir / 'DM21', copy)
    data = copy / 'variables' / 'variables.data-00000-of-00001'
    data.chmod(0o644)
    blob = bytearray(data.read_bytes())
    blob[100] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(ck.CheckpointError, match='match none of the published'):
        ck.import_deepmind(copy)
    with pytest.raises(ck.CheckpointError, match='sha256 mismatch'):
        ck.import_deepmind(copy, name='DM21')
    with pytest.raises(ck.CheckpointError, match='CRC32C mismatch'):
        ck.import_deepmind(copy, verify=False)
    (copy / 'variables' / 'variables.index').unlink()
    with pytest.raises(ck.CheckpointError, match=r'lacks variables/variables\.index'):
        ck.import_deepmind(copy, verify=False)
    with pytest.raises(ck.CheckpointError, match='not a directory'):
        ck.import_deepmind(tmp_path / 'nowhere')


def test_unknown_and_uninstalled_names(tmp_path, monkeypatch):
    monkeypatch.setenv('AIIDA_DM21_WEIGHTS_DIR', str(tmp_path))
    with pytest.raises(ck.CheckpointError, match="unknown functional 'DM99'"):
        ck.load_network('DM99')
    with pytest.raises(ck.CheckpointError, match='aiida-dm21 weights fetch DM21m'):
        ck.load_network('DM21m')


def test_fetch_from_file_mirror_checks_hashes(upstream_dir, tmp_path):
    results = ck.fetch_deepmind(['DM21mc'], source=upstream_dir.as_uri(), dest_dir=tmp_path / 'w')
    ((path, meta),) = results
    assert path.name == 'DM21mc.safetensors' and meta['source'] == 'deepmind:DM21mc'
    mirror = tmp_path / 'mirror'
    shutil.copytree(upstream_dir / 'DM21', mirror / 'DM21')
    (mirror / 'DM21' / 'saved_model.pb').chmod(0o644)
    (mirror / 'DM21' / 'saved_model.pb').write_bytes(b'not the published graph')
    with pytest.raises(ck.CheckpointError, match='sha256 mismatch'):
        ck.fetch_deepmind(['DM21'], source=str(mirror), dest_dir=tmp_path / 'w2')
    assert not (tmp_path / 'w2' / 'DM21.safetensors').exists()
    with pytest.raises(ck.CheckpointError, match='could not fetch'):
        ck.fetch_deepmind(['DM21'], source=str(tmp_path / 'empty'), dest_dir=tmp_path / 'w3')
    with pytest.raises(ck.CheckpointError, match='unknown functional'):
        ck.fetch_deepmind(['B3LYP'], source=str(mirror), dest_dir=tmp_path / 'w3')


def test_hand_written_input_gradient_equals_autograd(upstream_dir, monkeypatch):
    monkeypatch.setattr(model_module, '_ONEDNN', False)  # the same GEMM as autograd: agreement to rounding
    monkeypatch.setenv('AIIDA_DM21_FUSED', '0')  # and PyTorch's element-wise kernels
    net, _ = ck.load_network(upstream_dir / 'DM21')
    net.requires_grad_(False)
    torch.manual_seed(0)
    x = (torch.rand(3000, 11) * 2 - 0.3) ** 3  # includes negative and tiny values
    g = torch.rand(3000, 3)
    leaf = x.clone().requires_grad_(True)
    f = net(leaf)
    (grad,) = torch.autograd.grad(f, leaf, grad_outputs=g)
    f2, grad2 = net.forward_with_input_grad(x, g, chunk=1000)
    torch.testing.assert_close(f2, f.detach(), rtol=0, atol=2e-7)  # matmul blocking: 1 ulp
    torch.testing.assert_close(grad2, grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()))


@pytest.mark.parametrize('fused', [False, True], ids=['torch-elementwise', 'fused-elementwise'])
@pytest.mark.parametrize('onednn', [False, True], ids=['addmm', 'onednn'])
def test_network_pass_is_float32_accurate_with_either_backend(upstream_dir, monkeypatch, onednn, fused):
    """Against the same network in float64, every back end errs alike (different kernels round differently)."""
    if onednn:
        monkeypatch.setattr(model_module, '_ONEDNN', None)  # probe afresh
        if model_module.linear_backend() != 'onednn':
            pytest.skip('oneDNN linear is not available in this PyTorch build')
    monkeypatch.setattr(model_module, '_ONEDNN', onednn)
    monkeypatch.setenv('AIIDA_DM21_FUSED', '1' if fused else '0')
    if fused and not kernels.available():
        pytest.skip('numba is not importable')
    assert model_module.elementwise_backend() == ('fused' if fused else 'torch')
    net, _ = ck.load_network(upstream_dir / 'DM21')
    net.requires_grad_(False)
    net64 = copy.deepcopy(net).double()
    torch.manual_seed(0)
    x = (torch.rand(5000, 11) * 2 - 0.3) ** 3
    g = torch.rand(5000, 3)
    f64, g64 = net64.forward_with_input_grad(x.double(), g.double())
    f, grad = net.forward_with_input_grad(x, g)
    error = (f.double() - f64).abs()
    assert error.max() < 2e-6 and error.mean() < 1e-7  # f in (0, 2): float32 ulp 1.2e-7 … 2.4e-7
    assert (grad.double() - g64).abs().max() < 5e-6 * g64.abs().max()


def test_fused_kernels_against_float64():
    """ELU, tanh, and layer norm + ELU with its backward, as the fused kernels compute them, against float64."""
    if not kernels.available():
        pytest.skip('numba is not importable')
    x = np.concatenate([np.linspace(-90, 12, 100_001), np.logspace(-30, 1.5, 5000), -np.logspace(-30, 1.5, 5000)])
    x = x.astype(np.float32)[None]
    ulp = np.spacing(np.float32(1.0)).astype(np.float64)  # 1.2e-7: activations are O(1)
    y = x.copy()
    kernels.tanh_(y)
    ref = np.tanh(x.astype(np.float64))
    assert np.abs(y - ref).max() < ulp and np.all(np.abs(y - ref) <= 3 * np.spacing(np.abs(ref).astype(np.float32)))
    # ELU (exp(y) - 1 below 0, as tf.nn.elu is documented) through a layer norm that is the identity
    torch.manual_seed(0)
    rows = torch.randn(4096, 256) * 4 + 0.3
    gamma, beta = torch.rand(256) + 0.5, torch.randn(256) * 0.5
    a, b = rows[:, :128].repeat(1, 2).contiguous(), rows.contiguous()
    out, mean, rstd = torch.empty_like(a), torch.empty(4096), torch.empty(4096)
    kernels.layer_norm_elu(
        a.numpy(), b.numpy(), gamma.numpy(), beta.numpy(), 1e-5, out.numpy(), mean.numpy(), rstd.numpy()
    )
    z64 = (a.double() + b.double()).requires_grad_(True)
    out64 = torch.nn.functional.elu(torch.nn.functional.layer_norm(z64, (256,), gamma.double(), beta.double(), 1e-5))
    out32 = torch.nn.functional.elu(torch.nn.functional.layer_norm(a + b, (256,), gamma, beta, 1e-5))
    assert (out.double() - out64).abs().max() <= 1.5 * (out32.double() - out64).abs().max()  # PyTorch's own error
    torch.testing.assert_close(mean.double(), z64.detach().mean(-1), rtol=1e-6, atol=1e-6)
    grad_h = torch.randn(4096, 256)
    grad_z = torch.empty_like(grad_h)
    kernels.elu_layer_norm_backward(
        grad_h.numpy(), out.numpy(), a.numpy(), b.numpy(), mean.numpy(), rstd.numpy(), gamma.numpy(), grad_z.numpy()
    )
    (grad64,) = torch.autograd.grad(out64, z64, grad_h.double())
    assert (grad_z.double() - grad64).abs().max() < 1e-5 * grad64.abs().max()


def test_fused_kernels_propagate_nan():
    """A NaN feature (a broken density) must stay visible, as it does in PyTorch's kernels, not be clamped away."""
    if not kernels.available():
        pytest.skip('numba is not importable')
    x = np.ones((2, 16), np.float32)
    x[0, 3] = np.nan
    y = x.copy()
    kernels.tanh_(y)
    assert np.isnan(y[0, 3]) and np.isfinite(y[1]).all()
    ones, zeros = np.ones(16, np.float32), np.zeros(16, np.float32)
    out, mean, rstd = np.empty_like(x), np.empty(2, np.float32), np.empty(2, np.float32)
    kernels.layer_norm_elu(x, np.zeros_like(x), ones, zeros, 1e-5, out, mean, rstd)
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


def test_broken_kernels_fall_back_with_a_warning(monkeypatch):
    """A JIT that fails on some platform switches the kernels off for the process instead of breaking the SCF."""
    if kernels.numba is None:
        pytest.skip('numba is not importable')

    def broken():
        raise RuntimeError('LLVM says no')

    monkeypatch.setattr(kernels, '_WORKING', None)
    monkeypatch.setattr(kernels, '_self_check', broken)
    with pytest.warns(UserWarning, match='LLVM says no'):
        assert not kernels.available()
    assert model_module.elementwise_backend() == 'torch'
    net = DM21Network().requires_grad_(False)
    x = torch.rand(10, 11)
    f, _ = net.forward_with_input_grad(x, torch.rand(10, 3))  # on PyTorch's kernels
    torch.testing.assert_close(f, net(x), rtol=0, atol=2e-6)


def test_elementwise_switch(monkeypatch):
    monkeypatch.setenv('AIIDA_DM21_FUSED', '0')
    assert model_module.elementwise_backend() == 'torch'
    monkeypatch.setenv('AIIDA_DM21_FUSED', '1')
    assert model_module.elementwise_backend(torch.float64) == 'torch'  # the kernels are float32 only


def test_onednn_switch(monkeypatch):
    monkeypatch.setattr(model_module, '_ONEDNN', None)
    monkeypatch.setenv('AIIDA_DM21_ONEDNN', '0')
    assert model_module.linear_backend() == 'addmm'


def test_network_pass_follows_in_place_weight_changes():
    """The packed residual layers are cached per weights version: an in-place update must not serve stale ones."""
    torch.manual_seed(1)
    net = DM21Network().requires_grad_(False)
    x, g = torch.rand(300, 11), torch.rand(300, 3)
    before, _ = net.forward_with_input_grad(x, g, chunk=128)
    with torch.no_grad():
        net.blocks[2].linear.weight.mul_(1.5)
    after, _ = net.forward_with_input_grad(x, g, chunk=128)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, net(x), rtol=0, atol=2e-6)
