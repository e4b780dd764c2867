# SPDX-License-Identifier: Apache-2.0
"""Experiment: dequantize + cuBLAS for many tokens, with the dense copy made in L2-sized chunks.

The package's large-M path dequantizes a whole layer to fp16 in HBM, then cuBLAS reads it back
(at 512 tokens about 200 us of a Llama-2-7B layer's 485 us on the H100). Made in chunks that fit
in L2 and reuse one buffer, the dense copy might never reach HBM. (It did not pay: csrc/README.md,
"Ideas measured and dropped"; numbers in prefill_chunks_experiment_h100.json.) Each chunk is built here as its own
layer (rows [n0, n1) of the output, or columns [k0, k1) of the input, summed in fp32), so the
kernels run unchanged. Timed per layer, with the same rotation over weight copies as
kernel_speed.py, against cuBLAS fp16 and the whole-layer path in the same run:

    python benchmarks/results/gpu/prefill_chunks_check.py --out prefill_chunks_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import kernel_speed as ks  # noqa: E402
from vllm_gqsa.kernels import cuda  # noqa: E402

BUDGETS_MIB = (8, 16, 24)


def chunk_rows(N: int, K: int, mib: int) -> list:
    step = max(128, (mib * 2**20 // (2 * K)) // 128 * 128)
    return [(n, min(N, n + step)) for n in range(0, N, step)]


def chunk_cols(N: int, K: int, mib: int) -> list:
    pieces = max(1, -(-N * K * 2 // (mib * 2**20)))
    step = -(-K // pieces // 64) * 64
    return [(k, min(K, k + step)) for k in range(0, K, step)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", default="512,2048")
    p.add_argument("--models", default="llama-2-7b")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args()
    num_ctas = cuda.default_num_ctas()
    K16 = torch.float16
    rows = []
    for model in args.models.split(","):
        for name, N, K in ks.MODELS[model]:
            nbytes = ks.gqsa_bytes(ks.make_gqsa(N, K, ks.DENSITY, num_ctas), 0, K)
            copies = ks.copies_for(nbytes)
            whole = [ks.make_gqsa(N, K, ks.DENSITY, num_ctas) for _ in range(copies)]
            dense = ks.dense_weights(N, K, ks.copies_for(N * K * 2))
            by_rows = {b: [[(n0, n1, ks.make_gqsa(n1 - n0, K, ks.DENSITY, num_ctas)) for n0, n1 in chunk_rows(N, K, b)]
                           for _ in range(copies)] for b in BUDGETS_MIB}
            by_cols = {b: [[(k0, k1, ks.make_gqsa(N, k1 - k0, ks.DENSITY, num_ctas)) for k0, k1 in chunk_cols(N, K, b)]
                           for _ in range(copies)] for b in BUDGETS_MIB}
            for M in (int(m) for m in args.tokens.split(",")):
                x = torch.randn(M, K, device="cuda", dtype=K16)
                r = {"model": model, "layer": name, "N": N, "K": K, "M": M, "copies": copies}

                def t(calls):
                    return ks.time_graph(calls, args.reps)

                r["cublas_us"] = t([lambda w=w: torch.matmul(x, w.T) for w in dense])
                r["whole_us"] = t([lambda c=c: torch.matmul(x, cuda.dequant(c, N, K, 16, K16).T) for c in whole])
                r["whole_dequant_only_us"] = t([lambda c=c: cuda.dequant(c, N, K, 16, K16) for c in whole])

                def rows_call(chunks):
                    out = torch.empty(M, N, device="cuda", dtype=K16)
                    for n0, n1, c in chunks:
                        w = cuda.dequant(c, n1 - n0, K, 16, K16)
                        torch.mm(x, w.T, out=out[:, n0:n1])
                        del w
                    return out

                def rows_dequant_only(chunks):
                    for n0, n1, c in chunks:
                        w = cuda.dequant(c, n1 - n0, K, 16, K16)
                        del w

                def rows_gemm_only(wd, chunks):
                    out = torch.empty(M, N, device="cuda", dtype=K16)
                    for n0, n1, _ in chunks:
                        torch.mm(x, wd[n0:n1].T, out=out[:, n0:n1])
                    return out

                def cols_call(chunks):
                    acc = None
                    for k0, k1, c in chunks:
                        w = cuda.dequant(c, N, k1 - k0, 16, K16)
                        if acc is None:
                            acc = torch.ops.aten.mm.dtype(x[:, k0:k1], w.T, torch.float32)
                        else:
                            torch.ops.aten.addmm.dtype_out(acc, x[:, k0:k1], w.T, torch.float32, out=acc)
                        del w
                    return acc.to(K16)

                for b in BUDGETS_MIB:
                    r[f"rows{b}_chunks"] = len(by_rows[b][0])
                    r[f"rows{b}_us"] = t([lambda ch=ch: rows_call(ch) for ch in by_rows[b]])
                    r[f"rows{b}_dequant_only_us"] = t([lambda ch=ch: rows_dequant_only(ch) for ch in by_rows[b]])
                    r[f"rows{b}_gemm_only_us"] = t([lambda wd=wd: rows_gemm_only(wd, by_rows[b][0]) for wd in dense])
                    r[f"cols{b}_chunks"] = len(by_cols[b][0])
                    r[f"cols{b}_us"] = t([lambda ch=ch: cols_call(ch) for ch in by_cols[b]])
                rows.append(r)
                best = min((k for k in r if k.endswith("_us") and k[:4] in ("rows", "cols") and "only" not in k),
                           key=lambda k: r[k])
                print(f"{name:8s} M={M:<5d} cublas {r['cublas_us']:8.1f} whole {r['whole_us']:8.1f} "
                      f"(dequant {r['whole_dequant_only_us']:6.1f}) best {best} {r[best]:8.1f} "
                      f"-> {r[best] / r['cublas_us']:.2f}x cuBLAS | "
                      + " ".join(f"{k}={v:.1f}" for k, v in r.items() if k.endswith('_us')), flush=True)
            del whole, dense, by_rows, by_cols
            torch.cuda.empty_cache()
    # One decoder layer: the sum over its shapes of each variant.
    summary = []
    for model in args.models.split(","):
        for M in (int(m) for m in args.tokens.split(",")):
            rs = [r for r in rows if r["model"] == model and r["M"] == M]
            keys = [k for k in rs[0] if k.endswith("_us")]
            s = {k: sum(r[k] for r in rs) for k in keys}
            best_each = sum(min(r[k] for k in keys if k[:4] in ("rows", "cols") and "only" not in k) for r in rs)
            summary.append({"model": model, "M": M, **s, "best_chunked_per_shape_us": best_each,
                            "whole_vs_cublas": s["whole_us"] / s["cublas_us"],
                            "best_chunked_vs_cublas": best_each / s["cublas_us"]})
            print(f"{model} M={M}: cublas {s['cublas_us']:.1f} whole {s['whole_us']:.1f} "
                  f"({s['whole_us'] / s['cublas_us']:.2f}x) best chunked per shape {best_each:.1f} "
                  f"({best_each / s['cublas_us']:.2f}x)", flush=True)
    props = torch.cuda.get_device_properties(0)
    Path(args.out).write_text(json.dumps({
        "device": props.name, "torch": torch.__version__, "command": " ".join(sys.argv),
        "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
