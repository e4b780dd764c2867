# SPDX-License-Identifier: Apache-2.0
"""The sliced layout of kernel_speed.py's balance-test matrices, built on the CPU: the pieces the
GEMV's grid gets, their steps, the cut ones, and the warps per CTA the rule picks for one token on
an H100 (132 SMs). The matrices are drawn as kernel_speed.make_gqsa draws them (its row_densities),
here with torch's CPU generator, so the counts match a GPU run's up to the random draw.

    python benchmarks/results/sliced_balance_layout.py OUT.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel_speed import BALANCE_DENSITY, row_densities, sliced_stats  # noqa: E402

from vllm_gqsa.kernels.cuda_format import pack_meta, sliced_layout  # noqa: E402

H100_SMS = 132


def main() -> None:
    out = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "num_sms": H100_SMS,
           "density": BALANCE_DENSITY, "shapes": []}
    for N, K in [(4096, 4096), (14336, 4096)]:
        for heavy in (False, True):
            for cut in (1.5, 1e9):
                torch.manual_seed(0)
                keep = torch.rand(N, K // 16) < row_densities(N, BALANCE_DENSITY, heavy)
                row_ptr = torch.zeros(N + 1, dtype=torch.int32)
                row_ptr[1:] = torch.cumsum(keep.sum(1), 0)
                nnz, cols = int(row_ptr[-1]), torch.nonzero(keep)[:, 1]
                meta = pack_meta(torch.ones(nnz, dtype=torch.float16), torch.zeros(nnz, dtype=torch.long), cols)
                t = sliced_layout(row_ptr, torch.zeros(nnz, 2, dtype=torch.int32), meta, K, H100_SMS, cut)
                row = {"N": N, "K": K, "rows": "heavy_block" if heavy else "uniform", "slice_cut": cut,
                       **sliced_stats(t, 1)}
                out["shapes"].append(row)
                print(row)
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
