# SPDX-License-Identifier: Apache-2.0
"""Re-fit the sliced GEMV's warps rule to measured times (CPU only; reads kernel_speed results).

``cuda_format.sliced_warps`` picks 4, 8 or 16 warps per CTA from a wave count with a fixed cost
per CTA of ``SLICED_FIXED_STEPS`` steps. ``kernel_speed.py --sliced-warps-sweep`` times every
sliced shape at each of the three (``gqsa_gemv_w<W>_us``) and records what the rule saw
(``sliced_pieces``, ``sliced_mean_steps``). This script replays the rule over a range of fixed
costs and reports, for each, how many (shape, M) it sends to the fastest warps count and the
total time of its picks against the fastest possible total. It changes nothing itself.

    python benchmarks/fit_sliced_warps.py RESULTS.json [RESULTS.json ...] [--out fit.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_gqsa.kernels.cuda_format import SLICED_FIXED_STEPS, wave_rule_warps  # noqa: E402

WARPS = (4, 8, 16)
FIXED_STEPS = tuple(x / 2 for x in range(0, 17))  # 0, 0.5, ..., 8 steps


def swept_rows(results: dict) -> list[dict]:
    """The rows of one kernel_speed result that carry all three warps' times and the rule's inputs."""
    rows = []
    for r in results["results"]:
        if all(f"gqsa_gemv_w{w}_us" in r for w in WARPS) and "sliced_pieces" in r:
            rows.append({"where": f"{r['model']} {r['layer']} M={r['M']}", "K": r["K"], "M": r["M"],
                         "pieces": r["sliced_pieces"], "mean_steps": r["sliced_mean_steps"],
                         "num_sms": results["sm_count"], "us": {w: r[f"gqsa_gemv_w{w}_us"] for w in WARPS}})
    return rows


def evaluate(rows: list[dict], fixed_steps: float) -> dict:
    """The rule with this fixed cost over the rows: hits, its total time, the best possible total."""
    picks = [wave_rule_warps(r["pieces"], r["mean_steps"], r["K"], r["num_sms"], r["M"],
                             fixed_steps=fixed_steps) for r in rows]
    total = sum(r["us"][w] for r, w in zip(rows, picks))
    best = sum(min(r["us"].values()) for r in rows)
    hits = sum(r["us"][w] == min(r["us"].values()) for r, w in zip(rows, picks))
    misses = [{"where": r["where"], "picked": w, "fastest": min(r["us"], key=r["us"].get),
               "lost_us": r["us"][w] - min(r["us"].values())}
              for r, w in zip(rows, picks) if r["us"][w] != min(r["us"].values())]
    return {"fixed_steps": fixed_steps, "hits": hits, "rows": len(rows), "total_us": total,
            "best_total_us": best, "over_best_pct": 100 * (total / best - 1) if best else 0.0,
            "misses": misses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="kernel_speed.py JSON files run with --sliced-warps-sweep")
    p.add_argument("--out", default=None, help="write the fit here as JSON")
    args = p.parse_args()
    rows = [row for f in args.results for row in swept_rows(json.loads(Path(f).read_text()))]
    if not rows:
        raise SystemExit("no swept rows: run kernel_speed.py with --sliced-warps-sweep on a GPU first")
    fits = [evaluate(rows, c) for c in FIXED_STEPS]
    for f in fits:
        mark = "  <- the current rule" if f["fixed_steps"] == SLICED_FIXED_STEPS else ""
        print(f"fixed cost {f['fixed_steps']:4.1f} steps: fastest in {f['hits']:3d} of {f['rows']}, "
              f"total {f['total_us']:9.2f} us, {f['over_best_pct']:5.2f}% over the best{mark}")
    best = min(fits, key=lambda f: (f["total_us"], abs(f["fixed_steps"] - SLICED_FIXED_STEPS)))
    print(f"lowest total: fixed cost {best['fixed_steps']} steps ({best['over_best_pct']:.2f}% over the best "
          f"possible picks; the current {SLICED_FIXED_STEPS} steps: "
          f"{next(f for f in fits if f['fixed_steps'] == SLICED_FIXED_STEPS)['over_best_pct']:.2f}%)")
    for m in best["misses"]:
        print(f"  miss: {m['where']}: picks {m['picked']} warps, {m['fastest']} is {m['lost_us']:.2f} us faster")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "inputs": args.results,
                                              "current_fixed_steps": SLICED_FIXED_STEPS, "fits": fits}, indent=1))


if __name__ == "__main__":
    main()
