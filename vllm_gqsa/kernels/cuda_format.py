# SPDX-License-Identifier: Apache-2.0
"""The kernel format of the CUDA kernels in ``csrc/gqsa_kernels.cu``. This docstring is its spec.

The checkpoint format (:mod:`vllm_gqsa.format`) is not the kernel format: the plugin repacks each
layer once at load time with :func:`to_kernel_format`. The kernels handle ``bits = 4``,
``group_size`` G in {16, 32, 64, 128} and at most 4096 group columns (see :func:`can_implement`).
Rows are single: a checkpoint with ``block_rows`` R > 1 is repacked so that each row of a row block
holds the block's group columns (:meth:`GQSALayer.single_rows`); every group carries its column in
``meta`` anyway, so the kernel format is the same size whatever R. For a layer with N rows, K inputs
and ``nnz`` kept groups (counted per row):

============  =====  ====================  =================================================
tensor        dtype  shape                 content
============  =====  ====================  =================================================
``row_ptr``   int32  ``[N + 1]``           as in the checkpoint: the kept groups of row n are
                                           ``row_ptr[n] .. row_ptr[n+1]-1``, in increasing
                                           column order
``codes``     int32  ``[nnz, G / 8]``      4-bit codes; word w of a group holds its weights
                                           ``8w .. 8w+7``, weight ``8w+i`` in bits
                                           ``4i .. 4i+3`` (the checkpoint's ``qweight`` bytes
                                           read as little-endian int32, so repacking codes is
                                           a reinterpretation)
``meta``      int32  ``[nnz]``             bits 0-15: the fp16 scale's bit pattern; bits
                                           16-19: the zero point; bits 20-31: the group column
                                           (so ``K / G <= 4096``)
``schedule``  int32  ``[T + 1, 2]``        the GEMV's persistent grid, one task per warp:
                                           ``T = num_ctas * WARPS_PER_CTA``; task
                                           ``t = c * WARPS_PER_CTA + w`` is warp w of CTA c;
                                           ``schedule[t] = (first kept group, first row)``;
                                           task t's groups end where task t+1's begin;
                                           ``schedule[T] = (nnz, N)``
``chunks``    int32  ``[N, ceil(K/256)]``  the tensor-core kernel's map of each row's groups
                                           per chunk of ``TC_CHUNK = 256`` input channels:
                                           bits 0-15 of entry ``[n, c]`` say which of the
                                           chunk's ``256 / G`` group columns row n keeps (bit
                                           j: column ``c * 256 / G + j``), bits 16-31 how many
                                           groups row n keeps in chunks ``0 .. c-1``
``xcols``     int32  ``[T, C, 256 / G]``   only for compact tiles (below): slot j of chunk c
                                           of tile t is group column ``xcols[t, c, j]``, or
                                           -1 past the tile's last kept column
``counters``  int32  ``[T]``               zeros: the tensor-core kernel's count of the
                                           finished K splits of each 64-row tile, which the
                                           last split sets back to 0, so they are zeros again
                                           after every call (T = ceil(N / 64))
============  =====  ====================  =================================================

A kept weight is ``W[n, c*G + j] = s * (q - z)`` as in the checkpoint; every other weight is 0.
The GEMV alone also reads a row's groups in any order, since each carries its column in ``meta``:
:func:`with_bank_order` gives such a layout, for measuring whether fewer shared-memory bank
conflicts make it faster; the plugin keeps column order, which the tensor-core kernel needs.

The schedule balances kept groups, not rows: CTA boundaries are the row boundaries nearest to
``c * nnz / num_ctas``, so each CTA owns whole rows (every output is written once, by one CTA,
with no global fix-up) and holds ``nnz / num_ctas`` groups give or take one row. Inside a CTA
the groups are split exactly evenly over its warps, whatever the row lengths; rows cut by a warp
edge are combined in shared memory. The first task of CTA c starts at the CTA's first row (which
may be empty); any other task's row is the row holding its first group. CTA c computes rows
``schedule[c*W, 1] .. schedule[(c+1)*W, 1] - 1`` (W = WARPS_PER_CTA).
The tensor-core kernel (batches of 4 to 64 tokens by default) works on tiles of 64 rows and walks the input
a chunk at a time; ``chunks`` tells it, without reading meta, where each row's groups of a chunk
start and which group columns they are, so it can copy them to their dense places with no search.

Compact tiles. When every row of each 64-row tile (``TC_ROWS``; the last may be shorter) keeps
the same group columns, as a checkpoint with ``block_rows`` a multiple of 64 does, the tensor-core
kernel walks only the kept columns: chunk c of a tile is its kept columns ``c * 256 / G ..`` (all
the tile's rows hold them at the same offsets in their rows), ``xcols`` names them for the copy of
x, and ``chunks`` has C = the most chunks any tile needs columns (T = ceil(N / 64) tiles), with
entry ``[n, c]`` = the mask of the slots of chunk c that hold a column and, in bits 16-31,
``c * 256 / G`` capped at the row's group count. With single rows, 98.7% of a 16-row tile's group
columns are kept by some row in a one-shot SmolLM2-135M at S50% (``benchmarks/tile_columns.py``),
so only such checkpoints have compact tiles.

The pair pattern. When G = 16 and every row keeps exactly one group of each aligned pair of group
columns (2j, 2j + 1), as a checkpoint converted with ``--pattern pairs`` does, row n's j-th kept
group is the one of pair j, at ``row_ptr[n] + j``. Such a layer is 2:4-sparse once the 32 channels
of each pair are read interleaved, and the sparse-tensor-core kernel (``gqsa_sp``) multiplies only
its kept weights; it needs no tensor beyond the ones above (:func:`pair_pattern` says whether a
layer qualifies).

``counters`` are working memory that lives with the layer, as Marlin's workspace does, so that a
call need not zero fresh ones with one more kernel. Calls that share them must be ordered (one CUDA
stream), which is how a model calls a layer.

``num_ctas`` is chosen at load time, a few per SM (:func:`vllm_gqsa.kernels.cuda.default_num_ctas`);
``row_per_cta_schedule`` gives the classic one-CTA-per-row grid, for comparison.

Everything here is pure torch and runs on the CPU.
"""

