// split_combine.cuh: the split-KV merge done by the decode grid itself (FwdParams.split_counters
// set; dmattn_cupy/decode.py, fused_combine, decides where). Every split CTA writes its partial
// as it does for fwd_combine.cu, then counts itself on its group's counter (one int32 per
// (sequence, kv head, row slab)); the CTA that counts last merges the group's partials of its
// packed rows and winds the counter back to 0, so every launch finds the counters zero
// (dmattn_cupy/scratch.counter keeps one buffer per stream; a graph gets its own, zero-filled).
// The merge is fwd_combine.cu's: lse = log sum_s exp(lse_s) (a NaN split makes the row NaN, a
// row no split kept gets out = 0, lse = -inf), out = sum_s exp(lse_s - lse) * o_s. One CTA
// reads all of a group's partials, so the launcher keeps this to groups whose partials are few.
#pragma once
#include "common.cuh"
#include "params.cuh"
#include "seqlen.cuh"
#include "softmax.cuh"

namespace dm {

constexpr int kMaxCombineSplits = 128;   // decode.MAX_SPLITS

// Whether this CTA counted last among the group's ns splits. Every thread of the CTA calls it
// once its own partial writes are issued; *flag is a shared int. Thread 0 counts with one
// acq_rel atomic (CUTLASS's semaphore pattern): the release covers the CTA's writes ordered
// before it by the barrier; in the last CTA the acquire, then the barrier, orders every
// thread's reads of the other splits' partials after their counts.
DM_DEVICE bool last_split_of_group(int32_t* counter, int ns, int* flag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    int prev;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;"
                 : "=r"(prev) : "l"(counter) : "memory");
    const bool last = prev == ns - 1;
    if (last) *counter = 0;   // all ns have counted: zero for the next launch
    *flag = last;
  }
  __syncthreads();
  return *flag != 0;
}

// Merges the partials of the CTA's group: sequence blockIdx.z, kv head blockIdx.y, row slab
// blockIdx.x / num_splits (its 16 packed rows; packed row pr is query pr / q_per_kv of head
// kvh * q_per_kv + pr % q_per_kv, its partials at ((row0 + query) * heads + head) * ns + s, row0:
// the sequence's first query row over the batch). sW: shared memory for 16 * (ns + 1) floats.
// Everything is derived here from the block indices and p (nothing held over the key loop).
// Partials are read through L2 (ld.global.cg): other CTAs of this grid wrote them.
template <typename T, int kHeadDim, int kThreads, bool kVarlen>
DM_DEVICE void combine_group(const FwdParams& p, float* sW) {
  static_assert(kThreads % 32 == 0 && kHeadDim % 4 == 0, "warps; float4 columns");
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, qpk = p.q_per_kv;
  const int ns = p.num_splits, b = blockIdx.z, kvh = blockIdx.y;
  const int m0 = 16 * (blockIdx.x / ns);
  const SeqInfo seq = seq_info<kVarlen>(p, b);
  const int n_rows = dm_min(16, seq.len_q * qpk - m0);
  const int64_t row0 = kVarlen ? int64_t(seq.q_start) : int64_t(b) * p.seqlen_q;
  auto pair_of = [&](int r) {   // (query row over the batch) * heads + head of packed row r
    const int pr = m0 + r;
    return (row0 + pr / qpk) * p.heads + kvh * qpk + pr % qpk;
  };
  float* sLse = sW + 16 * ns;
  // Each row's lse and its splits' weights, one warp per row.
#pragma unroll 1
  for (int r = warp; r < n_rows; r += kWarps) {
    const float* l = p.lse_accum + pair_of(r) * ns;
    constexpr int kPerLane = kMaxCombineSplits / 32;
    float ls[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j)
      ls[j] = lane + 32 * j < ns ? __ldcg(l + lane + 32 * j) : -DM_INF;
    const float lse2 = warp_merged_lse2<kPerLane>(kPerLane, [&](int j) { return ls[j]; });
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int s = lane + 32 * j;
      if (s < ns) sW[r * ns + s] = lse2 == -DM_INF ? 0.f : fast_exp2(ls[j] - lse2);
    }
    if (lane == 0) sLse[r] = lse2;
  }
  __syncthreads();
  // out[r][c .. c + 3] = sum_s w[r][s] * o_s[r][c .. c + 3]: one float4 column per item,
  // kBatch splits' loads in flight before their sums (32 splits: 2 L2 round trips).
  constexpr int kQuads = kHeadDim / 4, kBatch = 16;
#pragma unroll 1
  for (int item = threadIdx.x; item < n_rows * kQuads; item += kThreads) {
    const int r = item / kQuads, col = (item % kQuads) * 4;
    const float4* src = reinterpret_cast<const float4*>(p.o_accum + pair_of(r) * ns * kHeadDim +
                                                        col);
    const float* w = sW + r * ns;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    auto add = [&](float ws, float4 x) {
      acc.x += ws * x.x;
      acc.y += ws * x.y;
      acc.z += ws * x.z;
      acc.w += ws * x.w;
    };
    int s = 0;
#pragma unroll 1
    for (; s + kBatch <= ns; s += kBatch) {
      float4 x[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) x[j] = __ldcg(src + (s + j) * (kHeadDim / 4));
#pragma unroll
      for (int j = 0; j < kBatch; ++j) add(w[s + j], x[j]);
    }
#pragma unroll 1
    for (; s < ns; ++s) add(w[s], __ldcg(src + s * (kHeadDim / 4)));
    if (col < p.head_dim) {   // head_dim is a multiple of 8: the quad is whole
      const int pr = m0 + r;
      uint32_t* out = reinterpret_cast<uint32_t*>(
          o_row_ptr<T>(p, b, kvh * qpk + pr % qpk, seq, pr / qpk) + col);
      out[0] = pack2<T>(acc.x, acc.y);
      out[1] = pack2<T>(acc.z, acc.w);
    }
  }
  if (p.lse != nullptr && threadIdx.x < n_rows) {
    const int pr = m0 + threadIdx.x;
    p.lse[lse_index(p, b, kvh * qpk + pr % qpk, seq, pr / qpk)] = lse_natural(sLse[threadIdx.x]);
  }
}

}  // namespace dm
