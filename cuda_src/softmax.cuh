// softmax.cuh: online softmax of the query rows one thread holds, and its finalize. Values are
// logits * log2(e) (so exp2 is the exponential). Layout-neutral: a thread holds kRows rows, the
// values of one row are spread over kRowThreads adjacent lanes (lane ^ 1, lane ^ 2, ...), and
// the thread's values sit in fragments x[f][r * kPer + c] (row r, column c < kPer). The
// m16n8 accumulators of mma.sync and the wgmma accumulators are both kRows = 2 (rows g, g + 8),
// kPer = 2, kRowThreads = 4.
// Invariants: a row whose every key so far was excluded keeps m = -inf, l = 0 and a zero
// accumulator (alpha = exp2(-inf - 0) = 0 never multiplies a NaN in); `finalize` then gives
// inv_l = 0 (so out = 0) and lse = -inf, never NaN. A kept row has l >= 1 (its max term is
// exp2(0)); a NaN logit at a kept position makes l NaN, and the row's out and lse NaN (as in
// SDPA), never a silent 0.
#pragma once
#include "common.cuh"

namespace dm {

// x reduced over the kRowThreads lanes of its row (every lane gets the result).
// (NaN-propagating: a NaN logit at a kept position makes its row's max NaN.)
template <int kRowThreads>
DM_DEVICE float row_max(float x) {
#pragma unroll
  for (int d = 1; d < kRowThreads; d *= 2) x = fmax_nan(x, __shfl_xor_sync(0xffffffffu, x, d));
  return x;
}
template <int kRowThreads>
DM_DEVICE float row_sum(float x) {
#pragma unroll
  for (int d = 1; d < kRowThreads; d *= 2) x += __shfl_xor_sync(0xffffffffu, x, d);
  return x;
}

// An output element o of a row normalized by finalize's inv_l: 0 for a row that kept nothing
// (its o may hold 0 * NaN from a NaN value it never attended to), o * inv_l otherwise.
DM_DEVICE float normalize_out(float o, float inv_l) { return inv_l == 0.f ? 0.f : o * inv_l; }

// Natural-log lse from a log2-domain one (-inf stays -inf).
DM_DEVICE float lse_natural(float lse2) { return lse2 * (1.f / kLog2e); }

// The log2-domain lse of n partials' lse2 values at(0) .. at(n - 1) (split or warp parts of
// one row): -inf where every part kept nothing, NaN where one part is NaN.
template <typename F>
DM_DEVICE float merged_lse2(int n, F at) {
  float mx = -DM_INF;
  for (int s = 0; s < n; ++s) mx = fmax_nan(mx, at(s));
  if (mx == -DM_INF) return mx;
  float sum = 0.f;
  for (int s = 0; s < n; ++s) sum += fast_exp2(at(s) - mx);
  return mx + __log2f(sum);
}

// merged_lse2 over a warp: lane l holds the row's partial lse2 values at(j), j < n <= kMaxN
// (n may differ between lanes; at is only called for j < n). Every lane gets the result.
template <int kMaxN, typename F>
DM_DEVICE float warp_merged_lse2(int n, F at) {
  float mx = -DM_INF;
#pragma unroll
  for (int j = 0; j < kMaxN; ++j)
    if (j < n) mx = fmax_nan(mx, at(j));
  mx = row_max<32>(mx);
  if (mx == -DM_INF) return mx;   // uniform over the warp
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kMaxN; ++j)
    if (j < n) sum += fast_exp2(at(j) - mx);
  return mx + __log2f(row_sum<32>(sum));
}

// True for a NaN (PTX testp: not folded away under --use_fast_math).
DM_DEVICE bool is_nan(float x) {
  uint32_t r;
  asm("{ .reg .pred p; testp.notanumber.f32 p, %1; selp.u32 %0, 1, 0, p; }" : "=r"(r) : "f"(x));
  return r != 0;
}

// OnlineSoftmax::update's default row hook: the thread's max of row r stands as computed.
struct KeepRowMax {
  template <typename X>
  DM_DEVICE float operator()(X&, int, float mx) const { return mx; }
};

