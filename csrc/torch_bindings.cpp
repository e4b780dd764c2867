// SPDX-License-Identifier: Apache-2.0
//
// Torch ops of the GQSA CUDA kernels, in the `vllm_gqsa` library namespace:
//
//   gqsa_gemv(Tensor x, Tensor row_ptr, Tensor codes, Tensor meta, Tensor schedule, int n_out,
//             int x_staging=-1) -> Tensor
//     y = x @ W.T for x [M, K] fp16/bf16; returns y [M, n_out] in x's dtype. One kernel launch
//     per 8 tokens, each reading the weights once: meant for decode-sized M.
//     x_staging: -1 chooses, 0 reads x from global memory, 1 from shared memory (gqsa::XStaging).
//   gqsa_sliced_gemv(Tensor x, Tensor sell_rows, Tensor pieces, Tensor codes, Tensor meta,
//                    Tensor parts, int n_out, int[] warps=[]) -> Tensor
//     y = x @ W.T for a layer in the sliced layout (G = 16), one row per lane: meant for 1 to 3
//     tokens (one launch per 3). pieces is the layout's `schedule`, parts its `slice_parts`
//     (left all -1, as found, like gqsa_tc's counters are left zero). warps: warps per CTA for
//     launches of 1, 2, 3 tokens (4, 8 or 16 each; empty: 8).
//   gqsa_tc(Tensor x, Tensor row_ptr, Tensor codes, Tensor meta, Tensor chunks, int n_out,
//           int splits=0, Tensor? xcols=None, Tensor? counters=None, Tensor? sell_rows=None) -> Tensor
//     y = x @ W.T on tensor cores, for batches too large for the GEMV (one launch per 64 tokens).
//     splits: how many CTAs share each row tile's input (0 chooses from the shapes and SM count).
//     xcols: the compact tiles' group columns, for a chunk table made with them (see the format).
//     counters: the layer's split counters (the format's `counters`, all zeros); without them the
//     op zeroes fresh ones on every call, one more kernel (a memset) per call.
//     sell_rows: the sliced layout's, for a layer in it.
//   gqsa_dequant(Tensor row_ptr, Tensor codes, Tensor meta, int n_out, int k_in, int group_size,
//                ScalarType dtype, Tensor? sell_rows=None) -> Tensor
//     the dense W [n_out, k_in] in dtype (fp16/bf16), zeros where a group was pruned.
//
// (row_ptr, codes, meta, schedule, chunks, xcols, counters, sell_rows, parts, ...) are in the kernel format of vllm_gqsa/kernels/cuda_format.py.
// Every tensor argument is checked for device, dtype, contiguity and shape, and a bad one raises
// a RuntimeError that names it. Their contents are trusted: they are validated when the layer is
// repacked. The ops allocate their output through torch, launch on the current stream, size the
// grid from shapes alone and never synchronize, so they are CUDA-graph safe. The fake (meta)
// implementations are registered in Python (vllm_gqsa/kernels/cuda.py).

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>

#include "gqsa_kernels.h"

namespace {

constexpr int64_t kVectorBytes = 16;  // the kernels read x and write W with 16-byte accesses

// Numbers and shapes in error messages are formatted with std::to_string: streaming integers
// through an ostream inside this extension crashed the JIT build on the GPU machine (a libstdc++
// locale mismatch, seen as a segfault in ostream::_M_insert<long>).
std::string num(int64_t v) { return std::to_string(v); }

std::string shape_of(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + num(sizes[i]);
  return s + "]";
}

std::string shape(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + num(t.size(i));
  return s + "]";
}

gqsa::Dtype kernel_dtype(at::ScalarType t, const char* what) {
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16, "gqsa: ", what,
              " must be float16 or bfloat16, got ", c10::toString(t));
  return t == at::kHalf ? gqsa::Dtype::kFloat16 : gqsa::Dtype::kBFloat16;
}

void check_int32(const at::Tensor& t, const char* name, int64_t dim, const at::Device& device) {
  TORCH_CHECK(t.device() == device, "gqsa: ", name, " is on ", t.device().str(), ", expected ", device.str());
  TORCH_CHECK(t.scalar_type() == at::kInt, "gqsa: ", name, " must be int32, got ", c10::toString(t.scalar_type()));
  TORCH_CHECK(t.dim() == dim, "gqsa: ", name, " must have ", num(dim), " dimension(s), got shape ", shape(t));
  TORCH_CHECK(t.is_contiguous(), "gqsa: ", name, " must be contiguous");
}

