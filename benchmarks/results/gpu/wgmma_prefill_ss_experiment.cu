// SPDX-License-Identifier: Apache-2.0
// Experiment (not part of the package): a fused prefill GEMM whose A operand is dequantized into
// shared memory by a warpgroup of its own, so that the math warpgroups issue nothing but wgmmas.
// The TMA version before it (wgmma_prefill_tma_experiment.cu) dequantized in the math warpgroups,
// into wgmma's register A operand, and every token tile repeated that work between its wgmmas:
// Nsight Compute put the tensor pipe at 55% busy (csrc/README.md, "The TMA version").
//   * Warpgroup 0 (or 0 and 1, -DWG_PRODUCER_WARPGROUPS=2) fills each stage. Thread 0 loads x
//     with TMA (one box of kTok tokens x 64 channels, 128-byte swizzle, zeros past M and K). Thread
//     r dequantizes row r of the CTA's 128 rows (with two warpgroups, half of it each): the row's
//     4 group columns of the stage become 64 fp16 weights (zeros for pruned columns) in wgmma's
//     K-major 128-byte-swizzled layout, so A is read by a descriptor like x. Each row's codes and
//     meta for the next stage are loaded before this stage's math, and the chunk-table entry (16
//     group columns) one entry ahead.
//   * Warpgroups 1 and 2 (64 rows each) wait on a stage, issue its four m64nNk16 wgmmas (A and B
//     from shared memory) as one group, wait for the group before, and free that stage.
// 128 rows by kTok tokens per CTA (128 or 256), 64 input channels per stage, G = 16, fp16 x
// (K % 8 == 0 for TMA's row stride). Build (from this folder):
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -shared -Xcompiler -fPIC \
//     -Xptxas -v -o wg_ss.so wgmma_prefill_ss_experiment.cu
//   (the same with -DWG_PRODUCER_WARPGROUPS=2 -o wg_ss_p2.so: 128-token tiles only)
// Run: python wgmma_prefill_experiment.py wg_ss.so check | layers | tokens 512 | ablate 0,11,12,14
// (the harness's bn = 64 runs 128-token tiles, bn = 128 256-token tiles; v = 0 or 2 is the kernel,
// 10 + bits the ablations, whose results are wrong: 1 no code/meta loads (zero codes dequantized),
// 2 no dequantization or A stores at all, 4 no wgmma).
#include <cuda.h>
#include <cudaTypedefs.h>

#include <type_traits>

#ifndef WG_PRODUCER_WARPGROUPS
#define WG_PRODUCER_WARPGROUPS 1
#endif
#ifndef WG_CLUSTER
#define WG_CLUSTER 1
#endif

// The helpers (smem_addr, zero_pair, dequant_pairs, ...) are the package's own.
#include "../../../csrc/gqsa_kernels.cu"

namespace gqsa {
namespace {

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int n>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(n) : "memory");
}
template <int n>
__device__ __forceinline__ void fence_acc(float (&d)[n]) {
#pragma unroll
  for (int i = 0; i < n; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D += A * B, both from shared memory (descriptors), fp16 in, fp32 accumulators.
__device__ __forceinline__ void wgmma_ss(float (&d)[64], uint64_t a_desc, uint64_t b_desc) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, 1, 1, 1, 0, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a_desc), "l"(b_desc));
}

