# SPDX-License-Identifier: Apache-2.0
"""The second-order prune-and-quantize solver for one layer."""

import pytest
import torch

from converters.solver import accumulate_hessian, group_params, rtn_layer, solve_layer
from vllm_gqsa.format import GQSAFormatError, LayerFormat, is_pair_pattern
from vllm_gqsa.reference import dequantize


def correlated_inputs(n, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K**0.5 + torch.eye(K)
    scale = torch.rand(K, generator=g) * 3 + 0.1  # channels of very different magnitude
    return (torch.randn(n, K, generator=g) @ mix) * scale


def objective(W, Wq, X):
    return float(((X @ (W - Wq).T) ** 2).sum())


@pytest.mark.parametrize("fmt", [LayerFormat(4, 16, 1), LayerFormat(4, 32, 2), LayerFormat(2, 16, 1)],
                         ids=str)
def test_solver_output_is_its_packed_layer(fmt):
    N, K = 48, 320
    X = correlated_inputs(512, K)
    W = torch.randn(N, K)
    H, _ = accumulate_hessian(None, X, 0)
    res = solve_layer(W, H, fmt, sparsity=0.5)
    res.layer.validate()
    torch.testing.assert_close(dequantize(res.layer), res.weight, rtol=0, atol=1e-6)


def test_solver_prunes_the_requested_fraction_with_uneven_rows():
    N, K, fmt = 64, 256, LayerFormat(4, 16, 1)
    X = correlated_inputs(512, K)
    W = torch.randn(N, K) * torch.linspace(0.1, 2, N)[:, None]  # rows of different importance
    H, _ = accumulate_hessian(None, X, 0)
    layer = solve_layer(W, H, fmt, sparsity=0.5).layer
    assert layer.nnz == N * K // 16 // 2
    per_row = layer.row_ptr[1:] - layer.row_ptr[:-1]
    assert per_row.max() > per_row.min()  # the mask is chosen per matrix, not per row


def test_solver_beats_magnitude_pruning_and_rounding():
    """Hessian-aware selection and error compensation must lower the layer's output error."""
    N, K, fmt = 64, 256, LayerFormat(4, 16, 1)
    X = correlated_inputs(1024, K, seed=3)
    # Seeded: the ratio is 0.67-0.70 over weight seeds 0-7, so an unseeded weight put a 0.7 bound
    # at the mercy of whichever tests ran before.
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    H, _ = accumulate_hessian(None, X, 0)
    ours = objective(W, solve_layer(W, H, fmt, 0.5).weight, X)
    rtn = objective(W, dequantize(rtn_layer(W, fmt, 0.5)), X)
    assert ours < 0.75 * rtn


def kept_groups(layer):
    """The layer's kept groups as a dense bool [N/R, K/G] mask."""
    keep = torch.zeros(layer.out_features // layer.fmt.block_rows, layer.num_group_cols, dtype=torch.bool)
    keep[layer.block_ids(), layer.col_idx.long()] = True
    return keep


def assert_one_group_of_each_pair(layer):
    pairs = kept_groups(layer).reshape(layer.out_features // layer.fmt.block_rows, -1, 2)
    assert torch.all(pairs.sum(2) == 1)
    assert is_pair_pattern(layer.row_ptr, layer.col_idx, layer.num_group_cols)
    single = layer.single_rows()  # what the plugin checks, whatever the row blocks
    assert is_pair_pattern(single.row_ptr, single.col_idx, single.num_group_cols)


# G = 128: the solver's column block (128 columns) would hold one group, so it takes two.
@pytest.mark.parametrize("fmt", [LayerFormat(4, 16, 1), LayerFormat(4, 32, 2), LayerFormat(2, 128, 1)],
                         ids=str)
def test_solver_pairs_pattern_keeps_one_group_of_each_pair(fmt):
    N, K = 24 * fmt.block_rows, 768
    X = correlated_inputs(512, K, seed=1)
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    H, _ = accumulate_hessian(None, X, 0)
    res = solve_layer(W, H, fmt, 0.5, pattern="pairs")
    res.layer.validate()
    torch.testing.assert_close(dequantize(res.layer), res.weight, rtol=0, atol=1e-6)
    assert_one_group_of_each_pair(res.layer)
    # The free pattern, on the same layer, is not one by chance.
    free = solve_layer(W, H, fmt, 0.5).layer
    assert not is_pair_pattern(free.row_ptr, free.col_idx, free.num_group_cols)


def test_solver_pairs_pattern_costs_little_more_than_the_free_one():
    """The pairs pattern is a restriction of the free one: a somewhat larger output error."""
    N, K, fmt = 64, 256, LayerFormat(4, 16, 1)
    X = correlated_inputs(1024, K, seed=3)
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    H, _ = accumulate_hessian(None, X, 0)
    free = objective(W, solve_layer(W, H, fmt, 0.5).weight, X)
    pairs = objective(W, solve_layer(W, H, fmt, 0.5, pattern="pairs").weight, X)
    rtn = objective(W, dequantize(rtn_layer(W, fmt, 0.5, pattern="pairs")), X)
    assert free < pairs < rtn


@pytest.mark.parametrize("fmt", [LayerFormat(4, 16, 1), LayerFormat(4, 16, 3)], ids=str)
def test_rtn_pairs_pattern_keeps_the_larger_group_of_each_pair(fmt):
    N, K, G, R = 6 * fmt.block_rows, 128, fmt.group_size, fmt.block_rows
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(2))
    W[:R, G:2 * G] = W[:R, :G]  # a tie in row block 0's first pair: the even group stays
    layer = rtn_layer(W, fmt, 0.5, pattern="pairs")
    layer.validate()
    assert_one_group_of_each_pair(layer)
    norms = W.reshape(N // R, R, K // G, G).pow(2).sum((1, 3)).reshape(N // R, -1, 2)
    expected = torch.stack([norms[..., 0] >= norms[..., 1], norms[..., 1] > norms[..., 0]], 2)
    assert torch.equal(kept_groups(layer), expected.reshape(N // R, -1))
    assert kept_groups(layer)[0, 0]


def test_pattern_groups_is_the_default_and_prunes_freely():
    N, K, fmt = 32, 256, LayerFormat(4, 16, 1)
    X = correlated_inputs(256, K)
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(4))
    H, _ = accumulate_hessian(None, X, 0)
    a, b = solve_layer(W, H, fmt, 0.5), solve_layer(W, H, fmt, 0.5, pattern="groups")
    assert all(torch.equal(x, y) for x, y in zip(a.layer.tensors().values(), b.layer.tensors().values()))
    assert torch.equal(a.weight, b.weight)
    assert all(torch.equal(x, y) for x, y in zip(rtn_layer(W, fmt, 0.5).tensors().values(),
                                                  rtn_layer(W, fmt, 0.5, pattern="groups").tensors().values()))


def test_pairs_pattern_refuses_what_it_cannot_do():
    fmt, H = LayerFormat(4, 16, 1), torch.eye(48)
    W = torch.randn(8, 48)  # 3 groups of 16: not whole pairs
    with pytest.raises(GQSAFormatError, match="input size 48 is not a multiple of 2 \\* group_size = 32"):
        solve_layer(W, H, fmt, 0.5, pattern="pairs")
    with pytest.raises(GQSAFormatError, match="input size 48"):
        rtn_layer(W, fmt, 0.5, pattern="pairs")
    with pytest.raises(GQSAFormatError, match="sparsity must be 0.5, got 0.3"):
        solve_layer(torch.randn(8, 64), torch.eye(64), fmt, 0.3, pattern="pairs")
    with pytest.raises(GQSAFormatError, match="pattern='2:4' is not supported"):
        rtn_layer(torch.randn(8, 64), fmt, 0.5, pattern="2:4")


def test_hessian_running_mean_matches_batch():
    X = torch.randn(100, 16)
    H1, n = accumulate_hessian(None, X[:30], 0)
    H1, n = accumulate_hessian(H1, X[30:], n)
    torch.testing.assert_close(H1, 2 * X.T @ X / 100)
    assert n == 100


def test_group_params_cover_zero_and_are_fp16_exact():
    w = torch.tensor([[0.5, 0.7, 0.9, 1.0], [-1.0, -0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]])
    s, z = group_params(w, 4, search=False)
    assert torch.equal(s, s.half().float())
    q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, 15)
    deq = s[:, None] * (q - z[:, None])
    assert torch.all((deq - w).abs() <= s[:, None] / 2 + 1e-7)


def test_solver_ops_benchmark_counts_and_times(tmp_path):
    """benchmarks/solver_ops.py, behind benchmarks/results/solver_ops.json, on a small layer."""
    import json
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from solver_ops import main

    out = tmp_path / "ops.json"
    assert main(["--shapes", "32x64", "--reps", "1", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["layers"]
    # At least the per-column update of every column, and far fewer than a loop over clipping factors.
    assert (r["N"], r["K"]) == (32, 64) and 10 < r["ops_per_column"] < 30 and r["cpu_seconds"] > 0
