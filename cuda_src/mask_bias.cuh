// mask_bias.cuh: mask and bias addressing, arch-neutral: where a (batch, head, sequence)
// starts in the mask, the bias and dbias (q-based, k-based and broadcast layouts through their
// strides; stride 0 = broadcast, read in place; 64-bit offsets), single bias elements, and a
// bias tile staged into shared memory as fp32. Positions outside the sequence are never read:
// they count as excluded (mask) or 0 (bias). The keep-bits at mma.sync fragment positions are
// in sm80/fragment.cuh.
#pragma once
#include "params.cuh"
#include "seqlen.cuh"

namespace dm {

// Element offset of (row 0, col 0) of this (batch, head, sequence) in the mask / bias.
DM_DEVICE int64_t mask_offset(const FwdParams& p, int b, int h, const SeqInfo& s) {
  return b * p.mask_batch_stride + (h / p.mask_head_ratio) * p.mask_head_stride +
         int64_t(s.q_start) * p.mask_qseq_stride + int64_t(s.k_start) * p.mask_kseq_stride;
}
DM_DEVICE int64_t bias_offset(const FwdParams& p, int b, int h, const SeqInfo& s) {
  return b * p.bias_batch_stride + (h / p.bias_head_ratio) * p.bias_head_stride +
         int64_t(s.q_start) * p.bias_qseq_stride + int64_t(s.k_start) * p.bias_kseq_stride;
}

// Same for dbias (the bias's own shape; BwdParams strides).
DM_DEVICE int64_t dbias_offset(const BwdParams& bp, int b, int h, const SeqInfo& s) {
  return b * bp.dbias_batch_stride + (h / bp.f.bias_head_ratio) * bp.dbias_head_stride +
         int64_t(s.q_start) * bp.dbias_qseq_stride + int64_t(s.k_start) * bp.dbias_kseq_stride;
}

// Bias value at (row i, key col) of the sequence (base: bias_offset); 0 outside it.
template <typename T>
DM_DEVICE float bias_element(const FwdParams& p, int64_t base, int i, int col, int len_q,
                             int len_k) {
  if (i >= len_q || col >= len_k) return 0.f;
  const int64_t idx = base + int64_t(i) * p.bias_row_stride + int64_t(col) * p.bias_col_stride;
  return p.bias_is_fp32 ? static_cast<const float*>(p.bias)[idx]
                        : to_float(static_cast<const T*>(p.bias)[idx]);
}

// Bias tile (times log2 e) into shared memory, [kBlockM][kBStride] fp32; 0 outside the sequence.
// Loads are issued in unrolled batches of up to kMaxBatch per thread before any is stored, so
// their latencies overlap (and overlap the Q/dO copies in flight) instead of adding up.
template <typename T, int kBlockM, int kBlockN, int kBStride, int kThreads, int kMaxBatch>
DM_DEVICE void load_bias_tile(const FwdParams& p, int64_t base, int m0, int n0, int len_q,
                              int len_k, float* s) {
  constexpr int kPer = kBlockM * kBlockN / kThreads;  // elements per thread
  static_assert(kPer * kThreads == kBlockM * kBlockN, "threads tile the bias block");
  constexpr int kBatch = kPer < kMaxBatch ? kPer : kMaxBatch;
  static_assert(kPer % kBatch == 0, "batches tile a thread's elements");
  const T* bias16 = static_cast<const T*>(p.bias);
  const float* bias32 = static_cast<const float*>(p.bias);
#pragma unroll 1
  for (int t0 = 0; t0 < kPer; t0 += kBatch) {
    float v[kBatch];
#pragma unroll
    for (int t = 0; t < kBatch; ++t) {
      const int e = threadIdx.x + (t0 + t) * kThreads;
      const int r = e / kBlockN, c = e % kBlockN;
      v[t] = 0.f;
      if (m0 + r < len_q && n0 + c < len_k) {
        const int64_t idx = base + int64_t(m0 + r) * p.bias_row_stride +
                            int64_t(n0 + c) * p.bias_col_stride;
        v[t] = p.bias_is_fp32 ? bias32[idx] : to_float(bias16[idx]);
      }
    }
#pragma unroll
    for (int t = 0; t < kBatch; ++t) {
      const int e = threadIdx.x + (t0 + t) * kThreads;
      s[(e / kBlockN) * kBStride + e % kBlockN] = v[t] * kLog2e;
    }
  }
}

}  // namespace dm
