// SPDX-License-Identifier: Apache-2.0
//
// GQSA CUDA kernels: 4-bit group-quantized, group-sparse weights (single rows), fp16 or bf16
// activations. Self-contained (CUDA runtime + fp16/bf16 headers + inline PTX) so that it compiles
// for sm_80 and sm_90a on machines without a CUDA build of torch; the torch binding lives in
// torch_bindings.cpp. The kernel format is specified in vllm_gqsa/kernels/cuda_format.py.
//
// Decode GEMV (M = 1..8 tokens per launch; the plugin uses it up to 3), task-centric:
//   * A persistent grid of a few CTAs per SM. The load-time schedule cuts the rows into
//     num_ctas ranges whose kept-group counts are as close to nnz / num_ctas as row boundaries
//     allow, so no row is shared by two CTAs and every output is written exactly once, in the
//     activation dtype, by one launch, with no workspace, no zero-fill and no atomics.
//   * Inside a CTA the kept groups are split exactly evenly over the 8 warps, whatever the row
//     lengths; the schedule also holds each warp's first group and row, so no search is needed.
//     Rows cut by a warp edge are combined through shared memory in warp order after one
//     barrier (a deterministic fix-up). A warp walks its groups in steps of 32 "units"
//     (16 bytes of codes = 32 weights each, one per lane), so every weight byte is read once with
//     one coalesced 128-bit load, marked L2 evict-first.
//   * The inner loop is packed fp16 math. Eight weights take nine instructions to dequantize (the
//     magic-number trick of FasterTransformer / Marlin: one LOP3 and one HSUB2 or HFMA2 turn two
//     codes into two exact fp16 values q - z, see dequant_pairs) and four HFMA2 per token, each
//     multiplying two weights with two activations at once. Each group's (or 32-weight slice's) sum
//     is widened to fp32 after at most 16 products, scaled, and accumulated in fp32. An earlier
//     version did every product in fp32 and spent most of its time issuing instructions. At one
//     token a warp does the math of a whole batch of steps before walking their rows, so the
//     dequantize-and-multiply chains of several steps overlap.
//   * x (M x K, small, read by every row) is read as fp16 scaled by 2^-7 or 2^-8, which keeps
//     those fp16 sums finite for any fp16 activations (see kXScaleLog2), with every 8 activations
//     reordered to match the code pairs. Each CTA makes this copy in shared memory, swizzled
//     against bank conflicts, while its first weight loads are in flight; when it does not fit,
//     the kernel converts x from global memory at every use.
//
// Batched decode (M = 4..64 tokens by default) on tensor cores, see tc_kernel: a CTA takes 64 rows
// and a range of K, copies each row's kept groups of one 256-channel chunk at a time into shared
// memory at their dense places (the chunk table says where they start, so there is no search),
// builds the mma A fragments from them in registers and multiplies with mma.m16n8k16; splits of K
// are summed deterministically.
//
// Batched decode (M = 2..64 tokens) of a layer in the pair pattern (each row keeps one group of each
// aligned pair of group columns), see sp_kernel: the same tiles and splits, but only kept weights
// reach the tensor cores, as the 2:4-sparse A operand of mma.sp once each pair's channels are
// interleaved (in the order of k, which leaves x as it is).
//
// Prefill of a layer in the pair pattern on Hopper (sm_90a), see sp_wgmma_kernel: TMA copies of x
// and of each 128-row tile's codes and meta, and only kept weights multiplied by wgmma's sparse
// form, with x permuted to the kernel's order of k first.
//
// Dequantize to dense: one CTA per row writes the row of W in the activation dtype; the plugin
// uses it for large M (prefill), followed by cuBLAS.

#include "gqsa_kernels.h"

#include <cuda.h>  // CUtensorMap (TMA), for sp_wgmma_kernel
#include <cudaTypedefs.h>

#include <algorithm>
#include <atomic>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>
#include <utility>

namespace gqsa {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = kGemvThreads / kWarpSize;
// A unit is what one lane loads per step: 16 bytes of codes, 32 weights.
constexpr int kUnitWeights = 32;
// GEMV weight-load steps issued together (see gemv_kernel). One token through a Llama-2-7B layer on
// the H200, each build beside 4 steps in the same call: 2 steps 44.5-44.6 us, 4 steps 46.8-47.4,
// 3 steps 50.6, 1 step 53.0 (csrc/README.md, "Two load steps per batch").
constexpr int kStages = 2;
constexpr int kWordWeights = 8;  // 4-bit codes in one int32 word
constexpr int kDequantThreads = 128;
// Activations (2 bytes each) in one 128-byte row of shared-memory banks.
constexpr int kSharedXRowElems = 64;

// meta = scale bits (fp16) | zero << 16 | column << 20.
constexpr int kZeroShift = 16;
constexpr int kColShift = 20;
constexpr uint32_t kNibbleMask = 0xFu;
constexpr uint32_t kScaleMask = 0xFFFFu;

// 0x64006400 is the fp16 pair (1024, 1024): the ulp of 1024 in fp16 is 1, so OR-ing a code q < 16
// into bits 0-3 (or 16q into bits 4-7) of either half gives 1024 + q (or 1024 + 16q) exactly.
constexpr uint32_t kHalf2Magic = 0x64006400u;
constexpr uint32_t kHalf2Sixteenth = 0x2C002C00u;  // (1/16, 1/16)
constexpr uint32_t kHalfMinus64 = 0xD400u;         // -64; -(64 + z) is this with z in bits 4-7

// 0x4B000000 is the fp32 number 2^23: its ulp is exactly 1, so OR-ing an integer q < 2^23 into the
// mantissa gives the float 2^23 + q with no conversion instruction.
constexpr uint32_t kFloatMagic = 0x4B000000u;
// lop3 lookup table for (a & b) | c (the operands' canonical tables are a=0xF0, b=0xCC, c=0xAA).
constexpr int kLutAndOr = (0xF0 & 0xCC) | 0xAA;

// ---------------------------------------------------------------------------------------------
// PTX helpers

// L2 policy for the weight stream: every weight byte is used once per call, so it should leave L2
// before x (reused by every row) and other layers' activations do.
__device__ __forceinline__ uint64_t make_evict_first_policy() {
  uint64_t policy;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}

// 16-byte streaming load: read-only path, not allocated in L1 (no other warp of this SM reads
// it), L2 evict-first.
__device__ __forceinline__ uint4 ld_stream_v4(const void* ptr, uint64_t policy) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(ptr), "l"(policy));
  return v;
}

// 8-byte streaming load, as ld_stream_v4.
__device__ __forceinline__ uint2 ld_stream_v2(const void* ptr, uint64_t policy) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v2.u32 {%0, %1}, [%2], %3;"
      : "=r"(v.x), "=r"(v.y)
      : "l"(ptr), "l"(policy));
  return v;
}

// 4-byte streaming load, as ld_stream_v4.
__device__ __forceinline__ uint32_t ld_stream(const void* ptr, uint64_t policy) {
  uint32_t v;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.u32 %0, [%1], %2;"
      : "=r"(v)
      : "l"(ptr), "l"(policy));
  return v;
}

// Any 3-input bitwise function in one instruction; `lut` is its truth table.
template <int lut>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(r) : "r"(a), "r"(b), "r"(c), "n"(lut));
  return r;
}

// ---------------------------------------------------------------------------------------------
// Dequantization and activation helpers

// The 8 codes of one word as exact fp32 values q - z. lop3 puts each nibble into the mantissa of
// 2^23 (one SHF + one LOP3), and one FADD removes 2^23 + z; every step is exact, so the only
// rounding in the GEMV is the fp32 accumulation itself. (This is the fp16 0x6400 trick of
// FasterTransformer / Marlin moved to fp32, where 4-bit codes fit one per register.)
__device__ __forceinline__ void dequant8(uint32_t word, float zero_magic, float (&w)[kWordWeights]) {
#pragma unroll
  for (int i = 0; i < kWordWeights; ++i) {
    w[i] = __uint_as_float(lop3<kLutAndOr>(word >> (4 * i), kNibbleMask, kFloatMagic)) - zero_magic;
  }
}

__device__ __forceinline__ __half2 as_half2(uint32_t v) { return *reinterpret_cast<__half2*>(&v); }
__device__ __forceinline__ uint32_t half2_bits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

// (1024 + z, 1024 + z) and (-(64 + z), -(64 + z)) as fp16 pairs, for dequant_pairs.
struct ZeroPair {
  uint32_t magic_z;
  uint32_t minus_64_z;
};
__device__ __forceinline__ ZeroPair zero_pair(uint32_t meta) {
  const uint32_t z = ((meta >> kZeroShift) & kNibbleMask) * 0x00010001u;  // z in both halves
  return {kHalf2Magic | z, kHalfMinus64 * 0x00010001u | (z << 4)};
}

// The 8 codes of one word as exact fp16 values q - z, in the pairs (0, 4), (1, 5), (2, 6), (3, 7).
// Codes 0 and 4 sit in bits 0-3 and 16-19, one in each half of the word, so one LOP3 makes the pair
// (1024 + q0, 1024 + q4) and one HSUB2 of (1024 + z) leaves q - z. Codes 1 and 5 (bits 4-7 and
// 20-23) give 1024 + 16q, which one HFMA2, times 1/16 minus (64 + z), turns into q - z. Codes 2, 6
// and 3, 7 are the same after one shift by 8. Every step is exact.
__device__ __forceinline__ void dequant_pairs(uint32_t word, ZeroPair zp, __half2 (&w)[4]) {
  const uint32_t hi = word >> 8;
  const __half2 sixteenth = as_half2(kHalf2Sixteenth);
  w[0] = __hsub2(as_half2(lop3<kLutAndOr>(word, 0x000F000Fu, kHalf2Magic)), as_half2(zp.magic_z));
  w[1] = __hfma2(as_half2(lop3<kLutAndOr>(word, 0x00F000F0u, kHalf2Magic)), sixteenth, as_half2(zp.minus_64_z));
  w[2] = __hsub2(as_half2(lop3<kLutAndOr>(hi, 0x000F000Fu, kHalf2Magic)), as_half2(zp.magic_z));
  w[3] = __hfma2(as_half2(lop3<kLutAndOr>(hi, 0x00F000F0u, kHalf2Magic)), sixteenth, as_half2(zp.minus_64_z));
}

// The GEMV reads x as fp16 times 2^-kXScaleLog2<G>. A lane sums at most n products (q - z) * x in
// fp16 before widening to fp32: n = 8 for G = 16 (a unit holds two groups, each half of a pair
// takes 8 of a group's 16 products) and 16 for larger groups (a unit is a 32-weight slice), and
// |q - z| <= 15, so n * 15 * 65504 * 2^-s <= 65504 for s = 7 (n = 8) and s = 8 (n = 16): no partial
// sum overflows for any finite fp16 activation. Subnormal fp16 keeps the scaled copy's absolute
// error at 2^-24 * 2^s (1e-5 or less), far under the output's own rounding. bf16 activations are
// not bounded by 65504: a partial sum stays finite while n * 15 * |x| * 2^-s <= 65504, i.e. |x| up
// to 65504 * 2^s / (15 n), about 70,000, when all n activations of a sum are that large (one
// alone: 65504 * 2^s / 15, over 5e5); the scaled copy itself overflows beyond 65504 * 2^s (8e6).
template <int G>
constexpr int kXScaleLog2 = G == 16 ? 7 : 8;

// 2^-s as an fp16 pair.
__host__ __device__ constexpr uint32_t half2_pow2_neg(int s) { return ((15u - s) << 10) * 0x00010001u; }

// acc + the 8 products of w (dequant_pairs) with 8 activations in the same pair order.
__device__ __forceinline__ __half2 dot8_pairs(const __half2 (&w)[4], uint4 xv, __half2 acc) {
  acc = __hfma2(w[0], as_half2(xv.x), acc);
  acc = __hfma2(w[1], as_half2(xv.y), acc);
  acc = __hfma2(w[2], as_half2(xv.z), acc);
  return __hfma2(w[3], as_half2(xv.w), acc);
}

// 2^23 + z as a float, to subtract from dequant8's magic values.
__device__ __forceinline__ float zero_magic(uint32_t meta) {
  return __uint_as_float(kFloatMagic | ((meta >> kZeroShift) & kNibbleMask));
}

__device__ __forceinline__ float meta_scale(uint32_t meta) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(meta & kScaleMask)));
}

__device__ __forceinline__ int meta_col(uint32_t meta) { return static_cast<int>(meta >> kColShift); }

template <typename T>
struct Act;

template <>
struct Act<__half> {
  // Two packed fp16 activations as floats.
  static __device__ __forceinline__ float2 unpack(uint32_t v) {
    __half2 h = *reinterpret_cast<__half2*>(&v);
    return __half22float2(h);
  }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  // Activations 0..7 (two per word) as the fp16 pairs (0, 4), (1, 5), (2, 6), (3, 7) times 2^-s.
  template <int s>
  static __device__ __forceinline__ uint4 x_pairs(uint4 v) {
    const __half2 scale = as_half2(half2_pow2_neg(s));
    return make_uint4(half2_bits(__hmul2(as_half2(__byte_perm(v.x, v.z, 0x5410)), scale)),
                      half2_bits(__hmul2(as_half2(__byte_perm(v.x, v.z, 0x7632)), scale)),
                      half2_bits(__hmul2(as_half2(__byte_perm(v.y, v.w, 0x5410)), scale)),
                      half2_bits(__hmul2(as_half2(__byte_perm(v.y, v.w, 0x7632)), scale)));
  }
};

template <>
struct Act<__nv_bfloat16> {
  // bf16 is the top half of an fp32, so widening is a shift or a mask.
  static __device__ __forceinline__ float2 unpack(uint32_t v) {
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xFFFF0000u));
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  // As Act<__half>::x_pairs, converted to fp16 (exact for values in fp16's normal range).
  template <int s>
  static __device__ __forceinline__ uint4 x_pairs(uint4 v) {
    constexpr float scale = 1.0f / (1 << s);
    const float2 a = unpack(v.x), b = unpack(v.y), c = unpack(v.z), d = unpack(v.w);
    return make_uint4(half2_bits(__floats2half2_rn(a.x * scale, c.x * scale)),
                      half2_bits(__floats2half2_rn(a.y * scale, c.y * scale)),
                      half2_bits(__floats2half2_rn(b.x * scale, d.x * scale)),
                      half2_bits(__floats2half2_rn(b.y * scale, d.y * scale)));
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// GEMV

// The codes and meta one lane loads per step. With G = 16 a unit is two whole groups; with
// G >= 32 it is one 32-weight slice of a group, and G/32 neighbouring lanes share that group's meta.
template <int G>
struct Unit {
  static constexpr int kGroups = G == 16 ? 2 : 1;
  static constexpr int kUnitsPerGroup = G <= kUnitWeights ? 1 : G / kUnitWeights;
  uint4 codes;
  uint32_t meta[kGroups];
};

// Loads unit u, or zeros past the warp's last unit. With G = 16 and an odd nnz the last unit holds
// one group only, so it is loaded with 8-byte accesses to stay inside the tensors.
template <int G>
__device__ __forceinline__ Unit<G> load_unit(const int32_t* codes, const int32_t* meta, int u,
                                             int u_end, int nnz, uint64_t policy) {
  Unit<G> r;
  r.codes = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int i = 0; i < Unit<G>::kGroups; ++i) r.meta[i] = 0;
  if (u >= u_end) return r;
  const int32_t* unit_codes = codes + static_cast<size_t>(u) * 4;
  if constexpr (G == 16) {
    if (2 * u + 1 < nnz) {
      r.codes = ld_stream_v4(unit_codes, policy);
      const uint2 m = ld_stream_v2(meta + 2 * u, policy);
      r.meta[0] = m.x;
      r.meta[1] = m.y;
    } else {
      const uint2 c = ld_stream_v2(unit_codes, policy);
      r.codes.x = c.x;
      r.codes.y = c.y;
      r.meta[0] = ld_stream(meta + 2 * u, policy);
    }
  } else {
    r.codes = ld_stream_v4(unit_codes, policy);
    r.meta[0] = ld_stream(meta + u / Unit<G>::kUnitsPerGroup, policy);
  }
  return r;
}

// y[m, row] = v for m < M. A lane-indexed register array would go to local memory, so lane m
// picks element m with compile-time indices.
template <typename T, int M>
__device__ __forceinline__ void store_row(T* y, int N, int row, int lane, const float (&v)[M]) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (lane == m) y[static_cast<size_t>(m) * N + row] = Act<T>::from_float(v[m]);
  }
}

// Shared-memory copy of x: token m's row holds K activations padded to whole 128-byte bank rows,
// in 16-byte chunks of 8 activations. Chunk c of a row is stored at c ^ ((c >> 3) & 7): a
// permutation inside each 128-byte bank row. Without it, the lanes of a warp, which read the same
// word of groups at random columns, would all hit the 2 (G = 16) or 1 (G >= 32) bank quads that
// word can fall in; with it their reads spread over all 8 quads.
__device__ __forceinline__ int swizzle_chunk(int c) { return c ^ ((c >> 3) & 7); }

// 16-byte chunks of one token's row of the x copy (see shared_x_bytes).
__device__ __forceinline__ int shared_x_row_chunks(int K) {
  return (K + kSharedXRowElems - 1) / kSharedXRowElems * (kSharedXRowElems / kWordWeights);
}

// x [M, K] into the shared copy above, by a CTA of kThreads threads, as x_pairs of 2^-s-scaled
// fp16 (s = kXScaleLog2<G>). Each thread issues kXCopyLoads loads before it stores any, so the
// copy costs about one L2 round trip rather than one per loop iteration (6 for K = 11008, 16 for 8
// tokens of 4096). The caller synchronizes before reading it.
template <typename T, int G, int M, int kThreads>
__device__ __forceinline__ void copy_x_to_shared(const T* __restrict__ x, uint4* x_shared, int K) {
  constexpr int kXCopyLoads = 8;
  const int chunks = K / kWordWeights;
  const int total = M * chunks;
  const uint4* x_chunks = reinterpret_cast<const uint4*>(x);  // rows of K are whole chunks
  for (int i0 = threadIdx.x; i0 < total; i0 += kXCopyLoads * kThreads) {
    uint4 v[kXCopyLoads];
#pragma unroll
    for (int j = 0; j < kXCopyLoads; ++j) {
      const int i = i0 + j * kThreads;
      if (i < total) v[j] = __ldg(x_chunks + i);
    }
#pragma unroll
    for (int j = 0; j < kXCopyLoads; ++j) {
      const int i = i0 + j * kThreads;
      if (i < total) {
        const int m = i / chunks;
        const int c = i - m * chunks;
        x_shared[m * shared_x_row_chunks(K) + swizzle_chunk(c)] = Act<T>::template x_pairs<kXScaleLog2<G>>(v[j]);
      }
    }
  }
}

// The 8 activations of token m at input channels col0 .. col0 + 7 (col0 a multiple of 8), as
// Act<T>::x_pairs gives them: from the shared copy, or converted from global memory.
template <typename T, int G, bool kSharedX>
__device__ __forceinline__ uint4 load_x_pairs(const T* __restrict__ x, const uint4* x_shared, int m, int K,
                                              int col0) {
  if constexpr (kSharedX) {
    return x_shared[m * shared_x_row_chunks(K) + swizzle_chunk(col0 / kWordWeights)];
  } else {
    return Act<T>::template x_pairs<kXScaleLog2<G>>(
        __ldg(reinterpret_cast<const uint4*>(x + static_cast<size_t>(m) * K + col0)));
  }
}

