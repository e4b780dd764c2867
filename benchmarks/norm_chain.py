# SPDX-License-Identifier: Apache-2.0
"""The linear layers of pair-pattern decoder layers at 2 to 32 tokens, back to back as in a compiled
vLLM step, with each RMSNorm as vLLM runs it (its fused_add_rms_norm kernel between o and gate/up
and between down and the next q/k/v) and split between the layers around it (gqsa_mm_add_norm_stats
-> gqsa_stats_norm_mm, what fusion.py puts in the graph). Gate/up does the SiLU-and-mul in its
kernel in both; attention is left out (o reads a fixed input).

CUDA graphs of COPIES decoder layers (each its own random weights, more than the L2 cache in all),
both variants captured and replayed in alternating rounds; us per decoder layer (median of each
round), and the split's output against the unsplit one (relative error of the last q/k/v).

    python benchmarks/norm_chain.py --tokens 2,16,32 --out norm_chain.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_speed as ks  # noqa: E402
from vllm_gqsa import ops  # noqa: E402,F401  (registers torch.ops.vllm_gqsa)

EPS = 1e-6


def args(t, n_out):
    """gqsa_mm's arguments after x for a pair layer in the row layout."""
    return (t["row_ptr"], t["codes"], t["meta"], t["schedule"], t["chunks"], n_out, 16, None, t["counters"], True)


def decoder_layers(layers, attn, residual, hidden, split: bool):
    """A function running every decoder layer's linear part once: o, norm, gate/up + SiLU-and-mul,
    down, norm, q/k/v; the last q/k/v's output."""
    from vllm import _custom_ops as vllm_ops

    mm, mm_silu = torch.ops.vllm_gqsa.gqsa_mm, torch.ops.vllm_gqsa.gqsa_mm_silu_mul
    add_stats, from_stats = torch.ops.vllm_gqsa.gqsa_mm_add_norm_stats, torch.ops.vllm_gqsa.gqsa_stats_norm_mm
    tail = (None, None, None)  # sell_rows, slice_parts, sell_warps

    def run():
        r = residual.clone()
        qkv = None
        for d in layers:
            (o, n_o), (gu, n_gu), (down, n_down), (q, n_q) = d["o"], d["gate_up"], d["down"], d["qkv"]
            if split:
                r, g, stats = add_stats(attn, r, d["w1"], *args(o, n_o))
                act = from_stats(g, stats, EPS, r, d["w1"], *args(gu, n_gu), *tail, True)
                r, g, stats = add_stats(act, r, d["w2"], *args(down, n_down))
                qkv = from_stats(g, stats, EPS, r, d["w2"], *args(q, n_q), *tail, False)
            else:
                h = mm(attn, *args(o, n_o))
                vllm_ops.fused_add_rms_norm(h, r, d["w1"], EPS)  # in place: h normalized, r the new residual
                act = mm_silu(h, *args(gu, n_gu))
                h = mm(act, *args(down, n_down))
                vllm_ops.fused_add_rms_norm(h, r, d["w2"], EPS)
                qkv = mm(h, *args(q, n_q))
        return qkv
    return run


def capture(fn):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    g.replay()
    torch.cuda.synchronize()
    return g, out


