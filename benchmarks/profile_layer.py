# SPDX-License-Identifier: Apache-2.0
"""Runs one GQSA kernel on one random layer three times, for a profiler to catch (Nsight Compute).

    ncu -k regex:gemv_kernel -s 2 -c 1 --metrics ... python benchmarks/profile_layer.py gemv 22016 4096 1

PATH is gemv, gemv_bank (the GEMV on groups in ``cuda_format.bank_order``), tc (tensor cores), sp
(sparse tensor cores, on a layer in the pair pattern), sp_add_stats / sp_from_stats (the split
norm's first and second parts on such a layer: the residual add and sums of h^2 in the finish, or
x = g scaled by the sums' factors) or marlin (vLLM's Marlin on a GPTQ 4-bit g128 layer of the same
shape, for comparison: ``-k regex:Marlin``); the GQSA layer is N x K at 50% density, made as
benchmarks/kernel_speed.py makes its layers; x is M random fp16 tokens. ``-s 2 -c 1`` profiles the
third call. The ``ncu_*.txt`` files in benchmarks/results/gpu/ hold the command lines they came from."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_speed  # noqa: E402
from kernel_speed import make_gqsa, vllm_gptq_baselines  # noqa: E402

from vllm_gqsa.kernels import cuda, cuda_format  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", choices=("gemv", "gemv_bank", "tc", "sp", "sp_add_stats", "sp_from_stats", "marlin"))
    p.add_argument("N", type=int)
    p.add_argument("K", type=int)
    p.add_argument("M", type=int)
    p.add_argument("--silu-mul", action="store_true", help="sp, sp_from_stats: a gate/up layer with its SiLU-and-mul")
    a = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(a.M, a.K, device="cuda", dtype=torch.half)
    if a.path == "marlin":
        baselines = vllm_gptq_baselines(a.N, a.K, 1, frozenset({"marlin"}))
        if "marlin" not in baselines:
            sys.exit("marlin: vLLM's Marlin kernel is not available here")
        fn, packs, _ = baselines["marlin"]
        call = lambda: fn(x, packs[0])  # noqa: E731
    else:
        kernel_speed.PAIRS = a.path.startswith("sp")
        t = make_gqsa(a.N, a.K, 0.5, cuda.default_num_ctas())
        if a.path == "gemv_bank":
            t = cuda_format.with_bank_order(t)
        if a.path in ("sp_add_stats", "sp_from_stats"):
            ok, reason = cuda.available()  # loads the ops called through torch.ops.vllm_gqsa below
            if not ok:
                sys.exit(f"{a.path}: the GQSA CUDA ops are not available here ({reason})")
            layer = (t["row_ptr"], t["codes"], t["meta"], a.N, 0, t.get("counters"))
            # The norm's residual and weight: the layer's outputs' size (o, down) or its inputs' (the rest).
            hidden = a.N if a.path == "sp_add_stats" else a.K
            residual = torch.randn(a.M, hidden, device="cuda", dtype=torch.half)
            weight = torch.rand(hidden, device="cuda", dtype=torch.half) + 0.5
            if a.path == "sp_add_stats":
                call = lambda: torch.ops.vllm_gqsa.gqsa_sp_add_stats(x, residual, weight, *layer)  # noqa: E731
            else:
                stats = torch.rand(a.M, (hidden + 31) // 32, device="cuda") * 32  # the first part's sums of h^2
                call = lambda: torch.ops.vllm_gqsa.gqsa_sp_from_stats(  # noqa: E731
                    x, stats, 1e-6, residual, weight, *layer, a.silu_mul)
        elif a.path == "sp":
            call = lambda: cuda.sp(x, t, a.N, silu_mul=a.silu_mul)  # noqa: E731
        else:
            op = {"tc": cuda.tc}.get(a.path, cuda.gemv)
            call = lambda: op(x, t, a.N)  # noqa: E731
    for _ in range(3):
        y = call()
    torch.cuda.synchronize()
    print("ok", a.path, tuple((y[0] if isinstance(y, tuple) else y).shape))


if __name__ == "__main__":
    main()