from __future__ import annotations

import torch

from ..format import GQSALayer, is_pair_pattern

SUPPORTED_BITS = 4
SUPPORTED_GROUP_SIZES = (16, 32, 64, 128)
MAX_GROUP_COLS = 4096  # group columns held in the 12 top bits of meta
MAX_GEMV_TOKENS = 8  # tokens per GEMV kernel launch (gqsa::kMaxGemvTokens)
WARPS_PER_CTA = 8  # kGemvWarps in csrc/gqsa_kernels.h
WEIGHTS_PER_WORD = 8

ZERO_SHIFT = 16
COL_SHIFT = 20
TC_CHUNK = 256  # input channels per chunk of the tensor-core kernel (gqsa::kTcChunk)
TC_ROWS = 64  # rows per tile of the tensor-core kernel (gqsa::kTcRows)
TENSOR_NAMES = ("row_ptr", "codes", "meta", "schedule", "chunks", "counters")  # and "xcols" for compact tiles


def can_implement(bits: int, group_size: int, N: int, K: int) -> tuple[bool, str | None]:
    """Whether the CUDA kernels handle a layer of this format and shape (any block_rows); the
    reason when not."""
    if bits != SUPPORTED_BITS:
        return False, f"the CUDA kernels handle {SUPPORTED_BITS}-bit codes only, not bits={bits}"
    if group_size not in SUPPORTED_GROUP_SIZES:
        return False, f"group_size={group_size} is not one of {SUPPORTED_GROUP_SIZES}"
    if N < 0 or K < 0 or K % group_size:
        return False, f"input size {K} is not a multiple of group_size {group_size}"
    if K // group_size > MAX_GROUP_COLS:
        return False, (f"input size {K} has {K // group_size} group columns, more than the "
                       f"{MAX_GROUP_COLS} that meta's 12-bit column field holds; shard the layer "
                       f"along its input (row-parallel tensor parallelism) or use a larger group_size")
    return True, None


