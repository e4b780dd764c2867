# SPDX-License-Identifier: Apache-2.0
"""Experiment: would the one-token GEMV gain if a layer's weights were pulled into L2 while the
kernels before it (attention, norms) leave DRAM idle?

Two measurements, Llama-2-7B shapes, one token, random W4 S50% g16 layers in the plugin's layout:

1. Each shape's GEMV with its weights cold (copies rotated past L2, as kernel_speed.py) and hot
   (one copy, called again and again).
2. A decoder-layer sequence in one CUDA graph over distinct layers: q/k/v GEMV, a wait standing for
   rotary + attention (``torch.cuda._sleep``, one CTA, no DRAM traffic), o, a wait for the norm,
   gate/up, a wait for the activation, down, a wait for the norm. With ``prefetch``, right after
   q/k/v a second stream reads o's (and gate/up's) codes and meta with a plain streaming kernel
   that keeps them in L2 (``evict_last``), joined back at the layer's end, as a fire-and-forget
   prefetch would behave. The waits alone are timed too, so the linear layers' share is the
   difference.

    python benchmarks/results/gpu/l2_window_check.py --out l2_window_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import kernel_speed as ks  # noqa: E402
from vllm_gqsa.kernels import cuda  # noqa: E402


def keep_in_l2(tensors, scratch):
    """Read every byte of `tensors` (int32 views) so that L2 holds them: kernel_speed.py's read
    kernel with evict_last loads."""
    read = ks._read_kernel()
    for t in tensors:
        v = t.view(torch.int32).reshape(-1)
        block = 4096
        grid = (-(-v.numel() // block),)
        read[grid](v, scratch, v.numel(), BLOCK=block, EVICTION="evict_last", num_warps=8)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--attn-us", type=float, default=15.0, help="the wait after q/k/v (rotary + attention)")
    args = p.parse_args()
    num_ctas = cuda.default_num_ctas()
    shapes = ks.MODELS["llama-2-7b"]
    res = {"device": torch.cuda.get_device_properties(0).name, "torch": torch.__version__,
           "command": " ".join(sys.argv), "hot_cold": [], "sequence": {}}
    x = {name: torch.randn(1, K, device="cuda", dtype=torch.float16) for name, _, K in shapes}

    # 1. Hot against cold.
    for name, N, K in shapes:
        t0 = ks.make_gqsa(N, K, ks.DENSITY, num_ctas)
        copies = ks.copies_for(ks.gqsa_bytes(t0, 0, K))
        ts = [t0] + [ks.make_gqsa(N, K, ks.DENSITY, num_ctas) for _ in range(copies - 1)]
        cold = ks.time_graph([lambda t=t: cuda.gemv(x[name], t, N) for t in ts], args.reps)
        hot = ks.time_graph([lambda: cuda.gemv(x[name], t0, N)] * copies, args.reps)
        nbytes = t0["codes"].numel() * 4 + t0["meta"].numel() * 4
        res["hot_cold"].append({"layer": name, "N": N, "K": K, "weight_bytes": nbytes, "cold_us": cold, "hot_us": hot})
        print(f"{name:8s} cold {cold:6.2f} us  hot {hot:6.2f} us  ({nbytes / 2**20:.1f} MiB)", flush=True)
        del ts, t0

    # 2. The layer sequence.
    cyc = 20000
    sleep_us = ks.time_graph([lambda: torch.cuda._sleep(cyc)] * 20, args.reps) / cyc  # us per cycle
    waits = {"attn": args.attn_us, "norm": 2.0, "act": 1.2}
    cycles = {k: int(v / sleep_us) for k, v in waits.items()}
    layers = [{name: ks.make_gqsa(N, K, ks.DENSITY, num_ctas) for name, N, K in shapes} for _ in range(args.layers)]
    n_of = {name: N for name, N, _ in shapes}
    scratch = torch.empty(1 << 16, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()

    def sequence(prefetch: tuple, gemvs: bool = True):
        def run():
            main = torch.cuda.current_stream()
            for layer in layers:
                g = (lambda n: cuda.gemv(x[n], layer[n], n_of[n])) if gemvs else (lambda n: None)
                g("qkv")
                if prefetch:
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        keep_in_l2([layer[n][k] for n in prefetch for k in ("codes", "meta")], scratch)
                torch.cuda._sleep(cycles["attn"])
                g("o")
                torch.cuda._sleep(cycles["norm"])
                g("gate_up")
                torch.cuda._sleep(cycles["act"])
                g("down")
                torch.cuda._sleep(cycles["norm"])
                if prefetch:
                    main.wait_stream(side)
        return run

    variants = {"waits_only": sequence((), gemvs=False), "no_prefetch": sequence(()),
                "prefetch_o": sequence(("o",)), "prefetch_o_gate_up": sequence(("o", "gate_up")),
                "waits_and_o_gate_up_reads": sequence(("o", "gate_up"), gemvs=False)}
    for name, fn in variants.items():
        us = ks.time_graph([fn], args.reps) / args.layers
        res["sequence"][name] = us
        print(f"{name:28s} {us:7.2f} us per decoder layer", flush=True)
    w = res["sequence"]["waits_only"]
    for k in ("no_prefetch", "prefetch_o", "prefetch_o_gate_up"):
        res["sequence"][k + "_linear_us"] = res["sequence"][k] - w
        print(f"{k:28s} linear layers {res['sequence'][k] - w:7.2f} us per decoder layer", flush=True)
    res["waits_us"] = waits
    res["us_per_cycle"] = sleep_us
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
