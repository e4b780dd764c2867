// SPDX-License-Identifier: Apache-2.0
// Experiment (not part of the package): a fused prefill GEMM on Hopper warpgroup MMA (wgmma).
// Each row's kept groups of a 256-channel chunk are copied compactly into shared memory, dequantized
// into wgmma's register A operand (tc_a_pair, as in csrc/gqsa_kernels.cu), and multiplied with x
// (the B operand, tokens) from shared memory in the no-swizzle K-major layout. 256 rows (4 warpgroups)
// by 64 or 128 tokens per CTA, two cp.async stages. G = 16, fp16 x only.
// Build: nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -shared -Xcompiler -fPIC \
//          -o wg.so wgmma_prefill_experiment.cu   (from this folder)
// Results and what they mean: csrc/README.md, "A fused wgmma prefill kernel".
// The helpers (cp.async, tc_a_pair, ...) are the package's own.
#include "../../../csrc/gqsa_kernels.cu"

namespace gqsa {
namespace {

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
  static constexpr int kStageBytes = kXBytes + kCodeBytes + kMetaBytes;
  static constexpr int kEntrySlotBytes = kWgRows * 4;
  static constexpr int kEntryOffset = 2 * kStageBytes;
  static constexpr int kBytes = 2 * kStageBytes + 3 * kEntrySlotBytes;
  static constexpr int kKStride = BN * 16;  // bytes between 8-channel column blocks of x
  static constexpr int kOutPitch = kWgRows + 8;  // halves per token row of the staged output
  static_assert(BN * kOutPitch * 2 <= kBytes, "the output tile fits");
};

__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32);
}
__device__ __forceinline__ uint2 lds64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr) : "memory");
  return v;
}

// Each row's kept groups of a chunk are stored compactly (group j of the row's chunk at position
// j, XOR-swizzled by row against bank conflicts); the reader finds slot kk's group by popcount.
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
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;

  // Copies of codes and meta: pass p (0..7) copies row p * 32 + 2 * warp + lane / 16, group lane % 16.
  const int cl = lane & 15;
  int first_of[8];
