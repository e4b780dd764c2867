# SPDX-License-Identifier: Apache-2.0
"""Why the tensor-core kernel and the dequantize kernel are slower on the sliced layout than on the
row layout at many tokens: the place order (tiles of 64 rows sorted by kept groups) or the slot
addresses (a row's groups two by two, 512 bytes apart). Times, on random W4 S50% g16 layers of the
kernel benchmark's shapes, CUDA graphs over copies rotated past L2 (as benchmarks/kernel_speed.py):
  rows        the row layout;
  sliced      the sliced layout as the plugin loads it;
  row_order   the sliced layout's codes and meta, walked in row order (sell_rows = each row's own
              (row, first slot), so tiles hold rows 64t .. 64t + 63 as in the row layout).

    python sliced_tc_experiment.py OUT.json [--models llama-2-7b] [--tokens 8,16,64]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_speed as ks  # noqa: E402
from vllm_gqsa.kernels import cuda  # noqa: E402


def row_order(t: dict, N: int) -> dict:
    sr = t["sell_rows"].long()
    placed = sr[:, 0] >= 0
    base = torch.zeros(N, dtype=torch.long, device=sr.device)
    base[sr[placed, 0]] = sr[placed, 1]
    rows = torch.full((sr.shape[0],), -1, dtype=torch.long, device=sr.device)
    rows[:N] = torch.arange(N, device=sr.device)
    b = torch.zeros(sr.shape[0], dtype=torch.long, device=sr.device)
    b[:N] = base
    return {**t, "sell_rows": torch.stack([rows, b], 1).to(torch.int32).contiguous()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--models", default="llama-2-7b")
    p.add_argument("--tokens", default="8,16,64")
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    num_ctas = cuda.default_num_ctas()
    out = {"device": torch.cuda.get_device_name(), "command": "python " + " ".join(sys.argv), "layers": []}
    for model in a.models.split(","):
        for name, N, K in ks.MODELS[model]:
            base = ks.make_gqsa(N, K, ks.DENSITY, num_ctas)
            ts = [base] + [ks.make_gqsa(N, K, ks.DENSITY, num_ctas) for _ in range(ks.copies_for(ks.gqsa_bytes(base, 1, K)) - 1)]
            variants = {"rows": [t["rows"] for t in ts], "sliced": ts, "row_order": [row_order(t, N) for t in ts]}
            for M in [int(m) for m in a.tokens.split(",")]:
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                row = {"model": model, "layer": name, "N": N, "K": K, "M": M}
                ref = cuda.tc(x, variants["rows"][0], N).float()
                for v, vts in variants.items():
                    err = float((cuda.tc(x, vts[0], N).float() - ref).abs().max())
                    assert err < 1e-2 * float(ref.abs().max()) + 1e-3, (v, err)
                    row[f"tc_{v}_us"] = ks.time_graph([lambda t=t: cuda.tc(x, t, N) for t in vts], a.reps)
                print(row, flush=True)
                out["layers"].append(row)
            row = {"model": model, "layer": name, "N": N, "K": K, "M": "dequant"}
            for v, vts in variants.items():
                row[f"dequant_{v}_us"] = ks.time_graph([lambda t=t: cuda.dequant(t, N, K, 16, torch.float16) for t in vts], a.reps)
            print(row, flush=True)
            out["layers"].append(row)
            del ts, variants
            torch.cuda.empty_cache()
    sums = {}
    for r in out["layers"]:
        acc = sums.setdefault(f"{r['model']} M={r['M']}", {})
        for k, v in r.items():
            if k.endswith("_us"):
                acc[k] = acc.get(k, 0.0) + v
    out["per_decoder_layer"] = sums
    for k, v in sums.items():
        print(k, {a: round(b, 1) for a, b in v.items()})
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
