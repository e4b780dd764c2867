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
"""

from __future__ import annotations

import torch

from .format import GQSALayer, LayerFormat
from .reference import dequantize

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


def gqsa_mm(x: torch.Tensor, row_ptr: torch.Tensor, codes: torch.Tensor, meta: torch.Tensor,
            schedule: torch.Tensor, chunks: torch.Tensor, n_out: int, group_size: int,
            xcols: torch.Tensor | None = None, counters: torch.Tensor | None = None,
            pairs: bool = False, sell_rows: torch.Tensor | None = None,
            slice_counters: torch.Tensor | None = None, sell_warps: list[int] | None = None) -> torch.Tensor:
    """``x [M, K] @ W.T`` with W in the CUDA kernel format (``xcols`` for compact tiles,
    ``counters`` for the tensor-core kernels' K splits, ``pairs`` for a layer in the pair pattern,
    which the sparse-tensor-core kernel serves instead of the tensor-core kernel; ``sell_rows``,
    ``slice_counters`` and ``sell_warps`` for a layer in the sliced layout)."""
    from .kernels import cuda
    from .kernels.cuda_format import dequantize_kernel_format

    t = {"row_ptr": row_ptr, "codes": codes, "meta": meta, "schedule": schedule, "chunks": chunks}
    if xcols is not None:
        t["xcols"] = xcols
    if counters is not None:
        t["counters"] = counters
    if sell_rows is not None:
        t.update(sell_rows=sell_rows, slice_counters=slice_counters)
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and cuda.available()[0]:
        gemv_max, tc_max = cuda.dispatch(xcols is not None, pairs)
        if x.shape[0] <= gemv_max:
            return cuda.gemv(x, t, n_out, warps=sell_warps)
        if x.shape[0] <= tc_max:
            return cuda.sp(x, t, n_out) if pairs else cuda.tc(x, t, n_out)
        # Many tokens: the GEMM's arithmetic dwarfs one pass over the weights, so densify
        # and let cuBLAS run at tensor-core speed.
        return x @ cuda.dequant(t, n_out, x.shape[-1], group_size, x.dtype).T
    w = dequantize_kernel_format(row_ptr, codes, meta, n_out, x.shape[-1], group_size, sell_rows)
    return x @ w.to(x.dtype).T


def _gqsa_mm_fake(x, row_ptr, codes, meta, schedule, chunks, n_out, group_size, xcols=None,
                  counters=None, pairs=False, sell_rows=None, slice_counters=None, sell_warps=None):
    return x.new_empty((*x.shape[:-1], n_out))


def register_op(name, func, fake):
    from torch._library.infer_schema import infer_schema

    _LIB.define(name + infer_schema(func, mutates_args=[]))
    # One implementation for every device: the op picks its kernel from the tensors it gets.
    _LIB.impl(name, func, "CompositeExplicitAutograd")
    _LIB._register_fake(name, fake)


register_op("gqsa_mm_reference", gqsa_mm_reference, _gqsa_mm_reference_fake)
register_op("gqsa_mm", gqsa_mm, _gqsa_mm_fake)