// Checks the kernel-format tensors of a layer with n_out rows; returns the group size.
int64_t check_layer(const at::Tensor& row_ptr, const at::Tensor& codes, const at::Tensor& meta,
                    int64_t n_out, const at::Device& device) {
  TORCH_CHECK(device.is_cuda(), "gqsa: tensors must be on a CUDA device, got ", device.str());
  TORCH_CHECK(n_out >= 0 && n_out < INT32_MAX, "gqsa: n_out=", num(n_out), " is out of range");
  check_int32(row_ptr, "row_ptr", 1, device);
  check_int32(codes, "codes", 2, device);
  check_int32(meta, "meta", 1, device);
  TORCH_CHECK(row_ptr.numel() == n_out + 1, "gqsa: row_ptr has ", num(row_ptr.numel()),
              " entries, expected n_out + 1 = ", num(n_out + 1));
  const int64_t group_size = codes.size(1) * 8;
  TORCH_CHECK(group_size == 16 || group_size == 32 || group_size == 64 || group_size == 128,
              "gqsa: codes must have G/8 columns for G in {16, 32, 64, 128}, got shape ", shape(codes));
  TORCH_CHECK(meta.numel() == codes.size(0), "gqsa: meta has ", num(meta.numel()),
              " entries but codes has ", num(codes.size(0)), " kept groups");
  TORCH_CHECK(codes.size(0) < INT32_MAX, "gqsa: too many kept groups (", num(codes.size(0)), ")");
  // The kernels read codes 16 bytes and meta 8 bytes at a time (a view that starts inside a
  // tensor's storage may not be aligned so).
  TORCH_CHECK(reinterpret_cast<uintptr_t>(codes.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(meta.data_ptr()) % 8 == 0,
              "gqsa: codes must be 16-byte and meta 8-byte aligned");
  return group_size;
}

void check_input_size(int64_t k_in, int64_t group_size) {
  TORCH_CHECK(k_in >= 0 && k_in % group_size == 0, "gqsa: input size ", num(k_in),
              " is not a multiple of group_size ", num(group_size));
  TORCH_CHECK(k_in / group_size <= gqsa::kMaxGroupCols, "gqsa: input size ", num(k_in), " has more than ",
              num(gqsa::kMaxGroupCols), " group columns");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "gqsa: ", op, " launch failed: ", cudaGetErrorString(err));
}

at::Tensor gqsa_gemv(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& codes,
                     const at::Tensor& meta, const at::Tensor& schedule, int64_t n_out,
                     int64_t x_staging) {
  const gqsa::Dtype dtype = kernel_dtype(x.scalar_type(), "x");
  TORCH_CHECK(x.dim() == 2, "gqsa_gemv: x must be 2-D [M, K], got shape ", shape(x));
  TORCH_CHECK(x.is_contiguous(), "gqsa_gemv: x must be contiguous");
  const int64_t group_size = check_layer(row_ptr, codes, meta, n_out, x.device());
  check_int32(schedule, "schedule", 2, x.device());
  TORCH_CHECK(schedule.size(1) == 2 && schedule.size(0) > gqsa::kGemvWarps &&
                  (schedule.size(0) - 1) % gqsa::kGemvWarps == 0,
              "gqsa_gemv: schedule must have shape [num_ctas * ", num(gqsa::kGemvWarps),
              " + 1, 2] with num_ctas >= 1, got ", shape(schedule));
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M < INT32_MAX / 2, "gqsa_gemv: M=", num(M), " is out of range");
  check_input_size(K, group_size);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % kVectorBytes == 0,
              "gqsa_gemv: x must be 16-byte aligned");
  TORCH_CHECK(x_staging >= -1 && x_staging <= 1, "gqsa_gemv: x_staging must be -1, 0 or 1, got ",
              num(x_staging));

  at::Tensor y = at::empty({M, n_out}, x.options());
  if (M == 0 || n_out == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  if (x_staging == 1) {
    int max_shared_x = 0;
    check_launch(gqsa::max_shared_x_bytes(&max_shared_x), "gqsa_gemv (shared memory query)");
    const int64_t launch_tokens = M < gqsa::kMaxGemvTokens ? M : gqsa::kMaxGemvTokens;
    TORCH_CHECK(gqsa::shared_x_bytes(static_cast<int>(launch_tokens), static_cast<int>(K)) <=
                    static_cast<size_t>(max_shared_x),
                "gqsa_gemv: x_staging=1 but ", num(launch_tokens), " tokens of x [", num(M), ", ", num(K),
                "] do not fit in the ", num(max_shared_x), " bytes of shared memory this GPU gives them");
  }
  check_launch(gqsa::gemv(dtype, x.data_ptr(), row_ptr.data_ptr<int32_t>(), codes.data_ptr<int32_t>(),
                          meta.data_ptr<int32_t>(), schedule.data_ptr<int32_t>(),
                          static_cast<int>((schedule.size(0) - 1) / gqsa::kGemvWarps), y.data_ptr(), static_cast<int>(M),
                          static_cast<int>(n_out), static_cast<int>(K), static_cast<int>(group_size),
                          static_cast<int>(codes.size(0)), at::cuda::getCurrentCUDAStream(),
                          static_cast<gqsa::XStaging>(x_staging)),
               "gqsa_gemv");
  return y;
}

// The sliced layout's places: int32 [num_places, 2], num_places a multiple of 32 and >= n_out.
int64_t check_sell_rows(const at::Tensor& sell_rows, int64_t n_out, const at::Device& device) {
  check_int32(sell_rows, "sell_rows", 2, device);
  const int64_t places = sell_rows.size(0);
  TORCH_CHECK(sell_rows.size(1) == 2 && places % gqsa::kSliceRows == 0 && places >= n_out &&
                  places < n_out + gqsa::kSliceRows,
              "gqsa: sell_rows must have shape [n_out rounded up to a multiple of ", num(gqsa::kSliceRows),
              ", 2] for n_out=", num(n_out), ", got ", shape(sell_rows));
  return places;
}

