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

The sliced layout. A G = 16 layer with at most ``MAX_SLICED_K`` inputs, neither compact tiles nor
the pair pattern, is loaded in this layout by default (``to_kernel_format(layout="auto")``; the
environment variable ``VLLM_GQSA_LAYOUT=rows`` keeps the row layout above). It feeds a GEMV that
gives each lane one row (sliced ELLPACK, SELL-C-sigma with C = 32 and sigma = N), so its loop
never meets a row end. The rows, sorted by kept-group count (longest first, stable), sit at
places 0 .. N-1 of ``P = ceil(N / 32) * 32`` places; slice s is places ``32s .. 32s + 31``, and
holds as many steps as its longest row needs, ``ceil(groups / STEP_GROUPS)``. Step k of the
layout is ``SLOTS_PER_STEP = 128`` group slots: for each of its slice's 32 places in turn, that
row's groups ``4j .. 4j + 3`` (j = k - the slice's first step), 32 bytes of codes, one DRAM
sector, so that no sector holds two rows. So the row at a place whose first slot is b keeps its
i-th group (column order) in slot ``b + i + (i // 4) * 124``. ``codes`` and ``meta`` hold slots
instead of kept groups (the same words); padding slots are zero (scale 0, which multiplies to 0
for finite x). ``row_ptr`` and ``chunks`` stay as in the row layout (the counts and each row's
chunk entries, indexed by row), and three tensors are added:

==================  =======  ==============  ===========================================
``sell_rows``       int32    ``[P, 2]``      per place: (row, or -1 past N; first slot)
``schedule``        int32    ``[S', 4]``     the sliced GEMV's grid, one CTA per piece
                                             (replaces the row GEMV's schedule): piece
                                             ``(s, b, e, k | n << 16)`` is steps
                                             ``b .. e-1`` of slice s, its k-th of n
``slice_parts``     int32    ``[C * 96]``    all -1: ``MAX_SLICED_TOKENS * 32`` slots for each
                                             of the C pieces of cut slices, which come
                                             first in the grid (their slices are the longest)
==================  =======  ==============  ===========================================

A slice longer than ``SLICE_CUT`` times the mean slice is cut into pieces of about the mean
(:func:`slice_pieces`). Each piece of a cut slice but the last writes its sums into its slots of
``slice_parts``; the last piece reads them as they land (-1, a NaN that GPU arithmetic never
produces, marks a slot not yet written), adds them in piece order, so the result does not depend
on timing, and writes -1 back. The tensor-core kernel walks 64 places per tile (two slices:
the tile's copies read whole steps) and writes each place's row; the dequantize kernel finds a
row's groups through its place. ``to_kernel_format`` also returns ``sell_warps``, a CPU tensor:
the GEMV's warps per CTA for 1, 2 and 3 tokens (:func:`sliced_warps`), which the plugin passes to
the op as ints.

``counters`` and ``slice_parts`` are working memory that lives with the layer, as Marlin's
workspace does, so that a call need not fill fresh ones with one more kernel; every call leaves
them as it found them. Calls that share them must be ordered (one CUDA stream), which is how a
model calls a layer.

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
# and "xcols" for compact tiles, "sell_rows" and "slice_parts" for the sliced layout
SLICE_ROWS = 32  # rows per slice of the sliced layout, one per GEMV lane (gqsa::kSliceRows)
# Groups of one row in one step: 4 groups of codes are 32 bytes, one DRAM sector, so no sector is
# shared by two rows (which the kernels reading a row's groups by chunk, the tensor-core and the
# dequantize kernels, would fetch twice; gqsa::kStepGroups).
STEP_GROUPS = 4
SLOTS_PER_STEP = STEP_GROUPS * SLICE_ROWS
# Slices longer than SLICE_CUT times their layer's mean are cut into pieces of about the mean.
# H100, one 4096 x 4096 layer at density 0.25 with a block of N/8 rows at 4x the average, the
# prototype with 8 warps: one CTA per slice took 7.03 us against 4.89 for uniform rows, cut at 1.5x
# 5.71 against 5.00, and cutting every slice into equal pieces was balanced but slower on uniform
# layers (benchmarks/results/gpu/sell_gemv_experiment_{cut_long,pieces}_h100.json). The package's
# kernel, cut at 1.5x: 5.55 against 4.71 (kernels_h100_sliced_small.json).
SLICE_CUT = 1.5
MAX_SLICED_TOKENS = 3  # tokens per launch of the sliced GEMV (gqsa::kMaxSlicedTokens)
# slice_parts words per piece of a cut slice (gqsa::kSlicedPartWords)
PART_SLOTS = MAX_SLICED_TOKENS * SLICE_ROWS
MAX_SLICED_K = 32768  # one token of x must fit the GEMV's shared memory on every supported GPU


def can_implement(bits: int, group_size: int, N: int, K: int) -> tuple[bool, str | None]:
    """Whether the CUDA kernels handle a layer of this format and shape (any block_rows); the
    reason when not."""
    if bits != SUPPORTED_BITS:
        return False, f"the CUDA kernels handle {SUPPORTED_BITS}-bit codes only, not bits={bits}"
    if group_size not in SUPPORTED_GROUP_SIZES:
        return False, f"group_size={group_size} is not one of {SUPPORTED_GROUP_SIZES}"
    if N < 0 or K < 0:
        return False, f"negative layer shape {N} x {K}"
    if K % group_size:
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


def sliced_layout_applies(group_size: int, K: int, compact: bool, pairs: bool) -> bool:
    """Whether a layer gets the sliced layout (see the format): G = 16, K <= MAX_SLICED_K, and
    neither compact tiles nor the pair pattern, whose kernels read the row layout."""
    return group_size == 16 and 0 < K <= MAX_SLICED_K and not compact and not pairs


def sliced_layout(row_ptr: torch.Tensor, codes: torch.Tensor, meta: torch.Tensor, K: int, num_sms: int,
                  cut: float = SLICE_CUT) -> dict[str, torch.Tensor]:
    """The sliced layout (``codes``, ``meta``, ``sell_rows``, ``schedule`` = the pieces,
    ``slice_parts``) of G = 16 row-layout tensors of a layer with K inputs, on their device,
    and ``sell_warps`` for a GPU of ``num_sms`` SMs (a CPU tensor, :func:`sliced_warps`)."""
    dev = codes.device
    rp = row_ptr.to(torch.int64)
    N, nnz = rp.numel() - 1, meta.numel()
    counts = rp[1:] - rp[:-1]
    order = torch.argsort(counts, descending=True, stable=True)
    n_pad = -(-N // SLICE_ROWS) * SLICE_ROWS
    S = n_pad // SLICE_ROWS
    sorted_counts = torch.zeros(n_pad, dtype=torch.int64, device=dev)
    sorted_counts[:N] = counts[order]
    steps = -(-sorted_counts.view(S, SLICE_ROWS).amax(1) // STEP_GROUPS) if S else sorted_counts[:0]
    slice_ptr = torch.zeros(S + 1, dtype=torch.int64, device=dev)
    slice_ptr[1:] = torch.cumsum(steps, 0)
    place = torch.arange(n_pad, device=dev)
    base = slice_ptr[place // SLICE_ROWS] * SLOTS_PER_STEP + STEP_GROUPS * (place % SLICE_ROWS)
    rows = torch.full((n_pad,), -1, dtype=torch.int64, device=dev)
    rows[:N] = order
    # Group j of the row at place p lives in slot base[p] + (j // 4) * SLOTS_PER_STEP + j % 4.
    row_of = torch.repeat_interleave(torch.arange(N, device=dev), counts, output_size=nnz)
    j = torch.arange(nnz, device=dev) - rp[row_of]
    place_of_row = torch.empty(N, dtype=torch.int64, device=dev)
    place_of_row[order] = place[:N]
    dest = base[place_of_row[row_of]] + j + (j // STEP_GROUPS) * (SLOTS_PER_STEP - STEP_GROUPS)
    slots = int(slice_ptr[-1]) * SLOTS_PER_STEP
    if slots >= 2**31:  # sell_rows holds slot numbers as int32
        raise ValueError(f"a layer of {N} rows with {nnz} kept groups needs {slots} slots in the sliced layout, "
                         "more than its int32 slot numbers hold; serve it with VLLM_GQSA_LAYOUT=rows")
    out_codes = torch.zeros(slots, codes.shape[1], dtype=torch.int32, device=dev)
    out_meta = torch.zeros(slots, dtype=torch.int32, device=dev)  # padding: scale 0
    out_codes[dest] = codes
    out_meta[dest] = meta
    pieces_cpu = slice_pieces(slice_ptr.cpu(), cut)
    pieces = pieces_cpu.to(dev)
    return {"codes": out_codes, "meta": out_meta,
            "sell_rows": torch.stack([rows, base], 1).to(torch.int32),
            "schedule": pieces,
            "slice_parts": torch.full((cut_pieces(pieces_cpu) * PART_SLOTS,), -1, dtype=torch.int32, device=dev),
            "sell_warps": torch.tensor(sliced_warps(pieces_cpu, K, num_sms), dtype=torch.int32)}


def slice_pieces(slice_ptr: torch.Tensor, cut: float = SLICE_CUT) -> torch.Tensor:
    """The sliced GEMV's grid, int32 ``[S', 4]``: one piece per slice, except that a slice longer
    than ``cut`` times the mean is cut into near-equal pieces of about the mean; piece
    ``(s, b, e, k | n << 16)`` is steps ``b .. e-1`` of slice s, its k-th of n."""
    sp = slice_ptr.to(torch.int64)
    steps = sp[1:] - sp[:-1]
    S = steps.numel()
    mean = max(1, -(-int(sp[-1]) // S)) if S else 1
    n = torch.where(steps > cut * mean, -(-steps // mean), torch.ones_like(steps))
    slice_of = torch.repeat_interleave(torch.arange(S), n)
    first = torch.cumsum(n, 0) - n
    k = torch.arange(slice_of.numel()) - first[slice_of]
    nk, st, a = n[slice_of], steps[slice_of], sp[:-1][slice_of]
    # n < 2**15 always: a slice has at most MAX_SLICED_K / 64 = 512 steps.
    pieces = torch.stack([slice_of, a + st * k // nk, a + st * (k + 1) // nk, k | (nk << 16)], 1)
    return pieces.to(torch.int32).reshape(-1, 4)


def cut_pieces(pieces: torch.Tensor) -> int:
    """How many pieces of a :func:`slice_pieces` grid belong to cut slices: a prefix of it, since
    slices run longest first, which ``slice_parts`` gives slots (the kernel traps past them)."""
    cut = (pieces[:, 3] >> 16) > 1
    count = int(cut.sum())
    if bool(cut[count:].any()):
        raise ValueError("the pieces of cut slices must come first in the sliced GEMV's grid")
    return count


def piece_steps(pieces: torch.Tensor) -> torch.Tensor:
    """The steps of each piece of a :func:`slice_pieces` grid."""
    return pieces[:, 2] - pieces[:, 1]


# Registers per thread of the sliced GEMV (ptxas -v, nvcc 13.0, sm_90a; the most over fp16 and
# bf16) by tokens and warps per CTA: with the shared-memory copy of x they set how many CTAs fit
# an SM, which sliced_warps needs.
# (benchmarks/results/gpu/ptxas_parts.txt. With the build before's, in ptxas_norm_split.txt, the rule
# made the same picks on random 50% layers of the Llama-2-7B, Llama-3-8B and Qwen2.5-7B shapes and
# on the balance test's four matrices.)
SLICED_REGISTERS = {1: {4: 64, 8: 80, 16: 80}, 2: {4: 64, 8: 74, 16: 78}, 3: {4: 66, 8: 75, 16: 78}}


# The wave rule's fixed cost per CTA, in steps of four groups. Re-fitted on an H100 against the
# sliced GEMV timed at 4, 8 and 16 warps on 36 shapes (three models' layers, 1 to 3 tokens): every
# cost from 0 to 3.5 steps makes the same picks, 0.18% over the fastest possible in total, and 4.0
# (fitted on the prototype's two-group steps) gives Qwen2.5-7B's gate/up 4 warps where 8 are 10%
# faster (benchmarks/results/gpu/sliced_warps_fit_h100.json). 2.0 sits mid-way in that range; a
# second H100 start gave the same tie (sliced_warps_fit_h100_rule2.json).
SLICED_FIXED_STEPS = 2.0


def sliced_warps(pieces: torch.Tensor, K: int, num_sms: int, smem_per_sm: int = 228 * 1024,
                 fixed_steps: float = SLICED_FIXED_STEPS) -> list[int]:
    """Warps per CTA of the sliced GEMV for 1, 2 and 3 tokens, from a wave count: the CTAs (one
    per piece) run in ceil(pieces / resident) waves, each as long as one warp's share of a piece's
    steps plus a fixed cost of ``fixed_steps`` steps; the count with the shortest total wins. On an
    H100 it picks the fastest of 4, 8 and 16 in 29 of 36 layer shapes and token counts, on each of
    two machine starts, and its misses cost 0.01-0.44 us each (``kernel_speed.py --sliced-warps-sweep`` times them and
    ``fit_sliced_warps.py`` re-fits the fixed cost; csrc/README.md, "One row per lane")."""
    P = pieces.shape[0]
    mean_steps = float(piece_steps(pieces).sum()) / P if P else 0.0
    return [wave_rule_warps(P, mean_steps, K, num_sms, M, smem_per_sm, fixed_steps)
            for M in range(1, MAX_SLICED_TOKENS + 1)]


def wave_rule_warps(pieces: int, mean_steps: float, K: int, num_sms: int, M: int,
                    smem_per_sm: int = 228 * 1024, fixed_steps: float = SLICED_FIXED_STEPS) -> int:
    """:func:`sliced_warps` for one token count M, from the piece count and mean steps per piece."""
    P = max(1, pieces)

    def cost(W: int) -> float:
        per_warp = -(-SLICED_REGISTERS[M][W] * 32 // 256) * 256
        smem = M * ((K + 63) // 64) * 128 + W * 32 * 4 * M + 1024
        resident = max(1, min(65536 // (per_warp * W), 2048 // (W * 32), 32, smem_per_sm // smem))
        return -(-P // (num_sms * resident)) * (mean_steps / W + fixed_steps)
    return min((4, 8, 16), key=cost)


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


def to_kernel_format(layer: GQSALayer, num_ctas: int, layout: str = "auto",
                     num_sms: int | None = None, pairs: bool | None = None) -> dict[str, torch.Tensor]:
    """Repack a validated checkpoint layer into the kernel format, on the layer's device.
    ``layout``: "auto" (sliced where :func:`sliced_layout_applies`), "rows" or "sliced". The
    sliced layout's ``sell_warps`` (a CPU tensor: warps per CTA for 1, 2, 3 tokens) are chosen for
    ``num_sms`` SMs (default ``num_ctas // 2``, for the row GEMV's grid of 2 CTAs per SM; the plugin
    passes the GPU's count).
    ``pairs``: whether the layer is in the pair pattern, where the caller has already checked
    (:func:`pair_pattern`); None checks here."""
    if layout not in ("auto", "rows", "sliced"):
        raise ValueError(f"layout must be 'auto', 'rows' or 'sliced', got {layout!r}")
    fmt = layer.fmt
    ok, reason = can_implement(fmt.bits, fmt.group_size, layer.out_features, layer.in_features)
    if not ok:
        raise ValueError(f"GQSA CUDA kernels cannot run this layer: {reason}")
    layer = layer.single_rows()
    nnz, G = layer.nnz, fmt.group_size
    codes = layer.qweight.reshape(nnz, G // 2).contiguous().view(torch.int32)
    meta = pack_meta(layer.scales.reshape(nnz), layer.zeros().reshape(nnz), layer.col_idx.long())
    t = {"row_ptr": layer.row_ptr.to(torch.int32).contiguous(), "codes": codes, "meta": meta}
    compact = compact_chunk_table(layer.row_ptr, layer.col_idx, layer.in_features, G)
    if compact is None:
        t["chunks"] = chunk_table(layer.row_ptr, layer.col_idx, layer.in_features, G)
    else:
        t["chunks"], t["xcols"] = compact
    t["counters"] = split_counters(layer.out_features, layer.row_ptr.device)
    if pairs is None:
        pairs = pair_pattern(layer.row_ptr, layer.col_idx, layer.in_features, G)
    applies = sliced_layout_applies(G, layer.in_features, compact is not None, pairs)
    if layout == "sliced" and not applies:
        raise ValueError("the sliced layout needs group_size 16, an input size of at most "
                         f"{MAX_SLICED_K}, and neither compact tiles nor the pair pattern")
    if layout != "rows" and applies:  # the pieces replace the row GEMV's schedule
        sms = num_sms if num_sms is not None else max(1, num_ctas // 2)
        t.update(sliced_layout(t["row_ptr"], codes, meta, layer.in_features, sms))
    else:
        t["schedule"] = make_schedule(layer.row_ptr, num_ctas)
    return t


def is_sliced(t: dict[str, torch.Tensor]) -> bool:
    """Whether kernel-format tensors are in the sliced layout."""
    return "sell_rows" in t


def kernel_weight(t: dict[str, torch.Tensor], N: int, K: int, group_size: int) -> torch.Tensor:
    """The dense float32 ``[N, K]`` weight of kernel-format tensors in either layout (the reference)."""
    return dequantize_kernel_format(t["row_ptr"], t["codes"], t["meta"], N, K, group_size, t.get("sell_rows"))


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
                             N: int, K: int, group_size: int, sell_rows: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """The dense float32 ``[N, K]`` weight that kernel-format tensors stand for (the reference);
    ``sell_rows`` for the sliced layout."""
    G = group_size
    n_slots = meta.numel()
    shifts = torch.arange(WEIGHTS_PER_WORD, device=codes.device, dtype=torch.int64) * 4
    q = ((codes.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF).reshape(n_slots, G)
    scales, zeros, cols = unpack_meta(meta)
    values = (q - zeros.unsqueeze(-1)).float() * scales.float().unsqueeze(-1)
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    if sell_rows is None:
        # output_size keeps this free of host syncs, so it can run inside a CUDA graph.
        rows = torch.repeat_interleave(torch.arange(N, device=counts.device), counts, output_size=n_slots)
    else:
        # Each slot's place (slice, lane) and its index j in that place's row; padding slots
        # (no row, or j past the row's count) go to a spare row N. No host syncs either.
        sr = sell_rows.long()
        slot = torch.arange(n_slots, device=sr.device)
        slice_first = sr[::SLICE_ROWS, 1].contiguous()  # lane 0's base: the slice's first slot
        s = torch.searchsorted(slice_first, slot, right=True) - 1
        lane = (slot // STEP_GROUPS) % SLICE_ROWS
        place = s * SLICE_ROWS + lane
        j = STEP_GROUPS * ((slot - slice_first[s]) // SLOTS_PER_STEP) + slot % STEP_GROUPS
        row = sr[place, 0]
        ok = (row >= 0) & (j < counts[row.clamp(min=0)])
        rows = torch.where(ok, row, N)
    w = torch.zeros(N + 1, K // G, G, dtype=torch.float32, device=codes.device)
    w[rows, cols] = values
    return w[:N].reshape(N, K)
