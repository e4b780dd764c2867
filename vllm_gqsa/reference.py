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
