# SPDX-License-Identifier: Apache-2.0
"""Bytes of the kernel format (every tensor the plugin keeps per layer) in the row and the sliced
layout, for random W4 S50% g16 layers of a model's decoder-layer shapes, as
``benchmarks/kernel_speed.py`` names them, times its layer count. Runs on the CPU.

    python benchmarks/results/sliced_layout_bytes.py OUT.json [MODEL ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_speed import MODELS  # noqa: E402
from vllm_gqsa.format import LayerFormat  # noqa: E402
from vllm_gqsa.kernels.cuda_format import to_kernel_format  # noqa: E402
from vllm_gqsa.random_layers import random_gqsa_layer  # noqa: E402

LAYERS = 32  # decoder layers of every model named in kernel_speed.MODELS
H100_SMS = 132


def main() -> None:
    out = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "decoder_layers": LAYERS,
           "models": {}}
    fmt = LayerFormat(bits=4, group_size=16, block_rows=1)
    for model in sys.argv[2:] or ["llama-3-8b"]:
        rows = []
        for name, N, K in MODELS[model]:
            layer = random_gqsa_layer(N, K, fmt, 0.5)
            b = {}
            for layout in ("rows", "sliced"):
                t = to_kernel_format(layer, 2 * H100_SMS, layout=layout, num_sms=H100_SMS)
                b[layout] = sum(v.numel() * v.element_size() for k, v in t.items() if k != "sell_warps")
            rows.append({"layer": name, "N": N, "K": K, "rows_bytes": b["rows"], "sliced_bytes": b["sliced"]})
            print(f"{model} {name} {N} x {K}: rows {b['rows'] / 2**20:.2f} MiB, sliced {b['sliced'] / 2**20:.2f} MiB")
        tot = {k: LAYERS * sum(r[f"{k}_bytes"] for r in rows) / 2**30 for k in ("rows", "sliced")}
        out["models"][model] = {"layers": rows, "rows_gib": tot["rows"], "sliced_gib": tot["sliced"],
                                "sliced_over_rows": tot["sliced"] / tot["rows"]}
        print(f"{model}, {LAYERS} decoder layers: rows {tot['rows']:.3f} GiB, sliced {tot['sliced']:.3f} GiB")
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
