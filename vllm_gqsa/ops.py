# SPDX-License-Identifier: Apache-2.0
"""The GQSA matmul as torch custom ops, so vLLM's torch.compile and CUDA graphs see one opaque call.

``torch.ops.vllm_gqsa.gqsa_mm_reference``: the checkpoint format, any device, any bits /
group size / block rows. It dequantizes with static-shape gathers (no host sync, so it is
CUDA-graph safe) and calls a dense matmul: correct everywhere, fast nowhere.

``torch.ops.vllm_gqsa.gqsa_mm``: the CUDA kernel format (``kernels/cuda_format.py``). The
batch-size-dependent kernel choice happens inside the op, where Dynamo cannot freeze it:
the task-centric GEMV for a few tokens, dequantize + cuBLAS for many. Without the compiled
extension (or on the CPU) it decodes the kernel format in torch.
"""

from __future__ import annotations

import torch

from .format import unpack_bits

_LIB = torch.library.Library("vllm_gqsa", "FRAGMENT")  # kept alive for the ops' lifetime


def gqsa_mm_reference(x: torch.Tensor, block_ids: torch.Tensor, col_idx: torch.Tensor,
                      qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                      n_out: int, bits: int, group_size: int, block_rows: int) -> torch.Tensor:
    """``x [M, K] @ W.T`` with W given in the checkpoint format (``block_ids`` replaces
    ``row_ptr``: the row block of every kept group, precomputed so shapes stay static)."""
    K = x.shape[-1]
    nnz, R, G = qweight.shape[0], block_rows, group_size
    codes = unpack_bits(qweight, bits)  # [nnz, R, G]
    zeros = unpack_bits(qzeros, bits)[:nnz * R].reshape(nnz, R)
    values = ((codes.float() - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)).to(x.dtype)
    w = torch.zeros(n_out // R, R, K // G, G, dtype=x.dtype, device=x.device)
    w[block_ids.long(), :, col_idx.long()] = values
    return x @ w.reshape(n_out, K).T


def _gqsa_mm_reference_fake(x, block_ids, col_idx, qweight, scales, qzeros, n_out, bits,
                            group_size, block_rows):
    return x.new_empty((*x.shape[:-1], n_out))


def gqsa_mm(x: torch.Tensor, row_ptr: torch.Tensor, codes: torch.Tensor, meta: torch.Tensor,
            schedule: torch.Tensor, n_out: int, group_size: int) -> torch.Tensor:
    """``x [M, K] @ W.T`` with W in the CUDA kernel format."""
    from .kernels import cuda
    from .kernels.cuda_format import MAX_GEMV_TOKENS, dequantize_kernel_format

    t = {"row_ptr": row_ptr, "codes": codes, "meta": meta, "schedule": schedule}
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and cuda.available()[0]:
        if x.shape[0] <= MAX_GEMV_TOKENS:
            return cuda.gemv(x, t, n_out)
        # Many tokens: the GEMM's arithmetic dwarfs one pass over the weights, so densify
        # and let cuBLAS run at tensor-core speed.
        return x @ cuda.dequant(t, n_out, x.shape[-1], group_size, x.dtype).T
    w = dequantize_kernel_format(row_ptr, codes, meta, n_out, x.shape[-1], group_size)
    return x @ w.to(x.dtype).T


def _gqsa_mm_fake(x, row_ptr, codes, meta, schedule, n_out, group_size):
    return x.new_empty((*x.shape[:-1], n_out))


def _register(name, func, fake):
    from torch._library.infer_schema import infer_schema

    _LIB.define(name + infer_schema(func, mutates_args=[]))
    # One implementation for every device: the op picks its kernel from the tensors it gets.
    _LIB.impl(name, func, "CompositeExplicitAutograd")
    _LIB._register_fake(name, fake)


_register("gqsa_mm_reference", gqsa_mm_reference, _gqsa_mm_reference_fake)
_register("gqsa_mm", gqsa_mm, _gqsa_mm_fake)
