// SPDX-License-Identifier: Apache-2.0
// Experiment (not part of the package): a one-token GEMV that gives each lane its own row, in a
// sliced-ELLPACK layout (SELL-C-sigma with C = 32 and sigma = N), instead of the package GEMV's
// contiguous range of kept groups per warp that crosses row ends.
//
// Why: the package GEMV spends about 100 warp instructions per kept group and lane at one token,
// of which the dequantize-and-multiply arithmetic is a quarter; walking row ends (a warp-wide sum,
// the store or hand-off, the next row's bounds) is about 25 and issuing the loads 12
// (csrc/README.md, "Where one call's time goes"). With one row per lane there is no row end inside
// the loop: a lane accumulates its row in a register, and the only reduction is one shared-memory
// sum over the CTA's warps at the end.
//
// Layout (built by sell_gemv_experiment.py from the kernel format, same codes and meta words):
//   * rows sorted by their kept-group count, longest first; perm[i] is the row at sorted place i
//     (-1 past N, which is padded to a multiple of 32);
//   * slice s = sorted places 32s .. 32s+31; its width is its longest row, rounded up to even;
//     slice_ptr[s] .. slice_ptr[s+1] are its steps (a step is two groups per lane);
//   * step p: codes[p][lane] = 16 bytes (groups 2j and 2j+1 of the lane's row, j = p - slice_ptr[s]),
//     meta[p][lane] = their two meta words; padding groups have codes 0 and meta 0 (scale 0).
// A CTA takes one piece of a slice: slices longer than the piece size (total steps over a target
// number of CTAs) are cut into near-equal pieces, so CTAs carry about the same work whatever the
// row lengths (the task-centric split), and pieces of one slice are summed by the last to finish.
// Its warps split the piece's steps evenly. Each warp loads kB steps at a time, the next batch
// before the current one's math, as the package GEMV does.
//
// Build (here, nvcc 13.0):
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a -shared -Xcompiler -fPIC \
//     -Xcompiler -fvisibility=hidden -o sell_gemv.so sell_gemv_experiment.cu
// Run: python sell_gemv_experiment.py sell_gemv.so [OUT.json]

// The helpers (dequant_pairs, dot8_pairs, the x copy's swizzle, ...) are the package's own.
#include "../../../csrc/gqsa_kernels.cu"

namespace gqsa {
namespace {

struct SellStep {
  uint4 codes;
  uint2 meta;
};

template <int M, int kW, int kB>
__global__ void __launch_bounds__(kW * kWarpSize)
    sell_kernel(const __half* __restrict__ x, const int32_t* __restrict__ perm,
                const int4* __restrict__ pieces, const int32_t* __restrict__ slice_pieces,
                const uint4* __restrict__ codes, const uint2* __restrict__ meta,
                float* __restrict__ workspace, int32_t* __restrict__ counters,
                __half* __restrict__ y, int N, int K) {
  constexpr int G = 16;
  extern __shared__ uint4 x_shared[];
  __shared__ float part[kW][M][kWarpSize];

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  // This CTA's piece: steps pc.y .. pc.z - 1 of slice pc.x.
  const int4 pc = pieces[blockIdx.x];
  const int s = pc.x;
  const int p0 = pc.y;
  const int steps = pc.z - p0;
  const int b = p0 + steps * warp / kW;  // this warp's steps b .. e-1
  const int e = p0 + steps * (warp + 1) / kW;

  const uint64_t policy = make_evict_first_policy();
  SellStep bat_a[kB], bat_b[kB];
  auto load = [&](SellStep (&bt)[kB], int p) {
#pragma unroll
    for (int i = 0; i < kB; ++i) {
      if (p + i < e) {
        const size_t at = static_cast<size_t>(p + i) * kWarpSize + lane;
        bt[i].codes = ld_stream_v4(codes + at, policy);
        bt[i].meta = ld_stream_v2(meta + at, policy);
      } else {
        bt[i].codes = make_uint4(0, 0, 0, 0);
        bt[i].meta = make_uint2(0, 0);  // scale 0: contributes exactly 0 for finite x
      }
    }
  };
  load(bat_a, b);

  // x into shared memory while the first weights are in flight (as gemv_kernel).
  {
    constexpr int kXCopyLoads = 8;
    const int chunks = K / kWordWeights;
    const int total = M * chunks;
    const uint4* x_chunks = reinterpret_cast<const uint4*>(x);
    for (int i0 = threadIdx.x; i0 < total; i0 += kXCopyLoads * kW * kWarpSize) {
      uint4 v[kXCopyLoads];
#pragma unroll
      for (int j = 0; j < kXCopyLoads; ++j) {
        const int i = i0 + j * kW * kWarpSize;
        if (i < total) v[j] = __ldg(x_chunks + i);
      }
#pragma unroll
      for (int j = 0; j < kXCopyLoads; ++j) {
        const int i = i0 + j * kW * kWarpSize;
        if (i < total) {
          const int m = i / chunks;
          const int c = i - m * chunks;
          x_shared[m * shared_x_row_chunks(K) + swizzle_chunk(c)] =
              Act<__half>::template x_pairs<kXScaleLog2<G>>(v[j]);
        }
      }
    }
  }
  __syncthreads();

  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  const int row_chunks = shared_x_row_chunks(K);

  auto math = [&](const SellStep& st) {
    const uint32_t words[4] = {st.codes.x, st.codes.y, st.codes.z, st.codes.w};
    const uint32_t metas[2] = {st.meta.x, st.meta.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const ZeroPair zp = zero_pair(metas[i]);
      const int c0 = meta_col(metas[i]) * (G / kWordWeights);  // first 16-byte chunk of x
      __half2 sum[M];
#pragma unroll
      for (int m = 0; m < M; ++m) sum[m] = __float2half2_rn(0.f);
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        __half2 w[4];
        dequant_pairs(words[2 * i + k], zp, w);
#pragma unroll
        for (int m = 0; m < M; ++m) sum[m] = dot8_pairs(w, x_shared[m * row_chunks + swizzle_chunk(c0 + k)], sum[m]);
      }
      const float sc = meta_scale(metas[i]) * static_cast<float>(1 << kXScaleLog2<G>);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float2 f = __half22float2(sum[m]);
        acc[m] = fmaf(sc, f.x + f.y, acc[m]);
      }
    }
  };