#pragma unroll
  for (int p = 0; p < 8; ++p) {
    const int r = tile * kWgRows + p * 32 + 2 * warp + (lane >> 4);
    first_of[p] = r < N ? __ldg(row_ptr + r) : 0;
  }
  // Chunk table entries: thread t < 256 copies row t's, one chunk ahead of the copies that use them,
  // into slot i % 3 (slot i % 3 is read by chunk i's copies and then by chunk i's dequantization).
  const int e_row = threadIdx.x & (kWgRows - 1);
  const bool e_ok = threadIdx.x < kWgRows && tile * kWgRows + e_row < N;
  const int32_t* e_src = chunks + static_cast<size_t>(e_ok ? tile * kWgRows + e_row : 0) * num_chunks;
  auto copy_entries = [&](int i) {
    if (threadIdx.x < kWgRows) {
      const bool ok = e_ok && i < num_chunks;
      cp_async4_zfill(s0 + L::kEntryOffset + (i % 3) * L::kEntrySlotBytes + 4 * e_row, ok ? e_src + i : chunks, ok);
    }
  };
  const int32_t* entries = reinterpret_cast<const int32_t*>(smem + L::kEntryOffset);

  // x copies: token tok_lo + 8 * (tok_hi + 2 j), 8-channel block c8.
  const int tok_lo = threadIdx.x & 7;
  const int c8 = (threadIdx.x >> 3) & 31;
  const int tok_hi = threadIdx.x >> 8;
  constexpr int kXCopies = BN / 16;
  const uint32_t x_dst = s0 + c8 * L::kKStride + tok_hi * 128 + tok_lo * 16;
  const int x_tok = tok0 + tok_hi * 8 + tok_lo;
  const __half* x_src = x + static_cast<size_t>(x_tok) * K + c8 * 8;

  auto issue = [&](int i, int s) {
    const uint32_t stage = static_cast<uint32_t>(s * L::kStageBytes);
    copy_entries(i + 1);
    const int32_t* slot = entries + (i % 3) * kWgRows;
#pragma unroll
    for (int p = 0; p < 8; ++p) {
      const int r = p * 32 + 2 * warp + (lane >> 4);
      const uint32_t entry = static_cast<uint32_t>(slot[r]);
      const int count = __popc(entry & 0xFFFFu);
      if (cl < count) {
        const int group = first_of[p] + static_cast<int>(entry >> 16) + cl;
        cp_async<8>(s0 + stage + L::kXBytes + r * 128 + 8 * (cl ^ (2 * (r & 7))), codes + 2 * static_cast<size_t>(group));
        cp_async4_zfill(s0 + stage + L::kXBytes + L::kCodeBytes + r * 64 + 4 * (cl ^ (2 * ((r >> 1) & 3))), meta + group, true);
      }
    }
    const int ch = i * kChunk + c8 * 8;
#pragma unroll
    for (int j = 0; j < kXCopies; ++j) {
      const bool valid = ch < K && x_tok + 16 * j < M;
      cp_async16_zfill(x_dst + stage + j * 256, valid ? x_src + static_cast<size_t>(16 * j) * K + i * kChunk : x, valid);
    }
  };

  // Prologue: the entries of chunk 0, then chunk 0's copies (which bring chunk 1's entries).
  copy_entries(0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  if (num_chunks > 0) issue(0, 0);
  cp_async_commit();

  const int wg = warp / 4;
  const int g = lane / 4;
  const int q = lane % 4;
  const uint32_t sel = q | (q + 4) << 4 | q << 8 | (q + 4) << 12;
  const int row_a = wg * 64 + (warp % 4) * 16 + g;  // and row_a + 8
  const uint32_t code_a = s0 + L::kXBytes + row_a * 128;
  const uint32_t meta_a = s0 + L::kXBytes + L::kCodeBytes + row_a * 64;
  const int code_swz = 2 * g;
  const int meta_swz = 2 * ((g >> 1) & 3);

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
    if (i + 1 < num_chunks) issue(i + 1, s ^ 1);
    cp_async_commit();
    const uint32_t mask_a = static_cast<uint32_t>(entries[(i % 3) * kWgRows + row_a]) & 0xFFFFu;
    const uint32_t mask_b = static_cast<uint32_t>(entries[(i % 3) * kWgRows + row_a + 8]) & 0xFFFFu;

    uint32_t a[2][4];
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {
      const int ia = __popc(mask_a & ((1u << kk) - 1u));
      const int ib = __popc(mask_b & ((1u << kk) - 1u));
      const uint2 wa = lds64(code_a + stage + 8 * (ia ^ code_swz));
      const uint2 wb = lds64(code_a + stage + 8 * 128 + 8 * (ib ^ code_swz));
      uint32_t mta = lds32(meta_a + stage + 4 * (ia ^ meta_swz));
      uint32_t mtb = lds32(meta_a + stage + 8 * 64 + 4 * (ib ^ meta_swz));
      mta = (mask_a >> kk) & 1u ? mta : 0u;
      mtb = (mask_b >> kk) & 1u ? mtb : 0u;
      uint32_t(&ak)[4] = a[kk % 2];
      tc_a_pair(wa, mta, sel, ak[0], ak[2]);
      tc_a_pair(wb, mtb, sel, ak[1], ak[3]);
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
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace gqsa

using gqsa::launch_v;

extern "C" int wg_gemm(const void* x, const int32_t* row_ptr, const int32_t* codes, const int32_t* meta,
                       const int32_t* chunks, void* y, int M, int N, int K, int bn, int v, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  return bn == 64 ? launch_v<64>(v, x, row_ptr, codes, meta, chunks, y, M, N, K, st)
                  : launch_v<128>(v, x, row_ptr, codes, meta, chunks, y, M, N, K, st);
}
