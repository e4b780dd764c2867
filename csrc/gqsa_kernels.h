// SPDX-License-Identifier: Apache-2.0
//
// Torch-free launchers of the GQSA CUDA kernels. Every pointer is a device pointer in the
// kernel format documented in vllm_gqsa/kernels/cuda_format.py (4-bit codes, single rows):
//
//   row_ptr  int32 [N + 1]        kept groups of row n are row_ptr[n] .. row_ptr[n+1]-1
//   codes    int32 [nnz, G / 8]   word w of a group holds weights 8w..8w+7, weight 8w+i in bits 4i..4i+3
//   meta     int32 [nnz]          bits 0-15 fp16 scale, bits 16-19 zero point, bits 20-31 group column
//   schedule int32 [num_ctas * kGemvWarps + 1, 2]  per warp task t = c * kGemvWarps + w (warp w of
//                                 CTA c): (first kept group, first row); the last entry is (nnz, N).
//                                 Warp t's groups end where task t+1's begin; CTA c's rows are
//                                 schedule[c*kGemvWarps].row .. schedule[(c+1)*kGemvWarps].row - 1
//   chunks   int32 [N, ceil(K / kTcChunk)]  for the tensor-core kernel, per row n and chunk c of
//                                 kTcChunk input channels: bits 0-15 say which of the chunk's
//                                 kTcChunk / G group columns row n keeps (bit j: column
//                                 c * kTcChunk / G + j), bits 16-31 how many groups row n keeps in
//                                 chunks 0 .. c-1 (so its groups in chunk c start there)
//
// The launchers check only what they can check cheaply (sizes, group size, dtype); the tensor
// contents are trusted (validated once when the layer is repacked). They never allocate or
// synchronize, so they can be captured in a CUDA graph. They return the launch's error code.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace gqsa {

enum class Dtype : int { kFloat16 = 0, kBFloat16 = 1 };

// Tokens per GEMV launch: gemv() takes any M and launches once per slice of this many tokens,
// each launch reading the weights once. (Large batches are faster as gqsa_dequant + GEMM.)
constexpr int kMaxGemvTokens = 8;
// Group columns are stored in 12 bits of meta.
constexpr int kMaxGroupCols = 4096;
// Warps of one GEMV CTA; the schedule has one task per warp.
constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;

// Where the GEMV reads x from: a copy in shared memory (each CTA stages all of x; the default
// whenever M tokens of K activations fit in kMaxSharedXBytes) or global memory through L1.
// The explicit choices exist for benchmarks and tests.
enum class XStaging : int { kAuto = -1, kGlobal = 0, kShared = 1 };
// Small enough for two CTAs per SM, the persistent grid's default, on Hopper.
constexpr int kMaxSharedXBytes = 100 * 1024;
// An upper bound on the GEMV kernels' static shared memory (ptxas: 144 to 592 bytes).
constexpr int kGemvStaticSharedBytes = 1024;
// Shared memory of the x copy: M rows of K 2-byte activations, each padded to 128 bytes.
constexpr size_t shared_x_bytes(int M, int K) { return static_cast<size_t>(M) * ((K + 63) / 64) * 128; }
// The largest x copy the GEMV stages in shared memory on the current device: kMaxSharedXBytes,
// or less where a block may not have that much (99 KB in all on sm_86 and sm_89, against 163 KB
// on sm_80 and 227 KB on sm_90). Writes it to *bytes; returns the CUDA error of the query.
cudaError_t max_shared_x_bytes(int* bytes);

// y[M, N] = x[M, K] @ W.T, with W given by (row_ptr, codes, meta). x and y are row-major in
// `dtype`; x must be 16-byte aligned. num_ctas = (rows of schedule - 1) / kGemvWarps.
// Any M: one launch per kMaxGemvTokens tokens. kShared when x does not fit is an invalid value.
cudaError_t gemv(Dtype dtype, const void* x, const int32_t* row_ptr, const int32_t* codes,
                 const int32_t* meta, const int32_t* schedule, int num_ctas, void* y, int M,
                 int N, int K, int group_size, int nnz, cudaStream_t stream,
                 XStaging x_staging = XStaging::kAuto);

