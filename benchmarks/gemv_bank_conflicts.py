# SPDX-License-Identifier: Apache-2.0
"""Shared-memory wavefronts of the one-token GEMV's x reads, counted from the layout alone (no GPU).

The GEMV (csrc/gqsa_kernels.cu, G = 16) gives each lane of a warp one unit per step, two consecutive
kept groups, and reads each group's 16 activations as two 16-byte chunks of a swizzled copy of x in
shared memory (chunk c stored at c ^ ((c >> 3) & 7)). A 16-byte load is served a quarter-warp at a
time: 8 lanes, one wavefront per distinct chunk in the busiest of the 8 bank quads of 128 bytes.
This counts those wavefronts over random rows of a given density, for the kept groups in column
order (the format) and reordered inside each row by ``cuda_format.bank_order`` so that the groups
one quarter-warp reads together fall on different quads (a layout the GEMV reads as it is, but the
tensor-core kernel, which needs column order, cannot read today), and reordered only inside each
256-channel chunk, an order the tensor-core kernel could recompute from a chunk's keep mask. Nsight Compute on the H200 measured 1.73 million shared wavefronts for the gate/up shape at
one token, 57% of them excess (``benchmarks/results/gpu/ncu_gemv_stalls_gate_up_m1.txt``): about 9.8
per x read against this model's 9.55 plus the x copy's stores.

    python benchmarks/gemv_bank_conflicts.py [--rows 2048] [--K 4096] [--density 0.5]
                                             [--out benchmarks/results/gemv_bank_conflicts.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_gqsa.kernels.cuda_format import bank_order, x_chunk_swizzle  # noqa: E402

GROUP = 16
LANES = 32
QUARTER = 8  # lanes served together by one 16-byte shared-memory wavefront
QUADS = 8  # 16-byte bank quads in a 128-byte row of banks


def wavefronts_per_read(cols: np.ndarray) -> float:
    """Mean wavefronts per warp-wide 16-byte x read, for kept group columns in kernel order."""
    steps = len(cols) // (2 * LANES)
    g = cols[: steps * 2 * LANES].reshape(steps, LANES, 2)  # [step, lane, group of the unit]
    total = 0
    for i in range(2):
        for k in range(2):  # the group's two 16-byte chunks of x
            quad_chunks = x_chunk_swizzle(2 * g[:, :, i] + k).reshape(steps, LANES // QUARTER, QUARTER)
            for q in range(LANES // QUARTER):
                for s in range(steps):
                    distinct = np.unique(quad_chunks[s, q])  # lanes reading one chunk share it
                    total += np.bincount(distinct % QUADS, minlength=QUADS).max()
    return total / (steps * 4)


def reordered(rows: list) -> np.ndarray:
    """The rows' kept columns in the order of :func:`vllm_gqsa.kernels.cuda_format.bank_order`."""
    cols = np.concatenate(rows)
    row_ptr = torch.tensor(np.concatenate([[0], np.cumsum([len(r) for r in rows])]))
    return cols[bank_order(row_ptr, torch.from_numpy(cols)).numpy()]


def reordered_in_chunks(rows: list, chunk_groups: int = 16) -> np.ndarray:
    """The rows' kept columns reordered only inside each tensor-core chunk (256 input channels, 16
    group columns), by the bank quad of the group's first x chunk, then by column. The tensor-core
    kernel finds a chunk's groups as one run and could recompute this order from the chunk's keep
    mask; a whole-row order like ``bank_order`` it cannot."""
    return np.concatenate([r[np.lexsort((r, x_chunk_swizzle(2 * r) & 7, r // chunk_groups))] for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--K", type=int, default=4096)
    p.add_argument("--density", type=float, default=0.5, help="share of each row's groups kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/gemv_bank_conflicts.json")
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    n_groups = a.K // GROUP
    kept = max(1, round(a.density * n_groups))
    rows = [np.sort(rng.choice(n_groups, kept, replace=False)) for _ in range(a.rows)]
    result = {
        "command": " ".join(sys.argv), "device": "cpu (a model of the layout, no GPU)",
        "numpy": np.__version__, "torch": torch.__version__, "rows": a.rows, "K": a.K, "density": a.density,
        "conflict_free": 4.0,
        "dense_rows": wavefronts_per_read(np.tile(np.arange(n_groups), a.rows)),
        "column_order": wavefronts_per_read(np.concatenate(rows)),
        "reordered_in_rows": wavefronts_per_read(reordered(rows)),
        "reordered_in_chunks": wavefronts_per_read(reordered_in_chunks(rows)),
    }
    for key in ("conflict_free", "dense_rows", "column_order", "reordered_in_rows", "reordered_in_chunks"):
        print(f"{key:19s} {result[key]:.2f} wavefronts per 16-byte x read of a warp")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