template <typename T, int G, int M, bool kSharedX>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_kernel(const T* __restrict__ x, const int32_t* __restrict__ row_ptr,
                const int32_t* __restrict__ codes, const int32_t* __restrict__ meta,
                const int2* __restrict__ schedule, T* __restrict__ y, int N, int K, int nnz) {
  using U = Unit<G>;
  constexpr int kGroupWeights = kUnitWeights / U::kGroups;  // weights of one group in a unit
  constexpr int kWordsPerGroup = kGroupWeights / kWordWeights;
  constexpr int kHead = 0;  // slot of a row that began in an earlier warp
  constexpr int kTail = 1;  // slot of a row that goes on into a later warp

  __shared__ float part_sum[kWarps][2][M];
  __shared__ int part_row[kWarps][2];
  __shared__ bool warp_has_groups[kWarps];
  extern __shared__ uint4 x_shared[];  // M * shared_x_row_chunks(K) chunks when kSharedX

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  // This CTA's warp tasks are schedule[first_task .. first_task + kWarps - 1]; the next CTA's first
  // task gives the end of the last one. Reading them directly (no search) keeps the chain of
  // dependent loads before the weight stream starts at one.
  const int first_task = blockIdx.x * kWarps;
  const int row_begin = schedule[first_task].y;
  const int row_end = schedule[first_task + kWarps].y;
  if (row_begin >= row_end) return;  // uniform over the CTA, so no barrier is skipped unevenly
  const int2 task = schedule[first_task + warp];
  const int wb = task.x;                                  // first kept group of this warp
  const int we = schedule[first_task + warp + 1].x;      // one past its last
  const bool has_groups = wb < we;

  if (lane == 0) {
    part_row[warp][kHead] = part_row[warp][kTail] = -1;
    warp_has_groups[warp] = has_groups;
  }

  const uint64_t policy = make_evict_first_policy();
  const int u_begin = G == 16 ? wb / 2 : wb * U::kUnitsPerGroup;
  const int u_end = G == 16 ? (we + 1) / 2 : we * U::kUnitsPerGroup;
  // Weight loads go out kStages steps at a time, and the next batch is issued before the current
  // one is used: a warp typically owns only a handful of steps, so this turns a chain of DRAM
  // round trips into about one, and keeps 2 * kStages * 16 B per lane in flight.
  U batch_a[kStages], batch_b[kStages];
  auto load_batch = [&](U (&batch)[kStages], int u0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s)
      batch[s] = load_unit<G>(codes, meta, u0 + s * kWarpSize + lane, u_end, nnz, policy);
  };
  if (has_groups) load_batch(batch_a, u_begin);

  // Row boundaries come from a register cache: lane i holds row_ptr[rp_base + i], and the walk
  // below reads them with a shuffle, so a row end does not wait for a global load (a warp reads
  // row_ptr once per 32 rows, the first time while its first weight loads are in flight). On the
  // H200 this measured the same as a global read per row end (within 2%): the GEMV's time goes to
  // issuing instructions, not to these waits.
  int rp_base = task.y;
  int rp_cache = has_groups ? row_ptr[min(rp_base + lane, N)] : 0;
  // row_ptr[r] for a warp-uniform r >= rp_base (rows are walked in increasing order).
  auto row_start = [&](int r) {
    if (r - rp_base >= kWarpSize) {
      rp_base = r;
      rp_cache = row_ptr[min(rp_base + lane, N)];
    }
    return __shfl_sync(0xffffffffu, rp_cache, r - rp_base);
  };

  // Rows without kept groups are never visited by the walk; they are zeroed here, while the first
  // weight loads are in flight, instead of in the CTA's tail.
  for (int r = row_begin + threadIdx.x; r < row_end; r += kGemvThreads) {
    if (row_ptr[r] == row_ptr[r + 1]) {
#pragma unroll
      for (int m = 0; m < M; ++m) y[static_cast<size_t>(m) * N + r] = Act<T>::from_float(0.f);
    }
  }

  // The first weights are on their way; copy x into shared memory meanwhile. x is read once per
  // kept group at a random column: from L1, each 16-byte read of a warp touches up to 32
  // different cache lines, which made those reads the GEMV's bottleneck; from shared memory it
  // costs a few bank-conflict replays.
  if constexpr (kSharedX) {
    copy_x_to_shared<T, G, M, kGemvThreads>(x, x_shared, K);
    __syncthreads();
  }

  if (has_groups) {
    int row = task.y;  // the row holding group wb (or an empty row before it)
    int row_lo = row_start(row);      // first group of `row`
    int row_hi = row_start(row + 1);  // one past its last group
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;

    // Ends the row held in acc: written directly when this warp saw all of it, else left in a
    // shared-memory slot for the fix-up after the barrier.
    auto finish_row = [&]() {
#pragma unroll
      for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
      if (row_lo >= wb && row_hi <= we) {
        store_row<T, M>(y, N, row, lane, acc);
      } else {
        const int slot = row_lo < wb ? kHead : kTail;
#pragma unroll
        for (int m = 0; m < M; ++m) {
          if (lane == m) part_sum[warp][slot][m] = acc[m];
        }
        if (lane == 0) part_row[warp][slot] = row;
      }
#pragma unroll
      for (int m = 0; m < M; ++m) acc[m] = 0.f;
    };

    // One step's math: the contributions s * sum_j (q_j - z) x[m, j] of the groups in this lane's
    // unit of the 32 starting at u0 (cur), zero for groups outside the warp's range.
    auto step_math = [&](const U& cur, int u0, float (&part)[U::kGroups][M]) {
      const int u = u0 + lane;
      const uint32_t words[4] = {cur.codes.x, cur.codes.y, cur.codes.z, cur.codes.w};
#pragma unroll
      for (int i = 0; i < U::kGroups; ++i) {
        const int group = G == 16 ? 2 * u + i : u / U::kUnitsPerGroup;
        const ZeroPair zp = zero_pair(cur.meta[i]);
        // First input channel of this group's part of the unit.
        const int col = meta_col(cur.meta[i]) * G + (G == 16 ? 0 : (u % U::kUnitsPerGroup) * kUnitWeights);
        __half2 sum[M];
#pragma unroll
        for (int m = 0; m < M; ++m) sum[m] = __float2half2_rn(0.f);
#pragma unroll
        for (int k = 0; k < kWordsPerGroup; ++k) {
          __half2 w[4];
          dequant_pairs(words[i * kWordsPerGroup + k], zp, w);
#pragma unroll
          for (int m = 0; m < M; ++m) {
            sum[m] = dot8_pairs(w, load_x_pairs<T, G, kSharedX>(x, x_shared, m, K, col + k * kWordWeights), sum[m]);
          }
        }
        // Units past the warp's range, and the half of a G = 16 unit that belongs to a
        // neighbouring warp, contribute nothing (select, not multiply: x may hold inf).
        const bool valid = u < u_end && group >= wb && group < we;
        const float s = meta_scale(cur.meta[i]) * static_cast<float>(1 << kXScaleLog2<G>);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const float2 f = __half22float2(sum[m]);
          part[i][m] = valid ? s * (f.x + f.y) : 0.f;
        }
      }
    };

    // Hands one step's contributions to their rows. Rows ending inside the step are finished (row
    // boundaries are warp-uniform); the row still open at the step's end keeps accumulating.
    auto step_rows = [&](const float (&part)[U::kGroups][M], int u0) {
      const int u = u0 + lane;
      int group[U::kGroups];
#pragma unroll
      for (int i = 0; i < U::kGroups; ++i) group[i] = G == 16 ? 2 * u + i : u / U::kUnitsPerGroup;
      const int step_end = min(G == 16 ? 2 * (u0 + kWarpSize) : (u0 + kWarpSize) / U::kUnitsPerGroup, we);
      while (row_hi < step_end) {
#pragma unroll
        for (int i = 0; i < U::kGroups; ++i) {
          if (group[i] >= row_lo && group[i] < row_hi) {
#pragma unroll
            for (int m = 0; m < M; ++m) acc[m] += part[i][m];
          }
        }
        if (row_lo < row_hi) finish_row();  // empty rows were zeroed above
        ++row;
        row_lo = row_hi;
        row_hi = row_start(row + 1);
      }
#pragma unroll
      for (int i = 0; i < U::kGroups; ++i) {
        if (group[i] >= row_lo) {
#pragma unroll
          for (int m = 0; m < M; ++m) acc[m] += part[i][m];
        }
      }
    };

    auto run_batch = [&](const U (&batch)[kStages], int u0) {
      if constexpr (M == 1) {
        // At one token the math of the whole batch comes before its row walks. The walk is a
        // data-dependent loop the compiler cannot schedule across, so with math and walk
        // alternating, only one unit's dequantize-and-multiply chains were in flight at a time.
        // On the H200 this took one token through a Llama-2-7B layer from 49.7 to 46.5 us and
        // a Llama-3-8B layer from 50.0 to 48.7 (benchmarks/results/gpu/
        // kernels_h200_gemv_math_first{_before,}.json). With 2 and 4 tokens it holds more
        // registers and issues more x reads at once, and was no faster or slower (up to 23%,
        // kernels_h200_gemv_math_first_experiment_*.json), so they keep the alternation.
        float part[kStages][U::kGroups][M];
        // A full batch takes the branch without per-step conditions, which is what lets the
        // compiler interleave its steps; only a warp's last batch can be partial.
        if (u0 + (kStages - 1) * kWarpSize < u_end) {  // warp-uniform: every step has units
#pragma unroll
          for (int s = 0; s < kStages; ++s) step_math(batch[s], u0 + s * kWarpSize, part[s]);
        } else {
#pragma unroll
          for (int s = 0; s < kStages; ++s) {
            if (u0 + s * kWarpSize < u_end) step_math(batch[s], u0 + s * kWarpSize, part[s]);
          }
        }
#pragma unroll
        for (int s = 0; s < kStages; ++s) {
          if (u0 + s * kWarpSize >= u_end) break;  // warp-uniform
          step_rows(part[s], u0 + s * kWarpSize);
        }
      } else {
#pragma unroll
        for (int s = 0; s < kStages; ++s) {
          if (u0 + s * kWarpSize >= u_end) break;  // warp-uniform
          float part[U::kGroups][M];
          step_math(batch[s], u0 + s * kWarpSize, part);
          step_rows(part, u0 + s * kWarpSize);
        }
      }
    };

    constexpr int kBatch = kStages * kWarpSize;
    for (int u0 = u_begin; u0 < u_end; u0 += 2 * kBatch) {
      load_batch(batch_b, u0 + kBatch);
      run_batch(batch_a, u0);
      if (u0 + kBatch >= u_end) break;
      load_batch(batch_a, u0 + 2 * kBatch);
      run_batch(batch_b, u0 + kBatch);
    }
    finish_row();  // the row holding group we-1
  }
  __syncthreads();

  // Fix-up: a row that goes on past its warp is summed, in warp order, with the head partials of
  // the following warps that hold the rest of it (warps with no groups are skipped).
  if (lane < M && part_row[warp][kTail] >= 0) {
    const int row = part_row[warp][kTail];
    float sum = part_sum[warp][kTail][lane];
    for (int w = warp + 1; w < kWarps; ++w) {
      if (part_row[w][kHead] == row) {
        sum += part_sum[w][kHead][lane];
      } else if (warp_has_groups[w]) {
        break;
      }
    }
    y[static_cast<size_t>(lane) * N + row] = Act<T>::from_float(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// Dequantize to dense

template <typename T, int G>
__global__ void __launch_bounds__(kDequantThreads)
    dequant_kernel(const int32_t* __restrict__ row_ptr, const int2* __restrict__ places,
                   const int32_t* __restrict__ codes, const int32_t* __restrict__ meta, T* __restrict__ w, int K) {
  constexpr int kWordsPerGroup = G / kWordWeights;
  // Kept-group index of each group column of this row, or -1: turns the row's sparse list into
  // a dense lookup so that the writes below are contiguous 16-byte stores.
  extern __shared__ int slot[];
  // One CTA per row, or in the sliced layout per place: (row, first slot), -1 for padding.
  const int2 place = places != nullptr ? places[blockIdx.x] : make_int2(blockIdx.x, row_ptr[blockIdx.x]);
  const int row = place.x;
  if (row < 0) return;  // uniform over the CTA
  const int count = row_ptr[row + 1] - row_ptr[row];
  // Slot of the row's j-th group: place.y + j, plus in the sliced layout the other rows' slots of
  // the steps before (gqsa_kernels.h).
  const int extra = places != nullptr ? kSlotsPerStep - kStepGroups : 0;
  const int num_cols = K / G;
  for (int c = threadIdx.x; c < num_cols; c += kDequantThreads) slot[c] = -1;
  __syncthreads();
  for (int j = threadIdx.x; j < count; j += kDequantThreads) {
    const int g = place.y + j + (j / kStepGroups) * extra;
    slot[meta_col(static_cast<uint32_t>(meta[g]))] = g;
  }
  __syncthreads();

  T* out = w + static_cast<size_t>(row) * K;
  for (int o = threadIdx.x; o < K / kWordWeights; o += kDequantThreads) {  // o: one code word
    const int g = slot[o / kWordsPerGroup];
    uint4 v = make_uint4(0, 0, 0, 0);
    if (g >= 0) {
      const uint32_t m = static_cast<uint32_t>(meta[g]);
      const uint32_t word = static_cast<uint32_t>(codes[static_cast<size_t>(g) * kWordsPerGroup + o % kWordsPerGroup]);
      float q[kWordWeights];
      dequant8(word, zero_magic(m), q);
      // (q - z) * s is exact in fp32, so the one rounding is to T, as in the torch reference.
      const float s = meta_scale(m);
      v.x = Act<T>::pack(q[0] * s, q[1] * s);
      v.y = Act<T>::pack(q[2] * s, q[3] * s);
      v.z = Act<T>::pack(q[4] * s, q[5] * s);
      v.w = Act<T>::pack(q[6] * s, q[7] * s);
    }
    *reinterpret_cast<uint4*>(out + static_cast<size_t>(o) * kWordWeights) = v;
  }
}

// ---------------------------------------------------------------------------------------------
// The norm split between two sliced GEMVs (gqsa_kernels.h, NormSplit): the copy of the second's x.

// The largest |g| = |T(h * weight)| the split's fast path takes: g must be finite in fp16, whose
// every finite value the GEMV's copy of x takes without overflow (kXScaleLog2). A larger one
// (bf16 only, or fp16 h times a weight over 1) sends the GEMV after the norm to vLLM's normalized x.
constexpr float kSplitGLimit = 65504.f;

// The norm's weight at channel c in fp32 (split.weight is of x's dtype, or fp32 with weight_fp32;
// 1 without a weight).
template <typename T>
__device__ __forceinline__ float split_weight(const NormSplit& split, int c) {
  if (split.weight == nullptr) return 1.f;
  return split.weight_fp32 ? __ldg(static_cast<const float*>(split.weight) + c)
                           : Act<T>::unpack(static_cast<uint32_t>(
                                 __ldg(reinterpret_cast<const unsigned short*>(split.weight) + c))).x;
}

// vLLM's normalized x, T(T(h * r) * weight), from h = split.residual [M, K] and split.weight, into
// the shared copy as copy_x_to_shared stores x: the split's path for a launch whose g is too large.
template <typename T, int G, int M, int kThreads>
__device__ __forceinline__ void copy_normed_x_to_shared(const NormSplit& split, const float (&r)[M], uint4* x_shared,
                                                        int K) {
  const int chunks = K / kWordWeights;
  const uint4* h_chunks = static_cast<const uint4*>(split.residual);
  for (int i = threadIdx.x; i < M * chunks; i += kThreads) {
    const int m = M == 1 ? 0 : i / chunks;
    const int c = i - m * chunks;
    float rm = r[0];
#pragma unroll
    for (int mm = 1; mm < M; ++mm) rm = mm == m ? r[mm] : rm;
    const uint4 hv = __ldcg(h_chunks + i);
    const uint32_t hw[4] = {hv.x, hv.y, hv.z, hv.w};
    uint32_t out[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 hk = Act<T>::unpack(hw[k]);
      const float2 h = Act<T>::unpack(Act<T>::pack(hk.x * rm, hk.y * rm));  // T(h * r)
      const int col = c * kWordWeights + 2 * k;
      out[k] = Act<T>::pack(h.x * split_weight<T>(split, col), h.y * split_weight<T>(split, col + 1));
    }
    x_shared[m * shared_x_row_chunks(K) + swizzle_chunk(c)] =
        Act<T>::template x_pairs<kXScaleLog2<G>>(make_uint4(out[0], out[1], out[2], out[3]));
  }
}

// The x copy of the GEMV after a split norm: g [M, K] goes into shared memory as a plain x does,
// and r_out[m] gets the factor of token m's sums, r = rsqrt(mean(h^2) + eps) from the first GEMV's
// per-CTA sums stats[m * pieces + p] (1 where g was too large, and the copy is then vLLM's
// normalized x). The first stats' loads go out before g's, so that both L2 round trips overlap;
// the CTA's threads each sum a stride of them, the warps' sums meet in shared memory, and every
// thread adds those in warp order: the same r in every CTA, each stat read once per CTA. Every
// thread of the CTA must call it; the caller synchronizes before reading the copy or r_out.
template <typename T, int G, int M, int kThreads>
__device__ __forceinline__ void copy_split_x_to_shared(const T* __restrict__ g, const NormSplit& split,
                                                       uint4* x_shared, float* r_out, int K) {
  constexpr int kStatLoads = 4;
  constexpr int kWarps = kThreads / kWarpSize;
  __shared__ float warp_sums[kWarps][M];
  __shared__ int warp_over[kWarps];
  const int pieces = split.stats_pieces;
  const float* stats = split.stats;
  float v[M][kStatLoads];
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int j = 0; j < kStatLoads; ++j) {
      const int p = threadIdx.x + j * kThreads;
      v[m][j] = p < pieces ? __ldcg(stats + m * pieces + p) : 0.f;
    }
  }
  copy_x_to_shared<T, G, M, kThreads>(g, x_shared, K);

  // A negative stat is -1 - the sum of a CTA whose g was too large.
  bool over = false;
  float t[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    t[m] = 0.f;
#pragma unroll
    for (int j = 0; j < kStatLoads; ++j) {
      over |= v[m][j] < 0.f;
      t[m] += v[m][j] < 0.f ? -1.f - v[m][j] : v[m][j];
    }
    for (int p = threadIdx.x + kStatLoads * kThreads; p < pieces; p += kThreads) {  // over 4 per thread
      const float s = __ldcg(stats + m * pieces + p);
      over |= s < 0.f;
      t[m] += s < 0.f ? -1.f - s : s;
    }
  }
  const int warp = threadIdx.x / kWarpSize;
  const bool warp_is_over = __any_sync(0xFFFFFFFFu, over);
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float sum = warp_sum(t[m]);
    if (threadIdx.x % kWarpSize == 0) warp_sums[warp][m] = sum;
  }
  if (threadIdx.x % kWarpSize == 0) warp_over[warp] = warp_is_over;
  __syncthreads();
  float r[M];
  bool any_over = false;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][m];
    r[m] = rsqrtf(sum / static_cast<float>(K) + split.eps);
  }
#pragma unroll
  for (int w = 0; w < kWarps; ++w) any_over |= warp_over[w] != 0;
  if (any_over) copy_normed_x_to_shared<T, G, M, kThreads>(split, r, x_shared, K);  // CTA-uniform
#pragma unroll
  for (int m = 0; m < M; ++m) {
    if (threadIdx.x == m) r_out[m] = any_over ? 1.f : r[m];
  }
}

// ---------------------------------------------------------------------------------------------
// Sliced GEMV: one row per lane (G = 16, 1 to 3 tokens)
//
// In the sliced layout (gqsa_kernels.h) a lane owns one row and a step gives each lane 32 bytes of
// codes (its row's next four groups) and their four meta words, so the loop has no row ends: a lane
// keeps its row's sums in registers, and the only reduction is one shared-memory sum over the CTA's
// warps at the end. The task-centric GEMV above spends about a quarter of its instructions walking
// row ends (a warp-wide sum, the hand-off, the next bounds); the first version of this loop, with
// two groups per step, issued about 56 warp instructions per group and lane against its 93
// (csrc/README.md, "One row per lane").

// The slots of a cut slice's partial sums (the layer's parts, int32): kEmptyPart until a piece
// writes its fp32 sum there. A written sum is never kEmptyPart's bits, a NaN that GPU arithmetic
// does not produce: store_part writes every NaN as the canonical 0x7FFFFFFF.
constexpr int32_t kEmptyPart = -1;
constexpr int kPartBatch = 4;  // the last piece's loads of other pieces' sums in flight together

__device__ __forceinline__ int32_t load_part(const int32_t* p) {
  int32_t v;
  asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_part_bits(int32_t* p, int32_t v) {
  asm volatile("st.relaxed.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void store_part(int32_t* p, float v) {
  store_part_bits(p, v != v ? 0x7FFFFFFF : __float_as_int(v));
}

// A CTA takes one piece (a whole slice, or part of a long one); its warps split the piece's steps
// evenly, each loading its next step before the current one's math. Padding slots have scale 0.

constexpr int kSlicedBatch = 1;

struct SlicedStep {
  uint4 codes[kStepGroups / 2];
  uint4 meta;
};
static_assert(kStepGroups == 4, "a step is two 16-byte loads of codes and one of meta per lane");

// kSplit: a NormSplitMode, the part of a split norm this launch does (gqsa_kernels.h).
template <typename T, int M, int kW, int kSplit>
__global__ void __launch_bounds__(kW * kWarpSize)
    sliced_gemv_kernel(const T* __restrict__ x, const int2* __restrict__ places, const int4* __restrict__ pieces,
                       const uint4* __restrict__ codes, const uint4* __restrict__ meta, int32_t* __restrict__ parts,
                       int num_part_slots, T* __restrict__ y, int N, int K, const NormSplit split) {
  constexpr bool kAddStats = kSplit == static_cast<int>(NormSplitMode::kAddStats);
  constexpr bool kFromStats = kSplit == static_cast<int>(NormSplitMode::kFromStats);
  constexpr int G = 16;
  constexpr int kB = kSlicedBatch;
  extern __shared__ uint4 x_shared[];
  __shared__ float part[kW][M][kWarpSize];

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int4 piece = pieces[blockIdx.x];  // steps piece.y .. piece.z - 1 of slice piece.x
  const int b = piece.y + (piece.z - piece.y) * warp / kW;  // this warp's steps b .. e - 1
  const int e = piece.y + (piece.z - piece.y) * (warp + 1) / kW;

  const uint64_t policy = make_evict_first_policy();
  SlicedStep batch_a[kB], batch_b[kB];
  auto load = [&](SlicedStep (&batch)[kB], int p) {
#pragma unroll
    for (int i = 0; i < kB; ++i) {
      if (p + i < e) {
        const size_t at = static_cast<size_t>(p + i) * kWarpSize + lane;
        batch[i].codes[0] = ld_stream_v4(codes + 2 * at, policy);
        batch[i].codes[1] = ld_stream_v4(codes + 2 * at + 1, policy);
        batch[i].meta = ld_stream_v4(meta + at, policy);
      } else {
        batch[i].codes[0] = batch[i].codes[1] = make_uint4(0, 0, 0, 0);
        batch[i].meta = make_uint4(0, 0, 0, 0);  // scale 0
      }
    }
  };
  load(batch_a, b);

  // kAddStats: warp 0's row, residual and norm weight, loaded now so that their L2 round trips
  // overlap the main loop instead of following it in the epilogue.
  int row = -1;
  uint16_t res_bits[M];
  float w = 1.f;
  if constexpr (kAddStats) {
    if (warp == 0) {
      row = places[piece.x * kSliceRows + lane].x;
#pragma unroll
      for (int m = 0; m < M; ++m)
        res_bits[m] = row >= 0 ? __ldcg(reinterpret_cast<const unsigned short*>(split.residual) +
                                        static_cast<size_t>(m) * N + row)
                               : 0;
      if (row >= 0) w = split_weight<T>(split, row);
    }
  }

  // x into shared memory while the first weights are in flight, as gemv_kernel does.
  __shared__ float split_r[M];  // kFromStats: the factors of the sums (copy_split_x_to_shared)
  if constexpr (kFromStats) {
    copy_split_x_to_shared<T, G, M, kW * kWarpSize>(x, split, x_shared, split_r, K);
  } else {
    copy_x_to_shared<T, G, M, kW * kWarpSize>(x, x_shared, K);
  }
  __syncthreads();

  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  const int row_chunks = shared_x_row_chunks(K);
  auto math = [&](const SlicedStep& st) {
    const uint32_t words[8] = {st.codes[0].x, st.codes[0].y, st.codes[0].z, st.codes[0].w,
                               st.codes[1].x, st.codes[1].y, st.codes[1].z, st.codes[1].w};
    const uint32_t metas[kStepGroups] = {st.meta.x, st.meta.y, st.meta.z, st.meta.w};
#pragma unroll
    for (int g = 0; g < kStepGroups; ++g) {
      const ZeroPair zp = zero_pair(metas[g]);
      const int c0 = meta_col(metas[g]) * (G / kWordWeights);  // the group's first 16-byte chunk of x
      __half2 sum[M];
#pragma unroll
      for (int m = 0; m < M; ++m) sum[m] = __float2half2_rn(0.f);
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        __half2 w[4];
        dequant_pairs(words[2 * g + k], zp, w);
#pragma unroll
        for (int m = 0; m < M; ++m) sum[m] = dot8_pairs(w, x_shared[m * row_chunks + swizzle_chunk(c0 + k)], sum[m]);
      }
      const float sc = meta_scale(metas[g]) * static_cast<float>(1 << kXScaleLog2<G>);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float2 f = __half22float2(sum[m]);
        acc[m] = fmaf(sc, f.x + f.y, acc[m]);
      }
    }
  };
  for (int p = b; p < e; p += 2 * kB) {
    load(batch_b, p + kB);
#pragma unroll
    for (int i = 0; i < kB; ++i) math(batch_a[i]);
    if (p + kB >= e) break;
    load(batch_a, p + 2 * kB);
#pragma unroll
    for (int i = 0; i < kB; ++i) math(batch_b[i]);
  }

#pragma unroll
  for (int m = 0; m < M; ++m) part[warp][m][lane] = acc[m];
  __syncthreads();
  if (warp != 0) return;
  const int slice = piece.x;
  if constexpr (!kAddStats) row = places[slice * kSliceRows + lane].x;
  float v[M];
#pragma unroll
  for (int m = 0; m < M; ++m) {
    v[m] = 0.f;
#pragma unroll
    for (int w = 0; w < kW; ++w) v[m] += part[w][m][lane];
  }
  const int n_pieces = static_cast<int>(static_cast<uint32_t>(piece.w) >> 16);
  // kAddStats: the slot of stats a slice's sum goes to, its first piece's (a cut slice's last piece
  // writes it); every other piece's slot gets 0.
  int stat_slot = blockIdx.x;
  if (n_pieces > 1) {
    // A cut slice: every piece but the last leaves its sums in its own slots of parts and exits.
    // The last piece reads each sum as soon as it lands, adds them in piece order (the same sum
    // whatever the timing) and empties the slots again. A slot's value is its own ready flag
    // (kEmptyPart until written), so no fence or counter stands between the pieces' math and the
    // sum. Waiting is safe because CTAs start in index order, so the pieces it waits for have
    // started and wait for nothing (CUB's decoupled look-back relies on the same order).
    const int k = piece.w & 0xFFFF;
    const int first = blockIdx.x - k;
    if (static_cast<int>(blockIdx.x) >= num_part_slots) __trap();  // the layout puts cut slices first
    int32_t* slots = parts + static_cast<size_t>(first) * kSlicedPartWords + lane;
    // Piece first + q's slot of token m for this lane.
    auto slot_of = [&](int q, int m) { return slots + (static_cast<size_t>(q) * kMaxSlicedTokens + m) * kWarpSize; };
    if constexpr (kAddStats) {
      if (lane == 0 && k != 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) split.stats[m * gridDim.x + blockIdx.x] = 0.f;
      }
      stat_slot = first;
    }
    if (k != n_pieces - 1) {
#pragma unroll
      for (int m = 0; m < M; ++m) store_part(slot_of(k, m), v[m]);
      return;
    }
    float s[M];
#pragma unroll
    for (int m = 0; m < M; ++m) s[m] = 0.f;
    for (int q0 = 0; q0 < k; q0 += kPartBatch) {
      int bits[kPartBatch][M];
#pragma unroll
      for (int j = 0; j < kPartBatch; ++j)
#pragma unroll
        for (int m = 0; m < M; ++m)
          bits[j][m] = q0 + j < k ? load_part(slot_of(q0 + j, m)) : 0;
#pragma unroll
      for (int j = 0; j < kPartBatch; ++j) {
        if (q0 + j >= k) break;
#pragma unroll
        for (int m = 0; m < M; ++m) {
          int32_t* slot = slot_of(q0 + j, m);
          while (bits[j][m] == kEmptyPart) bits[j][m] = load_part(slot);
          s[m] += __int_as_float(bits[j][m]);
          store_part_bits(slot, kEmptyPart);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) v[m] = s[m] + v[m];
  }
  if constexpr (kAddStats) {
    // h = T(y) + residual, as vLLM adds the layer's rounded output to the residual stream.
    T* residual_out = static_cast<T*>(split.residual_out);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float h = 0.f;
      bool over = false;
      if (row >= 0) {
        const size_t at = static_cast<size_t>(m) * N + row;
        h = Act<T>::unpack(Act<T>::pack(v[m], 0.f)).x + Act<T>::unpack(static_cast<uint32_t>(res_bits[m])).x;
        residual_out[at] = Act<T>::from_float(h);
        const float g = Act<T>::unpack(Act<T>::pack(h * w, 0.f)).x;
        static_cast<T*>(split.g)[at] = Act<T>::from_float(g);
        over = !(fabsf(g) <= kSplitGLimit);  // NaN too
      }
      const float sum = warp_sum(h * h);
      over = __any_sync(0xFFFFFFFFu, over);
      if (lane == 0) split.stats[m * gridDim.x + stat_slot] = over ? -1.f - sum : sum;
    }
  } else if (row >= 0) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float scale = kFromStats ? split_r[m] : 1.f;
      y[static_cast<size_t>(m) * N + row] = Act<T>::from_float(v[m] * scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel for batched decode (up to 64 tokens per launch; the plugin uses it for 4..64)

// A weight tile of kTcRows rows; the input is walked in chunks of kTcChunk channels.
constexpr int kTcSlots = kTcChunk / 16;      // 16-channel mma k-steps in a chunk
constexpr int kTcChunkUnits = kTcChunk / 8;  // 16-byte units (8 fp16) in one row of a chunk

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async copies of kBytes to a shared-memory address (from smem_addr); the _zfill ones write
// zeros and read nothing when !valid (a source size of 0).
template <int kBytes>
__device__ __forceinline__ void cp_async(uint32_t smem, const void* gmem) {
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem), "l"(gmem));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(smem), "l"(gmem), "n"(kBytes));
  }
}

