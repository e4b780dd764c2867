# SPDX-License-Identifier: Apache-2.0
"""Correctness and speed of the one-row-per-lane GEMV experiment (sell_gemv_experiment.cu, built as
a shared library) against the package GEMV in the same run, on random GQSA W4 S50% g16 layers of
the kernel benchmark's shapes, timed as benchmarks/kernel_speed.py times kernels (CUDA graphs over
weight copies that rotate past L2).

    python sell_gemv_experiment.py LIB [OUT.json] [--models llama-2-7b,...] [--tokens 1,2] [--check-only]
    python sell_gemv_experiment.py --check-layout          # CPU: the layout holds the same weights
    python sell_gemv_experiment.py --stats CKPT [OUT.json]  # CPU: the layout's padding and slice
                                                            # lengths on a real checkpoint's layers
    python sell_gemv_experiment.py --rule RESULTS.json ...  # CPU: how often the wave rule
                                                            # (pick_warps) picks each shape's best grid

Each SELL variant is (warps per CTA, steps per load batch, target CTAs per SM): slices longer than
total steps / (target x SMs) are cut into near-equal pieces, one CTA each (0: one CTA per slice).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from vllm_gqsa.kernels.cuda_format import dequantize_kernel_format, make_schedule, pack_meta, unpack_meta  # noqa: E402

P = ctypes.c_void_p
# (warps per CTA, steps per load batch, target CTAs per SM (0: one piece per slice), or "m<f>": only
# the slices longer than f times the mean cut, into pieces of about the mean)
VARIANTS = [(4, 2, 0), (8, 2, 0), (16, 2, 0), (4, 2, 4), (4, 2, 8), (8, 2, 2), (8, 2, 4), (8, 2, 8),
            (8, 4, 4), (16, 2, 2), (16, 2, 4), (4, 2, "m1.5"), (8, 2, "m1.5"), (16, 2, "m1.5"), (8, 2, "m2")]
MAX_M = 2
C = 32  # rows per slice: one per lane


def vname(v) -> str:
    return f"sell_{v[0]}x{v[1]}_t{v[2]}_us"


def to_sell(row_ptr: torch.Tensor, codes: torch.Tensor, meta: torch.Tensor, N: int) -> dict:
    """The sliced-ELLPACK copy of kernel-format tensors (see the .cu file's header)."""
    dev = codes.device
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    order = torch.argsort(counts, descending=True, stable=True)
    n_pad = -(-N // C) * C
    S = n_pad // C
    perm = torch.full((n_pad,), -1, dtype=torch.int32, device=dev)
    perm[:N] = order.to(torch.int32)
    sorted_counts = torch.zeros(n_pad, dtype=torch.long, device=dev)
    sorted_counts[:N] = counts[order]
    steps = (sorted_counts.view(S, C).amax(1) + 1) // 2
    slice_ptr = torch.zeros(S + 1, dtype=torch.int32, device=dev)
    slice_ptr[1:] = torch.cumsum(steps, 0).to(torch.int32)
    total = int(slice_ptr[-1])
    nnz = meta.numel()
    # Group g of row n is that row's j-th group; the row sits at sorted place r = 32 s + lane.
    rows = torch.repeat_interleave(torch.arange(N, device=dev), counts, output_size=nnz)
    j = torch.arange(nnz, device=dev) - row_ptr[:-1].long()[rows]
    place = torch.empty(N, dtype=torch.long, device=dev)
    place[order] = torch.arange(N, device=dev)
    r = place[rows]
    s, lane = r // C, r % C
    dest = ((slice_ptr[:-1].long()[s] + j // 2) * C + lane) * 2 + j % 2  # in groups
    codes_sell = torch.zeros(total * C * 2, codes.shape[1], dtype=torch.int32, device=dev)
    meta_sell = torch.zeros(total * C * 2, dtype=torch.int32, device=dev)
    codes_sell[dest] = codes
    meta_sell[dest] = meta
    return {"perm": perm, "slice_ptr": slice_ptr, "codes": codes_sell, "meta": meta_sell,
            "num_slices": S, "steps": total}


def make_pieces(s: dict, target) -> dict:
    """Cut slices into near-equal pieces: with an int target, every slice into pieces of at most
    total_steps / target steps (one piece per slice when it is 0); with "m<f>" (say "m1.5"), only
    the slices longer than f times the mean slice, into pieces of about the mean. int32 pieces
    [P, 4] = (slice, first step, end step, 0), in slice order, slice_pieces [S + 1], an fp32
    workspace and zeroed per-slice counters."""
    sp = s["slice_ptr"].long().cpu()
    steps = sp[1:] - sp[:-1]
    if isinstance(target, str):
        mean = max(1, -(-int(sp[-1]) // len(steps)))
        n = torch.where(steps > float(target[1:]) * mean, (steps + mean - 1) // mean, torch.ones_like(steps))
    elif target:
        size = max(1, -(-int(sp[-1]) // target))
        n = torch.clamp((steps + size - 1) // size, min=1)
    else:
        n = torch.ones_like(steps)
    rows = []
    for sl in range(len(steps)):
        a, k = int(sp[sl]), int(n[sl])
        for q in range(k):
            rows.append((sl, a + int(steps[sl]) * q // k, a + int(steps[sl]) * (q + 1) // k, 0))
    dev = s["codes"].device
    pieces = torch.tensor(rows, dtype=torch.int32, device=dev).reshape(-1, 4)
    slice_pieces = torch.zeros(len(steps) + 1, dtype=torch.int32)
    slice_pieces[1:] = torch.cumsum(n, 0)
    return {"pieces": pieces, "slice_pieces": slice_pieces.to(dev),
            "workspace": torch.empty(max(1, pieces.shape[0]) * MAX_M * C, dtype=torch.float32, device=dev),
            "counters": torch.zeros(len(steps), dtype=torch.int32, device=dev)}


def with_pieces(s: dict, targets) -> dict:
    s["by_target"] = {t: make_pieces(s, t) for t in targets}
    return s


def sell_dense(t: dict, N: int, K: int) -> torch.Tensor:
    """The dense fp32 weight the SELL tensors stand for (padding slots, meta 0, are skipped)."""
    n_slots = t["meta"].numel()
    d = torch.arange(n_slots, device=t["meta"].device)
    step, lane = d // (2 * C), (d // 2) % C
    slice_of = torch.searchsorted(t["slice_ptr"].long()[1:], step, right=True)
    row = t["perm"].long()[slice_of * C + lane]
    idx = torch.nonzero((row >= 0) & (t["meta"] != 0))[:, 0]
    scales, zeros, cols = unpack_meta(t["meta"][idx])
    shifts = torch.arange(8, device=d.device) * 4
    q = ((t["codes"][idx].to(torch.int64).unsqueeze(-1) >> shifts) & 0xF).reshape(-1, 16)
    w = torch.zeros(N, K // 16, 16, device=d.device)
    w[row[idx], cols] = (q - zeros.unsqueeze(-1)).float() * scales.float().unsqueeze(-1)
    return w.reshape(N, K)


def random_layer(N, K, density=0.5, heavy=False, empty_rows=False, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    dens = torch.full((N, 1), density, device=device)
    if heavy:
        h = min(1.0, 4 * density)
        dens[:] = (density * N - h * (N // 8)) / (N - N // 8)
        dens[N // 3:N // 3 + N // 8] = h
    keep = torch.rand(N, K // 16, device=device, generator=g) < dens
    if empty_rows:
        keep[::7] = False
        keep[3::11] = True
    row_ptr = torch.zeros(N + 1, dtype=torch.int32, device=device)
    row_ptr[1:] = torch.cumsum(keep.sum(1), 0)
    cols = torch.nonzero(keep)[:, 1]
    nnz = cols.numel()
    scales = (torch.rand(nnz, device=device, generator=g) * 0.02 + 0.01).half()
    zeros = torch.randint(0, 16, (nnz,), device=device, generator=g)
    codes = torch.randint(-2**31, 2**31 - 1, (nnz, 2), dtype=torch.int32, device=device, generator=g)
    return {"row_ptr": row_ptr, "codes": codes, "meta": pack_meta(scales, zeros, cols)}


def check_layout() -> None:
    for N, K, kw in [(37, 256, {}), (100, 512, {"empty_rows": True}), (256, 1024, {"heavy": True, "density": 0.2}),
                     (64, 4096, {})]:
        t = random_layer(N, K, **kw)
        s = to_sell(t["row_ptr"], t["codes"], t["meta"], N)
        ref = dequantize_kernel_format(t["row_ptr"], t["codes"], t["meta"], N, K, 16)
        got = sell_dense(s, N, K)
        nnz = t["meta"].numel()
        print(f"layout N={N} K={K} {kw}: max diff {float((got - ref).abs().max()):.3g}, "
              f"{s['steps'] * C * 2} slots for {nnz} groups ({100 * (s['steps'] * C * 2 / max(nnz, 1) - 1):.2f}% padding)")
        assert torch.equal(got, ref)
        for target in (0, 8, 100, 10**6, "m1.5", "m1.01"):
            pc = make_pieces(s, target)
            pieces, sp = pc["pieces"].long(), pc["slice_pieces"].long()
            for sl in range(s["num_slices"]):
                mine = pieces[sp[sl]:sp[sl + 1]]
                assert (mine[:, 0] == sl).all() and mine[0, 1] == s["slice_ptr"][sl] and mine[-1, 2] == s["slice_ptr"][sl + 1]
                assert (mine[1:, 1] == mine[:-1, 2]).all()
            sizes = pieces[:, 2] - pieces[:, 1]
            print(f"  target {target}: {pieces.shape[0]} pieces, steps {int(sizes.min())}..{int(sizes.max())}")


def layout_stats(ckpt: str) -> dict:
    """Per layer of a GQSA checkpoint: how the rows' kept-group counts spread, the SELL layout's
    padding, and how unequal its slices are (one CTA per slice: the longest sets the tail)."""
    from safetensors import safe_open

    rows = []
    with safe_open(str(Path(ckpt) / "model.safetensors"), "pt") as f:
        for key in sorted(k for k in f.keys() if k.endswith(".row_ptr")):
            row_ptr = f.get_tensor(key).long()
            counts = (row_ptr[1:] - row_ptr[:-1]).sort(descending=True).values
            N = counts.numel()
            n_pad = -(-N // C) * C
            padded = torch.zeros(n_pad, dtype=torch.long)
            padded[:N] = counts
            steps = (padded.view(-1, C).amax(1) + 1) // 2
            nnz = int(counts.sum())
            rows.append({"layer": key[:-len(".row_ptr")], "N": N, "nnz": nnz,
                         "row_max_over_mean": float(counts.max()) / (nnz / N),
                         "row_min_over_mean": float(counts.min()) / (nnz / N),
                         "rows_over_2x_mean": int((counts > 2 * nnz / N).sum()),
                         "sell_padding_pct": 100 * (int(steps.sum()) * 2 * C / nnz - 1),
                         "slices": int(steps.numel()),
                         "slice_max_over_mean": float(steps.max()) / float(steps.float().mean()),
                         "slices_over_1.5x_mean": int((steps > 1.5 * max(1, -(-int(steps.sum()) // steps.numel()))).sum())})
    worst = max(rows, key=lambda r: r["slice_max_over_mean"])
    total_pad = 100 * (sum(r["nnz"] * (1 + r["sell_padding_pct"] / 100) for r in rows) / sum(r["nnz"] for r in rows) - 1)
    print(f"{len(rows)} layers: SELL padding {total_pad:.2f}% of the kept groups overall, "
          f"{min(r['sell_padding_pct'] for r in rows):.2f}-{max(r['sell_padding_pct'] for r in rows):.2f}% per layer; "
          f"longest slice / mean slice up to {worst['slice_max_over_mean']:.2f} ({worst['layer']}); "
          f"longest row / mean row up to {max(r['row_max_over_mean'] for r in rows):.2f}; slices over 1.5x "
          f"their layer's mean (cut by the \"m1.5\" variants): {sum(r['slices_over_1.5x_mean'] for r in rows)} of "
          f"{sum(r['slices'] for r in rows)}, in {sum(1 for r in rows if r['slices_over_1.5x_mean'])} layers")
    report = Path(ckpt) / "gqsa_report.json"
    conversion = {}
    if report.exists():  # how the checkpoint was made
        r = json.loads(report.read_text())
        conversion = {k: r.get(k) for k in ("source", "quantization_config", "calibration", "training")}
    return {"checkpoint": ckpt, "conversion": conversion, "command": "python " + " ".join(sys.argv),
            "padding_pct_overall": total_pad, "layers": rows}


# Registers per thread of the one-pass build (ptxas -v, nvcc 13.0, sm_90a), by tokens and warps per
# CTA, with 2 steps per load batch; they set how many CTAs fit an SM.
REGISTERS = {1: {4: 72, 8: 80, 16: 82}, 2: {4: 72, 8: 78, 16: 80}}


def ctas_per_sm(W: int, K: int, M: int) -> int:
    """CTAs of W warps that fit one H100 SM: registers (allocated per warp in units of 256), threads,
    and shared memory (the x copy and the warps' partial sums)."""
    per_warp = -(-REGISTERS[M][W] * C // 256) * 256
    smem = M * ((K + 63) // 64) * 128 + W * C * 4 * M + 1024
    return min(65536 // (per_warp * W), 2048 // (W * C), 32, (228 * 1024) // smem)


def pick_warps(N: int, K: int, M: int, sms: int = 132, overhead_steps: float = 4.0) -> int:
    """Warps per slice from a wave count: the CTAs (one per slice) run in ceil(slices / resident)
    waves, each as long as one warp's share of a slice's steps plus a fixed cost; the W with the
    shortest total wins. Random rows at 50%: a slice has about K / 64 steps."""
    slices, steps = -(-N // C), K // 64
    return min((4, 8, 16), key=lambda W: -(-slices // (sms * ctas_per_sm(W, K, M))) * (steps / W + overhead_steps))


def rule_check(files) -> None:
    for f in files:
        d = json.loads(Path(f).read_text())
        key = "sell_{}x2_t0_us" if "sell_8x2_t0_us" in d["layers"][0] else "sell_{}x2_us"  # the first run's names
        right, best_sum, rule_sum, per_layer = 0, 0.0, 0.0, {}
        for r in d["layers"]:
            t = {W: min(r[key.format(W)]) for W in (4, 8, 16)}
            best, rule = min(t, key=t.get), pick_warps(r["N"], r["K"], r["M"])
            right += best == rule
            best_sum += t[best]
            rule_sum += t[rule]
            acc = per_layer.setdefault((r["model"], r["M"]), [0.0, 0.0])
            acc[0] += min(r["gemv_us"])
            acc[1] += t[rule]
        print(f"{f}: the rule picks the fastest of 4 / 8 / 16 warps in {right} of {len(d['layers'])} shapes; "
              f"{rule_sum:.1f} us in all against {best_sum:.1f} with every shape at its fastest")
        for (model, M), (gemv, sell) in per_layer.items():
            print(f"  {model} M={M}: one decoder layer {sell:.1f} us with the rule, package GEMV {gemv:.1f} us "
                  f"({gemv / sell:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("lib", nargs="?")
    p.add_argument("out", nargs="?")
    p.add_argument("--check-layout", action="store_true")
    p.add_argument("--stats", metavar="CKPT", help="layout statistics of a GQSA checkpoint's layers (CPU)")
    p.add_argument("--rule", nargs="+", metavar="RESULTS", help="check pick_warps against results files (CPU)")
    p.add_argument("--models", default="llama-2-7b,llama-3-8b,qwen2.5-7b")
    p.add_argument("--tokens", default="1,2")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--check-only", action="store_true", help="the correctness cases only (for compute-sanitizer)")
    args = p.parse_args()
    if args.check_layout:
        check_layout()
        return
    if args.rule:
        rule_check(args.rule)
        return
    if args.stats:
        out = layout_stats(args.stats)
        if args.lib:  # the first positional is the output file here
            Path(args.lib).write_text(json.dumps(out, indent=1))
        return

    import kernel_speed as ks
    from vllm_gqsa.kernels import cuda

    lib = ctypes.CDLL(str(Path(args.lib).resolve()))
    lib.sell_gemv.restype = ctypes.c_int
    stream = lambda: P(torch.cuda.current_stream().cuda_stream)  # noqa: E731

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    targets = {v[2] for v in VARIANTS}

    def sell_call(s, x, y, N, K, w, b, t):
        M = x.shape[0]
        pc = s["by_target"][t if isinstance(t, str) else t * sms]
        err = lib.sell_gemv(P(x.data_ptr()), P(s["perm"].data_ptr()), P(pc["pieces"].data_ptr()),
                            P(pc["slice_pieces"].data_ptr()), P(s["codes"].data_ptr()), P(s["meta"].data_ptr()),
                            P(pc["workspace"].data_ptr()), P(pc["counters"].data_ptr()), P(y.data_ptr()),
                            M, N, K, pc["pieces"].shape[0], w, b, stream())
        assert err == 0, f"sell_gemv error {err}"
        return y

    def sell_of(t, N):
        return with_pieces(to_sell(t["row_ptr"], t["codes"], t["meta"], N),
                           [tg if isinstance(tg, str) else tg * sms for tg in targets])

    def sell_bytes(s, M, K):
        return sum(s[k].numel() * s[k].element_size() for k in ("perm", "slice_ptr", "codes", "meta")) + M * K * 2

    num_ctas = cuda.default_num_ctas()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "host": platform.node(),
           "command": "python " + " ".join(sys.argv), "variants": VARIANTS, "check": [], "layers": [],
           "balance": []}

    # Correctness against the package GEMV and the fp32 reference.
    for N, K, kw in [(37, 256, {}), (100, 512, {"empty_rows": True}), (300, 1040, {"heavy": True, "density": 0.2}),
                     (4096, 11008, {}), (12288, 4096, {})]:
        t = random_layer(N, K, device="cuda", seed=N, **kw)
        t["schedule"] = make_schedule(t["row_ptr"], num_ctas)
        s = sell_of(t, N)
        w = dequantize_kernel_format(t["row_ptr"], t["codes"], t["meta"], N, K, 16)
        for M in (1, 2):
            x = torch.randn(M, K, device="cuda").half()
            ref = x.float() @ w.T
            base = cuda.gemv(x, t, N).float()
            scale = float(ref.abs().max())
            for v in VARIANTS:
                y = torch.full((M, N), float("nan"), device="cuda").half()
                sell_call(s, x, y, N, K, *v)  # twice: the counters must be back at 0
                y.fill_(float("nan"))
                got = sell_call(s, x, y, N, K, *v).float()
                torch.cuda.synchronize()
                row = {"N": N, "K": K, "M": M, "case": str(kw), "variant": list(v),
                       "sell_max_err_rel": float((got - ref).abs().max()) / scale,
                       "gemv_max_err_rel": float((base - ref).abs().max()) / scale}
                out["check"].append(row)
                assert row["sell_max_err_rel"] < 5e-3, row
    print(f"check: {len(out['check'])} cases, worst SELL rel err "
          f"{max(r['sell_max_err_rel'] for r in out['check']):.2e}, GEMV "
          f"{max(r['gemv_max_err_rel'] for r in out['check']):.2e}", flush=True)

    if args.check_only:
        return
    read_bw = ks.measure_read_bandwidth()
    out["read_bw_GBps"] = read_bw
    tokens = [int(m) for m in args.tokens.split(",")]
    for model in args.models.split(","):
        for name, N, K in ks.MODELS[model]:
            base_t = ks.make_gqsa(N, K, ks.DENSITY, num_ctas)
            copies = ks.copies_for(ks.gqsa_bytes(base_t, 1, K))
            ts = [base_t] + [ks.make_gqsa(N, K, ks.DENSITY, num_ctas) for _ in range(copies - 1)]
            ss = [sell_of(t, N) for t in ts]
            for M in tokens:
                x = torch.randn(M, K, device="cuda").half()
                ys = [torch.empty(M, N, device="cuda").half() for _ in ss]
                row = {"model": model, "layer": name, "N": N, "K": K, "M": M, "copies": copies,
                       "gemv_bytes": sum(ks.gqsa_bytes(t, M, K) for t in ts) / copies,
                       "sell_bytes": sum(sell_bytes(s, M, K) for s in ss) / copies}
                # Alternate the package GEMV and the variants, twice.
                for r in range(2):
                    row.setdefault("gemv_us", []).append(ks.time_graph([lambda t=t: cuda.gemv(x, t, N) for t in ts], args.reps))
                    for v in VARIANTS:
                        us = ks.time_graph([lambda s=s, y=y, v=v: sell_call(s, x, y, N, K, *v) for s, y in zip(ss, ys)], args.reps)
                        row.setdefault(vname(v), []).append(us)
                print(f"{model:11s} {name:8s} M={M} gemv {min(row['gemv_us']):6.2f} us | " + " ".join(
                    f"{vname(v)[5:-3]} {min(row[vname(v)]):6.2f}" for v in VARIANTS), flush=True)
                out["layers"].append(row)
            del ts, ss
            torch.cuda.empty_cache()

    # Summed per decoder layer, best of the two rounds per shape.
    summary = []
    for model in args.models.split(","):
        for M in tokens:
            rows = [r for r in out["layers"] if r["model"] == model and r["M"] == M]
            tot = {"model": model, "M": M, "gemv_us": sum(min(r["gemv_us"]) for r in rows),
                   "gemv_bytes": sum(r["gemv_bytes"] for r in rows), "sell_bytes": sum(r["sell_bytes"] for r in rows)}
            for v in VARIANTS:
                tot[vname(v)] = sum(min(r[vname(v)]) for r in rows)
            best = min(VARIANTS, key=lambda v: tot[vname(v)])
            tot["best_variant"] = list(best)
            tot["sell_best_us"] = tot[vname(best)]
            # each shape at its own best variant
            tot["sell_best_per_shape_us"] = sum(min(min(r[vname(v)]) for v in VARIANTS) for r in rows)
            tot["gemv_over_sell"] = tot["gemv_us"] / tot["sell_best_us"]
            tot["gemv_pct_read_bw"] = 100 * tot["gemv_bytes"] / tot["gemv_us"] / 1e3 / read_bw
            tot["sell_pct_read_bw"] = 100 * tot["sell_bytes"] / tot["sell_best_us"] / 1e3 / read_bw
            summary.append(tot)
            print(f"SUMMARY {model} M={M}: gemv {tot['gemv_us']:.1f} us ({tot['gemv_pct_read_bw']:.1f}% of read bw), "
                  f"sell {best} {tot['sell_best_us']:.1f} us ({tot['sell_pct_read_bw']:.1f}%), "
                  f"{tot['gemv_over_sell']:.3f}x; best per shape {tot['sell_best_per_shape_us']:.1f} us", flush=True)
    out["summary"] = summary

    # Uniform rows against one row block at 4x the average (kernel_speed's balance test).
    K = N = 4096
    x = torch.randn(1, K, device="cuda").half()
    for heavy in (False, True):
        ts = [ks.make_gqsa(N, K, ks.BALANCE_DENSITY, num_ctas, heavy_block=heavy) for _ in range(16)]
        ss = [sell_of(t, N) for t in ts]
        ys = [torch.empty(1, N, device="cuda").half() for _ in ss]
        row = {"rows": "heavy_block" if heavy else "uniform", "density": ks.BALANCE_DENSITY,
               "gemv_us": ks.time_graph([lambda t=t: cuda.gemv(x, t, N) for t in ts], args.reps)}
        for v in VARIANTS:
            row[vname(v)] = ks.time_graph([lambda s=s, y=y, v=v: sell_call(s, x, y, N, K, *v) for s, y in zip(ss, ys)], args.reps)
        out["balance"].append(row)
        print("balance", row, flush=True)

    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
        print("wrote", args.out)


if __name__ == "__main__":
    main()
