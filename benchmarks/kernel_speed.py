# SPDX-License-Identifier: Apache-2.0
"""Speed of the GQSA CUDA kernels on real linear-layer shapes, against cuBLAS fp16, torch 2:4
semi-structured sparsity and (when vLLM is importable) vLLM's Marlin and Machete GPTQ 4-bit
kernels and its ExLlama GPTQ kernel at 2 bits (``exllama_w2``, the W2 baseline).

Every kernel is timed inside a CUDA graph (as vLLM runs decode) that calls it once per weight
copy, with enough copies to exceed the L2 cache, so weights always come from HBM; calls follow each
other, or, with ``--after-kernel``, each follows a small kernel that writes x, as a linear layer
follows a norm or an activation in a model (that kernel's own time subtracted). Each result
reports time per call (median of several replays), effective GB/s over the bytes the kernel must
read (GQSA: codes + meta + row_ptr + x, and the GEMV's schedule or the tensor-core kernel's
chunk table), the share of the read bandwidth measured in the same run (a large ``x.sum()``), and
the speed-up over each baseline. The read floor (``read_floor_us``) is the fastest of a few kernels that
only read exactly the GEMV's weight bytes of each shape (the bandwidth probe's ``x.sum()`` and a Triton
streaming read in several block shapes), rotated the same way: about how fast one kernel can read those
bytes, launch and ramp-up included, so ``gqsa_pct_of_read_floor`` says how
far the GEMV is from the best a read alone achieves at that size. GQSA uses the plugin's dispatch rule (the GEMV up to
``cuda.GEMV_MAX_TOKENS`` tokens, the tensor-core kernel up to ``cuda.TC_MAX_TOKENS``, dequantize +
cuBLAS above; ``cuda.dispatch`` gives other crossovers for compact tiles, ``--block-rows 64``), and every path that could
win at an M is timed too (``gqsa_<path>_us``). For the GEMV it also times x read from global
memory instead of the shared-memory copy (the ablation of that copy) and, with ``--gemv-bank-order``,
each row's groups reordered so that a warp's x reads meet fewer bank conflicts
(``cuda_format.bank_order``, ``gqsa_gemv_bank_order_us``). The
summary adds up each model's linear layers at each M: one decoder layer's time and bandwidth.

(The file is not called ``kernels.py``: a script's folder comes first on ``sys.path``, so that
name would shadow the ``kernels`` package that transformers imports when it is installed.)

    python benchmarks/kernel_speed.py [--quick] [--models llama-2-7b,...] [--tokens 1,16,...]
                                 [--baselines all|none|marlin,...]
                                 [--out benchmarks/results/kernels.json]

``--baselines marlin`` (or ``none``) leaves the other baselines and the read floor out (they are not
made or timed), for comparing two builds of the GQSA kernels with each other. ``--dtype bfloat16``
runs GQSA and every baseline on bf16 activations (cuBLAS and 2:4 then report as ``cublas_bf16`` and
``sparse24_bf16``; the ExLlama W2 kernel takes fp16 only and is left out), and ``--group-size``
times GQSA at 32, 64 or 128 weights per group instead of 16 (the baselines do not change).
GQSA's layers take the plugin's kernel layout: at G = 16 the sliced layout (its bytes are the
slots' codes and meta, ``sell_rows`` and the pieces), with the row layout's GEMV and tensor-core
kernel timed beside it (``gqsa_gemv_rows_us``, ``gqsa_tc_rows_us``, and the global-x ablation on
the row GEMV); ``--layout rows`` times the row layout alone. Sliced rows also record what the
GEMV's warps rule saw (``sliced_pieces``, ``sliced_mean_steps``, ``sliced_warps``);
``--sliced-warps-sweep`` times the sliced GEMV at 4, 8 and 16 warps per CTA as well
(``gqsa_gemv_w<W>_us``), which ``fit_sliced_warps.py`` turns into a re-fit of the rule, and
``--slice-cut`` builds the layers with another cut of long slices. The balance test runs on
``--balance-shapes``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_gqsa.format import SUPPORTED_GROUP_SIZES  # noqa: E402
from vllm_gqsa import reference  # noqa: E402
from vllm_gqsa.kernels import cuda  # noqa: E402
from vllm_gqsa.kernels.cuda_format import (MAX_GEMV_TOKENS, MAX_SLICED_TOKENS, SLICE_CUT,  # noqa: E402
                                           chunk_table, compact_chunk_table, make_schedule, pack_meta, piece_steps,
                                           row_per_cta_schedule, sliced_layout, sliced_layout_applies,
                                           split_counters, with_bank_order)

# (name, N, K) of each linear layer; fused projections as vLLM runs them.
MODELS = {
    "llama-2-7b": [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096),
                   ("down", 4096, 11008)],
    "llama-3-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
                   ("down", 4096, 14336)],
    "qwen2.5-7b": [("qkv", 4608, 3584), ("o", 3584, 3584), ("gate_up", 37888, 3584),
                   ("down", 3584, 18944)],
    # A small model's shapes (not in the default run): grids of fewer CTAs than SMs.
    "qwen2.5-1.5b": [("qkv", 2048, 1536), ("o", 1536, 1536), ("gate_up", 17920, 1536),
                     ("down", 1536, 8960)],
}
DEFAULT_MODELS = ("llama-2-7b", "llama-3-8b", "qwen2.5-7b")
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 512)
QUICK_MODELS = {"llama-2-7b": MODELS["llama-2-7b"][:2]}
QUICK_TOKENS = (1, 4, 8, 16)
GEMV_TIMED_MAX_TOKENS = 64  # the GEMV reads the weights once per 8 tokens: no contender above this
TC_TIMED_MAX_TOKENS = 128  # the tensor-core kernel reads the weights once per 64 tokens
GROUP_SIZE = 16
DENSITY = 0.5  # 50 % of the groups pruned
L2_ROTATION_BYTES = 200 * 2**20  # weight copies per graph: at least this many bytes (L2 is 50 MB)
MAX_COPIES = 64
BANDWIDTH_PROBE_BYTES = 2 * 2**30
WARMUP_SECONDS = 0.02  # replays of each graph before it is timed
DTYPE = torch.float16
TC_SPLITS = 0  # the tensor-core kernel's K splits; 0: the op's own choice (--tc-splits)
BANK_ORDER = False  # --gemv-bank-order: also time the GEMV on each row's groups in bank order
AFTER_KERNEL = False  # --after-kernel: each timed call follows a small kernel that writes x
BLOCK_ROWS = 1  # --block-rows: rows that share one keep pattern
PAIRS = False  # --pattern pairs: each row keeps one group of each aligned pair of group columns
LAYOUT = "auto"  # --layout: the plugin's choice (sliced where it applies), or "rows" throughout
SLICED_TIMED_MAX_TOKENS = 8  # the sliced GEMV reads the weights once per 3 tokens
SLICE_CUT_USED = SLICE_CUT  # --slice-cut: slices longer than this times the mean are cut into pieces
WARPS_SWEEP = False  # --sliced-warps-sweep: also time the sliced GEMV at each of SLICED_WARPS
SLICED_WARPS = (4, 8, 16)  # the warps per CTA the sliced GEMV is built for
SP_TIMED_MAX_TOKENS = 256  # the sparse-tensor-core kernel, timed on pair-pattern layers up to here
SP_WGMMA_TIMED_MIN_TOKENS = 16  # the fused pair-pattern kernel (sm_90), timed from here up
# What each shape is compared with (--baselines); the read floor counts as one.
BASELINES = ("cublas_fp16", "sparse24", "marlin", "machete", "exllama_w2", "read_floor")
SELECTED = frozenset(BASELINES)


def parse_baselines(spec: str) -> frozenset:
    """``all``, ``none`` or a comma-separated subset of BASELINES (``sparse24`` is both 2:4 kernels)."""
    if spec == "all":
        return frozenset(BASELINES)
    if spec == "none":
        return frozenset()
    names = frozenset(n.strip() for n in spec.split(",") if n.strip())
    unknown = sorted(names - set(BASELINES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown baseline(s) {', '.join(unknown) or repr(spec)}: choose from {', '.join(BASELINES)}, all or none")
    return names


def row_densities(N: int, density: float, heavy_block: bool = False, device: str = "cpu") -> torch.Tensor:
    """``[N, 1]`` fraction of groups each row keeps, ``density`` on average: the same for every row,
    or (``heavy_block``) one block of N/8 rows at 4x the average (at most 1) and the rest lower."""
    rows = torch.full((N, 1), density, device=device)
    if heavy_block:
        heavy = min(1.0, 4 * density)
        rows[:] = (density * N - heavy * (N // 8)) / (N - N // 8)
        rows[N // 3:N // 3 + N // 8] = heavy
    return rows


def make_gqsa(N: int, K: int, density: float, num_ctas: int, heavy_block: bool = False) -> dict:
    """Random kernel-format tensors on the GPU (a real checkpoint's structure, random values).
    With BLOCK_ROWS > 1 the rows of each block keep the same groups, as a ``--block-rows``
    checkpoint does once ``GQSALayer.single_rows`` has unpacked it for the kernels; with 64 or
    more, its tiles are compact (``xcols``), as ``to_kernel_format`` makes them, and
    ``chunks_by_channel`` keeps the ordinary chunk table for comparison."""
    KG, R = K // GROUP_SIZE, BLOCK_ROWS
    if PAIRS:  # one group of each pair, chosen at random: density 1/2 in every row
        odd = torch.rand(N // R, KG // 2, device="cuda") < 0.5
        keep = torch.stack([~odd, odd], dim=2).reshape(N // R, KG)
    else:
        keep = torch.rand(N // R, KG, device="cuda") < row_densities(N // R, density, heavy_block, "cuda")
    keep = keep.repeat_interleave(R, dim=0)
    row_ptr = torch.zeros(N + 1, dtype=torch.int32, device="cuda")
    row_ptr[1:] = torch.cumsum(keep.sum(1), 0)
    cols = torch.nonzero(keep)[:, 1]
    nnz = cols.numel()
    scales = (torch.rand(nnz, device="cuda") * 0.02 + 0.01).half()
    zeros = torch.randint(0, 16, (nnz,), device="cuda")
    t = {
        "row_ptr": row_ptr,
        "codes": torch.randint(-2**31, 2**31 - 1, (nnz, GROUP_SIZE // 8), dtype=torch.int32, device="cuda"),
        "meta": pack_meta(scales, zeros, cols),
        "schedule": make_schedule(row_ptr, num_ctas),
        "chunks": chunk_table(row_ptr, cols, K, GROUP_SIZE),
    }
    compact = compact_chunk_table(row_ptr, cols, K, GROUP_SIZE)
    if compact is not None:
        t["chunks_by_channel"] = t["chunks"]
        t["chunks"], t["xcols"] = compact
    t["counters"] = split_counters(N, "cuda")  # as the plugin's layers
    if LAYOUT == "auto" and sliced_layout_applies(GROUP_SIZE, K, compact is not None, PAIRS):
        # The plugin's layout; the row layout's tensors stay in t["rows"] for comparison.
        rows = dict(t)
        t.update(sliced_layout(row_ptr, t["codes"], t["meta"], K, torch.cuda.get_device_properties(0).multi_processor_count,
                               SLICE_CUT_USED))
        t["rows"] = rows
    return t


# The tensors each path reads besides x: the GEMV does not read the chunk table, the tensor-core
# kernel not the schedule; in the sliced layout the GEMV reads sell_rows, not row_ptr.
PATH_TENSORS = {"gemv": ("row_ptr", "codes", "meta", "schedule"),
                "gemv_sliced": ("sell_rows", "codes", "meta", "schedule"),
                "tc": ("row_ptr", "codes", "meta", "chunks", "xcols", "sell_rows"),
                "sp": ("row_ptr", "codes", "meta"),
                "sp_wgmma": ("codes", "meta"),
                "dequant_cublas": ("row_ptr", "codes", "meta", "sell_rows")}


def gqsa_bytes(t: dict, M: int, K: int, path: str = "gemv") -> int:
    if path.endswith("_rows"):  # the row layout of a sliced t
        t, path = t["rows"], path[:-len("_rows")]
    if path == "gemv" and "sell_rows" in t:
        path = "gemv_sliced"
    return sum(t[k].numel() * t[k].element_size() for k in PATH_TENSORS[path] if k in t) + M * K * 2


def sliced_stats(t: dict, M: int) -> dict:
    """What the sliced GEMV's warps rule saw in a layer (``cuda_format.wave_rule_warps``): its
    pieces, their mean steps, the slices cut, and the warps per CTA chosen for M tokens."""
    pieces = t["schedule"]
    P, steps = pieces.shape[0], piece_steps(pieces)
    return {"sliced_pieces": P, "sliced_mean_steps": float(steps.sum()) / max(1, P),
            "sliced_max_steps": int(steps.max()) if P else 0,
            "sliced_cut_pieces": int(((pieces[:, 3] >> 16) > 1).sum()), "sliced_warps": int(t["sell_warps"][M - 1])}


def copies_for(nbytes: int) -> int:
    return max(2, min(MAX_COPIES, math.ceil(L2_ROTATION_BYTES / max(nbytes, 1))))


def capture_graph(calls) -> torch.cuda.CUDAGraph:
    """A CUDA graph that makes every call in `calls` once, warmed up and replayed once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the graph (workspaces, lazy init)
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    return g


def replay_us(g: torch.cuda.CUDAGraph, n_calls: int, reps: int) -> float:
    """Median µs per call over `reps` replays of a graph of `n_calls` calls, after replaying it
    for WARMUP_SECONDS."""
    # Without the warm-up, the first path timed on each gate/up shape at one token (the plugin's
    # own) came out 10-13% slower than the same kernel timed later in the same run
    # (results/README.md, "Timing noise"); with it the two agree within 1% on every shape
    # (kernels_h100_warps_sweep_rule2.json). Ten replays of a few tens of microseconds may otherwise
    # all fall in the GPU's ramp after the host-side setup of the shape's weights.
    start = time.perf_counter()
    while time.perf_counter() - start < WARMUP_SECONDS:
        g.replay()
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n_calls)
    return statistics.median(times)