def cta_row_bounds(row_ptr: torch.Tensor, num_ctas: int) -> torch.Tensor:
    """Row boundaries int64 ``[num_ctas + 1]`` of the CTAs: boundary c is the row boundary whose
    group offset is nearest to ``c * nnz / num_ctas``."""
    if num_ctas < 1:
        raise ValueError(f"num_ctas must be at least 1, got {num_ctas}")
    rp = row_ptr.to(torch.int64).cpu()
    N = rp.numel() - 1
    nnz = int(rp[-1])
    targets = torch.arange(num_ctas + 1, dtype=torch.float64) * (nnz / num_ctas)
    # The first row boundary at or after each target, and the one before it: keep the nearer.
    after = torch.searchsorted(rp.to(torch.float64), targets).clamp(max=N)
    before = (after - 1).clamp(min=0)
    nearer_before = (targets - rp[before].to(torch.float64)) < (rp[after].to(torch.float64) - targets)
    bounds = torch.where(nearer_before, before, after)
    bounds[0], bounds[-1] = 0, N
    return torch.cummax(bounds, 0).values


def warp_schedule(row_ptr: torch.Tensor, cta_rows: torch.Tensor) -> torch.Tensor:
    """The ``schedule`` tensor for CTAs owning rows ``cta_rows[c] .. cta_rows[c+1]-1``: each
    CTA's groups split exactly evenly over its warps. On row_ptr's device."""
    rp = row_ptr.to(torch.int64).cpu()
    R = cta_rows.to(torch.int64).cpu()
    N, nnz = rp.numel() - 1, int(rp[-1])
    first, last = R[:-1], R[1:]
    g_begin = rp[first]
    span = rp[last] - g_begin
    w = torch.arange(WARPS_PER_CTA, dtype=torch.int64)
    groups = g_begin[:, None] + span[:, None] * w // WARPS_PER_CTA  # [num_ctas, W]
    # The row holding each task's first group: the last row starting at or before it, kept inside
    # the CTA (a task with no groups at a CTA's end is clamped to its last row).
    rows = torch.searchsorted(rp, groups, right=True) - 1
    rows = torch.maximum(torch.minimum(rows, (last - 1).clamp(min=0)[:, None]), first[:, None])
    rows[:, 0] = first
    tasks = torch.stack([groups.reshape(-1), rows.reshape(-1)], dim=1)
    end = torch.tensor([[nnz, N]], dtype=torch.int64)
    return torch.cat([tasks, end]).to(torch.int32).to(row_ptr.device)


def make_schedule(row_ptr: torch.Tensor, num_ctas: int) -> torch.Tensor:
    """The balanced GEMV schedule (int32 ``[num_ctas * WARPS_PER_CTA + 1, 2]``)."""
    return warp_schedule(row_ptr, cta_row_bounds(row_ptr, num_ctas))


def row_per_cta_schedule(row_ptr: torch.Tensor) -> torch.Tensor:
    """One CTA per row: the row-centric grid, for comparison with the balanced schedule."""
    N = row_ptr.numel() - 1
    return warp_schedule(row_ptr, torch.arange(N + 1, dtype=torch.int64))


