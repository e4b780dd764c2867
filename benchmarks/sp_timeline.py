# SPDX-License-Identifier: Apache-2.0
"""Where a launch of the pair pattern's sparse-tensor-core kernel (``sp_kernel``) spends its fixed
cost: per-CTA timestamps of back-to-back launches in one CUDA graph, as vLLM runs decode.

The timestamps come from ``benchmarks/results/gpu/sp_timeline_experiment.patch``: thread 0 of every
CTA records ``%globaltimer`` at entry, when the first chunk has landed, when its loop is done and
at the end (after the finish, where the last split of a tile sums the others), with its SM and a
sequence number counted from the last reset; two C functions zero the array and copy it out. Build
the kernels with the patch applied (``git apply`` it, then ``pip install --no-build-isolation -e .``
or ``benchmarks/prebuilt_kernels.sh``), then::

    python benchmarks/sp_timeline.py --tokens 2,16 --out benchmarks/results/gpu/sp_timeline_h100.json

Each Llama-2-7B layer shape is timed as ``benchmarks/kernel_speed.py --pattern pairs`` times it
(random pair-pattern layers, copies enough to rotate past L2, one graph calling each once). Calls
do not overlap (no programmatic dependent launch), so call c's CTAs hold sequence numbers c * G ..
(c + 1) * G - 1 for a grid of G CTAs; the array keeps the last calls whole. Per call:

- ``gap_us``: from the previous call's last CTA end to this call's first CTA entry (launch);
- ``entry_spread_us``: first to last CTA entry (more than one wave shows here);
- ``first_chunk_us``: a CTA's entry to its first chunk landing (the DRAM round trip and ramp);
- ``loop_us``: first chunk to loop done; ``finish_us``: loop done to end (the split sums);
- ``tail_us``: from the median CTA end to the last; ``span_us``: first entry to last end.

The instrumentation costs a little, so compare timelines with timelines and speeds with
uninstrumented builds."""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from statistics import fmean as mean
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_speed  # noqa: E402
from kernel_speed import capture_graph, copies_for, gqsa_bytes, make_gqsa, replay_us  # noqa: E402

kernel_speed.PAIRS = True  # the pair pattern, which sp_kernel serves

from timelines import SHAPES, instrumented_library, quantiles  # noqa: E402

from vllm_gqsa.kernels import cuda  # noqa: E402

SLOTS, FIELDS = 16384, 8  # the patch's gqsa_sp_timeline[kSpTimelineSlots][8]
ENTRY, FIRST, LOOP, END, SM, TILE, SPLIT, SEQ = range(FIELDS)


