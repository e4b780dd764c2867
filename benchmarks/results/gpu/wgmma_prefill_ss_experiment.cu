// SPDX-License-Identifier: Apache-2.0
// Experiment (not part of the package): a fused prefill GEMM whose A operand is dequantized into
// shared memory by a warpgroup of its own, so that the math warpgroups issue nothing but wgmmas.
// The TMA version before it (wgmma_prefill_tma_experiment.cu) dequantized in the math warpgroups,
// into wgmma's register A operand, and every token tile repeated that work between its wgmmas:
// Nsight Compute put the tensor pipe at 55% busy (csrc/README.md, "The TMA version").
//   * Warpgroup 0 fills each stage. Thread 0 loads x with TMA (one box of 256 tokens x 64
//     channels, 128-byte swizzle, zeros past M and K). Thread r dequantizes row r of the CTA's 128
//     rows: the row's 4 group columns of the stage become 64 fp16 weights (zeros for pruned
//     columns) in wgmma's K-major 128-byte-swizzled layout, so A is read by a descriptor like x,
//     then fences them for the async proxy and arrives on the stage's barrier. The row's codes
//     and meta for the next stage are loaded into registers before this stage is dequantized
//     (V & 32: copied by cp.async into a ring in shared memory three stages ahead instead; V & 64:
//     brought by one bulk copy a stage from a stage-major copy of the weights that the harness
//     makes, WG_STAGE_RAW=1), the chunk-table entries (16 group columns) an entry ahead.
//   * Warpgroups 1 and 2 (64 rows each) wait on a stage, issue its four m64n256k16 wgmmas (A and
//     B from shared memory) as one group, wait for the group before, and free that stage.
//   * Where the grid fills under half the GPU, two CTAs split K: the first leaves its fp32 sums
//     in a workspace and raises a flag, the second adds them and stores.
// Earlier versions (csrc/README.md, "A in shared memory, dequantized by a warpgroup of its own";
// wgmma_prefill_ss_experiment.json): 128-token tiles and two dequantizing warpgroups, clusters of
// two CTAs sharing A, loads two stages ahead, four lanes a row, in this file's history and
// wgmma_prefill_ss_row_per_thread.patch.
// 128 rows by 256 tokens per CTA, 64 input channels per stage, G = 16, fp16 x (K % 8 == 0 for
// TMA's row stride). Build (from this folder):
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -shared -Xcompiler -fPIC \
//     -Xptxas -v -o wg_ss.so wgmma_prefill_ss_experiment.cu
// Run: [WG_V=42] python wgmma_prefill_experiment.py wg_ss.so check | tokens 512 | ablate 0,11,...
// (the harness's bn = 64 never splits K, bn = 128 splits it where the grid is small; v = 0 or 2
// is the kernel, v = 10 + bits a variant: 32 the cp.async version (v = 42), 64 the bulk-copy
// version (v = 74, with WG_STAGE_RAW=1), and the ablations,
// whose results are wrong: 1 no code/meta loads (zero codes dequantized), 2 no dequantization or
// A stores at all, 4 no wgmma, 8 no proxy fence, 16 each stage's loads after the stage before it
// is full).
#include <cuda.h>
#include <cudaTypedefs.h>