  for (int p = b; p < e; p += 2 * kB) {
    load(bat_b, p + kB);
#pragma unroll
    for (int i = 0; i < kB; ++i) math(bat_a[i]);
    if (p + kB >= e) break;
    load(bat_a, p + 2 * kB);
#pragma unroll
    for (int i = 0; i < kB; ++i) math(bat_b[i]);
  }

#pragma unroll
  for (int m = 0; m < M; ++m) part[warp][m][lane] = acc[m];
  __syncthreads();
  if (warp == 0) {
    const int row = perm[s * kWarpSize + lane];
    float v[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      v[m] = 0.f;
#pragma unroll
      for (int w = 0; w < kW; ++w) v[m] += part[w][m][lane];
    }
    const int first = slice_pieces[s];
    const int n_pieces = slice_pieces[s + 1] - first;
    if (n_pieces > 1) {
      // A slice cut into pieces: each piece leaves its sums in the workspace, and the last piece
      // to finish adds them up in piece order (deterministic whatever the finishing order) and
      // sets the slice's counter back to 0 for the next call.
#pragma unroll
      for (int m = 0; m < M; ++m) workspace[(static_cast<size_t>(blockIdx.x) * M + m) * kWarpSize + lane] = v[m];
      __threadfence();
      __syncwarp();
      int done = 0;
      if (lane == 0) done = atomicAdd(counters + s, 1);
      done = __shfl_sync(0xffffffffu, done, 0);
      if (done != n_pieces - 1) return;
      __threadfence();
#pragma unroll
      for (int m = 0; m < M; ++m) {
        v[m] = 0.f;
        for (int q = first; q < first + n_pieces; ++q)
          v[m] += __ldcg(workspace + (static_cast<size_t>(q) * M + m) * kWarpSize + lane);
      }
      if (lane == 0) counters[s] = 0;
    }
    if (row >= 0) {
#pragma unroll
      for (int m = 0; m < M; ++m) y[static_cast<size_t>(m) * N + row] = __float2half_rn(v[m]);
    }
  }
}

template <int M, int kW, int kB>
cudaError_t launch_sell(const void* x, const int32_t* perm, const int32_t* pieces, const int32_t* slice_pieces,
                        const void* codes, const void* meta, float* workspace, int32_t* counters, void* y,
                        int N, int K, int num_pieces, cudaStream_t stream) {
  const size_t smem = shared_x_bytes(M, K);
  auto kernel = sell_kernel<M, kW, kB>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<num_pieces, kW * kWarpSize, smem, stream>>>(
      static_cast<const __half*>(x), perm, reinterpret_cast<const int4*>(pieces), slice_pieces,
      static_cast<const uint4*>(codes), static_cast<const uint2*>(meta), workspace, counters,
      static_cast<__half*>(y), N, K);
  return cudaGetLastError();
}

template <int M>
cudaError_t sell_for_m(int warps, int batch, const void* x, const int32_t* perm, const int32_t* pieces,
                       const int32_t* slice_pieces, const void* codes, const void* meta, float* workspace,
                       int32_t* counters, void* y, int N, int K, int num_pieces, cudaStream_t stream) {
#define GQSA_SELL(W, B)                                                                          \
  if (warps == W && batch == B)                                                                  \
    return launch_sell<M, W, B>(x, perm, pieces, slice_pieces, codes, meta, workspace, counters, \
                                y, N, K, num_pieces, stream);
  GQSA_SELL(4, 2)
  GQSA_SELL(8, 2)
  GQSA_SELL(8, 4)
  GQSA_SELL(16, 2)
#undef GQSA_SELL
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace gqsa

extern "C" __attribute__((visibility("default"))) int sell_gemv(
    const void* x, const int32_t* perm, const int32_t* pieces, const int32_t* slice_pieces, const void* codes,
    const void* meta, float* workspace, int32_t* counters, void* y, int M, int N, int K, int num_pieces,
    int warps, int batch, cudaStream_t stream) {
  if (K % 16 != 0) return static_cast<int>(cudaErrorInvalidValue);
  if (num_pieces == 0) return 0;
  switch (M) {
    case 1: return static_cast<int>(gqsa::sell_for_m<1>(warps, batch, x, perm, pieces, slice_pieces, codes, meta, workspace, counters, y, N, K, num_pieces, stream));
    case 2: return static_cast<int>(gqsa::sell_for_m<2>(warps, batch, x, perm, pieces, slice_pieces, codes, meta, workspace, counters, y, N, K, num_pieces, stream));
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