// gqsa_sliced_gemv, with a part of a split norm (gqsa::NormSplit) or none; y is undefined for
// kAddStats.
at::Tensor sliced_gemv_call(const at::Tensor& x, const at::Tensor& sell_rows, const at::Tensor& pieces,
                            const at::Tensor& codes, const at::Tensor& meta, const at::Tensor& parts,
                            int64_t n_out, c10::IntArrayRef warps, gqsa::NormSplit split) {
  const gqsa::Dtype dtype = kernel_dtype(x.scalar_type(), "x");
  TORCH_CHECK(x.dim() == 2, "gqsa_sliced_gemv: x must be 2-D [M, K], got shape ", shape(x));
  TORCH_CHECK(x.is_contiguous(), "gqsa_sliced_gemv: x must be contiguous");
  TORCH_CHECK(x.device().is_cuda(), "gqsa: tensors must be on a CUDA device, got ", x.device().str());
  TORCH_CHECK(n_out >= 0 && n_out < INT32_MAX, "gqsa: n_out=", num(n_out), " is out of range");
  const int64_t places = check_sell_rows(sell_rows, n_out, x.device());
  check_int32(codes, "codes", 2, x.device());
  check_int32(meta, "meta", 1, x.device());
  TORCH_CHECK(codes.size(1) == 2, "gqsa_sliced_gemv: the sliced layout holds G = 16 codes [slots, 2], got ",
              shape(codes));
  TORCH_CHECK(meta.numel() == codes.size(0) && meta.numel() % gqsa::kSlotsPerStep == 0 && meta.numel() < INT32_MAX,
              "gqsa_sliced_gemv: codes ", shape(codes), " and meta ", shape(meta), " must hold the same whole steps of ",
              num(gqsa::kSlotsPerStep), " slots");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(codes.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(meta.data_ptr()) % 16 == 0,
              "gqsa_sliced_gemv: codes and meta must be 16-byte aligned");
  check_int32(pieces, "pieces", 2, x.device());
  TORCH_CHECK(pieces.size(1) == 4 && (pieces.size(0) >= places / gqsa::kSliceRows) &&
                  reinterpret_cast<uintptr_t>(pieces.data_ptr()) % 16 == 0,
              "gqsa_sliced_gemv: pieces must have shape [>= ", num(places / gqsa::kSliceRows),
              " (a piece per slice at least), 4], 16-byte aligned, got ", shape(pieces));
  constexpr int64_t kPartWords = gqsa::kSlicedPartWords;  // one piece's slots
  TORCH_CHECK(parts.device() == x.device() && parts.scalar_type() == at::kInt && parts.dim() == 1 &&
                  parts.is_contiguous() && parts.numel() % kPartWords == 0 && parts.numel() / kPartWords <= pieces.size(0),
              "gqsa_sliced_gemv: parts must be int32 [a multiple of ", num(kPartWords), ", at most ",
              num(kPartWords), " per piece] on ", x.device().str(), ", got ", shape(parts), " on ", parts.device().str());
  TORCH_CHECK(warps.empty() || warps.size() == gqsa::kMaxSlicedTokens,
              "gqsa_sliced_gemv: warps must be empty or give ", num(gqsa::kMaxSlicedTokens), " counts");
  int warps_for[gqsa::kMaxSlicedTokens];
  for (int i = 0; i < gqsa::kMaxSlicedTokens; ++i) {
    warps_for[i] = warps.empty() ? 8 : static_cast<int>(warps[i]);
    TORCH_CHECK(warps_for[i] == 4 || warps_for[i] == 8 || warps_for[i] == 16,
                "gqsa_sliced_gemv: warps per CTA must be 4, 8 or 16, got ", num(warps_for[i]));
  }
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M < INT32_MAX / 2, "gqsa_sliced_gemv: M=", num(M), " is out of range");
  check_input_size(K, 16);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % kVectorBytes == 0, "gqsa_sliced_gemv: x must be 16-byte aligned");

  const bool add_stats = split.mode == gqsa::NormSplitMode::kAddStats;
  at::Tensor y = add_stats ? at::Tensor() : at::empty({M, n_out}, x.options());
  if (M == 0 || n_out == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(gqsa::sliced_gemv(dtype, x.data_ptr(), sell_rows.data_ptr<int32_t>(), pieces.data_ptr<int32_t>(),
                                 static_cast<int>(pieces.size(0)), codes.data_ptr<int32_t>(), meta.data_ptr<int32_t>(),
                                 parts.data_ptr<int32_t>(), static_cast<int>(parts.numel() / kPartWords),
                                 add_stats ? nullptr : y.data_ptr(), static_cast<int>(M), static_cast<int>(n_out),
                                 static_cast<int>(K), warps_for, at::cuda::getCurrentCUDAStream(), split),
               "gqsa_sliced_gemv");
  return y;
}

at::Tensor gqsa_sliced_gemv(const at::Tensor& x, const at::Tensor& sell_rows, const at::Tensor& pieces,
                            const at::Tensor& codes, const at::Tensor& meta, const at::Tensor& parts,
                            int64_t n_out, c10::IntArrayRef warps) {
  return sliced_gemv_call(x, sell_rows, pieces, codes, meta, parts, n_out, warps, gqsa::NormSplit{});
}