def calls_of(t: torch.Tensor, ctas: int, n_calls: int) -> list[torch.Tensor]:
    """The records of each whole call the array still holds, oldest first, times in ns since the
    first kept call's first entry (int64: globaltimer values are near 2^61, where a double cannot
    tell apart times 256 ns apart)."""
    t = t[t[:, ENTRY] != 0]
    seq = t[:, SEQ]
    if seq.numel() and int(seq.max()) + 1 != ctas * n_calls:
        sys.exit(f"sp_timeline: {int(seq.max()) + 1} CTA records for {n_calls} calls of {ctas} CTAs: "
                 "another kernel launch went through sp_kernel")
    first_kept = max(0, n_calls - SLOTS // ctas)  # the last calls that fit whole; older ones are overwritten
    calls = [t[(seq // ctas) == c] for c in range(first_kept, n_calls)]
    calls = [c for c in calls if c.shape[0] == ctas]
    if not calls:
        sys.exit(f"sp_timeline: a grid of {ctas} CTAs does not fit the timeline's {SLOTS} records")
    t0 = calls[0][:, ENTRY].min()
    return [torch.cat([c[:, :SM] - t0, c[:, SM:]], dim=1) for c in calls]


def by_sm_load(c: torch.Tensor) -> dict[int, dict[str, float]]:
    """CTAs grouped by how many CTAs of the call their SM ran: how many, their mean loop time and
    their mean and latest end (us since the call's first entry). Where SMs running more CTAs end
    later, the tail is uneven load, which evenly shared work would take back."""
    load = torch.bincount(c[:, SM])[c[:, SM]]
    t0 = c[:, ENTRY].min()
    out = {}
    for n in torch.unique(load).tolist():
        g = c[load == n]
        out[n] = {"ctas": int(g.shape[0]), "loop_us": float((g[:, LOOP] - g[:, FIRST]).double().mean()) / 1e3,
                  "end_us": float((g[:, END] - t0).double().mean()) / 1e3,
                  "last_end_us": float(g[:, END].max() - t0) / 1e3}
    return out


def summarize(calls: list[torch.Tensor]) -> dict:
    us = lambda v: float(v) / 1e3  # noqa: E731
    per_call = []
    for i, c in enumerate(calls):
        ends = c[:, END].sort().values
        ran = c[:, FIRST] != 0  # CTAs with at least one chunk
        per_call.append({
            "gap_us": us(c[:, ENTRY].min() - calls[i - 1][:, END].max()) if i else None,
            "entry_spread_us": us(c[:, ENTRY].max() - c[:, ENTRY].min()),
            "first_chunk_us": quantiles([us(v) for v in (c[ran, FIRST] - c[ran, ENTRY]).tolist()]),
            "loop_us": quantiles([us(v) for v in (c[ran, LOOP] - c[ran, FIRST]).tolist()]),
            "finish_us": quantiles([us(v) for v in (c[:, END] - c[:, LOOP]).tolist()]),
            "tail_us": us(ends[-1] - ends[len(ends) // 2]),
            "span_us": us(c[:, END].max() - c[:, ENTRY].min()),
            "sms": int(torch.unique(c[:, SM]).numel()),
            "max_ctas_per_sm": int(torch.bincount(c[:, SM]).max()),
            "by_ctas_on_sm": by_sm_load(c),
        })
    keys = ("entry_spread_us", "tail_us", "span_us")
    out = {k: mean([p[k] for p in per_call]) for k in keys}
    out["gap_us"] = mean([p["gap_us"] for p in per_call[1:]]) if len(per_call) > 1 else None
    for k in ("first_chunk_us", "loop_us", "finish_us"):
        out[k + "_p50"] = mean([p[k]["p50"] for p in per_call])
        out[k + "_max"] = mean([p[k]["p100"] for p in per_call])
    out["calls"] = per_call
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--tokens", default="2,16", help="comma-separated token counts (at most 64)")
    p.add_argument("--reps", type=int, default=10, help="graph replays for the per-call time")
    args = p.parse_args()
    lib = instrumented_library("sp_timeline", "gqsa_sp_timeline_copy", "sp_timeline_experiment.patch")
    host = torch.zeros((SLOTS, FIELDS), dtype=torch.int64)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sm_count": sms,
           "command": " ".join(sys.argv), "shapes": {}}
    ncta = cuda.default_num_ctas()  # the GEMV's schedule, which make_gqsa also builds
    for name, (N, K) in SHAPES.items():
        first = make_gqsa(N, K, 0.5, ncta)
        layers = [first] + [make_gqsa(N, K, 0.5, ncta) for _ in range(copies_for(gqsa_bytes(first, 1, K, "sp")) - 1)]
        for M in (int(m) for m in args.tokens.split(",")):
            x = torch.randn(M, K, dtype=torch.float16, device="cuda")
            calls = [lambda t=t: cuda.sp(x, t, N) for t in layers]
            g = capture_graph(calls)
            us = replay_us(g, len(calls), args.reps)
            if lib.gqsa_sp_timeline_reset() != 0:
                sys.exit("sp_timeline: resetting the timeline failed")
            g.replay()
            torch.cuda.synchronize()
            if lib.gqsa_sp_timeline_copy(ctypes.c_void_p(host.data_ptr())) != 0:
                sys.exit("sp_timeline: copying the timeline failed")
            t = host.clone()
            seqs = t[t[:, ENTRY] != 0, SEQ]
            ctas = int(seqs.max() + 1) // len(calls)
            s = summarize(calls_of(t, ctas, len(calls)))
            s.update({"N": N, "K": K, "M": M, "ctas": ctas, "copies": len(layers), "graph_us_per_call": us})
            out["shapes"][f"{name}_m{M}"] = s
            print(f"{name:8s} M={M:<3d} {us:6.2f} us/call ({ctas} CTAs): gap {s['gap_us']:.2f}, span "
                  f"{s['span_us']:.2f} (entries over {s['entry_spread_us']:.2f}; first chunk p50 "
                  f"{s['first_chunk_us_p50']:.2f} max {s['first_chunk_us_max']:.2f}; loop p50 {s['loop_us_p50']:.2f} "
                  f"max {s['loop_us_max']:.2f}; finish p50 {s['finish_us_p50']:.2f} max {s['finish_us_max']:.2f}; "
                  f"tail {s['tail_us']:.2f})", flush=True)
            loads = s["calls"][-1]["by_ctas_on_sm"]
            print("         last call, by CTAs on the SM: " + "; ".join(
                f"{n}: {v['ctas']} CTAs, loop {v['loop_us']:.2f}, end {v['end_us']:.2f} (last {v['last_end_us']:.2f})"
                for n, v in sorted(loads.items())), flush=True)
            del g, calls
        del layers
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for s in out["shapes"].values():
        s["calls"] = s["calls"][-4:]  # the last calls in full; the means cover all kept calls
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
