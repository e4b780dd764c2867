// SPDX-License-Identifier: Apache-2.0
// Experiment (not part of the package): the first version of wgmma_prefill_experiment.cu. Each kept
// group is copied to its dense place in shared memory (as tc_kernel does), 8 and 4 bytes at a time;
// the template bit V & 2 waits for each wgmma before the next k-step (without it results are wrong),
// and bits 8 / 16 / 32 leave out the code and meta copies / the x copies / the dequantization, for
// the ablation in wgmma_prefill_experiment.json (results then wrong, timing only). V & 1 and V & 4
// were correctness probes (a second proxy fence; x through registers instead of cp.async).
// Build as wgmma_prefill_experiment.cu.
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

constexpr int kWarpSize = 32;
constexpr int kZeroShift = 16;
constexpr uint32_t kNibbleMask = 0xFu;
constexpr uint32_t kHalf2Magic = 0x64006400u;
constexpr int kLutAndOr = (0xF0 & 0xCC) | 0xAA;

template <int lut>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, %4;" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(lut));
  return d;
}
__device__ __forceinline__ __half2 as_half2(uint32_t v) { return *reinterpret_cast<__half2*>(&v); }
__device__ __forceinline__ uint32_t half2_bits(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async8(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(smem), "l"(gmem));
}
__device__ __forceinline__ void cp_async16_zfill(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4_zfill(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem), "l"(gmem), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::); }
template <int n>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(n));
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
  return v;
}

// As tc_a_pair in csrc/gqsa_kernels.cu.
__device__ __forceinline__ void tc_a_pair(uint2 w, uint32_t meta, uint32_t sel, uint32_t& lo, uint32_t& hi) {
  const uint32_t p = __byte_perm(w.x, w.y, sel);
  const uint32_t z = (meta >> kZeroShift) & kNibbleMask;
  const __half2 neg = as_half2(z * 0x100001u + 0xD400E400u);
  const __half2 one_sixteenth = as_half2(0x2C003C00u);
  const __half2 scale = __low2half2(as_half2(meta));
  lo = half2_bits(__hmul2(__hfma2(as_half2(lop3<kLutAndOr>(p, 0x00F0000Fu, kHalf2Magic)), one_sixteenth, neg), scale));
  hi = half2_bits(
      __hmul2(__hfma2(as_half2(lop3<kLutAndOr>(p >> 8, 0x00F0000Fu, kHalf2Magic)), one_sixteenth, neg), scale));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int n>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(n) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
template <int n>
__device__ __forceinline__ void fence_acc(float (&d)[n]) {
#pragma unroll
  for (int i = 0; i < n; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void wgmma_rs_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, 1, 1, 1, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}

__device__ __forceinline__ void wgmma_rs_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, 1, 1, 1, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}

template <int BN>
__device__ __forceinline__ void wgmma_rs(float (&d)[BN / 2], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (BN == 64) {
    wgmma_rs_n64(d, a, desc);
  } else {
    wgmma_rs_n128(d, a, desc);
  }
}

constexpr int kWgRows = 256;  // 4 warpgroups x 64 rows
constexpr int kWgThreads = 512;
constexpr int kChunk = 256;
constexpr int kCols = 16;  // G = 16

template <int BN>
struct WgLayout {
  static constexpr int kXBytes = BN * kChunk * 2;
  static constexpr int kCodeBytes = kWgRows * kChunk / 2;
  static constexpr int kMetaBytes = kWgRows * kCols * 4;
  static constexpr int kEntryBytes = kWgRows * 4;
  static constexpr int kStageBytes = kXBytes + kCodeBytes + kMetaBytes + kEntryBytes;
  static constexpr int kBytes = 2 * kStageBytes;
  static constexpr int kKStride = BN * 16;  // bytes between 8-channel column blocks of x
  static constexpr int kOutPitch = kWgRows + 8;  // halves per token row of the staged output
  static_assert(BN * kOutPitch * 2 <= kBytes, "the output tile fits");
};

__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32);
}

