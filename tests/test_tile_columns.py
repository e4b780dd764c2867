# SPDX-License-Identifier: Apache-2.0
"""benchmarks/tile_columns.py: the keep mask it reads from a layer, and the tile statistic."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from tile_columns import tile_union  # noqa: E402

from converters.fake_quant import group_params
from vllm_gqsa.format import LayerFormat, pack_layer


def _layer(keep: torch.Tensor, G: int = 16):
    N, KG = keep.shape
    fmt = LayerFormat(4, G, 1)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (N, KG * G), dtype=torch.uint8, generator=g)
    scales = torch.rand(N, KG, generator=g) + 0.1
    zeros = torch.randint(0, 16, (N, KG), dtype=torch.uint8, generator=g)
    return pack_layer(codes, scales, zeros, keep, fmt)


def test_keep_mask_round_trips_the_pattern():
    keep = torch.rand(48, 12, generator=torch.Generator().manual_seed(1)) < 0.4
    keep[5] = False  # an empty row
    assert torch.equal(group_params(_layer(keep))[0], keep)


@pytest.mark.parametrize("tile", [4, 16])
def test_tile_union(tile):
    shared = torch.zeros(32, 8, dtype=torch.bool)
    shared[:, :3] = True  # every row keeps the same 3 of 8 columns: tiles keep 3/8
    assert tile_union(shared, tile) == pytest.approx(3 / 8)
    diagonal = torch.zeros(32, 8, dtype=torch.bool)
    diagonal[torch.arange(32), torch.arange(32) % 8] = True  # rows cycle through the columns
    expected = min(tile, 8) / 8
    assert tile_union(diagonal, tile) == pytest.approx(expected)
