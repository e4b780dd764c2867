# SPDX-License-Identifier: Apache-2.0
"""Differentiable GQSA layers for the training stages (BQPO and E2E-OQP).

Both modules compute, in their forward, exactly the weight that :func:`pack` writes
(``vllm_gqsa.format`` is the layout; ``vllm_gqsa.reference.dequantize`` the math): scales
are rounded to the stored float16 and zero points to integers on the way, with a
straight-through estimator (STE) for every rounding, as EfficientQAT and OmniQuant do.
A loss measured on the forward is therefore the loss of the checkpoint that gets written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_gqsa.format import SCALE_DTYPE, GQSALayer, pack_layer
from vllm_gqsa.reference import dequantize

# Smallest scale kept while training (EfficientQAT clamps at 1e-4; GQSA groups of small
# weights can need less). It only guards against a division by zero.
MIN_SCALE = 1e-6


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def stored_scale(s: torch.Tensor) -> torch.Tensor:
    """The scale as the checkpoint stores it (positive, float16), with an STE gradient."""
    s = s.clamp(min=MIN_SCALE)
    return s + (s.to(SCALE_DTYPE).float() - s).detach()


def group_params(layer: GQSALayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense per-row quantization parameters of a packed layer: ``keep`` bool ``[N, K/G]``
    (a row's kept groups), ``scales`` and ``zeros`` float32 ``[N, K/G]`` (1 and 0 where pruned)."""
    R = layer.fmt.block_rows
    NB, KG = layer.out_features // R, layer.num_group_cols
    bids, cols = layer.block_ids(), layer.col_idx.long()
    keep = torch.zeros(NB, KG, dtype=torch.bool, device=bids.device)
    keep[bids, cols] = True
    scales = torch.ones(NB, KG, R, device=bids.device)
    zeros = torch.zeros(NB, KG, R, device=bids.device)
    scales[bids, cols] = layer.scales.float()
    zeros[bids, cols] = layer.zeros().float()
    dense = lambda t: t.permute(0, 2, 1).reshape(layer.out_features, KG)  # noqa: E731
    return keep.repeat_interleave(R, 0), dense(scales), dense(zeros)


class FakeQuantLinear(torch.nn.Module):
    """A GQSA layer whose latent weights, scales and zero points all train (BQPO).

    ``W_eff = mask * s * (clamp(round(W / s) + round(z), 0, 2^b - 1) - round(z))`` per group.
    The mask is a buffer: pruned groups stay exactly zero and get no gradient. ``latent``
    is where ``W`` starts: the solver's weights before rounding (then the forward reproduces
    the solver's result exactly, and the rounding residuals give the scales a gradient), or by
    default the dequantized layer (on the grid, where the scales' STE gradient is zero).

    ``W`` and ``s`` are trained in units of each group's initial scale ``s0`` (parameters
    ``weight = W / s0`` and ``scale = s / s0``; ``zero`` is in code units already): Adam moves
    every parameter by about its learning rate per step, so a learning rate is a fraction of a
    quantization step for every group and model, whatever the magnitude of its weights.
    """

    def __init__(self, layer: GQSALayer, bias: torch.Tensor | None, latent: torch.Tensor | None = None):
        super().__init__()
        self.fmt, self.out_features, self.in_features = layer.fmt, layer.out_features, layer.in_features
        keep, scales, zeros = group_params(layer)
        N, KG, G = self.out_features, scales.shape[1], self.fmt.group_size
        w = dequantize(layer) if latent is None else latent.detach().float()
        self.register_buffer("mask", keep.float())
        self.register_buffer("s0", scales.clamp(min=MIN_SCALE))
        self.weight = torch.nn.Parameter(w.view(N, KG, G) / self.s0.unsqueeze(-1))
        self.scale = torch.nn.Parameter(torch.ones_like(scales))
        self.zero = torch.nn.Parameter(zeros)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _quantized(self):
        maxq = (1 << self.fmt.bits) - 1
        N, K, G = self.out_features, self.in_features, self.fmt.group_size
        s = stored_scale(self.scale * self.s0).unsqueeze(-1)
        z = round_ste(self.zero).clamp(0, maxq).unsqueeze(-1)
        # W / s as (W / s0) / (s / s0): exactly the solver's W / s0 while s is still s0.
        q = torch.clamp(round_ste(self.weight / (s / self.s0.unsqueeze(-1))) + z, 0, maxq)
        return q, s, z

    def quantized_weight(self) -> torch.Tensor:
        q, s, z = self._quantized()
        return ((q - z) * s * self.mask.unsqueeze(-1)).view(self.out_features, self.in_features)

    def forward(self, x):
        return F.linear(x, self.quantized_weight(), self.bias)

    @torch.no_grad()
    def pack(self) -> GQSALayer:
        """The layer in the GQSA format: the same pruning pattern, the current codes and params."""
        q, s, z = self._quantized()
        R = self.fmt.block_rows
        keep = self.mask.bool()[::R]
        return pack_layer(q.reshape(self.out_features, self.in_features).to(torch.uint8).cpu(),
                          s.squeeze(-1).cpu(), z.squeeze(-1).to(torch.uint8).cpu(), keep.cpu(), self.fmt)


class ScaleOnlyLinear(torch.nn.Module):
    """A packed GQSA layer whose scales train and whose codes and zero points are frozen (E2E-OQP).

    The trainable ``scales`` has the packed layout ``[nnz, R]`` and is relative to the starting
    scales (it starts at 1), so a learning rate is a fraction of every group's step size, as in
    :class:`FakeQuantLinear`.
    """

    def __init__(self, layer: GQSALayer, bias: torch.Tensor | None):
        super().__init__()
        self.layer = layer
        R, G = layer.fmt.block_rows, layer.fmt.group_size
        self.NB, self.KG, self.R, self.G = layer.out_features // R, layer.num_group_cols, R, G
        # Codes minus zero points: small integers, exact in int16 for every supported bit width.
        self.register_buffer("levels", (layer.codes().to(torch.int16) - layer.zeros().to(torch.int16)
                                        .unsqueeze(-1)))
        self.register_buffer("slot", layer.block_ids() * self.KG + layer.col_idx.long())
        self.register_buffer("s0", layer.scales.float())
        self.scales = torch.nn.Parameter(torch.ones_like(self.s0))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def weight_matrix(self) -> torch.Tensor:
        values = self.levels.float() * stored_scale(self.scales * self.s0).unsqueeze(-1)  # [nnz, R, G]
        w = values.new_zeros(self.NB * self.KG, self.R, self.G).index_copy(0, self.slot, values)
        return w.view(self.NB, self.KG, self.R, self.G).permute(0, 2, 1, 3).reshape(
            self.layer.out_features, self.layer.in_features)

    def forward(self, x):
        return F.linear(x, self.weight_matrix().to(x.dtype), self.bias)

    @torch.no_grad()
    def pack(self) -> GQSALayer:
        layer = self.layer
        scales = stored_scale(self.scales * self.s0).to(SCALE_DTYPE).cpu()
        return GQSALayer(row_ptr=layer.row_ptr, col_idx=layer.col_idx, qweight=layer.qweight,
                         scales=scales, qzeros=layer.qzeros,
                         out_features=layer.out_features, in_features=layer.in_features, fmt=layer.fmt)