// The sliced layout (vllm_gqsa/kernels/cuda_format.py) of a G = 16 layer: its rows sorted by
// kept-group count, in slices of kSliceRows rows, one per lane of the sliced GEMV. Step j of a slice
// is kSlotsPerStep group slots, groups kStepGroups * j .. kStepGroups * j + kStepGroups - 1 of each
// of its rows in turn (32 bytes of codes, one DRAM sector), so the row at a place whose first slot
// is b keeps its i-th group in slot b + i + (i / kStepGroups) * (kSlotsPerStep - kStepGroups).
//   sell_rows int32 [num_places, 2]  (row, first slot) per place; row -1 for the padding places
//   pieces    int32 [num_pieces, 4]  the GEMV's grid: (slice, first step, end step, k | n << 16),
//                                    steps of one slice, its k-th piece of n
constexpr int kSliceRows = 32;
constexpr int kStepGroups = 4;
constexpr int kSlotsPerStep = kStepGroups * kSliceRows;
// Tokens per launch of the sliced GEMV (fewer when x would not fit its shared memory).
constexpr int kMaxSlicedTokens = 3;
// Words of a sliced layer's parts per piece of a cut slice: one slot per token and row of its slice.
constexpr int kSlicedPartWords = kMaxSlicedTokens * kSliceRows;

// A decoder layer's RMSNorm (vLLM's fused_add_rms_norm) split between the two sliced GEMVs around
// it, o and gate/up or down and the next q/k/v, so that it is no kernel of its own:
//  - kAddStats, on the GEMV before it: h = T(y) + residual in fp32 for each of its outputs y; it
//    writes residual_out = T(h), g = T(h * weight) (T(h) without a weight) and, per token and CTA,
//    the sum of h^2 over the CTA's rows into stats [M, num_pieces] (0 from a piece that finishes
//    no row), or -1 - that sum where h * weight is too large for the GEMV's fp16 copy of x
//    (kSplitGLimit). y itself is not written.
//  - kFromStats, on the GEMV after it: x is g; every CTA sums stats[m, 0 .. stats_pieces) in one
//    fixed order, r = rsqrt(sum / K + eps), and, since r is one number per token, computes
//    y = T(r * (W g)): g is copied as a plain x is, and r scales the sums in the epilogue. Where a
//    stat is negative the CTA copies vLLM's normalized x, T(T(h * r) * weight), from residual (h,
//    the first GEMV's residual_out) and weight instead, and does not scale.
// vLLM rounds T(h * r) before the weight; the fast path rounds h * weight once and scales in fp32.
// sp_gemm takes the same two parts for layers in the pair pattern (2 to 32 tokens): its CTAs write
// one sum per token and 32 rows (stats [M, ceil(N / 32)]), and every CTA of the second part sums
// the stats before its main loop and scales in its finish (SiLU-and-mul's too).
enum class NormSplitMode { kNone, kAddStats, kFromStats };
struct NormSplit {
  NormSplitMode mode = NormSplitMode::kNone;
  const void* residual = nullptr;  // [M, N] (kAddStats) or [M, K] (kFromStats, h) of x's dtype
  const void* weight = nullptr;    // [N] or [K] of x's dtype, or fp32 with weight_fp32, or null
  bool weight_fp32 = false;
  void* residual_out = nullptr;    // kAddStats: [M, N] of x's dtype
  void* g = nullptr;               // kAddStats: [M, N] of x's dtype
  float* stats = nullptr;          // kAddStats: [M, num_pieces], written; kFromStats: [M, stats_pieces]
  int stats_pieces = 0;            // kFromStats: the GEMV before's num_pieces; sp_gemm's kAddStats: ceil(N / 32)
  float eps = 0.f;                 // kFromStats
};