// With kLine, L2 reads the whole 128-byte line from DRAM (the .L2::128B prefetch size) rather than
// only the sectors asked for: see sp_l2_lines.
template <bool kLine = false>
__device__ __forceinline__ void cp_async16_zfill(uint32_t smem, const void* gmem, bool valid) {
  if constexpr (kLine) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0));
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0));
  }
}

// The same through L1 (.ca): for x, which the CTAs sharing an SM copy again and again.
__device__ __forceinline__ void cp_async16_ca_zfill(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async4_zfill(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem), "l"(gmem), "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::); }

template <int n>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(n));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(smem)));
}

// d += a (16 x 16, row-major) * b (16 x 8, column-major), fp16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The tensor cores multiply fp16: x is read as fp16 times 2^-kTcXScaleLog2 and y scaled back.
// fp16 activations are taken as they are; bf16 ones are scaled as in the GEMV, so values up to
// 65504 * 2^8 stay finite (accumulation is fp32, so no partial sum can overflow).
template <typename T>
constexpr int kTcXScaleLog2 = 0;
template <>
constexpr int kTcXScaleLog2<__nv_bfloat16> = 8;

// 8 bf16 activations as fp16 times 2^-s, in the same order.
template <int s>
__device__ __forceinline__ uint4 bf16_to_half_scaled(uint4 v) {
  constexpr float scale = 1.0f / (1 << s);
  const uint32_t in[4] = {v.x, v.y, v.z, v.w};
  uint32_t out[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = Act<__nv_bfloat16>::unpack(in[i]);
    out[i] = half2_bits(__floats2half2_rn(f.x * scale, f.y * scale));
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// x as fp16 times 2^-kTcXScaleLog2<T>, 8 activations per thread and step: for the tensor-core
// kernel's larger batches, where converting x once per launch is cheaper than converting each
// chunk in every CTA that reads it (see tc_converts_x_once).
template <typename T>
__global__ void tc_scale_x_kernel(const uint4* __restrict__ x, uint4* __restrict__ out, int units) {
  for (int u = blockIdx.x * blockDim.x + threadIdx.x; u < units; u += gridDim.x * blockDim.x) {
    out[u] = bf16_to_half_scaled<kTcXScaleLog2<T>>(x[u]);
  }
}

// The 8 warps of a CTA: warp w multiplies rows 16 * (w % 4) .. + 15 of the tile over half w / 4 of
// each chunk's 16 k-steps; the two halves' sums are added at the end.
constexpr int kTcRowGroups = kTcRows / 16;
constexpr int kTcHalves = kTcThreads / kWarpSize / kTcRowGroups;
constexpr int kTcHalfSlots = kTcSlots / kTcHalves;
constexpr int kTcCopyThreads = kTcThreads / kTcRows;  // threads copying one row's groups

// Shared memory per SM of the architecture being compiled: 228 KB on Hopper, 164 KB on A100 and
// 100 KB on the other Ampere and Ada parts (the host pass does not use it).
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 800 || __CUDA_ARCH__ == 870)
constexpr int kSmemPerSm = 164 * 1024;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kSmemPerSm = 100 * 1024;
#else
constexpr int kSmemPerSm = 228 * 1024;
#endif

// Shared memory that tc_finish needs: every warp's sums in fp32, kRows rows of each token of
// each part. Rows of a token are kRows + 4 floats apart, so a warp's 8 rows of 4 tokens (two
// apart) fall in 32 different banks.
template <int MT, int P, int kRows = kTcRows>
constexpr int kFinishBytes = P * 8 * MT * (kRows + 4) * 4;

// Shared memory of tc_kernel. Each pipeline stage holds one chunk: x (kTokens rows of the chunk's
// activations) and, for each of the tile's rows, the chunk's codes and meta at their dense
// positions: a kept group's codes go to its column's place in the row, a pruned column gets meta 0
// (scale 0, so its weights are exact zeros whatever its code bytes hold, which are not copied).
template <int G, int MT>
struct TcLayout {
  static constexpr int kCols = kTcChunk / G;  // group columns per chunk
  static constexpr int kTokens = 8 * MT;
  // Rows of x and of codes are padded by 16 bytes, so the 8 rows one ldmatrix or one warp-wide code
  // read touches start 4 banks apart and fall in different banks. Unlike an XOR swizzle, padding
  // keeps every k-step's offset from a thread's row a compile-time constant, so the unrolled
  // k-steps address shared memory with immediates instead of recomputing swizzled addresses.
  // With the zero point placed by one IMAD, the scale broadcast by HMUL2's operand and the meta
  // stride below, this took one Llama-2-7B layer on the H200 at 8, 16 and 32 tokens from 111.3,
  // 154.7 and 187.8 us to 105.0, 126.9 and 176.3 (a static main loop of 530 SASS instructions per
  // chunk to 433; benchmarks/results/gpu/kernels_llama2-7b_h200_tc_{before_padding,padding_meta16}.json).
  static constexpr int kXRowBytes = kTcChunk * 2 + 16;
  static constexpr int kXBytes = kTokens * kXRowBytes;
  static constexpr int kCodeRowBytes = kTcChunk / 2 + 16;  // 4-bit codes of a whole chunk row
  static constexpr int kCodeBytes = kTcRows * kCodeRowBytes;
  // Meta rows are kMetaStride words apart. A warp reads the same group columns of 8 rows at once,
  // up to 4 neighbouring words per row in one load (2 with G = 64, 1 with G = 128). A stride of 4
  // times an odd number puts the 8 rows' blocks of up to 4 words in different banks; for the
  // single words of G = 128 an odd stride does that.
  static constexpr int kMetaStride = kCols <= 2 ? 3 : (kCols / 4) % 2 ? kCols : kCols + 4;
  static constexpr int kMetaBytes = kTcRows * kMetaStride * 4;
  static constexpr int kEntryBytes = kTcRows * 4;  // chunk table entries, kStages - 1 chunks ahead
  static constexpr int kStageBytes = kXBytes + kCodeBytes + kMetaBytes + kEntryBytes;
  // Two stages: on the H200, 2, 3 and 4 stages (4 to 2 CTAs per SM) measured within noise of
  // each other, 2 slightly ahead (benchmarks/results/gpu/kernels_llama2-7b_h200_tc_stages*.json);
  // with the kernel's later, shorter k-steps, 3 stages were 7-22% slower at 8 to 32 tokens
  // (kernels_llama2-7b_h200_tc_pipeline_experiment_{base,stages3}.json).
  static constexpr int kStages = 2;
  static constexpr int kBytes = kStages * kStageBytes;
  // CTAs per SM that shared memory allows (1 KB of it is reserved per CTA), at most 4: the
  // minimum given to __launch_bounds__ for MT <= 2 (see tc_kernel).
  static constexpr int kMinCtas = kSmemPerSm / (kBytes + 1024) < 4 ? kSmemPerSm / (kBytes + 1024) : 4;
  static_assert(kStageBytes % 16 == 0, "stages stay 16-byte aligned");
  static_assert(kFinishBytes<MT, kTcHalves> <= kBytes, "tc_finish's sums fit in shared memory");
};

// A pipeline stage as a type, so that code for one stage can be written once and compiled per
// stage; stage_of gives the index of a StageTag or of a plain int stage.
template <int S>
struct StageTag {};
template <typename S>
constexpr bool kIsStageTag = false;
template <int S>
constexpr bool kIsStageTag<StageTag<S>> = true;
template <int S>
__device__ __forceinline__ constexpr int stage_of(StageTag<S>) {
  return S;
}
__device__ __forceinline__ int stage_of(int s) { return s; }
// f(StageTag<0>{}), f(StageTag<1>{}), ...: a loop body per stage, each with its stage known at compile time.
template <typename F, int... S>
__device__ __forceinline__ void for_each_stage(std::integer_sequence<int, S...>, F&& f) {
  (f(StageTag<S>{}), ...);
}

// Keeps v in a register at this point: an empty asm that may change it, so the compiler can
// neither recompute it nor move its computation past here (ptxas otherwise rematerializes
// per-thread addresses from the thread index inside hot loops to save registers).
template <typename V>
__device__ __forceinline__ void keep_in_register(V& v) {
  if constexpr (sizeof(V) == 8) {
    asm volatile("" : "+l"(v));
  } else {
    asm volatile("" : "+r"(v));
  }
}

// The copies of x into a stage, the same in tc_kernel and sp_kernel (layout L): thread t copies
// the 16-byte unit cu = t % kTcChunkUnits of a chunk for tokens tok + j * kTokenStep, tok = t /
// kTcChunkUnits, and zeros for tokens past M. Through L1 (.ca), which the CTAs on one SM share:
// they copy the same chunks of x. On the H200 that made sp_kernel 8-18% faster than its earlier
// 4-byte copies, where copies around L1 (.cg) were 9-17% slower, and tc_kernel 4-8% faster on
// Qwen2.5-7B's layers at 8 to 32 tokens, the same on Llama-2-7B's
// (benchmarks/results/gpu/kernels_pairs_h200_x16_cg_experiment.json, kernels_*_h200_x_ab_*.json).
template <typename T, typename L>
struct XCopies {
  static constexpr int kCopies = L::kTokens * kTcChunkUnits / kTcThreads;
  static constexpr int kTokenStep = kTcThreads / kTcChunkUnits;
  static_assert(L::kTokens * kTcChunkUnits % kTcThreads == 0, "x copies tile the stage");
  int tok;
  int cu;
  uint32_t dst;     // this thread's first unit in stage 0
  const T* src;     // this thread's first unit of chunk 0
  uint32_t tok_ok;  // bit j: token tok + j * kTokenStep exists

  __device__ __forceinline__ XCopies(const T* x, uint32_t stage0, int M, int K)
      : tok(threadIdx.x / kTcChunkUnits),
        cu(threadIdx.x % kTcChunkUnits),
        dst(stage0 + tok * L::kXRowBytes + 16 * cu),
        src(x + static_cast<size_t>(tok < M ? tok : 0) * K + cu * kWordWeights),
        tok_ok(0) {
#pragma unroll
    for (int j = 0; j < kCopies; ++j) tok_ok |= static_cast<uint32_t>(tok + j * kTokenStep < M) << j;
  }

  // Into the stage at byte offset stage, this thread's units from from (its unit of token tok, or
  // of token 0 when tok >= M), or zeros where !ok or the token is past M. A copy of zeros reads
  // nothing, but its address stays inside x: x where !ok, else from (a unit of a token below M).
  // No select of 64-bit addresses per copy: j * kTokenStep * K is under 64 * 2^19 (kMaxGroupCols).
  __device__ __forceinline__ void issue(uint32_t stage, const T* from, bool ok, const T* x, int K) const {
    if (!ok) from = x;
#pragma unroll
    for (int j = 0; j < kCopies; ++j) {
      const bool valid = ok && ((tok_ok >> j) & 1u);
      cp_async16_ca_zfill(dst + stage + kTokenStep * L::kXRowBytes * j, from + (valid ? j * kTokenStep * K : 0), valid);
    }
  }
};

// After a CTA has written its split's fp32 partials of a tile: whether it is the last of the tile's
// splits to get here, and so the one to sum them (every other split's partials then visible to it).
// That CTA sets the counter back to 0 when it is done.
__device__ __forceinline__ bool last_split_arrives(int32_t* __restrict__ counters, int tile, int splits) {
  __shared__ int is_last_split;
  __threadfence();  // this thread's partials are visible to the split that sums them
  __syncthreads();
  if (threadIdx.x == 0) is_last_split = atomicAdd(counters + tile, 1) == splits - 1;
  __syncthreads();
  if (!is_last_split) return false;
  __threadfence();
  return true;
}

// vLLM's SiLU-and-mul of one gate output and its up output, given as fp32 sums: each rounded to T,
// as the layer's output would be, then T(T(silu(g)) * u) with silu(g) = g / (1 + exp(-g)) in fp32,
// the roundings of vLLM's silu_and_mul kernel and of PyTorch's F.silu(g) * u.
template <typename T>
__device__ __forceinline__ T silu_mul(float gate, float up) {
  const float g = static_cast<float>(Act<T>::from_float(gate));
  const float u = static_cast<float>(Act<T>::from_float(up));
  const float s = static_cast<float>(Act<T>::from_float(g / (1.f + expf(-g))));
  return Act<T>::from_float(s * u);
}

// tc_finish for a gate/up layer fused with the SiLU-and-mul after it (gate_rows > 0): W's rows
// 0 .. gate_rows - 1 are gate's and gate_rows .. 2 gate_rows - 1 up's, the tile's first kRows / 2
// rows gate rows tile * kRows / 2 + j and the others the up rows gate_rows + the same (sp_kernel),
// and y is [M, gate_rows] = silu(gate) * up. sums as tc_finish leaves them in shared memory. K
// splits keep fp32 partials of the tile's rows at their rows of W in the workspace. norm_r (the
// second part of a split norm, kFromStats, or null): each token's factor, applied to gate and up
// before the SiLU-and-mul, as it would be to the layer's outputs.
template <typename T, int MT, int P, int kRows>
__device__ __forceinline__ void silu_mul_finish(const float* sums, int tile, int split, T* __restrict__ y,
                                                float* __restrict__ workspace, int32_t* __restrict__ counters,
                                                int M, int N, int splits, int gate_rows, const float* norm_r) {
  constexpr int kTokens = 8 * MT;
  constexpr int kPitch = kRows + 4;
  constexpr int kHalf = kRows / 2;
  constexpr float kOutScale = static_cast<float>(1 << kTcXScaleLog2<T>);
  // Output i is token i / kHalf, gate row j = i % kHalf of the tile (and up row j + kHalf).
  constexpr int kOutputs = kHalf * kTokens / kTcThreads;
  static_assert(kOutputs * kTcThreads == kHalf * kTokens, "the threads share the outputs evenly");
  const int tokens = M < kTokens ? M : kTokens;
  const int first = tile * kHalf;  // the tile's first gate row
  const int rows = gate_rows - first < kHalf ? gate_rows - first : kHalf;
  auto output_ok = [&](int i) { return i / kHalf < tokens && i % kHalf < rows; };
  auto gate_at = [&](int i) { return static_cast<size_t>(i / kHalf) * N + first + i % kHalf; };
  auto y_at = [&](int i) { return static_cast<size_t>(i / kHalf) * gate_rows + first + i % kHalf; };
  auto scale = [&](int i) { return norm_r == nullptr ? kOutScale : kOutScale * norm_r[i / kHalf]; };
  float* out = splits == 1 ? nullptr : workspace + static_cast<size_t>(split) * M * N;
#pragma unroll
  for (int k = 0; k < kOutputs; ++k) {
    const int i = threadIdx.x + k * kTcThreads;
    if (!output_ok(i)) continue;
    float gate = 0.f, up = 0.f;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      gate += sums[(p * kTokens + i / kHalf) * kPitch + i % kHalf];
      up += sums[(p * kTokens + i / kHalf) * kPitch + kHalf + i % kHalf];
    }
    if (out == nullptr) {
      y[y_at(i)] = silu_mul<T>(gate * scale(i), up * scale(i));
    } else {
      out[gate_at(i)] = gate;
      out[gate_at(i) + gate_rows] = up;
    }
  }
  if (splits == 1 || !last_split_arrives(counters, tile, splits)) return;
  float gates[kOutputs], ups[kOutputs];
#pragma unroll
  for (int k = 0; k < kOutputs; ++k) gates[k] = ups[k] = 0.f;
  for (int sp = 0; sp < splits; ++sp) {  // in split order, as tc_finish
    const float* partial = workspace + static_cast<size_t>(sp) * M * N;
#pragma unroll
    for (int k = 0; k < kOutputs; ++k) {
      const int i = threadIdx.x + k * kTcThreads;
      if (output_ok(i)) {
        gates[k] += __ldcg(partial + gate_at(i));
        ups[k] += __ldcg(partial + gate_at(i) + gate_rows);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kOutputs; ++k) {
    const int i = threadIdx.x + k * kTcThreads;
    if (output_ok(i)) y[y_at(i)] = silu_mul<T>(gates[k] * scale(i), ups[k] * scale(i));
  }
  if (threadIdx.x == 0) counters[tile] = 0;
}

// sp_kernel's part of a split norm (NormSplit): none, the first part (o or down: the residual add
// and sums of h^2 in its finish) or the second (gate/up or q/k/v: g as x, scaled in its finish).
constexpr int kNormNone = static_cast<int>(NormSplitMode::kNone);
constexpr int kNormAddStats = static_cast<int>(NormSplitMode::kAddStats);
constexpr int kNormFromStats = static_cast<int>(NormSplitMode::kFromStats);

// The second part's factors, r[m] = rsqrt(mean(h^2) + eps) for tokens m < M, from the first part's
// sums stats[m, 0 .. stats_pieces) (a negative one, -1 - the sum, marks g too large). Warp w sums
// tokens w, w + 8, ...: each lane's first kStatLoads loads of all its tokens go out together, then
// any rest, and the lanes meet in a fixed order, so every CTA computes the same r. Returns, after
// a barrier, whether any stat is marked (the same in every CTA): then the CTA copies vLLM's
// normalized x instead of g (sp_normed_x) and does not scale its outputs.
template <int MT>
__device__ __forceinline__ bool sp_norm_factors(const NormSplit& s, int M, int K, float* r) {
  constexpr int kWarps = kTcThreads / kWarpSize;
  constexpr int kTokensPerWarp = 8 * MT / kWarps;
  constexpr int kStatLoads = 4;
  static_assert(kTokensPerWarp * kWarps == 8 * MT, "the warps share the tokens evenly");
  __shared__ int warp_over[kWarps];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int pieces = s.stats_pieces;
  float v[kTokensPerWarp][kStatLoads];
#pragma unroll
  for (int j = 0; j < kTokensPerWarp; ++j) {
    const int m = warp + kWarps * j;
#pragma unroll
    for (int l = 0; l < kStatLoads; ++l) {
      const int p = lane + kWarpSize * l;
      v[j][l] = m < M && p < pieces ? __ldcg(s.stats + static_cast<size_t>(m) * pieces + p) : 0.f;
    }
  }
  bool over = false;
#pragma unroll
  for (int j = 0; j < kTokensPerWarp; ++j) {
    const int m = warp + kWarps * j;
    float t = 0.f;
#pragma unroll
    for (int l = 0; l < kStatLoads; ++l) {
      over |= v[j][l] < 0.f;
      t += v[j][l] < 0.f ? -1.f - v[j][l] : v[j][l];
    }
    if (m < M) {
      for (int p = lane + kWarpSize * kStatLoads; p < pieces; p += kWarpSize) {
        const float stat = __ldcg(s.stats + static_cast<size_t>(m) * pieces + p);
        over |= stat < 0.f;
        t += stat < 0.f ? -1.f - stat : stat;
      }
    }
    t = warp_sum(t);
    if (lane == 0 && m < M) r[m] = rsqrtf(t / static_cast<float>(K) + s.eps);
  }
  over = __any_sync(0xFFFFFFFFu, over);
  if (lane == 0) warp_over[warp] = over;
  __syncthreads();
  bool any_over = false;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) any_over |= warp_over[w] != 0;
  return any_over;
}

// The second part's x where g was too large: vLLM's normalized x, T(T(h * r) * weight), from h =
// s.residual [M, K], over a stage's copy of chunk c of g (tokens below M; the zeros past M stay),
// in the form the copy left x there: T, or the scaled fp16 of scale_x_once (kXScaled). The caller
// synchronizes before and after.
template <typename T, typename L, bool kXScaled>
__device__ __forceinline__ void sp_normed_x(const NormSplit& s, const float* r, unsigned char* stage, int c, int M,
                                            int K) {
  const uint4* h = static_cast<const uint4*>(s.residual);
  for (int u = threadIdx.x; u < M * kTcChunkUnits; u += kTcThreads) {
    const int m = u / kTcChunkUnits;
    const int col = c * kTcChunk + (u % kTcChunkUnits) * kWordWeights;
    const uint4 hv = __ldcg(h + (static_cast<size_t>(m) * K + col) / kWordWeights);
    const uint32_t hw[4] = {hv.x, hv.y, hv.z, hv.w};
    uint32_t out[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 hk = Act<T>::unpack(hw[k]);
      const float2 n = Act<T>::unpack(Act<T>::pack(hk.x * r[m], hk.y * r[m]));  // T(h * r)
      out[k] = Act<T>::pack(n.x * split_weight<T>(s, col + 2 * k), n.y * split_weight<T>(s, col + 2 * k + 1));
    }
    uint4 v = make_uint4(out[0], out[1], out[2], out[3]);
    if constexpr (kXScaled && kTcXScaleLog2<T> != 0) v = bf16_to_half_scaled<kTcXScaleLog2<T>>(v);
    *reinterpret_cast<uint4*>(stage + m * L::kXRowBytes + 16 * (u % kTcChunkUnits)) = v;
  }
}

// The end of tc_kernel and sp_kernel, once the pipeline is drained. A warp holds R row tiles of 16
// rows: rows 16 (R row_group + r) .. + 15 of the tile, for part `part` of each chunk's k-steps;
// acc[r][t][j] is row g + 8 * (j / 2) of row tile r, token 8t + 2q + j % 2 (g = lane / 4, q = lane
// % 4). All warps put their sums in shared memory; then every thread adds the P parts' sums of
// some outputs (in part order) and writes y, 64 consecutive rows of a token at a time, or with
// splits > 1 its split's fp32 partial, the last split of the tile to finish summing the partials in
// split order (so the result does not depend on the order the CTAs run in) and resetting its
// counter. All 256 threads take part: in an earlier version the warps of part 0 added the other
// parts' sums into their registers and wrote y alone, and with four parts (sp_kernel's two row
// tiles per warp) that left 3 of every 4 warps idle for the stores and the split sums. The shared
// version also made tc_kernel 1-3% faster from 4 to 16 tokens and 3-7% at 32 and 64 (three models'
// layers on the H200, benchmarks/results/gpu/kernels_groups_h200_finish_ab_*.json).
// sp_kernel's part of a split norm (kNorm, with norm): kFromStats scales each token's outputs by
// norm_r (unless null: g was too large, and x was normalized instead); kAddStats writes, instead
// of y, the new residual, g and a sum of h^2 per token and 32 rows (add_stats_output).
template <typename T, int R, int MT, int P, int kRows = kTcRows, int kNorm = kNormNone>
__device__ __forceinline__ void tc_finish(const float (&acc)[R][MT][4], unsigned char* smem, int tile, int split,
                                          int row_group, int part, int lane, T* __restrict__ y,
                                          float* __restrict__ workspace, int32_t* __restrict__ counters, int M,
                                          int N, int splits, const int2* __restrict__ places = nullptr,
                                          int n_out = -1, int gate_rows = 0, const NormSplit* norm = nullptr,
                                          const float* norm_r = nullptr) {
  constexpr int kTokens = 8 * MT;
  constexpr int kPitch = kRows + 4;  // kFinishBytes
  static_assert(kRows / (16 * R) * P * kWarpSize == kTcThreads, "every warp has one row group and one part");
  // The first part of a split norm: the residual and norm weight of each of this thread's outputs
  // (output i = threadIdx.x + k * kTcThreads, as below), loaded first so that their round trips
  // overlap the sums' exchange and the partials' loads. (Loaded output by output where they are
  // used, each round trip came after the one before.)
  constexpr int kNormOutputs = kNorm == kNormAddStats ? kRows * kTokens / kTcThreads : 1;
  float res_in[kNormOutputs] = {}, w_in[kNormOutputs] = {};
  if constexpr (kNorm == kNormAddStats) {
    const int tokens = M < kTokens ? M : kTokens;
#pragma unroll
    for (int k = 0; k < kNormOutputs; ++k) {
      const int i = threadIdx.x + k * kTcThreads;
      const int row = tile * kRows + i % kRows;
      const bool ok = i / kRows < tokens && row < N;
      const T* residual = static_cast<const T*>(norm->residual);
      res_in[k] = ok ? static_cast<float>(residual[static_cast<size_t>(i / kRows) * N + row]) : 0.f;
      w_in[k] = ok ? split_weight<T>(*norm, row) : 0.f;
    }
  }
  const int g = lane / 4;
  const int q = lane % 4;
  cp_async_wait<0>();
  __syncthreads();
  float* sums = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int t = 0; t < MT; ++t) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int tok = 8 * t + 2 * q + j % 2;
        const int row = 16 * (R * row_group + r) + g + 8 * (j / 2);
        sums[(part * kTokens + tok) * kPitch + row] = acc[r][t][j];
      }
    }
  }
  __syncthreads();
  if constexpr (kRows == kTcRows) {  // sp_kernel fuses SiLU-and-mul with 64-row tiles only
    if (gate_rows > 0) {
      silu_mul_finish<T, MT, P, kRows>(sums, tile, split, y, workspace, counters, M, N, splits, gate_rows, norm_r);
      return;
    }
  }

  constexpr float kOutScale = static_cast<float>(1 << kTcXScaleLog2<T>);
  // Each thread's outputs, a compile-time count so that the loops below unroll: output
  // threadIdx.x + k * kTcThreads is token i / kRows, row i % kRows of the tile.
  constexpr int kOutputs = kRows * kTokens / kTcThreads;
  static_assert(kOutputs * kTcThreads == kRows * kTokens, "the threads share the outputs evenly");
  const int tokens = M < kTokens ? M : kTokens;
  const int rows = N - tile * kRows < kRows ? N - tile * kRows : kRows;
  auto output_ok = [&](int i) { return i / kRows < tokens && i % kRows < rows; };
  auto output_at = [&](int i) { return static_cast<size_t>(i / kRows) * N + tile * kRows + i % kRows; };
  // Where output i goes in y: its row, or in the sliced layout its place's row (none for padding).
  auto y_at = [&](int i) -> ptrdiff_t {
    if (places == nullptr) return static_cast<ptrdiff_t>(output_at(i));
    const int r = __ldg(&places[tile * kRows + i % kRows].x);
    return r < 0 ? -1 : static_cast<ptrdiff_t>(i / kRows) * n_out + r;
  };
  // Output i's value from its fp32 sum: scaled back, and by the split norm's factor.
  auto value = [&](int i, float sum) {
    if constexpr (kNorm == kNormFromStats) {
      if (norm_r != nullptr) return sum * kOutScale * norm_r[i / kRows];
    }
    return sum * kOutScale;
  };
  // The first part of a split norm, for output i (ok: it exists) of the sum given: h = T(y) +
  // residual in fp32, as vLLM adds the layer's rounded output to the residual stream; the new
  // residual T(h) and g = T(h * weight) go out, and a warp's sum of h^2, which covers 32 rows of
  // one token (i / kRows is the same over a warp, the rows 32-aligned), goes to the token's stat
  // of those rows, -1 - the sum where g is too large (kSplitGLimit). Every lane must call it.
  auto add_stats_output = [&](int k, int i, bool ok, float sum) {
    const int tok = i / kRows;
    const int row = tile * kRows + i % kRows;
    float h = 0.f;
    bool over = false;
    if (ok) {
      const size_t at = static_cast<size_t>(tok) * N + row;
      h = static_cast<float>(Act<T>::from_float(sum * kOutScale)) + res_in[k];
      static_cast<T*>(norm->residual_out)[at] = Act<T>::from_float(h);
      const float g = static_cast<float>(Act<T>::from_float(h * w_in[k]));
      static_cast<T*>(norm->g)[at] = Act<T>::from_float(g);
      over = !(fabsf(g) <= kSplitGLimit);  // NaN too
    }
    const float h2 = warp_sum(h * h);
    over = __any_sync(0xFFFFFFFFu, over);
    const int first_row = row - lane;
    if (lane == 0 && tok < tokens && first_row < N) {
      norm->stats[static_cast<size_t>(tok) * norm->stats_pieces + first_row / kWarpSize] = over ? -1.f - h2 : h2;
    }
  };
  float* out = splits == 1 ? nullptr : workspace + static_cast<size_t>(split) * M * N;
