# SPDX-License-Identifier: Apache-2.0
"""benchmarks/kernels.py's balance test compares like with like (the runs themselves need a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.parametrize("N", [4096, 4000, 11008])
def test_balance_matrices_hold_the_same_groups(N):
    from kernels import BALANCE_DENSITY, row_densities

    uniform = row_densities(N, BALANCE_DENSITY)
    heavy = row_densities(N, BALANCE_DENSITY, heavy_block=True)
    # Same expected number of kept groups, so the same bytes: only their distribution differs.
    assert float(heavy.sum()) == pytest.approx(float(uniform.sum()), rel=1e-6)
    # One block of N/8 rows at 4x the average, the other rows below it.
    block = heavy[N // 3:N // 3 + N // 8]
    assert float(block.min()) == float(block.max()) == pytest.approx(4 * BALANCE_DENSITY)
    rest = heavy.sum() - block.sum()
    assert float(rest) / (N - N // 8) < BALANCE_DENSITY
    assert float(heavy.min()) >= 0 and float(heavy.max()) <= 1


def test_heavy_block_is_capped_at_full_rows():
    from kernels import row_densities

    # At 50% density a 4x block cannot exist: it is capped at 1 and the totals still match.
    heavy = row_densities(4096, 0.5, heavy_block=True)
    assert float(heavy.max()) == 1.0
    assert float(heavy.sum()) == pytest.approx(0.5 * 4096, rel=1e-6)


def test_bank_conflict_model():
    """benchmarks/gemv_bank_conflicts.py: dense rows read x without conflicts, random rows do not,
    and the within-row reorder keeps every row's columns while cutting the wavefronts."""
    import numpy as np
    from gemv_bank_conflicts import reorder_row, wavefronts_per_read

    assert wavefronts_per_read(np.tile(np.arange(256), 16)) == 4.0
    rng = np.random.default_rng(1)
    rows = [np.sort(rng.choice(256, 128, replace=False)) for _ in range(64)]
    reordered = [reorder_row(r) for r in rows]
    assert all(sorted(a.tolist()) == b.tolist() for a, b in zip(reordered, rows))
    sorted_w = wavefronts_per_read(np.concatenate(rows))
    assert 8 < sorted_w < 11
    assert wavefronts_per_read(np.concatenate(reordered)) < 0.7 * sorted_w
