"""The DM21 network in PyTorch.

Architecture (read off the published TF-Hub graphs, see ``docs/architecture.md``)::

    x (N, 11) -> log(|x| + eps_log)
              -> tanh(Linear 11->256)
              -> 6 x residual block: h <- elu(layer_norm(h + Linear 256->256 (h)))
              -> Linear 256->3 -> f = 2 * sigmoid(y / 2)

The XC energy density (per volume) is assembled from the three enhancement factors by
:func:`xc_energy_density`.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable

import torch
from torch import nn

from . import kernels
from .architecture import FEATURE_NAMES, DM21Config

__all__ = ['FEATURE_NAMES', 'LDA_X_FACTOR', 'DM21Config', 'DM21Network', 'xc_energy_density', 'xc_energy_parts']

#: -(3/4) (6/pi)^(1/3): LDA exchange energy density per spin channel is LDA_X_FACTOR * rho_s^(4/3).
LDA_X_FACTOR: float = -0.75 * (6.0 / math.pi) ** (1.0 / 3.0)


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.elu(self.norm(h + self.linear(h)))


class DM21Network(nn.Module):
    """Maps the (N, 11) raw features to (N, 3) enhancement factors in (0, 2)."""

    def __init__(self, config: DM21Config | None = None) -> None:
        super().__init__()
        self.config = config or DM21Config()
        c = self.config
        self.input_layer = nn.Linear(c.n_features, c.hidden)
        self.blocks = nn.ModuleList(_ResidualBlock(c.hidden, c.layer_norm_eps) for _ in range(c.n_blocks))
        self.output_layer = nn.Linear(c.hidden, c.n_outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = torch.log(torch.abs(features) + (c.abs_offset + c.log_offset))
        h = torch.tanh(self.input_layer(x))
        for block in self.blocks:
            h = block(h)
        y = self.output_layer(h)
        return 2.0 * torch.sigmoid(y / 2.0)

    @torch.no_grad()
    def forward_with_input_grad(
        self, features: torch.Tensor, grad_output: torch.Tensor, chunk: int = 2048
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``f = self(features)`` and the vector-Jacobian product ``grad_output · df/dfeatures``.

        The SCF needs gradients with respect to the inputs only, never the weights.  This hand-written
        backward pass (no autograd graph) folds each skip connection into its weight matrix (h W^T + h =
        h (W + I)^T), works in place, and runs ``chunk`` points at a time so the 256-wide activations stay
        in cache.  The 256x256 products go through oneDNN with pre-packed weights when PyTorch offers it for
        float32 (:func:`linear_backend`): on AMD CPUs MKL's ``addmm`` reaches less than half the speed.  The
        element-wise work between them (skip connection + layer norm + ELU, their backward, tanh) runs in the
        fused kernels of :mod:`.kernels` for float32 (:func:`elementwise_backend`), otherwise in PyTorch's
        own kernels.  As accurate as autograd through :meth:`forward` (``tests/test_model.py``).
        """
        c = self.config
        fused = elementwise_backend(features.dtype, features.device) == 'fused'
        layers, input_backward = self._packed_layers(chunk, fused)
        f_out = torch.empty(features.shape[0], c.n_outputs, dtype=features.dtype)
        g_out = torch.empty_like(features)
        shape = (c.hidden,)
        for start in range(0, features.shape[0], chunk):
            x = features[start : start + chunk]
            rows = x.shape[0]
            denom = x.abs().add_(c.abs_offset + c.log_offset)
            h = torch.addmm(self.input_layer.bias, torch.log(denom), self.input_layer.weight.t())
            if fused:
                kernels.tanh_(h.numpy())
            else:
                h.tanh_()
            saved = [h]
            for forward, _, norm in layers:
                # z = a + h (the skip connection); the fused kernel adds them itself and keeps a and h apart
                a = forward(h)
                if fused:
                    h_next, mean, rstd = torch.empty_like(a), a.new_empty(rows), a.new_empty(rows)
                    kernels.layer_norm_elu(
                        a.numpy(), h.numpy(), *norm, c.layer_norm_eps, h_next.numpy(), mean.numpy(), rstd.numpy()
                    )
                else:
                    a.add_(h)
                    y, mean, rstd = torch.native_layer_norm(a, shape, *norm, c.layer_norm_eps)
                    h_next = torch.nn.functional.elu(y, inplace=True)
                saved.append((a, h, mean, rstd, h_next))
                h = h_next
            f = torch.addmm(self.output_layer.bias, h, self.output_layer.weight.t())
            f = torch.sigmoid(f.mul_(0.5)).mul_(2.0)
            f_out[start : start + chunk] = f
            # backward: d(2 sigmoid(y/2))/dy = s (1 - s) with s = f/2
            s = f * 0.5
            g = grad_output[start : start + chunk] * s * (1.0 - s)
            g_h = g @ self.output_layer.weight
            for (_, backward, norm), (a, h_in, mean, rstd, h) in zip(
                reversed(layers), reversed(saved[1:]), strict=True
            ):
                if fused:
                    g_z = torch.empty_like(g_h)
                    kernels.elu_layer_norm_backward(
                        g_h.numpy(),
                        h.numpy(),
                        a.numpy(),
                        h_in.numpy(),
                        mean.numpy(),
                        rstd.numpy(),
                        norm[0],
                        g_z.numpy(),
                    )
                else:  # a holds z = a + h_in here
                    g_y = torch.ops.aten.elu_backward(g_h, 1.0, 1.0, 1.0, True, h)
                    g_z = torch.ops.aten.native_layer_norm_backward(
                        g_y, a, shape, mean, rstd, *norm, [True, False, False]
                    )[0]
                g_h = backward(g_z)  # g_z (W + I): the skip connection passes g_z through
            g_pre = torch.ops.aten.tanh_backward(g_h, saved[0])
            g_out[start : start + chunk] = input_backward(g_pre).div_(denom).mul_(torch.sign(x))
        return f_out, g_out

    def _packed_layers(self, chunk: int, fused: bool = False) -> tuple[list, Callable]:
        """(forward, backward, norm) of each residual block and the input layer's backward, for
        :meth:`forward_with_input_grad`.

        The forward pass adds the skip connection separately (as the published graph does: folding it into
        W + I would round W's diagonal in float32); the backward pass multiplies by (W + I).  Built once per
        chunk size, back end and version of the weights (an SCF calls the pass for every grid block of every
        iteration; packing the weights each time cost ~2 ms per call) and kept outside the module, which
        stays picklable.
        """
        params = (*self.blocks.parameters(), self.input_layer.weight)
        key = (chunk, linear_backend(), fused, tuple((p.data_ptr(), p._version, p.dtype) for p in params))
        cached = _LAYER_CACHE.get(self)
        if cached is not None and cached[0] == key:
            return cached[1]
        eye = torch.eye(self.config.hidden, dtype=params[0].dtype, device=params[0].device)
        layers = [
            (
                _linear(block.linear.weight, block.linear.bias, chunk),
                _linear((block.linear.weight + eye).t().contiguous(), None, chunk),
                _norm_parameters(block.norm, fused),
            )
            for block in self.blocks
        ]
        input_backward = _linear(self.input_layer.weight.t().contiguous(), None, chunk)  # g -> g W_in
        _LAYER_CACHE[self] = (key, (layers, input_backward))
        return layers, input_backward

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