def time_graph(calls, reps: int) -> float:
    """Median µs per call of a CUDA graph that makes every call in `calls` once."""
    return replay_us(capture_graph(calls), len(calls), reps)


def measure_read_bandwidth() -> float:
    """GB/s of a large streaming read (x.sum() over 2 GiB of fp16)."""
    x = torch.ones(BANDWIDTH_PROBE_BYTES // 2, dtype=torch.float16, device="cuda")
    us = time_graph([lambda: x.sum()], reps=10)
    del x
    return BANDWIDTH_PROBE_BYTES / us / 1e3


@functools.cache
def _read_kernel():
    """A Triton kernel that only streams its input: each program sums BLOCK int32 with wide loads
    of the cache policy EVICTION ("evict_first" for the read floor) and stores one number, so the
    time is launch, ramp-up and the read itself."""
    import triton
    import triton.language as tl

    @triton.jit
    def read(src, out, n, BLOCK: tl.constexpr, EVICTION: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(src + offs, mask=offs < n, other=0, eviction_policy=EVICTION)
        tl.store(out + pid, tl.sum(v, axis=0))

    return read


READ_FLOOR_CONFIGS = ((2048, 4), (4096, 8), (8192, 8), (16384, 16))  # (int32 per program, warps)


def read_floor_us(nbytes: int, copies: int, reps: int) -> tuple:
    """The fastest of torch's x.sum() (the bandwidth probe) and the Triton read kernel in a few
    block shapes, over `copies` buffers of `nbytes`: (µs per call, which one)."""
    bufs = [torch.ones(nbytes // 4, dtype=torch.int32, device="cuda") for _ in range(copies)]
    best = (time_graph([lambda b=b: b.view(torch.float16).sum() for b in bufs], reps), "torch_sum")
    try:
        import triton

        read = _read_kernel()
        n = bufs[0].numel()
        for block, warps in READ_FLOOR_CONFIGS:
            grid = (triton.cdiv(n, block),)
            out = torch.empty(grid[0], dtype=torch.int32, device="cuda")
            us = time_graph([lambda b=b: read[grid](b, out, n, BLOCK=block, EVICTION="evict_first", num_warps=warps)
                             for b in bufs], reps)
            best = min(best, (us, f"triton_read_{block}x{warps}"))
    except Exception as e:  # no Triton, or it cannot compile here: the torch read alone
        print(f"read floor: Triton read kernel unavailable ({type(e).__name__}: {e})"[:300], flush=True)
    return best


def gqsa_calls(ts: list, x: torch.Tensor, N: int, K: int, path: str, x_staging: int = -1):
    if path.endswith("_rows"):  # the row layout of sliced layers
        return gqsa_calls([t["rows"] for t in ts], x, N, K, path[:-len("_rows")], x_staging)
    if path == "gemv":
        return [lambda t=t: cuda.gemv(x, t, N, x_staging) for t in ts]
    if path.startswith("gemv_w"):  # the sliced GEMV with W warps per CTA, whatever the rule says
        warps = [int(path[len("gemv_w"):])] * MAX_SLICED_TOKENS
        return [lambda t=t: cuda.gemv(x, t, N, warps=warps) for t in ts]
    if path == "tc":
        return [lambda t=t: cuda.tc(x, t, N, TC_SPLITS) for t in ts]
    if path == "sp":
        return [lambda t=t: cuda.sp(x, t, N, TC_SPLITS) for t in ts]
    if path == "sp_wgmma":
        return [lambda t=t: cuda.sp_wgmma(x, t, N) for t in ts]
    if path == "sp_wgmma_one_split":  # ablation: one CTA per output tile, K not split
        return [lambda t=t: cuda.sp_wgmma(x, t, N, splits=1) for t in ts]
    if path == "tc_by_channel":  # compact tiles walked by channel chunks instead
        ts = [{**{k: v for k, v in t.items() if k != "xcols"}, "chunks": t["chunks_by_channel"]} for t in ts]
        return [lambda t=t: cuda.tc(x, t, N, TC_SPLITS) for t in ts]
    return [lambda t=t: torch.matmul(x, cuda.dequant(t, N, K, GROUP_SIZE, DTYPE).T) for t in ts]


@functools.cache
def vllm_silu_and_mul():
    """What runs between gate/up and down without the fusion: vLLM's SiLU-and-mul kernel (a compiled
    model runs Inductor's kernel for it, of the same traffic), or the reference without vLLM."""
    try:
        import vllm._C  # noqa: F401  (registers torch.ops._C)
        op = torch.ops._C.silu_and_mul
    except (ImportError, AttributeError, RuntimeError):
        return reference.silu_and_mul

    def run(y):
        out = y.new_empty((*y.shape[:-1], y.shape[-1] // 2))
        op(out, y)
        return out
    return run


def dense_tag() -> str:
    """How the dense and 2:4 baselines are named in the results: by their activation dtype."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[DTYPE]


def dense_weights(N: int, K: int, copies: int) -> list:
    return [torch.randn(N, K, device="cuda", dtype=DTYPE) * 0.02 for _ in range(copies)]


def semi_structured(ws: list) -> dict:
    """torch 2:4 copies of the dense weights for each kernel that takes them: cuSPARSELt (what
    ``to_sparse_semi_structured`` picks) and CUTLASS (the ``sparse24`` method's choice on Ampere)."""
    mask = torch.tensor([1, 1, 0, 0], dtype=torch.bool, device="cuda").repeat(ws[0].numel() // 4)
    pruned = [w * mask.view_as(w) for w in ws]
    out = {}
    try:
        from torch.sparse import to_sparse_semi_structured
        out["sparse24_fp16"] = [to_sparse_semi_structured(w) for w in pruned]
    except Exception as e:
        print(f"  2:4 cuSPARSELt unavailable: {type(e).__name__}: {e}")
    try:
        from vllm_gqsa.sparse24 import compress_cutlass  # (needs vLLM; registers the op)
        out["sparse24_cutlass_fp16"] = [compress_cutlass(w) for w in pruned]
    except Exception as e:
        print(f"  2:4 CUTLASS unavailable: {type(e).__name__}: {e}")
    return out


def _package_version(name: str) -> str | None:
    """The installed version of a package (the Marlin and Machete baselines are vLLM's), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def vllm_gptq_baselines(N: int, K: int, copies: int, names=frozenset(BASELINES)) -> dict:
    """Marlin and Machete GPTQ 4-bit g128, and ExLlama GPTQ 2-bit g128 (W2), those of them in
    ``names``: callables and their weight copies (only when vLLM is importable)."""
    if not names & {"marlin", "machete", "exllama_w2"}:
        return {}
    try:
        from vllm import _custom_ops as ops  # noqa: F401
    except Exception:
        return {}
    out = {}
    if "marlin" in names:
        try:
            from vllm.model_executor.layers.quantization.utils.marlin_utils_test import marlin_quantize
            from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_make_workspace_new
            from vllm.scalar_type import scalar_types
            packs = [marlin_quantize(torch.randn(K, N, device="cuda", dtype=DTYPE), scalar_types.uint4b8, 128, False)
                     for _ in range(copies)]
            workspace = marlin_make_workspace_new(torch.device("cuda"))

            def marlin(x, p):
                _, q, s, g_idx, sort_idx, _ = p
                return ops.marlin_gemm(x, None, q, None, s, None, None, None, g_idx, sort_idx, workspace,
                                       scalar_types.uint4b8, x.shape[0], N, K, is_k_full=True)
            out["marlin"] = (marlin, packs, N * K // 2 + N * K // 128 * 2)
        except Exception as e:
            print(f"  marlin unavailable: {type(e).__name__}: {e}")
    if "machete" in names:
        try:
            from vllm.model_executor.layers.quantization.utils.quant_utils import quantize_weights
            from vllm.scalar_type import scalar_types
            packs = []
            for _ in range(copies):
                _, wq, ws, _ = quantize_weights(torch.randn(K, N, device="cuda", dtype=DTYPE), scalar_types.uint4b8, 128)
                from vllm.model_executor.layers.quantization.utils.quant_utils import pack_rows
                wq_packed = pack_rows(wq, 4, K, N)
                packs.append((ops.machete_prepack_B(wq_packed.t().contiguous().t(), DTYPE, scalar_types.uint4b8, None), ws))

            def machete(x, p):
                return ops.machete_mm(a=x, b_q=p[0], b_type=scalar_types.uint4b8, b_group_scales=p[1],
                                      b_group_size=128)
            out["machete"] = (machete, packs, N * K // 2 + N * K // 128 * 2)
        except Exception as e:
            print(f"  machete unavailable: {type(e).__name__}: {e}")
    if "exllama_w2" in names:
        try:
            # W2: 2-bit GPTQ g128 through vLLM's ExLlama kernel, as vllm_gqsa/gptq_w2.py serves it.
            # Random codes and zero points: their values do not change the kernel's speed.
            empty_perm = torch.empty(0, dtype=torch.int32, device="cuda")
            packs = []
            for _ in range(copies_for(N * K // 4)):
                qweight = torch.randint(-2**31, 2**31 - 1, (K // 16, N), dtype=torch.int32, device="cuda")
                ops.gptq_shuffle(qweight, empty_perm, 2)
                packs.append((qweight, torch.randint(-2**31, 2**31 - 1, (K // 128, N // 16), dtype=torch.int32,
                                                     device="cuda"),
                              torch.randn(K // 128, N, device="cuda", dtype=DTYPE) * 1e-2))

            def exllama_w2(x, p):
                return ops.gptq_gemm(x, p[0], p[1], p[2], empty_perm, True, False, 2)
            out["exllama_w2"] = (exllama_w2, packs, N * K // 4 + N * K // 128 * 2 + N * K // 128 // 4)
        except Exception as e:
            print(f"  exllama_w2 unavailable: {type(e).__name__}: {e}")
    return out


def bench_shape(model: str, name: str, N: int, K: int, tokens, reps: int, read_bw: float,
                num_ctas: int) -> list:
    rows = []
    t0 = gqsa_bytes(make_gqsa(N, K, DENSITY, num_ctas), 0, K)
    g_copies = copies_for(t0)
    gq = [make_gqsa(N, K, DENSITY, num_ctas) for _ in range(g_copies)]
    gq_bank = [with_bank_order(t.get("rows", t)) for t in gq] if BANK_ORDER else []
    compact = "xcols" in gq[0]
    sliced = "rows" in gq[0]
    dense = dense_weights(N, K, copies_for(N * K * 2)) if SELECTED & {"cublas_fp16", "sparse24"} else []
    sparse24 = semi_structured(dense) if "sparse24" in SELECTED else {}
    others = vllm_gptq_baselines(N, K, copies_for(N * K // 2), SELECTED)
    floor_us, floor_kernel = read_floor_us(t0, g_copies, reps) if "read_floor" in SELECTED else (None, None)
    for M in tokens:
        x = torch.randn(M, K, device="cuda", dtype=DTYPE)
        # With --after-kernel every timed call follows a small ordinary kernel that writes x, as a
        # linear layer follows a norm or an activation in a model, and that kernel's own time
        # (measured alone) is subtracted. Without it, calls of one kind follow each other, which
        # lets kernels launched with programmatic dependent launch overlap their neighbours.
        before = (lambda: x.mul_(1.0)) if AFTER_KERNEL else None
        before_us = time_graph([before] * 16, reps) if before else 0.0

        def timed(calls):
            if before is None:
                return time_graph(calls, reps)
            return time_graph([lambda c=c: (before(), c()) for c in calls], reps) - before_us

        # Every GQSA path that could win at this M; gqsa_us is the one the plugin picks.
        # In the sliced layout, the row layout's GEMV and tensor-core kernel too (paths *_rows).
        paths = {}
        if M <= (SLICED_TIMED_MAX_TOKENS if sliced else GEMV_TIMED_MAX_TOKENS):
            paths["gemv"] = timed(gqsa_calls(gq, x, N, K, "gemv"))
        if sliced and M <= GEMV_TIMED_MAX_TOKENS:
            paths["gemv_rows"] = timed(gqsa_calls(gq, x, N, K, "gemv_rows"))
        if sliced and WARPS_SWEEP and M <= MAX_SLICED_TOKENS:
            for W in SLICED_WARPS:
                paths[f"gemv_w{W}"] = timed(gqsa_calls(gq, x, N, K, f"gemv_w{W}"))
        if M <= TC_TIMED_MAX_TOKENS:
            paths["tc"] = timed(gqsa_calls(gq, x, N, K, "tc"))
        if sliced and M <= TC_TIMED_MAX_TOKENS:
            paths["tc_rows"] = timed(gqsa_calls(gq, x, N, K, "tc_rows"))
        if M <= SP_TIMED_MAX_TOKENS and PAIRS:
            paths["sp"] = timed(gqsa_calls(gq, x, N, K, "sp"))
        if M <= TC_TIMED_MAX_TOKENS and compact:
            paths["tc_by_channel"] = timed(gqsa_calls(gq, x, N, K, "tc_by_channel"))
        if M > MAX_GEMV_TOKENS:
            paths["dequant_cublas"] = timed(gqsa_calls(gq, x, N, K, "dequant_cublas"))
        if PAIRS and M >= SP_WGMMA_TIMED_MIN_TOKENS and cuda.sp_wgmma_runs(x):
            paths["sp_wgmma"] = timed(gqsa_calls(gq, x, N, K, "sp_wgmma"))
            paths["sp_wgmma_one_split"] = timed(gqsa_calls(gq, x, N, K, "sp_wgmma_one_split"))
        gemv_max, tc_max = cuda.dispatch(compact, PAIRS)
        middle = "sp" if PAIRS else "tc"
        kernel = "gemv" if M <= gemv_max else middle if M <= tc_max else "dequant_cublas"
        if "sp_wgmma" in paths and cuda.sp_wgmma_takes(x):  # as ops.gqsa_mm picks
            kernel = "sp_wgmma"
        us = paths[kernel]
        nbytes = sum(gqsa_bytes(t, M, K, kernel) for t in gq) / len(gq)
        r = {"model": model, "layer": name, "N": N, "K": K, "M": M, "gqsa_kernel": kernel,
             "gqsa_layout": "sliced" if sliced else "rows",
             "gqsa_us": us, "gqsa_bytes": nbytes, "gqsa_GBps": nbytes / us / 1e3,
             "gqsa_pct_read_bw": 100 * nbytes / us / 1e3 / read_bw,
             **{f"gqsa_{k}_us": v for k, v in paths.items()}}
        if sliced and M <= MAX_SLICED_TOKENS:
            r.update(sliced_stats(gq[0], M))
        if PAIRS and name == "gate_up" and kernel == "sp":
            # SiLU-and-mul in the kernel's finish (what vLLM runs from 2 to 32 tokens, fusion.py),
            # against the kernel and then vLLM's own SiLU-and-mul.
            act = vllm_silu_and_mul()
            r["gqsa_sp_silu_mul_us"] = timed([lambda t=t: cuda.sp(x, t, N, TC_SPLITS, silu_mul=True) for t in gq])
            r["gqsa_sp_then_silu_mul_us"] = timed([lambda t=t: act(cuda.sp(x, t, N, TC_SPLITS)) for t in gq])
            print(f"{model:11s} {name:8s} M={M:<4d} SiLU-and-mul fused {r['gqsa_sp_silu_mul_us']:8.2f} us, "
                  f"after it {r['gqsa_sp_then_silu_mul_us']:8.2f} us", flush=True)
        if floor_us is not None:
            r.update({"read_floor_us": floor_us, "read_floor_kernel": floor_kernel,
                      "read_floor_pct_read_bw": 100 * t0 / floor_us / 1e3 / read_bw,
                      "gqsa_pct_of_read_floor": 100 * floor_us / us})
        if before is not None:
            r["before_kernel_us"] = before_us
        if M <= MAX_GEMV_TOKENS:  # ablation: x read through L1 instead of the shared-memory copy
            r["gqsa_global_x_us"] = timed(gqsa_calls(gq, x, N, K, "gemv_rows" if sliced else "gemv", x_staging=0))
        if BANK_ORDER and M <= MAX_GEMV_TOKENS:  # layout experiment: fewer bank conflicts on x
            r["gqsa_gemv_bank_order_us"] = timed(gqsa_calls(gq_bank, x, N, K, "gemv"))
        tag = dense_tag()
        base = {f"cublas_{tag}": [lambda w=w: torch.matmul(x, w.T) for w in dense]} if "cublas_fp16" in SELECTED else {}
        if "sparse24_fp16" in sparse24:
            base[f"sparse24_{tag}"] = [lambda w=w: torch.nn.functional.linear(x, w)
                                       for w in sparse24["sparse24_fp16"]]
        if "sparse24_cutlass_fp16" in sparse24:
            base[f"sparse24_cutlass_{tag}"] = [lambda p=p: torch.ops.vllm_gqsa.sparse24_cutlass_mm(x, *p)
                                               for p in sparse24["sparse24_cutlass_fp16"]]
        for bname, (fn, packs, _) in others.items():
            base[bname] = [lambda p=p, fn=fn: fn(x, p) for p in packs]
        for bname, calls in base.items():
            try:
                b_us = timed(calls)
                r[f"{bname}_us"] = b_us
                r[f"speedup_vs_{bname}"] = b_us / us
            except Exception as e:
                r[f"{bname}_error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(r)
        extra = " ".join(f"{k[11:]}={v:.2f}x" for k, v in r.items() if k.startswith("speedup_vs_"))
        floor = f" (read floor {floor_us:.2f} us)" if floor_us is not None else ""
        print(f"{model:11s} {name:8s} {N:6d}x{K:<6d} M={M:<4d} {us:8.2f} us {r['gqsa_GBps']:7.0f} GB/s "
              f"{r['gqsa_pct_read_bw']:5.1f}%{floor} {extra}", flush=True)
    return rows


# The balance test's average density: a row block 4x as dense as the average exists only up to 1/4.
# (Runs before this constant used 0.5, where the block was capped at density 1 and the heavy matrix
# held a quarter fewer groups than the uniform one, so per-call fixed costs counted as imbalance.)
BALANCE_DENSITY = 0.25


def bench_balance(N: int, K: int, reps: int, read_bw: float, num_ctas: int) -> list:
    """Uniform rows vs one row block with 4x the average groups (both BALANCE_DENSITY overall, so the
    same bytes): the sliced GEMV (where the layout applies), the row layout's balanced grid and its
    row-per-CTA grid."""
    rows = []
    x = torch.randn(1, K, device="cuda", dtype=DTYPE)
    for heavy in (False, True):
        base = make_gqsa(N, K, BALANCE_DENSITY, num_ctas, heavy_block=heavy)
        ts = [make_gqsa(N, K, BALANCE_DENSITY, num_ctas, heavy_block=heavy) for _ in range(copies_for(gqsa_bytes(base, 1, K)))]
        for grid in ("sliced", "balanced", "row_per_cta"):
            if grid == "sliced" and "rows" not in ts[0]:
                continue
            if grid == "balanced":
                ts = [t.get("rows", t) for t in ts]
            if grid == "row_per_cta":
                ts = [dict(t, schedule=row_per_cta_schedule(t["row_ptr"])) for t in ts]
            nbytes = sum(gqsa_bytes(t, 1, K) for t in ts) / len(ts)
            us = time_graph([lambda t=t: cuda.gemv(x, t, N) for t in ts], reps)
            rows.append({"N": N, "K": K, "M": 1, "density": BALANCE_DENSITY, "rows": "heavy_block" if heavy else "uniform", "grid": grid,
                         "us": us, "GBps": nbytes / us / 1e3, "pct_read_bw": 100 * nbytes / us / 1e3 / read_bw,
                         **(sliced_stats(ts[0], 1) if grid == "sliced" else {})})
            print(f"balance {rows[-1]['rows']:11s} {grid:11s} {N}x{K} M=1 {us:8.2f} us "
                  f"{rows[-1]['GBps']:7.0f} GB/s {rows[-1]['pct_read_bw']:5.1f}%", flush=True)
            if grid == "sliced" and WARPS_SWEEP:  # whether the warps rule's pick costs the imbalance
                for W in SLICED_WARPS:
                    w_us = time_graph(gqsa_calls(ts, x, N, K, f"gemv_w{W}"), reps)
                    rows[-1][f"us_w{W}"] = w_us
                    print(f"balance {rows[-1]['rows']:11s} sliced w{W:<2d}   {N}x{K} M=1 {w_us:8.2f} us", flush=True)
    x16 = torch.randn(16, K, device="cuda", dtype=DTYPE)
    for heavy in (False, True):  # the tensor-core kernel splits rows into fixed 64-row tiles
        ts16 = [make_gqsa(N, K, BALANCE_DENSITY, num_ctas, heavy_block=heavy) for _ in range(len(ts))]
        nbytes = sum(gqsa_bytes(t, 16, K, "tc") for t in ts16) / len(ts16)
        us = time_graph(gqsa_calls(ts16, x16, N, K, "tc"), reps)
        rows.append({"N": N, "K": K, "M": 16, "density": BALANCE_DENSITY, "rows": "heavy_block" if heavy else "uniform", "grid": "tc",
                     "us": us, "GBps": nbytes / us / 1e3, "pct_read_bw": 100 * nbytes / us / 1e3 / read_bw})
        print(f"balance {rows[-1]['rows']:11s} tc {N}x{K} M=16 {us:8.2f} us {rows[-1]['GBps']:7.0f} GB/s", flush=True)
    ts = [t.get("rows", t) for t in ts]
    for ctas_per_sm in (2, 4, 8):  # the row GEMV's persistent grid (cuda.CTAS_PER_SM is the default)
        num = ctas_per_sm * torch.cuda.get_device_properties(0).multi_processor_count
        ts = [dict(t, schedule=make_schedule(t["row_ptr"], num)) for t in ts]
        nbytes = sum(gqsa_bytes(t, 1, K) for t in ts) / len(ts)
        us = time_graph([lambda t=t: cuda.gemv(x, t, N) for t in ts], reps)
        rows.append({"N": N, "K": K, "M": 1, "rows": "heavy_block", "grid": f"{ctas_per_sm}_ctas_per_sm",
                     "us": us, "GBps": nbytes / us / 1e3, "pct_read_bw": 100 * nbytes / us / 1e3 / read_bw})
        print(f"grid {ctas_per_sm} CTAs/SM heavy_block {N}x{K} M=1 {us:8.2f} us {rows[-1]['GBps']:7.0f} GB/s", flush=True)
    return rows


def summarize(results: list, read_bw: float) -> list:
    """Per model and M: the sum over its linear layers (one decoder layer), GQSA against each baseline."""
    out = []
    for model in dict.fromkeys(r["model"] for r in results):
        for M in dict.fromkeys(r["M"] for r in results if r["model"] == model):
            rs = [r for r in results if r["model"] == model and r["M"] == M]
            us = sum(r["gqsa_us"] for r in rs)
            nbytes = sum(r["gqsa_bytes"] for r in rs)
            row = {"model": model, "M": M, "layers": [r["layer"] for r in rs], "gqsa_us": us,
                   "gqsa_GBps": nbytes / us / 1e3, "gqsa_pct_read_bw": 100 * nbytes / us / 1e3 / read_bw}
            if all("read_floor_us" in r for r in rs):
                row["gqsa_pct_of_read_floor"] = 100 * sum(r["read_floor_us"] for r in rs) / us
            for key in sorted({k for r in rs for k in r if k.endswith("_us") and k != "gqsa_us"}):
                if all(key in r for r in rs):
                    row[key] = sum(r[key] for r in rs)
                    if not key.startswith(("gqsa_", "read_floor")):
                        row[f"speedup_vs_{key[:-3]}"] = row[key] / us
            out.append(row)
            extra = " ".join(f"{k[11:]}={v:.2f}x" for k, v in row.items() if k.startswith("speedup_vs_"))
            floor = (f" ({row['gqsa_pct_of_read_floor']:.0f}% of the read floor)"
                     if "gqsa_pct_of_read_floor" in row else "")
            print(f"layer sum {model:11s} M={M:<4d} {us:8.2f} us {row['gqsa_GBps']:7.0f} GB/s "
                  f"{row['gqsa_pct_read_bw']:5.1f}%{floor} {extra}", flush=True)
    return out


def main() -> None:
    global TC_SPLITS, BANK_ORDER, AFTER_KERNEL, BLOCK_ROWS, SELECTED, DTYPE, GROUP_SIZE, PAIRS, LAYOUT, WARPS_SWEEP
    global SLICE_CUT_USED
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two shapes, four batch sizes (< 60 s)")
    p.add_argument("--out", default="benchmarks/results/kernels.json")
    p.add_argument("--reps", type=int, default=None, help="graph replays per measurement")
    p.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--tokens", default=None, help="comma-separated M values")
    p.add_argument("--skip-balance", action="store_true", help="skip the uniform vs heavy-block test")
    p.add_argument("--tc-splits", type=int, default=0,
                   help="K splits of the tensor-core kernel (default 0: the op chooses)")
    p.add_argument("--gemv-bank-order", action="store_true",
                   help="also time the GEMV with each row's groups reordered by x bank quad "
                        "(cuda_format.bank_order; gqsa_gemv_bank_order_us)")
    p.add_argument("--after-kernel", action="store_true",
                   help="time every call right after a small elementwise kernel that writes x "
                        "(its own time subtracted), as in a model, instead of back to back")
    p.add_argument("--block-rows", type=int, default=1,
                   help="rows per block sharing one keep pattern, as in a --block-rows checkpoint "
                        "(default 1); every shape's N must be a multiple of it")
    p.add_argument("--pattern", choices=["groups", "pairs"], default="groups",
                   help="GQSA sparsity pattern: groups (default: each group kept at random, density "
                        "0.5) or pairs (one group of each aligned pair of group columns, as gqsa-convert "
                        "--pattern pairs writes; times the sparse-tensor-core kernel, gqsa_sp_us)")
    p.add_argument("--baselines", type=parse_baselines, default=frozenset(BASELINES),
                   help=f"what to compare with: all (default), none, or a comma-separated subset of "
                        f"{','.join(BASELINES)}")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16",
                   help="activation dtype of GQSA and every baseline (default float16)")
    p.add_argument("--group-size", type=int, choices=SUPPORTED_GROUP_SIZES, default=GROUP_SIZE,
                   help=f"GQSA weights per group (default {GROUP_SIZE})")
    p.add_argument("--layout", choices=["auto", "rows"], default="auto",
                   help="the kernel layout: the plugin's (sliced where it applies, with the row layout's "
                        "GEMV and tensor-core kernel timed beside it), or the row layout throughout")
    p.add_argument("--sliced-warps-sweep", action="store_true",
                   help="also time the sliced GEMV at 4, 8 and 16 warps per CTA on every shape and M it "
                        "serves (gqsa_gemv_w<W>_us), for re-fitting its warps rule (fit_sliced_warps.py), "
                        "and on the balance test's matrices (us_w<W>)")
    p.add_argument("--balance-shapes", default="4096x4096,14336x4096",
                   help="comma-separated NxK shapes of the uniform vs heavy-block test (default "
                        "4096x4096, as in earlier runs, and 14336x4096, a layer's size)")
    p.add_argument("--slice-cut", type=float, default=SLICE_CUT,
                   help=f"build sliced layers cutting slices longer than this times the mean "
                        f"(default {SLICE_CUT}, the plugin's; a large value cuts none)")
    p.add_argument("--ctas-per-sm", type=int, default=None,
                   help=f"GEMV grid size (default: the plugin's, {cuda.CTAS_PER_SM} per SM)")
    args = p.parse_args()
    ok, reason = cuda.available()
    if not ok:
        raise SystemExit(f"GQSA CUDA ops are not available: {reason}")
    start = time.time()
    BLOCK_ROWS = args.block_rows
    PAIRS = args.pattern == "pairs"
    LAYOUT = args.layout
    WARPS_SWEEP = args.sliced_warps_sweep
    SLICE_CUT_USED = args.slice_cut
    if PAIRS and args.group_size != 16:
        raise SystemExit("--pattern pairs runs at --group-size 16")
    DTYPE = getattr(torch, args.dtype)
    GROUP_SIZE = args.group_size
    # vLLM's ExLlama GPTQ kernel multiplies fp16 activations only (GPTQConfig serves fp16).
    SELECTED = args.baselines - ({"exllama_w2"} if DTYPE != torch.float16 else set())
    TC_SPLITS = args.tc_splits
    BANK_ORDER = args.gemv_bank_order
    AFTER_KERNEL = args.after_kernel
    reps = args.reps or (5 if args.quick else 20)
    num_ctas = cuda.default_num_ctas()
    if args.ctas_per_sm:
        num_ctas = args.ctas_per_sm * torch.cuda.get_device_properties(0).multi_processor_count
    read_bw = measure_read_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: measured read bandwidth {read_bw:.0f} GB/s, GEMV grid {num_ctas} CTAs")
    models = QUICK_MODELS if args.quick else {m: MODELS[m] for m in DEFAULT_MODELS}
    if args.models:
        models = {m: MODELS[m] for m in args.models.split(",")}
    tokens = QUICK_TOKENS if args.quick else TOKENS
    if args.tokens:
        tokens = tuple(int(m) for m in args.tokens.split(","))
    results = []
    for model, layers in models.items():
        for name, N, K in layers:
            results += bench_shape(model, name, N, K, tokens, reps, read_bw, num_ctas)
            torch.cuda.empty_cache()
    summary = summarize(results, read_bw)
    balance = [] if args.skip_balance else [
        row for shape in args.balance_shapes.split(",")
        for row in bench_balance(*(int(v) for v in shape.lower().split("x")), reps, read_bw, num_ctas)]
    out = {"device": props.name, "sm_count": props.multi_processor_count, "torch": torch.__version__,
           "cuda": torch.version.cuda, "vllm": _package_version("vllm"), "command": " ".join(sys.argv), "ops": reason,
           "layout": LAYOUT, "slice_cut": SLICE_CUT_USED, "group_size": GROUP_SIZE, "block_rows": BLOCK_ROWS, "pattern": args.pattern, "density": DENSITY, "activation_dtype": str(DTYPE),
           "read_bandwidth_GBps": read_bw, "num_ctas": num_ctas, "baselines": sorted(SELECTED),
           "dispatch": {"gemv_max_tokens": cuda.GEMV_MAX_TOKENS, "tc_max_tokens": cuda.TC_MAX_TOKENS,
                        "compact_gemv_max_tokens": cuda.COMPACT_GEMV_MAX_TOKENS,
                        "compact_tc_max_tokens": cuda.COMPACT_TC_MAX_TOKENS,
                        "pairs_gemv_max_tokens": cuda.PAIRS_GEMV_MAX_TOKENS,
                        "pairs_sp_max_tokens": cuda.PAIRS_SP_MAX_TOKENS},
           "summary": summary, "results": results, "balance": balance,
           "seconds": time.time() - start}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