#pragma unroll
  for (int k = 0; k < kOutputs; ++k) {
    const int i = threadIdx.x + k * kTcThreads;
    if constexpr (kNorm == kNormAddStats) {
      if (out == nullptr) {  // the whole warp, outputs or not
        float sum = 0.f;
#pragma unroll
        for (int p = 0; p < P; ++p) sum += output_ok(i) ? sums[(p * kTokens + i / kRows) * kPitch + i % kRows] : 0.f;
        add_stats_output(k, i, output_ok(i), sum);
        continue;
      }
    }
    if (!output_ok(i)) continue;
    float sum = 0.f;
#pragma unroll
    for (int p = 0; p < P; ++p) sum += sums[(p * kTokens + i / kRows) * kPitch + i % kRows];
    if (out == nullptr) {
      const ptrdiff_t at = y_at(i);
      if (at >= 0) y[at] = Act<T>::from_float(value(i, sum));
    } else {
      out[output_at(i)] = sum;
    }
  }
  if (splits == 1 || !last_split_arrives(counters, tile, splits)) return;
  // The partials come from L2, so each split's loads of all this thread's outputs go out together:
  // one round trip per split. A loop of one output at a time (its splits' loads, then the next
  // output's) made this CTA, the last of its tile and so at the end of the kernel, wait up to 16
  // round trips at 64 tokens: sp_kernel in 2 splits took 41.2 us on the Llama-2-7B q/k/v at 64
  // tokens with it and 34.6 without (two calls), and tc_kernel's decoder layers are 0-5% faster
  // from 8 to 64 tokens (csrc/README.md, "K splits of its own").
  float total[kOutputs];
#pragma unroll
  for (int k = 0; k < kOutputs; ++k) total[k] = 0.f;
  for (int sp = 0; sp < splits; ++sp) {
    const float* partial = workspace + static_cast<size_t>(sp) * M * N;
#pragma unroll
    for (int k = 0; k < kOutputs; ++k) {
      const int i = threadIdx.x + k * kTcThreads;
      if (output_ok(i)) total[k] += __ldcg(partial + output_at(i));
    }
  }
#pragma unroll
  for (int k = 0; k < kOutputs; ++k) {
    const int i = threadIdx.x + k * kTcThreads;
    if constexpr (kNorm == kNormAddStats) {
      add_stats_output(k, i, output_ok(i), total[k]);
    } else {
      const ptrdiff_t at = output_ok(i) ? y_at(i) : -1;
      if (at >= 0) y[at] = Act<T>::from_float(value(i, total[k]));
    }
  }
  if (threadIdx.x == 0) counters[tile] = 0;
}

// One row's part of an mma A fragment (m16n8k16, row-major A): lane (g, q) holds row g's weights
// k = 2q, 2q + 1 (lo) and 2q + 8, 2q + 9 (hi) of a 16-weight slot, as fp16 pairs s * (q - z).
// w is the slot's two code words (weights 0-7 and 8-15, weight i in bits 4i..4i+3 of its word) and
// sel = q | (q + 4) << 4 | q << 8 | (q + 4) << 12, so PRMT gives the bytes (w.x[q], w.y[q], w.x[q],
// w.y[q]): byte q of a word holds weights 2q (low nibble) and 2q + 1 (high nibble). One LOP3 puts
// weight 2q into bits 0-3 of fp16 1024 and weight 2q + 1 into bits 4-7 of the other half (1024 +
// 16q'), and one HFMA2 with (1, 1/16) and (-(1024 + z), -(64 + z)) leaves the exact pair q - z;
// the same after a shift by 8 for weights 2q + 8, 2q + 9. One HMUL2 by the scale rounds once, as
// the reference does.
__device__ __forceinline__ void tc_a_pair(uint2 w, uint32_t meta, uint32_t sel, uint32_t& lo, uint32_t& hi) {
  const uint32_t p = __byte_perm(w.x, w.y, sel);
  const uint32_t z = (meta >> kZeroShift) & kNibbleMask;
  // (-(1024 + z), -(64 + z)): z into bits 0-3 and 20-23 in one IMAD (the fields do not overlap).
  const __half2 neg = as_half2(z * 0x100001u + 0xD400E400u);
  const __half2 one_sixteenth = as_half2(0x2C003C00u);  // (1, 1/16)
  const __half2 scale = __low2half2(as_half2(meta));
  lo = half2_bits(__hmul2(__hfma2(as_half2(lop3<kLutAndOr>(p, 0x00F0000Fu, kHalf2Magic)), one_sixteenth, neg), scale));
  hi = half2_bits(
      __hmul2(__hfma2(as_half2(lop3<kLutAndOr>(p >> 8, 0x00F0000Fu, kHalf2Magic)), one_sixteenth, neg), scale));
}

// y[M, N] = x[M, K] @ W.T for M <= 8 * MT, on tensor cores. CTA (tile, split) computes rows
// tile * kTcRows .. + kTcRows - 1 over chunks [split * C / splits, (split + 1) * C / splits) of the
// C = num_chunks chunks: ceil(K / kTcChunk) chunks of input channels, or with xcols (compact
// tiles, whose rows all keep the same group columns) chunks of the tile's kept group columns,
// which halves the work of a tile at 50% sparsity. Per chunk:
//   * cp.async copies, kStages - 1 chunks ahead (issued halfway through the previous chunk's
//     math), each row's kept groups of the chunk to their dense places (the chunk table gives
//     where the row's groups of the chunk start and which columns they are), zero meta for pruned
//     columns, and the chunk of x (zeros past M tokens or K channels); bf16 x is then converted in
//     place to scaled fp16, unless tc_scale_x_kernel already did so for the whole launch (kXScaled);
//   * each warp builds the mma A fragments of its 16 rows directly in registers from the codes
//     and meta (tc_a_pair: no dense copy of W, no shared-memory round trip), loads x with
//     ldmatrix, and multiplies with mma.m16n8k16, accumulating in fp32.
// Outside compact tiles, pruned columns cost a multiply by zeros on the tensor cores, which have
// room to spare here; the kernel's time goes to the per-slot instructions of tc_a_pair and the
// copies, so walking only kept columns (compact tiles) is what halves it.
// With splits > 1 every split stores its fp32 partial in the workspace, and the last split of a
// tile to finish (counted in counters[tile], which it resets to 0) sums them in split order and
// writes y: the result does not depend on the order the CTAs run in.
// kCompact: the layer has compact tiles (xcols), so the x copy gathers group columns; ordinary
// layers get an instance without that branch and its loads.
// Registers: for MT <= 2 the launch bound asks for as many CTAs per SM as shared memory allows
// (4 on Hopper). Unbounded, ptxas gave MT = 2 68 registers, room for only 3 CTAs, and Llama-3-8B's
// gate/up (448 tiles) no longer fit one wave on 132 SMs: 56-57 us at 16 tokens instead of 49-50.
// Bounded, MT = 2 keeps three values in local memory (L1), most other layers ran 1-4% slower than
// unbounded and Qwen2.5-7B's gate/up (592 tiles, two waves either way) 71-72 us instead of 60-65;
// MT = 1 uses 64 registers instead of 50 and ran 1-5% faster at 4 and 8 tokens
// (benchmarks/results/gpu/kernels_h200_tc_trim_*.json). MT = 4 and 8 are left unbounded (0):
// shared memory already allows only 3 and 2 CTAs, and a bound made ptxas spill.
template <typename T, int G, int MT, bool kXScaled, bool kCompact>
__global__ void __launch_bounds__(kTcThreads, (MT <= 2 ? TcLayout<G, MT>::kMinCtas : 0))
    tc_kernel(const T* __restrict__ x, const int32_t* __restrict__ row_ptr, const int2* __restrict__ places,
              const int32_t* __restrict__ codes, const int32_t* __restrict__ meta, const int32_t* __restrict__ chunks,
              const int32_t* __restrict__ xcols, int num_chunks, T* __restrict__ y,
              float* __restrict__ workspace, int32_t* __restrict__ counters, int M, int N, int n_out, int K,
              int splits) {
  using L = TcLayout<G, MT>;
  constexpr int kWordsPerGroup = G / kWordWeights;
  constexpr int kSlotsPerGroup = G / 16;
  constexpr int kCopyBytes = G == 16 ? 8 : 16;           // a group's codes are 8 (G = 16) or 16k bytes
  constexpr int kRowCopies = kTcChunk / 2 / kCopyBytes;  // copies of one whole chunk row of codes
  constexpr int kCopiesPerGroup = G / 2 / kCopyBytes;
  // kXScaled: x already holds the scaled fp16 values (tc_scale_x_kernel); its bytes are copied as
  // they are, and only y is written as T.
  constexpr bool kConvertX = kTcXScaleLog2<T> != 0 && !kXScaled;
  extern __shared__ __align__(16) unsigned char tc_smem[];

  const int tile = blockIdx.x;
  const int split = blockIdx.y;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int row_group = warp % kTcRowGroups;
  const int half = warp / kTcRowGroups;
  const int c_begin = split * num_chunks / splits;
  const int n_local = (split + 1) * num_chunks / splits - c_begin;

  // Copies: kTcCopyThreads neighbouring threads per row of the tile. In the sliced layout
  // (places given) the tile's rows are 64 places in the layout's order, so its copies read whole
  // steps; place p holds row places[p].x (-1: padding) from slot places[p].y.
  const int copy_row = threadIdx.x / kTcCopyThreads;
  const int copy_part = threadIdx.x % kTcCopyThreads;
  const int grow = tile * kTcRows + copy_row;
  int row = grow;
  int row_first = 0;
  if (places != nullptr) {
    const int2 pl = grow < N ? __ldg(places + grow) : make_int2(-1, 0);
    row = pl.x;
    row_first = pl.y;
  } else if (grow < N) {
    row_first = __ldg(row_ptr + grow);
  }
  const bool row_ok = grow < N && row >= 0;
  const int extra = places != nullptr ? kSlotsPerStep - kStepGroups : 0;  // as in dequant_kernel
  const int32_t* row_entries = chunks + static_cast<size_t>(row_ok ? row : 0) * num_chunks + c_begin;

  auto x_stage = [&](int s) { return tc_smem + s * L::kStageBytes; };
  auto code_stage = [&](int s) { return tc_smem + s * L::kStageBytes + L::kXBytes; };
  auto meta_stage = [&](int s) {
    return reinterpret_cast<int32_t*>(tc_smem + s * L::kStageBytes + L::kXBytes + L::kCodeBytes);
  };
  auto entry_stage = [&](int s) {
    return reinterpret_cast<int32_t*>(tc_smem + s * L::kStageBytes + L::kXBytes + L::kCodeBytes + L::kMetaBytes);
  };

  // What a thread copies is the same for every chunk but for the chunk's offset, so the copies'
  // shared-memory addresses and x offsets are computed once here: recomputed per chunk, they cost
  // as many instructions as the chunk's mma k-steps.
  // Codes and meta: this thread's copies of its row are copy_part + kTcCopyThreads * j.
  constexpr int kRowCopiesPerThread = kRowCopies / kTcCopyThreads;
  static_assert(kRowCopies % kTcCopyThreads == 0, "every thread makes the same number of copies");
  const uint32_t stage0 = smem_addr(tc_smem);
  uint32_t entry_dst = stage0 + L::kXBytes + L::kCodeBytes + L::kMetaBytes + 4 * copy_row;
  uint32_t meta_dst = stage0 + L::kXBytes + L::kCodeBytes + 4 * copy_row * L::kMetaStride + 4 * (copy_part / kCopiesPerGroup);
  uint32_t code_dst[kRowCopiesPerThread];
  // Copy j of this thread is of group column col0 + j * kColStep; col_bit[j] is its bit in a chunk
  // table mask, computed once like the addresses.
  static_assert(kTcCopyThreads % kCopiesPerGroup == 0, "a thread's copies start at the same part of a group");
  constexpr int kColStep = kTcCopyThreads / kCopiesPerGroup;
  const int col0 = copy_part / kCopiesPerGroup;
  const bool copies_meta = copy_part % kCopiesPerGroup == 0;  // the first copy of a group brings its meta
  uint32_t col_bit[kRowCopiesPerThread];
#pragma unroll
  for (int j = 0; j < kRowCopiesPerThread; ++j) {
    const int u = copy_part + kTcCopyThreads * j;
    code_dst[j] = stage0 + L::kXBytes + copy_row * L::kCodeRowBytes + u * kCopyBytes;
    col_bit[j] = 1u << (col0 + j * kColStep);
  }
  XCopies<T, L> xc(x, stage0, M, K);
  // Compact tiles (xcols given): chunk slot j holds group column xcols[tile, chunk, j] of x, and
  // this thread copies unit xc.cu % kUnitsPerGroup of slot xc.cu / kUnitsPerGroup. Its column for
  // the chunk it copies next is loaded one chunk ahead, so no copy waits on that load.
  constexpr int kUnitsPerGroup = G / kWordWeights;
  const T* x_gather = x + static_cast<size_t>(xc.tok < M ? xc.tok : 0) * K + (xc.cu % kUnitsPerGroup) * kWordWeights;
  const int32_t* xcol_src =
      kCompact ? xcols + (static_cast<size_t>(tile) * num_chunks + c_begin) * L::kCols + xc.cu / kUnitsPerGroup : nullptr;
  int xcol = kCompact && n_local > 0 ? __ldg(xcol_src) : -1;

  // Copies chunk i into stage s, given this row's chunk table entry for it. The entry of chunk
  // i + kStages - 1 travels with it: it is what the loop needs when this stage is consumed, so no
  // iteration waits for a global load of its own (a chunk's math is shorter than a DRAM round trip).
  auto issue = [&](int i, int s, int entry) {
    const uint32_t mask = static_cast<uint32_t>(entry) & 0xFFFFu;
    const int first = static_cast<int>(static_cast<uint32_t>(entry) >> 16);  // in the row
    const int ahead = i + L::kStages - 1;
    const uint32_t stage = static_cast<uint32_t>(s * L::kStageBytes);
    if (copy_part == 0) {
      const bool ok = row_ok && ahead < n_local;  // a zero-size copy reads nothing, from a valid address
      cp_async4_zfill(entry_dst + stage, ok ? row_entries + ahead : chunks, ok);
    }
#pragma unroll
    for (int j = 0; j < kRowCopiesPerThread; ++j) {
      const bool kept = mask & col_bit[j];
      const int nth = first + __popc(mask & (col_bit[j] - 1u));  // the row's nth group, if kept
      const int group = row_first + nth + (nth / kStepGroups) * extra;
      if (kept) {
        cp_async<kCopyBytes>(code_dst[j] + stage, codes + static_cast<size_t>(group) * kWordsPerGroup +
                                                      (copy_part % kCopiesPerGroup) * (kCopyBytes / 4));
      }
      if (copies_meta) cp_async4_zfill(meta_dst + stage + 4 * kColStep * j, meta + (kept ? group : 0), kept);
    }
    // x: the chunk's channels, or on compact tiles the group columns of the chunk's slots.
    const T* src;
    bool ch_ok;
    if constexpr (kCompact) {
      src = x_gather + xcol * G;
      ch_ok = xcol >= 0;
      xcol = i + 1 < n_local ? __ldg(xcol_src + (i + 1) * L::kCols) : -1;
    } else {
      src = xc.src + (c_begin + i) * kTcChunk;
      ch_ok = (c_begin + i) * kTcChunk + xc.cu * kWordWeights < K;
    }
    xc.issue(stage, src, ch_ok, x, K);
  };

  // Prologue: the chunk table entries of the first kStages - 1 chunks in one round trip, then
  // their copies. One commit group per chunk, empty ones included, so that wait_group counts
  // chunks.
  {
    int e[L::kStages - 1];
#pragma unroll
    for (int i = 0; i < L::kStages - 1; ++i) e[i] = row_ok && i < n_local ? __ldg(row_entries + i) : 0;
#pragma unroll
    for (int i = 0; i < L::kStages - 1; ++i) {
      if (i < n_local) issue(i, i, e[i]);
      cp_async_commit();
    }
  }

  // This lane's rows of the warp's 16 (g and g + 8) and PRMT selector (see tc_a_pair).
  const int g = lane / 4;
  const int q = lane % 4;
  const int row_a = row_group * 16 + g;
  uint32_t sel = q | (q + 4) << 4 | q << 8 | (q + 4) << 12;
  // Offsets in a stage for this lane's first k-step (slot half * kTcHalfSlots): its rows' codes and
  // meta, and the x row whose address it gives ldmatrix (lane l gives row l % 8 of 8x8 matrix
  // l / 8; the matrices are the k-step's two 8-channel halves, for tokens 0-7 and, with MT > 1,
  // 8-15; 16-token group p is 16 * p rows further on).
  static_assert(kTcHalfSlots % kSlotsPerGroup == 0, "a half starts at a group column");
  int code_off = row_a * L::kCodeRowBytes + 8 * half * kTcHalfSlots;
  int meta_off = row_a * L::kMetaStride + half * kTcHalfSlots / kSlotsPerGroup;
  const int mi = lane / 8;
  int x_off = (MT == 1 ? lane % 8 : (mi >> 1) * 8 + lane % 8) * L::kXRowBytes + 16 * (2 * half * kTcHalfSlots + (mi & 1));
  float acc[MT][4];
#pragma unroll
  for (int t = 0; t < MT; ++t) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[t][j] = 0.f;
  }

  // Chunk i, in stage `stage`: a StageTag (see the loop below) or an int.
  auto chunk = [&](int i, auto stage) {
    constexpr bool kStaticStage = kIsStageTag<decltype(stage)>;
    const int s = stage_of(stage);
    if constexpr (kStaticStage) {
      // This thread's selector, offsets and copy addresses stay in registers across chunks: left
      // to itself the compiler recomputes them from the thread index at every chunk.
      keep_in_register(sel);
      keep_in_register(code_off);
      keep_in_register(meta_off);
      keep_in_register(x_off);
#pragma unroll
      for (int j = 0; j < kRowCopiesPerThread; ++j) {
        keep_in_register(code_dst[j]);
        keep_in_register(col_bit[j]);
      }
      keep_in_register(meta_dst);
      keep_in_register(entry_dst);
      keep_in_register(xc.dst);
      keep_in_register(xc.src);
      keep_in_register(row_entries);
      keep_in_register(row_first);
    }
    cp_async_wait<L::kStages - 2>();  // this thread's copies of chunk i have landed
    __syncthreads();                  // and everyone's; chunk i - 1's stage is free
    if constexpr (kConvertX) {
      for (int u = threadIdx.x; u < L::kTokens * kTcChunkUnits; u += kTcThreads) {
        uint4* v = reinterpret_cast<uint4*>(x_stage(s) + (u / kTcChunkUnits) * L::kXRowBytes) + u % kTcChunkUnits;
        *v = bf16_to_half_scaled<kTcXScaleLog2<T>>(*v);
      }
      __syncthreads();
    }
    const int next = i + L::kStages - 1;
    const int next_entry = entry_stage(s)[copy_row];

    const unsigned char* code_a = code_stage(s) + code_off;
    const unsigned char* code_b = code_a + 8 * L::kCodeRowBytes;
    const int32_t* meta_a = meta_stage(s) + meta_off;
    const int32_t* meta_b = meta_a + 8 * L::kMetaStride;
    const unsigned char* xs = x_stage(s) + x_off;
#pragma unroll
    for (int kk = 0; kk < kTcHalfSlots; ++kk) {
      // The next chunk's copies go out halfway through this chunk's k-steps rather than before
      // them: issued all at once, the copies of every warp queue up behind each other (Nsight
      // Compute: more MIO-throttle stalls); spread among the k-steps they overlap the math, and
      // half a chunk of math still covers their latency. On the H200, this and the copy addresses
      // computed once took one Llama-2-7B layer at 8, 16 and 32 tokens from 121.1, 162.9 and
      // 202.2 us to 112.3, 157.0 and 188.5 (benchmarks/results/gpu/kernels_llama2-7b_h200_tc_*.json).
      // Once the k-steps were shorter, issuing them at k-step 0 instead was no faster (106.6, 124.3
      // and 182.1 us against 105.3, 125.4 and 176.9; kernels_llama2-7b_h200_tc_pipeline_experiment_*.json).
      if (kk == kTcHalfSlots / 2) {
        if (next < n_local) issue(next, (s + L::kStages - 1) % L::kStages, next_entry);  // next's stage
        cp_async_commit();
      }
      // k-step kk of this warp's half: 8 bytes of codes and 32 of x further on per k-step.
      uint32_t a[4];
      const int col = kk / kSlotsPerGroup;
      tc_a_pair(*reinterpret_cast<const uint2*>(code_a + 8 * kk), static_cast<uint32_t>(meta_a[col]), sel, a[0], a[2]);
      tc_a_pair(*reinterpret_cast<const uint2*>(code_b + 8 * kk), static_cast<uint32_t>(meta_b[col]), sel, a[1], a[3]);
      if constexpr (MT == 1) {
        uint32_t b[2];
        ldmatrix_x2(b, xs + 32 * kk);
        mma_16816(acc[0], a, b[0], b[1]);
      } else {
#pragma unroll
        for (int p = 0; p < MT / 2; ++p) {
          uint32_t b[4];
          ldmatrix_x4(b, xs + 32 * kk + 16 * p * L::kXRowBytes);
          mma_16816(acc[2 * p], a, b[0], b[1]);
          mma_16816(acc[2 * p + 1], a, b[2], b[3]);
        }
      }
    }
  };
  // Up to 32 tokens the loop takes two chunks per iteration, so that each chunk's stage is a
  // compile-time constant and every shared-memory address is the thread's base plus an immediate
  // (with the stage a loop variable the compiler recomputes them, and this thread's offsets, at
  // every chunk). That cut the main loop of the 8, 16 and 32-token instances from 445, 465 and 495
  // SASS instructions per chunk to 364, 378 and 438. One Llama-2-7B layer on an H200 went from
  // 100.0 / 112.6 / 139.8 us to 92.9 / 105.8 / 132.3 at 8 / 16 / 32 tokens, 0.66x / 0.64x / 0.60x
  // Marlin to 0.69x / 0.66x / 0.63x (Marlin timed in each call; benchmarks/results/gpu/
  // kernels_llama2-7b_h200_tc_static_stages.json against kernels_llama2-7b_h200_tc_stages2_experiment_r1.json).
  // At 64 tokens it cut 533 instructions to 453 but ran slower, 214.7 against 205.2 us (106
  // registers instead of 79), so 64 tokens keep the one-chunk loop.
  static_assert(L::kStages == 2, "the two-chunk loop alternates two stages");
  if constexpr (MT <= 4) {
    for (int i = 0; i < n_local; i += 2) {
      chunk(i, StageTag<0>{});
      if (i + 1 < n_local) chunk(i + 1, StageTag<1>{});
    }
  } else {
    for (int i = 0; i < n_local; ++i) chunk(i, i % L::kStages);
  }

  tc_finish<T, 1, MT, kTcHalves>(reinterpret_cast<float(&)[1][MT][4]>(acc), tc_smem, tile, split, row_group, half, lane, y,
                                 workspace, counters, M, N, splits, places, n_out);
}

