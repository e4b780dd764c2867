# SPDX-License-Identifier: Apache-2.0
"""Correctness and speed of the wgmma prefill experiment (wgmma_prefill_experiment*.cu, built as a
shared library) against cuBLAS fp16 in the same run, on random GQSA W4 S50% g16 layers.

    python wgmma_prefill_experiment.py LIB check            # max relative error against the reference
    python wgmma_prefill_experiment.py LIB layers [OUT]     # one Llama-2-7B layer's four shapes, M = 512..2048
    python wgmma_prefill_experiment.py LIB small [OUT]      # the same at M = 16, 32, 64
    python wgmma_prefill_experiment.py LIB tokens M,M,.. [OUT]  # the same at the M given
    python wgmma_prefill_experiment.py LIB ablate V,V,...   # qkv and down at M = 512, 2048, per variant V

WG_ROTATE_MB=B in the environment gives each kernel enough weight copies (at least two) to read B MB
per rotation, as benchmarks/kernel_speed.py does past the L2 cache; by default two copies alternate.
WG_STAGE_RAW=1 passes, in place of the chunk table, a stage-major copy of each layer's weights
(stage_raw below) for the experiments' variants that read one (wgmma_prefill_ss_experiment.cu,
v & 64). WG_V=V picks the variant that check, layers, small and tokens run (check: 2 and 0, the others: 2, by
default). WG_PAIRS=1 makes the layers in the pair pattern (each row keeps one group of every aligned pair
of group columns, as `--pattern pairs` does) and check's shapes with K % 128 == 0, for
wgmma_prefill_sp_experiment.cu. WG_PACKAGE=1 also times the plugin's own path for these token counts (its dequantize kernel, then
cuBLAS; with WG_PAIRS=1 up to 128 tokens also its sparse-tensor-core kernel), when the package's kernels
are built (vllm_gqsa/_C).

V is the kernel's template variant (see the .cu files): 2 waits for each wgmma before the next k-step,
0 keeps one in flight (wrong results, see csrc/README.md).
"""
import ctypes
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from vllm_gqsa.kernels.cuda_format import chunk_table, dequantize_kernel_format, pack_meta  # noqa: E402

P = ctypes.c_void_p
LAYERS = [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008)]
# check's (M, N, K): tile edges in M and N, one stage, an odd stage count, Llama-2-7B's down shape.
CHECK = [(128, 256, 256), (1, 256, 512), (64, 256, 448), (200, 600, 4096), (513, 4096, 11008)]
CHECK_PAIRS = [(128, 256, 256), (1, 256, 512), (64, 256, 384), (200, 600, 4096), (513, 4096, 11008)]


