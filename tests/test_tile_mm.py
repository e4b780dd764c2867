# SPDX-License-Identifier: Apache-2.0
"""The Triton tile kernel for batched decode (vllm_gqsa/kernels/tile_mm.py): its lookup tables in
torch, the kernel under Triton's CPU interpreter, and the kernel on a GPU when there is one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from test_cuda_kernels import PATTERNS, dense_reference, make_layer
from vllm_gqsa.kernels.cuda_format import to_kernel_format
from vllm_gqsa.kernels.tile_mm import tile_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def brute_force_tables(layer):
    """mask and base from the dense keep pattern, one row and one column at a time."""
    N, KG = layer.out_features, layer.in_features // layer.fmt.group_size
    KW = -(-KG // 32)
    rp, cols = layer.row_ptr.long(), layer.col_idx.long()
    mask = torch.zeros(N, KW, dtype=torch.int64)
    base = torch.zeros(N, KW, dtype=torch.int64)
    for n in range(N):
        row_cols = cols[rp[n]:rp[n + 1]].tolist()
        for w in range(KW):
            base[n, w] = rp[n] + sum(c < 32 * w for c in row_cols)
            mask[n, w] = sum(1 << (c - 32 * w) for c in row_cols if 32 * w <= c < 32 * w + 32)
    mask = torch.where(mask >= 2**31, mask - 2**32, mask)
    return mask.to(torch.int32), base.to(torch.int32)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("N,K,G", [(7, 256, 16), (33, 1040, 16), (5, 65536, 16), (9, 4096, 128)])
def test_tile_tables(pattern, N, K, G):
    layer = make_layer(N, K, G, pattern, seed=N)
    t = to_kernel_format(layer, num_ctas=2)
    mask, base = tile_tables(t["row_ptr"], t["meta"], N, K, G)
    want_mask, want_base = brute_force_tables(layer)
    assert torch.equal(mask, want_mask)
    assert torch.equal(base, want_base)


# (N, K, G, pattern, M, split_k, dtype, block_n, groups_per_step): odd sizes, every pattern, group
# columns past bit 31 of a mask word and past bit 11 of meta's column field, both output paths
# (store and atomics), the block shapes benchmarks/kernels.py times.
INTERPRETER_CASES = [
    (67, 256, 16, "uniform", 9, 1, "float32", 32, 4),
    (130, 528, 16, "empty_and_full", 16, 3, "float32", 64, 8),
    (64, 4224, 32, "heavy_block", 33, 2, "float16", 32, 8),
    (40, 256, 128, "dense", 5, 1, "float16", 64, 4),
    (19, 512, 64, "all_empty", 17, 2, "float32", 32, 4),
    (6, 65536, 16, "uniform", 12, 8, "float32", 32, 4),
]

INTERPRETER_SCRIPT = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from test_cuda_kernels import dense_reference, make_layer
from vllm_gqsa.kernels.cuda_format import to_kernel_format
from vllm_gqsa.kernels.tile_mm import tile_mm, tile_tables
out = []
for N, K, G, pattern, M, split, dtype, block_n, groups in json.loads(sys.argv[2]):
    dtype = getattr(torch, dtype)
    layer = make_layer(N, K, G, pattern, seed=M)
    t = to_kernel_format(layer, num_ctas=4)
    mask, base = tile_tables(t["row_ptr"], t["meta"], N, K, G)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
    y = tile_mm(x, t["codes"], t["meta"], mask, base, N, G, split_k=split, block_n=block_n,
                groups_per_step=groups)
    ref = x.float() @ dense_reference(layer).T
    out.append({"shape": list(y.shape), "dtype": str(y.dtype), "err": (y.float() - ref).abs().max().item(),
                "scale": ref.abs().max().item()})
print(json.dumps(out))
"""


def test_tile_mm_under_the_triton_interpreter():
    pytest.importorskip("triton")
    # The interpreter is chosen when a kernel is defined, so it runs in a process of its own.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO}
    r = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT, os.path.join(REPO, "tests"),
                        json.dumps(INTERPRETER_CASES)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for case, res in zip(INTERPRETER_CASES, results):
        N, K, G, pattern, M, split, dtype, _, _ = case
        assert res["shape"] == [M, N] and res["dtype"] == f"torch.{dtype}", case
        tol = 1e-5 if dtype == "float32" else 2e-3  # fp16 rounds the products' inputs and the output
        assert res["err"] <= tol * max(res["scale"], 1.0), (case, res)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("M", [9, 16, 33, 64])
@pytest.mark.parametrize("split_k", [1, 4])
def test_tile_mm_cuda(dtype, pattern, M, split_k):
    pytest.importorskip("triton")
    from vllm_gqsa.kernels.tile_mm import tile_mm

    N, K, G = 300, 2064, 16
    layer = make_layer(N, K, G, pattern, seed=M).to("cuda")
    t = to_kernel_format(layer, num_ctas=8)
    mask, base = tile_tables(t["row_ptr"], t["meta"], N, K, G)
    x = torch.randn(M, K, device="cuda").to(dtype)
    y = tile_mm(x, t["codes"], t["meta"], mask, base, N, G, split_k=split_k)
    ref = x.float() @ dense_reference(layer).T
    assert y.dtype == dtype and y.shape == (M, N)
    # The weights are rounded to the activation dtype before the tensor cores see them.
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(y.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)