// A contiguous, 16-byte aligned tensor of the given shape, dtype and device, or an error naming it.
void check_dense(const char* op, const char* name, const at::Tensor& t, c10::IntArrayRef sizes, at::ScalarType dtype,
                 const at::Device& device) {
  TORCH_CHECK(t.sizes() == sizes && t.scalar_type() == dtype && t.device() == device && t.is_contiguous() &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % kVectorBytes == 0,
              op, ": ", name, " must be a contiguous, 16-byte aligned ", shape_of(sizes), " ", c10::toString(dtype),
              " tensor on ", device.str(), ", got ", shape(t), " ", c10::toString(t.scalar_type()), " on ",
              t.device().str());
}

// The split norm's weight, [n] of x's dtype or fp32, or none, checked and set in split.
void set_norm_weight(const char* op, gqsa::NormSplit& split, const std::optional<at::Tensor>& weight, int64_t n,
                     const at::Tensor& x) {
  if (!weight.has_value()) return;
  const at::ScalarType wt = weight->scalar_type() == at::kFloat ? at::kFloat : x.scalar_type();
  check_dense(op, "weight", *weight, {n}, wt, x.device());
  split.weight = weight->data_ptr();
  split.weight_fp32 = wt == at::kFloat;
}

// The first part of a split norm for x [M, K] and a layer of n_out rows: the residual [M, n_out]
// and weight checked, and the new residual, g and stats [M, columns] allocated and set in split.
struct AddStats {
  gqsa::NormSplit split;
  at::Tensor residual_out, g, stats;
};

AddStats add_stats_split(const char* op, const at::Tensor& x, const at::Tensor& residual,
                         const std::optional<at::Tensor>& weight, int64_t n_out, int64_t columns) {
  kernel_dtype(x.scalar_type(), "x");  // an error unless fp16 or bf16
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", shape(x));
  const int64_t M = x.size(0);
  check_dense(op, "residual", residual, {M, n_out}, x.scalar_type(), x.device());
  AddStats a;
  a.split.mode = gqsa::NormSplitMode::kAddStats;
  a.split.residual = residual.data_ptr();
  set_norm_weight(op, a.split, weight, n_out, x);
  a.residual_out = at::empty_like(residual);
  a.g = at::empty({M, n_out}, x.options());
  a.stats = at::empty({M, columns}, x.options().dtype(at::kFloat));
  a.split.residual_out = a.residual_out.data_ptr();
  a.split.g = a.g.data_ptr();
  a.split.stats = a.stats.data_ptr<float>();
  a.split.stats_pieces = static_cast<int>(columns);
  return a;
}

// The second part of a split norm for g [M, K]: stats [M, columns of the layer before], the
// residual h [M, K] and weight checked and set in split, with eps.
gqsa::NormSplit from_stats_split(const char* op, const at::Tensor& g, const at::Tensor& stats, double eps,
                                 const at::Tensor& residual, const std::optional<at::Tensor>& weight) {
  kernel_dtype(g.scalar_type(), "g");  // an error unless fp16 or bf16
  TORCH_CHECK(g.dim() == 2, op, ": g must be 2-D [M, K], got shape ", shape(g));
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == g.size(0) && stats.size(1) > 0 && stats.size(1) < INT32_MAX, op,
              ": stats must be [M, columns of the layer before] with M = ", num(g.size(0)), ", got ", shape(stats));
  check_dense(op, "stats", stats, stats.sizes(), at::kFloat, g.device());
  check_dense(op, "residual", residual, g.sizes(), g.scalar_type(), g.device());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  gqsa::NormSplit split;
  split.mode = gqsa::NormSplitMode::kFromStats;
  split.residual = residual.data_ptr();
  set_norm_weight(op, split, weight, g.size(1), g);
  split.stats = stats.data_ptr<float>();
  split.stats_pieces = static_cast<int>(stats.size(1));
  split.eps = static_cast<float>(eps);
  return split;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gqsa_sliced_gemv_add_stats(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const at::Tensor& sell_rows, const at::Tensor& pieces, const at::Tensor& codes, const at::Tensor& meta,
    const at::Tensor& parts, int64_t n_out, c10::IntArrayRef warps) {
  // Every slot of stats is written: a sum by the piece that finishes a slice, 0 by the others.
  AddStats a = add_stats_split("gqsa_sliced_gemv_add_stats", x, residual, weight, n_out,
                               pieces.dim() == 2 ? pieces.size(0) : 0);
  if (n_out == 0) a.stats.zero_();  // no GEMV runs: h is empty, and so are its sums
  sliced_gemv_call(x, sell_rows, pieces, codes, meta, parts, n_out, warps, a.split);
  return {a.residual_out, a.g, a.stats};
}

at::Tensor gqsa_sliced_gemv_from_stats(const at::Tensor& g, const at::Tensor& stats, double eps,
                                       const at::Tensor& residual, const std::optional<at::Tensor>& weight,
                                       const at::Tensor& sell_rows, const at::Tensor& pieces, const at::Tensor& codes,
                                       const at::Tensor& meta, const at::Tensor& parts, int64_t n_out,
                                       c10::IntArrayRef warps) {
  return sliced_gemv_call(g, sell_rows, pieces, codes, meta, parts, n_out, warps,
                          from_stats_split("gqsa_sliced_gemv_from_stats", g, stats, eps, residual, weight));
}

