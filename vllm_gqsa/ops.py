# SPDX-License-Identifier: Apache-2.0
"""The GQSA matmul as torch custom ops, so vLLM's torch.compile and CUDA graphs see one opaque call.

``torch.ops.vllm_gqsa.gqsa_mm_reference``: the checkpoint format, any device, any bits /
group size / block rows. It runs ``reference.dequantize`` (sync-free, so CUDA-graph safe) and a
dense matmul: correct everywhere, fast nowhere.

``torch.ops.vllm_gqsa.gqsa_mm``: the CUDA kernel format (``kernels/cuda_format.py``). The
batch-size-dependent kernel choice happens inside the op, where Dynamo cannot freeze it:
the GEMV for a few tokens (the sliced one where the layer is in the sliced layout), the tensor-core kernel (or, for a layer in the pair
pattern, the sparse-tensor-core kernel) for tens, dequantize + cuBLAS for more. Without the compiled
extension (or on the CPU) it decodes the kernel format in torch.

The others are ``gqsa_mm`` fused with the op around it, which the torch.compile passes of
``fusion.py`` put in its place: ``gqsa_mm_silu_mul`` (a gate/up layer and the SiLU-and-mul after
it), ``gqsa_mm_add_norm_stats`` and ``gqsa_stats_norm_mm`` (an RMSNorm split between two layers:
sliced GEMVs at one token, sparse-tensor-core kernels of pair layers at 2 to 32).
"""

from __future__ import annotations

import torch

from .format import GQSALayer, LayerFormat
from .reference import dequantize, rms_norm, silu_and_mul

_LIB = torch.library.Library("vllm_gqsa", "FRAGMENT")  # kept alive for the ops' lifetime


def gqsa_mm_reference(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                      qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                      n_out: int, bits: int, group_size: int, block_rows: int) -> torch.Tensor:
    """``x [M, K] @ W.T`` with W given in the checkpoint format: the reference math itself."""
    layer = GQSALayer(row_ptr, col_idx, qweight, scales, qzeros, out_features=n_out,
                      in_features=x.shape[-1], fmt=LayerFormat(bits, group_size, block_rows))
    return x @ dequantize(layer, x.dtype).T


def _gqsa_mm_reference_fake(x, row_ptr, col_idx, qweight, scales, qzeros, n_out, bits,
                            group_size, block_rows):
    return x.new_empty((*x.shape[:-1], n_out))


def _cuda_kernels_take(x: torch.Tensor) -> bool:
    """Whether the CUDA kernels serve activations x (fp16 or bf16 on a GPU, the ops loaded)."""
    from .kernels import cuda

    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and cuda.available()[0]


def _kernel_for(x2: torch.Tensor, t: dict | None, compact: bool, pairs: bool) -> str:
    """The kernel gqsa_mm runs for x2 [M, K] (t: the layer's tensors, for the fused kernel's
    alignment check, or None not to check them): "gemv", "sp_wgmma", "sp", "tc", "dequant_cublas", or "torch" without the CUDA
    kernels."""
    from .kernels import cuda

    if not _cuda_kernels_take(x2):
        return "torch"
    gemv_max, tc_max = cuda.dispatch(compact, pairs)
    if x2.shape[0] <= gemv_max:
        return "gemv"
    if pairs and cuda.sp_wgmma_takes(x2, t):
        return "sp_wgmma"
    if x2.shape[0] <= tc_max:
        return "sp" if pairs else "tc"
    return "dequant_cublas"


def _sliced_gemv_takes(x2: torch.Tensor, xcols, pairs: bool, sell_rows) -> bool:
    """Whether gqsa_mm runs the sliced GEMV for x2 [M, K]: the split norm's kernels are its variants."""
    return sell_rows is not None and _kernel_for(x2, None, xcols is not None, pairs) == "gemv"


# The most tokens the sparse-tensor-core kernel's split-norm instances take (gqsa::kMaxSpNormTokens),
# and the input sizes they take: whole 256-channel chunks.
SP_NORM_MAX_TOKENS = 32
SP_NORM_CHUNK = 256


