// fwd.cu: the forward kernel entry point. This first kernel is deliberately simple
// (scalar fp32 math, no tensor cores): a CTA owns kBlockM query rows of one (batch, head),
// one warp per row; K/V tiles of kBlockN keys are staged in shared memory and shared by the
// warps; each lane scores one key of the tile and owns kHeadDim/32 output columns.
// It implements the whole dense/varlen forward contract (mask, bias, causal/window, softcap,
// GQA, lse, fully masked rows) and is replaced by the tensor-core kernel.
#pragma once
#include "common.cuh"
#include "params.cuh"
#include "seqlen.cuh"
#include "block_info.cuh"
#include "mask_bias.cuh"

namespace dm {

DM_DEVICE float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
DM_DEVICE float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kNumWarps, bool kHasMask,
          bool kHasBias, bool kVarlen, bool kSparse, bool kDebug>
__global__ void __launch_bounds__(kNumWarps * 32, 1)
flash_fwd_kernel(const FwdParams p) {
  static_assert(kBlockM == kNumWarps, "simple kernel: one warp per query row");
  static_assert(kBlockN == 32, "simple kernel: one key per lane");
  static_assert(!kSparse, "block-sparse lists are read by the tensor-core kernel only");
  static_assert(kHeadDim % 32 == 0, "head dim is padded to a multiple of 32");
  constexpr int kCols = kHeadDim / 32;       // output columns per lane
  constexpr int kRowWords = kHeadDim / 2 + 1; // odd word stride: conflict-free row reads

  __shared__ uint32_t k_tile[kBlockN * kRowWords];
  __shared__ uint32_t v_tile[kBlockN * kRowWords];
  __shared__ float q_rows[kBlockM][kHeadDim];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq = seq_info<kVarlen>(p, b);
  const int row0 = blockIdx.x * kBlockM;
  if (row0 >= seq.len_q) return;  // varlen: this sequence is shorter than the grid
  const int row_end = dm_min(row0 + kBlockM, seq.len_q);
  const int i = row0 + warp;      // this warp's query row
  const bool row_ok = i < seq.len_q;
  const int kvh = h / p.q_per_kv;
  const int off = seq.len_k - seq.len_q;

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
               int64_t(seq.q_start) * p.q_row_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + kvh * p.k_head_stride +
               int64_t(seq.k_start) * p.k_row_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + kvh * p.v_head_stride +
               int64_t(seq.k_start) * p.v_row_stride;
  for (int d = lane; d < kHeadDim; d += 32)
    q_rows[warp][d] = (row_ok && d < p.head_dim) ? to_float(q[int64_t(i) * p.q_row_stride + d]) : 0.f;

  const uint8_t* mask = kHasMask ? p.mask + mask_offset(p, b, h, seq) : nullptr;
  const int64_t bias_base = kHasBias ? bias_offset(p, b, h, seq) : 0;

  // Online softmax state in the log2 domain: m = running max of logit*log2(e), l = sum.
  float m = -DM_INF, l = 0.f;
  float acc[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = 0.f;

  const KeyRange kr = key_range(p, row0, row_end, seq.len_q, seq.len_k);
  const int tile_begin = dm_max(kr.k_begin, 0) / kBlockN * kBlockN;
  for (int j0 = tile_begin; j0 < kr.k_end; j0 += kBlockN) {
    const int j = j0 + lane;
    bool keep = row_ok && j < seq.len_k && in_window(p, i, j, off);
    if (kHasMask && keep)
      keep = mask[int64_t(i) * p.mask_row_stride + int64_t(j) * p.mask_col_stride] != 0;
    // A tile nobody in the CTA keeps is empty: skip its K/V loads entirely.
    if (!__syncthreads_or(keep)) continue;
#ifdef DMATTN_DEBUG_COUNTERS
    if (threadIdx.x == 0) {
      const int cta = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
      atomicAdd(p.tile_counters + 2 * cta, 1u);
    }
#endif
    // Stage the K/V tile (rows past len_k and columns past head_dim are zero).
    for (int e = threadIdx.x; e < kBlockN * (kHeadDim / 2); e += kNumWarps * 32) {
      const int r = e / (kHeadDim / 2), cw = e % (kHeadDim / 2);
      uint32_t kw = 0, vw = 0;
      if (j0 + r < seq.len_k && 2 * cw < p.head_dim) {
        const uint16_t* kp = reinterpret_cast<const uint16_t*>(k + int64_t(j0 + r) * p.k_row_stride);
        const uint16_t* vp = reinterpret_cast<const uint16_t*>(v + int64_t(j0 + r) * p.v_row_stride);
        kw = uint32_t(kp[2 * cw]) | (uint32_t(kp[2 * cw + 1]) << 16);
        vw = uint32_t(vp[2 * cw]) | (uint32_t(vp[2 * cw + 1]) << 16);
      }
      k_tile[r * kRowWords + cw] = kw;
      v_tile[r * kRowWords + cw] = vw;
    }
    __syncthreads();

    float x = -DM_INF;  // this lane's logit * log2(e)
    if (keep) {
      float s = 0.f;
#pragma unroll 4
      for (int cw = 0; cw < kHeadDim / 2; ++cw) {
        const uint32_t w = k_tile[lane * kRowWords + cw];
        T lo, hi;
        lo.bits = uint16_t(w & 0xffffu);
        hi.bits = uint16_t(w >> 16);
        s += q_rows[warp][2 * cw] * to_float(lo) + q_rows[warp][2 * cw + 1] * to_float(hi);
      }
      float logit = p.softcap > 0.f ? p.softcap * fast_tanh(s * p.scale_over_softcap)
                                    : s * (p.scale_log2 / kLog2e);
      if (kHasBias) {
        const int64_t bi = bias_base + int64_t(i) * p.bias_row_stride + int64_t(j) * p.bias_col_stride;
        logit += p.bias_is_fp32 ? static_cast<const float*>(p.bias)[bi]
                                : to_float(static_cast<const T*>(p.bias)[bi]);
      }
      x = logit * kLog2e;
    }
    const float m_new = fmaxf(m, warp_max(x));
    if (m_new != -DM_INF) {  // all-masked so far: state stays (m=-inf, l=0, acc=0)
      const float alpha = fast_exp2(m - m_new);
      const float pj = keep ? fast_exp2(x - m_new) : 0.f;
      l = l * alpha + warp_sum(pj);
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[c] *= alpha;
      for (int jj = 0; jj < kBlockN; ++jj) {
        const float pjj = __shfl_sync(0xffffffffu, pj, jj);
        if (pjj == 0.f) continue;  // uniform across the warp
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          const int d = lane + 32 * c;
          const uint32_t w = v_tile[jj * kRowWords + d / 2];
          T e;
          e.bits = uint16_t((d & 1) ? (w >> 16) : (w & 0xffffu));
          acc[c] += pjj * to_float(e);
        }
      }
      m = m_new;
    }
    __syncthreads();
  }

  if (!row_ok) return;
  // A row with no allowed key: out = 0, lse = -inf (never NaN).
  const float inv_l = l > 0.f ? 1.f / l : 0.f;
  T* o = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride +
         int64_t(seq.q_start + i) * p.o_row_stride;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int d = lane + 32 * c;
    if (d < p.head_dim) o[d] = from_float<T>(acc[c] * inv_l);
  }
  if (p.lse != nullptr && lane == 0) {
    const float lse = l > 0.f ? (m + __log2f(l)) / kLog2e : -DM_INF;
    p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_start + i] = lse;
  }
}

}  // namespace dm