// The tensor-core ops' optional layer counters and split count, checked against the layer.
void check_splits(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& counters, int64_t n_out,
                  int64_t num_chunks, int64_t splits) {
  const int64_t tiles = (n_out + gqsa::kTcRows - 1) / gqsa::kTcRows;
  if (counters.has_value()) {
    check_int32(*counters, "counters", 1, x.device());
    TORCH_CHECK(counters->numel() == tiles, op, ": counters must have ", num(tiles),
                " entries (one per 64-row tile) for n_out=", num(n_out), ", got ", shape(*counters));
  }
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % kVectorBytes == 0, op, ": x must be 16-byte aligned");
  TORCH_CHECK(splits >= 0 && splits <= (num_chunks > 0 ? num_chunks : 1), op, ": splits must be 0 (choose) or 1..",
              num(num_chunks), " (the input's chunks of ", num(gqsa::kTcChunk), " channels), got ", num(splits));
}

// What one call of a tensor-core op needs besides its inputs: the K splits (splits, or 0 for
// choose_splits' choice: gqsa::tc_splits or gqsa::sp_splits), their fp32 workspace and tile
// counters, and the scratch of x converted once.
// With splits, the last CTA of a row tile to finish is found by counting in counters[tile], which
// it sets back to 0: the layer's counters (zeros at load time, like Marlin's workspace) stay zeros
// from call to call. Zeroing fresh ones is one more kernel per call, which a CUDA graph replays
// too (3 of a Llama-3-8B layer's 4 linear layers split on an H200). The schema does not mark
// counters as written, since every call leaves them as it found them.
struct TcBuffers {
  int splits;
  at::Tensor workspace, counters, x_scratch;

  // n_out: the rows of the grid (the sliced layout's places).
  TcBuffers(const at::Tensor& x, gqsa::Dtype dtype, const std::optional<at::Tensor>& layer_counters, int64_t n_out,
            int64_t num_chunks, int64_t requested_splits, int (*choose_splits)(int, int, int)) {
    const int64_t M = x.size(0), K = x.size(1);
    const int64_t launch_tokens = M < gqsa::kMaxTcTokens ? M : gqsa::kMaxTcTokens;
    splits = requested_splits > 0 ? static_cast<int>(requested_splits)
                                  : choose_splits(static_cast<int>(n_out), static_cast<int>(num_chunks),
                                                    at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
    if (splits > 1) {
      const int64_t tiles = (n_out + gqsa::kTcRows - 1) / gqsa::kTcRows;
      workspace = at::empty({splits, launch_tokens, n_out}, x.options().dtype(at::kFloat));
      counters = layer_counters.has_value() ? *layer_counters : at::zeros({tiles}, x.options().dtype(at::kInt));
    }
    if (gqsa::tc_converts_x_once(dtype, static_cast<int>(launch_tokens))) {
      x_scratch = at::empty({launch_tokens, K}, x.options().dtype(at::kHalf));
    }
  }
  float* workspace_ptr() const { return splits > 1 ? workspace.data_ptr<float>() : nullptr; }
  int32_t* counters_ptr() const { return splits > 1 ? counters.data_ptr<int32_t>() : nullptr; }
  void* x_scratch_ptr() const { return x_scratch.defined() ? x_scratch.data_ptr() : nullptr; }
};

at::Tensor gqsa_tc(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& codes,
                   const at::Tensor& meta, const at::Tensor& chunks, int64_t n_out, int64_t splits,
                   const std::optional<at::Tensor>& xcols, const std::optional<at::Tensor>& counters,
                   const std::optional<at::Tensor>& sell_rows) {
  const gqsa::Dtype dtype = kernel_dtype(x.scalar_type(), "x");
  TORCH_CHECK(x.dim() == 2, "gqsa_tc: x must be 2-D [M, K], got shape ", shape(x));
  TORCH_CHECK(x.is_contiguous(), "gqsa_tc: x must be contiguous");
  const int64_t group_size = check_layer(row_ptr, codes, meta, n_out, x.device());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M < INT32_MAX / 2, "gqsa_tc: M=", num(M), " is out of range");
  check_input_size(K, group_size);
  const int64_t max_chunks = (K + gqsa::kTcChunk - 1) / gqsa::kTcChunk;
  check_int32(chunks, "chunks", 2, x.device());
  const int64_t num_chunks = chunks.size(1);
  const int64_t tiles = (n_out + gqsa::kTcRows - 1) / gqsa::kTcRows;
  if (xcols.has_value()) {
    // Compact tiles: at most as many chunks as channel chunks, and a column per slot.
    TORCH_CHECK(chunks.size(0) == n_out && num_chunks <= max_chunks, "gqsa_tc: chunks must have shape [",
                num(n_out), ", <= ", num(max_chunks), "] for n_out=", num(n_out), " and K=", num(K), ", got ",
                shape(chunks));
    check_int32(*xcols, "xcols", 3, x.device());
    TORCH_CHECK(xcols->size(0) == tiles && xcols->size(1) == num_chunks && xcols->size(2) == gqsa::kTcChunk / group_size,
                "gqsa_tc: xcols must have shape [", num(tiles), ", ", num(num_chunks), ", ",
                num(gqsa::kTcChunk / group_size), "] for these chunks, got ", shape(*xcols));
  } else {
    TORCH_CHECK(chunks.size(0) == n_out && num_chunks == max_chunks, "gqsa_tc: chunks must have shape [",
                num(n_out), ", ", num(max_chunks), "] for n_out=", num(n_out), " and K=", num(K), ", got ",
                shape(chunks));
  }
  check_splits("gqsa_tc", x, counters, n_out, num_chunks, splits);
  int64_t places = n_out;
  if (sell_rows.has_value()) {
    TORCH_CHECK(!xcols.has_value(), "gqsa_tc: a layer has compact tiles or the sliced layout, not both");
    TORCH_CHECK(group_size == 16, "gqsa_tc: the sliced layout holds G = 16 codes, got codes of shape ", shape(codes));
    places = check_sell_rows(*sell_rows, n_out, x.device());
  }

