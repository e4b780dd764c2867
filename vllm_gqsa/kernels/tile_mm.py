# SPDX-License-Identifier: Apache-2.0
"""A Triton tensor-core kernel for batched decode (about 9 to 64 tokens): kept groups densified in
registers, tile by tile, and multiplied with ``tl.dot``.

The task-centric GEMV (``csrc/``) does its arithmetic on CUDA cores, so its time grows with every
token; dequantize + cuBLAS writes and reads a dense fp16 copy of the weight (32 bits per weight)
on every call. This kernel reads only the compressed weight: each program owns ``BLOCK_N`` output
rows and a slice of the input, and for every ``BLOCK_K`` input channels it finds each row's kept
groups, decodes them into a dense ``[BLOCK_N, BLOCK_K]`` tile (zeros where a group was pruned) and
feeds the tensor cores. Pruned groups cost tensor-core work, not memory traffic.

Finding a row's group at column ``c`` without walking the row uses two small tables built once
at load time (:func:`tile_tables`), one int32 per row and per 32 group columns (0.125 bits per
weight, about 4% of a W4 S50% g16 layer):

- ``mask[n, w]``: bit ``b`` is set when row n kept group column ``32w + b``;
- ``base[n, w]``: the index (into ``codes`` / ``meta``) of row n's first kept group at or after
  column ``32w``.

so the group is ``base[n, c // 32] + popcount(mask[n, c // 32] & ((1 << c % 32) - 1))``. Each
lookup is independent, so the input can be split over programs (``split_k``), whose fp32
partial sums are added with atomics.

The weights are the CUDA kernel format's ``codes`` and ``meta`` (``cuda_format.py``); only the two
tables are added. Tested against the reference on the CPU with Triton's interpreter
(``TRITON_INTERPRET=1``) and on the GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the plugin works without Triton; this kernel then is not offered
    triton = None

from .cuda_format import WEIGHTS_PER_WORD, unpack_meta

BITS_PER_MASK_WORD = 32


def tile_tables(row_ptr: torch.Tensor, meta: torch.Tensor, N: int, K: int,
                group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``mask`` and ``base`` tables (int32 ``[N, ceil(K / group_size / 32)]``) of a layer in
    the kernel format, on row_ptr's device."""
    KG = K // group_size
    KW = -(-KG // BITS_PER_MASK_WORD)
    device = row_ptr.device
    rp = row_ptr.to(torch.int64)
    nnz = int(rp[-1])
    counts = rp[1:] - rp[:-1]
    rows = torch.repeat_interleave(torch.arange(N, device=device), counts, output_size=nnz)
    cols = unpack_meta(meta)[2]
    word, bit = cols // BITS_PER_MASK_WORD, cols % BITS_PER_MASK_WORD
    mask = torch.zeros(N * KW, dtype=torch.int64, device=device)
    mask.index_add_(0, rows * KW + word, torch.ones_like(bit) << bit)  # distinct bits: add is or
    # base[n, w] = row_ptr[n] + the kept groups of row n in words before w.
    per_word = torch.zeros(N * KW, dtype=torch.int64, device=device)
    per_word.index_add_(0, rows * KW + word, torch.ones_like(word))
    per_word = per_word.reshape(N, KW)
    base = rp[:-1, None] + per_word.cumsum(1) - per_word
    mask = torch.where(mask >= 2**31, mask - 2**32, mask).reshape(N, KW)
    return mask.to(torch.int32), base.to(torch.int32)


if triton is not None:

    @triton.jit
    def _popcount32(v):
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F
        return ((v * 0x01010101) & 0xFFFFFFFF) >> 24

    @triton.jit
    def _tile_mm_kernel(x_ptr, y_ptr, codes_ptr, meta_ptr, mask_ptr, base_ptr,
                        M, N, K, KW, steps_per_split, stride_xm, stride_ym,
                        G: tl.constexpr, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, ATOMIC: tl.constexpr):
        WORDS: tl.constexpr = G // 8
        BLOCK_K: tl.constexpr = G * GROUPS
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        toks = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        tok_ok = toks < M
        KG = K // G
        g_in = tl.arange(0, GROUPS)
        w_in = tl.arange(0, WORDS)
        nib = tl.arange(0, 8) * 4
        k_in = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first = pid_k * steps_per_split
        for step in range(first, first + steps_per_split):
            cols = step * GROUPS + g_in  # group columns of this step
            col_ok = row_ok[:, None] & (cols < KG)[None, :]
            tab = rows[:, None] * KW + (cols // 32)[None, :]
            word = tl.load(mask_ptr + tab, mask=col_ok, other=0).to(tl.int64) & 0xFFFFFFFF
            bit = (cols % 32).to(tl.int64)[None, :]
            kept = ((word >> bit) & 1) != 0
            below = word & ((tl.full((1, GROUPS), 1, tl.int64) << bit) - 1)
            idx = tl.load(base_ptr + tab, mask=col_ok, other=0) + _popcount32(below).to(tl.int32)
            idx = tl.where(kept, idx, 0)  # a pruned slot reads group 0 (masked below)
            # [BLOCK_N, GROUPS, WORDS] code words, then their 8 nibbles each.
            cw = tl.load(codes_ptr + idx[:, :, None] * WORDS + w_in[None, None, :],
                         mask=kept[:, :, None], other=0)
            q = (cw[:, :, :, None] >> nib[None, None, None, :]) & 0xF
            meta = tl.load(meta_ptr + idx, mask=kept, other=0)
            scale = (meta & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            zero = ((meta >> 16) & 0xF).to(tl.float32)
            w = (q.to(tl.float32) - zero[:, :, None, None]) * scale[:, :, None, None]
            w = tl.where(kept[:, :, None, None], w, 0.0)
            w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(x_ptr.dtype.element_ty)
            ks = step * BLOCK_K + k_in
            xt = tl.load(x_ptr + toks[:, None] * stride_xm + ks[None, :],
                         mask=tok_ok[:, None] & (ks < K)[None, :], other=0.0)
            acc += tl.dot(xt, tl.trans(w))
        out = y_ptr + toks[:, None] * stride_ym + rows[None, :]
        ok = tok_ok[:, None] & row_ok[None, :]
        if ATOMIC:
            tl.atomic_add(out, acc, mask=ok)
        else:
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=ok)


def available() -> bool:
    return triton is not None


def default_split_k(N: int, K: int, group_size: int, num_sms: int, block_n: int = 32,
                    groups_per_step: int = 4) -> int:
    """Splits of the input per row tile: about two programs per SM, at least 8 steps each."""
    tiles = -(-N // block_n)
    steps = -(-(K // group_size) // groups_per_step)
    return max(1, min(-(-2 * num_sms // tiles), steps // 8))


def tile_mm(x: torch.Tensor, codes: torch.Tensor, meta: torch.Tensor, mask: torch.Tensor,
            base: torch.Tensor, n_out: int, group_size: int, split_k: int = 1,
            block_n: int = 32, groups_per_step: int = 4) -> torch.Tensor:
    """``x [M, K] @ W.T`` for W in the kernel format plus :func:`tile_tables`. ``split_k`` > 1
    splits the input over that many programs per tile (fp32 atomics, so the order of the partial
    sums, and the last bits of the result, can differ between runs)."""
    if triton is None:
        raise RuntimeError("the tile kernel needs Triton")
    M, K = x.shape
    G = group_size
    if K % G or G % WEIGHTS_PER_WORD:
        raise ValueError(f"input size {K} and group size {G} do not fit the kernel format")
    steps = -(-(K // G) // groups_per_step)
    split_k = max(1, min(split_k, steps))
    steps_per_split = -(-steps // split_k)
    split_k = -(-steps // steps_per_split)
    block_m = max(16, triton.next_power_of_2(M))
    x = x.contiguous()
    y = torch.zeros((M, n_out), dtype=torch.float32, device=x.device) if split_k > 1 else \
        torch.empty((M, n_out), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(M, block_m), split_k)
    _tile_mm_kernel[grid](x, y, codes, meta, mask, base, M, n_out, K, mask.shape[1], steps_per_split,
                          x.stride(0), y.stride(0), G=G, GROUPS=groups_per_step, BLOCK_M=block_m,
                          BLOCK_N=block_n, ATOMIC=split_k > 1)
    return y.to(x.dtype) if split_k > 1 else y
