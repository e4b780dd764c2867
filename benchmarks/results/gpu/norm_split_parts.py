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

from norm_split_check import EPS, LAYERS, PAIRS, gemv, graph_us, sliced_layers
from vllm_gqsa.kernels import cuda


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    ok, reason = cuda.available()
    assert ok, reason
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    results = {"device": props.name, "torch": torch.__version__, "layers_per_graph": LAYERS, "us_per_call": {}}

    g = torch.Generator(device="cuda").manual_seed(0)
    for name, ((N1, K1), (N2, K2)) in PAIRS[args.model].items():
        first, second = sliced_layers(N1, K1, 0, sms), sliced_layers(N2, K2, 100, sms)
        x1 = torch.randn(1, K1, device="cuda", generator=g).half()
        residual = torch.randn(1, N1, device="cuda", generator=g).half()
        w = (torch.rand(N1, device="cuda", generator=g) + 0.5).half()
        x2 = torch.randn(1, K2, device="cuda", generator=g).half()
        gw = torch.randn(1, K2, device="cuda", generator=g).half()
        w2 = (torch.rand(K2, device="cuda", generator=g) + 0.5).half()
        row = {}
        row["producer plain"] = graph_us(lambda: [gemv(x1, t, N1) for t in first])
        row["producer add_stats"] = graph_us(lambda: [torch.ops.vllm_gqsa.gqsa_sliced_gemv_add_stats(
            x1, residual, w, t["sell_rows"], t["schedule"], t["codes"], t["meta"], t["slice_parts"], N1,
            t["warps"]) for t in first])
        row["consumer plain"] = graph_us(lambda: [gemv(x2, t, N2) for t in second])
        for pieces in (264, 128, 1):
            stats = torch.rand(1, pieces, device="cuda", generator=g) * (K2 / pieces)
            row[f"consumer from_stats P={pieces}"] = graph_us(lambda: [torch.ops.vllm_gqsa.gqsa_sliced_gemv_from_stats(
                gw, stats, EPS, x2, w2, t["sell_rows"], t["schedule"], t["codes"], t["meta"], t["slice_parts"],
                N2, t["warps"]) for t in second])
        row["consumer plain again"] = graph_us(lambda: [gemv(x2, t, N2) for t in second])
        row = {k: round(v, 3) for k, v in row.items()}
        results["us_per_call"][f"{args.model} {name}"] = row
        print(args.model, name, row, flush=True)
        del first, second
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
