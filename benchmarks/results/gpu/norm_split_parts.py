# SPDX-License-Identifier: Apache-2.0
"""Where the split norm's time goes (csrc/README.md, "The RMSNorm split"), one GPU, one token.

Each GEMV of the split alone, in CUDA graphs of 16 layer copies, us per call:
  consumer  gqsa_sliced_gemv_from_stats (g, the stats of P pieces) against the plain GEMV
            of an fp16 x; P = 264 (the producer's pieces on an H100), 128 (one per slice), 1;
  producer  gqsa_sliced_gemv_add_stats against the plain GEMV.

    python benchmarks/results/gpu/norm_split_parts.py --out OUT.json
"""

from __future__ import annotations

import argparse
import json

import torch

from norm_split_check import EPS, LAYERS, PAIRS, graph_time
from vllm_gqsa import ops  # noqa: F401
from vllm_gqsa.format import LayerFormat
from vllm_gqsa.kernels import cuda
from vllm_gqsa.kernels.cuda_format import to_kernel_format
from vllm_gqsa.random_layers import random_gqsa_layer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ok, reason = cuda.available()
    assert ok, reason
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    fmt = LayerFormat(4, 16, 1)
    results = {"device": props.name, "torch": torch.__version__, "layers_per_graph": LAYERS, "us_per_call": {}}

    def layers(N, K, seed):
        out = []
        for i in range(LAYERS):
            t = to_kernel_format(random_gqsa_layer(N, K, fmt, 0.5, seed=seed + i, device="cuda"), 2 * sms,
                                 layout="sliced", num_sms=sms)
            t["warps"] = t.pop("sell_warps").tolist()
            out.append(t)
        return out

    def gemv(x, t, N):
        return torch.ops.vllm_gqsa.gqsa_sliced_gemv(x, t["sell_rows"], t["schedule"], t["codes"], t["meta"],
                                                    t["slice_counters"], N, t["warps"])

    g = torch.Generator(device="cuda").manual_seed(0)
    for name, ((N1, K1), (N2, K2)) in PAIRS[args.model].items():
        first, second = layers(N1, K1, 0), layers(N2, K2, 100)
        x1 = torch.randn(1, K1, device="cuda", generator=g).half()
        residual = torch.randn(1, N1, device="cuda", generator=g).half()
        w = (torch.rand(N1, device="cuda", generator=g) + 0.5).half()
        x2 = torch.randn(1, K2, device="cuda", generator=g).half()
        gw = torch.randn(1, K2, device="cuda", generator=g).half()
        w2 = (torch.rand(K2, device="cuda", generator=g) + 0.5).half()
        row = {}
        row["producer plain"] = graph_time(lambda: [gemv(x1, t, N1) for t in first]) / LAYERS
        row["producer add_stats"] = graph_time(lambda: [torch.ops.vllm_gqsa.gqsa_sliced_gemv_add_stats(
            x1, residual, w, t["sell_rows"], t["schedule"], t["codes"], t["meta"], t["slice_counters"], N1,
            t["warps"]) for t in first]) / LAYERS
        row["consumer plain"] = graph_time(lambda: [gemv(x2, t, N2) for t in second]) / LAYERS
        for pieces in (264, 128, 1):
            stats = torch.rand(1, pieces, device="cuda", generator=g) * (K2 / pieces)
            row[f"consumer from_stats P={pieces}"] = graph_time(lambda: [torch.ops.vllm_gqsa.gqsa_sliced_gemv_from_stats(
                gw, stats, EPS, x2, w2, t["sell_rows"], t["schedule"], t["codes"], t["meta"], t["slice_counters"],
                N2, t["warps"]) for t in second]) / LAYERS
        row["consumer plain again"] = graph_time(lambda: [gemv(x2, t, N2) for t in second]) / LAYERS
        row = {k: round(v, 3) for k, v in row.items()}
        results["us_per_call"][f"{args.model} {name}"] = row
        print(args.model, name, row, flush=True)
        del first, second
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
