# SPDX-License-Identifier: Apache-2.0
"""Where a tensor-core kernel's warps spend their time, by region, from Nsight Compute's per-SASS
export of one profiled launch (the SourceCounters section):

    ncu --import REP --page source --csv --print-source sass > KERNEL_sass.csv
    python benchmarks/ncu_regions.py plain_sass.csv variant_sass.csv [--top 12]

The regions are cut at the first and the last HMMA instruction: the prologue (up to the first
chunk's arithmetic), the main loop, and the finish (the sums' exchange, K-split sums and stores).
For each: warp-stall samples, their share, instructions executed, and the largest stall reasons;
with --top N, the N instructions of each region with the most samples."""

from __future__ import annotations

import argparse
import collections
import csv

SAMPLES = "Warp Stall Sampling (All Samples)"


def load(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = next(r for r in rows if "Address" in r and "Source" in r)
    ix = {h: i for i, h in enumerate(header)}
    stalls = [h for h in header if h.startswith("stall_") and "(Not Issued)" not in h]
    out = []
    for r in rows[rows.index(header) + 1:]:
        if len(r) != len(header):
            continue
        out.append({"src": r[ix["Source"]].strip(), "samples": int(r[ix[SAMPLES]] or 0),
                    "executed": int(r[ix["Instructions Executed"]] or 0),
                    "stalls": {h[len("stall_"):]: int(r[ix[h]] or 0) for h in stalls}})
    return out


def regions(ins: list[dict]) -> dict[str, list[dict]]:
    mma = [i for i, x in enumerate(ins) if "HMMA" in x["src"]]
    if not mma:
        raise SystemExit("no HMMA instruction: not a tensor-core kernel's export")
    return {"prologue": ins[:mma[0]], "loop": ins[mma[0]:mma[-1] + 1], "finish": ins[mma[-1] + 1:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("csv", nargs="+")
    p.add_argument("--top", type=int, default=0)
    a = p.parse_args()
    for path in a.csv:
        ins = load(path)
        total = sum(x["samples"] for x in ins) or 1
        print(f"{path}: {total} samples, {len(ins)} instructions")
        for name, part in regions(ins).items():
            samples = sum(x["samples"] for x in part)
            stalls = collections.Counter()
            for x in part:
                stalls.update(x["stalls"])
            top = ", ".join(f"{k} {v}" for k, v in stalls.most_common(4))
            print(f"  {name:8s} {samples:6d} samples ({100 * samples / total:4.1f}%), "
                  f"{sum(x['executed'] for x in part):9d} warp instructions; largest stalls: {top}")
            for x in sorted(part, key=lambda x: -x["samples"])[:a.top]:
                print(f"      {x['samples']:5d}  {x['src'][:70]}")


if __name__ == "__main__":
    main()