__device__ __forceinline__ void wgmma_ss(float (&d)[128], uint64_t a_desc, uint64_t b_desc) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, 1, 1, 1, 0, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(a_desc), "l"(b_desc));
}

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, int bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, int parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          dst),
      "l"(map), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void sts128(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
// Makes this thread's shared-memory stores visible to the async proxy (wgmma's operand reads).
template <int kCl>
__device__ __forceinline__ void fence_proxy_async() {
  if constexpr (kCl > 1) {
    asm volatile("fence.proxy.async.shared::cluster;" ::: "memory");
  } else {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
}

// Thread block clusters: the peer CTA's shared memory and barriers.
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
// The shared::cluster address of `addr` (this CTA's shared memory) in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t mapa(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
__device__ __forceinline__ void sts128_cluster(uint32_t addr, uint4 v) {
  asm volatile("st.shared::cluster.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t cluster_addr) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(cluster_addr) : "memory");
}
__device__ __forceinline__ void mbar_wait_cluster(uint32_t bar, int parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
template <int kCl>
__device__ __forceinline__ void wait_bar(uint32_t bar, int parity) {
  if constexpr (kCl > 1) {
    mbar_wait_cluster(bar, parity);
  } else {
    mbar_wait(bar, parity);
  }
}
// Every thread of the cluster (not warp-aligned: threads arrive from different places).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

// wgmma descriptor of a K-major operand in the 128-byte swizzle: 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t swizzle128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

constexpr int kRows = 128;  // rows per CTA: 2 math warpgroups x 64
constexpr int kChunkCh = 64;  // input channels per stage: 4 group columns, one 128-byte row
constexpr int kConsumers = 256;
constexpr int kOutPitch = kRows + 8;

template <int kTok, int kPWG, int kCl>
struct Layout {
  // kPWG dequantizing warpgroups per CTA and kCl CTAs per cluster (along the tokens, sharing A):
  // thread p of cluster rank k owns row p % 128 and kSlots group columns of each stage, from
  // kSlots * (p / 128 + kPWG * k) on, and writes them to every CTA of its cluster.
  static constexpr int kProducers = 128 * kPWG;
  static constexpr int kSlots = 4 / (kPWG * kCl);
  static_assert(kSlots * kPWG * kCl == 4, "the stage's 4 group columns split evenly");
  static constexpr int kThreads = kProducers + kConsumers;
  static constexpr int kXBytes = kTok * 128;  // x: [kTok tokens][64 channels], one TMA box
  static constexpr int kABytes = kRows * 128;  // A: [128 rows][64 channels]
  static constexpr int kStageBytes = kXBytes + kABytes;
  static constexpr int kStages = 192 * 1024 / kStageBytes;  // 6 for 128 tokens, 4 for 256
  static constexpr int kSmemBytes = kStages * kStageBytes + 2 * kStages * 8 + 1024;  // + alignment slack
  static_assert(kStageBytes % 1024 == 0, "stages keep the 128-byte swizzle's 1024-byte alignment");
  static_assert(kTok * kOutPitch * 2 <= kStages * kStageBytes, "the output tile fits");
  static_assert(kSmemBytes <= 227 * 1024, "fits Hopper's shared memory");
};

// One stage of one thread's group columns: codes and meta, zero for a pruned column (scale 0
// dequantizes to zeros, so every column takes one path).
template <int kSlots>
struct RowStage {
  uint2 code[kSlots];
  uint32_t meta[kSlots];
};

// The 16 weights of one group in channel order, as two 16-byte runs of fp16: (q - z) exact from
// dequant_pairs (pairs (0, 4), (1, 5), (2, 6), (3, 7) of each word), times the scale with one
// rounding (as the reference's fp32 product rounded to fp16), then put in channel order by PRMT.
__device__ __forceinline__ void dequant_group16(uint2 code, uint32_t meta, uint4& lo, uint4& hi) {
  const ZeroPair zp = zero_pair(meta);
  const __half2 s2 = as_half2((meta & kScaleMask) * 0x00010001u);
  const uint32_t words[2] = {code.x, code.y};
  uint4 out[2];
#pragma unroll
  for (int w = 0; w < 2; ++w) {
    __half2 h[4];
    dequant_pairs(words[w], zp, h);
    uint32_t b[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) b[k] = half2_bits(__hmul2(h[k], s2));
    out[w] = make_uint4(__byte_perm(b[0], b[1], 0x5410), __byte_perm(b[2], b[3], 0x5410),
                        __byte_perm(b[0], b[1], 0x7632), __byte_perm(b[2], b[3], 0x7632));
  }
  lo = out[0];
  hi = out[1];
}

template <int kTok, int kPWG, int kCl, int V>
__global__ void __launch_bounds__(Layout<kTok, kPWG, kCl>::kThreads, 1)
    wg_ss_kernel(const __grid_constant__ CUtensorMap x_map, const int32_t* __restrict__ row_ptr,
                 const int32_t* __restrict__ codes, const int32_t* __restrict__ meta,
                 const int32_t* __restrict__ chunks, int num_entries, int num_stages_k, int split_stages,
                 __half* __restrict__ y, int M, int N, float* __restrict__ ws, int* __restrict__ flags) {
  using L = Layout<kTok, kPWG, kCl>;
  constexpr int kProducers = L::kProducers;
  constexpr int kSlots = L::kSlots;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t s0 = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (s0 - raw);
  const uint32_t bars = s0 + L::kStages * L::kStageBytes;
  auto full_bar = [&](int s) { return bars + 8 * s; };
  auto empty_bar = [&](int s) { return bars + 8 * (L::kStages + s); };
  const int tile = blockIdx.x;
  const int tok0 = blockIdx.y * kTok;
  // K split blockIdx.z runs stages i0 .. i1 - 1 (split_stages is a multiple of 4: whole entries).
  const int i0 = blockIdx.z * split_stages;
  const int i1 = min(num_stages_k, i0 + split_stages);

  if (threadIdx.x == 0) {
    for (int s = 0; s < L::kStages; ++s) {
      // Full: every producer thread of the cluster arrives once its A stores are fenced; thread 0
      // also expects the TMA bytes. Empty: every math warp of the cluster arrives once (a producer
      // writes to every CTA of its cluster).
      mbar_init(full_bar(s), kProducers * kCl);
      mbar_init(empty_bar(s), kConsumers / kWarpSize * kCl);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if constexpr (kCl > 1) {
    cluster_sync();  // the peer's barriers are initialized before anything arrives on them
  } else {
    __syncthreads();
  }
  const uint32_t rank = kCl > 1 ? cluster_rank() : 0u;

  if (threadIdx.x < kProducers) {
    // ---- the dequantizing warpgroups ----
    const int r = threadIdx.x % kRows;
    const int c0 = kSlots * (threadIdx.x / kRows + kPWG * static_cast<int>(rank));  // first group column
    const int row = tile * kRows + r;
    const bool ok = row < N;  // rows past N are never stored, so their A is left as it is
    const int first = ok ? __ldg(row_ptr + row) : 0;
    const int32_t* entries = chunks + static_cast<size_t>(ok ? row : 0) * num_entries;
    uint32_t entry = ok ? static_cast<uint32_t>(__ldg(entries + i0 / 4)) : 0u;
    uint32_t entry_next = ok && i0 / 4 + 1 < num_entries ? static_cast<uint32_t>(__ldg(entries + i0 / 4 + 1)) : 0u;
    const uint2* code2 = reinterpret_cast<const uint2*>(codes);

    // Stage i's codes and meta of this thread's columns (4 stages per chunk-table entry).
    auto load = [&](int i, RowStage<kSlots>& rs) {
      const int part = i % 4;
      if (part == 0 && i > i0) {
        entry = entry_next;
        const int c = i / 4 + 1;
        entry_next = ok && c < num_entries ? static_cast<uint32_t>(__ldg(entries + c)) : 0u;
      }
      const uint32_t mask = (entry >> (4 * part)) & 0xFu;
      const int base = first + static_cast<int>(entry >> 16) + __popc(entry & ((1u << (4 * part)) - 1u));
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        const int c = c0 + j;
        const bool kept = !(V & 1) && ((mask >> c) & 1u);
        const int gi = base + __popc(mask & ((1u << c) - 1u));
        rs.code[j] = kept ? __ldg(code2 + gi) : make_uint2(0u, 0u);
        rs.meta[j] = kept ? static_cast<uint32_t>(__ldg(meta + gi)) : 0u;
      }
    };
    // Stage i: x by TMA (thread 0), this thread's columns of A, then the stage is full.
    auto produce = [&](int i, const RowStage<kSlots>& rs) {
      const int j = i - i0;  // this CTA's j-th stage
      const int s = j % L::kStages;
      if (j >= L::kStages) wait_bar<kCl>(empty_bar(s), ((j / L::kStages) - 1) & 1);
      const uint32_t stage = s0 + s * L::kStageBytes;
      if (threadIdx.x == 0) {
        mbar_expect_tx(full_bar(s), L::kXBytes);
        tma_load_2d(stage, &x_map, i * kChunkCh, tok0, full_bar(s));
      }
      if (!(V & 2) && ok) {
        // Row r's 128 bytes; 16-byte unit u sits at unit u ^ (r % 8) (the 128-byte swizzle).
        const uint32_t a_row = stage + L::kXBytes + r * 128;
#pragma unroll
        for (int j = 0; j < kSlots; ++j) {
          const int c = c0 + j;
          uint4 lo, hi;
          dequant_group16(rs.code[j], rs.meta[j], lo, hi);
          const uint32_t at_lo = a_row + (((2 * c) ^ (r & 7)) << 4);
          const uint32_t at_hi = a_row + (((2 * c + 1) ^ (r & 7)) << 4);
          sts128(at_lo, lo);
          sts128(at_hi, hi);
          if constexpr (kCl > 1) {
            const uint32_t peer = mapa(stage, rank ^ 1u) - stage;  // the peer's same stage
            sts128_cluster(at_lo + peer, lo);
            sts128_cluster(at_hi + peer, hi);
          }
        }
      }
      fence_proxy_async<kCl>();
      mbar_arrive(full_bar(s));
      if constexpr (kCl > 1) mbar_arrive_cluster(mapa(full_bar(s), rank ^ 1u));
    };

    // Each stage's loads are issued two stages before it is dequantized (three register sets in
    // turn, so nothing is copied between them): one stage ahead was not enough (the loads' latency
    // showed in the kernel's time, csrc/README.md).
    RowStage<kSlots> a, b, d;
    load(i0, a);
    if (i0 + 1 < i1) load(i0 + 1, b);
    for (int i = i0; i < i1; i += 3) {
      if (i + 2 < i1) load(i + 2, d);
      produce(i, a);
      if (i + 1 >= i1) break;
      if (i + 3 < i1) load(i + 3, a);
      produce(i + 1, b);
      if (i + 2 >= i1) break;
      if (i + 4 < i1) load(i + 4, b);
      produce(i + 2, d);
    }
    if constexpr (kCl > 1) cluster_sync();  // the peer may still arrive on this CTA's barriers
    return;
  }

  // ---- the math warpgroups ----
  const int ct = threadIdx.x - kProducers;
  const int wg = ct / 128;
  const int cw = (ct / kWarpSize) % 4;
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane / 4;
  const int q = lane % 4;
  const int row_a = wg * 64 + cw * 16 + g;  // and row_a + 8

  float acc[kTok / 2];
#pragma unroll
  for (int j = 0; j < kTok / 2; ++j) acc[j] = 0.f;

  // One stage's four wgmmas as one group; all stages but the last leave it in flight while the
  // next stage's barrier is awaited, the last waits for it, so nothing is in flight when the
  // accumulators are read (csrc/README.md, "A correctness trap"). With the last stage inside the
  // loop instead (its wait a branch on i, or a wait for all after the loop), ptxas 13.0 serialized
  // every wgmma (warning C7514).
  auto mma_stage = [&](int i, auto last) {  // i: this CTA's i-th stage
    const int s = i % L::kStages;
    wait_bar<kCl>(full_bar(s), (i / L::kStages) & 1);
    if (!(V & 4)) {
      const uint32_t stage = s0 + s * L::kStageBytes;
      const uint32_t a = stage + L::kXBytes + wg * 64 * 128;
      wgmma_fence();
      fence_acc(acc);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) wgmma_ss(acc, swizzle128_desc(a + kk * 32), swizzle128_desc(stage + kk * 32));
      fence_acc(acc);
      wgmma_commit();
      if constexpr (decltype(last)::value) {
        wgmma_wait<0>();
      } else {
        wgmma_wait<1>();  // the previous stage's group is done: its buffers can be refilled
      }
      fence_acc(acc);
    }
    if (i > 0) {
      // One arrival per warp, on this CTA's barrier and the peer's.
      __syncwarp();
      if (lane == 0) {
        const uint32_t bar = empty_bar((i - 1) % L::kStages);
        mbar_arrive(bar);
        if constexpr (kCl > 1) mbar_arrive_cluster(mapa(bar, rank ^ 1u));
      }
    }
  };
  for (int i = 0; i + 1 < i1 - i0; ++i) mma_stage(i, std::false_type{});
  mma_stage(i1 - i0 - 1, std::true_type{});

  if (gridDim.z > 1) {
    // Two K splits: split 0 leaves its sums in the workspace and raises the tile's flag; split 1
    // (launched after it: never waited on by split 0) adds them and stores. The flag goes back to
    // 0 for the next call.
    const int tile_id = blockIdx.x + gridDim.x * blockIdx.y;
    float* part = ws + static_cast<size_t>(tile_id) * (kConsumers * (kTok / 2));
    if (blockIdx.z == 0) {
#pragma unroll
      for (int j = 0; j < kTok / 2; ++j) __stcg(part + j * kConsumers + ct, acc[j]);
      __threadfence();
      asm volatile("bar.sync 2, %0;" ::"n"(kConsumers));
      if (ct == 0) asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(flags + tile_id), "r"(1) : "memory");
      return;
    }
    if (ct == 0) {
      uint32_t seen = 0;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(flags + tile_id) : "memory");
      } while (seen == 0);
      flags[tile_id] = 0;
    }
    asm volatile("bar.sync 2, %0;" ::"n"(kConsumers));
#pragma unroll
    for (int j = 0; j < kTok / 2; ++j) acc[j] += __ldcg(part + j * kConsumers + ct);
  }

  // Stage the tile as [token][row] halves (the math warpgroups alone: named barrier 2), then
  // write 16-byte runs of rows. Every stage's last fill was consumed, so shared memory is free.
  asm volatile("bar.sync 2, %0;" ::"n"(kConsumers));
  __half* out = reinterpret_cast<__half*>(smem);
#pragma unroll
  for (int j = 0; j < kTok / 8; ++j) {
    const int tt = 8 * j + 2 * q;
    out[tt * kOutPitch + row_a] = __float2half_rn(acc[4 * j + 0]);
    out[(tt + 1) * kOutPitch + row_a] = __float2half_rn(acc[4 * j + 1]);
    out[tt * kOutPitch + row_a + 8] = __float2half_rn(acc[4 * j + 2]);
    out[(tt + 1) * kOutPitch + row_a + 8] = __float2half_rn(acc[4 * j + 3]);
  }
  asm volatile("bar.sync 2, %0;" ::"n"(kConsumers));
  const bool n_vec = N % 8 == 0;
  for (int u = ct; u < kTok * (kRows / 8); u += kConsumers) {
    const int tt = u / (kRows / 8);
    const int rr = (u % (kRows / 8)) * 8;
    const int tok = tok0 + tt;
    const int row = tile * kRows + rr;
    if (tok >= M || row >= N) continue;
    const __half* src = out + tt * kOutPitch + rr;
    __half* dst = y + static_cast<size_t>(tok) * N + row;
    if (n_vec) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8 && row + e < N; ++e) dst[e] = src[e];
    }
  }
  if constexpr (kCl > 1) cluster_sync();
}

