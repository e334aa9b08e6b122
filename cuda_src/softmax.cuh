// softmax.cuh: online softmax for one thread's two rows of an m16 tile (rows g and g+8).
// Values are logits * log2(e) (so exp2 is the exponential). Invariants: a row whose every key
// so far was excluded keeps m = -inf, l = 0 and a zero accumulator; `finalize` then gives
// out = 0 and lse = -inf, never NaN.
#pragma once
#include "common.cuh"

namespace dm {

template <int kNF>  // n8 fragments of scores per thread row pair
struct OnlineSoftmax {
  float m[2] = {-DM_INF, -DM_INF};
  float l[2] = {0.f, 0.f};  // per-thread partial sums; reduced over the quad at the end

  // Turns scores x[j][e] * scale (scale > 0; the log2-domain logits) into probabilities in
  // place; returns the per-row rescale factors the caller applies to its output accumulator.
  // Passing the raw scores with their scale folds the scaling into one FFMA per element.
  DM_DEVICE void update(float (&x)[kNF][4], float (&alpha)[2], float scale = 1.f) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -DM_INF;
#pragma unroll
      for (int j = 0; j < kNF; ++j) mx = fmaxf(mx, fmaxf(x[j][2 * r], x[j][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mx = fmaxf(m[r], mx * scale);
      const float m_use = mx == -DM_INF ? 0.f : mx;  // all excluded so far: exp2(-inf) = 0
      alpha[r] = fast_exp2(m[r] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kNF; ++j) {
        x[j][2 * r] = fast_exp2(fmaf(x[j][2 * r], scale, -m_use));
        x[j][2 * r + 1] = fast_exp2(fmaf(x[j][2 * r + 1], scale, -m_use));
        sum += x[j][2 * r] + x[j][2 * r + 1];
      }
      l[r] = l[r] * alpha[r] + sum;
      m[r] = mx;
    }
  }

  // Row sums over the quad; per-row 1/l (0 for an empty row) and natural-log lse.
  DM_DEVICE void finalize(float (&inv_l)[2], float (&lse)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float s = l[r];
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      inv_l[r] = s > 0.f ? 1.f / s : 0.f;
      lse[r] = s > 0.f ? (m[r] + __log2f(s)) * (1.f / kLog2e) : -DM_INF;
    }
  }
};

}  // namespace dm