_ONEDNN: bool | None = None
_LAYER_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def linear_backend() -> str:
    """``'onednn'`` when float32 linear layers can use oneDNN with pre-packed weights, else ``'addmm'``.

    Checked once per process by running the op and comparing it with ``addmm`` (it is a private PyTorch
    op, the one ``torch.compile`` uses on CPU); ``AIIDA_DM21_ONEDNN=0`` switches it off.
    """
    global _ONEDNN
    if _ONEDNN is None:
        _ONEDNN = False
        if os.environ.get('AIIDA_DM21_ONEDNN', '1') != '0' and torch.backends.mkldnn.is_available():
            try:
                generator = torch.Generator().manual_seed(0)
                x = torch.randn(64, 32, generator=generator)
                w = torch.randn(16, 32, generator=generator)
                b = torch.randn(16, generator=generator)
                packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
                out = torch.ops.mkldnn._linear_pointwise(x, packed, b, 'none', [], '')
                _ONEDNN = bool(torch.allclose(out, torch.addmm(b, x, w.t()), rtol=1e-5, atol=1e-5))
            except (AttributeError, RuntimeError, NotImplementedError):
                _ONEDNN = False
    return 'onednn' if _ONEDNN else 'addmm'


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
    """``x -> x weight^T + bias`` for float32 blocks of about ``rows`` rows (oneDNN when available)."""
    if weight.dtype == torch.float32 and weight.device.type == 'cpu' and linear_backend() == 'onednn':
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, 'none', [], '')
    weight_t = weight.t()
    if bias is None:
        return lambda x: x @ weight_t
    return lambda x: torch.addmm(bias, x, weight_t)


def elementwise_backend(dtype: torch.dtype = torch.float32, device: torch.device | str = 'cpu') -> str:
    """``'fused'`` when the SCF pass runs layer norm + ELU in the numba kernels of :mod:`.kernels`, else ``'torch'``.

    Fused for float32 on the CPU when numba is importable and ``AIIDA_DM21_FUSED`` is not ``0``.
    """
    if dtype == torch.float32 and torch.device(device).type == 'cpu' and kernels.available():
        return 'fused'
    return 'torch'


def _norm_parameters(norm: nn.LayerNorm, fused: bool) -> tuple:
    """(weight, bias) of a layer norm: detached numpy arrays for the fused kernels, else the tensors."""
    if fused:
        return (norm.weight.detach().numpy(), norm.bias.detach().numpy())
    return (norm.weight, norm.bias)


def xc_energy_parts(rho_a: torch.Tensor, rho_b: torch.Tensor, hfx: torch.Tensor) -> torch.Tensor:
    """The three energy densities (per volume) that the enhancement factors multiply, shape ``(N, 3)``.

    ``hfx`` is ``(2 spins, n_omega, N)``: local HF exchange energy densities per spin and omega.  Columns:
    e_x^LDA = LDA_X_FACTOR (rho_a^4/3 + rho_b^4/3), (e_hf,a + e_hf,b)(omega=0), (e_hf,a + e_hf,b)(omega=0.4).
    """
    e_lda = LDA_X_FACTOR * (rho_a.clamp(min=0.0) ** (4.0 / 3.0) + rho_b.clamp(min=0.0) ** (4.0 / 3.0))
    hf_total = hfx[0] + hfx[1]
    return torch.stack([e_lda, hf_total[0], hf_total[1]], dim=1)


def xc_energy_density(enhancement: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """e_xc = f1 e_x^LDA + f2 e_hf(omega=0) + f3 e_hf(omega=0.4), per volume, shape ``(N,)``."""
    return (enhancement * parts).sum(-1)
