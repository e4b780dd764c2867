# SPDX-License-Identifier: Apache-2.0
"""Random GQSA layers of real shapes: for ``--load-format dummy`` and speed benchmarks, where
weight values do not matter but the sparsity pattern's balance does."""

from __future__ import annotations

import torch

from .format import GQSALayer, LayerFormat, pack_layer


def random_gqsa_layer(N: int, K: int, fmt: LayerFormat, density: float, seed: int = 0,
                      heavy_rows: float = 1.0, device: str | torch.device = "cpu",
                      pairs: bool = False) -> GQSALayer:
    """Each group kept with probability ``density``; with ``heavy_rows`` > 1, the first
    row block in every 16 keeps ``heavy_rows`` times as many groups (an uneven matrix). With
    ``pairs`` (``--pattern pairs``), each row block keeps one group of each aligned pair of group
    columns instead, chosen at random (density 1/2; K must hold whole pairs)."""
    g = torch.Generator(device=device).manual_seed(seed)
    G, R, bits = fmt.group_size, fmt.block_rows, fmt.bits
    NB, KG = N // R, K // G
    if pairs:
        odd = torch.rand(NB, KG // 2, generator=g, device=device) < 0.5
        keep = torch.stack([~odd, odd], dim=2).reshape(NB, KG)
    else:
        p = torch.full((NB, 1), density, device=device)
        if heavy_rows != 1.0:
            p[::16] = min(1.0, density * heavy_rows)
        keep = torch.rand(NB, KG, generator=g, device=device) < p
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (N, K), generator=g, dtype=torch.uint8, device=device)
    zeros = torch.randint(0, maxq + 1, (N, KG), generator=g, dtype=torch.uint8, device=device)
    scales = torch.rand(N, KG, generator=g, device=device) * 0.004 + 0.001
    return pack_layer(codes, scales, zeros, keep, fmt)
