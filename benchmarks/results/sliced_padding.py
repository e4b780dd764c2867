# SPDX-License-Identifier: Apache-2.0
"""How many slots the sliced layout (vllm_gqsa/kernels/cuda_format.py) holds per kept group: each
slice of 32 sorted rows is as wide as its longest row, rounded up to whole steps. Counted from the
row pointers alone, on a GQSA checkpoint's G = 16 layers and on random 50% layers of 7B shapes.

    python benchmarks/results/sliced_padding.py OUT.json [CKPT ...]
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vllm_gqsa.kernels.cuda_format import SLICE_ROWS, SLOTS_PER_STEP, STEP_GROUPS  # noqa: E402


def slots(counts: torch.Tensor) -> int:
    c = counts.sort(descending=True).values
    padded = torch.zeros(-(-c.numel() // SLICE_ROWS) * SLICE_ROWS, dtype=torch.long)
    padded[:c.numel()] = c
    return int((-(-padded.view(-1, SLICE_ROWS).amax(1) // STEP_GROUPS)).sum()) * SLOTS_PER_STEP


def main() -> None:
    out = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "machine": platform.machine(),
           "step_groups": STEP_GROUPS, "checkpoints": {}, "random": []}
    for ck in sys.argv[2:]:
        kept = total = 0
        with safe_open(str(Path(ck) / "model.safetensors"), "pt") as f:
            for key in (k for k in f.keys() if k.endswith(".row_ptr")):
                rp = f.get_tensor(key).long()
                kept += int(rp[-1])
                total += slots(rp[1:] - rp[:-1])
        out["checkpoints"][ck] = {"kept_groups": kept, "slots": total, "padding_pct": 100 * (total / kept - 1)}
        print(ck, f"padding {100 * (total / kept - 1):.2f}% of the kept groups")
    g = torch.Generator().manual_seed(0)
    for N, K in [(12288, 4096), (22016, 4096), (4096, 11008), (37888, 3584)]:
        counts = (torch.rand(N, K // 16, generator=g) < 0.5).sum(1)
        kept, total = int(counts.sum()), slots(counts)
        out["random"].append({"N": N, "K": K, "padding_pct": 100 * (total / kept - 1)})
        print(f"random 50% {N} x {K}: padding {100 * (total / kept - 1):.2f}%")
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