template <int BN, int V>
__global__ void __launch_bounds__(kWgThreads, 1)
    wg_kernel(const __half* __restrict__ x, const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ codes,
              const int32_t* __restrict__ meta, const int32_t* __restrict__ chunks, int num_chunks,
              __half* __restrict__ y, int M, int N, int K, uint32_t lbo, uint32_t sbo) {
  using L = WgLayout<BN>;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t s0 = smem_addr(smem);
  const int tile = blockIdx.x;
  const int tok0 = blockIdx.y * BN;

  // Copies of codes and meta: two threads per row, slots part * 8 .. + 7.
  const int copy_row = threadIdx.x >> 1;
  const int part = threadIdx.x & 1;
  const int grow = tile * kWgRows + copy_row;
  const bool row_ok = grow < N;
  const int row_first = row_ok ? __ldg(row_ptr + grow) : 0;
  const int32_t* row_entries = chunks + static_cast<size_t>(row_ok ? grow : 0) * num_chunks;
  const uint32_t code_row = s0 + L::kXBytes + copy_row * 128;
  const uint32_t meta_row = s0 + L::kXBytes + L::kCodeBytes + copy_row * 64;
  const uint32_t entry_dst = s0 + L::kXBytes + L::kCodeBytes + L::kMetaBytes + 4 * copy_row;
  const int cr7 = copy_row & 7;
  const int cr_meta = (copy_row >> 1) & 3;

  // x copies: token tok_lo + 8 * (tok_hi + 2 j), 8-channel block c8.
  const int tok_lo = threadIdx.x & 7;
  const int c8 = (threadIdx.x >> 3) & 31;
  const int tok_hi = threadIdx.x >> 8;
  constexpr int kXCopies = BN / 16;
  const uint32_t x_dst = s0 + c8 * L::kKStride + tok_hi * 128 + tok_lo * 16;
  const int x_tok = tok0 + tok_hi * 8 + tok_lo;
  const __half* x_src = x + static_cast<size_t>(x_tok) * K + c8 * 8;

  auto issue = [&](int i, int s, int entry) {
    const uint32_t stage = static_cast<uint32_t>(s * L::kStageBytes);
    if (part == 0) {
      const bool ok = row_ok && i + 1 < num_chunks;
      cp_async4_zfill(entry_dst + stage, ok ? row_entries + i + 1 : chunks, ok);
    }
    const uint32_t mask = (V & 8) ? 0u : static_cast<uint32_t>(entry) & 0xFFFFu;
    const int first = row_first + static_cast<int>(static_cast<uint32_t>(entry) >> 16);
#pragma unroll
    for (int jj = 0; jj < 8; ++jj) {
      const int j = part * 8 + jj;
      const bool kept = row_ok && ((mask >> j) & 1u);
      const int group = first + __popc(mask & ((1u << j) - 1u));
      if constexpr (V & 8) continue;
      if (kept) cp_async8(code_row + stage + 16 * ((j >> 1) ^ cr7) + 8 * (j & 1), codes + 2 * static_cast<size_t>(group));
      cp_async4_zfill(meta_row + stage + 16 * ((j >> 2) ^ cr_meta) + 4 * (j & 3), kept ? meta + group : meta, kept);
    }
    const int ch = i * kChunk + c8 * 8;
#pragma unroll
    for (int j = 0; j < kXCopies; ++j) {
      if constexpr (V & 16) break;
      const bool valid = ch < K && x_tok + 16 * j < M;
      if constexpr (V & 4) {
        uint4 v = valid ? *reinterpret_cast<const uint4*>(x_src + static_cast<size_t>(16 * j) * K + i * kChunk) : make_uint4(0, 0, 0, 0);
        asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" :: "r"(x_dst + stage + j * 256), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
        continue;
      }
      cp_async16_zfill(x_dst + stage + j * 256, valid ? x_src + static_cast<size_t>(16 * j) * K + i * kChunk : x, valid);
    }
  };

  {
    const int e0 = row_ok && num_chunks > 0 ? __ldg(row_entries) : 0;
    if (num_chunks > 0) issue(0, 0, e0);
    cp_async_commit();
  }

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int wg = warp / 4;
  const int g = lane / 4;
  const int q = lane % 4;
  const uint32_t sel = q | (q + 4) << 4 | q << 8 | (q + 4) << 12;
  const int row_a = wg * 64 + (warp % 4) * 16 + g;  // and row_a + 8
  const uint32_t code_a = s0 + L::kXBytes + row_a * 128;
  const uint32_t meta_a = s0 + L::kXBytes + L::kCodeBytes + row_a * 64;
  const int g_meta = (g >> 1) & 3;

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

  for (int i = 0; i < num_chunks; ++i) {
    const int s = i & 1;
    const uint32_t stage = static_cast<uint32_t>(s * L::kStageBytes);
    cp_async_wait<0>();
    fence_proxy_async();
    wgmma_wait<0>();
    __syncthreads();
    if constexpr (V & 1) fence_proxy_async();
    if (i + 1 < num_chunks) {
      const int entry = *reinterpret_cast<const int*>(smem + stage + L::kXBytes + L::kCodeBytes + L::kMetaBytes + 4 * copy_row);
      issue(i + 1, s ^ 1, entry);
    }
    cp_async_commit();

    uint32_t a[2][4];
    uint4 ca, cb, ma, mb;
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {
      if (kk % 2 == 0) {
        ca = lds128(code_a + stage + 16 * ((kk / 2) ^ g));
        cb = lds128(code_a + stage + 8 * 128 + 16 * ((kk / 2) ^ g));
      }
      if (kk % 4 == 0) {
        ma = lds128(meta_a + stage + 16 * ((kk / 4) ^ g_meta));
        mb = lds128(meta_a + stage + 8 * 64 + 16 * ((kk / 4) ^ g_meta));
      }
      const uint2 wa = kk % 2 ? make_uint2(ca.z, ca.w) : make_uint2(ca.x, ca.y);
      const uint2 wb = kk % 2 ? make_uint2(cb.z, cb.w) : make_uint2(cb.x, cb.y);
      const uint32_t mta = kk % 4 == 0 ? ma.x : kk % 4 == 1 ? ma.y : kk % 4 == 2 ? ma.z : ma.w;
      const uint32_t mtb = kk % 4 == 0 ? mb.x : kk % 4 == 1 ? mb.y : kk % 4 == 2 ? mb.z : mb.w;
      uint32_t(&ak)[4] = a[kk % 2];
      if constexpr (V & 32) {
        ak[0] = wa.x; ak[1] = wb.x; ak[2] = wa.y ^ mta; ak[3] = wb.y ^ mtb;
      } else {
        tc_a_pair(wa, mta, sel, ak[0], ak[2]);
        tc_a_pair(wb, mtb, sel, ak[1], ak[3]);
      }
      wgmma_fence();
      fence_acc(acc);
      wgmma_rs<BN>(acc, ak, make_desc(s0 + stage + kk * 2 * L::kKStride, lbo, sbo));
      fence_acc(acc);
      wgmma_commit();
      if constexpr (V & 2) {
        wgmma_wait<0>();
      } else {
        wgmma_wait<1>();
      }
    }
  }
  wgmma_wait<0>();
  fence_acc(acc);
  cp_async_wait<0>();
  __syncthreads();

  // Stage the tile as [token][row] halves, then write 16-byte runs of rows.
  __half* out = reinterpret_cast<__half*>(smem);
  const int lrow = row_a;
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
    const int t = 8 * j + 2 * q;
    out[t * L::kOutPitch + lrow] = __float2half_rn(acc[4 * j + 0]);
    out[(t + 1) * L::kOutPitch + lrow] = __float2half_rn(acc[4 * j + 1]);
    out[t * L::kOutPitch + lrow + 8] = __float2half_rn(acc[4 * j + 2]);
    out[(t + 1) * L::kOutPitch + lrow + 8] = __float2half_rn(acc[4 * j + 3]);
  }
  __syncthreads();
  const bool n_vec = N % 8 == 0;
  for (int u = threadIdx.x; u < BN * (kWgRows / 8); u += kWgThreads) {
    const int t = u / (kWgRows / 8);
    const int r = (u % (kWgRows / 8)) * 8;
    const int tok = tok0 + t;
    const int row = tile * kWgRows + r;
    if (tok >= M || row >= N) continue;
    const __half* src = out + t * L::kOutPitch + r;
    __half* dst = y + static_cast<size_t>(tok) * N + row;
    if (n_vec) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8 && row + e < N; ++e) dst[e] = src[e];
    }
  }
}

