# SPDX-License-Identifier: Apache-2.0
"""The CUDA kernel format (CPU) and the CUDA ops (GPU) against the plain-torch reference."""

from __future__ import annotations

import pytest
import torch

from vllm_gqsa import ops, reference  # noqa: F401  (ops registers the split norm's ops)
from vllm_gqsa.format import GQSALayer, LayerFormat, index_dtype, pack_layer
from vllm_gqsa.kernels import cuda
from vllm_gqsa.kernels.cuda_format import (MAX_GEMV_TOKENS, MAX_SLICED_K, MAX_SLICED_TOKENS, PART_SLOTS, SLICE_ROWS,
                                           SLOTS_PER_STEP, STEP_GROUPS, TC_CHUNK, TC_ROWS, WARPS_PER_CTA, can_implement,
                                           chunk_table, compact_chunk_table, cta_row_bounds, cut_pieces,
                                           dequantize_kernel_format, is_sliced, kernel_weight, make_schedule,
                                           pair_pattern, row_per_cta_schedule, slice_pieces, sliced_layout,
                                           sliced_warps, to_kernel_format, unpack_meta, with_bank_order)

GROUP_SIZES = (16, 32, 64, 128)
# Row-density patterns: uniform, some rows empty and some full, one row block holding 4x the
# average, every row empty, every group kept.
PATTERNS = ("uniform", "empty_and_full", "heavy_block", "all_empty", "dense")


