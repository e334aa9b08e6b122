// fwd_combine.cu: merges the split-KV partials of fwd_decode.cu. A (query row, head) pair is
// merged by combine_warps_per_pair(num_splits) warps of one CTA, each taking every wpp-th split:
// lse = log sum_s exp(lse_s) over the splits, out = sum_s exp(lse_s - lse) * o_s, where o_s is
// split s's output normalized by its own sum (0 for a split that kept nothing, whose lse_s is
// -inf); the warps' sums meet in shared memory. A row no split kept gets out = 0 and lse = -inf.
// Partials are indexed ((row * H + h) * num_splits + s), row = b * seqlen_q + i (dense) or the
// packed query index (varlen, told apart at run time by cu_seqlens_q). The template mirrors the
// other forward kernels so one KernelSpec names it; only T, kHeadDim and kNumWarps are read.
// On sm_90+ it is launched programmatically (decode.py, DMATTN_PDL): its CTAs may start while
// the decode grid runs and wait for the partials in grid_dependency_wait.
#pragma once
#include "common.cuh"
#include "params.cuh"
#include "seqlen.cuh"
#include "softmax.cuh"
#include "split_combine.cuh"   // kMaxCombineSplits

namespace dm {

// Splits whose loads one warp issues before using any: a pair then waits about
// ceil(ns / (wpp * kCombineBatch)) memory latencies, not ns.
constexpr int kCombineBatch = 4;

// Warps merging one pair (a power of two <= num_warps, which is one too): the fewest whose
// splits fit one batch each. decode.combine_warps_per_pair mirrors it (the launch's grid).
__host__ __device__ constexpr int combine_warps_per_pair(int num_splits, int num_warps) {
  int w = 1;
  while (w < num_warps && w * kCombineBatch < num_splits) w *= 2;
  return w;
}

template <typename T, int kHeadDim, int kNumWarps>
__global__ void __launch_bounds__(kNumWarps * 32)
flash_fwd_combine_kernel(const FwdParams p) {
  static_assert((kNumWarps & (kNumWarps - 1)) == 0, "warps per pair must divide the CTA");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int ns = p.num_splits;
  const int wpp = combine_warps_per_pair(ns, kNumWarps);   // the same for the whole grid
  const int part = warp % wpp;                              // this warp's first split
  const int64_t pid = int64_t(blockIdx.x) * (kNumWarps / wpp) + warp / wpp;
  const bool active = pid < int64_t(p.total_rows) * p.heads;
  const float* lse_s = p.lse_accum + pid * ns;
  grid_dependency_wait();   // the partials are the decode kernel's (a programmatic launch)
  // Lane owns columns 2 * lane + 64 * c (pairs, so the output is written 4 bytes at a time).
  constexpr int kPairs = (kHeadDim + 63) / 64;
  float acc[kPairs][2];
#pragma unroll
  for (int c = 0; c < kPairs; ++c) acc[c][0] = acc[c][1] = 0.f;
  const float* o_s = p.o_accum + pid * ns * kHeadDim;
  // Unpredicated: a split's partial row holds kHeadDim columns (those past head_dim, or past
  // the row when 64 does not divide kHeadDim, only feed columns never stored).
  auto load_split = [&](int s, float2 (&x)[kPairs]) {
#pragma unroll
    for (int c = 0; c < kPairs; ++c) {
      const int col = dm_min(2 * lane + 64 * c, kHeadDim - 2);
      x[c] = *reinterpret_cast<const float2*>(o_s + s * kHeadDim + col);
    }
  };
  // The warp's first batch (all its splits when ns <= wpp * kCombineBatch) loads before the
  // lse reduction, which it does not depend on: one memory latency for both.
  float2 first[kCombineBatch][kPairs];
  float first_lse[kCombineBatch];
  if (active) {
#pragma unroll
    for (int j = 0; j < kCombineBatch; ++j) {
      if (part + j * wpp < ns) {
        load_split(part + j * wpp, first[j]);
        first_lse[j] = lse_s[part + j * wpp];
      }
    }
  }
  // Every warp of the pair reduces all ns lse values (a split whose lse is NaN, a NaN that
  // reached a kept position, makes the row NaN).
  auto lane_lse = [&](int j) { return lse_s[lane + 32 * j]; };   // lane's splits: lane + 32 j
  const float lse2 =
      active ? warp_merged_lse2<kMaxCombineSplits / 32>((ns - lane + 31) / 32, lane_lse) : -DM_INF;
  auto add_split = [&](float lse_split, const float2 (&x)[kPairs]) {
    const float w = fast_exp2(lse_split - lse2);
#pragma unroll
    for (int c = 0; c < kPairs; ++c) {
      acc[c][0] += w * x[c].x;
      acc[c][1] += w * x[c].y;
    }
  };
  if (lse2 != -DM_INF) {   // false for inactive warps
#pragma unroll
    for (int j = 0; j < kCombineBatch; ++j)
      if (part + j * wpp < ns) add_split(first_lse[j], first[j]);
    int s = part + kCombineBatch * wpp;
    for (; s + (kCombineBatch - 1) * wpp < ns; s += kCombineBatch * wpp) {
      float2 x[kCombineBatch][kPairs];
#pragma unroll
      for (int j = 0; j < kCombineBatch; ++j) load_split(s + j * wpp, x[j]);
#pragma unroll
      for (int j = 0; j < kCombineBatch; ++j) add_split(lse_s[s + j * wpp], x[j]);
    }
    for (; s < ns; s += wpp) {
      float2 x[kPairs];
      load_split(s, x);
      add_split(lse_s[s], x);
    }
  }
  if (wpp > 1) {   // uniform over the CTA: the barrier is reached by every thread
    __shared__ float2 partial[kNumWarps][kPairs][32];
#pragma unroll
    for (int c = 0; c < kPairs; ++c) partial[warp][c][lane] = make_float2(acc[c][0], acc[c][1]);
    __syncthreads();
    if (part != 0) return;
    for (int w = 1; w < wpp; ++w) {
#pragma unroll
      for (int c = 0; c < kPairs; ++c) {
        const float2 x = partial[warp + w][c][lane];
        acc[c][0] += x.x;
        acc[c][1] += x.y;
      }
    }
  }
  if (!active) return;
  const int h = int(pid % p.heads);
  const int64_t row = pid / p.heads;
  const bool varlen = p.cu_seqlens_q != nullptr;
  // (b, i): varlen rows are packed query indices of "batch 0" (batch strides are 0), so the
  // sequence offsets are 0 either way.
  const int64_t b = varlen ? 0 : row / p.seqlen_q, i = varlen ? row : row % p.seqlen_q;
  const SeqInfo seq{0, 0, 0, 0};
  T* out = o_row_ptr<T>(p, int(b), h, seq, int(i));
#pragma unroll
  for (int c = 0; c < kPairs; ++c) {
    const int col = 2 * lane + 64 * c;
    if (col < p.head_dim) *reinterpret_cast<uint32_t*>(out + col) = pack2<T>(acc[c][0], acc[c][1]);
  }
  if (p.lse != nullptr && lane == 0)
    p.lse[lse_index(p, b, h, seq, i)] = lse_natural(lse2);
}

}  // namespace dm