template <int BN, int V>
int launch(const void* x, const int32_t* row_ptr, const int32_t* codes, const int32_t* meta, const int32_t* chunks,
           void* y, int M, int N, int K, uint32_t lbo, uint32_t sbo, cudaStream_t stream) {
  using L = WgLayout<BN>;
  const auto kernel = wg_kernel<BN, V>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((N + kWgRows - 1) / kWgRows, (M + BN - 1) / BN);
  const int num_chunks = (K + kChunk - 1) / kChunk;
  kernel<<<grid, kWgThreads, L::kBytes, stream>>>(static_cast<const __half*>(x), row_ptr, codes, meta, chunks,
                                                  num_chunks, static_cast<__half*>(y), M, N, K, lbo, sbo);
  return cudaGetLastError();
}

template <int BN>
int launch_v(int v, const void* x, const int32_t* row_ptr, const int32_t* codes, const int32_t* meta, const int32_t* chunks,
             void* y, int M, int N, int K, cudaStream_t st) {
  const uint32_t ks = BN * 16;
  switch (v) {
    case 0: return launch<BN, 0>(x, row_ptr, codes, meta, chunks, y, M, N, K, ks, 128, st);
    case 2: return launch<BN, 2>(x, row_ptr, codes, meta, chunks, y, M, N, K, ks, 128, st);
    case 10: return launch<BN, 10>(x, row_ptr, codes, meta, chunks, y, M, N, K, ks, 128, st);
    case 18: return launch<BN, 18>(x, row_ptr, codes, meta, chunks, y, M, N, K, ks, 128, st);
    case 34: return launch<BN, 34>(x, row_ptr, codes, meta, chunks, y, M, N, K, ks, 128, st);
    case 58: return launch<BN, 58>(x, row_ptr, codes, meta, chunks, y, M, N, K, ks, 128, st);
    case 56: return launch<BN, 56>(x, row_ptr, codes, meta, chunks, y, M, N, K, ks, 128, st);
    case 8: return launch<BN, 8>(x, row_ptr, codes, meta, chunks, y, M, N, K, ks, 128, st);
    case 32: return launch<BN, 32>(x, row_ptr, codes, meta, chunks, y, M, N, K, ks, 128, st);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" int wg_gemm(const void* x, const int32_t* row_ptr, const int32_t* codes, const int32_t* meta,
                       const int32_t* chunks, void* y, int M, int N, int K, int bn, int v, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return bn == 64 ? launch_v<64>(v, x, row_ptr, codes, meta, chunks, y, M, N, K, st)
                  : launch_v<128>(v, x, row_ptr, codes, meta, chunks, y, M, N, K, st);
}