// x [M, K] fp16 as a TMA tensor map: boxes of 64 channels x kTok tokens, 128-byte swizzle, zeros
// outside the tensor. The driver's encoder is found at run time, so nothing links libcuda.
int make_x_map(CUtensorMap* map, const void* x, int M, int K, int tok) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (encode == nullptr) {
    cudaDriverEntryPointQueryResult found;
    void* fn = nullptr;
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess || fn == nullptr) return cudaErrorNotSupported;
    encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(K), static_cast<cuuint64_t>(M)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(K) * 2};
  const cuuint32_t box[2] = {kChunkCh, static_cast<cuuint32_t>(tok)};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, const_cast<void*>(x), dims, strides, box, elem,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? 0 : cudaErrorInvalidValue;
}

// The split-K workspace and flags, kept between calls (an experiment's harness, not a CUDA graph).
float* g_ws = nullptr;
int* g_flags = nullptr;
size_t g_tiles = 0;

template <int kTok, int kPWG, int kCl, int V>
int launch(const void* x, const int32_t* row_ptr, const int32_t* codes, const int32_t* meta, const int32_t* chunks,
           void* y, int M, int N, int K, cudaStream_t stream, bool may_split) {
  using L = Layout<kTok, kPWG, kCl>;
  CUtensorMap map;
  const int err = make_x_map(&map, x, M, K, kTok);
  if (err != 0) return err;
  // Clusters run along the tokens; a spare token tile (past M) loads zeros and stores nothing.
  const int tok_tiles = (M + kTok - 1) / kTok;
  const dim3 grid((N + kRows - 1) / kRows, (tok_tiles + kCl - 1) / kCl * kCl);
  const int num_entries = (K + 255) / 256;  // chunk-table entries per row (16 groups each)
  const int num_stages_k = (K + kChunkCh - 1) / kChunkCh;  // x past K is zero-filled, its columns pruned
  // Two K splits when the grid fills under half the GPU (the o and down shapes at 512 tokens).
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const size_t tiles = static_cast<size_t>(grid.x) * grid.y;
  int split_stages = (num_stages_k + 1) / 2;
  split_stages = (split_stages + 3) / 4 * 4;
  const bool split = may_split && kCl == 1 && 2 * tiles <= static_cast<size_t>(sms) && split_stages < num_stages_k;
  if (!split) split_stages = num_stages_k;
  if (split && tiles > g_tiles) {
    cudaFree(g_ws);
    cudaFree(g_flags);
    if (cudaMalloc(&g_ws, tiles * kConsumers * (kTok / 2) * sizeof(float)) != cudaSuccess ||
        cudaMalloc(&g_flags, tiles * sizeof(int)) != cudaSuccess || cudaMemset(g_flags, 0, tiles * sizeof(int)) != cudaSuccess) {
      g_tiles = 0;
      return cudaErrorMemoryAllocation;
    }
    g_tiles = tiles;
  }
  auto kernel = wg_ss_kernel<kTok, kPWG, kCl, V>;
  const cudaError_t allowed = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kSmemBytes);
  if (allowed != cudaSuccess) return static_cast<int>(allowed);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid.x, grid.y, split ? 2 : 1);
  config.blockDim = dim3(L::kThreads);
  config.dynamicSmemBytes = L::kSmemBytes;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = kCl;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return static_cast<int>(cudaLaunchKernelEx(&config, kernel, map, row_ptr, codes, meta, chunks, num_entries,
                                             num_stages_k, split_stages, static_cast<__half*>(y), M, N, g_ws,
                                             g_flags));
}

