# SPDX-License-Identifier: Apache-2.0
"""Where one GEMV call's time goes, warp by warp: the one-token GEMV on each linear shape of a
decoder layer, with per-warp timestamps from an instrumented build of the kernels.

The timestamps come from ``benchmarks/results/gpu/gemv_timeline_experiment.patch``, which makes
every warp record ``%globaltimer`` and ``clock64`` at six points (entry, schedule read, x copied,
first batch's math done, loop done, end) into a device array, and exports two C functions that
zero it and copy it out. Build the kernels with the patch applied (``git apply`` it, then ``pip
install --no-build-isolation -e .`` on the GPU machine), then::

    python benchmarks/gemv_timeline.py --out benchmarks/results/gpu/gemv_timeline_h200.json

Each shape is timed as ``benchmarks/kernel_speed.py`` times it (random layers at 50% density, enough
copies to rotate past L2, one CUDA graph calling each once); the timeline is that of the graph's
last call, whose predecessor is the same kernel on another copy, and of one call alone after an
L2 flush. ``loop_done_tail`` says how much of each call's tail dynamic work shares could save at
most (see ``tail``). The instrumentation itself costs a few percent, so compare timelines with
timelines and speeds with uninstrumented builds."""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_speed  # noqa: E402
from kernel_speed import capture_graph, copies_for, gqsa_bytes, make_gqsa, replay_us  # noqa: E402

kernel_speed.LAYOUT = "rows"  # the patch instruments the row layout's task-centric GEMV

from timelines import SHAPES, instrumented_library, quantiles  # noqa: E402

from vllm_gqsa.kernels import cuda  # noqa: E402

SLOTS, FIELDS = 8192, 16  # the patch's gqsa_timeline[kTimelineSlots][16]
# Field i (0..5) is the globaltimer at event i, 8 + i its clock64; 6 is the SM, 7 the warp's cycles.
EVENTS = ("entry", "schedule_read", "x_copied", "first_batch_done", "loop_done", "end")


def tail(t: torch.Tensor) -> dict | None:
    """How much of a call's tail even shares would take back, from the loop-done times (µs) of the
    warps with groups: the last warp's, and the latest mean over the warps of one CTA, of one SM,
    and of the whole grid. A warp's work is fixed by the schedule, so if the warps of a CTA (an SM,
    the grid) could hand work to each other, they would finish about at their mean: the difference
    to the last warp is what dynamic shares at that level could save at most."""
    slot = torch.arange(t.shape[0])
    ran = (t[:, 0] != 0) & (t[:, 3] != 0)
    if not ran.any():
        return None
    t0 = t[t[:, 0] != 0, 0].min()  # the first warp's start, as in summarize
    done = (t[ran, 4] - t0).double() / 1e3
    cta, sm = slot[ran] // 8, t[ran, 6]  # the patch's slot is blockIdx.x * kWarps + warp

    def latest_mean(key: torch.Tensor) -> float:
        _, idx = torch.unique(key, return_inverse=True)
        sums = torch.zeros(int(idx.max()) + 1, dtype=torch.float64).index_add_(0, idx, done)
        return float((sums / torch.bincount(idx)).max())

    return {"last_loop_done_us": float(done.max()), "latest_cta_mean_us": latest_mean(cta),
            "latest_sm_mean_us": latest_mean(sm), "grid_mean_us": float(done.mean())}


def summarize(t: torch.Tensor) -> dict:
    """Per-warp intervals of one call: `t` is the copied array, rows of warps that ran."""
    loop_tail = tail(t)
    t = t[t[:, 0] != 0]
    has = t[:, 3] != 0  # warps with groups (the others skip the loop)
    # Nanoseconds since the first warp's start, taken in int64: globaltimer values are near 2^61,
    # where a double cannot tell apart times 256 ns apart.
    t0 = t[:, 0].min()
    t = torch.cat([t[:, :6] - t0, t[:, 6:]], dim=1).double()
    cyc = lambda a, b, rows=slice(None): quantiles((t[rows, 8 + b] - t[rows, 8 + a]).tolist())  # noqa: E731
    return {
        "warps": int(t.shape[0]),
        "sms": int(torch.unique(t[:, 6]).numel()),
        "span_us": float(t[:, 5].max() / 1e3),
        "warp_start_us": quantiles((t[:, 0] / 1e3).tolist()),
        "warp_end_us": quantiles((t[:, 5] / 1e3).tolist()),
        "cycles_entry_to_schedule_read": cyc(0, 1),
        "cycles_entry_to_x_copied": cyc(0, 2),
        "cycles_entry_to_first_batch_done": cyc(0, 3, has),
        "cycles_first_batch_to_loop_done": cyc(3, 4, has),
        "cycles_loop_done_to_end": cyc(4, 5, has),
        "cycles_entry_to_end": quantiles(t[:, 7].tolist()),
        "loop_done_tail": loop_tail,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--reps", type=int, default=10, help="graph replays for the per-call time")
    args = p.parse_args()
    lib = instrumented_library("gemv_timeline", "gqsa_timeline_copy", "gemv_timeline_experiment.patch")
    host = torch.zeros((SLOTS, FIELDS), dtype=torch.int64)

    def grab() -> torch.Tensor:
        torch.cuda.synchronize()
        if lib.gqsa_timeline_copy(ctypes.c_void_p(host.data_ptr())) != 0:
            sys.exit("gemv_timeline: copying the timeline failed")
        return host.clone()

    ncta = cuda.default_num_ctas()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "num_ctas": ncta,
           "command": " ".join(sys.argv), "events": EVENTS, "shapes": {}}
    for name, (N, K) in SHAPES.items():
        first = make_gqsa(N, K, 0.5, ncta)
        layers = [first] + [make_gqsa(N, K, 0.5, ncta) for _ in range(copies_for(gqsa_bytes(first, 1, K)) - 1)]
        x = torch.randn(1, K, dtype=torch.float16, device="cuda")
        calls = [lambda t=t: cuda.gemv(x, t, N) for t in layers]
        g = capture_graph(calls)
        us = replay_us(g, len(calls), args.reps)
        lib.gqsa_timeline_reset()
        g.replay()
        in_graph = summarize(grab())
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        lib.gqsa_timeline_reset()
        flush.fill_(1)
        cuda.gemv(x, layers[0], N)
        alone = summarize(grab())
        del flush
        out["shapes"][name] = {"N": N, "K": K, "copies": len(layers), "graph_us_per_call": us,
                               "graph_last_call": in_graph, "alone_after_l2_flush": alone}
        c = in_graph
        print(f"{name:8s} {us:6.2f} us/call, span {c['span_us']:5.2f} us; cycles (p50) to "
              f"x copied {c['cycles_entry_to_x_copied']['p50']:.0f}, first batch "
              f"{c['cycles_entry_to_first_batch_done']['p50']:.0f}, loop {c['cycles_first_batch_to_loop_done']['p50']:.0f}, "
              f"end {c['cycles_loop_done_to_end']['p50']:.0f}; loop done: last {c['loop_done_tail']['last_loop_done_us']:.2f} "
              f"us, latest CTA mean {c['loop_done_tail']['latest_cta_mean_us']:.2f}, latest SM mean "
              f"{c['loop_done_tail']['latest_sm_mean_us']:.2f}, grid mean {c['loop_done_tail']['grid_mean_us']:.2f}",
              flush=True)
        del layers, calls, g
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