// y[M, N] = x[M, K] @ W.T for a layer in the sliced layout: one CTA per piece, one row per lane,
// warps_for[m - 1] warps (4, 8 or 16) per CTA for launches of m tokens. The pieces of a slice cut into
// several meet in parts (int32, kSlicedPartWords per piece, every word -1 when unused): each piece but
// the last writes its sums into its own slots, and the last piece reads them, adds them in piece order
// and writes -1 back, so parts is all -1 again after every call. Piece p's slots start at p *
// kSlicedPartWords, and num_part_slots (the pieces that parts has room for) must cover every piece of a
// cut slice: the layout puts them first. One layer's parts serve one launch at a time: a launch of the
// same layer on another stream at once could read the other launch's sums (wrong outputs) or leave a
// last piece waiting forever. Any M: one launch per kMaxSlicedTokens tokens. With split (see
// NormSplit), x is g for kFromStats, and y is not written for kAddStats.
cudaError_t sliced_gemv(Dtype dtype, const void* x, const int32_t* sell_rows, const int32_t* pieces, int num_pieces,
                        const int32_t* codes, const int32_t* meta, int32_t* parts, int num_part_slots, void* y,
                        int M, int N, int K, const int* warps_for, cudaStream_t stream,
                        const NormSplit& split = NormSplit{});

// Batched decode on tensor cores: tokens per launch (tc_gemm launches once per slice of this
// many), rows of W per CTA, input channels per pipeline stage, threads per CTA.
constexpr int kMaxTcTokens = 64;
constexpr int kTcRows = 64;
constexpr int kTcChunk = 256;
constexpr int kTcThreads = 256;
// Tokens per launch from which bf16 x is converted once per launch (one small kernel) rather than
// chunk by chunk in every CTA, which repeats the conversion once per row tile. On the H200 converting
// once made one decoder layer 18-19% faster at 64 tokens and 3-9% at 32 on Llama-2-7B, Llama-3-8B
// and Qwen2.5-7B shapes, 3% and 6% at 16 tokens on the Llama shapes (2% slower on Qwen2.5-7B), and
// at 8 tokens 2% faster on the Llama shapes but 5% slower on Qwen2.5-7B, where the extra launch
// costs more than it saves (benchmarks/results/gpu/kernels_h200_bf16_scale_x_once_experiment_*.json).
// The 9-to-16-token instance converts 16 token rows whatever M is, so 16 tokens stand for it.
constexpr int kTcScaleXOnceTokens = 9;

// The number of K splits tc_gemm uses by default for N rows and num_chunks chunks per row tile on
// a GPU with num_sms SMs: about two CTAs per SM, at least four chunks per split.
int tc_splits(int N, int num_chunks, int num_sms);
// The same for sp_gemm: splits of at least 7 chunks, and CTAs either at most one per SM or two on
// at least 80% of the SMs.
int sp_splits(int N, int num_chunks, int num_sms);

// y[M, N] = x[M, K] @ W.T on tensor cores (mma.sync), for batches too large for the GEMV. The
// grid is (ceil(N / kTcRows), splits): each CTA copies its rows' kept groups for its part of K
// into shared memory and dequantizes them from there straight into the tensor cores' operands.
// With splits > 1, `workspace` holds splits * min(M, kMaxTcTokens) * N floats and `counters`
// ceil(N / kTcRows) int32 zeros (the kernel leaves them zero again). x must be 16-byte aligned.
// Any M: one launch per kMaxTcTokens. Without xcols, chunk c of a row tile is input channels
// c * kTcChunk .. + kTcChunk - 1 and num_chunks = ceil(K / kTcChunk); with xcols (compact tiles,
// whose rows all keep the same group columns), slot j of chunk c of tile t is group column
// xcols[(t * num_chunks + c) * kTcChunk / group_size + j] (-1: none), so only kept columns are
// multiplied. chunks and xcols are in the kernel format of vllm_gqsa/kernels/cuda_format.py.
// bf16 x is multiplied as fp16 scaled by 2^-8. From kTcScaleXOnceTokens tokens per launch, a small
// kernel converts each launch's x once into x_scratch (min(M, kMaxTcTokens) * K fp16, which the
// caller provides when tc_converts_x_once(dtype, min(M, kMaxTcTokens)) is true); below it, and
// whenever x_scratch is null, every CTA converts the chunks of x it copies.
// In the sliced layout, sell_rows (num_places of them) orders the tiles' rows and the workspace
// holds splits * min(M, kMaxTcTokens) * num_places floats; otherwise sell_rows is null.
cudaError_t tc_gemm(Dtype dtype, const void* x, const int32_t* row_ptr, const int32_t* sell_rows, int num_places,
                    const int32_t* codes, const int32_t* meta, const int32_t* chunks, const int32_t* xcols,
                    int num_chunks, void* y, float* workspace, int32_t* counters, void* x_scratch, int M, int N, int K,
                    int group_size, int splits, cudaStream_t stream);

