# SPDX-License-Identifier: Apache-2.0
"""The GQSA format: packing round trips, validation errors, slicing for tensor parallelism."""

import pytest
import torch

from conftest import random_layer
from vllm_gqsa.format import (GQSAFormatError, GQSALayer, GQSAQuantConfig, LayerFormat,
                              expected_bits_per_weight, index_dtype, is_pair_pattern, pack_bits,
                              pack_layer, unpack_bits)
from vllm_gqsa.reference import dequantize

FORMATS = [LayerFormat(b, g, r) for b in (2, 4, 8) for g in (16, 32, 64, 128) for r in (1, 3)]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_bits_round_trip(bits):
    x = torch.randint(0, 1 << bits, (7, 5, 16), dtype=torch.int32).to(torch.uint8)
    packed = pack_bits(x, bits)
    assert packed.shape == (7, 5, 16 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits), x)


def test_pack_bits_order_is_low_bits_first():
    assert pack_bits(torch.tensor([1, 2], dtype=torch.uint8), 4).item() == 0x21


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_pack_unpack_round_trip_awkward_shapes(fmt):
    N, K = 39 * fmt.block_rows, 13 * fmt.group_size  # nothing a power of two
    g = torch.Generator().manual_seed(1)
    NB, KG = N // fmt.block_rows, K // fmt.group_size
    keep = torch.rand(NB, KG, generator=g) < 0.4
    keep[0], keep[1] = False, True  # an empty and a full row block
    maxq = (1 << fmt.bits) - 1
    codes = torch.randint(0, maxq + 1, (N, K), generator=g, dtype=torch.int32).to(torch.uint8)
    zeros = torch.randint(0, maxq + 1, (N, KG), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.rand(N, KG, generator=g).half().float()
    layer = pack_layer(codes, scales, zeros, keep, fmt)
    layer.validate()
    assert layer.nnz == int(keep.sum())
    assert layer.col_idx.dtype == index_dtype(KG)
    # Dequantize by hand from the dense inputs and compare.
    rows_keep = keep.repeat_interleave(fmt.block_rows, 0).repeat_interleave(fmt.group_size, 1)
    w = (codes.float() - zeros.float().repeat_interleave(fmt.group_size, 1)) \
        * scales.repeat_interleave(fmt.group_size, 1)
    expected = torch.where(rows_keep, w, torch.zeros_like(w))
    assert torch.equal(dequantize(layer), expected)
    assert layer.bits_per_weight() == pytest.approx(
        expected_bits_per_weight(fmt, N, K, layer.nnz / (NB * KG)), rel=1e-9)
    # The same weights as single rows (what the CUDA kernels' format is built from).
    single = layer.single_rows()
    single.validate()
    assert single.fmt.block_rows == 1 and single.nnz == layer.nnz * fmt.block_rows
    assert torch.equal(dequantize(single), expected)


def test_index_width_follows_k():
    assert index_dtype(256) == torch.uint8
    assert index_dtype(257) == torch.int16
    assert index_dtype(32768) == torch.int16
    assert index_dtype(32769) == torch.int32


def test_bits_per_weight_w4s50_g16():
    # 4096 inputs -> 256 group columns -> uint8 index: (64 code + 16 scale + 4 zero + 8 index) / 16 / 2
    # per weight, plus one int32 row pointer per row.
    bpw = expected_bits_per_weight(LayerFormat(4, 16, 1), 4096, 4096, 0.5)
    assert bpw == pytest.approx(2.875 + 32 * 4097 / 4096**2, abs=1e-6)


def corrupt(layer, **changes):
    t = layer.tensors()
    t.update(changes)
    return t


@pytest.fixture
def layer():
    return random_layer(24, 160, density=0.5, empty_rows=[3], full_rows=[4])


def check_rejected(layer, match, **changes):
    with pytest.raises(GQSAFormatError, match=match):
        GQSALayer.from_tensors(corrupt(layer, **changes), layer.out_features, layer.in_features,
                               layer.fmt, name="model.layers.0.mlp.up_proj")


def test_validate_accepts_good_layer(layer):
    GQSALayer.from_tensors(layer.tensors(), 24, 160, layer.fmt, name="x")


def test_validate_names_the_layer(layer):
    check_rejected(layer, "model.layers.0.mlp.up_proj: col_idx.*out of range",
                   col_idx=torch.full_like(layer.col_idx, 10))


def test_validate_rejects_negative_index(layer):
    ci = layer.col_idx.to(torch.int16).clone()
    ci[5] = -1
    check_rejected(layer, "col_idx has dtype", col_idx=ci)  # wrong width for K=160 first
    big = random_layer(8, 16 * 300, density=0.3)
    ci = big.col_idx.clone()
    ci[2] = -3
    with pytest.raises(GQSAFormatError, match="out of range"):
        GQSALayer.from_tensors(corrupt(big, col_idx=ci), 8, 16 * 300, big.fmt)


def test_validate_rejects_decreasing_row_ptr(layer):
    rp = layer.row_ptr.clone()
    rp[6] = rp[5] - 1  # rp[5] > 0: row blocks 0..4 hold groups
    check_rejected(layer, "row_ptr decreases", row_ptr=rp)


def test_validate_rejects_row_ptr_overrun(layer):
    rp = layer.row_ptr.clone()
    rp[-1] += 7
    check_rejected(layer, r"row_ptr\[-1\]", row_ptr=rp)


def test_validate_rejects_nonzero_start(layer):
    rp = layer.row_ptr.clone()
    rp[0] = 1
    check_rejected(layer, r"row_ptr\[0\]", row_ptr=rp)


def test_validate_rejects_duplicate_columns(layer):
    ci = layer.col_idx.clone()
    b = int(torch.argmax((layer.row_ptr[1:] - layer.row_ptr[:-1]).long()))
    start = int(layer.row_ptr[b])
    ci[start + 1] = ci[start]
    check_rejected(layer, "strictly increasing", col_idx=ci)


def test_validate_rejects_wrong_dtype_and_shape(layer):
    check_rejected(layer, "scales has dtype", scales=layer.scales.float())
    check_rejected(layer, "qweight has shape", qweight=layer.qweight[:, :, :-1])
    check_rejected(layer, "row_ptr has dtype", row_ptr=layer.row_ptr.long())
    check_rejected(layer, "qzeros has shape", qzeros=layer.qzeros[:-1])


def test_validate_rejects_nan_and_inf_scales(layer):
    for bad in (float("nan"), float("inf")):
        s = layer.scales.clone()
        s[3, 0] = bad
        check_rejected(layer, "not finite", scales=s)


def test_validate_rejects_missing_tensor(layer):
    t = layer.tensors()
    del t["qzeros"]
    with pytest.raises(GQSAFormatError, match="missing tensor.*qzeros"):
        GQSALayer.from_tensors(t, 24, 160, layer.fmt, name="m")


def test_validate_rejects_shape_not_divisible():
    with pytest.raises(GQSAFormatError, match="not a multiple of group_size"):
        LayerFormat(4, 16, 1).check_shape(32, 100)


def test_slicing_rows_and_inputs_matches_dense(layer):
    w = dequantize(layer)
    assert torch.equal(dequantize(layer.select_rows(8, 20)), w[8:20])
    part = layer.select_input(32, 128)
    part.validate()
    assert torch.equal(dequantize(part), w[:, 32:128])
    fused = GQSALayer.concat_rows([layer.select_rows(0, 8), layer.select_rows(8, 24)])
    fused.validate()
    assert torch.equal(dequantize(fused), w)


def test_concat_rows_of_different_row_blocks():
    # Tensor parallelism or vLLM's vocabulary padding may cut one shard into single rows and leave
    # another in row blocks: stacked, they become single rows with the same weights.
    blocks = random_layer(16, 64, LayerFormat(4, 16, 4), seed=3)
    single = random_layer(6, 64, LayerFormat(4, 16, 1), seed=4)
    fused = GQSALayer.concat_rows([blocks, single])
    fused.validate()
    assert fused.fmt.block_rows == 1
    assert torch.equal(dequantize(fused), torch.cat([dequantize(blocks), dequantize(single)]))
    with pytest.raises(GQSAFormatError, match="different input sizes or formats"):
        GQSALayer.concat_rows([blocks, random_layer(4, 64, LayerFormat(2, 16, 1))])


def test_slicing_rejects_split_inside_a_group(layer):
    with pytest.raises(GQSAFormatError, match="multiples of group_size 16"):
        layer.select_input(8, 160)


@pytest.mark.parametrize("bad,match", [
    ({"bits": 3}, "bits=3"), ({"group_size": 24}, "group_size=24"), ({"sparsity": 1.0}, "sparsity"),
    ({"format_version": 2}, "format_version 2"), ({"bits": "4"}, "must be a number"),
    ({"target_modules": "q_proj"}, "list of strings"), ({"quant_method": "awq"}, "not 'gqsa'"),
    ({"block_rows": 0}, "block_rows"), ({"bits": float("nan")}, "bits must be a number"),
    ({"group_size": float("inf")}, "group_size must be a number"), ({"sparsity": float("nan")}, "sparsity"),
    ({"modules_to_not_convert": [1]}, "list of strings"), ({"pattern": "2:4"}, "pattern='2:4' is not supported"),
    ({"pattern": 2}, "pattern must be a string"), ({"pattern": "pairs", "sparsity": 0.3}, "sparsity must be 0.5"),
])
def test_quant_config_rejects_impossible_values(bad, match):
    d = GQSAQuantConfig().to_dict()
    d.update(bad)
    with pytest.raises(GQSAFormatError, match=match):
        GQSAQuantConfig.from_dict(d)


def test_quant_config_reads_null_modules_to_not_convert_as_none():
    d = GQSAQuantConfig().to_dict()
    d["modules_to_not_convert"] = None
    assert GQSAQuantConfig.from_dict(d) == GQSAQuantConfig()


def test_quant_config_round_trip():
    c = GQSAQuantConfig(bits=2, group_size=64, sparsity=0.3, modules_to_not_convert=("a.b",))
    assert GQSAQuantConfig.from_dict(c.to_dict()) == c
    pairs = GQSAQuantConfig(pattern="pairs", block_rows=4)
    assert pairs.to_dict()["pattern"] == "pairs" and GQSAQuantConfig.from_dict(pairs.to_dict()) == pairs
    # Checkpoints written before the pattern existed have no key: the free pattern.
    old = pairs.to_dict()
    del old["pattern"]
    assert GQSAQuantConfig.from_dict(old).pattern == "groups"
    assert c.is_quantized("model.layers.3.mlp.down_proj")
    assert not c.is_quantized("a.b") and not c.is_quantized("lm_head")


def test_modules_to_not_convert_names_layers_or_whole_parts():
    c = GQSAQuantConfig(modules_to_not_convert=("vision_tower", "model.layers.1.mlp.down_proj"))
    assert not c.is_quantized("vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert not c.is_quantized("model.layers.1.mlp.down_proj")
    # A module's name, not any string it starts with.
    assert c.is_quantized("model.layers.11.mlp.down_proj")
    assert c.is_quantized("vision_tower_2.q_proj")


def test_layer_with_no_kept_groups():
    fmt = LayerFormat(4, 16, 1)
    keep = torch.zeros(8, 4, dtype=torch.bool)
    layer = pack_layer(torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 4), torch.zeros(8, 4), keep, fmt)
    layer.validate()
    assert layer.nnz == 0 and torch.equal(dequantize(layer), torch.zeros(8, 64))


def index_of(keep: torch.Tensor, fmt: LayerFormat = LayerFormat()) -> GQSALayer:
    """A layer whose row blocks keep the groups ``keep`` [N/R, K/G] marks (values irrelevant)."""
    NB, KG = keep.shape
    N, K = NB * fmt.block_rows, KG * fmt.group_size
    return pack_layer(torch.zeros(N, K, dtype=torch.uint8), torch.ones(N, KG), torch.zeros(N, KG), keep, fmt)


def pair_keep(NB: int, KG: int, seed: int = 0) -> torch.Tensor:
    """One group of each aligned pair, chosen at random, in every row block."""
    odd = torch.rand(NB, KG // 2, generator=torch.Generator().manual_seed(seed)) < 0.5
    return torch.stack([~odd, odd], 2).reshape(NB, KG)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU"))])
def test_is_pair_pattern_accepts_one_group_of_each_pair(device):
    layer = index_of(pair_keep(7, 10)).to(device)
    assert is_pair_pattern(layer.row_ptr, layer.col_idx, 10)
    assert is_pair_pattern(layer.row_ptr.long(), layer.col_idx.long(), 10)  # any integer dtype
    # Row blocks: the plugin asks about the single rows they expand into.
    blocks = index_of(pair_keep(5, 300, seed=1), LayerFormat(4, 16, 3)).to(device)  # int16 col_idx
    assert is_pair_pattern(blocks.row_ptr, blocks.col_idx, 300)
    single = blocks.single_rows()
    assert is_pair_pattern(single.row_ptr, single.col_idx, 300)
    # No rows: nothing breaks the pattern.
    assert is_pair_pattern(torch.zeros(1, dtype=torch.int32, device=device),
                           torch.zeros(0, dtype=torch.uint8, device=device), 10)


def both_of_a_pair(keep):
    keep[2, 4:6], keep[2, 6:8] = True, False  # as many groups as pairs, but not one of each
    return keep


def missing_pair(keep):
    keep[3, 2:4] = False
    return keep


def empty_row(keep):
    keep[0] = False
    return keep


def full_row(keep):
    keep[6] = True
    return keep


@pytest.mark.parametrize("change", [both_of_a_pair, missing_pair, empty_row, full_row])
def test_is_pair_pattern_rejects_a_row_that_breaks_it(change):
    layer = index_of(change(pair_keep(7, 10)))
    layer.validate()
    assert not is_pair_pattern(layer.row_ptr, layer.col_idx, 10)


def test_is_pair_pattern_rejects_odd_or_mismatched_inputs():
    odd = pair_keep(4, 10)[:, :9]  # 9 group columns: the last has no partner
    layer = index_of(odd)
    assert not is_pair_pattern(layer.row_ptr, layer.col_idx, 9)
    good = index_of(pair_keep(4, 10))
    assert not is_pair_pattern(good.row_ptr, good.col_idx, 12)  # told of more group columns
    assert not is_pair_pattern(good.row_ptr, good.col_idx, 0)
    assert not is_pair_pattern(torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.uint8), 10)
    assert not is_pair_pattern(good.row_ptr, good.col_idx[:-1], 10)
