# SPDX-License-Identifier: Apache-2.0
"""Where the sliced GEMV's balance-test loss comes from: the grid's pieces, cut and ordered other
ways, with a build's kernel unchanged (the pieces are a host-side choice).

On kernel_speed.py's balance matrices (uniform rows, and one block of N/8 rows at 4x the average;
density 0.25 both; or ``--shapes``, ``--density``, ``--uniform-only``), one token, fp16, at 4, 8 and
16 warps per CTA:
  default     the layout's pieces (slices over 1.5x the mean cut into pieces of about the mean)
  nocut       one piece per slice
  cut2        the cut slices in 2 pieces each instead
  cut2x       the cut slices in twice the default pieces
  reversed    the default pieces, lightest slices first
  spread      the default pieces, the cut slices spaced evenly among the others
  middle      the default pieces, the cut slices after the first (pieces - SMs) mod SMs others
  uniform_cut2  (uniform rows) every slice cut in 2: the cost of the cut slices' global fix-up
It also records which SM each CTA of a Triton probe grid lands on (the dispatch order).
``--parts``: the kernels whose cut slices meet in per-piece slots (``slice_parts``, int32, -1 =
empty), with slots for every piece, since a reordered grid need not put its cut slices first.
Without it, the build before (commit 631087a): a workspace and one counter per slice (zeros),
passed in the same argument.

    python benchmarks/results/gpu/balance_pieces_experiment.py --out OUT.json
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
from vllm_gqsa.kernels.cuda_format import PART_SLOTS, SLICE_ROWS, kernel_weight  # noqa: E402

WARPS = (4, 8, 16)
PARTS = False


def with_pieces(t: dict, pieces: torch.Tensor) -> dict:
    pieces = pieces.to("cuda")
    if PARTS:  # slots for every piece: the reordered grids need not put the cut slices first
        return dict(t, schedule=pieces, slice_parts=torch.full((pieces.shape[0] * PART_SLOTS,), -1,
                                                               dtype=torch.int32, device="cuda"))
    # the build before: one counter per slice, zeros
    return dict(t, schedule=pieces, slice_parts=torch.zeros(t["sell_rows"].shape[0] // SLICE_ROWS, dtype=torch.int32,
                                                            device="cuda"))


def slices_of(pieces: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first step, last step + 1, default piece count) of each slice, from a layout's pieces."""
    out = {}
    for s, b, e, kn in pieces.tolist():
        lo, hi, _ = out.get(s, (b, e, 0))
        out[s] = (min(lo, b), max(hi, e), kn >> 16)
    return [out[s] for s in range(len(out))]