// kLazyGap >= 0: a row keeps its max (alpha = 1: the output accumulator needs no rescale)
// while a tile raises it by at most kLazyGap (log2 units), so probabilities stay
// <= 2^kLazyGap (l, the output and lse all use the max that was kept: FlashAttention-4's
// conditional rescaling). 0 keeps the values bit for bit (a row keeps only a max that did
// not move); above 0 the largest probability is no longer an exact 1 in P's 16 bits, which
// costs accuracy. -1: off. m is the reference the row's exponentials use.
template <int kRows = 2, int kRowThreads = 4, int kLazyGap = -1>
struct OnlineSoftmax {
  float m[kRows];  // running row max (log2 domain); -inf while nothing was kept
  float l[kRows];  // per-thread partial row sums; reduced over the row's lanes by finalize

  DM_DEVICE OnlineSoftmax() {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      m[r] = -DM_INF;
      l[r] = 0.f;
    }
  }

  // Turns scores x * scale (scale > 0; the log2-domain logits) into probabilities in place;
  // returns the per-row rescale factors for the output accumulator (see rescale_o). Passing
  // the raw scores with their scale folds the scaling into one FFMA per element.
  // row_fix(x, r, mx) sees the thread's max mx of row r's values before the row's lanes join
  // theirs and returns the max to use: it may first rewrite that row's values in x (sm90
  // fwd.cu, DM_SM90_MB_FOLD: masked keys of a row that holds a NaN).
  template <int kF, int kN, typename RowFix = KeepRowMax>
  DM_DEVICE void update(float (&x)[kF][kN], float (&alpha)[kRows], float scale = 1.f,
                        const RowFix& row_fix = RowFix()) {
    constexpr int kPer = kN / kRows;
    static_assert(kPer * kRows == kN, "a fragment holds kPer values of each row");
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float mx = -DM_INF;
#pragma unroll
      for (int f = 0; f < kF; ++f) {
        float fm = x[f][r * kPer];  // this fragment's max of the row, then joined to mx
#pragma unroll
        for (int c = 1; c < kPer; ++c) fm = fmax_nan(fm, x[f][r * kPer + c]);
        mx = fmax_nan(mx, fm);
      }
      mx = row_fix(x, r, mx);
      mx = fmax_nan(m[r], row_max<kRowThreads>(mx) * scale);
      // false for a NaN and while nothing was kept (the difference is NaN or +inf)
      const bool keep = kLazyGap >= 0 && mx - m[r] <= float(kLazyGap);
      if (keep) mx = m[r];
      const float m_use = mx == -DM_INF ? 0.f : mx;  // all excluded so far: exp2(-inf) = 0
      alpha[r] = keep ? 1.f : fast_exp2(m[r] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int f = 0; f < kF; ++f) {
        float part = 0.f;  // this fragment's values of the row, summed before they join `sum`
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
          float& v = x[f][r * kPer + c];
          v = fast_exp2(fmaf(v, scale, -m_use));
          part = c == 0 ? v : part + v;
        }
        sum += part;
      }
      l[r] = l[r] * alpha[r] + sum;
      m[r] = mx;
    }
  }

  // Per row: 1/l (0 for a row that kept nothing) and the log2-domain lse m + log2 l
  // (-inf for such a row). lse_natural converts the latter.
  DM_DEVICE void finalize(float (&inv_l)[kRows], float (&lse2)[kRows]) const {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float s = row_sum<kRowThreads>(l[r]);
      inv_l[r] = s == 0.f ? 0.f : 1.f / s;       // a NaN sum stays NaN: out NaN
      lse2[r] = s == 0.f ? -DM_INF : m[r] + __log2f(s);
    }
  }
};

// o[f][r * kPer + c] *= alpha[r]: the output accumulator follows its rows' new max.
template <int kF, int kN, int kRows>
DM_DEVICE void rescale_o(float (&o)[kF][kN], const float (&alpha)[kRows]) {
  constexpr int kPer = kN / kRows;
  static_assert(kPer * kRows == kN, "a fragment holds kPer values of each row");
#pragma unroll
  for (int f = 0; f < kF; ++f)
#pragma unroll
    for (int e = 0; e < kN; ++e) o[f][e] *= alpha[e / kPer];
}

}  // namespace dm
