# SPDX-License-Identifier: Apache-2.0
"""benchmarks/kernel_speed.py's balance test compares like with like (the runs themselves need a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.parametrize("N", [4096, 4000, 11008])
def test_balance_matrices_hold_the_same_groups(N):
    from kernel_speed import BALANCE_DENSITY, row_densities

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
    from kernel_speed import row_densities

    # At 50% density a 4x block cannot exist: it is capped at 1 and the totals still match.
    heavy = row_densities(4096, 0.5, heavy_block=True)
    assert float(heavy.max()) == 1.0
    assert float(heavy.sum()) == pytest.approx(0.5 * 4096, rel=1e-6)


def test_bank_conflict_model():
    """benchmarks/gemv_bank_conflicts.py: dense rows read x without conflicts, random rows do not,
    and cuda_format.bank_order keeps every group in its row while cutting the wavefronts."""
    import numpy as np
    import torch
    from gemv_bank_conflicts import reordered, reordered_in_chunks, wavefronts_per_read

    from vllm_gqsa.kernels.cuda_format import bank_order

    assert wavefronts_per_read(np.tile(np.arange(256), 16)) == 4.0
    rng = np.random.default_rng(1)
    rows = [np.sort(rng.choice(256, int(rng.integers(0, 257)), replace=False)) for _ in range(64)]
    row_ptr = torch.tensor(np.concatenate([[0], np.cumsum([len(r) for r in rows])]))
    perm = bank_order(row_ptr, torch.from_numpy(np.concatenate(rows)))
    assert sorted(perm.tolist()) == list(range(int(row_ptr[-1])))  # a permutation
    assert all(sorted(perm[a:b].tolist()) == list(range(a, b)) for a, b in zip(row_ptr[:-1].tolist(), row_ptr[1:].tolist()))
    half = [np.sort(rng.choice(256, 128, replace=False)) for _ in range(64)]
    sorted_w = wavefronts_per_read(np.concatenate(half))
    assert 8 < sorted_w < 11
    assert wavefronts_per_read(reordered(half)) < 0.7 * sorted_w
    # Reordered inside 16-column chunks: every group stays in its chunk, and the wavefronts fall,
    # but less than with the whole-row order.
    in_chunks = reordered_in_chunks(half)
    offsets = np.cumsum([0] + [len(r) for r in half])
    for r, a in zip(half, offsets[:-1]):
        part = in_chunks[a:a + len(r)]
        assert sorted(part.tolist()) == r.tolist()
        assert (np.diff(part // 16) >= 0).all()
    assert wavefronts_per_read(reordered(half)) < wavefronts_per_read(in_chunks) < sorted_w


def test_baselines_option():
    """--baselines: all, none or a subset; a misspelt name is refused with the valid ones listed."""
    import argparse

    from kernel_speed import BASELINES, parse_baselines

    assert parse_baselines("all") == frozenset(BASELINES)
    assert parse_baselines("none") == frozenset()
    assert parse_baselines("marlin, read_floor") == {"marlin", "read_floor"}
    with pytest.raises(argparse.ArgumentTypeError, match="marlni.*choose from cublas_fp16"):
        parse_baselines("marlin,marlni")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_baselines(",")


def test_gemv_timeline_summary_keeps_nanoseconds():
    """benchmarks/gemv_timeline.py: globaltimer stamps are near 2^61 ns, where a double's step is
    256 ns; the summary must subtract the first start in integers, and skip warps with no groups
    where it times their loop."""
    import torch
    from gemv_timeline import FIELDS, SLOTS, summarize

    t = torch.zeros((SLOTS, FIELDS), dtype=torch.int64)
    base = 1_764_000_000_123_456_789
    for w in range(16):
        start = base + 32 * w
        t[w, 0:6] = torch.tensor([start, start + 400, base + 2000, base + 3000, base + 9000, base + 10_000 + 64 * w])
        t[w, 6] = w // 8  # two SMs
        t[w, 7] = 18_000
        t[w, 8:14] = 10**12 + 1000 * torch.arange(6)
    t[15, 3] = t[15, 4] = t[15, 11] = t[15, 12] = 0  # a warp without groups
    s = summarize(t)
    assert s["warps"] == 16 and s["sms"] == 2
    assert s["span_us"] == pytest.approx(10.96)  # (10_000 + 64 * 15) ns after the first start
    assert s["warp_start_us"]["p100"] == pytest.approx(0.48)
    assert s["cycles_entry_to_first_batch_done"]["p0"] == 3000
    assert s["cycles_first_batch_to_loop_done"]["p100"] == 1000  # warp 15 left out


def test_gemv_timeline_tail():
    """benchmarks/gemv_timeline.py: the loop-done tail against the latest mean of a CTA's, an SM's
    and the grid's warps (a CTA's 8 warps are slots 8c..8c+7; field 6 is the SM)."""
    import torch
    from gemv_timeline import FIELDS, SLOTS, summarize

    t = torch.zeros((SLOTS, FIELDS), dtype=torch.int64)
    base = 1_764_000_000_123_456_789
    for w in range(24):  # CTAs 0 and 1 on SM 0, CTA 2 on SM 1
        t[w, 0:6] = base + torch.tensor([0, 100, 200, 300, 10_000 + (1000 * w if w < 8 else 0), 20_000])
        t[w, 6] = w // 16
    t[23, 3] = 0  # a warp without groups: left out
    tail = summarize(t)["loop_done_tail"]
    assert tail["last_loop_done_us"] == pytest.approx(17.0)
    assert tail["latest_cta_mean_us"] == pytest.approx(13.5)  # CTA 0: 10 .. 17 us
    assert tail["latest_sm_mean_us"] == pytest.approx(11.75)  # SM 0: CTA 0 and 8 warps at 10 us
    assert tail["grid_mean_us"] == pytest.approx((10 * 23 + 28) / 23)


def _sp_records(n_calls: int, ctas: int, sms: int):
    """Timeline records as benchmarks/sp_timeline_experiment.patch writes them: call c starts at
    c * 12 us; CTA j enters at 10 ns * j, lands its first chunk 1 us later, loops 6 us plus 1 us
    more on SMs that run two CTAs, and ends 0.5 us after its loop."""
    import torch
    from sp_timeline import FIELDS, SLOTS

    t = torch.zeros((SLOTS, FIELDS), dtype=torch.int64)
    base = 1_764_000_000_123_456_789
    per_sm = torch.bincount(torch.arange(ctas) % sms, minlength=sms)
    for c in range(n_calls):
        j = torch.arange(ctas)
        entry = base + 12_000 * c + 10 * j
        loop = entry + 1000 + 6000 + 1000 * (per_sm[j % sms] - 1)
        seq = c * ctas + j
        rec = torch.stack([entry, entry + 1000, loop, loop + 500, j % sms, j, torch.zeros_like(j), seq], dim=1)
        t[seq % SLOTS] = rec
    return t


def test_sp_timeline_calls_and_gaps():
    """benchmarks/sp_timeline.py: records grouped into calls by sequence number, times taken in
    integers (globaltimer stamps near 2^61 ns), the gap between calls, and CTAs grouped by how many
    CTAs their SM ran."""
    from sp_timeline import calls_of, summarize

    t = _sp_records(n_calls=3, ctas=6, sms=4)  # SMs 0 and 1 run two CTAs, SMs 2 and 3 one
    calls = calls_of(t, ctas=6, n_calls=3)
    assert len(calls) == 3
    s = summarize(calls)
    # The last CTA (j = 5, on SM 1 with two) ends at 50 ns + 1 + 6 + 1 + 0.5 us.
    assert s["span_us"] == pytest.approx(8.55)
    assert s["gap_us"] == pytest.approx(12.0 - 8.55)
    assert s["first_chunk_us_p50"] == pytest.approx(1.0)
    assert s["loop_us_max"] == pytest.approx(7.0)
    loads = s["calls"][-1]["by_ctas_on_sm"]
    assert sorted(loads) == [1, 2]
    assert loads[2]["ctas"] == 4 and loads[1]["ctas"] == 2
    assert loads[2]["loop_us"] == pytest.approx(7.0) and loads[1]["loop_us"] == pytest.approx(6.0)
    assert loads[1]["last_end_us"] == pytest.approx(7.53)  # j = 3 on SM 3


def test_sp_timeline_keeps_only_whole_calls():
    """benchmarks/sp_timeline.py: once the array wraps, the calls partly overwritten are left out,
    and a record count that is not calls x CTAs (another launch went through the kernel) stops."""
    from sp_timeline import SLOTS, calls_of

    ctas = SLOTS // 2 + 1  # one whole call fits; the one before it was partly overwritten
    t = _sp_records(n_calls=3, ctas=ctas, sms=132)
    calls = calls_of(t, ctas=ctas, n_calls=3)
    assert len(calls) == 1 and calls[0].shape[0] == ctas
    assert int(calls[0][:, 7].min()) == 2 * ctas  # the last call's records
    assert len(calls_of(_sp_records(n_calls=5, ctas=SLOTS // 2, sms=132), ctas=SLOTS // 2, n_calls=5)) == 2
    with pytest.raises(SystemExit, match="another kernel launch"):
        calls_of(_sp_records(n_calls=2, ctas=6, sms=4), ctas=6, n_calls=3)


def test_sliced_warps_fit(tmp_path):
    """benchmarks/fit_sliced_warps.py replays the warps rule over fixed costs against swept times:
    times made to follow the rule at one fixed cost are fitted best there."""
    import json

    from fit_sliced_warps import evaluate, swept_rows

    from vllm_gqsa.kernels.cuda_format import wave_rule_warps

    truth = 1.5
    results = {"sm_count": 132, "results": []}
    for i, (pieces, steps) in enumerate([(128, 17.0), (132, 200.0), (1000, 40.0), (5000, 12.0),
                                         (300, 60.0), (40, 500.0), (2000, 90.0), (700, 25.0)]):
        for M in (1, 2, 3):
            fastest = wave_rule_warps(pieces, steps, 4096, 132, M, fixed_steps=truth)
            results["results"].append({
                "model": "m", "layer": f"l{i}", "M": M, "K": 4096, "sliced_pieces": pieces, "sliced_mean_steps": steps,
                **{f"gqsa_gemv_w{w}_us": 10.0 if w == fastest else 11.0 for w in (4, 8, 16)}})
    results["results"].append({"model": "m", "layer": "rows", "M": 1, "K": 4096})  # not swept: skipped
    rows = swept_rows(json.loads(json.dumps(results)))
    assert len(rows) == 24
    at_truth = evaluate(rows, truth)
    assert at_truth["hits"] == 24 and at_truth["misses"] == [] and at_truth["over_best_pct"] == 0
    fits = [evaluate(rows, c) for c in (0.0, 8.0)]
    assert all(f["total_us"] >= at_truth["total_us"] for f in fits)
    assert any(f["misses"] for f in fits)  # the data tell the fixed costs apart


def test_ncu_regions_cut_at_the_first_and_last_mma(tmp_path):
    """benchmarks/ncu_regions.py: Nsight Compute's per-instruction export (a kernel-name line, then
    the header) is cut into prologue, main loop and finish at the first and the last HMMA, and every
    sample lands in exactly one region; an export without HMMA is refused."""
    import csv

    from ncu_regions import load, regions

    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
              "stall_long_sb", "stall_wait", "stall_long_sb (Not Issued)"]
    body = [("LDG.E R2, [R4]", 5, 1), ("FSETP P0, R2", 7, 1), ("HMMA.SP.16832.F32 R8", 3, 4),
            ("LDS R6, [R1]", 11, 4), ("HMMA.SP.16832.F32 R8", 2, 4), ("ATOMG.E.ADD R0", 13, 1),
            ("EXIT", 0, 1)]
    path = tmp_path / "k_sass.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(["Kernel Name", "sp_kernel<...>"])
        w.writerow(header)
        for i, (src, samples, executed) in enumerate(body):
            w.writerow([hex(16 * i), "      " + src, samples, executed, samples, 0, 0])
    ins = load(str(path))
    parts = regions(ins)
    assert [len(parts[k]) for k in ("prologue", "loop", "finish")] == [2, 3, 2]
    assert [sum(x["samples"] for x in parts[k]) for k in ("prologue", "loop", "finish")] == [12, 16, 13]
    assert parts["prologue"][1]["stalls"] == {"long_sb": 7, "wait": 0}  # the "(Not Issued)" columns are left out
    with pytest.raises(SystemExit, match="no HMMA"):
        regions([x for x in ins if "HMMA" not in x["src"]])