  at::Tensor y = at::empty({M, n_out}, x.options());
  if (M == 0 || n_out == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  if (num_chunks == 0) return y.zero_();  // no input channels, or compact tiles that keep nothing
  const TcBuffers b(x, dtype, counters, places, num_chunks, splits, gqsa::tc_splits);
  check_launch(gqsa::tc_gemm(dtype, x.data_ptr(), row_ptr.data_ptr<int32_t>(),
                             sell_rows.has_value() ? sell_rows->data_ptr<int32_t>() : nullptr, static_cast<int>(places),
                             codes.data_ptr<int32_t>(), meta.data_ptr<int32_t>(), chunks.data_ptr<int32_t>(),
                             xcols.has_value() ? xcols->data_ptr<int32_t>() : nullptr, static_cast<int>(num_chunks), y.data_ptr(),
                             b.workspace_ptr(), b.counters_ptr(), b.x_scratch_ptr(), static_cast<int>(M),
                             static_cast<int>(n_out), static_cast<int>(K), static_cast<int>(group_size), b.splits,
                             at::cuda::getCurrentCUDAStream()),
               "gqsa_tc");
  return y;
}

// gqsa_sp, with a part of a split norm (gqsa::NormSplit) or none; y is undefined for kAddStats.
at::Tensor sp_call(const char* op, const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& codes,
                   const at::Tensor& meta, int64_t n_out, int64_t splits, const std::optional<at::Tensor>& counters,
                   bool silu_mul, const gqsa::NormSplit& split) {
  const gqsa::Dtype dtype = kernel_dtype(x.scalar_type(), "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", shape(x));
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  const int64_t group_size = check_layer(row_ptr, codes, meta, n_out, x.device());
  TORCH_CHECK(group_size == 16, op, ": the pair pattern's kernel takes G = 16, got codes of shape ", shape(codes));
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M < INT32_MAX / 2, op, ": M=", num(M), " is out of range");
  check_input_size(K, group_size);
  TORCH_CHECK(K % 32 == 0, op, ": input size ", num(K), " is not a whole number of pairs of groups (32 channels)");
  // The kernel reads row n's groups at n * K / 32 + j for j < K / 32: the pair pattern's count.
  TORCH_CHECK(codes.size(0) == n_out * (K / 32), op, ": a layer in the pair pattern keeps K / 32 = ", num(K / 32),
              " groups per row, ", num(n_out * (K / 32)), " in all, but codes has ", num(codes.size(0)));
  const int64_t num_chunks = (K + gqsa::kTcChunk - 1) / gqsa::kTcChunk;
  check_splits(op, x, counters, n_out, num_chunks, splits);
  TORCH_CHECK(!silu_mul || n_out % 2 == 0, op, ": silu_mul takes a gate/up layer of an even number of rows, got ",
              num(n_out));
  if (split.mode != gqsa::NormSplitMode::kNone) {
    TORCH_CHECK(K > 0 && K % gqsa::kTcChunk == 0, op, ": the split norm's kernels take an input size that is a "
                "positive multiple of ", num(gqsa::kTcChunk), ", got ", num(K));
    TORCH_CHECK(M <= gqsa::kMaxSpNormTokens, op, ": the split norm's kernels take at most ",
                num(gqsa::kMaxSpNormTokens), " tokens, got ", num(M));
  }

  const bool add_stats = split.mode == gqsa::NormSplitMode::kAddStats;
  at::Tensor y = add_stats ? at::Tensor() : at::empty({M, silu_mul ? n_out / 2 : n_out}, x.options());
  if (M == 0 || n_out == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  if (num_chunks == 0) return y.zero_();
  const TcBuffers b(x, dtype, counters, n_out, num_chunks, splits, gqsa::sp_splits);
  check_launch(gqsa::sp_gemm(dtype, x.data_ptr(), codes.data_ptr<int32_t>(), meta.data_ptr<int32_t>(),
                             add_stats ? nullptr : y.data_ptr(), b.workspace_ptr(), b.counters_ptr(),
                             b.x_scratch_ptr(), static_cast<int>(M), static_cast<int>(n_out), static_cast<int>(K),
                             b.splits, at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
                             at::cuda::getCurrentCUDAStream(), silu_mul, split),
               op);
  return y;
}

at::Tensor gqsa_sp(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& codes, const at::Tensor& meta,
                   int64_t n_out, int64_t splits, const std::optional<at::Tensor>& counters, bool silu_mul) {
  return sp_call("gqsa_sp", x, row_ptr, codes, meta, n_out, splits, counters, silu_mul, gqsa::NormSplit{});
}

// The split norm's parts for layers in the pair pattern, as gqsa_sliced_gemv_add_stats and
// gqsa_sliced_gemv_from_stats are for the sliced layout: 1 to 32 tokens, K % 256 == 0, and
// stats [M, ceil(n_out / 32)], a sum of h^2 per token and 32 rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gqsa_sp_add_stats(
    const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const at::Tensor& row_ptr, const at::Tensor& codes, const at::Tensor& meta, int64_t n_out, int64_t splits,
    const std::optional<at::Tensor>& counters) {
  const char* op = "gqsa_sp_add_stats";
  TORCH_CHECK(n_out >= 0 && n_out < INT32_MAX, op, ": n_out=", num(n_out), " is out of range");
  // Every entry of stats is written: one per token and 32 rows.
  AddStats a = add_stats_split(op, x, residual, weight, n_out, (n_out + 31) / 32);
  sp_call(op, x, row_ptr, codes, meta, n_out, splits, counters, false, a.split);
  return {a.residual_out, a.g, a.stats};
}