// ---------------------------------------------------------------------------------------------
// Sparse-tensor-core kernel for layers in the pair pattern (M = 2..64 tokens per launch)
//
// A layer converted with --pattern pairs keeps, in every row, exactly one group of each aligned
// pair of 16-channel group columns (2j, 2j + 1), so row r's j-th kept group is in pair j and lies
// at r * K / 32 + j (row_ptr[r] = r * K / 32; the kernel reads no row pointers). Taking the 32
// channels of a pair as the k of mma.sp.m16n8k32 in the order
//   a0 a1 b0 b1 | a8 a9 b8 b9 | a2 a3 b2 b3 | a10 a11 b10 b11 | ...   (a = group 2j, b = 2j + 1)
// puts exactly two of a row's kept weights in every 4 k, which is the 2:4 sparsity that mma.sp
// multiplies at the cost of a dense mma of half the size: the A operand is each row's kept group,
// built by tc_a_pair from its codes (with the byte selector sp_a_sel), and the metadata says per
// row which half of each 4 it is (indices 0, 1 for a kept a, 2, 3 for a kept b). Only kept weights
// are dequantized and fed to the tensor cores, where the dense tensor-core kernel feeds every
// 16-weight slot of its tiles. The order is chosen so that x needs no reordering: each lane's B
// fragment is 8 consecutive channels (sp_x_offset). The rest is tc_kernel's: 64 rows and a range
// of 256-channel chunks per CTA (a warp takes 16 or 32 of the rows, kSpRowTiles), cp.async stages
// (SpLayout::kStages), K splits summed in split order by the last CTA of a tile.

// Shared memory of sp_kernel, per stage: x, then each row's 8 groups of the chunk (codes, meta).
// kPacked: the 9-16 token instance with one stage less and a register cap that fit 4 CTAs on an
// SM instead of 3 (sp_packed below).
template <int MT, int kRows = kTcRows, bool kPacked = false>
struct SpLayout {
  static constexpr int kTokens = 8 * MT;
  static constexpr int kPairs = kTcChunk / 32;  // pairs of group columns in a chunk (8)
  // x sits in its own channel order. A lane reads its B fragment for one pair and 8 tokens as one
  // 16-byte load (sp_x_offset): the 8 lanes of one phase read 64 bytes of two tokens, so a row
  // pitch of 64 mod 128 bytes puts them in different banks.
  static constexpr int kXRowBytes = kTcChunk * 2 + 64;
  static constexpr int kXBytes = kTokens * kXRowBytes;
  // A warp reads one group's 8 code bytes of 8 rows at once: 80 bytes apart, they fall in 8
  // different 8-byte bank pairs (and rows stay 16-byte aligned for 16-byte copies). Meta: 16 bytes
  // of 4 pairs per row, 48 bytes apart, also conflict-free over 8 rows.
  static constexpr int kCodeRowBytes = kPairs * 8 + 16;
  static constexpr int kCodeBytes = kRows * kCodeRowBytes;
  static constexpr int kMetaRowBytes = kPairs * 4 + 16;
  static constexpr int kMetaBytes = kRows * kMetaRowBytes;
  static constexpr int kStageBytes = kXBytes + kCodeBytes + kMetaBytes;
  // A chunk's math is short here (8 k-steps of pairs, only kept weights), too short to cover a
  // DRAM round trip, so copies go out kStages - 1 chunks ahead. One Llama-2-7B layer on the H200 at
  // 4 / 8 / 16 / 32 / 64 tokens: 69.3 / 70.9 / 79.5 / 112.7 / 186.8 us with 2 stages, 59.4 / 60.6 /
  // 76.2 / 109.2 with 4, 57.1 / 59.2 / 77.0 / 116.1 / 239.6 with 3 (64 tokens: one CTA per SM);
  // benchmarks/results/gpu/kernels_pairs_h200_stages_{2,4,3}.json (measured with x in 4-byte copies).
  static constexpr int kStages = kPacked ? 3 : MT <= 4 ? 4 : 2;
  static constexpr int kBytes = kStages * kStageBytes;
  static_assert(!kPacked || MT == 2, "only the 9-16 token instance is packed");
  static_assert(kStageBytes % 16 == 0, "stages stay 16-byte aligned");
};

// The order of k in mma.sp.m16n8k32 is ours to choose, as long as A and B agree and every 4
// consecutive k hold two of group a's channels and two of group b's. Lane q of a quad holds B's
// k = 2q + {0, 1} + {0, 8, 16, 24} (b0..b7). Mapping them to 8 consecutive channels, a[0..7],
// b[0..7], a[8..15], b[8..15] for q = 0..3, makes each lane's B fragment one 16-byte load of x as
// it is (byte offset sp_x_offset(q) in the pair's 64 bytes), and puts group a's channels at
// indices 0, 1 and group b's at 2, 3 of every 4 k. The compressed A column c (2 per 4 k) is then
// channel 8 (i & 1) + 2 (i >> 1) + (c & 1), i = c >> 1, of the row's kept group: lane q's lo pair
// (c = 2q, 2q + 1) is channels 8 (q & 1) + 2 (q >> 1) + {0, 1}, its hi pair (c + 8) the same + 4,
// bytes q >> 1 and (q >> 1) + 2 of code word q & 1 (sp_a_sel).
__host__ __device__ constexpr int sp_x_offset(int q) { return 16 * ((q >> 1) | ((q & 1) << 1)); }
__host__ __device__ constexpr uint32_t sp_a_sel(int q) {
  return static_cast<uint32_t>((4 * (q & 1) + (q >> 1)) * 0x0101 + (4 * (q & 1) + (q >> 1) + 2) * 0x1010);
}

// d += a (16 x 32 with 2:4 sparsity, given as its 16 x 16 kept values and metadata e) * b (32 x 8).
__device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4], const uint4& b, uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y), "r"(b.z), "r"(b.w), "r"(e));
}

// mma.sp metadata of rows g (meta_a) and g + 8 (meta_b) for one pair: per 4-channel chunk two
// 2-bit indices, 0b0100 (indices 0, 1) when the row keeps group a (an even column) and 0b1110
// (2, 3) when it keeps b. With sparsity selector 0, threads 0 and 1 of each quad supply it, row
// g's chunks in bits 0-15 and row g + 8's in bits 16-31 (thread 0 for the pair's chunks 0-3,
// thread 1 for 4-7); every chunk of a row says the same, so every lane computes the same word. (The
// other reading, thread 0 holding row g's 8 chunks and thread 1 row g + 8's, gave relative errors
// of 0.7 on the H200, this one 3e-4.) The word is 0x44 | (0xAA where the row keeps b) in every byte:
// a shift takes each row's column parity (bit kColShift) to bit 31, the sign of byte 3, which PRMT's
// sign mode (selector nibble 8 + byte) repeats over whole bytes, and one LOP3 makes the pattern; four
// instructions where the multiply form (0x44444444 + parity * 0xAAAA + ...) compiled to six.
__device__ __forceinline__ uint32_t sp_metadata(uint32_t meta_a, uint32_t meta_b) {
  uint32_t keeps_b;  // 0xFF in bytes 0-1 when row g keeps b, in bytes 2-3 when row g + 8 does
  asm("prmt.b32 %0, %1, %2, 0xFFBB;" : "=r"(keeps_b) : "r"(meta_a << (31 - kColShift)), "r"(meta_b << (31 - kColShift)));
  return lop3<kLutAndOr>(keeps_b, 0xAAAAAAAAu, 0x44444444u);
}

// Registers per thread: what leaves room for the CTAs that shared memory allows per SM on Hopper
// (4 of 256 threads at 8 tokens, 3 at 16, 2 above). Left to itself, ptxas (CUDA 13.0) gave MT = 4
// 64 registers and 96 bytes of spill loads per thread, and MT = 8 80 registers and 24 bytes; with
// these caps nothing spills.
// The packed instance is capped at 64, which with its 3 stages fits 4 CTAs on an SM.
template <int MT, bool kPacked = false>
constexpr int kSpMaxRegisters = MT == 1 || kPacked ? 64 : MT == 2 ? 80 : 128;
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ * 100 + __CUDACC_VER_MINOR__ >= 1204)
#define GQSA_MAXNREG(n) __maxnreg__(n)
#else
#define GQSA_MAXNREG(n)
#endif

// Row tiles of 16 rows per warp. Every warp reads its B fragments (x) from shared memory once per
// pair and token tile and uses them for each of its row tiles. With one row tile the 4 warps that
// cover a CTA's 64 rows read the same x four times, and at 64 tokens those reads are most of the
// shared-memory traffic (128 KB per chunk against 32 KB of x copies and 8 KB of codes and meta;
// Nsight Compute: the shared-memory pipe 68% busy, "MIO throttle" the largest stall). Two row tiles
// halve them, and the warps split a chunk's 8 pairs four ways instead of two. One Llama-2-7B layer
// on the H200 at 16 / 32 / 64 tokens, same call: 63.9 / 95.4 / 155.9 us with one row tile, 61.0 /
// 85.8 / 127.5 with two (Llama-3-8B and Qwen2.5-7B 7-9% / 12-14% / 22-23% faster); 8 tokens keep
// one row tile (two were not measured there; benchmarks/results/gpu/
// kernels_pairs_h200_row_tiles_ab_*.json). It needed tc_finish's shared sums: with the earlier
// finish, where part 0's warps summed the other parts and wrote y alone, layers with K splits ran
// up to 44% slower (kernels_pairs_h200_row_tiles_old_finish_experiment.{json,patch}).
template <int MT>
constexpr int kSpRowTiles = MT >= 2 ? 2 : 1;

// w = the n consecutive words at p (a row's meta for a warp's pairs of a chunk: 4 with one row
// tile, 2 with two), in one load.
template <int n>
__device__ __forceinline__ void load_words(const unsigned char* p, uint32_t (&w)[n]) {
  static_assert(n == 1 || n == 2 || n == 4, "1, 2 or 4 words");
  if constexpr (n == 1) {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else if constexpr (n == 4) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x, w[1] = v.y;
  }
}

// y[M, N] = x[M, K] @ W.T for M <= 8 * MT and a layer in the pair pattern (K % 32 == 0, G = 16):
// CTA (tile, split) computes rows tile * kTcRows .. + kTcRows - 1 over its range of the
// ceil(K / kTcChunk) chunks; splits as in tc_kernel. With gate_rows > 0 (64-row tiles) W is a
// gate/up layer, gate's rows then up's, and y [M, gate_rows] = silu(gate) * up (silu_mul_finish):
// the tile's first 32 rows are gate rows tile * 32 .., the others the up rows of the same outputs.
// kFull: K is a multiple of kTcChunk, so every chunk is whole and each row's groups of a chunk start
// at an even group (16-byte codes) and a multiple of 4 (16-byte meta): the copies are 16 bytes.
// kLines (with kFull): those copies ask L2 for whole 128-byte lines (sp_l2_lines).
// kNorm (with kFull, at most 32 tokens): a part of a split norm, norm (NormSplit). The second
// part's x is g; its CTAs sum the first part's stats while their first copies are in flight.
template <typename T, int MT, bool kXScaled, bool kFull, bool kLines, int kRows = kTcRows, bool kPacked = false,
          int kNorm = kNormNone>
__global__ void __launch_bounds__(kTcThreads) GQSA_MAXNREG((kSpMaxRegisters<MT, kPacked>))
    sp_kernel(const T* __restrict__ x, const int32_t* __restrict__ codes,
              const int32_t* __restrict__ meta, int num_chunks, T* __restrict__ y, float* __restrict__ workspace,
              int32_t* __restrict__ counters, int M, int N, int K, int splits, int gate_rows, const NormSplit norm) {
  using L = SpLayout<MT, kRows, kPacked>;
  static_assert(kRows == kTcRows || kFull, "narrow tiles copy whole 16-byte units only");
  static_assert(kNorm == kNormNone || (kFull && MT <= 4), "the split norm takes whole chunks and 32 tokens at most");
  constexpr bool kConvertX = kTcXScaleLog2<T> != 0 && !kXScaled;
  // Warp w multiplies rows 16 R (w % kRowGroups) .. + 16 R - 1 of the tile over part w / kRowGroups
  // of each chunk's pairs (kPartPairs of them).
  constexpr int R = kSpRowTiles<MT>;
  constexpr int kRowGroups = kRows / (16 * R);
  constexpr int kParts = kTcThreads / kWarpSize / kRowGroups;
  constexpr int kPartPairs = L::kPairs / kParts;
  static_assert(kPartPairs * kParts == L::kPairs, "the parts split a chunk's pairs");
  static_assert(kFinishBytes<MT, kParts, kRows> <= L::kBytes, "tc_finish's sums fit in shared memory");
  extern __shared__ __align__(16) unsigned char sp_smem[];

  const int tile = blockIdx.x;
  const int split = blockIdx.y;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int row_group = warp % kRowGroups;
  const int part = warp / kRowGroups;
  const int c_begin = split * num_chunks / splits;
  const int n_local = (split + 1) * num_chunks / splits - c_begin;
  const int pairs = K / 32;  // kept groups per row
  const uint32_t stage0 = smem_addr(sp_smem);

  // Codes: 4 threads per row, each copying groups 2 * part and 2 * part + 1 of the chunk. Meta: the
  // same, or with kFull 2 threads per row (the first 128 threads), 4 groups each.
  // The tile's row r: W's row tile * kRows + r, or with gate_rows the gate row tile * kRows / 2 + r
  // for r < kRows / 2 and its up row (gate_rows further) for the others. (Narrow tiles never fuse
  // SiLU-and-mul: a constant 0 there keeps their registers as they were.)
  const int gate = kRows == kTcRows ? gate_rows : 0;
  auto w_row = [&](int r) {
    return gate > 0 ? tile * (kRows / 2) + r % (kRows / 2) + (r < kRows / 2 ? 0 : gate) : tile * kRows + r;
  };
  auto w_row_ok = [&](int r) { return gate > 0 ? tile * (kRows / 2) + r % (kRows / 2) < gate : tile * kRows + r < N; };
  const int copy_row = threadIdx.x / 4;
  const int copy_part = threadIdx.x % 4;
  const int grow = w_row(copy_row);
  const bool row_ok = w_row_ok(copy_row);
  // Row n's groups start at n * pairs (the pair pattern), so no row pointer is read before the first
  // copies: a dependent load that cost every launch a memory round trip.
  const int32_t* code_src = codes + 2 * (row_ok ? static_cast<size_t>(grow) * pairs + 2 * copy_part : 0);
  uint32_t code_dst = stage0 + L::kXBytes + copy_row * L::kCodeRowBytes + 16 * copy_part;
  const int meta_row = kFull ? threadIdx.x / 2 : copy_row;
  const int meta_part = kFull ? threadIdx.x % 2 : copy_part;
  constexpr int kMetaGroups = kFull ? 4 : 2;  // per copying thread
  const bool meta_ok = kFull ? threadIdx.x < 2 * kRows && w_row_ok(meta_row) : row_ok;
  const int32_t* meta_src =
      meta + (meta_ok ? static_cast<size_t>(w_row(meta_row)) * pairs + kMetaGroups * meta_part : 0);
  uint32_t meta_dst = stage0 + L::kXBytes + L::kCodeBytes + meta_row * L::kMetaRowBytes + 4 * kMetaGroups * meta_part;
  const int first_pair = 2 * copy_part;  // of the chunk, this thread's first (non-kFull bounds)
  XCopies<T, L> xc(x, stage0, M, K);

  // Copies chunk c_begin + i into stage s; pairs past K get zero meta (scale 0) and no codes.
  auto issue = [&](int i, int s) {
    const uint32_t stage = static_cast<uint32_t>(s * L::kStageBytes);
    const int c = c_begin + i;
    if constexpr (kFull) {
      // Rows past N copy zeros, from codes and meta themselves plus one row's worth at most (a
      // chunk's offset): addresses inside them, with no select in the loop.
      if (kRows == kTcRows || threadIdx.x < 4 * kRows) {  // 4 threads a row
        cp_async16_zfill<kLines>(code_dst + stage, code_src + 2 * L::kPairs * c, row_ok);
      }
      if (threadIdx.x < 2 * kRows) cp_async16_zfill<kLines>(meta_dst + stage, meta_src + L::kPairs * c, meta_ok);
    } else {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const bool ok = row_ok && c * L::kPairs + first_pair + j < pairs;
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(code_dst + stage + 8 * j),
                     "l"(ok ? code_src + 2 * (L::kPairs * c + j) : codes), "r"(ok ? 8 : 0));
        cp_async4_zfill(meta_dst + stage + 4 * j, ok ? meta_src + L::kPairs * c + j : meta, ok);
      }
    }
    // K % 32 == 0: every 16-byte unit is whole.
    xc.issue(stage, xc.src + c * kTcChunk, kFull || c * kTcChunk + xc.cu * kWordWeights < K, x, K);
  };

  for (int i = 0; i < L::kStages - 1; ++i) {
    if (i < n_local) issue(i, i);
    cp_async_commit();
  }
  // The second part of a split norm: each token's factor, and whether x must be normalized here.
  float* norm_factors = nullptr;
  bool renorm = false;
  if constexpr (kNorm == kNormFromStats) {
    __shared__ float factors[8 * MT];
    norm_factors = factors;
    renorm = sp_norm_factors<MT>(norm, M, K, factors);
  }

  const int g = lane / 4;
  const int q = lane % 4;
  const int row_a = row_group * 16 * R + g;
  const uint32_t sel = sp_a_sel(q);
  // This warp's part of a chunk: pairs kPartPairs * part .. + kPartPairs - 1.
  const int code_off = row_a * L::kCodeRowBytes + 8 * kPartPairs * part;
  const int meta_off = row_a * L::kMetaRowBytes + 4 * kPartPairs * part;
  const int x_off = g * L::kXRowBytes + 64 * kPartPairs * part + sp_x_offset(q);
  float acc[R][MT][4];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int t = 0; t < MT; ++t) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[r][t][j] = 0.f;
    }
  }

  // kRenorm (a std::bool_constant): x is normalized in shared memory (g too large, sp_norm_factors).
  auto chunk = [&](int i, auto stage, auto kRenorm) {
    const int s = stage_of(stage);
    // Per-thread addresses stay in registers across chunks (see keep_in_register).
    keep_in_register(code_dst);
    keep_in_register(code_src);
    keep_in_register(meta_dst);
    keep_in_register(meta_src);
    keep_in_register(xc.dst);
    keep_in_register(xc.src);
    cp_async_wait<L::kStages - 2>();  // this thread's copies of chunk i have landed
    __syncthreads();                  // and everyone's; chunk i - 1's stage is free
    unsigned char* xs_stage = sp_smem + s * L::kStageBytes;
    if constexpr (decltype(kRenorm)::value) {
      sp_normed_x<T, L, kXScaled>(norm, norm_factors, xs_stage, c_begin + i, M, K);
      __syncthreads();
    }
    if constexpr (kConvertX) {
      for (int u = threadIdx.x; u < L::kTokens * (kTcChunk / 8); u += kTcThreads) {
        uint4* v = reinterpret_cast<uint4*>(xs_stage + (u / (kTcChunk / 8)) * L::kXRowBytes) + u % (kTcChunk / 8);
        *v = bf16_to_half_scaled<kTcXScaleLog2<T>>(*v);
      }
      __syncthreads();
    }
    // Rows g (a) and g + 8 (b) of each of the warp's row tiles.
    const unsigned char* codes_s = xs_stage + L::kXBytes + code_off;
    const unsigned char* meta_s = xs_stage + L::kXBytes + L::kCodeBytes + meta_off;
    uint32_t ma[R][kPartPairs];
    uint32_t mb[R][kPartPairs];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      load_words(meta_s + 16 * r * L::kMetaRowBytes, ma[r]);
      load_words(meta_s + (16 * r + 8) * L::kMetaRowBytes, mb[r]);
    }
    const unsigned char* xs = xs_stage + x_off;
