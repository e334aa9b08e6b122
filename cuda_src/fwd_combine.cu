// fwd_combine.cu: merges the split-KV partials of fwd_decode.cu. One warp per (query row,
// head): lse = log sum_s exp(lse_s) over the splits, out = sum_s exp(lse_s - lse) * o_s, where
// o_s is split s's output normalized by its own sum (0 for a split that kept nothing, whose
// lse_s is -inf). A row no split kept gets out = 0 and lse = -inf. Partials are indexed
// ((row * H + h) * num_splits + s), row = b * seqlen_q + i (dense) or the packed query index
// (varlen, told apart at run time by cu_seqlens_q). The template mirrors the other forward
// kernels so one KernelSpec names it; only T, kHeadDim and kNumWarps are read.
#pragma once
#include "common.cuh"
#include "params.cuh"
#include "seqlen.cuh"
#include "softmax.cuh"

namespace dm {

template <typename T, int kHeadDim, int kNumWarps>
__global__ void __launch_bounds__(kNumWarps * 32)
flash_fwd_combine_kernel(const FwdParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t pid = int64_t(blockIdx.x) * kNumWarps + threadIdx.x / 32;
  if (pid >= int64_t(p.total_rows) * p.heads) return;
  const int ns = p.num_splits;
  const float* lse_s = p.lse_accum + pid * ns;
  float mx = -DM_INF;
  // A split whose lse is NaN (a NaN reached a kept position) makes the row NaN.
  for (int s = lane; s < ns; s += 32) mx = fmax_nan(mx, lse_s[s]);
#pragma unroll
  for (int d = 16; d > 0; d /= 2) mx = fmax_nan(mx, __shfl_xor_sync(0xffffffffu, mx, d));
  float lse2 = -DM_INF;
  if (mx != -DM_INF) {
    float sum = 0.f;
    for (int s = lane; s < ns; s += 32) sum += fast_exp2(lse_s[s] - mx);
#pragma unroll
    for (int d = 16; d > 0; d /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, d);
    lse2 = mx + __log2f(sum);
  }
  const int h = int(pid % p.heads);
  const int64_t row = pid / p.heads;
  const bool varlen = p.cu_seqlens_q != nullptr;
  // (b, i): varlen rows are packed query indices of "batch 0" (batch strides are 0), so the
  // sequence offsets are 0 either way.
  const int64_t b = varlen ? 0 : row / p.seqlen_q, i = varlen ? row : row % p.seqlen_q;
  const SeqInfo seq{0, 0, 0, 0};
  T* out = o_row_ptr<T>(p, int(b), h, seq, int(i));
  const float* o_s = p.o_accum + pid * ns * kHeadDim;
  // Lane owns columns 2 * lane + 64 * c (pairs, so the output is written 4 bytes at a time).
  constexpr int kPairs = (kHeadDim + 63) / 64;
  float acc[kPairs][2];
#pragma unroll
  for (int c = 0; c < kPairs; ++c) acc[c][0] = acc[c][1] = 0.f;
  // Splits in batches of kBatch whose loads all issue before any is used: a row then waits
  // ceil(ns / kBatch) memory latencies, not ns (a few warps per SM hide nothing).
  constexpr int kBatch = 4;
  auto add_split = [&](int s, const float2 (&x)[kPairs]) {
    const float w = fast_exp2(lse_s[s] - lse2);
#pragma unroll
    for (int c = 0; c < kPairs; ++c) {
      acc[c][0] += w * x[c].x;
      acc[c][1] += w * x[c].y;
    }
  };
  // Unpredicated: a split's partial row holds kHeadDim columns (those past head_dim, or past
  // the row when 64 does not divide kHeadDim, only feed columns never stored).
  auto load_split = [&](int s, float2 (&x)[kPairs]) {
#pragma unroll
    for (int c = 0; c < kPairs; ++c) {
      const int col = dm_min(2 * lane + 64 * c, kHeadDim - 2);
      x[c] = *reinterpret_cast<const float2*>(o_s + s * kHeadDim + col);
    }
  };
  if (lse2 != -DM_INF) {
    int s = 0;
    for (; s + kBatch <= ns; s += kBatch) {
      float2 x[kBatch][kPairs];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) load_split(s + j, x[j]);
#pragma unroll
      for (int j = 0; j < kBatch; ++j) add_split(s + j, x[j]);
    }
    for (; s < ns; ++s) {
      float2 x[kPairs];
      load_split(s, x);
      add_split(s, x);
    }
  }
#pragma unroll
  for (int c = 0; c < kPairs; ++c) {
    const int col = 2 * lane + 64 * c;
    if (col < p.head_dim) *reinterpret_cast<uint32_t*>(out + col) = pack2<T>(acc[c][0], acc[c][1]);
  }
  if (p.lse != nullptr && lane == 0)
    p.lse[lse_index(p, b, h, seq, i)] = lse_natural(lse2);
}

}  // namespace dm