def _sp_norm_takes(x2: torch.Tensor, t: dict, pairs: bool, sell_rows, xcols) -> bool:
    """Whether gqsa_mm runs the sparse-tensor-core kernel for x2 [M, K] (a pair layer), and its
    split-norm instances take the batch: at most SP_NORM_MAX_TOKENS tokens, K a multiple of 256."""
    return (pairs and sell_rows is None and xcols is None and x2.shape[0] <= SP_NORM_MAX_TOKENS
            and x2.shape[-1] > 0 and x2.shape[-1] % SP_NORM_CHUNK == 0 and _kernel_for(x2, t, False, pairs) == "sp")


def gqsa_mm(x: torch.Tensor, row_ptr: torch.Tensor, codes: torch.Tensor, meta: torch.Tensor,
            schedule: torch.Tensor, chunks: torch.Tensor, n_out: int, group_size: int,
            xcols: torch.Tensor | None = None, counters: torch.Tensor | None = None,
            pairs: bool = False, sell_rows: torch.Tensor | None = None,
            slice_parts: torch.Tensor | None = None, sell_warps: list[int] | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` with W in the CUDA kernel format (``xcols`` for compact tiles,
    ``counters`` for the tensor-core kernels' K splits, ``pairs`` for a layer in the pair pattern,
    which the sparse-tensor-core kernel serves instead of the tensor-core kernel; ``sell_rows``,
    ``slice_parts`` and ``sell_warps`` for a layer in the sliced layout)."""
    from .kernels import cuda
    from .kernels.cuda_format import dequantize_kernel_format

    t = {"row_ptr": row_ptr, "codes": codes, "meta": meta, "schedule": schedule, "chunks": chunks}
    if xcols is not None:
        t["xcols"] = xcols
    if counters is not None:
        t["counters"] = counters
    if sell_rows is not None:
        t.update(sell_rows=sell_rows, slice_parts=slice_parts)
    kernel = _kernel_for(x, t, xcols is not None, pairs)
    if kernel == "gemv":
        return cuda.gemv(x, t, n_out, warps=sell_warps)
    if kernel == "sp_wgmma":
        return cuda.sp_wgmma(x, t, n_out)
    if kernel in ("sp", "tc"):
        return cuda.sp(x, t, n_out) if pairs else cuda.tc(x, t, n_out)
    if kernel == "dequant_cublas":
        # Many tokens: the GEMM's arithmetic dwarfs one pass over the weights, so densify
        # and let cuBLAS run at tensor-core speed.
        return x @ cuda.dequant(t, n_out, x.shape[-1], group_size, x.dtype).T
    w = dequantize_kernel_format(row_ptr, codes, meta, n_out, x.shape[-1], group_size, sell_rows)
    return x @ w.to(x.dtype).T


def _gqsa_mm_fake(x, row_ptr, codes, meta, schedule, chunks, n_out, group_size, xcols=None,
                  counters=None, pairs=False, sell_rows=None, slice_parts=None, sell_warps=None):
    return x.new_empty((*x.shape[:-1], n_out))


def _sp_silu_mul_takes(x2: torch.Tensor, t: dict, n_out: int, pairs: bool, sell_rows) -> bool:
    """Whether gqsa_mm runs the sparse-tensor-core kernel for x2 [M, K], which then can do the
    SiLU-and-mul in its finish (a pair layer of an even number of rows)."""
    return pairs and sell_rows is None and n_out % 2 == 0 and _kernel_for(x2, t, False, pairs) == "sp"


def gqsa_mm_silu_mul(x: torch.Tensor, row_ptr: torch.Tensor, codes: torch.Tensor, meta: torch.Tensor,
                     schedule: torch.Tensor, chunks: torch.Tensor, n_out: int, group_size: int,
                     xcols: torch.Tensor | None = None, counters: torch.Tensor | None = None,
                     pairs: bool = False, sell_rows: torch.Tensor | None = None,
                     slice_parts: torch.Tensor | None = None, sell_warps: list[int] | None = None) -> torch.Tensor:
    """vLLM's SiLU-and-mul of ``gqsa_mm``'s output for a gate/up layer (gate's ``n_out / 2`` rows,
    then up's): ``silu(y[..., :n_out / 2]) * y[..., n_out / 2:]``, ``[..., n_out / 2]``. Where the
    sparse-tensor-core kernel serves the batch, its CTAs do it in their finish, and the gate/up
    output is never written; elsewhere it is ``gqsa_mm``, then the reference's SiLU-and-mul."""
    from .kernels import cuda

    t = {"row_ptr": row_ptr, "codes": codes, "meta": meta, "counters": counters}
    x2 = x.reshape(-1, x.shape[-1])
    if _sp_silu_mul_takes(x2, t, n_out, pairs, sell_rows):
        return cuda.sp(x, t, n_out, silu_mul=True)
    return silu_and_mul(gqsa_mm(x, row_ptr, codes, meta, schedule, chunks, n_out, group_size, xcols, counters,
                                pairs, sell_rows, slice_parts, sell_warps))


def _gqsa_mm_silu_mul_fake(x, row_ptr, codes, meta, schedule, chunks, n_out, group_size, xcols=None,
                           counters=None, pairs=False, sell_rows=None, slice_parts=None, sell_warps=None):
    return x.new_empty((*x.shape[:-1], n_out // 2))


# The largest |h * norm_weight| the split norm's fast path takes (gqsa_kernels.cu, kSplitGLimit):
# finite in fp16, which the GEMV's copy of x is.
SPLIT_G_LIMIT = 65504.0


def gqsa_mm_add_norm_stats(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor | None,
                           row_ptr: torch.Tensor, codes: torch.Tensor, meta: torch.Tensor, schedule: torch.Tensor,
                           chunks: torch.Tensor, n_out: int, group_size: int, xcols: torch.Tensor | None = None,
                           counters: torch.Tensor | None = None, pairs: bool = False,
                           sell_rows: torch.Tensor | None = None, slice_parts: torch.Tensor | None = None,
                           sell_warps: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first half of a norm split between two GEMVs (``gqsa_stats_norm_mm`` is the second):
    ``y = gqsa_mm(x)`` and h = y + residual in fp32 as vLLM's ``fused_add_rms_norm`` adds them;
    returns ``(T(h), g, stats)``: the new residual and g = T(h * norm_weight) in x's dtype, and
    sums of h^2 per token, ``[M, parts]``, each -1 - the sum where a part's g exceeds
    ``SPLIT_G_LIMIT`` (the second half then normalizes h itself). For a layer in the sliced layout
    and a batch its GEMV serves, the GEMV's CTAs do it in their epilogue (one part each) and y is
    never written; for a pair layer and a batch its sparse-tensor-core kernel serves (2 to 32
    tokens), that kernel does it in its finish (a part per 32 rows)."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    r2 = residual.reshape(x2.shape[0], n_out).contiguous()
    if _sliced_gemv_takes(x2, xcols, pairs, sell_rows):
        out_residual, g, stats = torch.ops.vllm_gqsa.gqsa_sliced_gemv_add_stats(
            x2, r2, norm_weight, sell_rows, schedule, codes, meta, slice_parts, n_out,
            sell_warps if sell_warps is not None else [])
    elif _sp_norm_takes(x2, {"codes": codes, "meta": meta}, pairs, sell_rows, xcols):
        out_residual, g, stats = torch.ops.vllm_gqsa.gqsa_sp_add_stats(
            x2, r2, norm_weight, row_ptr, codes, meta, n_out, 0, counters)
    else:
        h = gqsa_mm(x2, row_ptr, codes, meta, schedule, chunks, n_out, group_size, xcols, counters, pairs,
                    sell_rows, slice_parts, sell_warps).float() + r2.float()
        out_residual = h.to(x.dtype)
        g = (h * norm_weight.float() if norm_weight is not None else h).to(x.dtype)
        total = h.pow(2).sum(-1, keepdim=True)
        over = ~(g.float().abs() <= SPLIT_G_LIMIT).all(-1, keepdim=True)
        # One part, then zeros: the same shape as the kernel's.
        stats = torch.nn.functional.pad(torch.where(over, -1 - total, total),
                                        (0, _stat_parts(schedule, sell_rows, pairs, n_out) - 1))
    return out_residual.reshape(residual.shape), g, stats


def _stat_parts(schedule: torch.Tensor, sell_rows: torch.Tensor | None, pairs: bool, n_out: int) -> int:
    """Columns of gqsa_mm_add_norm_stats' sums: the sliced GEMV's pieces, a pair layer's groups of
    32 rows (the sparse-tensor-core kernel's), else 1."""
    if sell_rows is not None:
        return schedule.shape[0]
    return (n_out + 31) // 32 if pairs else 1


def _gqsa_mm_add_norm_stats_fake(x, residual, norm_weight, row_ptr, codes, meta, schedule, chunks, n_out,
                                 group_size, xcols=None, counters=None, pairs=False, sell_rows=None,
                                 slice_parts=None, sell_warps=None):
    M = x.numel() // x.shape[-1]
    return (torch.empty_like(residual), x.new_empty((M, n_out)),
            x.new_empty((M, _stat_parts(schedule, sell_rows, pairs, n_out)), dtype=torch.float32))


def gqsa_stats_norm_mm(g: torch.Tensor, stats: torch.Tensor, eps: float, residual: torch.Tensor,
                       norm_weight: torch.Tensor | None, row_ptr: torch.Tensor, codes: torch.Tensor,
                       meta: torch.Tensor, schedule: torch.Tensor, chunks: torch.Tensor, n_out: int, group_size: int,
                       xcols: torch.Tensor | None = None, counters: torch.Tensor | None = None, pairs: bool = False,
                       sell_rows: torch.Tensor | None = None, slice_parts: torch.Tensor | None = None,
                       sell_warps: list[int] | None = None, silu_mul: bool = False) -> torch.Tensor:
    """The second half of the split norm: ``gqsa_mm`` of vLLM's RMSNorm of ``residual`` (h, the
    first half's new residual) with ``norm_weight``, or with ``silu_mul`` ``gqsa_mm_silu_mul``'s
    result. For a layer in the sliced layout and a batch its GEMV serves, every CTA of the GEMV
    computes r = rsqrt(sum(stats) / K + eps) per token and, as r is one number per token, returns
    T(r * gqsa_mm(g)) in fp32, with g copied as a plain x is; where a stat marks g too large, it
    normalizes h as vLLM does instead. The sparse-tensor-core kernel does the same for a pair
    layer at 2 to 32 tokens (and scales gate and up before the SiLU-and-mul). Elsewhere it is the
    norm, then the layer."""
    if _sliced_gemv_takes(g, xcols, pairs, sell_rows):
        y = torch.ops.vllm_gqsa.gqsa_sliced_gemv_from_stats(
            g.contiguous(), stats.contiguous(), eps, residual.contiguous(), norm_weight, sell_rows, schedule, codes,
            meta, slice_parts, n_out, sell_warps if sell_warps is not None else [])
        return silu_and_mul(y) if silu_mul else y
    if (not silu_mul or n_out % 2 == 0) and _sp_norm_takes(g, {"codes": codes, "meta": meta}, pairs, sell_rows, xcols):
        return torch.ops.vllm_gqsa.gqsa_sp_from_stats(
            g.contiguous(), stats.contiguous(), eps, residual.contiguous(), norm_weight, row_ptr, codes, meta, n_out, 0,
            counters, silu_mul)
    x, _ = rms_norm(residual, None, norm_weight, eps)
    layer = gqsa_mm_silu_mul if silu_mul else gqsa_mm
    return layer(x, row_ptr, codes, meta, schedule, chunks, n_out, group_size, xcols, counters, pairs, sell_rows,
                 slice_parts, sell_warps)


def _gqsa_stats_norm_mm_fake(g, stats, eps, residual, norm_weight, row_ptr, codes, meta, schedule, chunks, n_out,
                             group_size, xcols=None, counters=None, pairs=False, sell_rows=None, slice_parts=None,
                             sell_warps=None, silu_mul=False):
    return g.new_empty((g.shape[0], n_out // 2 if silu_mul else n_out))


def register_op(name, func, fake):
    from torch._library.infer_schema import infer_schema

    _LIB.define(name + infer_schema(func, mutates_args=[]))
    # One implementation for every device: the op picks its kernel from the tensors it gets.
    _LIB.impl(name, func, "CompositeExplicitAutograd")
    _LIB._register_fake(name, fake)


register_op("gqsa_mm_reference", gqsa_mm_reference, _gqsa_mm_reference_fake)
register_op("gqsa_mm", gqsa_mm, _gqsa_mm_fake)
register_op("gqsa_mm_silu_mul", gqsa_mm_silu_mul, _gqsa_mm_silu_mul_fake)
register_op("gqsa_mm_add_norm_stats", gqsa_mm_add_norm_stats, _gqsa_mm_add_norm_stats_fake)
register_op("gqsa_stats_norm_mm", gqsa_stats_norm_mm, _gqsa_stats_norm_mm_fake)