def build(slices, counts, order) -> torch.Tensor:
    rows = []
    for s in order:
        a, z, _ = slices[s]
        n, st = counts[s], z - a
        rows += [(s, a + st * k // n, a + st * (k + 1) // n, k | (n << 16)) for k in range(n)]
    return torch.tensor(rows, dtype=torch.int32)


def variant(pieces: torch.Tensor, name: str, sms: int) -> torch.Tensor:
    sl = slices_of(pieces.cpu())
    S = len(sl)
    n0 = [c for _, _, c in sl]
    cut = [s for s in range(S) if n0[s] > 1]
    whole = [s for s in range(S) if n0[s] == 1]
    if name == "default":
        return pieces
    if name == "nocut":
        return build(sl, [1] * S, range(S))
    if name == "cut2":
        return build(sl, [2 if c > 1 else 1 for c in n0], range(S))
    if name == "cut2x":
        return build(sl, [2 * c if c > 1 else 1 for c in n0], range(S))
    if name == "uniform_cut2":
        return build(sl, [2] * S, range(S))
    if name == "reversed":
        return build(sl, n0, list(reversed(range(S))))
    if name == "spread":
        order, step = [], len(whole) / max(1, len(cut))
        it = iter(whole)
        for i, s in enumerate(cut):
            while len(order) - i < round(i * step):
                order.append(next(it))
            order.append(s)
        order += list(it)
        return build(sl, n0, order)
    if name == "middle":
        P = sum(n0)
        lead = min(len(whole), (P - sms) % sms)
        return build(sl, n0, whole[:lead] + cut + whole[lead:])
    raise ValueError(name)


def smid_probe(grid: int, num_warps: int) -> list[int] | str:
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def probe(out):
            pid = tl.program_id(0)
            sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [pid], dtype=tl.int32, is_pure=False, pack=1)
            tl.store(out + pid, sm)
        out = torch.empty(grid, dtype=torch.int32, device="cuda")
        probe[(grid,)](out, num_warps=num_warps)
        torch.cuda.synchronize()
        return out.tolist()
    except Exception as exc:  # the probe is a side question; report why it failed
        return repr(exc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="4096x4096,14336x4096")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--parts", action="store_true")
    p.add_argument("--density", type=float, default=ks.BALANCE_DENSITY,
                   help="kept groups on average (the balance test's by default)")
    p.add_argument("--uniform-only", action="store_true", help="no heavy-block matrices")
    args = p.parse_args()
    global PARTS
    PARTS = args.parts
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    max_k = max(int(shape.split("x")[1]) for shape in args.shapes.split(","))
    x = torch.randn(1, max_k, device="cuda", dtype=torch.float16)
    results = []
    mats = {}
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        for heavy in (False,) if args.uniform_only else (False, True):
            base = ks.make_gqsa(N, K, args.density, 2 * sms, heavy_block=heavy)
            n = ks.copies_for(ks.gqsa_bytes(base, 1, K))
            mats[(N, K, heavy)] = [with_pieces(t, t["schedule"]) for t in
                                   (ks.make_gqsa(N, K, args.density, 2 * sms, heavy_block=heavy) for _ in range(n))]
    for rnd in range(args.rounds):
        for (N, K, heavy), ts in mats.items():
            names = (["default", "nocut", "cut2", "cut2x", "reversed", "spread", "middle"] if heavy
                     else ["default", "uniform_cut2"])
            for name in names:
                vts = [with_pieces(t, variant(t["schedule"], name, sms)) for t in ts]
                P = vts[0]["schedule"].shape[0]
                for W in WARPS:
                    us = ks.time_graph([lambda t=t: cuda.gemv(x[:, :K], t, N, warps=[W] * 3) for t in vts], args.reps)
                    results.append({"round": rnd, "N": N, "K": K, "rows": "heavy_block" if heavy else "uniform",
                                    "variant": name, "warps": W, "pieces": P, "rule_warps": int(ts[0]["sell_warps"][0]),
                                    "us": us})
                    print(f"{rnd} {N}x{K} {'heavy' if heavy else 'uniform':7s} {name:12s} P={P:4d} w{W:<2d} {us:7.2f} us",
                          flush=True)
    # correctness of the reordered grids: the same output as the default pieces
    check = {}
    for (N, K, heavy), ts in mats.items():
        ref = cuda.gemv(x[:, :K], ts[0], N)
        exact = x[:, :K].float() @ kernel_weight(ts[0], N, K, 16).T
        check[f"{N}x{K}_{heavy}_default_vs_fp32"] = float((ref.float() - exact).abs().max())
        x2 = torch.randn(1, K, device="cuda", dtype=torch.float16)  # a second call, other sums in the slots
        exact2 = x2.float() @ kernel_weight(ts[0], N, K, 16).T
        check[f"{N}x{K}_{heavy}_second_x_vs_fp32"] = float((cuda.gemv(x2, ts[0], N).float() - exact2).abs().max())
        for name in (["nocut", "cut2", "cut2x", "reversed", "spread", "middle"] if heavy else ["uniform_cut2"]):
            t = with_pieces(ts[0], variant(ts[0]["schedule"], name, sms))
            check[f"{N}x{K}_{heavy}_{name}"] = float((cuda.gemv(x[:, :K], t, N) - ref).abs().max())
    probes = {f"grid{g}_warps{w}": smid_probe(g, w) for g, w in ((176, 8), (616, 4), (264, 4), (128, 16))}
    Path(args.out).write_text(json.dumps({
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "sms": sms, "density": args.density,
        "command": "python benchmarks/results/gpu/balance_pieces_experiment.py " + " ".join(sys.argv[1:]),
        "parts_build": PARTS, "results": results, "max_abs_diff_vs_default": check, "smid_probe": probes}, indent=1))


if __name__ == "__main__":
    main()
