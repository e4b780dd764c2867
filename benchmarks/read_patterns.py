# SPDX-License-Identifier: Apache-2.0
"""Does the order in which warps stream their bytes change how fast DRAM delivers them?

The GEMV gives each warp its own contiguous range of the weights (the task-centric split), so a few
thousand warps each walk a different region at once. This reads buffers of one layer's size with
two Triton kernels that do nothing but load (16 bytes per lane per step, evict-first, summed into
one number per program): ``private``, each program streams its own contiguous range, as the GEMV's
warps do, and ``interleaved``, where at step i program p reads block i * programs + p, so the
programs running together read neighbouring addresses. Sizes: a Llama-2-7B gate/up, qkv and o
projection at W4 S50% g16 (33.8, 18.9 and 6.3 MB); grids of 2112 one-warp programs (the GEMV's
264 CTAs x 8 warps), 264 x 8 warps and 528 x 4; 2, 4 and 8 pipeline stages. Timed as kernels.py
times a layer: CUDA-graph replays over enough copies to pass the L2 cache.

    python benchmarks/read_patterns.py --out benchmarks/results/gpu/read_patterns_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_speed import time_graph  # noqa: E402


@triton.jit
def private(src, out, per_prog, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    base = p.to(tl.int64) * per_prog
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, per_prog, BLOCK):
        acc += tl.load(src + base + i + tl.arange(0, BLOCK), eviction_policy="evict_first")
    tl.store(out + p, tl.sum(acc))


@triton.jit
def interleaved(src, out, per_prog, P, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, per_prog, BLOCK):
        off = i.to(tl.int64) * P + p * BLOCK
        acc += tl.load(src + off + tl.arange(0, BLOCK), eviction_policy="evict_first")
    tl.store(out + p, tl.sum(acc))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    results = []
    for mb in (33.8, 18.9, 6.3):
        for progs, warps in ((2112, 1), (264, 8), (528, 4)):
            block = 128 * warps  # int32 per program per step: 16 bytes per lane
            n = int(mb * 1e6 / 4) // (progs * block) * (progs * block)
            per = n // progs
            copies = max(2, int(300e6 // (n * 4)))
            bufs = [torch.ones(n, dtype=torch.int32, device="cuda") for _ in range(copies)]
            out = torch.empty(progs, dtype=torch.int32, device="cuda")
            for stages in (2, 4, 8):
                for name in ("private", "interleaved"):
                    if name == "private":
                        calls = [lambda b=b: private[(progs,)](b, out, per, BLOCK=block, num_warps=warps,
                                                               num_stages=stages) for b in bufs]
                    else:
                        calls = [lambda b=b: interleaved[(progs,)](b, out, per, progs, BLOCK=block,
                                                                   num_warps=warps, num_stages=stages) for b in bufs]
                    us = time_graph(calls, reps=20)
                    r = dict(MB=n * 4 / 1e6, progs=progs, warps=warps, stages=stages, pattern=name, us=us,
                             GBps=n * 4 / us / 1e3)
                    results.append(r)
                    print(json.dumps(r), flush=True)
            del bufs
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "command": " ".join(sys.argv), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
