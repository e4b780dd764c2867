# SPDX-License-Identifier: Apache-2.0
"""A decoder layer's RMSNorm split between the sliced GEMVs around it, against the norm as a
kernel, on one GPU, at 1 to 3 tokens.

For the two places a Llama decoder layer normalizes (o -> norm -> gate/up, down -> norm -> q/k/v
of the next layer), times in CUDA graphs of 16 such pairs (weight copies that rotate past L2):
  separate  the first GEMV, vLLM's fused_add_rms_norm compiled by torch.compile (one kernel, as in
            vLLM's graphs), the second GEMV;
  split     gqsa_sliced_gemv_add_stats, then gqsa_sliced_gemv_from_stats: no norm kernel;
  gemvs     the two GEMVs alone (no norm at all: the floor).

    python benchmarks/results/gpu/norm_split_check.py --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kernel_speed import time_graph  # noqa: E402
from vllm_gqsa import ops  # noqa: E402,F401
from vllm_gqsa.format import LayerFormat  # noqa: E402
from vllm_gqsa.kernels import cuda  # noqa: E402
from vllm_gqsa.kernels.cuda_format import to_kernel_format  # noqa: E402
from vllm_gqsa.random_layers import random_gqsa_layer  # noqa: E402

# (first layer N x K, second layer N x K): the second's inputs are the first's outputs.
PAIRS = {"llama2-7b": {"o>gate_up": ((4096, 4096), (22016, 4096)), "down>qkv": ((4096, 11008), (12288, 4096))},
         "llama3-8b": {"o>gate_up": ((4096, 4096), (28672, 4096)), "down>qkv": ((4096, 14336), (6144, 4096))}}
LAYERS = 16
EPS = 1e-5
REPS = 20


def graph_us(fn) -> float:
    """us per call of fn (LAYERS layers or pairs) in a CUDA graph: kernel_speed's timing."""
    return time_graph([fn], REPS) / LAYERS


def sliced_layers(N: int, K: int, seed: int, sms: int) -> list[dict]:
    """LAYERS random W4 S50% g16 layers of N x K in the sliced layout, each its own copy (together
    they rotate past L2), with the plugin's warps per CTA."""
    out = []
    for i in range(LAYERS):
        t = to_kernel_format(random_gqsa_layer(N, K, LayerFormat(4, 16, 1), 0.5, seed=seed + i, device="cuda"),
                             2 * sms, layout="sliced", num_sms=sms)
        t["warps"] = t.pop("sell_warps").tolist()
        out.append(t)
    return out


def gemv(x, t, N):
    return torch.ops.vllm_gqsa.gqsa_sliced_gemv(x, t["sell_rows"], t["schedule"], t["codes"], t["meta"],
                                                t["slice_parts"], N, t["warps"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama2-7b,llama3-8b")
    p.add_argument("--tokens", default="1,2,3")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ok, reason = cuda.available()
    assert ok, reason
    from vllm.ir.ops.layernorm import fused_add_rms_norm

    # vLLM's native norm, compiled: one fused kernel, as torch.compile makes it in vLLM's graphs.
    norm = torch.compile(fused_add_rms_norm.impls["native"].impl_fn, dynamic=False)
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    results = {"device": props.name, "torch": torch.__version__, "command": " ".join(sys.argv),
               "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_GQSA_")},
               "pairs_per_graph": LAYERS, "us_per_pair": {}}
    for model in args.models.split(","):
        for name, ((N1, K1), (N2, K2)) in PAIRS[model].items():
            first, second = sliced_layers(N1, K1, 0, sms), sliced_layers(N2, K2, 100, sms)
            for M in (int(m) for m in args.tokens.split(",")):
                g = torch.Generator(device="cuda").manual_seed(M)
                x = torch.randn(M, K1, device="cuda", generator=g).half()
                residual = torch.randn(M, N1, device="cuda", generator=g).half()
                w = (torch.rand(N1, device="cuda", generator=g) + 0.5).half()

                def run_gemvs():
                    for t1, t2 in zip(first, second):
                        y = gemv(x, t1, N1)
                        gemv(y, t2, N2)

                def run_separate():
                    for t1, t2 in zip(first, second):
                        h, _ = norm(gemv(x, t1, N1), residual, w, EPS)
                        gemv(h, t2, N2)

                def run_split():
                    for t1, t2 in zip(first, second):
                        hr, gw, stats = torch.ops.vllm_gqsa.gqsa_sliced_gemv_add_stats(
                            x, residual, w, t1["sell_rows"], t1["schedule"], t1["codes"], t1["meta"],
                            t1["slice_parts"], N1, t1["warps"])
                        torch.ops.vllm_gqsa.gqsa_sliced_gemv_from_stats(
                            gw, stats, EPS, hr, w, t2["sell_rows"], t2["schedule"], t2["codes"], t2["meta"],
                            t2["slice_parts"], N2, t2["warps"])

                # Both ways give the same outputs up to the norm's roundings.
                t1, t2 = first[0], second[0]
                h, _ = norm(gemv(x, t1, N1), residual, w, EPS)
                y_ref = gemv(h, t2, N2)
                hr, gw, stats = torch.ops.vllm_gqsa.gqsa_sliced_gemv_add_stats(
                    x, residual, w, t1["sell_rows"], t1["schedule"], t1["codes"], t1["meta"], t1["slice_parts"],
                    N1, t1["warps"])
                y_split = torch.ops.vllm_gqsa.gqsa_sliced_gemv_from_stats(
                    gw, stats, EPS, hr, w, t2["sell_rows"], t2["schedule"], t2["codes"], t2["meta"],
                    t2["slice_parts"], N2, t2["warps"])
                rel = ((y_split.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
                row = {"warps": [t1["warps"][M - 1], t2["warps"][M - 1]], "rel_diff_split_vs_separate": rel}
                for label, fn in (("gemvs", run_gemvs), ("separate", run_separate), ("split", run_split),
                                  ("gemvs_again", run_gemvs)):
                    row[label] = round(graph_us(fn), 3)
                key = f"{model} {name} M={M}"
                results["us_per_pair"][key] = row
                print(key, row, flush=True)
            del first, second
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