def make(N, K, density=0.5, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if os.environ.get("WG_PAIRS") == "1":
        odd = torch.randint(0, 2, (N, K // 32, 1), device="cuda", generator=g)
        keep = torch.zeros(N, K // 32, 2, dtype=torch.bool, device="cuda").scatter_(2, odd, True).view(N, K // 16)
    else:
        keep = torch.rand(N, K // 16, device="cuda", generator=g) < density
    row_ptr = torch.zeros(N + 1, dtype=torch.int32, device="cuda")
    row_ptr[1:] = torch.cumsum(keep.sum(1), 0)
    cols = torch.nonzero(keep)[:, 1]
    nnz = cols.numel()
    scales = (torch.rand(nnz, device="cuda", generator=g) * 0.02 + 0.01).half()
    zeros = torch.randint(0, 16, (nnz,), device="cuda", generator=g)
    codes = torch.randint(-2**31, 2**31 - 1, (nnz, 2), dtype=torch.int32, device="cuda", generator=g)
    t = {"row_ptr": row_ptr, "codes": codes, "meta": pack_meta(scales, zeros, cols),
         "chunks": chunk_table(row_ptr, cols, K, 16)}
    if os.environ.get("WG_STAGE_RAW") == "1":
        t["stage_raw"] = stage_raw(t, N, K)
    return t


def stage_raw(t, N, K):
    """For each 128-row tile and 64-channel stage: [128 rows][4 group columns] codes (8 bytes), then
    meta (4 bytes), zeros where a column is pruned (6 KB a stage; uncompressed)."""
    counts = (t["row_ptr"][1:] - t["row_ptr"][:-1]).long()
    rows = torch.repeat_interleave(torch.arange(N, device="cuda"), counts)
    cols = (t["meta"].long() & 0xFFFFFFFF) >> 20
    tiles, stages = -(-N // 128), -(-K // 64)
    codes = torch.zeros(tiles * 128, stages * 4, 2, dtype=torch.int32, device="cuda")
    meta = torch.zeros(tiles * 128, stages * 4, dtype=torch.int32, device="cuda")
    codes[rows, cols] = t["codes"]
    meta[rows, cols] = t["meta"]
    codes = codes.view(tiles, 128, stages, 8).permute(0, 2, 1, 3).reshape(tiles, stages, 1024)
    meta = meta.view(tiles, 128, stages, 4).permute(0, 2, 1, 3).reshape(tiles, stages, 512)
    return torch.cat([codes, meta], dim=2).contiguous()


def call(lib, t, x, y, M, N, K, bn, v):
    chunks = t["stage_raw"] if "stage_raw" in t else t["chunks"]
    err = lib.wg_gemm(P(x.data_ptr()), P(t["row_ptr"].data_ptr()), P(t["codes"].data_ptr()),
                      P(t["meta"].data_ptr()), P(chunks.data_ptr()), P(y.data_ptr()),
                      M, N, K, bn, v, P(torch.cuda.current_stream().cuda_stream))
    assert err == 0, err


def bench(fn, reps=20, inner=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / inner)
    return statistics.median(times)


def check(lib):
    out = []
    for v in [int(s) for s in os.environ.get("WG_V", "2,0").split(",")]:
        for bn in (64, 128):
            for M, N, K in CHECK_PAIRS if os.environ.get("WG_PAIRS") == "1" else CHECK:
                t = make(N, K, seed=M + N)
                x = torch.randn(M, K, device="cuda").half()
                y = torch.full((M, N), float("nan"), device="cuda").half()
                call(lib, t, x, y, M, N, K, bn, v)
                torch.cuda.synchronize()
                ref = x.float() @ dequantize_kernel_format(t["row_ptr"], t["codes"], t["meta"], N, K, 16).T
                err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                out.append({"v": v, "bn": bn, "M": M, "N": N, "K": K, "rel_err": err})
                print(out[-1], flush=True)
    return out


def timed(lib, shapes, tokens, variants):
    out = []
    for name, N, K in shapes:
        for M in tokens:
            rotate = float(os.environ.get("WG_ROTATE_MB", "0")) * 1e6
            t0 = make(N, K, seed=0)
            nbytes = sum(v.numel() * v.element_size() for v in t0.values())
            n_gqsa = max(2, math.ceil(rotate / nbytes))
            n_dense = max(2, math.ceil(rotate / (N * K * 2)))
            ts = [t0] + [make(N, K, seed=i) for i in range(1, max(n_gqsa, n_dense))]
            ws = [dequantize_kernel_format(t["row_ptr"], t["codes"], t["meta"], N, K, 16).half() for t in ts[:n_dense]]
            ts = ts[:n_gqsa]
            x = torch.randn(M, K, device="cuda").half()
            y = torch.empty(M, N, device="cuda").half()
            st = {"i": 0}

            def cublas():
                st["i"] = (st["i"] + 1) % n_dense
                torch.matmul(x, ws[st["i"]].T, out=y)
            r = {"layer": name, "M": M, "copies": [n_gqsa, n_dense], "cublas_us": round(bench(cublas), 1)}
            if os.environ.get("WG_PACKAGE") == "1":
                from vllm_gqsa.kernels import cuda

                def package():
                    st["i"] = (st["i"] + 1) % n_gqsa
                    torch.matmul(x, cuda.dequant(ts[st["i"]], N, K, 16, torch.half).T, out=y)
                r["package_us"] = round(bench(package), 1)
                if os.environ.get("WG_PAIRS") == "1" and M <= 128:
                    def package_sp():  # the package's sparse-tensor-core kernel for pair layers
                        st["i"] = (st["i"] + 1) % n_gqsa
                        cuda.sp(x, ts[st["i"]], N)
                    r["package_sp_us"] = round(bench(package_sp), 1)
            for bn, v in variants:
                def wg(bn=bn, v=v):
                    st["i"] = (st["i"] + 1) % n_gqsa
                    call(lib, ts[st["i"]], x, y, M, N, K, bn, v)
                r[f"bn{bn}_v{v}_us"] = round(bench(wg), 1)
            print(r, flush=True)
            out.append(r)
    return out


def main():
    lib = ctypes.CDLL(str(Path(sys.argv[1]).resolve()))
    mode = sys.argv[2]
    V = int(os.environ.get("WG_V", "2"))
    if mode == "check":
        res = check(lib)
    elif mode == "layers":
        res = timed(lib, LAYERS, (512, 1024, 2048), [(64, V), (128, V)])
    elif mode == "small":
        res = timed(lib, LAYERS, (16, 32, 64), [(64, V), (128, V)])
    elif mode == "tokens":
        res = timed(lib, LAYERS, [int(m) for m in sys.argv[3].split(",")], [(64, V), (128, V)])
        sys.argv.pop(3)
    else:
        vs = [int(v) for v in sys.argv[3].split(",")]
        res = timed(lib, [LAYERS[0], LAYERS[3]], (512, 2048), [(bn, v) for bn in (64, 128) for v in vs])
    if len(sys.argv) > 3 and mode != "ablate":
        json.dump(res, open(sys.argv[3], "w"), indent=1)


if __name__ == "__main__":
    main()