def time_parts(layers, M, hidden, copies, rounds):
    """Each op of the split alone against what it replaces, us per call (graphs of one call per
    copy of the weights): o and down plain and with the residual add and sums (add_stats), gate/up
    (with SiLU-and-mul) and q/k/v plain and from the sums, the latter also from one column of sums
    instead of hidden / 32 (what summing the columns costs), and vLLM's fused_add_rms_norm."""
    from vllm import _custom_ops as vllm_ops

    mm, mm_silu = torch.ops.vllm_gqsa.gqsa_mm, torch.ops.vllm_gqsa.gqsa_mm_silu_mul
    add_stats, from_stats = torch.ops.vllm_gqsa.gqsa_mm_add_norm_stats, torch.ops.vllm_gqsa.gqsa_stats_norm_mm
    tail = (None, None, None)
    # o, gate/up and q/k/v take hidden inputs (o's from attention, the others g), down the activation.
    attn, g, r = (torch.randn(M, hidden, device="cuda", dtype=torch.float16) for _ in range(3))
    act = torch.randn(M, layers[0]["gate_up"][1] // 2, device="cuda", dtype=torch.float16)
    w = layers[0]["w1"]
    _, _, stats = add_stats(attn, r, w, *args(*layers[0]["o"]))
    one = stats.sum(-1, keepdim=True)
    variants = {
        "o plain": lambda d: mm(attn, *args(*d["o"])),
        "o add_stats": lambda d: add_stats(attn, r, w, *args(*d["o"])),
        "down plain": lambda d: mm(act, *args(*d["down"])),
        "down add_stats": lambda d: add_stats(act, r, w, *args(*d["down"])),
        "gate_up+silu plain": lambda d: mm_silu(g, *args(*d["gate_up"])),
        "gate_up+silu from_stats": lambda d: from_stats(g, stats, EPS, r, w, *args(*d["gate_up"]), *tail, True),
        "gate_up+silu from_stats, 1 column": lambda d: from_stats(g, one, EPS, r, w, *args(*d["gate_up"]), *tail, True),
        "qkv plain": lambda d: mm(g, *args(*d["qkv"])),
        "qkv from_stats": lambda d: from_stats(g, stats, EPS, r, w, *args(*d["qkv"]), *tail, False),
        "qkv from_stats, 1 column": lambda d: from_stats(g, one, EPS, r, w, *args(*d["qkv"]), *tail, False),
        "vLLM fused_add_rms_norm": lambda d: vllm_ops.fused_add_rms_norm(g, r, w, EPS),
    }
    out = {}
    for name, fn in variants.items():
        graph, _ = capture(lambda: [fn(d) for d in layers])
        out[name] = statistics.median(ks.replay_us(graph, len(layers), 20) for _ in range(rounds))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="llama-2-7b,llama-3-8b,qwen2.5-7b")
    p.add_argument("--tokens", default="2,16,32")
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--parts", action="store_true", help="also time each op of the split alone")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    ks.PAIRS = True
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for model in a.models.split(","):
        shapes = {name: (N, K) for name, N, K in ks.MODELS[model]}
        hidden = shapes["o"][0]
        layers = []
        for _ in range(a.copies):
            d = {name: (ks.make_gqsa(N, K, 0.5, 2 * sms), N) for name, (N, K) in shapes.items()}
            d["w1"], d["w2"] = (torch.rand(hidden, device="cuda", dtype=torch.float16) + 0.5 for _ in range(2))
            layers.append(d)
        for M in map(int, a.tokens.split(",")):
            attn = torch.randn(M, hidden, device="cuda", dtype=torch.float16)
            residual = torch.randn(M, hidden, device="cuda", dtype=torch.float16)
            graphs = {split: capture(decoder_layers(layers, attn, residual, hidden, split)) for split in (False, True)}
            plain, ours = graphs[False][1].double(), graphs[True][1].double()
            rel = ((ours - plain).norm() / plain.norm()).item()
            times = {False: [], True: []}
            for _ in range(a.rounds):
                for split in (False, True):
                    times[split].append(ks.replay_us(graphs[split][0], a.copies, 20))
            r = {"model": model, "M": M, "unsplit_us": times[False], "split_us": times[True],
                 "unsplit_median_us": statistics.median(times[False]), "split_median_us": statistics.median(times[True]),
                 "relative_error": rel, "split_used_kernels": ops._sp_norm_takes(attn, layers[0]["o"][0], True, None, None)}
            if a.parts:
                r["parts_us"] = time_parts(layers, M, hidden, a.copies, 3)
                print(f"{model:11s} M={M:<3d} " + ", ".join(f"{k} {v:.2f}" for k, v in r["parts_us"].items()),
                      flush=True)
            results.append(r)
            print(f"{model:11s} M={M:<3d} decoder layer, norm as vLLM runs it {r['unsplit_median_us']:7.2f} us, "
                  f"split {r['split_median_us']:7.2f} us ({r['unsplit_median_us'] / r['split_median_us']:.3f}x), "
                  f"relative error {rel:.2e}, kernels {r['split_used_kernels']}", flush=True)
    Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv),
                                       "results": results}, indent=1))


if __name__ == "__main__":
    main()
