# SPDX-License-Identifier: Apache-2.0
"""Plain-torch reference math for GQSA: the oracle every kernel is tested against."""

from __future__ import annotations

import torch

from .format import GQSALayer


def dequantize(layer: GQSALayer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense ``[N, K]`` weight a GQSA layer stands for (pruned groups are zero)."""
    G, R = layer.fmt.group_size, layer.fmt.block_rows
    NB, KG = layer.out_features // R, layer.num_group_cols
    values = (layer.codes().float() - layer.zeros().float().unsqueeze(-1)) \
        * layer.scales.float().unsqueeze(-1)  # [nnz, R, G]
    w = torch.zeros(NB, R, KG, G, dtype=torch.float32, device=layer.qweight.device)
    w[layer.block_ids(), :, layer.col_idx.long()] = values
    return w.reshape(layer.out_features, layer.in_features).to(dtype)


def gqsa_linear(x: torch.Tensor, layer: GQSALayer, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with W dequantized, computed in float32 and returned in x's dtype."""
    w = dequantize(layer, torch.float32)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
             eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """vLLM's RMSNorm as its ``fused_add_rms_norm`` (with a residual) and ``rms_norm`` (without)
    IR ops compute it (``vllm/ir/ops/layernorm.py``), with their roundings: the normalized x, and
    ``x + residual`` in x's dtype (None without a residual)."""
    h = x.float()
    out_residual = None
    if residual is not None:
        h = h + residual.float()
        out_residual = h.to(x.dtype)
    h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        h = h.to(weight.dtype) * weight
    return h.to(x.dtype), out_residual


def silu_and_mul(y: torch.Tensor) -> torch.Tensor:
    """vLLM's SiLU-and-mul (``SiluAndMul.forward_native``): ``silu(y[..., :d]) * y[..., d:]`` with
    d = half of y's last size, each rounded to y's dtype."""
    d = y.shape[-1] // 2
    return torch.nn.functional.silu(y[..., :d]) * y[..., d:]