template <int kTok, int kPWG, int kCl>
int launch_variant(int v, const void* x, const int32_t* row_ptr, const int32_t* codes, const int32_t* meta,
                   const int32_t* chunks, void* y, int M, int N, int K, cudaStream_t stream, bool may_split = false) {
  switch (v) {
    case 0:
    case 2: return launch<kTok, kPWG, kCl, 0>(x, row_ptr, codes, meta, chunks, y, M, N, K, stream, may_split);
    case 11: return launch<kTok, kPWG, kCl, 1>(x, row_ptr, codes, meta, chunks, y, M, N, K, stream, may_split);
    case 12: return launch<kTok, kPWG, kCl, 2>(x, row_ptr, codes, meta, chunks, y, M, N, K, stream, may_split);
    case 14: return launch<kTok, kPWG, kCl, 4>(x, row_ptr, codes, meta, chunks, y, M, N, K, stream, may_split);
    case 16: return launch<kTok, kPWG, kCl, 6>(x, row_ptr, codes, meta, chunks, y, M, N, K, stream, may_split);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace gqsa

// The signature of wgmma_prefill_experiment.cu's, so the same harness runs it: bn = 64 picks
// 128-token tiles, bn = 128 256-token tiles.
extern "C" int wg_gemm(const void* x, const int32_t* row_ptr, const int32_t* codes, const int32_t* meta,
                       const int32_t* chunks, void* y, int M, int N, int K, int bn, int v, void* stream) {
  using namespace gqsa;
  if (M <= 0 || N <= 0) return 0;
  if (K % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0) return cudaErrorInvalidValue;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
#if WG_PRODUCER_WARPGROUPS == 2
  // 512 threads leave 128 registers a thread: too few for 256-token tiles' accumulators, so both
  // bn run 128-token tiles.
  (void)bn;
  return launch_variant<128, 2, 1>(v, x, row_ptr, codes, meta, chunks, y, M, N, K, s);
#elif WG_CLUSTER == 2
  // bn = 64: 256-token tiles alone, bn = 128: in clusters of two sharing A.
  return bn == 128 ? launch_variant<256, 1, 2>(v, x, row_ptr, codes, meta, chunks, y, M, N, K, s)
                   : launch_variant<256, 1, 1>(v, x, row_ptr, codes, meta, chunks, y, M, N, K, s);
#else
  // bn = 64: 256-token tiles, bn = 128: the same with two K splits where the grid is small.
  return launch_variant<256, 1, 1>(v, x, row_ptr, codes, meta, chunks, y, M, N, K, s, bn == 128);
#endif
}