#pragma unroll
    for (int p = 0; p < kPartPairs; ++p) {
      if (p == kPartPairs / 2) {  // as in tc_kernel: halfway, the next chunk's copies
        const int next = i + L::kStages - 1;
        if (next < n_local) issue(next, (s + L::kStages - 1) % L::kStages);
        cp_async_commit();
      }
      uint32_t a[R][4];
      uint32_t e[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const unsigned char* code_a = codes_s + 16 * r * L::kCodeRowBytes + 8 * p;
        tc_a_pair(*reinterpret_cast<const uint2*>(code_a), ma[r][p], sel, a[r][0], a[r][2]);
        tc_a_pair(*reinterpret_cast<const uint2*>(code_a + 8 * L::kCodeRowBytes), mb[r][p], sel, a[r][1], a[r][3]);
        e[r] = sp_metadata(ma[r][p], mb[r][p]);
      }
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        const uint4 b = *reinterpret_cast<const uint4*>(xs + 64 * p + 8 * t * L::kXRowBytes);
#pragma unroll
        for (int r = 0; r < R; ++r) mma_sp_16832(acc[r][t], a[r], b, e[r]);
      }
    }
  };
  // kStages chunks per iteration, each with its stage as a compile-time constant. The rare
  // normalizing loop is a copy of its own, and the usual one is the plain kernel's, written out
  // (the same loop as a lambda called twice cost the narrow 1-8 token instance a predicate
  // recomputed in every chunk).
  if (renorm) {
    if constexpr (kNorm == kNormFromStats) {
      for (int i = 0; i < n_local; i += L::kStages) {
        for_each_stage(std::make_integer_sequence<int, L::kStages>{}, [&](auto stage) {
          if (i + stage_of(stage) < n_local) chunk(i + stage_of(stage), stage, std::true_type{});
        });
      }
    }
  } else {
    for (int i = 0; i < n_local; i += L::kStages) {
      for_each_stage(std::make_integer_sequence<int, L::kStages>{}, [&](auto stage) {
        if (i + stage_of(stage) < n_local) chunk(i + stage_of(stage), stage, std::false_type{});
      });
    }
  }

  tc_finish<T, R, MT, kParts, kRows, kNorm>(acc, sp_smem, tile, split, row_group, part, lane, y, workspace, counters,
                                            M, N, splits, nullptr, -1, gate, &norm,
                                            kNorm == kNormFromStats && !renorm ? norm_factors : nullptr);
}

// ---------------------------------------------------------------------------------------------
// Dispatch

struct GemvArgs {
  const void* x;
  const int32_t* row_ptr;
  const int32_t* codes;
  const int32_t* meta;
  const int32_t* schedule;
  int num_ctas;
  void* y;
  int N, K, nnz;
  bool shared_x;
  int max_shared_x;  // max_shared_x_bytes() of the device
  cudaStream_t stream;
};

template <typename T, int G, int M, bool kSharedX>
cudaError_t launch_gemv_kernel(const GemvArgs& a) {
  const auto kernel = gemv_kernel<T, G, M, kSharedX>;
  size_t smem = 0;
  if constexpr (kSharedX) {
    // Dynamic shared memory above 48 KB must be allowed per kernel and device (a host-side
    // attribute, so this is also fine during graph capture). Asking for more than the device
    // allows fails the launch, so the request is the device's limit, not kMaxSharedXBytes.
    const cudaError_t allowed =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, a.max_shared_x);
    if (allowed != cudaSuccess) return allowed;
    smem = shared_x_bytes(M, a.K);
  }
  kernel<<<a.num_ctas, kGemvThreads, smem, a.stream>>>(
      static_cast<const T*>(a.x), a.row_ptr, a.codes, a.meta, reinterpret_cast<const int2*>(a.schedule),
      static_cast<T*>(a.y), a.N, a.K, a.nnz);
  return cudaGetLastError();
}

template <typename T, int G, int M>
cudaError_t launch_gemv(const GemvArgs& a) {
  return a.shared_x ? launch_gemv_kernel<T, G, M, true>(a) : launch_gemv_kernel<T, G, M, false>(a);
}