at::Tensor gqsa_sp_from_stats(const at::Tensor& g, const at::Tensor& stats, double eps, const at::Tensor& residual,
                              const std::optional<at::Tensor>& weight, const at::Tensor& row_ptr,
                              const at::Tensor& codes, const at::Tensor& meta, int64_t n_out, int64_t splits,
                              const std::optional<at::Tensor>& counters, bool silu_mul) {
  const char* op = "gqsa_sp_from_stats";
  return sp_call(op, g, row_ptr, codes, meta, n_out, splits, counters, silu_mul,
                 from_stats_split(op, g, stats, eps, residual, weight));
}

at::Tensor gqsa_sp_wgmma(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& codes,
                         const at::Tensor& meta, int64_t n_out, int64_t splits) {
  const gqsa::Dtype dtype = kernel_dtype(x.scalar_type(), "x");
  TORCH_CHECK(x.dim() == 2, "gqsa_sp_wgmma: x must be 2-D [M, K], got shape ", shape(x));
  TORCH_CHECK(x.is_contiguous(), "gqsa_sp_wgmma: x must be contiguous");
  const int64_t group_size = check_layer(row_ptr, codes, meta, n_out, x.device());
  TORCH_CHECK(group_size == 16, "gqsa_sp_wgmma: the pair pattern's kernel takes G = 16, got codes of shape ",
              shape(codes));
  const int64_t M = x.size(0), K = x.size(1);
  check_input_size(K, group_size);
  // Its permuted copy has sp_wgmma_scratch_tokens(M) rows, at most M + 127 (cuda.sp_wgmma_runs
  // applies the same bound, so the plugin never sends a batch this refuses).
  TORCH_CHECK((M + 127) * K < (int64_t{1} << 31), "gqsa_sp_wgmma: x of ", num(M), " x ", num(K),
              " activations is too large");
  // The kernel reads row n's groups at n * K / 32 + j for j < K / 32: the pair pattern's count.
  TORCH_CHECK(K % 32 == 0 && codes.size(0) == n_out * (K / 32), "gqsa_sp_wgmma: a layer in the pair pattern keeps ",
              "K / 32 groups per row, ", num(n_out * (K / 32)), " in all, but codes has ", num(codes.size(0)));
  const c10::cuda::CUDAGuard guard(x.device());
  // ATen's cached properties: sp_wgmma_gemm checks the GPU again itself, as a last guard.
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(props->major == 9 && props->minor == 0 && K % 128 == 0, "gqsa_sp_wgmma: needs an sm_90 GPU and an ",
              "input size that is a multiple of 128, got K=", num(K), " on sm_", props->major, props->minor);
  const int max_splits = gqsa::sp_wgmma_max_splits(static_cast<int>(K));
  TORCH_CHECK(splits >= 0 && splits <= max_splits, "gqsa_sp_wgmma: splits must be 0 (choose) or 1..", max_splits,
              " (at most 8, and one pair of 128-channel stages each) for K=", num(K), ", got ", num(splits));
  // TMA reads x (its permuted copy), codes and meta from 16-byte aligned addresses.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(meta.data_ptr()) % 16 == 0,
              "gqsa_sp_wgmma: x and meta must be 16-byte aligned");

  at::Tensor y = at::empty({M, n_out}, x.options());
  if (M == 0 || n_out == 0) return y;
  at::Tensor x_scratch = at::empty({gqsa::sp_wgmma_scratch_tokens(static_cast<int>(M)), K}, x.options().dtype(at::kHalf));
  check_launch(gqsa::sp_wgmma_gemm(dtype, x.data_ptr(), codes.data_ptr<int32_t>(), meta.data_ptr<int32_t>(),
                                   y.data_ptr(), x_scratch.data_ptr(), static_cast<int>(M), static_cast<int>(n_out),
                                   static_cast<int>(K), static_cast<int>(splits), props->multiProcessorCount,
                                   at::cuda::getCurrentCUDAStream()),
               "gqsa_sp_wgmma");
  return y;
}