#include <type_traits>

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
// One bulk copy of `bytes` (a multiple of 16) from global to shared memory, counted on `bar`.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, int bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
          dst),
      "l"(map), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
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
__device__ __forceinline__ void sts128(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
// Makes this thread's shared-memory stores visible to the async proxy (wgmma's operand reads).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// wgmma descriptor of a K-major operand in the 128-byte swizzle: 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t swizzle128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

constexpr int kRows = 128;    // rows per CTA: 2 math warpgroups x 64
constexpr int kTok = 256;     // tokens per CTA (wgmma N)
constexpr int kChunkCh = 64;  // input channels per stage: 4 group columns, one 128-byte row
constexpr int kProducers = 128;
constexpr int kConsumers = 256;
constexpr int kThreads = kProducers + kConsumers;
constexpr int kSlots = 4;  // group columns of a stage per producer thread (one row each)
constexpr int kOutPitch = kRows + 8;
constexpr int kXBytes = kTok * 128;   // x: [256 tokens][64 channels], one TMA box
constexpr int kABytes = kRows * 128;  // A: [128 rows][64 channels]
constexpr int kStageBytes = kXBytes + kABytes;
constexpr int kWgStages = 4;
// The codes and meta of kRawStages stages in flight, copied by cp.async (V & 32): [128 rows][4
// columns] of 8 bytes, then of 4.
constexpr int kRawStages = 4;
constexpr int kRawBytes = kRows * 4 * 12;
constexpr int kSmemBytes = kWgStages * kStageBytes + kRawStages * kRawBytes + (2 * kWgStages + kRawStages) * 8 + 1024;
static_assert(kStageBytes % 1024 == 0, "stages keep the 128-byte swizzle's 1024-byte alignment");
static_assert(kTok * kOutPitch * 2 <= kWgStages * kStageBytes, "the output tile fits");
static_assert(kSmemBytes <= 227 * 1024, "fits Hopper's shared memory");

// One stage of one producer thread: the codes and meta of its row's group columns, zero for a
// pruned column (scale 0 dequantizes to zeros, so every column takes one path).
struct Items {
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

template <int V>
__global__ void __launch_bounds__(kThreads, 1)
    wg_ss_kernel(const __grid_constant__ CUtensorMap x_map, const int32_t* __restrict__ row_ptr,
                 const int32_t* __restrict__ codes, const int32_t* __restrict__ meta,
                 const int32_t* __restrict__ chunks, int num_entries, int num_stages_k, int split_stages,
                 __half* __restrict__ y, int M, int N, float* __restrict__ ws, int* __restrict__ flags) {
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t s0 = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (s0 - raw);
  const uint32_t raw_ring = s0 + kWgStages * kStageBytes;
  const uint32_t bars = raw_ring + kRawStages * kRawBytes;
  auto full_bar = [&](int s) { return bars + 8 * s; };
  auto empty_bar = [&](int s) { return bars + 8 * (kWgStages + s); };
  auto raw_bar = [&](int k) { return bars + 8 * (2 * kWgStages + k); };  // V & 64: a raw stage landed
  const int tile = blockIdx.x;
  const int tok0 = blockIdx.y * kTok;
  // K split blockIdx.z runs stages i0 .. i1 - 1 (split_stages is a multiple of 4: whole entries).
  const int i0 = blockIdx.z * split_stages;
  const int i1 = min(num_stages_k, i0 + split_stages);

  if (threadIdx.x == 0) {
    for (int s = 0; s < kWgStages; ++s) {
      // Full: every producer thread arrives once its A stores are fenced; thread 0 also expects
      // the TMA bytes. Empty: every math warp arrives once.
      mbar_init(full_bar(s), kProducers);
      mbar_init(empty_bar(s), kConsumers / kWarpSize);
    }
    for (int k = 0; k < kRawStages; ++k) mbar_init(raw_bar(k), 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (threadIdx.x < kProducers) {
    // ---- the dequantizing warpgroup: thread r owns row r ----
    const int r = threadIdx.x;
    const int row = tile * kRows + r;
    const bool ok = row < N;  // rows past N are never stored, so their A is left as it is
    const int first = ok ? __ldg(row_ptr + row) : 0;
    const int32_t* entries = chunks + static_cast<size_t>(ok ? row : 0) * num_entries;
    uint32_t entry = ok ? static_cast<uint32_t>(__ldg(entries + i0 / 4)) : 0u;
    uint32_t entry_next = ok && i0 / 4 + 1 < num_entries ? static_cast<uint32_t>(__ldg(entries + i0 / 4 + 1)) : 0u;
    const uint2* code2 = reinterpret_cast<const uint2*>(codes);

    // Stage i's 4 column bits of this row, and the index of its first kept group in them (4 stages
    // per chunk-table entry; called for i0, i0 + 1, ... in turn, it moves to the next entry).
    auto stage_mask = [&](int i, int& base) {
      const int part = i % 4;
      if (part == 0 && i > i0) {
        entry = entry_next;
        const int e = i / 4 + 1;
        entry_next = ok && e < num_entries ? static_cast<uint32_t>(__ldg(entries + e)) : 0u;
      }
      base = first + static_cast<int>(entry >> 16) + __popc(entry & ((1u << (4 * part)) - 1u));
      return (entry >> (4 * part)) & 0xFu;
    };
    // Stage i's codes and meta of this row.
    auto load = [&](int i, Items& it) {
      int base;
      const uint32_t mask = stage_mask(i, base);
#pragma unroll
      for (int c = 0; c < kSlots; ++c) {
        const bool kept = !(V & 1) && ((mask >> c) & 1u);
        const int gi = base + __popc(mask & ((1u << c) - 1u));
        it.code[c] = kept ? __ldg(code2 + gi) : make_uint2(0u, 0u);
        it.meta[c] = kept ? static_cast<uint32_t>(__ldg(meta + gi)) : 0u;
      }
    };
    // Stage i: x by TMA (thread 0), this thread's part of A, then the stage is full.
    auto produce = [&](int i, const Items& it) {
      const int j = i - i0;  // this CTA's j-th stage
      const int s = j % kWgStages;
      if (j >= kWgStages) mbar_wait(empty_bar(s), ((j / kWgStages) - 1) & 1);
      const uint32_t stage = s0 + s * kStageBytes;
      if (threadIdx.x == 0) {
        mbar_expect_tx(full_bar(s), kXBytes);
        tma_load_2d(stage, &x_map, i * kChunkCh, tok0, full_bar(s));
      }
      if (!(V & 2) && ok) {
        // Row r's 128 bytes; 16-byte unit u sits at unit u ^ (r % 8) (the 128-byte swizzle).
        const uint32_t a_row = stage + kXBytes + r * 128;
#pragma unroll
        for (int c = 0; c < kSlots; ++c) {
          uint4 lo, hi;
          dequant_group16(it.code[c], it.meta[c], lo, hi);
          sts128(a_row + (((2 * c) ^ (r & 7)) << 4), lo);
          sts128(a_row + (((2 * c + 1) ^ (r & 7)) << 4), hi);
        }
      }
      if (!(V & 8)) fence_proxy_async();
      mbar_arrive(full_bar(s));
    };

    // Each stage's loads are issued before the stage before it is dequantized (two register sets
    // in turn, so nothing is copied between them).
    if constexpr ((V & 64) != 0) {
      // A stage-major copy of the weights (the harness's WG_STAGE_RAW, passed as `chunks`): for
      // each 128-row tile and stage, [128 rows][4 columns] codes then meta, zeros where pruned,
      // 6 KB that one bulk copy brings into the ring, kRawStages - 1 stages ahead. A test of what
      // a layout made for this kernel would give, not a layout the package has (it is
      // uncompressed: 6 bits a weight).
      const unsigned char* tile_raw = reinterpret_cast<const unsigned char*>(chunks) +
                                      static_cast<size_t>(tile) * num_stages_k * kRawBytes;
      auto fetch = [&](int i) {
        const int k = (i - i0) % kRawStages;
        mbar_arrive_expect_tx(raw_bar(k), kRawBytes);
        bulk_copy(raw_ring + k * kRawBytes, tile_raw + static_cast<size_t>(i) * kRawBytes, kRawBytes, raw_bar(k));
      };
      if (threadIdx.x == 0) {
        for (int k = 0; k + 1 < kRawStages && i0 + k < i1; ++k) fetch(i0 + k);
      }
      for (int i = i0; i < i1; ++i) {
        const int j = i - i0;
        // Every producer thread has read stage j - 1's ring slot, which the next fetch refills.
        if (j > 0) asm volatile("bar.sync 1, %0;" ::"n"(kProducers));
        if (threadIdx.x == 0 && i + kRawStages - 1 < i1) fetch(i + kRawStages - 1);
        const int k = j % kRawStages;
        mbar_wait(raw_bar(k), (j / kRawStages) & 1);
        const uint32_t q = raw_ring + k * kRawBytes;
        Items it;
#pragma unroll
        for (int c = 0; c < kSlots; ++c) {
          it.code[c] = (V & 1) ? make_uint2(0u, 0u) : lds64(q + r * 32 + c * 8);
          it.meta[c] = (V & 1) ? 0u : lds32(q + kRows * 32 + r * 16 + c * 4);
        }
        produce(i, it);
      }
      return;
    }
    if constexpr ((V & 32) != 0) {
      // The codes and meta reach shared memory by cp.async, kRawStages - 1 stages ahead, each
      // stage its own commit group; this thread reads back only its own copies.
      uint32_t masks = 0;  // each stage's 4 column bits, at 4 * (its ring slot)
      auto issue = [&](int i) {
        int base;
        const uint32_t mask = stage_mask(i, base);
        const int k = (i - i0) % kRawStages;
        masks = (masks & ~(0xFu << (4 * k))) | (mask << (4 * k));
        const uint32_t q = raw_ring + k * kRawBytes;
#pragma unroll
        for (int c = 0; c < kSlots; ++c) {
          if ((V & 1) || !((mask >> c) & 1u)) continue;
          const int gi = base + __popc(mask & ((1u << c) - 1u));
          cp_async<8>(q + r * 32 + c * 8, code2 + gi);
          cp_async<4>(q + kRows * 32 + r * 16 + c * 4, meta + gi);
        }
      };
      for (int k = 0; k + 1 < kRawStages; ++k) {
        if (i0 + k < i1) issue(i0 + k);
        cp_async_commit();
      }
      for (int i = i0; i < i1; ++i) {
        if (i + kRawStages - 1 < i1) issue(i + kRawStages - 1);
        cp_async_commit();
        cp_async_wait<kRawStages - 1>();  // stage i's copies have landed
        const int k = (i - i0) % kRawStages;
        const uint32_t mask = (masks >> (4 * k)) & 0xFu;
        const uint32_t q = raw_ring + k * kRawBytes;
        Items it;
#pragma unroll
        for (int c = 0; c < kSlots; ++c) {
          const bool kept = !(V & 1) && ((mask >> c) & 1u);
          it.code[c] = kept ? lds64(q + r * 32 + c * 8) : make_uint2(0u, 0u);
          it.meta[c] = kept ? lds32(q + kRows * 32 + r * 16 + c * 4) : 0u;
        }
        produce(i, it);
      }
      return;
    }
    Items a, b;
    if constexpr ((V & 16) != 0) {
      // Each stage's loads after the stage before it is fenced and full.
      for (int i = i0; i < i1; ++i) {
        load(i, a);
        produce(i, a);
      }
      return;
    }
    load(i0, a);
    for (int i = i0; i < i1; i += 2) {
      if (i + 1 < i1) load(i + 1, b);
      produce(i, a);
      if (i + 1 >= i1) break;
      if (i + 2 < i1) load(i + 2, a);
      produce(i + 1, b);
    }
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
    const int s = i % kWgStages;
    mbar_wait(full_bar(s), (i / kWgStages) & 1);
    if (!(V & 4)) {
      const uint32_t stage = s0 + s * kStageBytes;
      const uint32_t a = stage + kXBytes + wg * 64 * 128;
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
      __syncwarp();  // one arrival per warp
      if (lane == 0) mbar_arrive(empty_bar((i - 1) % kWgStages));
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

template <int V>
int launch(const void* x, const int32_t* row_ptr, const int32_t* codes, const int32_t* meta, const int32_t* chunks,
           void* y, int M, int N, int K, cudaStream_t stream, bool may_split) {
  CUtensorMap map;
  const int err = make_x_map(&map, x, M, K, kTok);
  if (err != 0) return err;
  const dim3 grid((N + kRows - 1) / kRows, (M + kTok - 1) / kTok);
  const int num_entries = (K + 255) / 256;  // chunk-table entries per row (16 groups each)
  const int num_stages_k = (K + kChunkCh - 1) / kChunkCh;  // x past K is zero-filled, its columns pruned
  // Two K splits when the grid fills under half the GPU (the o and down shapes at 512 tokens).
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const size_t tiles = static_cast<size_t>(grid.x) * grid.y;
  int split_stages = ((num_stages_k + 1) / 2 + 3) / 4 * 4;
  const bool split = may_split && 2 * tiles <= static_cast<size_t>(sms) && split_stages < num_stages_k;
  if (!split) split_stages = num_stages_k;
  if (split && tiles > g_tiles) {
    cudaFree(g_ws);
    cudaFree(g_flags);
    if (cudaMalloc(&g_ws, tiles * kConsumers * (kTok / 2) * sizeof(float)) != cudaSuccess ||
        cudaMalloc(&g_flags, tiles * sizeof(int)) != cudaSuccess ||
        cudaMemset(g_flags, 0, tiles * sizeof(int)) != cudaSuccess) {
      g_tiles = 0;
      return cudaErrorMemoryAllocation;
    }
    g_tiles = tiles;
  }
  auto kernel = wg_ss_kernel<V>;
  const cudaError_t allowed = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (allowed != cudaSuccess) return static_cast<int>(allowed);
  kernel<<<dim3(grid.x, grid.y, split ? 2 : 1), kThreads, kSmemBytes, stream>>>(
      map, row_ptr, codes, meta, chunks, num_entries, num_stages_k, split_stages, static_cast<__half*>(y), M, N,
      g_ws, g_flags);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace gqsa

// The signature of wgmma_prefill_experiment.cu's, so the same harness runs it: bn = 64 never
// splits K, bn = 128 splits it where the grid fills under half the GPU.
extern "C" int wg_gemm(const void* x, const int32_t* row_ptr, const int32_t* codes, const int32_t* meta,
                       const int32_t* chunks, void* y, int M, int N, int K, int bn, int v, void* stream) {
  using namespace gqsa;
  if (M <= 0 || N <= 0) return 0;
  if (K % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0) return cudaErrorInvalidValue;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool split = bn == 128;
  switch (v) {
    case 0:
    case 2: return launch<0>(x, row_ptr, codes, meta, chunks, y, M, N, K, s, split);
    case 11: return launch<1>(x, row_ptr, codes, meta, chunks, y, M, N, K, s, split);
    case 12: return launch<2>(x, row_ptr, codes, meta, chunks, y, M, N, K, s, split);
    case 14: return launch<4>(x, row_ptr, codes, meta, chunks, y, M, N, K, s, split);
    case 18: return launch<8>(x, row_ptr, codes, meta, chunks, y, M, N, K, s, split);
    case 26: return launch<16>(x, row_ptr, codes, meta, chunks, y, M, N, K, s, split);
    case 30: return launch<20>(x, row_ptr, codes, meta, chunks, y, M, N, K, s, split);
    case 42: return launch<32>(x, row_ptr, codes, meta, chunks, y, M, N, K, s, split);
    case 43: return launch<33>(x, row_ptr, codes, meta, chunks, y, M, N, K, s, split);
    case 50: return launch<40>(x, row_ptr, codes, meta, chunks, y, M, N, K, s, split);
    case 46: return launch<36>(x, row_ptr, codes, meta, chunks, y, M, N, K, s, split);
    case 74: return launch<64>(x, row_ptr, codes, meta, chunks, y, M, N, K, s, split);
    case 75: return launch<65>(x, row_ptr, codes, meta, chunks, y, M, N, K, s, split);
    case 78: return launch<68>(x, row_ptr, codes, meta, chunks, y, M, N, K, s, split);
    default: return cudaErrorInvalidValue;
  }
}
