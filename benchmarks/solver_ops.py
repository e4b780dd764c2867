# SPDX-License-Identifier: Apache-2.0
"""The solver's cost per layer on this machine: PyTorch operations per input column (each one a
kernel launch on a GPU, where these small operations are the likely cost) and CPU seconds, on
random layers of a few shapes. Run it at two commits to compare solvers.

    python benchmarks/solver_ops.py --out benchmarks/results/solver_ops.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from converters.solver import solve_layer  # noqa: E402
from vllm_gqsa.format import LayerFormat  # noqa: E402

VIEWS = ("view", "slice", "select", "unsqueeze", "expand", "detach", "alias", "as_strided")


class CountOps(TorchDispatchMode):
    """Counts the ATen operations that compute (views and aliases excluded)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not any(v in func.__name__ for v in VIEWS):
            self.count += 1
        return func(*args, **(kwargs or {}))


def layer(N: int, K: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, K, generator=g) * (torch.rand(K, generator=g) * 2)
    return torch.randn(N, K, generator=g) * 0.02, 2 * X.T @ X / X.shape[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="576x1536,1536x576,1536x8960", help="N x K of each layer")
    p.add_argument("--reps", type=int, default=3, help="timed solves per shape (the fastest is kept)")
    p.add_argument("--out")
    a = p.parse_args(argv)
    fmt = LayerFormat(4, 16, 1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    results = {"command": " ".join(["python", *sys.argv]), "commit": commit, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "format": "W4 S50% g16", "layers": []}
    for shape in a.shapes.split(","):
        N, K = map(int, shape.split("x"))
        W, H = layer(N, K)
        with CountOps() as ops:
            solve_layer(W, H, fmt, 0.5)
        times = []
        for _ in range(a.reps):
            t = time.perf_counter()
            solve_layer(W, H, fmt, 0.5)
            times.append(time.perf_counter() - t)
        r = {"N": N, "K": K, "ops": ops.count, "ops_per_column": round(ops.count / K, 1),
             "cpu_seconds": round(min(times), 3)}
        print(json.dumps(r), flush=True)
        results["layers"].append(r)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
