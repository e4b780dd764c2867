# SPDX-License-Identifier: Apache-2.0
"""What the kernel timeline scripts share (``gemv_timeline.py``, per warp of the one-token GEMV, and
``sp_timeline.py``, per CTA of the pair pattern's sparse-tensor-core kernel): the layer shapes they
time, the instrumented kernel library they read the timestamps from, and quantiles."""

from __future__ import annotations

import ctypes
import sys

from kernel_speed import MODELS

from vllm_gqsa.kernels import cuda

# Llama-2-7B's linear layers, name -> (N, K), from kernel_speed.py's table.
SHAPES = {name: (n, k) for name, n, k in MODELS["llama-2-7b"]}


def instrumented_library(tool: str, symbol: str, patch: str) -> ctypes.CDLL:
    """The loaded kernel library, if it is a build with `patch` applied (it exports `symbol`);
    otherwise `tool` stops with what to do."""
    ok, why = cuda.available()
    if not ok:
        sys.exit(f"{tool}: the GQSA CUDA kernels are not available ({why})")
    import vllm_gqsa._C as ext

    lib = ctypes.CDLL(ext.__file__)
    if not hasattr(lib, symbol):
        sys.exit(f"{tool}: vllm_gqsa._C has no timeline; build it with benchmarks/results/gpu/{patch} applied")
    return lib


def quantiles(xs: list[float]) -> dict[str, float] | None:
    """The 0th, 10th, 50th, 90th and 100th percentiles of xs (None if empty)."""
    xs = sorted(xs)
    if not xs:
        return None
    return {f"p{p}": xs[min(len(xs) - 1, int(p / 100 * len(xs)))] for p in (0, 10, 50, 90, 100)}
