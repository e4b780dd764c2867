// SPDX-License-Identifier: Apache-2.0
// Experiment (not part of the package; measured, not adopted: csrc/README.md, "The TMA version"):
// the version of wgmma_prefill_experiment.cu with the copies that made that one slow moved off the
// math warps.
//   * A producer warpgroup fills each stage: one thread loads x with TMA (128-byte swizzle, zeros
//     past M and K); lane cl of each row's lane group copies the row's group of column cl (codes
//     and meta, or zero meta for a pruned column) into its swizzled slot with cp.async; every
//     producer thread arrives on the stage's "full" mbarrier, and again when its copies land. The
//     chunk-table entries are loaded an entry ahead into registers.
//   * Two consumer warpgroups (64 rows each) wait on it, dequantize with tc_a_pair into wgmma's
//     register A operand, keep one wgmma in flight while dequantizing the next k-step, release the
//     previous stage once the first wgmma of this one is issued and the older one is done, and
//     wait for all on the last stage (so nothing is in flight when the loop ends: see
//     csrc/README.md, "A correctness trap").
// 128 rows by WG_TOK tokens per CTA, WG_CHUNK input channels per stage, WG_STAGES stages, G = 16,
// fp16 x (K % 8 == 0 for TMA's row stride). Builds (from this folder), the two measured:
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -shared -Xcompiler -fPIC \
//     -DWG_TOK=128 -DWG_CHUNK=128 -DWG_STAGES=4 -o wg_tma_128.so wgmma_prefill_tma_experiment.cu
//   (the same with -DWG_TOK=256 -DWG_CHUNK=64 -DWG_STAGES=5 -o wg_tma_256.so)
// Run: python wgmma_prefill_experiment.py wg_tma_128.so check | layers | ablate 0,11,12,13,14,15,17
// (bn is ignored; v = 0 or 2 is the kernel, 10 + bits the ablations: 1 no code/meta copies,
// 2 no dequantization, 4 no wgmma).
#include <cuda.h>
#include <cudaTypedefs.h>

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
template <int n>
__device__ __forceinline__ void fence_acc(float (&d)[n]) {
#pragma unroll
  for (int i = 0; i < n; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, 1, 1, 1, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}

__device__ __forceinline__ void wgmma_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "{%128, %129, %130, %131}, %132, 1, 1, 1, 0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}

// mbarriers (shared::cta addresses from smem_addr).
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, int bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
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
// Arrives on `bar` once every cp.async this thread issued before has landed; counted in the
// barrier's expected arrivals (noinc).
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
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


constexpr int kRows = 128;   // rows per CTA: 2 consumer warpgroups x 64
#ifndef WG_TOK
#define WG_TOK 128
#define WG_CHUNK 128
#define WG_STAGES 4
#endif
constexpr int kTok = WG_TOK;      // tokens per CTA (wgmma N)
constexpr int kChunk = WG_CHUNK;  // input channels per stage: a part of a chunk-table entry (16 groups)
constexpr int kSlots = kChunk / 16;
constexpr int kBlock = 64;   // channels per 128-byte swizzled x row (one TMA box)
constexpr int kProducers = 128;
constexpr int kConsumers = 2 * 128;
constexpr int kThreads = kProducers + kConsumers;

// One stage: x as kChunk / 64 swizzled boxes of [kTok tokens][64 channels] (1024-byte aligned),
// then each row's codes (kSlots slots of 8 bytes) and meta (kSlots words), one slot per group
// column, XOR-swizzled by row, then each row's column mask (read only by the ablations).
constexpr int kXBoxBytes = kTok * kBlock * 2;
constexpr int kXBytes = kChunk / kBlock * kXBoxBytes;
constexpr int kCodeBytes = kRows * kSlots * 8;
constexpr int kMetaBytes = kRows * kSlots * 4;
constexpr int kMaskBytes = kRows * 4;
constexpr int kStageBytes = kXBytes + kCodeBytes + kMetaBytes + kMaskBytes + 512;  // + padding to 1024 bytes
static_assert(kSlots * 4 <= 32 && 32 % kSlots == 0, "lanes per row");
constexpr int kWgStages = WG_STAGES;
constexpr int kParts = 16 / kSlots;  // stages per chunk-table entry
constexpr int kBarrierBytes = 2 * kWgStages * 8;
constexpr int kSmemBytes = kWgStages * kStageBytes + kBarrierBytes + 1024;  // + alignment slack
constexpr int kOutPitch = kRows + 8;
static_assert(kStageBytes % 1024 == 0, "stages keep x 1024-byte aligned for the 128-byte swizzle");
static_assert(kTok * kOutPitch * 2 <= kWgStages * kStageBytes, "the output tile fits");
static_assert(kSmemBytes <= 227 * 1024, "fits Hopper's shared memory");

// XOR swizzles of a row's code and meta slots, so that the 8 rows a warp reads at once (one per
// lane group g = 0..7) hit distinct banks.
__device__ __forceinline__ int code_swizzle(int r) { return kSlots == 8 ? (r & 7) : ((r >> 2) & 1); }
__device__ __forceinline__ int meta_swizzle(int r) { return kSlots == 8 ? (r & 4) : 0; }

// wgmma descriptor of a K-major operand in the 128-byte swizzle: 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t swizzle128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// One stage's k-steps for one consumer thread: dequantize rows row_a and row_a + 8 of each
// 16-channel step into wgmma's A registers and multiply by the stage's x. One wgmma stays in
// flight, so the dequantization of step kk + 1 overlaps the multiply of step kk; kLast waits for
// all at the end (so nothing is in flight when the loop ends: see csrc/README.md, "A correctness
// trap"). The caller releases the previous stage once this stage's first wait returned.
template <int V, bool kLast>
__device__ __forceinline__ void consume_stage(float (&acc)[kTok / 2], uint32_t stage, const int32_t* masks,
                                              int row_a, int g, uint32_t sel, uint32_t empty_prev) {
  const uint32_t mask_a = static_cast<uint32_t>(masks[row_a]);
  const uint32_t mask_b = static_cast<uint32_t>(masks[row_a + 8]);
  const uint32_t code_a = stage + kXBytes + row_a * (kSlots * 8);
  const uint32_t meta_a = stage + kXBytes + kCodeBytes + row_a * (kSlots * 4);
  const int code_swz = code_swizzle(g);  // row_a and row_a + 8 share it
  const int meta_swz = meta_swizzle(g);
  uint32_t a[2][4];
#pragma unroll
  for (int kk = 0; kk < kSlots; ++kk) {
    uint32_t(&ak)[4] = a[kk % 2];
    if (V & 2) {
      ak[0] = mask_a >> kk; ak[2] = mask_a << kk; ak[1] = mask_b >> kk; ak[3] = mask_b << kk;
    } else {
      // Slot kk of rows row_a and row_a + 8 (a pruned slot holds zero meta: scale 0).
      const uint2 wa = lds64(code_a + 8 * (kk ^ code_swz));
      const uint2 wb = lds64(code_a + 8 * (kSlots * 8) + 8 * (kk ^ code_swz));
      const uint32_t mta = lds32(meta_a + 4 * (kk ^ meta_swz));
      const uint32_t mtb = lds32(meta_a + 8 * (kSlots * 4) + 4 * (kk ^ meta_swz));
      tc_a_pair(wa, mta, sel, ak[0], ak[2]);
      tc_a_pair(wb, mtb, sel, ak[1], ak[3]);
    }
    // k-step kk: box kk / 4, 32 bytes (16 channels) into its swizzled rows.
    const uint64_t desc = swizzle128_desc(stage + (kk / 4) * kXBoxBytes + (kk % 4) * 32);
    if (V & 4) {
      acc[kk] += __uint_as_float(ak[0] ^ ak[1] ^ ak[2] ^ ak[3] ^ static_cast<uint32_t>(desc));
      if (kk == 0 && empty_prev != 0) mbar_arrive(empty_prev);
      continue;
    }
    wgmma_fence();
    fence_acc(acc);
    wgmma_rs(acc, ak, desc);
    fence_acc(acc);
    wgmma_commit();
    if (kLast && kk + 1 == kSlots) {
      wgmma_wait<0>();
    } else {
      wgmma_wait<1>();
    }
    // The previous stage's last wgmma has finished: its buffers can be refilled.
    if (kk == 0 && empty_prev != 0) mbar_arrive(empty_prev);
  }
  fence_acc(acc);
}

// V: 0 is the kernel; the ablations leave out 1 the code and meta copies, 2 the dequantization
// (A built from the masks), 4 the wgmmas.
template <int V>
__global__ void __launch_bounds__(kThreads, 1)
    wg_tma_kernel(const __grid_constant__ CUtensorMap x_map, const int32_t* __restrict__ row_ptr,
                  const int32_t* __restrict__ codes, const int32_t* __restrict__ meta,
                  const int32_t* __restrict__ chunks, int num_entries, int num_stages_k, __half* __restrict__ y,
                  int M, int N) {
  extern __shared__ unsigned char smem_raw[];
  // 1024-byte alignment for the swizzled boxes.
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t s0 = (raw + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (s0 - raw);
  const uint32_t bars = s0 + kWgStages * kStageBytes;
  auto full_bar = [&](int s) { return bars + 8 * s; };
  auto empty_bar = [&](int s) { return bars + 8 * (kWgStages + s); };
  auto stage_masks = [&](int s) {
    return reinterpret_cast<int32_t*>(smem + s * kStageBytes + kXBytes + kCodeBytes + kMetaBytes);
  };
  const int tile = blockIdx.x;
  const int tok0 = blockIdx.y * kTok;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kWgStages; ++s) {
      // Full: every producer thread arrives once after its mask stores and once more when its
      // cp.async copies land; thread 0 also expects the TMA bytes. Empty: every consumer thread arrives once.
      mbar_init(full_bar(s), 2 * kProducers);
      mbar_init(empty_bar(s), kConsumers);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (threadIdx.x < kProducers) {
    // ---- producer warpgroup ----
    // Lanes kSlots * rl .. + kSlots - 1 of warp `warp` copy rows p * kRowStep + kRowsPerWarp * warp + rl
    // (p = 0..kPasses - 1), lane cl slot cl of the row. Each thread keeps its rows' first kept
    // group and chunk-table entries in registers, loaded one entry (kParts stages) ahead, so the
    // stage's copies wait on no global load and no barrier among the producers.
    constexpr int kRowsPerWarp = kWarpSize / kSlots;
    constexpr int kRowStep = 4 * kRowsPerWarp;
    constexpr int kPasses = kRows / kRowStep;
    const int rl = lane / kSlots;
    const int cl = lane % kSlots;
    int first[kPasses];
    int32_t cur[kPasses], nxt[kPasses];
    const int32_t* entry_row[kPasses];
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int r = tile * kRows + p * kRowStep + kRowsPerWarp * warp + rl;
      const bool ok = r < N;
      first[p] = ok ? __ldg(row_ptr + r) : 0;
      entry_row[p] = ok ? chunks + static_cast<size_t>(r) * num_entries : nullptr;
      nxt[p] = entry_row[p] != nullptr ? __ldg(entry_row[p]) : 0;
    }
    for (int i = 0; i < num_stages_k; ++i) {
      const int s = i % kWgStages;
      const int part = i % kParts;
      if (part == 0) {
#pragma unroll
        for (int p = 0; p < kPasses; ++p) {
          cur[p] = nxt[p];
          const int c = i / kParts + 1;
          nxt[p] = entry_row[p] != nullptr && c < num_entries ? __ldg(entry_row[p] + c) : 0;
        }
      }
      if (i >= kWgStages) mbar_wait(empty_bar(s), ((i / kWgStages) - 1) & 1);
      const uint32_t stage = s0 + s * kStageBytes;
      if (threadIdx.x == 0) {
        mbar_expect_tx(full_bar(s), kXBytes);
#pragma unroll
        for (int b = 0; b < kChunk / kBlock; ++b) {
          tma_load_2d(stage + b * kXBoxBytes, &x_map, i * kChunk + b * kBlock, tok0, full_bar(s));
        }
      }
      int32_t* masks = stage_masks(s);
#pragma unroll
      for (int p = 0; p < kPasses; ++p) {
        const int r = p * kRowStep + kRowsPerWarp * warp + rl;
        // Part `part` of the entry: its kSlots column bits, and the kept groups before them.
        const uint32_t e = static_cast<uint32_t>(cur[p]);
        const uint32_t below = e & ((1u << (kSlots * part)) - 1u) & 0xFFFFu;
        const uint32_t mask = (e >> (kSlots * part)) & ((1u << kSlots) - 1u);
        if (cl == 0) masks[r] = static_cast<int32_t>(mask);
        // Lane cl fills slot cl (the group column's own place): a kept group's codes and meta, or
        // zero meta (scale 0) for a pruned one, so the consumers read every slot unconditionally.
        const uint32_t meta_slot = stage + kXBytes + kCodeBytes + r * (kSlots * 4) + 4 * (cl ^ meta_swizzle(r));
        if ((mask >> cl) & 1u) {
          if (!(V & 1)) {
            const int group = first[p] + static_cast<int>(e >> 16) + __popc(below) + __popc(mask & ((1u << cl) - 1u));
            cp_async<8>(stage + kXBytes + r * (kSlots * 8) + 8 * (cl ^ code_swizzle(r)),
                        codes + 2 * static_cast<size_t>(group));
            cp_async<4>(meta_slot, meta + group);
          }
        } else {
          asm volatile("st.shared.u32 [%0], %1;" ::"r"(meta_slot), "r"(0) : "memory");
        }
      }
      mbar_arrive(full_bar(s));  // after the mask and meta stores (release), ...
      cp_async_mbar_arrive(full_bar(s));  // ... and once the copies land
    }
    return;
  }

  // ---- consumer warpgroups ----
  const int ct = threadIdx.x - kProducers;
  const int wg = ct / 128;
  const int cw = (ct / kWarpSize) % 4;
  const int g = lane / 4;
  const int q = lane % 4;
  const uint32_t sel = q | (q + 4) << 4 | q << 8 | (q + 4) << 12;
  const int row_a = wg * 64 + cw * 16 + g;  // and row_a + 8

  float acc[kTok / 2];
#pragma unroll
  for (int j = 0; j < kTok / 2; ++j) acc[j] = 0.f;

  for (int i = 0; i < num_stages_k; ++i) {
    const int s = i % kWgStages;
    mbar_wait(full_bar(s), (i / kWgStages) & 1);
    const uint32_t empty_prev = i > 0 ? empty_bar((i - 1) % kWgStages) : 0u;
    if (i + 1 < num_stages_k) {
      consume_stage<V, false>(acc, s0 + s * kStageBytes, stage_masks(s), row_a, g, sel, empty_prev);
    } else {
      consume_stage<V, true>(acc, s0 + s * kStageBytes, stage_masks(s), row_a, g, sel, empty_prev);
    }
  }

  // Stage the tile as [token][row] halves (the consumers alone: named barrier 2), then write
  // 16-byte runs of rows. Every stage's last fill was consumed, so shared memory is free.
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
    const int r = (u % (kRows / 8)) * 8;
    const int tok = tok0 + tt;
    const int row = tile * kRows + r;
    if (tok >= M || row >= N) continue;
    const __half* src = out + tt * kOutPitch + r;
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
int make_x_map(CUtensorMap* map, const void* x, int M, int K) {
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
  const cuuint32_t box[2] = {kBlock, kTok};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, const_cast<void*>(x), dims, strides, box, elem,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? 0 : cudaErrorInvalidValue;
}

}  // namespace
}  // namespace gqsa