at::Tensor gqsa_dequant(const at::Tensor& row_ptr, const at::Tensor& codes, const at::Tensor& meta,
                        int64_t n_out, int64_t k_in, int64_t group_size, at::ScalarType dtype,
                        const std::optional<at::Tensor>& sell_rows) {
  const gqsa::Dtype kdtype = kernel_dtype(dtype, "dtype");
  const int64_t G = check_layer(row_ptr, codes, meta, n_out, row_ptr.device());
  TORCH_CHECK(G == group_size, "gqsa_dequant: group_size=", num(group_size), " but codes has shape ",
              shape(codes), " (group size ", num(G), ")");
  check_input_size(k_in, group_size);
  TORCH_CHECK(k_in < INT32_MAX, "gqsa_dequant: k_in=", num(k_in), " is out of range");
  int64_t places = n_out;
  if (sell_rows.has_value()) {
    TORCH_CHECK(G == 16, "gqsa_dequant: the sliced layout holds G = 16 codes, got codes of shape ", shape(codes));
    places = check_sell_rows(*sell_rows, n_out, row_ptr.device());
  }

  at::Tensor w = at::empty({n_out, k_in}, row_ptr.options().dtype(dtype));
  if (n_out == 0 || k_in == 0) return w;
  const c10::cuda::CUDAGuard guard(row_ptr.device());
  check_launch(gqsa::dequantize(kdtype, row_ptr.data_ptr<int32_t>(),
                                sell_rows.has_value() ? sell_rows->data_ptr<int32_t>() : nullptr,
                                static_cast<int>(places), codes.data_ptr<int32_t>(),
                                meta.data_ptr<int32_t>(), w.data_ptr(), static_cast<int>(n_out),
                                static_cast<int>(k_in), static_cast<int>(group_size),
                                at::cuda::getCurrentCUDAStream()),
               "gqsa_dequant");
  return w;
}

}  // namespace

TORCH_LIBRARY(vllm_gqsa, m) {
  // gqsa_tc's counters and the sliced ops' parts are working memory that every call leaves as it
  // found them (all zero, all -1), so the schema does not mark them as written (vLLM's marlin_gemm
  // treats its workspace the same way).
  m.def("gqsa_gemv(Tensor x, Tensor row_ptr, Tensor codes, Tensor meta, Tensor schedule, int n_out, "
        "int x_staging=-1) -> Tensor");
  m.def("gqsa_sliced_gemv(Tensor x, Tensor sell_rows, Tensor pieces, Tensor codes, Tensor meta, "
        "Tensor parts, int n_out, int[] warps=[]) -> Tensor");
  m.def("gqsa_sliced_gemv_add_stats(Tensor x, Tensor residual, Tensor? weight, Tensor sell_rows, Tensor pieces, "
        "Tensor codes, Tensor meta, Tensor parts, int n_out, int[] warps=[]) -> (Tensor, Tensor, Tensor)");
  m.def("gqsa_sliced_gemv_from_stats(Tensor g, Tensor stats, float eps, Tensor residual, Tensor? weight, "
        "Tensor sell_rows, Tensor pieces, Tensor codes, Tensor meta, Tensor parts, int n_out, int[] warps=[]) "
        "-> Tensor");
  m.def("gqsa_tc(Tensor x, Tensor row_ptr, Tensor codes, Tensor meta, Tensor chunks, int n_out, "
        "int splits=0, Tensor? xcols=None, Tensor? counters=None, Tensor? sell_rows=None) -> Tensor");
  m.def("gqsa_sp(Tensor x, Tensor row_ptr, Tensor codes, Tensor meta, int n_out, int splits=0, "
        "Tensor? counters=None, bool silu_mul=False) -> Tensor");
  m.def("gqsa_sp_add_stats(Tensor x, Tensor residual, Tensor? weight, Tensor row_ptr, Tensor codes, Tensor meta, "
        "int n_out, int splits=0, Tensor? counters=None) -> (Tensor, Tensor, Tensor)");
  m.def("gqsa_sp_from_stats(Tensor g, Tensor stats, float eps, Tensor residual, Tensor? weight, Tensor row_ptr, "
        "Tensor codes, Tensor meta, int n_out, int splits=0, Tensor? counters=None, bool silu_mul=False) -> Tensor");
  m.def("gqsa_sp_wgmma(Tensor x, Tensor row_ptr, Tensor codes, Tensor meta, int n_out, int splits=0) -> Tensor");
  m.def("gqsa_dequant(Tensor row_ptr, Tensor codes, Tensor meta, int n_out, int k_in, int group_size, "
        "ScalarType dtype, Tensor? sell_rows=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(vllm_gqsa, CUDA, m) {
  m.impl("gqsa_gemv", &gqsa_gemv);
  m.impl("gqsa_sliced_gemv", &gqsa_sliced_gemv);
  m.impl("gqsa_sliced_gemv_add_stats", &gqsa_sliced_gemv_add_stats);
  m.impl("gqsa_sliced_gemv_from_stats", &gqsa_sliced_gemv_from_stats);
  m.impl("gqsa_tc", &gqsa_tc);
  m.impl("gqsa_sp", &gqsa_sp);
  m.impl("gqsa_sp_add_stats", &gqsa_sp_add_stats);
  m.impl("gqsa_sp_from_stats", &gqsa_sp_from_stats);
  m.impl("gqsa_sp_wgmma", &gqsa_sp_wgmma);
  m.impl("gqsa_dequant", &gqsa_dequant);
}

// Importing a prebuilt `vllm_gqsa._C` runs the registrations above; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
  return PyModule_Create(&module);
}