def make_layer(N: int, K: int, G: int, pattern: str, seed: int = 0, block_rows: int = 1):
    """A random 4-bit GQSA layer whose rows (row blocks) follow a density pattern."""
    g = torch.Generator().manual_seed(seed)
    KG = K // G
    codes = torch.randint(0, 16, (N, K), generator=g)
    scales = (torch.rand(N, KG, generator=g) + 0.5) * 0.02 * torch.where(
        torch.rand(N, KG, generator=g) < 0.5, -1.0, 1.0)
    zeros = torch.randint(0, 16, (N, KG), generator=g)
    density = torch.full((N, 1), 0.5)
    if pattern == "empty_and_full":
        density[::3] = 0.0
        density[1::5] = 1.0
    elif pattern == "heavy_block":
        density[:] = 0.2
        start = N // 3
        density[start:start + max(1, N // 8)] = 0.8
    elif pattern == "all_empty":
        density[:] = 0.0
    elif pattern == "dense":
        density[:] = 1.0
    R = block_rows
    keep = torch.rand(N // R, KG, generator=g) < density[::R]
    fmt = LayerFormat(4, G, R)
    if not keep.any():  # pack_layer cannot reshape zero groups; build the empty layer directly
        return GQSALayer(row_ptr=torch.zeros(N // R + 1, dtype=torch.int32),
                         col_idx=torch.zeros(0, dtype=index_dtype(KG)),
                         qweight=torch.zeros(0, R, G // 2, dtype=torch.uint8),
                         scales=torch.zeros(0, R, dtype=torch.float16),
                         qzeros=torch.zeros(0, dtype=torch.uint8), out_features=N, in_features=K, fmt=fmt)
    return pack_layer(codes, scales, zeros, keep, fmt)


def tile_layer(N: int, K: int, G: int, density: float, seed: int = 0):
    """A random layer whose rows keep the same group columns within each TC_ROWS-row tile (the
    last tile may be shorter): compact tiles for the tensor-core kernel."""
    g = torch.Generator().manual_seed(seed)
    KG = K // G
    keep = torch.rand(-(-N // TC_ROWS), KG, generator=g) < density
    keep = keep.repeat_interleave(TC_ROWS, dim=0)[:N]
    codes = torch.randint(0, 16, (N, K), generator=g)
    scales = (torch.rand(N, KG, generator=g) + 0.5) * 0.02
    zeros = torch.randint(0, 16, (N, KG), generator=g)
    return pack_layer(codes, scales, zeros, keep, LayerFormat(4, G, 1))


def pair_layer(N: int, K: int, seed: int = 0, G: int = 16, block_rows: int = 1):
    """A random layer in the pair pattern: each row (row block) keeps one group of each aligned
    pair of group columns, chosen at random."""
    g = torch.Generator().manual_seed(seed)
    KG, R = K // G, block_rows
    odd = torch.rand(N // R, KG // 2, generator=g) < 0.5
    keep = torch.stack([~odd, odd], dim=2).reshape(N // R, KG)
    codes = torch.randint(0, 16, (N, K), generator=g)
    scales = (torch.rand(N, KG, generator=g) + 0.5) * 0.02 * torch.where(
        torch.rand(N, KG, generator=g) < 0.5, -1.0, 1.0)
    zeros = torch.randint(0, 16, (N, KG), generator=g)
    return pack_layer(codes, scales, zeros, keep, LayerFormat(4, G, R))


def dense_reference(layer, dtype=torch.float32):
    """reference.dequantize, which cannot unpack a layer with no kept groups (all zeros then)."""
    if layer.nnz == 0:
        return torch.zeros(layer.out_features, layer.in_features, dtype=dtype, device=layer.row_ptr.device)
    return reference.dequantize(layer, dtype)


def kernel_tensors(layer, num_ctas: int, layout: str) -> dict:
    """Kernel-format tensors in the given layout; "sliced" even where the plugin would not choose
    it (compact tiles, no kept groups), so that the sliced kernels meet every row pattern."""
    if layout != "sliced":
        return to_kernel_format(layer, num_ctas, layout)
    t = to_kernel_format(layer, num_ctas, "rows")
    if "xcols" in t:  # the ordinary chunk table instead of the compact one
        single = layer.single_rows()
        t = {k: v for k, v in t.items() if k != "xcols"}
        t["chunks"] = chunk_table(single.row_ptr, single.col_idx, layer.in_features, layer.fmt.group_size)
    return {**t, **sliced_layout(t["row_ptr"], t["codes"], t["meta"], layer.in_features, max(1, num_ctas // 2))}


# ------------------------------------------------------------------------------------------
# CPU: the kernel format


@pytest.mark.parametrize("layout", ["rows", "auto"])
@pytest.mark.parametrize("G", GROUP_SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("N,odd", [(1, 1), (67, 21), (130, 5)])
def test_kernel_format_round_trip(G, pattern, N, odd, layout):
    K = G * odd
    layer = make_layer(N, K, G, pattern, seed=N + odd)
    t = to_kernel_format(layer, num_ctas=7, layout=layout)
    # "auto": sliced wherever it applies (a layer with compact tiles keeps the row layout)
    assert is_sliced(t) == (layout == "auto" and G == 16 and "xcols" not in t)
    got = kernel_weight(t, N, K, G)
    assert torch.equal(got, dense_reference(layer))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("N", [1, 31, 32, 33, 200])
def test_sliced_layout(pattern, N):
    """The sliced layout: rows sorted by kept groups into slices of 32, each row's i-th group in
    slot base + i + (i // 4) * 124, padding slots zero, pieces covering every slice's steps in order."""
    K = 16 * 37
    layer = make_layer(N, K, 16, pattern, seed=N)
    rows = to_kernel_format(layer, 7, layout="rows")
    t = {**rows, **sliced_layout(rows["row_ptr"], rows["codes"], rows["meta"], K, 4)}
    counts = (rows["row_ptr"][1:] - rows["row_ptr"][:-1]).long()
    places = -(-N // SLICE_ROWS) * SLICE_ROWS
    sr = t["sell_rows"].long()
    assert sr.shape == (places, 2) and torch.equal(sr[:N, 0].sort().values, torch.arange(N))
    assert (sr[N:, 0] == -1).all()
    assert (counts[sr[:N, 0]][1:] <= counts[sr[:N, 0]][:-1]).all(), "places are in decreasing row length"
    assert t["codes"].shape[0] == t["meta"].shape[0] and t["codes"].shape[0] % SLOTS_PER_STEP == 0
    used = torch.zeros(t["meta"].numel(), dtype=torch.bool)
    for p in range(N):
        row, base = int(sr[p, 0]), int(sr[p, 1])
        a = int(rows["row_ptr"][row])
        for i in range(int(counts[row])):
            slot = base + i + (i // STEP_GROUPS) * (SLOTS_PER_STEP - STEP_GROUPS)
            assert torch.equal(t["codes"][slot], rows["codes"][a + i]) and t["meta"][slot] == rows["meta"][a + i]
            used[slot] = True
    assert not t["meta"][~used].any() and not t["codes"][~used].any(), "padding slots hold zeros (scale 0)"
    pieces = t["schedule"].long()
    assert pieces.shape[1] == 4 and pieces.shape[0] >= places // SLICE_ROWS
    assert torch.equal(pieces[:, 0].unique(), torch.arange(places // SLICE_ROWS))
    assert (pieces[1:, 1] == pieces[:-1, 2]).all() and pieces[0, 1] == 0
    assert pieces[-1, 2] * SLOTS_PER_STEP == t["meta"].numel()
    cut = int(((pieces[:, 3] >> 16) > 1).sum())  # the pieces of cut slices come first, and get slots
    assert not ((pieces[cut:, 3] >> 16) > 1).any()
    assert torch.equal(t["slice_parts"], torch.full((cut * PART_SLOTS,), -1, dtype=torch.int32))


def test_sliced_layout_refuses_slot_numbers_past_int32(monkeypatch):
    """sell_rows holds slot numbers as int32: a layout needing 2**31 slots is refused before any
    tensor is made (here with steps made 2**28 slots wide instead of a layer of 2**31 groups)."""
    from vllm_gqsa.kernels import cuda_format
    rows = to_kernel_format(make_layer(40, 16 * 37, 16, "uniform"), 7, layout="rows")
    monkeypatch.setattr(cuda_format, "SLOTS_PER_STEP", 2**28)
    with pytest.raises(ValueError, match="VLLM_GQSA_LAYOUT=rows"):
        sliced_layout(rows["row_ptr"], rows["codes"], rows["meta"], 16 * 37, 4)


@pytest.mark.parametrize("cut", [0.01, 1.5, 1e9])
def test_slice_pieces(cut):
    """Slices over cut x the mean are cut into near-equal pieces of about the mean; piece k of n
    of a slice says so in its last field."""
    slice_ptr = torch.tensor([0, 40, 50, 50, 51, 60])  # 5 slices of 40, 10, 0, 1 and 9 steps: mean 12
    p = slice_pieces(slice_ptr, cut).long()
    assert p[0, 1] == 0 and p[-1, 2] == 60 and (p[1:, 1] == p[:-1, 2]).all()
    for s in range(5):
        mine = p[p[:, 0] == s]
        n = len(mine)
        steps = int(slice_ptr[s + 1] - slice_ptr[s])
        assert n == (-(-steps // 12) if steps > cut * 12 else 1)
        assert torch.equal(mine[:, 3], torch.arange(n) | (n << 16))
        sizes = mine[:, 2] - mine[:, 1]
        assert int(sizes.max() - sizes.min()) <= 1


def test_cut_pieces_come_first():
    """slice_parts has slots for the pieces of cut slices only, which the layout's longest-first
    order puts at the start of the grid; a grid that does not is refused."""
    assert cut_pieces(slice_pieces(torch.tensor([0, 40, 50, 50, 51, 60]))) == 4
    assert cut_pieces(slice_pieces(torch.tensor([0, 10, 20]))) == 0
    with pytest.raises(ValueError, match="must come first"):
        cut_pieces(slice_pieces(torch.tensor([0, 10, 50])))  # a slice of 10 steps before one cut in 2


def test_sliced_layout_applies_only_where_its_kernels_run():
    """G > 16, K over MAX_SLICED_K, compact tiles and the pair pattern keep the row layout; asking
    for the sliced layout there is an error."""
    for layer in (make_layer(40, 32 * 9, 32, "uniform"), make_layer(5, 16 * (MAX_SLICED_K // 16 + 1), 16, "uniform"),
                  tile_layer(70, 16 * 40, 16, 0.3), pair_layer(70, 16 * 42)):
        assert not is_sliced(to_kernel_format(layer, 4))
        with pytest.raises(ValueError, match="sliced layout needs"):
            to_kernel_format(layer, 4, layout="sliced")
    with pytest.raises(ValueError, match="layout must be"):
        to_kernel_format(make_layer(4, 16, 16, "uniform"), 4, layout="ell")


def test_kernel_layout_from_the_environment(monkeypatch):
    monkeypatch.delenv("VLLM_GQSA_LAYOUT", raising=False)
    assert cuda.kernel_layout() == "auto"
    monkeypatch.setenv("VLLM_GQSA_LAYOUT", "rows")
    assert cuda.kernel_layout() == "rows"
    monkeypatch.setenv("VLLM_GQSA_LAYOUT", "sliced")
    with pytest.raises(ValueError, match="VLLM_GQSA_LAYOUT='sliced'"):
        cuda.kernel_layout()


def test_sliced_warps():
    """Few long pieces favour wide CTAs; more CTAs than fit the GPU at once favour narrow ones."""
    few = slice_pieces(torch.arange(0, 200 * 10 + 1, 200))  # 10 slices of 200 steps
    many = slice_pieces(torch.arange(0, 5000 * 40 + 1, 40))  # 5000 slices of 40 steps
    assert sliced_warps(few, 4096, 132) == [16, 16, 16]
    assert all(w < 16 for w in sliced_warps(many, 4096, 132))
    t = to_kernel_format(make_layer(500, 16 * 64, 16, "uniform"), 8)
    assert t["sell_warps"].device.type == "cpu" and len(t["sell_warps"]) == MAX_SLICED_TOKENS
    assert t["sell_warps"].tolist() == sliced_warps(t["schedule"], 16 * 64, 4)  # num_sms: num_ctas // 2


@pytest.mark.parametrize("R", [2, 16, 64])
@pytest.mark.parametrize("pattern", ["uniform", "empty_and_full", "all_empty"])
def test_kernel_format_of_row_blocks(R, pattern):
    """A checkpoint with block_rows > 1 is repacked into single rows, each holding its block's
    group columns in order, with the same weight."""
    N, K, G = 9 * R, 16 * 37, 16
    layer = make_layer(N, K, G, pattern, seed=R, block_rows=R)
    t = to_kernel_format(layer, num_ctas=5, layout="rows")
    got = dequantize_kernel_format(t["row_ptr"], t["codes"], t["meta"], N, K, G)
    assert torch.equal(kernel_weight(to_kernel_format(layer, num_ctas=5), N, K, G), got)
    assert torch.equal(got, dense_reference(layer))
    row_groups = t["row_ptr"][1:] - t["row_ptr"][:-1]
    assert torch.equal(row_groups, (layer.row_ptr[1:] - layer.row_ptr[:-1]).repeat_interleave(R))
    single = layer.single_rows()
    compact = compact_chunk_table(single.row_ptr, single.col_idx, K, G)
    if compact is None:
        assert "xcols" not in t and torch.equal(t["chunks"], chunk_table(single.row_ptr, single.col_idx, K, G))
    else:  # 64-row blocks, or nothing kept: compact tiles
        assert R == 64 or pattern == "all_empty"
        assert torch.equal(t["chunks"], compact[0]) and torch.equal(t["xcols"], compact[1])
    assert torch.equal(unpack_meta(t["meta"])[2], single.col_idx.long())
    tiles = -(-N // TC_ROWS)
    assert t["counters"].dtype == torch.int32 and torch.equal(t["counters"], torch.zeros(tiles, dtype=torch.int32))


def compact_tile_weight(t, N, K, G):
    """The weight the tensor-core kernel reads from compact tiles: slot j of chunk c of row n is
    the row's group ``first + popcount(mask below j)``, multiplied with x's group column
    ``xcols[tile, c, j]``."""
    slots = TC_CHUNK // G
    rp, chunks, xcols = t["row_ptr"].long(), t["chunks"].long(), t["xcols"].long()
    per_group = dequantize_kernel_format(torch.arange(t["meta"].numel() + 1, dtype=torch.int32), t["codes"],
                                         t["meta"] & ((1 << 20) - 1), t["meta"].numel(), G, G)
    w = torch.zeros(N, K // G, G)
    used = torch.zeros(t["meta"].numel(), dtype=torch.int64)
    for n in range(N):
        for c in range(chunks.shape[1]):
            mask, before = int(chunks[n, c]) & 0xFFFF, int(chunks[n, c]) >> 16
            for j in range(slots):
                if (mask >> j) & 1:
                    group = int(rp[n]) + before + bin(mask & ((1 << j) - 1)).count("1")
                    assert group < int(rp[n + 1]), "a slot past the row's groups"
                    col = int(xcols[n // TC_ROWS, c, j])
                    assert 0 <= col < K // G and col == int(unpack_meta(t["meta"][group:group + 1])[2])
                    w[n, col] = per_group[group]
                    used[group] += 1
    assert (used == 1).all(), "every kept group is read exactly once"
    return w.reshape(N, K)


@pytest.mark.parametrize("G", GROUP_SIZES)
@pytest.mark.parametrize("N,density", [(3 * TC_ROWS, 0.5), (3 * TC_ROWS + 40, 0.3), (TC_ROWS - 7, 0.1),
                                       (2 * TC_ROWS, 0.0)])
def test_compact_tiles(G, N, density):
    """Tiles whose rows keep the same columns get compact chunks (the last tile may be short), and
    what the tensor-core kernel reads from them is the layer's weight."""
    K = G * 45
    layer = tile_layer(N, K, G, density, seed=G + N)
    t = to_kernel_format(layer, num_ctas=3)
    assert "xcols" in t
    slots = TC_CHUNK // G
    counts = (layer.row_ptr[1:] - layer.row_ptr[:-1]).long()
    n_chunks = -(-int(counts.max()) // slots)
    assert tuple(t["chunks"].shape) == (N, n_chunks) and n_chunks < -(-K // TC_CHUNK)
    assert tuple(t["xcols"].shape) == (-(-N // TC_ROWS), n_chunks, slots)
    assert torch.equal(compact_tile_weight(t, N, K, G), dense_reference(layer))


@pytest.mark.parametrize("change", ["one_row_differs", "dense", "single_rows"])
def test_compact_tiles_only_when_they_apply(change):
    """No compact tiles when one row of a tile keeps other columns, when they would not save a
    chunk, or for an ordinary single-row layer."""
    N, K, G = 2 * TC_ROWS, 16 * 40, 16
    if change == "single_rows":
        layer = make_layer(N, K, G, "uniform")
    else:
        layer = tile_layer(N, K, G, 1.0 if change == "dense" else 0.5)
    cols = layer.col_idx.clone()
    if change == "one_row_differs":
        row = TC_ROWS + 5
        last = int(layer.row_ptr[row + 1]) - 1
        free = sorted(set(range(K // G)) - set(cols[layer.row_ptr[row]:last + 1].tolist()))
        cols[last] = free[-1]  # still sorted only if it stays the row's largest column
        assert free[-1] > int(cols[last - 1])
    assert compact_chunk_table(layer.row_ptr, cols, K, G) is None


def test_kernel_format_high_columns():
    """Group columns >= 2048 set meta's sign bit; they must survive the round trip."""
    N, G, KG = 5, 16, 4095
    layer = make_layer(N, G * KG, G, "uniform", seed=3)
    t = to_kernel_format(layer, num_ctas=3)
    assert (t["meta"] < 0).any()
    got = kernel_weight(t, N, G * KG, G)
    assert torch.equal(got, dense_reference(layer))


def test_kernel_format_tensors():
    layer = make_layer(40, 16 * 9, 16, "uniform")
    t = to_kernel_format(layer, num_ctas=6, layout="rows")
    assert t["row_ptr"].dtype == t["codes"].dtype == t["meta"].dtype == t["schedule"].dtype == torch.int32
    assert tuple(t["codes"].shape) == (layer.nnz, 2)
    assert tuple(t["meta"].shape) == (layer.nnz,)
    assert tuple(t["schedule"].shape) == (6 * WARPS_PER_CTA + 1, 2)
    assert t["chunks"].dtype == torch.int32 and tuple(t["chunks"].shape) == (40, 1)


def test_pair_pattern():
    """Only G = 16 layers whose every row keeps one group of each aligned pair qualify."""
    layer = pair_layer(70, 16 * 42, seed=1)
    assert pair_pattern(layer.row_ptr, layer.col_idx, layer.in_features, 16)
    blocks = pair_layer(64, 16 * 8, seed=2, block_rows=4).single_rows()
    assert pair_pattern(blocks.row_ptr, blocks.col_idx, 16 * 8, 16)
    assert not pair_pattern(layer.row_ptr, layer.col_idx, layer.in_features, 32)  # G = 32
    wide = pair_layer(70, 32 * 42, seed=1, G=32)
    assert not pair_pattern(wide.row_ptr, wide.col_idx, wide.in_features, 32)
    for pattern in ("uniform", "dense", "all_empty"):
        other = make_layer(70, 16 * 42, 16, pattern)
        assert not pair_pattern(other.row_ptr, other.col_idx, other.in_features, 16)
    odd = make_layer(3, 16 * 3, 16, "dense")  # K = 48: one and a half pairs
    assert not pair_pattern(odd.row_ptr, odd.col_idx, 48, 16)


@pytest.mark.parametrize("G", GROUP_SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("K_groups", [1, 21, 64])
def test_chunk_table(G, pattern, K_groups):
    """Every entry names exactly the row's kept group columns in its chunk, and where they start."""
    N, K = 37, G * K_groups
    layer = make_layer(N, K, G, pattern, seed=K_groups)
    t = chunk_table(layer.row_ptr, layer.col_idx, K, G).long()
    n_chunks, per_chunk = -(-K // TC_CHUNK), TC_CHUNK // G
    assert tuple(t.shape) == (N, n_chunks)
    rp, cols = layer.row_ptr.long(), layer.col_idx.long()
    for n in range(N):
        row_cols = cols[rp[n]:rp[n + 1]]
        for c in range(n_chunks):
            in_chunk = row_cols[(row_cols >= c * per_chunk) & (row_cols < (c + 1) * per_chunk)]
            want_mask = sum(1 << int(j - c * per_chunk) for j in in_chunk)
            assert int(t[n, c]) & 0xFFFF == want_mask
            assert int(t[n, c]) >> 16 == int((row_cols < c * per_chunk).sum())


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("num_ctas", [1, 5, 64, 500])
def test_schedule_balances_groups(pattern, num_ctas):
    layer = make_layer(200, 16 * 33, 16, pattern, seed=num_ctas)
    rp = layer.row_ptr.long()
    R = cta_row_bounds(layer.row_ptr, num_ctas)
    assert R[0] == 0 and R[-1] == 200 and R.numel() == num_ctas + 1 and (R[1:] >= R[:-1]).all()
    counts = rp[R[1:]] - rp[R[:-1]]
    longest_row = int((rp[1:] - rp[:-1]).max())
    # Each CTA holds its share of the groups, give or take one row at each end.
    assert counts.max() <= layer.nnz / num_ctas + 2 * longest_row + 1

    s = make_schedule(layer.row_ptr, num_ctas).long()
    assert s.shape == (num_ctas * WARPS_PER_CTA + 1, 2) and s[-1].tolist() == [layer.nnz, 200]
    groups, rows = s[:, 0], s[:, 1]
    assert (groups[1:] >= groups[:-1]).all() and (rows[1:] >= rows[:-1]).all()
    assert torch.equal(rows[::WARPS_PER_CTA], R)  # CTA c starts at its first row
    per_warp = (groups[1:] - groups[:-1]).reshape(num_ctas, WARPS_PER_CTA)
    assert (per_warp.max(1).values - per_warp.min(1).values <= 1).all()  # an exact even split
    g, r = groups[:-1][groups[:-1] < groups[1:]], rows[:-1][groups[:-1] < groups[1:]]
    assert (rp[r] <= g).all()  # a task with groups starts at the row holding its first group
    assert ((g < rp[r + 1]) | (rp[r] == rp[r + 1])).all()  # or at an empty row before it


def test_row_per_cta_schedule():
    row_ptr = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    s = row_per_cta_schedule(row_ptr)
    assert s[::WARPS_PER_CTA, 1].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("args,fragment", [
    ((2, 16, 64, 64), "4-bit"),
    ((4, 8, 64, 64), "group_size"),
    ((4, 16, 64, 40), "multiple"),
    ((4, 16, 64, 16 * 4097), "4096"),
    ((4, 16, -1, 64), "negative"),
])
def test_can_implement_rejects(args, fragment):
    ok, reason = can_implement(*args)
    assert not ok and fragment in reason


def test_can_implement_accepts():
    assert can_implement(4, 16, 11008, 4096) == (True, None)
    assert can_implement(4, 128, 4096, 128 * 4096) == (True, None)


def test_available_reports_a_reason():
    ok, reason = cuda.available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason


# ------------------------------------------------------------------------------------------
# GPU: the ops

needs_cuda = pytest.mark.skipif(not cuda.available()[0], reason=f"GQSA CUDA ops: {cuda.available()[1]}")
DTYPES = (torch.float16, torch.bfloat16)
# ||y - ref|| / ||ref||: the GEMV sums at most 16 products per lane in fp16 before widening to
# fp32 (about 1e-3 of a group's sum), below the bf16 output's own rounding.
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 8e-3}


def poisoned_empty(shape, dtype):
    """Leaves NaN in the caching allocator's next block of this size, so unwritten outputs show."""
    torch.empty(shape, dtype=dtype, device="cuda").fill_(float("nan"))


def check_gemv(layer, t, M, dtype, x_staging=-1, op=None):
    """The GEMV (or `op(x, t, N)`) against the reference, with every output written."""
    N, K = layer.out_features, layer.in_features
    x = torch.randn(M, K, device="cuda").to(dtype)
    poisoned_empty((M, N), dtype)
    y = cuda.gemv(x, t, N, x_staging) if op is None else op(x, t, N)
    ref = x.double() @ dense_reference(layer).cuda().double().T
    assert y.shape == (M, N) and y.dtype == dtype
    assert torch.isfinite(y).all(), "some outputs were not written"
    err = (y.double() - ref).norm() / ref.norm().clamp_min(1e-30)
    assert err < REL_TOL[dtype], f"relative error {err:.2e}"
    if layer.nnz == 0 or (layer.row_ptr[1:] == layer.row_ptr[:-1]).any():
        empty = (layer.row_ptr[1:] == layer.row_ptr[:-1]).cuda()
        assert (y[:, empty] == 0).all(), "rows without kept groups must be zero"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_bank_order_keeps_the_weight(pattern):
    """Reordering each row's groups (cuda_format.bank_order) changes the layout, not the weight."""
    layer = make_layer(67, 16 * 64, 16, pattern, seed=5)
    t = to_kernel_format(layer, 8, layout="rows")
    b = with_bank_order(t)
    assert "chunks" not in b and torch.equal(b["schedule"], t["schedule"])
    assert torch.equal(dequantize_kernel_format(b["row_ptr"], b["codes"], b["meta"], 67, 16 * 64, 16),
                       dequantize_kernel_format(t["row_ptr"], t["codes"], t["meta"], 67, 16 * 64, 16))
    if pattern == "uniform":
        assert not torch.equal(b["meta"], t["meta"])


# The GEMVs: the row layout's with x in global or shared memory, and the sliced layout's.
GEMV_LAYOUTS = {"global_x": ("rows", 0), "shared_x": ("rows", 1), "sliced": ("sliced", -1)}


@needs_cuda
@pytest.mark.parametrize("gemv", GEMV_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", GROUP_SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("M", range(1, MAX_GEMV_TOKENS + 1))
def test_gemv(dtype, G, pattern, M, gemv):
    layout, x_staging = GEMV_LAYOUTS[gemv]
    if layout == "sliced" and G != 16:
        pytest.skip("the sliced layout is for G = 16")
    N, K = 301, G * 21  # N is no multiple of 64 (nor of 32); K is G times an odd number
    layer = make_layer(N, K, G, pattern, seed=M).to("cuda")
    check_gemv(layer, kernel_tensors(layer, cuda.default_num_ctas(), layout), M, dtype, x_staging)


@needs_cuda
@pytest.mark.parametrize("gemv", GEMV_LAYOUTS)
@pytest.mark.parametrize("M", [9, 16, 17, 33, 40])
def test_gemv_many_tokens(M, gemv):
    """More than 8 tokens (3 sliced): one launch per 8 (3), each reading the weights once."""
    layout, x_staging = GEMV_LAYOUTS[gemv]
    layer = make_layer(301, 16 * 37, 16, "heavy_block", seed=M).to("cuda")
    check_gemv(layer, kernel_tensors(layer, cuda.default_num_ctas(), layout), M, torch.float16, x_staging)


@needs_cuda
@pytest.mark.parametrize("cut", [0.01, 0.5, 1.5, 1e9], ids=["every_slice", "half_mean", "default", "none"])
@pytest.mark.parametrize("pattern", ["uniform", "heavy_block", "empty_and_full", "dense"])
@pytest.mark.parametrize("M", [1, 2, 3])
def test_sliced_gemv_pieces(cut, pattern, M):
    """Slices cut into pieces (from every slice to none): the pieces' sums are added up by the
    last piece, and the slots of slice_parts are all -1 again after every call. Each call draws a
    new x, so a last piece that read an earlier call's sums would fail the reference check."""
    layer = make_layer(333, 16 * 61, 16, pattern, seed=M).to("cuda")
    rows = to_kernel_format(layer, 8, layout="rows")
    t = {**rows, **sliced_layout(rows["row_ptr"], rows["codes"], rows["meta"], 16 * 61, 4, cut)}
    for warps in ([4, 4, 4], [8, 8, 8], [16, 16, 16]):
        for _ in range(2):
            check_gemv(layer, t, M, torch.float16, op=lambda x, t, N, w=warps: cuda.gemv(x, t, N, warps=w))
            assert (t["slice_parts"] == -1).all()


@needs_cuda
@pytest.mark.parametrize("M,K", [(3, MAX_SLICED_K), (2, MAX_SLICED_K - 16), (3, 16 * 700)])
def test_sliced_gemv_wide_inputs(M, K):
    """Up to the sliced layout's widest input: the op runs as many tokens per launch as fit."""
    layer = make_layer(40, K, 16, "empty_and_full", seed=K).to("cuda")
    check_gemv(layer, kernel_tensors(layer, 16, "sliced"), M, torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", [16, 128])
@pytest.mark.parametrize("gemv", GEMV_LAYOUTS)
def test_gemv_large_activations(dtype, G, gemv):
    """Activations near the top of fp16's range against the largest q - z: the GEMV sums
    products in fp16 (of x scaled by 2^-7 or 2^-8), and no sum may overflow."""
    N, K = 64, 512
    g = torch.Generator().manual_seed(3)
    # Every code 15 and every zero point 0: q - z = 15, the largest product a code can give, so
    # each fp16 partial sum of x = 60000 reaches 56250 (it would overflow with half the x scale).
    # Small scales of both signs keep the outputs themselves inside fp16.
    scales = (torch.rand(N, K // G, generator=g) + 0.5) * 1e-4 * torch.where(
        torch.rand(N, K // G, generator=g) < 0.5, -1.0, 1.0)
    keep = torch.rand(N, K // G, generator=g) < 0.5
    layer = pack_layer(torch.full((N, K), 15), scales, torch.zeros(N, K // G, dtype=torch.int64), keep,
                       LayerFormat(4, G, 1)).to("cuda")
    layout, x_staging = GEMV_LAYOUTS[gemv]
    if layout == "sliced" and G != 16:
        pytest.skip("the sliced layout is for G = 16")
    t = kernel_tensors(layer, cuda.default_num_ctas(), layout)
    x = torch.full((3, K), 60000.0, device="cuda")
    x[1] = -60000.0
    x[2] = (torch.randn(K, device="cuda") * 20000).clamp(-60000, 60000)
    y = cuda.gemv(x.to(dtype), t, N, x_staging)
    ref = x.to(dtype).double() @ dense_reference(layer).cuda().double().T
    assert torch.isfinite(y).all()
    assert (y.double() - ref).norm() / ref.norm() < REL_TOL[dtype]


@needs_cuda
@pytest.mark.parametrize("M,K", [(1, 16 * 3200), (2, 16 * 1600), (8, 16 * 400), (8, 16 * 401), (1, 16 * 4096)])
def test_gemv_shared_x_limits(M, K):
    """x at and just past the shared-memory copy's limit (the kernel then reads global memory):
    100 KB, or what the GPU allows a block less 1 KB of the kernel's own (sm_86 and sm_89: 98 KB)."""
    layer = make_layer(40, K, 16, "empty_and_full", seed=K).to("cuda")
    t = to_kernel_format(layer, 16, layout="rows")
    optin = getattr(torch.cuda.get_device_properties(), "shared_memory_per_block_optin", 227 * 1024)
    limit = min(100 * 1024, optin - 1024)
    fits = M * -(-K // 64) * 128 <= limit
    check_gemv(layer, t, M, torch.bfloat16, -1)
    if fits:
        check_gemv(layer, t, M, torch.float16, 1)
    else:
        with pytest.raises(RuntimeError, match="do not fit"):
            cuda.gemv(torch.zeros(M, K, device="cuda", dtype=torch.float16), t, 40, 1)


@needs_cuda
@pytest.mark.parametrize("num_ctas", [1, 3, 64, 1000])
@pytest.mark.parametrize("G", [16, 128])
@pytest.mark.parametrize("pattern", ["uniform", "heavy_block", "empty_and_full"])
def test_gemv_grids(num_ctas, G, pattern):
    """Grids from one CTA (rows cut by every warp edge) to more CTAs than rows (empty CTAs)."""
    layer = make_layer(257, G * 13, G, pattern, seed=num_ctas).to("cuda")
    check_gemv(layer, to_kernel_format(layer, num_ctas, layout="rows"), 3, torch.float16)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("M", [1, 2, 4])
def test_gemv_bank_order(dtype, pattern, M):
    """The GEMV reads a row's groups in any order: the bank-ordered layout gives the same product."""
    layer = make_layer(301, 16 * 64, 16, pattern, seed=M).to("cuda")
    check_gemv(layer, with_bank_order(to_kernel_format(layer, cuda.default_num_ctas(), layout="rows")), M, dtype)


@needs_cuda
def test_gemv_row_per_cta_and_long_rows():
    layer = make_layer(33, 16 * 4001, 16, "dense").to("cuda")  # rows far longer than a warp's share
    t = to_kernel_format(layer, 4, layout="rows")
    check_gemv(layer, t, 2, torch.bfloat16)
    t["schedule"] = row_per_cta_schedule(layer.row_ptr)
    check_gemv(layer, t, 2, torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("layout", ["rows", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", GROUP_SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("M", [1, 5, 8, 9, 16, 17, 32, 33, 64, 65, 130])
def test_tc(dtype, G, pattern, M, layout):
    """The tensor-core kernel: N no multiple of its 64-row tiles, K no multiple of its chunks,
    every token count class (up to 16, 32, 64 per launch, and several launches); in the sliced
    layout its tiles are 64 places, and the padding places write nothing."""
    if layout == "sliced" and G != 16:
        pytest.skip("the sliced layout is for G = 16")
    N, K = 301, G * 21
    layer = make_layer(N, K, G, pattern, seed=M).to("cuda")
    check_gemv(layer, kernel_tensors(layer, 8, layout), M, dtype, op=cuda.tc)


@needs_cuda
@pytest.mark.parametrize("R", [4, 64])
@pytest.mark.parametrize("M", [1, 3, 16, 40])
def test_row_blocks(R, M):
    """A block_rows > 1 layer through the GEMV (1 and 3 tokens) and the tensor-core kernel."""
    layer = make_layer(7 * R, 16 * 40, 16, "empty_and_full", seed=R + M, block_rows=R).to("cuda")
    op = None if M <= MAX_GEMV_TOKENS else cuda.tc
    check_gemv(layer.single_rows(), to_kernel_format(layer, 8), M, torch.float16, op=op)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", GROUP_SIZES)
@pytest.mark.parametrize("M", [5, 16, 33, 64, 130])
def test_tc_compact_tiles(dtype, G, M):
    """The tensor-core kernel on compact tiles (xcols): a short last tile, tiles of different
    lengths, any M."""
    layer = tile_layer(3 * TC_ROWS + 40, G * 45, G, 0.4, seed=G + M).to("cuda")
    t = to_kernel_format(layer, 8)
    assert "xcols" in t
    check_gemv(layer, t, M, dtype, op=cuda.tc)


@needs_cuda
@pytest.mark.parametrize("splits,density", [(1, 0.5), (2, 0.5), (3, 0.5), (0, 0.0), (1, 0.0)])
def test_tc_compact_tiles_splits(splits, density):
    """Compact tiles split along their chunks; a layer that keeps nothing has no chunks at all
    and gives zeros."""
    N, K = 2 * TC_ROWS + 3, 16 * 256
    layer = tile_layer(N, K, 16, density, seed=splits).to("cuda")
    t = to_kernel_format(layer, 8)
    assert "xcols" in t and (t["chunks"].shape[1] == 0) == (density == 0)
    assert density == 0 or t["chunks"].shape[1] >= splits
    op = lambda x, t, N: cuda.tc(x, t, N, splits)  # noqa: E731
    check_gemv(layer, t, 20, torch.bfloat16, op=op)


@needs_cuda
@pytest.mark.parametrize("layout", ["rows", "sliced"])
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("pattern", ["uniform", "heavy_block", "empty_and_full"])
def test_tc_splits(splits, pattern, layout):
    """Any split of K over CTAs (16: one chunk each), deterministic from run to run."""
    layer = make_layer(200, 16 * 256, 16, pattern, seed=splits).to("cuda")
    t = kernel_tensors(layer, 8, layout)
    op = lambda x, t, N: cuda.tc(x, t, N, splits)  # noqa: E731
    check_gemv(layer, t, 24, torch.float16, op=op)
    check_gemv(layer, t, 130, torch.bfloat16, op=op)  # launches of 64, 64 and 2 tokens
    x = torch.randn(40, 16 * 256, device="cuda", dtype=torch.bfloat16)
    y = op(x, t, 200)
    assert torch.equal(y, op(x, t, 200)), "the split-K sum must not depend on CTA order"
    assert not t["counters"].any(), "the last split of each tile sets its counter back to 0"
    fresh = {k: v for k, v in t.items() if k != "counters"}  # the op zeroes counters of its own
    assert torch.equal(op(x, fresh, 200), y)


@needs_cuda
def test_tc_large_activations():
    """bf16 activations beyond fp16's range: the kernel multiplies x * 2^-8 in fp16."""
    layer = make_layer(96, 16 * 40, 16, "uniform", seed=5).to("cuda")
    t = to_kernel_format(layer, 8)
    x = (torch.randn(20, 16 * 40, device="cuda") * 1e6).to(torch.bfloat16)
    y = cuda.tc(x, t, 96)
    ref = x.double() @ dense_reference(layer).cuda().double().T
    assert torch.isfinite(y).all()
    assert (y.double() - ref).norm() / ref.norm() < REL_TOL[torch.bfloat16]


@needs_cuda
@pytest.mark.parametrize("layout", ["rows", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G", GROUP_SIZES)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_dequant(dtype, G, pattern, layout):
    if layout == "sliced" and G != 16:
        pytest.skip("the sliced layout is for G = 16")
    N, K = 203, G * 19
    layer = make_layer(N, K, G, pattern, seed=G).to("cuda")
    t = kernel_tensors(layer, 8, layout)
    poisoned_empty((N, K), dtype)
    w = cuda.dequant(t, N, K, G, dtype)
    assert torch.equal(w, dense_reference(layer, dtype))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 5, 8, 9, 16, 17, 32, 33, 64, 65, 130])
def test_sp(dtype, M):
    """The sparse-tensor-core kernel on a pair-pattern layer: N no multiple of its 64-row tiles,
    K no multiple of its 256-channel chunks (21 pairs), every token count class."""
    N, K = 301, 16 * 42
    layer = pair_layer(N, K, seed=M).to("cuda")
    check_gemv(layer, to_kernel_format(layer, 8), M, dtype, op=cuda.sp)


@needs_cuda
@pytest.mark.parametrize("K", [32, 16 * 16, 16 * 18, 16 * 512])
def test_sp_input_sizes(K):
    """One pair; exactly one chunk; a chunk and one pair; 16 chunks."""
    layer = pair_layer(130, K, seed=K).to("cuda")
    check_gemv(layer, to_kernel_format(layer, 8), 24, torch.float16, op=cuda.sp)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_sp_whole_lines(dtype):
    """A grid of more than two CTAs per SM, where the code and meta copies read whole L2 lines: rows
    past N in the last tile, whole chunks."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    N = 64 * (2 * sms + 1) + 37
    layer = pair_layer(N, 16 * 32, seed=3).to("cuda")
    t = to_kernel_format(layer, 8)
    for M in (2, 16):
        check_gemv(layer, t, M, dtype, op=cuda.sp)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_sp_narrow_tiles(dtype):
    """Unsplit grids of whole chunks at 1 to 16 tokens, where sp_kernel runs 32-row tiles: a grid
    of a few CTAs (rows past N in its last tile) and, on a GPU of 132 SMs, the Llama-2-7B q/k/v's
    384 narrow CTAs, whose copies ask for whole L2 lines; 17 tokens takes 64-row tiles again."""
    for N, K in ((300, 16 * 64), (12288, 256)):
        layer = pair_layer(N, K, seed=N).to("cuda")
        t = to_kernel_format(layer, 8)
        for M in (1, 2, 9, 16, 17):
            check_gemv(layer, t, M, dtype, op=cuda.sp)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_sp_packed_ctas(dtype):
    """Grids of more CTAs than SMs that all fit at 4 an SM run the packed 9-16 token instance (3
    stages): unsplit with whole L2 lines (about 2.5 CTAs an SM, as the Llama-2-7B gate/up) and in 4 K
    splits without (about 2 an SM, as the down layers); 8 and 17 tokens take other instances."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for N, K, splits in ((64 * (2 * sms + sms // 2) + 40, 512, 1), (64 * (sms // 2), 16 * 256, 4)):
        layer = pair_layer(N, K, seed=N).to("cuda")
        t = to_kernel_format(layer, 8)
        for M in (8, 9, 16, 17):
            check_gemv(layer, t, M, dtype, op=lambda x, t, N: cuda.sp(x, t, N, splits))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_sp_silu_mul(dtype):
    """gqsa_sp with silu_mul (a gate/up layer and vLLM's SiLU-and-mul after it, each CTA a tile of
    32 gate rows and their up rows): the layer's output through the reference's SiLU-and-mul, at 2 to
    32 tokens (every token class, the 9-16 token class packed or not); gate rows a multiple of 32
    and not (a last tile part padding), K in whole chunks and not, unsplit and K split 3 ways; and
    the grids of the Llama-2-7B gate/up (whole L2 lines, packed at 16 tokens)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = [(96, 512, 1), (40, 16 * 40, 1), (200, 16 * 256, 3), (200, 16 * 42, 2), (11008, 512, 1)]
    for half, K, splits in cases:
        layer = pair_layer(2 * half, K, seed=half + K).to("cuda")
        t = to_kernel_format(layer, 8)
        w = dense_reference(layer).cuda()
        for M in (2, 8, 9, 16, 17, 32):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            y = cuda.sp(x, t, 2 * half, splits, silu_mul=True)
            assert y.shape == (M, half)
            full = cuda.sp(x, t, 2 * half, splits)
            # The same fp32 sums, rounded as vLLM's SiLU-and-mul rounds the layer's output.
            expect = reference.silu_and_mul(full)
            torch.testing.assert_close(y, expect, rtol=2e-3 if dtype == torch.float16 else 1.6e-2, atol=1e-5,
                                       msg=lambda m: f"half={half} K={K} splits={splits} M={M}: {m}")
            ref = reference.silu_and_mul((x.double() @ w.double().T).to(dtype))
            assert (y.double() - ref.double()).norm() / ref.double().norm() < 2 * REL_TOL[dtype]
            if splits > 1:
                assert torch.equal(y, cuda.sp(x, t, 2 * half, splits, silu_mul=True))
                assert not t["counters"].any()
    assert (11008 + 31) // 32 > 2 * sms  # the last case's grid asks for whole lines


@needs_cuda
def test_gqsa_mm_silu_mul_op():
    """The op vLLM's graph calls: the fused kernel where the sparse kernel serves the batch (2 to 32
    tokens here), gqsa_mm and the reference's SiLU-and-mul elsewhere (the GEMV at 1 token, the fused
    wgmma kernel or dequantize + cuBLAS from 33); the same result either way, within a rounding."""
    layer = pair_layer(2 * 256, 1024, seed=7).to("cuda")
    t = to_kernel_format(layer, 8)
    for M in (1, 2, 16, 32, 33, 200):
        x = torch.randn(M, 1024, device="cuda", dtype=torch.float16)
        args = (t["row_ptr"], t["codes"], t["meta"], t["schedule"], t["chunks"], 512, 16, None, t["counters"], True)
        y = torch.ops.vllm_gqsa.gqsa_mm_silu_mul(x, *args)
        expect = reference.silu_and_mul(torch.ops.vllm_gqsa.gqsa_mm(x, *args))
        assert y.shape == (M, 256)
        torch.testing.assert_close(y, expect, rtol=2e-3, atol=1e-5)
        assert ops._sp_silu_mul_takes(x, t, 512, True, None) == (2 <= M <= 32 or (
            M == 33 and not cuda.sp_wgmma_takes(x, t)))


@needs_cuda
def test_sp_silu_mul_refuses_an_odd_layer():
    layer = pair_layer(97, 512, seed=1).to("cuda")
    t = to_kernel_format(layer, 8)
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="even number of rows"):
        cuda.sp(x, t, 97, silu_mul=True)


# The RMSNorm split between two pair layers (gqsa_sp_add_stats, gqsa_sp_from_stats): sp_kernel's
# finish adds the residual and writes a sum of h^2 per token and 32 rows; the next layer's CTAs sum
# them and scale their outputs.

def sp_add_stats(x, t, residual, w, N, splits=0):
    return torch.ops.vllm_gqsa.gqsa_sp_add_stats(x, residual, w, t["row_ptr"], t["codes"], t["meta"], N, splits,
                                                 t["counters"])


def sp_from_stats(g, stats, residual, w, t, N, splits=0, silu_mul=False, eps=1e-6):
    return torch.ops.vllm_gqsa.gqsa_sp_from_stats(g, stats, eps, residual, w, t["row_ptr"], t["codes"], t["meta"], N,
                                                  splits, t["counters"], silu_mul)


def norm_weight(kind, n, dtype, seed):
    w = torch.rand(n, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)) + 0.5
    return {"x_dtype": w.to(dtype), "fp32": w, "none": None}[kind]


@needs_cuda
@pytest.mark.parametrize("weight", ["x_dtype", "fp32", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sp_add_stats(dtype, weight):
    """The first part against the plain kernel's output: the new residual and g bit for bit, each
    column of stats the sum of h^2 over its 32 rows (a last tile partly past N, a last column
    partly), at 1 to 32 tokens (every token class, narrow, packed and split grids), the same on
    every call, counters left at zero."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for N, K, splits in ((336, 512, 1), (4096, 4096, 0), (200, 16 * 256, 3), (64 * (2 * sms + sms // 2) + 40, 512, 1)):
        layer = pair_layer(N, K, seed=N + K).to("cuda")
        t = to_kernel_format(layer, 8)
        w = norm_weight(weight, N, dtype, N)
        for M in (1, 2, 8, 9, 16, 17, 32):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            residual = (torch.randn(M, N, device="cuda") * 4).to(dtype)
            new_residual, g, stats = sp_add_stats(x, t, residual, w, N, splits)
            h = cuda.sp(x, t, N, splits).float() + residual.float()
            msg = f"N={N} K={K} splits={splits} M={M}"
            assert torch.equal(new_residual, h.to(dtype)), msg
            assert torch.equal(g, (h * w.float() if w is not None else h).to(dtype)), msg
            assert stats.shape == (M, (N + 31) // 32) and (stats >= 0).all(), msg
            cols = torch.nn.functional.pad(h, (0, -N % 32)).pow(2).reshape(M, -1, 32).sum(-1)
            torch.testing.assert_close(stats, cols, rtol=1e-5, atol=1e-6, msg=lambda m: f"{msg}: {m}")
            again = sp_add_stats(x, t, residual, w, N, splits)
            assert all(torch.equal(a, b) for a, b in zip(again, (new_residual, g, stats))), msg
            assert not t["counters"].any()


@needs_cuda
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("weight", ["x_dtype", "fp32", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sp_from_stats(dtype, weight, silu_mul):
    """The second part: the layer (and SiLU-and-mul) of vLLM's normalized h, from g and the first
    part's sums, at 1 to 32 tokens, unsplit and split, narrow tiles (the Llama-2-7B q/k/v grid),
    and with the sums spread over more columns than the CTA loads at once."""
    K = 1024
    first = pair_layer(K, 512, seed=1).to("cuda")
    t1 = to_kernel_format(first, 8)
    w = norm_weight(weight, K, dtype, 2)
    for N, splits in ((320, 1), (12288, 1), (400, 3)):
        layer = pair_layer(N, K, seed=N).to("cuda")
        t = to_kernel_format(layer, 8)
        dense = dense_reference(layer).cuda().double()
        for M in (1, 2, 8, 9, 16, 17, 32):
            x = torch.randn(M, 512, device="cuda", dtype=dtype)
            residual = (torch.randn(M, K, device="cuda") * 4).to(dtype)
            new_residual, g, stats = sp_add_stats(x, t1, residual, w, K)
            normed = reference.rms_norm(new_residual, None, w, 1e-6)[0]
            plain = cuda.sp(normed, t, N, splits)
            ref = normed.double() @ dense.T
            if silu_mul:
                plain, ref = reference.silu_and_mul(plain), reference.silu_and_mul(ref)
            msg = f"N={N} splits={splits} M={M}"
            for parts in (None, 300):  # the kernel's own sums, or the same total over 300 columns
                s = stats if parts is None else (stats.sum(-1, keepdim=True) / parts).repeat(1, parts)
                y = sp_from_stats(g, s, new_residual, w, t, N, splits, silu_mul)
                assert y.shape == (M, N // 2 if silu_mul else N), msg
                assert (y.double() - ref).norm() / ref.norm() < 2 * REL_TOL[dtype], msg
                # The plain kernel on vLLM's normalized x: g rounds h * weight once where vLLM
                # rounds h * r first, a unit in the last place of an input.
                assert (y.double() - plain.double()).norm() / plain.double().norm() < 2 * REL_TOL[dtype], msg
            assert not t["counters"].any()


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_sp_from_stats_g_too_large_takes_the_normalized_x(dtype):
    """One token's h * weight past fp16's range: its 32 rows' stat is marked (-1 - the sum), and
    every CTA of the second part normalizes h itself (bf16 x converted in each CTA at 2 tokens and
    once per launch at 16), so its output is finite and right."""
    K, N = 1024, 256
    first, second = pair_layer(K, 512, seed=3).to("cuda"), pair_layer(N, K, seed=4).to("cuda")
    t1, t2 = to_kernel_format(first, 8), to_kernel_format(second, 8)
    w = torch.full((K,), 2.0, device="cuda", dtype=dtype)
    for M in (2, 16):
        x = torch.randn(M, 512, device="cuda", dtype=dtype)
        residual = torch.randn(M, K, device="cuda").to(dtype)
        residual[1, 70] = 60000.0
        new_residual, g, stats = sp_add_stats(x, t1, residual, w, K)
        assert (stats < 0).sum() == 1 and stats[1, 70 // 32] < 0
        y = sp_from_stats(g, stats, new_residual, w, t2, N)
        ref = reference.rms_norm(new_residual, None, w, 1e-6)[0].double() @ dense_reference(second).cuda().double().T
        assert y.isfinite().all()
        assert (y.double() - ref).norm() / ref.norm() < 2 * REL_TOL[dtype]


@needs_cuda
def test_sp_split_norm_opcheck_and_bad_inputs():
    layer = pair_layer(96, 512, seed=5).to("cuda")
    t = to_kernel_format(layer, 8)
    args = (t["row_ptr"], t["codes"], t["meta"], 96, 0, t["counters"])
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    r = torch.randn(4, 96, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_sp_add_stats, (x, r, None, *args))
    g, h = (torch.randn(4, 512, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for silu_mul in (False, True):
        torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_sp_from_stats,
                              (g, torch.rand(4, 3, device="cuda"), 1e-5, h, torch.ones(512, device="cuda"), *args,
                               silu_mul))
    with pytest.raises(RuntimeError, match="at most 32 tokens"):
        sp_add_stats(torch.randn(33, 512, device="cuda").half(), t, torch.randn(33, 96, device="cuda").half(), None, 96)
    odd = pair_layer(96, 16 * 40, seed=6).to("cuda")
    with pytest.raises(RuntimeError, match="positive multiple of 256"):
        sp_add_stats(torch.randn(4, 16 * 40, device="cuda").half(), to_kernel_format(odd, 8), r, None, 96)
    with pytest.raises(RuntimeError, match="residual must be"):
        sp_add_stats(x, t, torch.randn(4, 95, device="cuda").half(), None, 96)
    with pytest.raises(RuntimeError, match="weight must be"):
        sp_add_stats(x, t, r, torch.ones(95, device="cuda"), 96)
    with pytest.raises(RuntimeError, match="stats must be"):
        sp_from_stats(x, torch.rand(3, 3, device="cuda"), x, None, t, 96)
    with pytest.raises(RuntimeError, match="residual must be"):
        sp_from_stats(x, torch.rand(4, 3, device="cuda"), x.float(), None, t, 96)
    with pytest.raises(RuntimeError, match="even number of rows"):
        sp_from_stats(x, torch.rand(4, 3, device="cuda"), x, None, to_kernel_format(pair_layer(97, 512).to("cuda"), 8),
                      97, silu_mul=True)


@needs_cuda
@pytest.mark.parametrize("silu_mul", [False, True])
def test_split_norm_ops_on_pair_layers(silu_mul):
    """The ops vLLM's graph calls, on pair layers: the kernels from 2 to 32 tokens (where
    _sp_norm_takes), the reference math elsewhere (the GEMV at 1 token, the fused wgmma kernel or
    cuBLAS from 33), within a rounding of the layers of vLLM's normalized h either way."""
    K, N = 1024, 512
    o, up = pair_layer(K, 768, seed=7).to("cuda"), pair_layer(N, K, seed=8).to("cuda")
    to, tu = to_kernel_format(o, 8), to_kernel_format(up, 8)
    args = lambda t, n: (t["row_ptr"], t["codes"], t["meta"], t["schedule"], t["chunks"], n, 16, None,  # noqa: E731
                         t["counters"], True)
    w = torch.rand(K, device="cuda", dtype=torch.float16) + 0.5
    for M in (1, 2, 16, 32, 33, 200):
        x = torch.randn(M, 768, device="cuda", dtype=torch.float16)
        r = torch.randn(M, K, device="cuda", dtype=torch.float16)
        new_residual, g, stats = torch.ops.vllm_gqsa.gqsa_mm_add_norm_stats(x, r, w, *args(to, K))
        assert stats.shape == (M, K // 32)
        assert ops._sp_norm_takes(x, to, True, None, None) == (2 <= M <= 32)
        h = torch.ops.vllm_gqsa.gqsa_mm(x, *args(to, K)).float() + r.float()
        assert torch.equal(new_residual, h.half())
        y = torch.ops.vllm_gqsa.gqsa_stats_norm_mm(g, stats, 1e-6, new_residual, w, *args(tu, N), None, None, None,
                                                   silu_mul)
        normed = reference.rms_norm(new_residual, None, w, 1e-6)[0]
        expect = torch.ops.vllm_gqsa.gqsa_mm(normed, *args(tu, N))
        expect = (reference.silu_and_mul(expect) if silu_mul else expect).double()
        assert (y.double() - expect).norm() / expect.norm() < 2 * REL_TOL[torch.float16], f"M={M}"


@needs_cuda
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 16])
def test_sp_splits(splits):
    """Any split of K over CTAs, deterministic from run to run, counters left at zero."""
    layer = pair_layer(200, 16 * 256, seed=splits).to("cuda")
    t = to_kernel_format(layer, 8)
    op = lambda x, t, N: cuda.sp(x, t, N, splits)  # noqa: E731
    check_gemv(layer, t, 24, torch.float16, op=op)
    check_gemv(layer, t, 130, torch.bfloat16, op=op)  # launches of 64, 64 and 2 tokens
    x = torch.randn(40, 16 * 256, device="cuda", dtype=torch.bfloat16)
    y = op(x, t, 200)
    assert torch.equal(y, op(x, t, 200)), "the split-K sum must not depend on CTA order"
    assert not t["counters"].any(), "the last split of each tile sets its counter back to 0"


@needs_cuda
def test_sp_large_activations():
    """bf16 activations beyond fp16's range: the kernel multiplies x * 2^-8 in fp16."""
    layer = pair_layer(96, 16 * 40, seed=5).to("cuda")
    t = to_kernel_format(layer, 8)
    for M in (20, 64):  # x converted in the kernel, and once per launch
        x = (torch.randn(M, 16 * 40, device="cuda") * 1e6).to(torch.bfloat16)
        y = cuda.sp(x, t, 96)
        ref = x.double() @ dense_reference(layer).cuda().double().T
        assert torch.isfinite(y).all()
        assert (y.double() - ref).norm() / ref.norm() < REL_TOL[torch.bfloat16]


@needs_cuda
def test_sp_refuses_other_layers():
    """A layer that does not keep K / 32 groups per row in all is refused before any launch."""
    sp = torch.ops.vllm_gqsa.gqsa_sp
    layer = make_layer(70, 16 * 42, 16, "uniform").to("cuda")
    t = to_kernel_format(layer, 8)
    x = torch.randn(4, 16 * 42, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="pair pattern keeps"):
        sp(x, t["row_ptr"], t["codes"], t["meta"], 70)
    p = to_kernel_format(pair_layer(70, 16 * 42).to("cuda"), 8)
    with pytest.raises(RuntimeError, match="whole number of pairs"):
        sp(torch.randn(4, 16 * 41, device="cuda", dtype=torch.float16), p["row_ptr"], p["codes"], p["meta"], 70)
    with pytest.raises(RuntimeError, match="splits must be"):
        sp(x, p["row_ptr"], p["codes"], p["meta"], 70, 4)  # 3 chunks
    with pytest.raises(RuntimeError, match="counters must have 2 entries"):
        sp(x, p["row_ptr"], p["codes"], p["meta"], 70, 0, torch.zeros(3, dtype=torch.int32, device="cuda"))
    w = to_kernel_format(pair_layer(70, 32 * 42, G=32).to("cuda"), 8)
    with pytest.raises(RuntimeError, match="takes G = 16"):
        sp(torch.randn(4, 32 * 42, device="cuda", dtype=torch.float16), w["row_ptr"], w["codes"], w["meta"], 70)


@needs_cuda
def test_plugin_op_runs_pairs_on_sparse_tensor_cores():
    """gqsa_mm with pairs=True takes the sparse-tensor-core kernel between the GEMV and cuBLAS."""
    import vllm_gqsa.ops  # noqa: F401  (registers gqsa_mm)

    layer = pair_layer(130, 16 * 64, seed=3).to("cuda")
    t = to_kernel_format(layer, 8)
    x = torch.randn(24, 16 * 64, device="cuda", dtype=torch.float16)
    args = (x, t["row_ptr"], t["codes"], t["meta"], t["schedule"], t["chunks"], 130, 16, None, t["counters"])
    y = torch.ops.vllm_gqsa.gqsa_mm(*args, True)
    assert torch.equal(y, cuda.sp(x, t, 130))
    ref = torch.ops.vllm_gqsa.gqsa_mm(*args, False)  # the tensor-core kernel, same weights
    assert (y.float() - ref.float()).norm() / ref.float().norm() < REL_TOL[torch.float16]


needs_sm90 = pytest.mark.skipif(not cuda.available()[0] or torch.cuda.get_device_capability() != (9, 0),
                                reason="the fused pair-pattern kernel (gqsa_sp_wgmma) runs on sm_90 GPUs")


@needs_sm90
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 129, 300, 513])
def test_sp_wgmma(dtype, M):
    """The fused sparse-wgmma kernel on a pair-pattern layer: N no multiple of its 128-row tiles, an
    odd number of 128-channel stages (the host adds one of zeros), tokens past its token tiles."""
    N, K = 301, 128 * 3
    layer = pair_layer(N, K, seed=M).to("cuda")
    check_gemv(layer, to_kernel_format(layer, 8), M, dtype, op=cuda.sp_wgmma)


@needs_sm90
@pytest.mark.parametrize("N,K,M", [(12288, 4096, 512), (4096, 4096, 512), (4096, 11008, 600), (8, 128, 3),
                                   (4096, 4096, 64), (4096, 11008, 100), (12288, 4096, 40)],
                         ids=["256_token_tiles", "128_token_tiles", "down", "one_stage", "o_64_tokens",
                              "down_100_tokens", "qkv_40_tokens"])
def test_sp_wgmma_shapes(N, K, M):
    """All three tile widths (256 tokens where the grid still fills the GPU, as for q/k/v at 512
    tokens; 128 for o; 64 up to 64 tokens), Llama-2-7B's down shape, one 128-channel stage and fewer
    rows than a tile, and the small grids that the kernel fills with K splits (o and down at 64 and
    100 tokens: 32 tiles)."""
    layer = pair_layer(N, K, seed=N + K).to("cuda")
    check_gemv(layer, to_kernel_format(layer, 8), M, torch.float16, op=cuda.sp_wgmma)


@needs_sm90
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [7, 64, 65, 130])
def test_sp_wgmma_splits(dtype, M):
    """Every number of K splits (1..8 CTAs of a cluster sum their partial tiles) on both tile
    widths that take them (64 tokens up to 64, else 128), with N no multiple of the 128-row tiles:
    each against the reference, and the same bits on a second run."""
    N, K = 301, 2048
    layer = pair_layer(N, K, seed=M).to("cuda")
    t = to_kernel_format(layer, 8)
    for splits in range(1, 9):
        check_gemv(layer, t, M, dtype, op=lambda x, t, n: cuda.sp_wgmma(x, t, n, splits))
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        assert torch.equal(cuda.sp_wgmma(x, t, N, splits), cuda.sp_wgmma(x, t, N, splits)), splits


@needs_sm90
def test_sp_wgmma_large_activations_graph_and_refusals():
    """bf16 beyond fp16's range (x * 2^-8 in fp16); deterministic and capturable in a CUDA graph;
    opcheck; layers and sizes it does not serve are refused before any launch."""
    layer = pair_layer(96, 128 * 5, seed=5).to("cuda")
    t = to_kernel_format(layer, 8)
    x = (torch.randn(200, 128 * 5, device="cuda") * 1e6).to(torch.bfloat16)
    y = cuda.sp_wgmma(x, t, 96)
    ref = x.double() @ dense_reference(layer).cuda().double().T
    assert torch.isfinite(y).all()
    assert (y.double() - ref).norm() / ref.norm() < REL_TOL[torch.bfloat16]

    y3 = cuda.sp_wgmma(x, t, 96, 3)  # three K splits: a cluster launch
    assert (y3.double() - ref).norm() / ref.norm() < REL_TOL[torch.bfloat16]
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with torch.cuda.graph(graph):
            yg = cuda.sp_wgmma(x, t, 96)
            yg3 = cuda.sp_wgmma(x, t, 96, 3)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(yg, y) and torch.equal(yg3, y3), "the kernel must be deterministic and capturable"

    op = torch.ops.vllm_gqsa.gqsa_sp_wgmma
    torch.library.opcheck(op, (torch.randn(130, 128 * 5, device="cuda", dtype=torch.float16), t["row_ptr"],
                               t["codes"], t["meta"], 96))
    x5 = torch.randn(130, 128 * 5, device="cuda", dtype=torch.float16)
    for splits in (-1, 4, 9):  # K = 640: three pairs of stages, so at most three splits
        with pytest.raises(RuntimeError, match=r"splits must be 0 \(choose\) or 1..3 .*got " + str(splits)):
            op(x5, t["row_ptr"], t["codes"], t["meta"], 96, splits)
    with pytest.raises(RuntimeError, match="multiple of 128"):
        p = to_kernel_format(pair_layer(70, 16 * 42).to("cuda"), 8)  # K = 672
        op(torch.randn(300, 16 * 42, device="cuda", dtype=torch.float16), p["row_ptr"], p["codes"], p["meta"], 70)
    u = to_kernel_format(make_layer(70, 128 * 4, 16, "uniform").to("cuda"), 8)
    with pytest.raises(RuntimeError, match="pair pattern keeps"):
        op(torch.randn(300, 128 * 4, device="cuda", dtype=torch.float16), u["row_ptr"], u["codes"], u["meta"], 70)
    assert not cuda.sp_wgmma_runs(torch.randn(4, 16 * 42, device="cuda", dtype=torch.float16))
    shifted = torch.randn(2 * 128 * 5 + 4, device="cuda", dtype=torch.float16)[4:].view(2, 128 * 5)  # 8 bytes in
    assert cuda.sp_wgmma_runs(shifted.clone(), t) and not cuda.sp_wgmma_runs(shifted, t)
    # The largest batch whose copy of x, padded to whole token tiles, stays under 2^31 elements;
    # one more token and the plugin takes dequantize + cuBLAS instead (views: no memory).
    row = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    largest = 2**31 // 4096 - 128
    assert cuda.sp_wgmma_runs(row.expand(largest, 4096)) and not cuda.sp_wgmma_runs(row.expand(largest + 1, 4096))


@needs_sm90
def test_plugin_op_runs_large_pair_batches_fused(monkeypatch):
    """From PAIRS_WGMMA_MIN_TOKENS, gqsa_mm takes the fused kernel for pair layers on sm_90 (not the
    sparse-tensor-core kernel, nor dequantize + cuBLAS above it), unless VLLM_GQSA_PAIRS_WGMMA is 0."""
    import vllm_gqsa.ops  # noqa: F401  (registers gqsa_mm)

    monkeypatch.setattr(cuda, "PAIRS_WGMMA", True)
    layer = pair_layer(130, 128 * 8, seed=3).to("cuda")
    t = to_kernel_format(layer, 8)
    for M in (cuda.PAIRS_WGMMA_MIN_TOKENS, cuda.PAIRS_SP_MAX_TOKENS + 1):
        x = torch.randn(M, 128 * 8, device="cuda", dtype=torch.float16)
        args = (x, t["row_ptr"], t["codes"], t["meta"], t["schedule"], t["chunks"], 130, 16, None, t["counters"])
        assert torch.equal(torch.ops.vllm_gqsa.gqsa_mm(*args, True), cuda.sp_wgmma(x, t, 130))
    monkeypatch.setattr(cuda, "PAIRS_WGMMA", False)
    assert torch.equal(torch.ops.vllm_gqsa.gqsa_mm(*args, True), x @ cuda.dequant(t, 130, 128 * 8, 16, x.dtype).T)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op,M", [(cuda.gemv, 4), (cuda.tc, 24), (cuda.tc, 64), (cuda.sp, 24), (cuda.sp, 64)],
                         ids=["gemv", "tc", "tc_64", "sp", "sp_64"])
def test_in_cuda_graph(op, M, dtype):
    """Deterministic and capturable; the tensor-core kernel's split counters (8 row tiles of 16
    chunks: split 4 ways on an H100 or H200) must be back at zero after every replay (and in bf16
    its x scratch, at the larger batches, is captured too)."""
    layer = (pair_layer(512, 16 * 256) if op is cuda.sp else make_layer(512, 16 * 256, 16, "heavy_block")).to("cuda")
    t = to_kernel_format(layer, cuda.default_num_ctas())
    x = torch.randn(M, 16 * 256, device="cuda", dtype=dtype)
    eager = op(x, t, 512)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with torch.cuda.graph(graph):
            y = op(x, t, 512)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager), "the kernel must be deterministic and capturable"
        assert not t["counters"].any(), "the layer's split counters are zeros after every call"


@needs_cuda
def test_opcheck():
    layer = make_layer(70, 16 * 7, 16, "empty_and_full").to("cuda")
    t = to_kernel_format(layer, 9, layout="rows")
    x = torch.randn(3, 16 * 7, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_gemv,
                          (x, t["row_ptr"], t["codes"], t["meta"], t["schedule"], 70))
    torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_dequant,
                          (t["row_ptr"], t["codes"], t["meta"], 70, 16 * 7, 16, torch.float16))
    torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_tc,
                          (torch.randn(20, 16 * 7, device="cuda", dtype=torch.float16), t["row_ptr"],
                           t["codes"], t["meta"], t["chunks"], 70))
    for M in (20, 64):  # bf16 x converted in the kernel, and once per launch
        torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_tc,
                              (torch.randn(M, 16 * 7, device="cuda", dtype=torch.bfloat16), t["row_ptr"],
                               t["codes"], t["meta"], t["chunks"], 70))
    # The layer's split counters (3 chunks split 3 ways): written during the call, zeros after it,
    # which is what lets the schema leave them unmarked as written.
    s = to_kernel_format(make_layer(70, 16 * 48, 16, "empty_and_full").to("cuda"), 9, layout="rows")
    torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_tc,
                          (torch.randn(20, 16 * 48, device="cuda", dtype=torch.float16), s["row_ptr"],
                           s["codes"], s["meta"], s["chunks"], 70, 3, None, s["counters"]))
    p = to_kernel_format(pair_layer(70, 16 * 48).to("cuda"), 9)
    for M, dtype, splits in ((20, torch.float16, 0), (20, torch.bfloat16, 3), (64, torch.bfloat16, 0)):
        torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_sp,
                              (torch.randn(M, 16 * 48, device="cuda", dtype=dtype), p["row_ptr"], p["codes"],
                               p["meta"], 70, splits, p["counters"]))
    c = to_kernel_format(tile_layer(70, 16 * 40, 16, 0.3).to("cuda"), 9)
    torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_tc,
                          (torch.randn(20, 16 * 40, device="cuda", dtype=torch.float16), c["row_ptr"],
                           c["codes"], c["meta"], c["chunks"], 70, 0, c["xcols"]))
    # The sliced layout's ops, a slice cut into pieces included (slices of 24, 12 and 0 steps).
    sl = to_kernel_format(make_layer(70, 16 * 48, 16, "empty_and_full").to("cuda"), 9)
    assert sl["schedule"].shape[0] > 3
    sliced_args = (sl["sell_rows"], sl["schedule"], sl["codes"], sl["meta"], sl["slice_parts"], 70)
    for M, dtype in ((1, torch.float16), (3, torch.bfloat16), (7, torch.float16)):
        torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_sliced_gemv,
                              (torch.randn(M, 16 * 48, device="cuda", dtype=dtype), *sliced_args, [4, 8, 16]))
    torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_tc,
                          (torch.randn(20, 16 * 48, device="cuda", dtype=torch.float16), sl["row_ptr"],
                           sl["codes"], sl["meta"], sl["chunks"], 70, 3, None, sl["counters"], sl["sell_rows"]))
    torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_dequant,
                          (sl["row_ptr"], sl["codes"], sl["meta"], 70, 16 * 48, 16, torch.bfloat16, sl["sell_rows"]))


@needs_cuda
def test_bad_inputs_raise():
    layer = make_layer(20, 32, 16, "uniform").to("cuda")
    t = to_kernel_format(layer, 2, layout="rows")
    op = torch.ops.vllm_gqsa.gqsa_gemv
    x = torch.randn(2, 32, device="cuda", dtype=torch.float16)
    args = (t["row_ptr"], t["codes"], t["meta"], t["schedule"])
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        op(x.float(), *args, 20)
    with pytest.raises(RuntimeError, match="x_staging must be"):
        op(x, *args, 20, 2)
    with pytest.raises(RuntimeError, match="row_ptr has"):
        op(x, *args, 21)
    with pytest.raises(RuntimeError, match="multiple of group_size"):
        op(torch.randn(2, 40, device="cuda", dtype=torch.float16), *args, 20)
    with pytest.raises(RuntimeError, match="meta has"):
        op(x, t["row_ptr"], t["codes"], t["meta"][:-1], t["schedule"], 20)
    with pytest.raises(RuntimeError, match="int32"):
        op(x, t["row_ptr"].long(), t["codes"], t["meta"], t["schedule"], 20)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(32, 2, device="cuda", dtype=torch.float16).T, *args, 20)
    with pytest.raises(RuntimeError, match="expected cuda"):
        op(x, t["row_ptr"].cpu(), t["codes"], t["meta"], t["schedule"], 20)
    # Contiguous views that start one group into their storage: 8 and 4 bytes off alignment.
    codes_view = torch.cat([t["codes"][:1], t["codes"]])[1:]
    meta_view = torch.cat([t["meta"][:1], t["meta"]])[1:]
    for codes, meta in ((codes_view, t["meta"]), (t["codes"], meta_view)):
        with pytest.raises(RuntimeError, match="codes must be 16-byte and meta 8-byte aligned"):
            op(x, t["row_ptr"], codes, meta, t["schedule"], 20)
    with pytest.raises(RuntimeError, match="group_size=32"):
        torch.ops.vllm_gqsa.gqsa_dequant(t["row_ptr"], t["codes"], t["meta"], 20, 32, 32, torch.float16)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        torch.ops.vllm_gqsa.gqsa_dequant(t["row_ptr"], t["codes"], t["meta"], 20, 32, 16, torch.float32)
    tc = torch.ops.vllm_gqsa.gqsa_tc
    with pytest.raises(RuntimeError, match="chunks must have shape"):
        tc(x, t["row_ptr"], t["codes"], t["meta"], t["chunks"][:-1], 20)
    with pytest.raises(RuntimeError, match="splits must be"):
        tc(x, t["row_ptr"], t["codes"], t["meta"], t["chunks"], 20, 2)  # K = 32: one chunk
    with pytest.raises(RuntimeError, match="int32"):
        tc(x, t["row_ptr"], t["codes"], t["meta"], t["chunks"].long(), 20)
    with pytest.raises(RuntimeError, match="counters must have 1 entries"):
        tc(x, t["row_ptr"], t["codes"], t["meta"], t["chunks"], 20, 0, None, torch.zeros(2, dtype=torch.int32,
                                                                                          device="cuda"))
    with pytest.raises(RuntimeError, match="counters must be int32"):
        tc(x, t["row_ptr"], t["codes"], t["meta"], t["chunks"], 20, 0, None, t["counters"].long())
    c = to_kernel_format(tile_layer(20, 16 * 40, 16, 0.3).to("cuda"), 2)
    xc = torch.randn(2, 16 * 40, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="xcols must have shape"):
        tc(xc, c["row_ptr"], c["codes"], c["meta"], c["chunks"], 20, 0, c["xcols"][:, :, :-1].contiguous())
    with pytest.raises(RuntimeError, match="chunks must have shape"):  # compact tables need xcols
        tc(xc, c["row_ptr"], c["codes"], c["meta"], c["chunks"], 20)


@needs_cuda
def test_bad_sliced_inputs_raise():
    layer = make_layer(40, 16 * 9, 16, "uniform").to("cuda")
    t = to_kernel_format(layer, 2, layout="sliced")
    x = torch.randn(2, 16 * 9, device="cuda", dtype=torch.float16)
    op = torch.ops.vllm_gqsa.gqsa_sliced_gemv
    a = {k: t[k] for k in ("sell_rows", "schedule", "codes", "meta", "slice_parts")}

    def call(n_out=40, warps=(), **kw):
        b = {**a, **kw}
        return op(x, b["sell_rows"], b["schedule"], b["codes"], b["meta"], b["slice_parts"], n_out, list(warps))

    assert torch.isfinite(call()).all()
    with pytest.raises(RuntimeError, match="sell_rows must have shape"):
        call(n_out=80)
    with pytest.raises(RuntimeError, match="sell_rows must have shape"):
        call(sell_rows=t["sell_rows"][:32].contiguous())
    with pytest.raises(RuntimeError, match="must hold the same whole steps"):
        call(meta=t["meta"][:-1].contiguous())
    with pytest.raises(RuntimeError, match="G = 16 codes"):
        call(codes=t["codes"].repeat(1, 2))
    with pytest.raises(RuntimeError, match="pieces must have shape"):
        call(schedule=t["schedule"][:1].contiguous())
    with pytest.raises(RuntimeError, match="parts must be int32"):
        call(slice_parts=torch.full((95,), -1, dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match="parts must be int32"):
        call(slice_parts=torch.full((96 * (t["schedule"].shape[0] + 1),), -1, dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match="parts must be int32"):
        call(slice_parts=torch.full((96,), -1, dtype=torch.int64, device="cuda"))
    with pytest.raises(RuntimeError, match="warps per CTA must be 4, 8 or 16"):
        call(warps=(8, 8, 32))
    with pytest.raises(RuntimeError, match="warps must be empty or give 3"):
        call(warps=(8,))
    with pytest.raises(RuntimeError, match="sell_rows must have shape"):
        torch.ops.vllm_gqsa.gqsa_tc(x, t["row_ptr"], t["codes"], t["meta"], t["chunks"], 40, 0, None, None,
                                    t["sell_rows"][:32].contiguous())
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.vllm_gqsa.gqsa_dequant(t["row_ptr"], t["codes"], t["meta"], 40, 16 * 9, 16, torch.float16,
                                         t["sell_rows"].long())


# ------------------------------------------------------------------------------------------
# A decoder layer's RMSNorm split between the sliced GEMVs around it (gqsa::NormSplit): the first
# adds the residual and writes h * weight and its CTAs' sums of h^2, the second normalizes.

def split_layers(M):
    """Two layers, the first's N1 outputs the second's inputs (K2 = N1 rounded down to whole
    groups), in the sliced layout, slices cut into pieces."""
    N1, K1, N2 = 333, 16 * 61, 200
    first = make_layer(N1, K1, 16, "heavy_block", seed=M).to("cuda")
    rows1 = to_kernel_format(first, 8, layout="rows")
    t1 = {**rows1, **sliced_layout(rows1["row_ptr"], rows1["codes"], rows1["meta"], K1, 4, 0.5)}
    second = make_layer(N2, N1 - N1 % 16, 16, "uniform", seed=M + 1).to("cuda")
    return t1, (N1, K1), second, kernel_tensors(second, cuda.default_num_ctas(), "sliced")


def split_second(second, t2, g, stats, residual, w, eps=1e-6):
    """The second GEMV of a split norm over the second layer's K inputs, and its reference: the
    GEMV of vLLM's normalized residual."""
    K2, N2 = second.in_features, second.out_features
    y = torch.ops.vllm_gqsa.gqsa_sliced_gemv_from_stats(
        g[:, :K2].contiguous(), stats, eps, residual[:, :K2].contiguous(), None if w is None else w[:K2].contiguous(),
        t2["sell_rows"], t2["schedule"], t2["codes"], t2["meta"], t2["slice_parts"], N2, [])
    normed = reference.rms_norm(residual[:, :K2], None, None if w is None else w[:K2], eps)[0]
    return y, normed.double() @ dense_reference(second).cuda().double().T


@needs_cuda
@pytest.mark.parametrize("weight", ["x_dtype", "fp32", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 5])
def test_split_norm_kernels(M, dtype, weight):
    """The two GEMVs against the reference: the residual add has vLLM's bits, g = T(h * weight)
    and the sums are h's, and the second GEMV is the GEMV of vLLM's normalized input; slices cut
    into pieces on both sides, every warp count, 5 tokens in two launches, and the sums spread
    over more pieces than the second GEMV's threads."""
    t1, (N1, K1), second, t2 = split_layers(M)
    g = torch.Generator(device="cuda").manual_seed(M)
    x = torch.randn(M, K1, device="cuda", generator=g).to(dtype)
    residual = (torch.randn(M, N1, device="cuda", generator=g) * 4).to(dtype)
    w = torch.rand(N1, device="cuda", generator=g) + 0.5
    w = {"x_dtype": w.to(dtype), "fp32": w, "none": None}[weight]
    for warps in ([4, 4, 4], [8, 8, 8], [16, 16, 16]):
        y = cuda.gemv(x, t1, N1, warps=warps)  # the first layer's plain output, rounded as it writes it
        new_residual, gw, stats = torch.ops.vllm_gqsa.gqsa_sliced_gemv_add_stats(
            x, residual, w, t1["sell_rows"], t1["schedule"], t1["codes"], t1["meta"], t1["slice_parts"], N1, warps)
        h = y.float() + residual.float()
        assert torch.equal(new_residual, h.to(dtype))
        assert torch.equal(gw, (h * w.float() if w is not None else h).to(dtype))
        assert stats.shape == (M, t1["schedule"].shape[0]) and (stats >= 0).all()
        # A cut slice's sum goes to its first piece's slot (its last piece writes it), the same on every call.
        again = torch.ops.vllm_gqsa.gqsa_sliced_gemv_add_stats(
            x, residual, w, t1["sell_rows"], t1["schedule"], t1["codes"], t1["meta"], t1["slice_parts"], N1, warps)
        assert all(torch.equal(a, b) for a, b in zip(again, (new_residual, gw, stats)))
        torch.testing.assert_close(stats.sum(-1), h.pow(2).sum(-1), rtol=1e-5, atol=0)
        assert (t1["slice_parts"] == -1).all()
    K2 = second.in_features
    stats2 = h[:, :K2].pow(2).sum(-1, keepdim=True)
    for parts in (1, 1500):
        y2, ref = split_second(second, t2, gw, (stats2 / parts).repeat(1, parts), new_residual, w)
        assert (y2.double() - ref).norm() / ref.norm() < REL_TOL[dtype]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_norm_g_too_large_takes_the_normalized_x(dtype):
    """One token's h * weight beyond fp16's range: the first GEMV marks its CTA's sum (-1 - the
    sum), and the second reads vLLM's normalized h for that launch instead of g, so its output is
    finite and right; the other tokens' sums stay plain."""
    M = 3
    t1, (N1, K1), second, t2 = split_layers(M)
    x = torch.randn(M, K1, device="cuda").to(dtype)
    residual = torch.randn(M, N1, device="cuda").to(dtype)
    residual[1, 7] = 60000.0
    w = torch.full((N1,), 2.0, device="cuda", dtype=dtype)
    new_residual, gw, stats = torch.ops.vllm_gqsa.gqsa_sliced_gemv_add_stats(
        x, residual, w, t1["sell_rows"], t1["schedule"], t1["codes"], t1["meta"], t1["slice_parts"], N1, [])
    assert (stats[[0, 2]] >= 0).all() and (stats[1] < 0).sum() == 1
    # The second layer's K inputs are the first N1 outputs rounded down to whole groups: its sums,
    # with the first GEMV's marks.
    h2 = new_residual[:, :second.in_features].float().pow(2).sum(-1, keepdim=True)
    stats2 = torch.where((stats < 0).any(-1, keepdim=True), -1 - h2, h2)
    y2, ref = split_second(second, t2, gw, stats2, new_residual, w)
    assert y2.isfinite().all()
    assert (y2.double() - ref).norm() / ref.norm() < REL_TOL[dtype]


@needs_cuda
def test_split_norm_opcheck_and_bad_inputs():
    sl = to_kernel_format(make_layer(70, 16 * 48, 16, "empty_and_full").to("cuda"), 9)
    args = (sl["sell_rows"], sl["schedule"], sl["codes"], sl["meta"], sl["slice_parts"], 70)
    P = sl["schedule"].shape[0]
    for M, dtype in ((1, torch.float16), (3, torch.bfloat16), (7, torch.float16)):
        x = torch.randn(M, 16 * 48, device="cuda", dtype=dtype)
        r = torch.randn(M, 70, device="cuda", dtype=dtype)
        torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_sliced_gemv_add_stats, (x, r, None, *args, [4, 8, 16]))
        g = torch.randn(M, 16 * 48, device="cuda", dtype=dtype)
        stats = torch.rand(M, 5, device="cuda")
        h = torch.randn(M, 16 * 48, device="cuda", dtype=dtype)
        torch.library.opcheck(torch.ops.vllm_gqsa.gqsa_sliced_gemv_from_stats,
                              (g, stats, 1e-5, h, torch.ones(16 * 48, device="cuda"), *args, []))
    x = torch.randn(2, 16 * 48, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="residual must be"):
        torch.ops.vllm_gqsa.gqsa_sliced_gemv_add_stats(x, torch.randn(2, 69, device="cuda").half(), None, *args, [])
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.vllm_gqsa.gqsa_sliced_gemv_add_stats(x, torch.randn(2, 70, device="cuda").half(),
                                                       torch.ones(71, device="cuda"), *args, [])
    with pytest.raises(RuntimeError, match="stats must be"):
        torch.ops.vllm_gqsa.gqsa_sliced_gemv_from_stats(x, torch.rand(3, P, device="cuda"), 1e-5, x, None, *args, [])
    with pytest.raises(RuntimeError, match="residual must be"):
        torch.ops.vllm_gqsa.gqsa_sliced_gemv_from_stats(x, torch.rand(2, P, device="cuda"), 1e-5, x.float(), None,
                                                        *args, [])
    with pytest.raises(RuntimeError, match="weight must be"):
        torch.ops.vllm_gqsa.gqsa_sliced_gemv_from_stats(x, torch.rand(2, P, device="cuda"), 1e-5, x,
                                                        torch.ones(16 * 47, device="cuda"), *args, [])
    with pytest.raises(RuntimeError, match="g must be float16 or bfloat16"):
        torch.ops.vllm_gqsa.gqsa_sliced_gemv_from_stats(x.float(), torch.rand(2, P, device="cuda"), 1e-5, x.float(),
                                                        None, *args, [])