# SPDX-License-Identifier: Apache-2.0
"""Where the tensor-core kernel's time goes: how it grows with K (chunks per CTA) and with CTAs per
SM, and how much of a call is the kernel itself.

    python benchmarks/tc_anatomy.py --tokens 16 --out tc_anatomy.json

For each (N, K, K splits) it times, with x of M random fp16 tokens and W4 S50% g16 layers made as
benchmarks/kernel_speed.py makes them:
  * ``graph_us``: a CUDA graph calling the op once per weight copy (rotated past L2), per call;
  * ``graph_same_weights_us``: the same graph on one copy (weights warm in L2);
  * ``kernels``: median duration of each GPU kernel of a call (profiler): the tensor-core kernel
    (and, before layers kept their split counters, the counters' zero-fill when splits > 1).
``trivial_kernel_us`` is a graph of a tiny elementwise kernel per call: what any launch costs.
Splits 0 is the op's own choice (``tc_splits``)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_speed import copies_for, gqsa_bytes, make_gqsa, time_graph  # noqa: E402

from vllm_gqsa.kernels import cuda  # noqa: E402

# (N, K, splits): K from 1 to 16 chunks on the q/k/v shape, then each Llama-2-7B layer shape.
CASES = ((12288, 256, 1), (12288, 1024, 1), (12288, 4096, 1), (12288, 4096, 2), (4096, 4096, 1),
         (4096, 4096, 0), (4096, 1024, 1), (22016, 4096, 0), (4096, 11008, 0))


def kernel_durations(fn, n: int = 20) -> dict[str, float]:
    """Median µs of each GPU kernel that ``fn`` launches, over n calls."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    d: dict[str, list[float]] = {}
    for e in p.events():
        if e.device_type.name == "CUDA":
            d.setdefault(e.name[:60], []).append(e.device_time if hasattr(e, "device_time") else e.cuda_time)
    return {k: statistics.median(v) for k, v in d.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.manual_seed(0)
    M = a.tokens
    tiny = torch.randn(16, 64, device="cuda", dtype=torch.half)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda, "tokens": M,
           "trivial_kernel_us": time_graph([lambda: tiny.mul_(1.0)] * 64, 50), "rows": []}
    for N, K, splits in CASES:
        t0 = make_gqsa(N, K, 0.5, cuda.default_num_ctas())
        ts = [make_gqsa(N, K, 0.5, cuda.default_num_ctas()) for _ in range(copies_for(gqsa_bytes(t0, 0, K)))]
        x = torch.randn(M, K, device="cuda", dtype=torch.half)
        r = {"N": N, "K": K, "M": M, "splits": splits,
             "graph_us": time_graph([lambda t=t: cuda.tc(x, t, N, splits) for t in ts], 30),
             "graph_same_weights_us": time_graph([lambda: cuda.tc(x, ts[0], N, splits)] * 32, 30),
             "kernels": kernel_durations(lambda: [cuda.tc(x, t, N, splits) for t in ts])}
        print(json.dumps(r))
        out["rows"].append(r)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
