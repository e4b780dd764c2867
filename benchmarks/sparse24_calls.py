"""cuSPARSELt 2:4 at one token: three ways to call it on each Llama-2-7B linear shape, against cuBLAS
fp16: the time per call replayed in a CUDA graph (20 calls per graph, 10 replays) and the host time
of one eager call. Every call reuses one weight, so shapes that fit in L2 run L2-warm: this compares
ways of calling the kernel; `kernels.py` (weights rotated past L2) measures its speed.
Needs a CUDA GPU with cuSPARSELt (Ampere or newer).

    python benchmarks/sparse24_calls.py --out benchmarks/results/gpu/sparse24_diag2.json
"""

import argparse
import json
import sys
import time

import torch
from torch.sparse import to_sparse_semi_structured

from vllm_gqsa import sparse24

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]  # Llama-2-7B: qkv, o, gate_up, down


def time_call(fn) -> dict:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            fn()
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        g.replay()
    torch.cuda.synchronize()
    return {"graph_us": (time.perf_counter() - t) / 200 * 1e6, "eager_host_ms": host * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="sparse24_calls.json")
    args = p.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "command": " ".join(["benchmarks/sparse24_calls.py", *sys.argv[1:]]), "rows": []}
    for n, k in SHAPES:
        w = sparse24.prune_2_4(torch.randn(n, k, device="cuda", dtype=torch.float16))
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        packed = torch._cslt_compress(w)
        sst = to_sparse_semi_structured(w)
        variants = {
            # the plugin's op before: cuSPARSELt hands back the transposed result itself
            "op_transpose_result": lambda: torch._cslt_sparse_mm(packed, sparse24.pad_rows(x).t(), transpose_result=True)[:1],
            # the op now (less its final copy of the [1, N] result): W @ x.T, then the transpose
            "cslt_plain": lambda: torch._cslt_sparse_mm(packed, sparse24.pad_rows(x).t()).t()[:1],
            "F_linear_sst": lambda: torch.nn.functional.linear(x, sst),
            "cublas_dense": lambda: torch.nn.functional.linear(x, w),
        }
        for name, fn in variants.items():
            try:
                r = {"N": n, "K": k, "variant": name, **time_call(fn)}
            except Exception as e:
                r = {"N": n, "K": k, "variant": name, "error": f"{type(e).__name__}: {e}"[:200]}
            res["rows"].append(r)
            print(r, flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