def chunk_table(row_ptr: torch.Tensor, col_idx: torch.Tensor, K: int, group_size: int) -> torch.Tensor:
    """The ``chunks`` tensor (int32 ``[N, ceil(K / TC_CHUNK)]``) of rows whose kept groups have the
    sorted group columns ``col_idx`` (CSR with ``row_ptr``). On row_ptr's device."""
    rp = row_ptr.to(torch.int64)
    N = rp.numel() - 1
    n_chunks = -(-K // TC_CHUNK)
    cols_per_chunk = TC_CHUNK // group_size
    counts = rp[1:] - rp[:-1]
    rows = torch.repeat_interleave(torch.arange(N, device=rp.device), counts)
    cols = col_idx.to(torch.int64).reshape(-1)
    chunk, bit = cols // cols_per_chunk, cols % cols_per_chunk
    flat = rows * n_chunks + chunk
    # Columns are distinct within a row, so summing their bits is OR-ing them.
    mask = torch.zeros(N * n_chunks, dtype=torch.int64, device=rp.device).index_add_(0, flat, 1 << bit)
    kept = torch.bincount(flat, minlength=N * n_chunks).reshape(N, n_chunks)
    before = kept.cumsum(1) - kept
    return (mask.reshape(N, n_chunks) | (before << 16)).to(torch.int32)


def compact_chunk_table(row_ptr: torch.Tensor, col_idx: torch.Tensor, K: int, group_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(chunks, xcols)`` of compact tiles (see the format) if every row of each TC_ROWS-row tile
    keeps the same group columns and that saves chunks, else None. On row_ptr's device."""
    rp = row_ptr.to(torch.int64)
    N = rp.numel() - 1
    cols = col_idx.to(torch.int64).reshape(-1)
    counts = rp[1:] - rp[:-1]
    row = torch.arange(N, device=rp.device)
    lead = row - row % TC_ROWS  # each row's tile's first row
    if N == 0 or not torch.equal(counts, counts[lead]):
        return None
    rows = torch.repeat_interleave(row, counts, output_size=cols.numel())
    pos = torch.arange(cols.numel(), device=rp.device) - rp[rows]  # a group's place in its row
    if not torch.equal(cols, cols[rp[lead[rows]] + pos]):
        return None
    slots = TC_CHUNK // group_size
    n_chunks = int(-(-int(counts.max()) // slots))
    if n_chunks >= -(-K // TC_CHUNK):
        return None
    tiles = -(-N // TC_ROWS)
    xcols = torch.full((tiles, n_chunks * slots), -1, dtype=torch.int64, device=rp.device)
    first = rows == lead[rows]  # the groups of each tile's first row name the tile's columns
    xcols[rows[first] // TC_ROWS, pos[first]] = cols[first]
    start = torch.arange(n_chunks, device=rp.device) * slots
    before = torch.minimum(start, counts[:, None])
    in_chunk = (counts[:, None] - start).clamp(0, slots)
    chunks = ((1 << in_chunk) - 1) | (before << 16)
    return chunks.to(torch.int32), xcols.reshape(tiles, n_chunks, slots).to(torch.int32)


def pack_meta(scales: torch.Tensor, zeros: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """int32 meta from fp16 scales, zero points in [0, 16) and group columns in [0, 4096)."""
    bits = scales.to(torch.float16).contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    word = bits | (zeros.to(torch.int64) << ZERO_SHIFT) | (cols.to(torch.int64) << COL_SHIFT)
    # Reinterpret the unsigned 32-bit value as int32 (column >= 2048 sets the sign bit).
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_meta(meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_meta`: (fp16 scales, int64 zeros, int64 columns)."""
    word = meta.to(torch.int64) & 0xFFFFFFFF
    bits = word & 0xFFFF
    scales = torch.where(bits >= 2**15, bits - 2**16, bits).to(torch.int16).view(torch.float16)
    return scales, (word >> ZERO_SHIFT) & 0xF, word >> COL_SHIFT


def to_kernel_format(layer: GQSALayer, num_ctas: int) -> dict[str, torch.Tensor]:
    """Repack a validated checkpoint layer into the kernel format, on the layer's device."""
    fmt = layer.fmt
    ok, reason = can_implement(fmt.bits, fmt.group_size, layer.out_features, layer.in_features)
    if not ok:
        raise ValueError(f"GQSA CUDA kernels cannot run this layer: {reason}")
    layer = layer.single_rows()
    nnz, G = layer.nnz, fmt.group_size
    codes = layer.qweight.reshape(nnz, G // 2).contiguous().view(torch.int32)
    meta = pack_meta(layer.scales.reshape(nnz), layer.zeros().reshape(nnz), layer.col_idx.long())
    t = {
        "row_ptr": layer.row_ptr.to(torch.int32).contiguous(),
        "codes": codes,
        "meta": meta,
        "schedule": make_schedule(layer.row_ptr, num_ctas),
    }
    compact = compact_chunk_table(layer.row_ptr, layer.col_idx, layer.in_features, G)
    if compact is None:
        t["chunks"] = chunk_table(layer.row_ptr, layer.col_idx, layer.in_features, G)
    else:
        t["chunks"], t["xcols"] = compact
    t["counters"] = split_counters(layer.out_features, layer.row_ptr.device)
    return t


def pair_pattern(row_ptr: torch.Tensor, col_idx: torch.Tensor, K: int, group_size: int) -> bool:
    """Whether single rows (``row_ptr``, ``col_idx`` in each row's column order) are in the pair
    pattern the sparse-tensor-core kernel runs: G = 16 and each row keeps exactly one group of
    each aligned pair of group columns (so row n's j-th group is in pair j)."""
    if group_size != 16 or K % 32 != 0 or K == 0:
        return False
    return is_pair_pattern(row_ptr, col_idx, K // group_size)


def split_counters(N: int, device: torch.device | str) -> torch.Tensor:
    """The ``counters`` of a layer with N rows: zeros, one per 64-row tile."""
    return torch.zeros(-(-N // TC_ROWS), dtype=torch.int32, device=device)


# bank_order: sixteen consecutive kept groups (the two groups of 8 lanes' units) as the x bank
# quads they should start in: the even positions (each lane's first group) cover all 8 quads, and
# so do the odd ones, so one quarter-warp's 16-byte x reads can go to 8 different quads.
_BANK_PATTERN = (0, 4, 1, 5, 2, 6, 3, 7, 4, 0, 5, 1, 6, 2, 7, 3)
# _BANK_PLACE[q, i]: the position of quad q's i-th appearance in _BANK_PATTERN.
_BANK_PLACE = torch.tensor([[p for p, b in enumerate(_BANK_PATTERN) if b == q] for q in range(8)])


def x_chunk_swizzle(chunk):
    """Where the GEMV stores 16-byte chunk ``chunk`` of a row of x in shared memory (swizzle_chunk
    in csrc/gqsa_kernels.cu): a permutation inside each 128-byte row of banks."""
    return chunk ^ ((chunk >> 3) & 7)


def bank_order(row_ptr: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """A permutation of the kept groups (int64 ``[nnz]``) that keeps every group in its row but
    orders each row's groups so that neighbouring GEMV lanes read x from different shared-memory
    bank quads (group size 16; see ``benchmarks/gemv_bank_conflicts.py``). Applied to ``codes`` and
    ``meta``, it gives a layout the GEMV reads like the column-ordered one (every group carries its
    column); the tensor-core kernel's chunk table needs column order, so this is for measuring only."""
    rp = row_ptr.to(torch.int64)
    cols = cols.to(torch.int64).reshape(-1)
    nnz, N = cols.numel(), rp.numel() - 1
    counts = rp[1:] - rp[:-1]
    rows = torch.repeat_interleave(torch.arange(N, device=rp.device), counts, output_size=nnz)
    chunk = 2 * cols  # the group's first 16-byte chunk of x
    quad = x_chunk_swizzle(chunk) & 7
    # Rank of each group among the groups of its row in the same quad, in column order.
    key = rows * 8 + quad
    by_key = torch.sort(key, stable=True).indices
    sorted_key = key[by_key]
    first = torch.searchsorted(sorted_key, sorted_key)
    rank = torch.empty_like(key)
    rank[by_key] = torch.arange(nnz, device=key.device) - first
    # The r-th group of a quad goes to the (r % 2)-th place of that quad in pattern block r // 2;
    # places of quads that ran out are skipped when the row is sorted.
    place = _BANK_PLACE.to(key.device)
    slot = (rank // 2) * len(_BANK_PATTERN) + place[quad, rank % 2]
    span = int(slot.max()) + 1 if nnz else 1
    return torch.sort(rows * span + slot, stable=True).indices


def with_bank_order(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kernel-format tensors ``t`` with each row's groups in :func:`bank_order` (for the GEMV only:
    the result has no ``chunks``, which would no longer describe it)."""
    perm = bank_order(t["row_ptr"], unpack_meta(t["meta"])[2])
    out = {k: v for k, v in t.items() if k != "chunks"}
    out["codes"] = t["codes"][perm].contiguous()
    out["meta"] = t["meta"][perm].contiguous()
    return out


def dequantize_kernel_format(row_ptr: torch.Tensor, codes: torch.Tensor, meta: torch.Tensor,
                             N: int, K: int, group_size: int) -> torch.Tensor:
    """The dense float32 ``[N, K]`` weight that kernel-format tensors stand for (the reference)."""
    G = group_size
    nnz = meta.numel()
    shifts = torch.arange(WEIGHTS_PER_WORD, device=codes.device, dtype=torch.int64) * 4
    q = ((codes.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF).reshape(nnz, G)
    scales, zeros, cols = unpack_meta(meta)
    values = (q - zeros.unsqueeze(-1)).float() * scales.float().unsqueeze(-1)
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    # output_size keeps this free of host syncs, so it can run inside a CUDA graph.
    rows = torch.repeat_interleave(torch.arange(N, device=counts.device), counts, output_size=nnz)
    w = torch.zeros(N, K // G, G, dtype=torch.float32, device=codes.device)
    w[rows, cols] = values
    return w.reshape(N, K)