// Whether tc_gemm converts x once per launch of M tokens (and so needs x_scratch).
bool tc_converts_x_once(Dtype dtype, int M);

// y[M, N] = x[M, K] @ W.T on sparse tensor cores (mma.sp) for a layer in the pair pattern: G = 16,
// K % 32 == 0, and every row keeps exactly one group of each aligned pair of group columns
// (2j, 2j + 1), so that row n's groups are n * K / 32 .. (n + 1) * K / 32 - 1, the j-th in pair j
// (vllm_gqsa/kernels/cuda_format.py checks this at load time; the kernel trusts it and reads no
// row pointers). Grid, splits, workspace, counters and x_scratch as for tc_gemm (num_chunks =
// ceil(K / kTcChunk)); num_sms, the GPU's SMs (from the caller's cached device properties), picks
// the copies' kind per launch. silu_mul: W is a gate/up layer (N even, gate's N / 2 rows then up's)
// and y [M, N / 2] receives vLLM's SiLU-and-mul of its output, T(T(silu(gate)) * up), instead of the
// output itself; the workspace stays [splits, M, N] fp32. norm: a part of a split norm (NormSplit),
// for K % kTcChunk == 0 and at most kMaxSpNormTokens tokens; y is not written for kAddStats, which
// takes no silu_mul.
constexpr int kMaxSpNormTokens = 32;
cudaError_t sp_gemm(Dtype dtype, const void* x, const int32_t* codes, const int32_t* meta, void* y,
                    float* workspace, int32_t* counters, void* x_scratch, int M, int N, int K, int splits,
                    int num_sms, cudaStream_t stream, bool silu_mul = false, const NormSplit& norm = NormSplit{});

// Whether sp_wgmma_gemm serves input size K on the current GPU: an sm_90 GPU (the kernel is
// built for sm_90a) and K % 128 == 0 (whole stages; TMA's row strides of codes and meta).
bool sp_wgmma_supported(int K);

// The most K splits sp_wgmma_gemm takes for input size K: 8 (one portable cluster), and one per
// pair of 128-channel stages at least.
int sp_wgmma_max_splits(int K);

// The rows of x_scratch that sp_wgmma_gemm needs for M tokens: M rounded up to its token tile (64
// up to 64 tokens, else 128), the rows past M zeros, so that no TMA box reaches past the tensor.
int sp_wgmma_scratch_tokens(int M);

// y[M, N] = x[M, K] @ W.T for a layer in the pair pattern (as sp_gemm; row_ptr is not read: row n's
// groups start at n * K / 32) on Hopper's sparse tensor cores (wgmma.mma_async.sp), for batches
// from tens of tokens: x_scratch [sp_wgmma_scratch_tokens(M), K] 2-byte elements receives x with each pair's channels in
// the kernel's order of k (bf16 as scaled fp16) before the multiply. x, codes, meta and x_scratch
// must be 16-byte aligned. splits: how many CTAs (one cluster) share each tile's K, 1..
// sp_wgmma_max_splits(K), or 0 to choose from the grid and num_sms (the GPU's SMs, from the
// caller's cached device properties), which also choose the tile.
// cudaErrorNotSupported where sp_wgmma_supported(K) is false.
cudaError_t sp_wgmma_gemm(Dtype dtype, const void* x, const int32_t* codes, const int32_t* meta, void* y,
                          void* x_scratch, int M, int N, int K, int splits, int num_sms, cudaStream_t stream);

// w[N, K] = the dense weight in `dtype` (zeros where a group was pruned). w must be 16-byte aligned.
// sell_rows: the sliced layout's (num_places of them), or null for the row layout.
cudaError_t dequantize(Dtype dtype, const int32_t* row_ptr, const int32_t* sell_rows, int num_places,
                       const int32_t* codes, const int32_t* meta, void* w, int N, int K, int group_size,
                       cudaStream_t stream);

}  // namespace gqsa