// Same signature as wgmma_prefill_experiment.cu's, so the same harness runs it; bn and v are
// ignored (64 tokens per CTA, one wgmma in flight).
extern "C" int wg_gemm(const void* x, const int32_t* row_ptr, const int32_t* codes, const int32_t* meta,
                       const int32_t* chunks, void* y, int M, int N, int K, int bn, int v, void* stream) {
  (void)bn;
  using namespace gqsa;
  if (M <= 0 || N <= 0) return 0;
  if (K % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0) return cudaErrorInvalidValue;
  CUtensorMap map;
  const int err = make_x_map(&map, x, M, K);
  if (err != 0) return err;
  const dim3 grid((N + kRows - 1) / kRows, (M + kTok - 1) / kTok);
  const int num_entries = (K + 255) / 256;  // chunk-table entries per row (16 groups each)
  const int num_stages_k = (K + kChunk - 1) / kChunk;  // x past K is zero-filled
  auto launch = [&](auto kernel) {
    const cudaError_t allowed = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (allowed != cudaSuccess) return static_cast<int>(allowed);
    kernel<<<grid, kThreads, kSmemBytes, static_cast<cudaStream_t>(stream)>>>(
        map, row_ptr, codes, meta, chunks, num_entries, num_stages_k, static_cast<__half*>(y), M, N);
    return static_cast<int>(cudaGetLastError());
  };
  switch (v) {
    case 2: return launch(wg_tma_kernel<0>);  // the harness's "check" runs v = 2 and 0
    case 0: return launch(wg_tma_kernel<0>);
    case 11: return launch(wg_tma_kernel<1>);
    case 12: return launch(wg_tma_kernel<2>);
    case 13: return launch(wg_tma_kernel<3>);
    case 14: return launch(wg_tma_kernel<4>);
    case 15: return launch(wg_tma_kernel<5>);
    case 17: return launch(wg_tma_kernel<7>);
    default: return cudaErrorInvalidValue;
  }
}