template <typename T, int G>
cudaError_t gemv_for_tokens(const GemvArgs& a, int M) {
  switch (M) {
    case 1: return launch_gemv<T, G, 1>(a);
    case 2: return launch_gemv<T, G, 2>(a);
    case 3: return launch_gemv<T, G, 3>(a);
    case 4: return launch_gemv<T, G, 4>(a);
    case 5: return launch_gemv<T, G, 5>(a);
    case 6: return launch_gemv<T, G, 6>(a);
    case 7: return launch_gemv<T, G, 7>(a);
    case 8: return launch_gemv<T, G, 8>(a);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t gemv_for_group(const GemvArgs& a, int M, int group_size) {
  switch (group_size) {
    case 16: return gemv_for_tokens<T, 16>(a, M);
    case 32: return gemv_for_tokens<T, 32>(a, M);
    case 64: return gemv_for_tokens<T, 64>(a, M);
    case 128: return gemv_for_tokens<T, 128>(a, M);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, int G>
cudaError_t launch_dequant(const int32_t* row_ptr, const int32_t* sell_rows, int num_places, const int32_t* codes,
                           const int32_t* meta, void* w, int N, int K, cudaStream_t stream) {
  const size_t smem = sizeof(int) * (K / G);
  const int ctas = sell_rows != nullptr ? num_places : N;
  if (ctas == 0) return cudaSuccess;
  dequant_kernel<T, G><<<ctas, kDequantThreads, smem, stream>>>(row_ptr, reinterpret_cast<const int2*>(sell_rows),
                                                                codes, meta, static_cast<T*>(w), K);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dequant_for_group(const int32_t* row_ptr, const int32_t* sell_rows, int num_places, const int32_t* codes,
                              const int32_t* meta, void* w, int N, int K, int group_size, cudaStream_t stream) {
  switch (group_size) {
    case 16: return launch_dequant<T, 16>(row_ptr, sell_rows, num_places, codes, meta, w, N, K, stream);
    case 32: return launch_dequant<T, 32>(row_ptr, sell_rows, num_places, codes, meta, w, N, K, stream);
    case 64: return launch_dequant<T, 64>(row_ptr, sell_rows, num_places, codes, meta, w, N, K, stream);
    case 128: return launch_dequant<T, 128>(row_ptr, sell_rows, num_places, codes, meta, w, N, K, stream);
    default: return cudaErrorInvalidValue;
  }
}

// One launch of tc_kernel: at most kMaxTcTokens tokens.
struct TcArgs {
  const void* x;
  const int32_t* row_ptr;
  const int2* places;  // the sliced layout's sell_rows, or null
  const int32_t* codes;
  const int32_t* meta;
  const int32_t* chunks;
  const int32_t* xcols;
  int num_chunks;
  void* y;
  float* workspace;
  int32_t* counters;
  void* x_scratch;  // M x K fp16 when x is scaled once per launch (tc_converts_x_once), else null
  int M, N, n_out, K, splits;  // N: the grid's rows (places in the sliced layout); n_out: y's
  cudaStream_t stream;
};

template <typename T, int G, int MT, bool kXScaled>
cudaError_t launch_tc_kernel(const TcArgs& a, const void* x) {
  using L = TcLayout<G, MT>;
  const auto kernel = a.xcols != nullptr ? tc_kernel<T, G, MT, kXScaled, true> : tc_kernel<T, G, MT, kXScaled, false>;
  const cudaError_t allowed = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes);
  if (allowed != cudaSuccess) return allowed;
  const dim3 grid((a.N + kTcRows - 1) / kTcRows, a.splits);
  kernel<<<grid, kTcThreads, L::kBytes, a.stream>>>(static_cast<const T*>(x), a.row_ptr, a.places, a.codes, a.meta,
                                                    a.chunks, a.xcols, a.num_chunks, static_cast<T*>(a.y),
                                                    a.workspace, a.counters, a.M, a.N, a.n_out, a.K, a.splits);
  return cudaGetLastError();
}

// x [M, K] as scaled fp16 into scratch (tc_scale_x_kernel), for the tensor-core kernels' launches
// that convert x once (tc_converts_x_once).
template <typename T>
cudaError_t scale_x_once(const void* x, void* scratch, int M, int K, cudaStream_t stream) {
  const int units = static_cast<int>(static_cast<size_t>(M) * K / 8);
  if (units == 0) return cudaSuccess;
  const int blocks = (units + kTcThreads - 1) / kTcThreads;
  tc_scale_x_kernel<T><<<blocks, kTcThreads, 0, stream>>>(static_cast<const uint4*>(x), static_cast<uint4*>(scratch),
                                                          units);
  return cudaGetLastError();
}

template <typename T, int G, int MT>
cudaError_t launch_tc(const TcArgs& a) {
  if constexpr (kTcXScaleLog2<T> != 0) {
    if (a.x_scratch != nullptr) {
      const cudaError_t err = scale_x_once<T>(a.x, a.x_scratch, a.M, a.K, a.stream);
      if (err != cudaSuccess) return err;
      return launch_tc_kernel<T, G, MT, true>(a, a.x_scratch);
    }
  }
  return launch_tc_kernel<T, G, MT, false>(a, a.x);
}

template <typename T, int G>
cudaError_t tc_for_tokens(const TcArgs& a) {
  if (a.M <= 8) return launch_tc<T, G, 1>(a);
  if (a.M <= 16) return launch_tc<T, G, 2>(a);
  if (a.M <= 32) return launch_tc<T, G, 4>(a);
  return launch_tc<T, G, 8>(a);
}

template <typename T>
cudaError_t tc_for_group(const TcArgs& a, int group_size) {
  switch (group_size) {
    case 16: return tc_for_tokens<T, 16>(a);
    case 32: return tc_for_tokens<T, 32>(a);
    case 64: return tc_for_tokens<T, 64>(a);
    case 128: return tc_for_tokens<T, 128>(a);
    default: return cudaErrorInvalidValue;
  }
}

// One launch of sp_kernel: at most kMaxTcTokens tokens (x_scratch as in TcArgs).
struct SpArgs {
  const void* x;
  const int32_t* codes;
  const int32_t* meta;
  void* y;
  float* workspace;
  int32_t* counters;
  void* x_scratch;
  int M, N, K, splits, num_sms;
  cudaStream_t stream;
  int gate_rows;  // > 0: a gate/up layer fused with SiLU-and-mul (sp_kernel), y [M, gate_rows]
  NormSplit norm;  // a part of a split norm, or none
  // Row tiles of 64 rows (each 32 gate rows and their up rows with gate_rows).
  int tiles() const { return gate_rows > 0 ? (gate_rows + kTcRows / 2 - 1) / (kTcRows / 2) : (N + kTcRows - 1) / kTcRows; }
};

// Whether sp_kernel's code and meta copies ask L2 for whole 128-byte lines: where the grid has
// more than two CTAs per SM. A CTA reads each of its 64 rows' codes and meta 64 and 32 bytes per
// chunk, rows K / 4 and K / 8 bytes apart; a line holds two chunks of a row's codes or four of its
// meta, so one DRAM fetch serves the copies of several chunks. On one H100 with whole lines
// everywhere, at 2 tokens, the gate/up layers (344 to 592 CTAs on 132 SMs) were 12-15% faster and
// q/k/v, o and down (256 CTAs or fewer) up to 3% slower
// (benchmarks/results/gpu/kernels_pairs_h100_prefetch_size_experiment_*.json); with this rule one
// decoder layer is 5-8% faster at 2 to 8 tokens and 2.5-5% at 16 (..._l2_lines_*.json).
bool sp_l2_lines(int ctas, int num_sms) { return ctas > 2 * num_sms; }

template <typename T, int MT, bool kXScaled, bool kFull, bool kLines, int kRows, bool kPacked = false,
          int kNorm = kNormNone>
cudaError_t launch_sp_instance(const SpArgs& a, const void* x) {
  using L = SpLayout<MT, kRows, kPacked>;
  const auto kernel = sp_kernel<T, MT, kXScaled, kFull, kLines, kRows, kPacked, kNorm>;
  const cudaError_t allowed = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes);
  if (allowed != cudaSuccess) return allowed;
  const dim3 grid(kRows == kTcRows ? a.tiles() : (a.N + kRows - 1) / kRows, a.splits);
  kernel<<<grid, kTcThreads, L::kBytes, a.stream>>>(static_cast<const T*>(x), a.codes, a.meta,
                                                    (a.K + kTcChunk - 1) / kTcChunk, static_cast<T*>(a.y),
                                                    a.workspace, a.counters, a.M, a.N, a.K, a.splits,
                                                    kRows == kTcRows ? a.gate_rows : 0, a.norm);
  return cudaGetLastError();
}

// Narrow tiles: an unsplit grid of 1 to 16 tokens runs 32-row tiles where that puts fewer rows on
// the busiest SM and every CTA still fits on the GPU at once. With 64-row tiles the Llama-2-7B q/k/v
// (192 CTAs on 132 SMs) leaves 72 SMs one tile and 60 two, and the SMs with two end about 3 us later
// (sp_timeline.py); 384 tiles of 32 rows put 2 or 3 on each SM, 96 rows at most instead of 128.
// With this rule that layer takes 9-12% less time at 2 and 16 tokens, and Qwen2.5-1.5B's q/k/v and
// o (grids of 24 to 32 CTAs) 15-19% less; the other layers keep their instance (one H100,
// benchmarks/results/gpu/sp_narrow_*_h100.json). Narrow tiles everywhere lost: 5-13% on gate/up at
// 16 tokens, where twice the CTAs no longer fit at once, and 4-17% on q/k/v and gate/up at 32
// tokens, whatever the SMs' loads (sp_rows32_*_h100.json).
constexpr int kSpNarrowRows = 32;

// Rows of a grid of `rows`-row tiles on its busiest SM, if every CTA is resident at once.
int sp_busiest_sm_rows(int N, int rows, int num_sms) {
  const int ctas = (N + rows - 1) / rows;
  return (ctas + num_sms - 1) / num_sms * rows;
}

// CTAs of an sp_kernel instance that one SM holds at once (0 if the query fails: the instance is
// not picked). Registers set it on sm_90a for the narrow tiles: 64 a thread at 1 to 8 tokens (4
// CTAs), 71 at 16 (3 CTAs), so of the three 7B-8B shapes only the Llama-2-7B q/k/v (384 narrow
// CTAs, 132 SMs) takes narrow tiles. Asked once per instance: the plugin serves one GPU model per
// process.
template <typename T, int MT, bool kXScaled, bool kLines, int kRows, bool kPacked = false>
int sp_ctas_per_sm() {
  static const int per_sm = [] {
    using L = SpLayout<MT, kRows, kPacked>;
    const auto kernel = sp_kernel<T, MT, kXScaled, true, kLines, kRows, kPacked>;
    int n = 0;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kTcThreads, L::kBytes) != cudaSuccess) {
      cudaGetLastError();  // a failed query leaves no error for the launch that follows
      return 0;
    }
    return n;
  }();
  return per_sm;
}

template <typename T, int MT, bool kXScaled, bool kLines>
bool sp_narrow_tiles(const SpArgs& a) {
  if (a.splits != 1 || a.num_sms <= 0 || a.gate_rows > 0) return false;
  const int ctas = (a.N + kSpNarrowRows - 1) / kSpNarrowRows;
  return sp_busiest_sm_rows(a.N, kSpNarrowRows, a.num_sms) < sp_busiest_sm_rows(a.N, kTcRows, a.num_sms) &&
         ctas <= sp_ctas_per_sm<T, MT, kXScaled, kLines, kSpNarrowRows>() * a.num_sms;
}

// Packed CTAs at 9 to 16 tokens: a grid of more CTAs than SMs, all resident at once, runs the
// instance with 3 stages and 64 registers, 4 CTAs an SM instead of 3, where that query says so.
// More warps an SM hide more of the dequantization's dependent instructions ("wait", the largest
// stall at 16 tokens). bf16 x is converted once from 9 tokens (kTcScaleXOnceTokens), so the
// instance that converts it in every CTA has no packed form.
template <typename T, int MT, bool kXScaled, bool kLines>
bool sp_packed(int ctas, int num_sms) {
  if (num_sms <= 0 || ctas <= num_sms) return false;
  const int packed = sp_ctas_per_sm<T, MT, kXScaled, kLines, kTcRows, true>();
  return packed > sp_ctas_per_sm<T, MT, kXScaled, kLines, kTcRows>() && ctas <= packed * num_sms;
}

// kNorm: the instances of a split norm's part (whole chunks only; sp_gemm checks).
template <typename T, int MT, bool kXScaled, int kNorm>
cudaError_t launch_sp_kernel(const SpArgs& a, const void* x) {
  if (a.K % kTcChunk != 0) {
    if constexpr (kNorm != kNormNone) {
      return cudaErrorInvalidValue;
    } else {
      return launch_sp_instance<T, MT, kXScaled, false, false, kTcRows>(a, x);
    }
  }
  if constexpr (MT <= 2) {
    const int narrow_ctas = (a.N + kSpNarrowRows - 1) / kSpNarrowRows;
    if (sp_l2_lines(narrow_ctas, a.num_sms)) {
      if (sp_narrow_tiles<T, MT, kXScaled, true>(a)) {
        return launch_sp_instance<T, MT, kXScaled, true, true, kSpNarrowRows, false, kNorm>(a, x);
      }
    } else if (sp_narrow_tiles<T, MT, kXScaled, false>(a)) {
      return launch_sp_instance<T, MT, kXScaled, true, false, kSpNarrowRows, false, kNorm>(a, x);
    }
  }
  const int ctas = a.tiles() * a.splits;
  if constexpr (MT == 2 && (kTcXScaleLog2<T> == 0 || kXScaled)) {
    if (sp_l2_lines(ctas, a.num_sms)) {
      if (sp_packed<T, MT, kXScaled, true>(ctas, a.num_sms)) {
        return launch_sp_instance<T, MT, kXScaled, true, true, kTcRows, true, kNorm>(a, x);
      }
    } else if (sp_packed<T, MT, kXScaled, false>(ctas, a.num_sms)) {
      return launch_sp_instance<T, MT, kXScaled, true, false, kTcRows, true, kNorm>(a, x);
    }
  }
  if (sp_l2_lines(ctas, a.num_sms)) return launch_sp_instance<T, MT, kXScaled, true, true, kTcRows, false, kNorm>(a, x);
  return launch_sp_instance<T, MT, kXScaled, true, false, kTcRows, false, kNorm>(a, x);
}

template <typename T, int MT, int kNorm>
cudaError_t launch_sp(const SpArgs& a) {
  if constexpr (kTcXScaleLog2<T> != 0) {
    if (a.x_scratch != nullptr) {
      const cudaError_t err = scale_x_once<T>(a.x, a.x_scratch, a.M, a.K, a.stream);
      if (err != cudaSuccess) return err;
      return launch_sp_kernel<T, MT, true, kNorm>(a, a.x_scratch);
    }
  }
  return launch_sp_kernel<T, MT, false, kNorm>(a, a.x);
}

template <typename T, int kNorm>
cudaError_t sp_for_tokens(const SpArgs& a) {
  if (a.M <= 8) return launch_sp<T, 1, kNorm>(a);
  if (a.M <= 16) return launch_sp<T, 2, kNorm>(a);
  if (a.M <= 32) return launch_sp<T, 4, kNorm>(a);
  if constexpr (kNorm != kNormNone) {
    return cudaErrorInvalidValue;  // kMaxSpNormTokens
  } else {
    return launch_sp<T, 8, kNorm>(a);
  }
}

template <typename T>
cudaError_t sp_for_tokens(const SpArgs& a) {
  switch (a.norm.mode) {
    case NormSplitMode::kNone: return sp_for_tokens<T, kNormNone>(a);
    case NormSplitMode::kAddStats: return sp_for_tokens<T, kNormAddStats>(a);
    case NormSplitMode::kFromStats: return sp_for_tokens<T, kNormFromStats>(a);
  }
  return cudaErrorInvalidValue;
}

// Shared memory of one sliced GEMV launch: the x copy and the warps' sums.
constexpr size_t sliced_smem_bytes(int M, int K, int warps) {
  return shared_x_bytes(M, K) + static_cast<size_t>(warps) * M * kWarpSize * sizeof(float);
}

struct SlicedArgs {
  const void* x;
  const int2* places;
  const int4* pieces;
  int num_pieces;
  const uint4* codes;
  const uint4* meta;
  int32_t* parts;
  int num_part_slots;
  void* y;
  int N, K;
  cudaStream_t stream;
  NormSplit split;
};

template <typename T, int M, int kW, int kSplit>
cudaError_t launch_sliced(const SlicedArgs& a) {
  const auto kernel = sliced_gemv_kernel<T, M, kW, kSplit>;
  const size_t smem = shared_x_bytes(M, a.K);
  if (smem > 48 * 1024) {  // above 48 KB, dynamic shared memory must be allowed per kernel
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<a.num_pieces, kW * kWarpSize, smem, a.stream>>>(static_cast<const T*>(a.x), a.places, a.pieces, a.codes,
                                                           a.meta, a.parts, a.num_part_slots, static_cast<T*>(a.y),
                                                           a.N, a.K, a.split);
  return cudaGetLastError();
}

template <typename T, int M, int kW>
cudaError_t launch_sliced_split(const SlicedArgs& a) {
  switch (a.split.mode) {
    case NormSplitMode::kNone: return launch_sliced<T, M, kW, static_cast<int>(NormSplitMode::kNone)>(a);
    case NormSplitMode::kAddStats: return launch_sliced<T, M, kW, static_cast<int>(NormSplitMode::kAddStats)>(a);
    case NormSplitMode::kFromStats: return launch_sliced<T, M, kW, static_cast<int>(NormSplitMode::kFromStats)>(a);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int M>
cudaError_t sliced_for_warps(const SlicedArgs& a, int warps) {
  switch (warps) {
    case 4: return launch_sliced_split<T, M, 4>(a);
    case 8: return launch_sliced_split<T, M, 8>(a);
    case 16: return launch_sliced_split<T, M, 16>(a);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t sliced_for_tokens(const SlicedArgs& a, int M, int warps) {
  switch (M) {
    case 1: return sliced_for_warps<T, 1>(a, warps);
    case 2: return sliced_for_warps<T, 2>(a, warps);
    case 3: return sliced_for_warps<T, 3>(a, warps);
    default: return cudaErrorInvalidValue;
  }
}

// ---------------------------------------------------------------------------------------------
// Prefill of a layer in the pair pattern on Hopper's sparse tensor cores (sm_90a): sp_wgmma_kernel.
//
// Row n's j-th kept group is pair j's, at n * K / 32 + j, so a stage's codes and meta for 128 rows
// are one 2D box each: one producer thread fills a stage with three TMA copies (x, codes, meta)
// and no chunk table. Two consumer warpgroups of 64 rows build the A operand of
// wgmma.mma_async.sp.m64nNk32 in registers with sp_kernel's helpers (tc_a_pair with sp_a_sel,
// sp_metadata), a whole stage ahead into one of two register sets while the stage before runs as
// one commit group of back-to-back wgmmas: only kept weights are dequantized and multiplied. wgmma
// reads B (x) from shared memory in the order of k, so sp_wgmma_permute_kernel first writes x with
// sp_kernel's order of k (fp16; bf16 scaled by 2^-kTcXScaleLog2 as for the other tensor-core
// kernels). One Llama-2-7B layer on an H100 at 512 / 1024 / 2048 tokens: 0.87x / 0.86x / 0.73x
// cuBLAS fp16's time on the dense weights, against 1.51x / 1.32x / 1.12x for dequantize + cuBLAS
// (csrc/README.md, "Sparse wgmma for the pair pattern").

constexpr int kSpwRows = 128;       // rows per CTA: two consumer warpgroups of 64
constexpr int kSpwPairs = 4;        // pairs of group columns (32 channels, one wgmma) per stage
constexpr int kSpwChunk = 32 * kSpwPairs;
constexpr int kSpwBox = 64;         // channels per 128-byte swizzled row of x (one TMA box)
constexpr int kSpwConsumers = 2 * 128;  // threads 0..255; the producer threads follow them
// K splits: up to kSpwMaxSplits CTAs of one cluster share a tile's K (the portable cluster size),
// each at least kSpwMinSplitPairs stage pairs, and sum their fp32 partial tiles through
// distributed shared memory, staged as [token][row] with kSpwPartPitch floats per token.
constexpr int kSpwMaxSplits = 8;
constexpr int kSpwMinSplitPairs = 2;
constexpr int kSpwPartPitch = kSpwRows + 4;  // 16-byte rows; the consumers' writes miss bank conflicts

// One stage: x as kSpwChunk / 64 swizzled boxes of [kTok tokens][64 channels] (1024-byte
// aligned), then [kSpwRows][kSpwPairs] codes (8 bytes each) and meta (4 bytes), as TMA lays them.
// 256-token tiles halve how often each weight is dequantized but need three stages (shared
// memory) and setmaxnreg (the 128 accumulators of m64n256 and two register sets). 64-token tiles,
// for up to 64 tokens, pad less and fit two CTAs on an SM (four stages each, one producer warp),
// so one CTA's dequantization overlaps the other's wgmmas.
template <int kTok>
struct SpwLayout {
  static constexpr int kXBoxBytes = kTok * kSpwBox * 2;
  static constexpr int kXBytes = kSpwChunk / kSpwBox * kXBoxBytes;
  static constexpr int kCodeBytes = kSpwRows * kSpwPairs * 8;
  static constexpr int kMetaBytes = kSpwRows * kSpwPairs * 4;
  static constexpr int kTxBytes = kXBytes + kCodeBytes + kMetaBytes;
  static constexpr int kStageBytes = (kTxBytes + 1023) / 1024 * 1024;
  static constexpr int kStages = kTok == 256 ? 3 : kTok == 128 ? 5 : 4;
  static constexpr int kCtasPerSm = kTok == 64 ? 2 : 1;
  static constexpr int kProducers = kTok == 64 ? 32 : 128;  // a warp, or a warpgroup for setmaxnreg
  static constexpr int kThreads = kSpwConsumers + kProducers;
  static constexpr int kOutPitch = kSpwRows + 8;  // halves per token row of the staged output tile
  static constexpr int kBytes = kStages * kStageBytes + 2 * kStages * 8 + 1024;  // + barriers, alignment slack
  static_assert(kTok * kOutPitch * 2 <= kStages * kStageBytes, "the output tile fits in the stages");
  static_assert(kTok * kSpwPartPitch * 4 <= kStages * kStageBytes, "the fp32 partial tile fits in the stages");
  static_assert(kCtasPerSm * (kBytes + 1024) <= 228 * 1024, "fits Hopper's shared memory");
};

// x' = x with each pair's 32 channels in sp_kernel's order of k: k = 2q + 8r + {0, 1} (q, r = 0..3)
// is channel 8 p(q) + 2r + {0, 1}, p = (0, 2, 1, 3) (sp_x_offset): in 4-byte words of the pair's 64
// bytes, out[q + 4r] = in[4 p(q) + r]. One thread per 16 bytes of x': a warp's four loads read 512
// contiguous bytes (L1 serves three of them) and its store writes them, coalesced.
template <typename T>
__global__ void sp_wgmma_permute_kernel(const uint32_t* __restrict__ x, uint4* __restrict__ out, int units,
                                        int padded_units) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= padded_units) return;
  if (i >= units) {  // the rows past M, up to the token tile
    out[i] = make_uint4(0, 0, 0, 0);
    return;
  }
  const uint32_t* in = x + 4 * static_cast<size_t>(i & ~3) + (i & 3);  // the pair's word r = i % 4
  uint32_t w[4] = {__ldg(in), __ldg(in + 8), __ldg(in + 4), __ldg(in + 12)};
  if constexpr (kTcXScaleLog2<T> != 0) {
    constexpr float scale = 1.0f / (1 << kTcXScaleLog2<T>);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = Act<T>::unpack(w[j]);
      w[j] = half2_bits(__floats2half2_rn(f.x * scale, f.y * scale));
    }
  }
  out[i] = make_uint4(w[0], w[1], w[2], w[3]);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // the device code of sm_90a alone (no other target uses it)
// The PTX the kernel needs beyond sm_80's: mbarriers, TMA, wgmma. Addresses are shared::cta.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// Predicated in the PTX: a branch around it, which the compiler cannot see is uniform, makes
// ptxas serialize the wgmmas (C7518).
__device__ __forceinline__ void mbarrier_arrive_if(uint32_t bar, bool p) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %1, 0;\n@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(bar),
      "r"(static_cast<int>(p))
      : "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n@!done bra WAIT_%=;\n}\n" ::"r"(
          bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void tma_copy_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          dst),
      "l"(map), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
__device__ __forceinline__ uint2 ld_shared_u64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ uint32_t ld_shared_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr) : "memory");
  return v;
}
// wgmma descriptor of a K-major operand in the 128-byte swizzle: 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t kmajor_sw128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}
// Keeps the compiler from moving accumulator accesses across the wgmma fences and waits.
template <int n>
__device__ __forceinline__ void pin_accumulators(float (&d)[n]) {
#pragma unroll
  for (int i = 0; i < n; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (64 rows x N tokens, fp32) += a (64 x 32 with 2:4 sparsity, given as its 64 x 16 kept values in
// mma.sp's register fragments, and metadata e as sp_metadata gives it) * b (32 x N: x' in shared
// memory, descriptor b).
__device__ __forceinline__ void wgmma_sp_m64k32(float (&d)[32], const uint32_t (&a)[4], uint64_t b, uint32_t e) {
  asm volatile(
      "wgmma.mma_async.sp.sync.aligned.m64n64k32.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, %37, 0, 1, 1, 1, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(e));
}

__device__ __forceinline__ void wgmma_sp_m64k32(float (&d)[64], const uint32_t (&a)[4], uint64_t b, uint32_t e) {
  asm volatile(
      "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, %69, 0, 1, 1, 1, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(e));
}

__device__ __forceinline__ void wgmma_sp_m64k32(float (&d)[128], const uint32_t (&a)[4], uint64_t b, uint32_t e) {
  asm volatile(
      "wgmma.mma_async.sp.sync.aligned.m64n256k32.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "{%128, %129, %130, %131}, %132, %133, 0, 1, 1, 1, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(e));
}

// One stage of one consumer thread: rows row_a and row_a + 8 of each pair as wgmma's sparse A
// registers and metadata.
template <int kTok>
__device__ __forceinline__ void spw_dequant_stage(uint32_t (&a)[kSpwPairs][4], uint32_t (&e)[kSpwPairs],
                                                  uint32_t stage, int row_a, uint32_t sel) {
  using L = SpwLayout<kTok>;
  const uint32_t code_a = stage + L::kXBytes + row_a * (kSpwPairs * 8);
  const uint32_t meta_a = stage + L::kXBytes + L::kCodeBytes + row_a * (kSpwPairs * 4);
#pragma unroll
  for (int kk = 0; kk < kSpwPairs; ++kk) {
    const uint32_t ma = ld_shared_u32(meta_a + 4 * kk);
    const uint32_t mb = ld_shared_u32(meta_a + 8 * (kSpwPairs * 4) + 4 * kk);
    tc_a_pair(ld_shared_u64(code_a + 8 * kk), ma, sel, a[kk][0], a[kk][2]);
    tc_a_pair(ld_shared_u64(code_a + 8 * (kSpwPairs * 8) + 8 * kk), mb, sel, a[kk][1], a[kk][3]);
    e[kk] = sp_metadata(ma, mb);
  }
}

// One stage's wgmmas as one commit group: pair kk is box kk / 2, 64 bytes (32 channels) into its
// swizzled rows.
template <int kTok>
__device__ __forceinline__ void spw_issue_stage(float (&acc)[kTok / 2], uint32_t (&a)[kSpwPairs][4],
                                                const uint32_t (&e)[kSpwPairs], uint32_t stage) {
  using L = SpwLayout<kTok>;
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  pin_accumulators(acc);
#pragma unroll
  for (int kk = 0; kk < kSpwPairs; ++kk) {
    wgmma_sp_m64k32(acc, a[kk], kmajor_sw128_desc(stage + (kk / 2) * L::kXBoxBytes + (kk % 2) * 64), e[kk]);
  }
  pin_accumulators(acc);
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int n>
__device__ __forceinline__ void wgmma_wait_groups() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(n) : "memory");
}

// Every thread of every CTA of the cluster arrives and waits: what each wrote to its shared memory
// before is visible to all after (release / acquire at cluster scope).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// 16 bytes at shared-memory address addr of CTA rank (of the cluster).
__device__ __forceinline__ float4 ld_cluster_f32x4(uint32_t addr, int rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(remote)
               : "memory");
  return v;
}

// The end of a K split: each split's CTA holds its fp32 partial tile at part ([token][row],
// kSpwPartPitch); split s sums tokens s * kTok / splits .. (s + 1) * kTok / splits - 1 over all
// splits, in split order (the same sums whichever CTA adds them, so the result is deterministic),
// and stores them 4 rows at a time. Every thread of the CTA calls it.
template <typename T, int kTok>
__device__ __forceinline__ void spw_reduce_splits(uint32_t part, T* __restrict__ y, int M, int N, int tile,
                                                  int tok0, int split, int splits) {
  using L = SpwLayout<kTok>;
  constexpr float kOutScale = static_cast<float>(1 << kTcXScaleLog2<T>);
  cluster_sync();  // every split's partial tile is written
  const int t_begin = split * kTok / splits;
  const int t_end = (split + 1) * kTok / splits;
  const bool n_vec = N % 4 == 0;
  for (int u = threadIdx.x; u < (t_end - t_begin) * (kSpwRows / 4); u += L::kThreads) {
    const int tt = t_begin + u / (kSpwRows / 4);
    const int r = (u % (kSpwRows / 4)) * 4;
    const int tok = tok0 + tt;
    const int row = tile * kSpwRows + r;
    if (tok >= M || row >= N) continue;
    const uint32_t addr = part + 4 * (tt * kSpwPartPitch + r);
    float4 sum = ld_cluster_f32x4(addr, 0);
    for (int c = 1; c < splits; ++c) {
      const float4 v = ld_cluster_f32x4(addr, c);
      sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
    }
    const T out[4] = {Act<T>::from_float(sum.x * kOutScale), Act<T>::from_float(sum.y * kOutScale),
                      Act<T>::from_float(sum.z * kOutScale), Act<T>::from_float(sum.w * kOutScale)};
    T* dst = y + static_cast<size_t>(tok) * N + row;
    if (n_vec) {
      *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(out);
    } else {
      for (int k = 0; k < 4 && row + k < N; ++k) dst[k] = out[k];
    }
  }
  cluster_sync();  // no CTA exits while another still reads its shared memory
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// y[M, N] = x'[M, K] @ W.T for a layer in the pair pattern: CTA (tile, t, split) computes rows
// tile * kSpwRows .. + kSpwRows - 1 for tokens t * kTok .. + kTok - 1 over its share of the
// num_stages stages of kSpwChunk channels (an even number: the host adds a stage past K, which TMA
// fills with zeros): stage pairs split * P / splits .. (split + 1) * P / splits - 1 of P, splits =
// gridDim.z, the CTAs of one cluster, which then sum their partial tiles (spw_reduce_splits).
// Rows past N and tokens past M are zeros too (TMA), and not stored.
template <typename T, int kTok>
__global__ void __launch_bounds__(SpwLayout<kTok>::kThreads, 1)
    sp_wgmma_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap code_map,
                    const __grid_constant__ CUtensorMap meta_map, int num_stages, T* __restrict__ y, int M, int N) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = SpwLayout<kTok>;
  extern __shared__ unsigned char spw_smem[];
  // 1024-byte alignment for the swizzled boxes.
  const uint32_t raw = smem_addr(spw_smem);
  const uint32_t s0 = (raw + 1023u) & ~1023u;
  const uint32_t bars = s0 + L::kStages * L::kStageBytes;
  auto full_bar = [&](int i) { return bars + 8 * (i % L::kStages); };
  auto empty_bar = [&](int i) { return bars + 8 * (L::kStages + i % L::kStages); };
  auto stage_at = [&](int i) { return s0 + (i % L::kStages) * L::kStageBytes; };
  const int tile = blockIdx.x;
  const int tok0 = blockIdx.y * kTok;
  const int split = blockIdx.z;
  const int splits = gridDim.z;
  const int first = 2 * (split * (num_stages / 2) / splits);                // this split's first stage
  const int count = 2 * ((split + 1) * (num_stages / 2) / splits) - first;  // and how many (even, >= 2)

  if (threadIdx.x == 0) {
    for (int s = 0; s < L::kStages; ++s) {
      // Full: the producer arrives once with the stage's TMA bytes. Empty: every consumer thread.
      mbarrier_init(full_bar(s), 1);
      mbarrier_init(empty_bar(s), kSpwConsumers);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (threadIdx.x >= kSpwConsumers) {
    // Producer: one thread, three TMA copies a stage. With 256 tokens the warpgroup first gives
    // registers to the consumers: 40 x 128 + 232 x 256 = 168 x 384, what the launch allocated.
    if constexpr (kTok == 256) asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (threadIdx.x == kSpwConsumers) {
      for (int i = 0; i < count; ++i) {
        if (i >= L::kStages) mbarrier_wait(empty_bar(i), ((i / L::kStages) - 1) & 1);
        const uint32_t stage = stage_at(i);
        const int k_stage = first + i;
        mbarrier_arrive_expect_tx(full_bar(i), L::kTxBytes);
#pragma unroll
        for (int b = 0; b < kSpwChunk / kSpwBox; ++b) {
          tma_copy_2d(stage + b * L::kXBoxBytes, &x_map, k_stage * kSpwChunk + b * kSpwBox, tok0, full_bar(i));
        }
        tma_copy_2d(stage + L::kXBytes, &code_map, k_stage * kSpwPairs * 2, tile * kSpwRows, full_bar(i));
        tma_copy_2d(stage + L::kXBytes + L::kCodeBytes, &meta_map, k_stage * kSpwPairs, tile * kSpwRows, full_bar(i));
      }
    }
    // (256-token tiles never take K splits: their producers keep 40 registers.)
    if constexpr (kTok != 256) {
      if (splits > 1) spw_reduce_splits<T, kTok>(s0, y, M, N, tile, tok0, split, splits);
    }
    return;
  }

  // Consumers.
  if constexpr (kTok == 256) asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int ct = threadIdx.x;
  const int lane = ct % kWarpSize;
  const int g = lane / 4;
  const int q = lane % 4;
  const uint32_t sel = sp_a_sel(q);
  const int row_a = (ct / 128) * 64 + ((ct / kWarpSize) % 4) * 16 + g;  // and row_a + 8

  float acc[kTok / 2];
#pragma unroll
  for (int j = 0; j < kTok / 2; ++j) acc[j] = 0.f;

  // Stage i + 1 is dequantized while stage i's wgmmas run; the stage before is freed once they
  // are the only ones in flight. The loop takes stages in pairs (register sets 0 and 1) and the
  // last two are peeled off it, so no branch on the stage index sits around the wgmmas (ptxas would
  // serialize them) and nothing is in flight when it ends: ptxas may move the epilogue's reads of
  // the accumulators above a final wait (csrc/README.md, "A correctness trap").
  auto wait_full = [&](int i) { mbarrier_wait(full_bar(i), (i / L::kStages) & 1); };
  uint32_t a0[kSpwPairs][4], e0[kSpwPairs], a1[kSpwPairs][4], e1[kSpwPairs];
  wait_full(0);
  spw_dequant_stage<kTok>(a0, e0, stage_at(0), row_a, sel);
  int i = 0;
  for (; i + 2 < count; i += 2) {
    spw_issue_stage<kTok>(acc, a0, e0, stage_at(i));
    wgmma_wait_groups<1>();
    mbarrier_arrive_if(empty_bar(i + L::kStages - 1), i > 0);
    wait_full(i + 1);
    spw_dequant_stage<kTok>(a1, e1, stage_at(i + 1), row_a, sel);
    spw_issue_stage<kTok>(acc, a1, e1, stage_at(i + 1));
    wgmma_wait_groups<1>();
    mbarrier_arrive(empty_bar(i));
    wait_full(i + 2);
    spw_dequant_stage<kTok>(a0, e0, stage_at(i + 2), row_a, sel);
  }
  spw_issue_stage<kTok>(acc, a0, e0, stage_at(i));
  wgmma_wait_groups<1>();
  mbarrier_arrive_if(empty_bar(i + L::kStages - 1), i > 0);
  wait_full(i + 1);
  spw_dequant_stage<kTok>(a1, e1, stage_at(i + 1), row_a, sel);
  spw_issue_stage<kTok>(acc, a1, e1, stage_at(i + 1));
  wgmma_wait_groups<0>();
  pin_accumulators(acc);

  // Every stage's last fill was consumed, so shared memory is free once all consumers are done
  // with it (named barrier 1).
  asm volatile("bar.sync 1, %0;" ::"n"(kSpwConsumers));
  if (splits > 1) {
    // The fp32 partial tile as [token][row]; the cluster sums the splits' tiles.
    float* part = reinterpret_cast<float*>(spw_smem + (s0 - raw));
#pragma unroll
    for (int j = 0; j < kTok / 8; ++j) {
      const int tt = 8 * j + 2 * q;
      part[tt * kSpwPartPitch + row_a] = acc[4 * j + 0];
      part[(tt + 1) * kSpwPartPitch + row_a] = acc[4 * j + 1];
      part[tt * kSpwPartPitch + row_a + 8] = acc[4 * j + 2];
      part[(tt + 1) * kSpwPartPitch + row_a + 8] = acc[4 * j + 3];
    }
    spw_reduce_splits<T, kTok>(s0, y, M, N, tile, tok0, split, splits);
    return;
  }
  // Stage the tile as [token][row] in T, then store 16-byte runs of rows.
  constexpr float kOutScale = static_cast<float>(1 << kTcXScaleLog2<T>);
  T* out = reinterpret_cast<T*>(spw_smem + (s0 - raw));
#pragma unroll
  for (int j = 0; j < kTok / 8; ++j) {
    const int tt = 8 * j + 2 * q;
    out[tt * L::kOutPitch + row_a] = Act<T>::from_float(acc[4 * j + 0] * kOutScale);
    out[(tt + 1) * L::kOutPitch + row_a] = Act<T>::from_float(acc[4 * j + 1] * kOutScale);
    out[tt * L::kOutPitch + row_a + 8] = Act<T>::from_float(acc[4 * j + 2] * kOutScale);
    out[(tt + 1) * L::kOutPitch + row_a + 8] = Act<T>::from_float(acc[4 * j + 3] * kOutScale);
  }
  asm volatile("bar.sync 1, %0;" ::"n"(kSpwConsumers));
  const bool n_vec = N % 8 == 0;
  for (int u = ct; u < kTok * (kSpwRows / 8); u += kSpwConsumers) {
    const int tt = u / (kSpwRows / 8);
    const int r = (u % (kSpwRows / 8)) * 8;
    const int tok = tok0 + tt;
    const int row = tile * kSpwRows + r;
    if (tok >= M || row >= N) continue;
    const T* src = out + tt * L::kOutPitch + r;
    T* dst = y + static_cast<size_t>(tok) * N + row;
    if (n_vec) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int k = 0; k < 8 && row + k < N; ++k) dst[k] = src[k];
    }
  }
#else
  __trap();  // built only for sm_90a; sp_wgmma_gemm launches it on no other GPU
#endif
}
// A 2D TMA tensor map of rows x cols elements (row-major, 16-byte aligned rows), boxes of
// box_cols x box_rows, zeros outside the tensor. The driver's encoder is looked up at run time,
// so nothing links libcuda.
cudaError_t make_tensor_map(CUtensorMap* map, CUtensorMapDataType type, int elem_bytes, const void* ptr, int cols,
                            int rows, int box_cols, int box_rows, CUtensorMapSwizzle swizzle) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (encode == nullptr) {
    cudaDriverEntryPointQueryResult found;
    void* fn = nullptr;
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
    if (err != cudaSuccess) return err;
    if (found != cudaDriverEntryPointSuccess || fn == nullptr) return cudaErrorNotSupported;
    encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * elem_bytes};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(map, type, 2, const_cast<void*>(ptr), dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// The launch of a tile kernel with `splits` CTAs a cluster along z (no cluster for 1), its shared
// memory allowed: for cudaLaunchKernelEx and for the occupancy query alike.
template <typename T, int kTok>
struct SpwLaunch {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute cluster = {};
  cudaError_t allowed;
  SpwLaunch(dim3 grid, int splits, cudaStream_t stream) {
    using L = SpwLayout<kTok>;
    allowed = cudaFuncSetAttribute(sp_wgmma_kernel<T, kTok>, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes);
    config.gridDim = dim3(grid.x, grid.y, splits);
    config.blockDim = dim3(L::kThreads);
    config.dynamicSmemBytes = L::kBytes;
    config.stream = stream;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = 1;
    cluster.val.clusterDim.y = 1;
    cluster.val.clusterDim.z = splits;
    config.attrs = &cluster;
    config.numAttrs = splits > 1 ? 1 : 0;
  }
  SpwLaunch(const SpwLaunch&) = delete;  // config.attrs points into this object
};

// How many clusters of `splits` CTAs of the tile kernel fit on the GPU at once (0 where the runtime
// cannot say), asked once per device and cluster size.
template <typename T, int kTok>
int max_active_clusters(int splits) {
  constexpr int kDevices = 64;
  static std::atomic<int> known[kDevices][kSpwMaxSplits + 1] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || splits < 2 || splits > kSpwMaxSplits) return 0;
  if (device < kDevices && known[device][splits].load(std::memory_order_relaxed) > 0) {
    return known[device][splits].load(std::memory_order_relaxed);
  }
  const SpwLaunch<T, kTok> launch(dim3(1, 1), splits, nullptr);
  int clusters = 0;
  if (launch.allowed != cudaSuccess ||
      cudaOccupancyMaxActiveClusters(&clusters, sp_wgmma_kernel<T, kTok>, &launch.config) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky: the caller goes on with fewer splits
    return 0;
  }
  if (device < kDevices) known[device][splits].store(clusters, std::memory_order_relaxed);
  return clusters;
}

// The K splits of a grid of `grid` CTAs (tiles x token tiles) over `pairs` stage pairs, where
// `requested` is 0: as many as fill the GPU's SMs in one wave (kCtasPerSm CTAs each), up to
// kSpwMaxSplits and with at least kSpwMinSplitPairs stage pairs each, and fewer where the
// clusters would not all fit at once (a cluster's CTAs share a GPC).
template <typename T, int kTok>
int sp_wgmma_splits(int grid, int pairs, int num_sms, int requested) {
  if (requested > 0) return requested;
  int splits = std::max(1, std::min({num_sms * SpwLayout<kTok>::kCtasPerSm / std::max(grid, 1),
                                     pairs / kSpwMinSplitPairs, kSpwMaxSplits}));
  while (splits > 1 && max_active_clusters<T, kTok>(splits) < grid) --splits;
  return splits;
}

template <typename T, int kTok>
cudaError_t launch_sp_wgmma(const CUtensorMap& x_map, const CUtensorMap& code_map, const CUtensorMap& meta_map,
                            int num_stages, void* y, int M, int N, int splits, cudaStream_t stream) {
  const SpwLaunch<T, kTok> launch(dim3((N + kSpwRows - 1) / kSpwRows, (M + kTok - 1) / kTok), splits, stream);
  if (launch.allowed != cudaSuccess) return launch.allowed;
  T* out = static_cast<T*>(y);
  return cudaLaunchKernelEx(&launch.config, sp_wgmma_kernel<T, kTok>, x_map, code_map, meta_map, num_stages, out, M,
                            N);
}

// The fused kernel's token tile for M tokens, before the 256-token tiles that sp_wgmma_for takes
// where they pad M no more.
constexpr int spw_token_tile(int M) { return M <= 64 ? 64 : 128; }

template <typename T>
cudaError_t sp_wgmma_for(const void* x, const int32_t* codes, const int32_t* meta, void* y, void* x_scratch, int M,
                         int N, int K, int requested_splits, int num_sms, cudaStream_t stream) {
  // x_scratch holds whole token tiles, the rows past M zeros, so that no TMA box reaches past the
  // tensor's last row (on 128-token tiles 65 tokens took longer than 128; csrc/README.md).
  const int rows = sp_wgmma_scratch_tokens(M);
  const int units = static_cast<int>(static_cast<size_t>(M) * K / 8);
  const int padded_units = static_cast<int>(static_cast<size_t>(rows) * K / 8);
  sp_wgmma_permute_kernel<T><<<(padded_units + 255) / 256, 256, 0, stream>>>(
      static_cast<const uint32_t*>(x), static_cast<uint4*>(x_scratch), units, padded_units);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int stages = K / kSpwChunk;
  const int num_stages = stages + stages % 2;  // even: the kernel takes stages in pairs
  // 64-token tiles up to 64 tokens. Above, 256-token tiles where they pad M no more than 128-token
  // tiles do and still fill the GPU without K splits, else 128. One Llama-2-7B layer at 512 tokens
  // on the H100: the o and down shapes make 64 CTAs of 256 tokens, and take 36.6 and 96.2 us
  // against 30.7 and 74.1 for cuBLAS; with 128-token tiles down takes 73.3 against 75.4. At 64
  // and 128 tokens on the H200, 256-token tiles took gate/up 113.9 and 88.4 us, 128-token ones
  // q/k/v (56% of its rows) 31.7 and 23.7.
  const int tiles = (N + kSpwRows - 1) / kSpwRows;
  const int tok = spw_token_tile(M);
  const int grid = tiles * ((M + tok - 1) / tok);
  const int splits = tok == 64 ? sp_wgmma_splits<T, 64>(grid, num_stages / 2, num_sms, requested_splits)
                               : sp_wgmma_splits<T, 128>(grid, num_stages / 2, num_sms, requested_splits);
  const bool wide = tok == 128 && splits == 1 && (M + 255) / 256 * 2 == (M + 127) / 128 &&
                    static_cast<long long>(tiles) * ((M + 255) / 256) >= num_sms;
  const int box_tokens = wide ? 256 : tok;
  CUtensorMap x_map, code_map, meta_map;
  err = make_tensor_map(&x_map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, x_scratch, K, rows, kSpwBox, box_tokens,
                        CU_TENSOR_MAP_SWIZZLE_128B);
  if (err == cudaSuccess) {
    err = make_tensor_map(&code_map, CU_TENSOR_MAP_DATA_TYPE_INT32, 4, codes, K / 16, N, 2 * kSpwPairs, kSpwRows,
                          CU_TENSOR_MAP_SWIZZLE_NONE);
  }
  if (err == cudaSuccess) {
    err = make_tensor_map(&meta_map, CU_TENSOR_MAP_DATA_TYPE_INT32, 4, meta, K / 32, N, kSpwPairs, kSpwRows,
                          CU_TENSOR_MAP_SWIZZLE_NONE);
  }
  if (err != cudaSuccess) return err;
  if (wide) return launch_sp_wgmma<T, 256>(x_map, code_map, meta_map, num_stages, y, M, N, 1, stream);
  return tok == 64 ? launch_sp_wgmma<T, 64>(x_map, code_map, meta_map, num_stages, y, M, N, splits, stream)
                   : launch_sp_wgmma<T, 128>(x_map, code_map, meta_map, num_stages, y, M, N, splits, stream);
}

bool shape_ok(int N, int K, int group_size) {
  return N >= 0 && K >= 0 && group_size > 0 && K % group_size == 0 && K / group_size <= kMaxGroupCols;
}

}  // namespace

cudaError_t max_shared_x_bytes(int* bytes) {
  // Asked once per device: the answer cannot change while the process runs.
  constexpr int kDevices = 64;
  static std::atomic<int> known[kDevices] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kDevices && known[device].load(std::memory_order_relaxed) > 0) {
    *bytes = known[device].load(std::memory_order_relaxed);
    return cudaSuccess;
  }
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  const int limit = std::min(kMaxSharedXBytes, optin - kGemvStaticSharedBytes);
  *bytes = limit > 0 ? limit : 0;
  if (device < kDevices) known[device].store(*bytes, std::memory_order_relaxed);
  return cudaSuccess;
}

cudaError_t gemv(Dtype dtype, const void* x, const int32_t* row_ptr, const int32_t* codes,
                 const int32_t* meta, const int32_t* schedule, int num_ctas, void* y, int M,
                 int N, int K, int group_size, int nnz, cudaStream_t stream, XStaging x_staging) {
  if (!shape_ok(N, K, group_size) || M < 0 || num_ctas < 0 || nnz < 0) return cudaErrorInvalidValue;
  if (M == 0 || N == 0 || num_ctas == 0) return cudaSuccess;
  int max_shared_x = 0;
  const cudaError_t queried = max_shared_x_bytes(&max_shared_x);
  if (queried != cudaSuccess) return queried;
  // One launch per kMaxGemvTokens tokens: rows m0.. of x and y are contiguous, so a slice of
  // tokens is just an offset.
  const size_t elem = 2;  // fp16 and bf16
  for (int m0 = 0; m0 < M; m0 += kMaxGemvTokens) {
    const int m = M - m0 < kMaxGemvTokens ? M - m0 : kMaxGemvTokens;
    const bool fits = shared_x_bytes(m, K) <= static_cast<size_t>(max_shared_x);
    bool shared_x = fits;
    switch (x_staging) {
      case XStaging::kAuto: break;
      case XStaging::kGlobal: shared_x = false; break;
      case XStaging::kShared:
        if (!fits) return cudaErrorInvalidValue;
        break;
      default: return cudaErrorInvalidValue;
    }
    const GemvArgs a{static_cast<const char*>(x) + static_cast<size_t>(m0) * K * elem, row_ptr, codes, meta,
                     schedule, num_ctas, static_cast<char*>(y) + static_cast<size_t>(m0) * N * elem,
                     N, K, nnz, shared_x, max_shared_x, stream};
    cudaError_t err = cudaErrorInvalidValue;
    switch (dtype) {
      case Dtype::kFloat16: err = gemv_for_group<__half>(a, m, group_size); break;
      case Dtype::kBFloat16: err = gemv_for_group<__nv_bfloat16>(a, m, group_size); break;
    }
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t sliced_gemv(Dtype dtype, const void* x, const int32_t* sell_rows, const int32_t* pieces, int num_pieces,
                        const int32_t* codes, const int32_t* meta, int32_t* parts, int num_part_slots, void* y,
                        int M, int N, int K, const int* warps_for, cudaStream_t stream, const NormSplit& split) {
  if (!shape_ok(N, K, 16) || M < 0 || num_pieces < 0 || num_part_slots < 0) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  if (num_pieces == 0) return cudaErrorInvalidValue;  // every slice has a piece, and N > 0
  int max_shared = 0;
  const cudaError_t queried = max_shared_x_bytes(&max_shared);
  if (queried != cudaSuccess) return queried;
  // Tokens per launch: up to kMaxSlicedTokens, as many as fit with the widest CTA.
  int per_launch = kMaxSlicedTokens;
  while (per_launch > 0 && sliced_smem_bytes(per_launch, K, 16) > static_cast<size_t>(max_shared)) --per_launch;
  if (per_launch == 0) return cudaErrorInvalidValue;  // K too large for the sliced layout
  const size_t elem = 2;  // fp16 and bf16
  for (int m0 = 0; m0 < M; m0 += per_launch) {
    const int m = M - m0 < per_launch ? M - m0 : per_launch;
    NormSplit s = split;  // its per-token tensors offset to this launch's tokens
    const size_t at = static_cast<size_t>(m0) * N;
    if (s.mode == NormSplitMode::kAddStats) {
      s.residual = static_cast<const char*>(s.residual) + at * elem;
      s.residual_out = static_cast<char*>(s.residual_out) + at * elem;
      s.g = static_cast<char*>(s.g) + at * elem;
      s.stats += static_cast<size_t>(m0) * num_pieces;
    } else if (s.mode == NormSplitMode::kFromStats) {
      s.residual = static_cast<const char*>(s.residual) + static_cast<size_t>(m0) * K * elem;
      s.stats += static_cast<size_t>(m0) * s.stats_pieces;
    }
    const SlicedArgs a{static_cast<const char*>(x) + static_cast<size_t>(m0) * K * elem,
                       reinterpret_cast<const int2*>(sell_rows), reinterpret_cast<const int4*>(pieces), num_pieces,
                       reinterpret_cast<const uint4*>(codes), reinterpret_cast<const uint4*>(meta), parts, num_part_slots,
                       y == nullptr ? nullptr : static_cast<char*>(y) + static_cast<size_t>(m0) * N * elem, N, K,
                       stream, s};
    const int warps = warps_for != nullptr ? warps_for[m - 1] : 8;
    cudaError_t err = cudaErrorInvalidValue;
    switch (dtype) {
      case Dtype::kFloat16: err = sliced_for_tokens<__half>(a, m, warps); break;
      case Dtype::kBFloat16: err = sliced_for_tokens<__nv_bfloat16>(a, m, warps); break;
    }
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

int tc_splits(int N, int num_chunks, int num_sms) {
  const int tiles = (N + kTcRows - 1) / kTcRows;
  // About two CTAs per SM, and at least four chunks per split. Every split pays a pipeline fill
  // and its fp32 partial sums, and the CTAs need not fill every SM slot. On the H200, one
  // Llama-2-7B layer (qkv and gate_up unsplit, o and down in 2 to 4) took 100.8 / 114.1 / 140.7 /
  // 212.4 us at 8 / 16 / 32 / 64 tokens with this rule, against 106.9 / 128.2 / 176.8 / 281.5 with
  // the previous one (CTAs for two waves at full occupancy, at least two chunks per split); on
  // compact tiles 75.4 / 89.9 / 113.6 / 177.5 against 87.1 / 107.6 / 147.5 / 247.0
  // (benchmarks/results/gpu/kernels_llama2-7b_h200_tc_splits{,_before}_r{1,64}.json; a sweep of fixed
  // splits on compact tiles, kernels_llama2-7b_h200_tc_splits_forced*_r64.json, found it).
  int splits = tiles > 0 ? 2 * (num_sms > 0 ? num_sms : 1) / tiles : 1;
  const int max_splits = num_chunks / 4;
  if (splits > max_splits) splits = max_splits;
  return splits > 1 ? splits : 1;
}

int sp_splits(int N, int num_chunks, int num_sms) {
  const int tiles = (N + kTcRows - 1) / kTcRows;
  const int sms = num_sms > 0 ? num_sms : 1;
  // A split is worth its pipeline fill and its partial sums only with at least 7 chunks (1,792
  // channels), and only if the CTAs either fit one per SM or put two on at least 80% of the SMs:
  // with two on some SMs and one on the rest, the SMs with two set the time. On the H200, 1 / 2 / 4
  // splits at 64 tokens: the Llama-3-8B q/k/v (96 tiles, 16 chunks) 20.9 / 22.9 / 27.5 us (tc_splits:
  // 2), the 4096 x 4096 o (64 tiles) 20.5 / 18.1 / 20.3 (tc_splits: 4), the Llama-2-7B down (64
  // tiles, 43 chunks) 50.7 / 34.0 / 30.8; this rule picks the fastest on 12 layer shapes at 16 and 64
  // tokens (benchmarks/results/gpu/kernels_pairs_h200_sp_splits_finish_s*.json; csrc/README.md).
  int splits = 2 * sms / (tiles > 0 ? tiles : 1);
  if (splits > num_chunks / 7) splits = num_chunks / 7;
  while (splits > 1 && tiles * splits > sms && 5 * tiles * splits < 8 * sms) --splits;
  return splits > 1 ? splits : 1;
}

bool tc_converts_x_once(Dtype dtype, int M) {
  return dtype == Dtype::kBFloat16 && M >= kTcScaleXOnceTokens;
}

cudaError_t tc_gemm(Dtype dtype, const void* x, const int32_t* row_ptr, const int32_t* sell_rows, int num_places,
                    const int32_t* codes, const int32_t* meta, const int32_t* chunks, const int32_t* xcols,
                    int num_chunks, void* y, float* workspace, int32_t* counters, void* x_scratch, int M, int N, int K,
                    int group_size, int splits, cudaStream_t stream) {
  if (!shape_ok(N, K, group_size) || M < 0 || splits < 1 || num_chunks < 0) return cudaErrorInvalidValue;
  if (xcols == nullptr && num_chunks != (K + kTcChunk - 1) / kTcChunk) return cudaErrorInvalidValue;
  if (sell_rows != nullptr && (xcols != nullptr || num_places < N)) return cudaErrorInvalidValue;
  // The grid's rows: places in the sliced layout, else rows.
  const int tile_rows = sell_rows != nullptr ? num_places : N;
  if (M == 0 || N == 0) return cudaSuccess;
  if (splits > 1 && (workspace == nullptr || counters == nullptr)) return cudaErrorInvalidValue;
  if (x_scratch != nullptr && K % 8 != 0) return cudaErrorInvalidValue;  // converted 16 bytes at a time
  const size_t elem = 2;  // fp16 and bf16
  for (int m0 = 0; m0 < M; m0 += kMaxTcTokens) {
    const int m = M - m0 < kMaxTcTokens ? M - m0 : kMaxTcTokens;
    // The scratch is reused by every slice: the launches of one stream run in order.
    void* scratch = tc_converts_x_once(dtype, m) ? x_scratch : nullptr;
    const TcArgs a{static_cast<const char*>(x) + static_cast<size_t>(m0) * K * elem, row_ptr,
                   reinterpret_cast<const int2*>(sell_rows), codes, meta, chunks, xcols, num_chunks,
                   static_cast<char*>(y) + static_cast<size_t>(m0) * N * elem, workspace, counters, scratch,
                   m, tile_rows, N, K, splits, stream};
    cudaError_t err = cudaErrorInvalidValue;
    switch (dtype) {
      case Dtype::kFloat16: err = tc_for_group<__half>(a, group_size); break;
      case Dtype::kBFloat16: err = tc_for_group<__nv_bfloat16>(a, group_size); break;
    }
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t sp_gemm(Dtype dtype, const void* x, const int32_t* codes, const int32_t* meta, void* y,
                    float* workspace, int32_t* counters, void* x_scratch, int M, int N, int K, int splits,
                    int num_sms, cudaStream_t stream, bool silu_mul, const NormSplit& norm) {
  if (!shape_ok(N, K, 16) || K % 32 != 0 || M < 0 || splits < 1) return cudaErrorInvalidValue;
  if (silu_mul && N % 2 != 0) return cudaErrorInvalidValue;
  if (norm.mode != NormSplitMode::kNone) {  // one launch of whole chunks; the first part has no y
    const bool add = norm.mode == NormSplitMode::kAddStats;
    if (K % kTcChunk != 0 || M > kMaxSpNormTokens || norm.residual == nullptr || norm.stats == nullptr ||
        (add && (silu_mul || norm.residual_out == nullptr || norm.g == nullptr ||
                 norm.stats_pieces != (N + kWarpSize - 1) / kWarpSize)) ||
        (!add && norm.stats_pieces < 1)) {
      return cudaErrorInvalidValue;
    }
  }
  if (M == 0 || N == 0) return cudaSuccess;
  if (splits > 1 && (workspace == nullptr || counters == nullptr)) return cudaErrorInvalidValue;
  const size_t elem = 2;  // fp16 and bf16
  const int gate_rows = silu_mul ? N / 2 : 0;
  const int y_cols = silu_mul ? N / 2 : N;
  for (int m0 = 0; m0 < M; m0 += kMaxTcTokens) {
    const int m = M - m0 < kMaxTcTokens ? M - m0 : kMaxTcTokens;
    void* scratch = tc_converts_x_once(dtype, m) ? x_scratch : nullptr;
    const SpArgs a{static_cast<const char*>(x) + static_cast<size_t>(m0) * K * elem, codes, meta,
                   y == nullptr ? nullptr : static_cast<char*>(y) + static_cast<size_t>(m0) * y_cols * elem,
                   workspace, counters, scratch, m, N, K, splits, num_sms, stream, gate_rows, norm};
    cudaError_t err = cudaErrorInvalidValue;
    switch (dtype) {
      case Dtype::kFloat16: err = sp_for_tokens<__half>(a); break;
      case Dtype::kBFloat16: err = sp_for_tokens<__nv_bfloat16>(a); break;
    }
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

bool sp_wgmma_supported(int K) {
  if (K <= 0 || K % kSpwChunk != 0) return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return false;
  return major == 9 && minor == 0;
}

int sp_wgmma_scratch_tokens(int M) {
  const int tile = spw_token_tile(M);  // sp_wgmma_for's 256-token tiles pad M no more than 128-token ones
  return M <= 0 ? 0 : (M + tile - 1) / tile * tile;
}

int sp_wgmma_max_splits(int K) {
  const int stages = K > 0 ? K / kSpwChunk : 0;
  return std::min(kSpwMaxSplits, (stages + stages % 2) / 2);
}

cudaError_t sp_wgmma_gemm(Dtype dtype, const void* x, const int32_t* codes, const int32_t* meta, void* y,
                          void* x_scratch, int M, int N, int K, int splits, int num_sms, cudaStream_t stream) {
  if (M < 0 || N < 0 || K < 0 || K / 16 > kMaxGroupCols) return cudaErrorInvalidValue;
  if (splits < 0 || splits > sp_wgmma_max_splits(K)) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  if (static_cast<size_t>(sp_wgmma_scratch_tokens(M)) * K >= (static_cast<size_t>(1) << 31)) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(x_scratch) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(codes) % 16 != 0 || reinterpret_cast<uintptr_t>(meta) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  if (!sp_wgmma_supported(K)) return cudaErrorNotSupported;
  switch (dtype) {
    case Dtype::kFloat16: return sp_wgmma_for<__half>(x, codes, meta, y, x_scratch, M, N, K, splits, num_sms, stream);
    case Dtype::kBFloat16:
      return sp_wgmma_for<__nv_bfloat16>(x, codes, meta, y, x_scratch, M, N, K, splits, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t dequantize(Dtype dtype, const int32_t* row_ptr, const int32_t* sell_rows, int num_places,
                       const int32_t* codes, const int32_t* meta, void* w, int N, int K, int group_size,
                       cudaStream_t stream) {
  if (!shape_ok(N, K, group_size) || num_places < 0) return cudaErrorInvalidValue;
  if (N == 0 || K == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::kFloat16:
      return dequant_for_group<__half>(row_ptr, sell_rows, num_places, codes, meta, w, N, K, group_size, stream);
    case Dtype::kBFloat16:
      return dequant_for_group<__nv_bfloat16>(row_ptr, sell_rows, num_places, codes, meta, w, N, K, group_size,
                                              stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gqsa
