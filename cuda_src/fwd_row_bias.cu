// fwd_row_bias.cu: a bias broadcast over keys ((B|1, H|1, Sq|1, 1): one value b per query row,
// or a scalar) applied after a forward that ran without it (dmattn_cupy/row_bias.py). Softmax
// is shift-invariant, so such a bias leaves out as it was and moves lse by b, except where b
// is not a plain shift; per (batch, head, row), as reference.dense_forward has it:
// - a row with no allowed key (lse -inf: out 0) stays so, whatever b is;
// - a NaN or +inf b makes every logit of the row NaN or +inf: out and lse NaN;
// - b = -inf, or a finite b below LOWEST_LOGIT (b * log2 e is -inf in float32, as the other
//   kernels compute logits), excludes every key: out 0, lse -inf;
// - otherwise lse += b.
// The params record is the forward's own with the bias in it; one thread per row, dense only.
#pragma once
#include "mask_bias.cuh"   // params.cuh, seqlen.cuh
#include "softmax.cuh"     // is_nan

namespace dm {

template <typename T, int kNumWarps>
__global__ void __launch_bounds__(kNumWarps * 32)
flash_fwd_row_bias_kernel(const FwdParams p) {
  const int64_t row = int64_t(blockIdx.x) * (kNumWarps * 32) + threadIdx.x;
  if (row >= int64_t(p.batch) * p.heads * p.seqlen_q) return;
  const int i = int(row % p.seqlen_q);
  const int h = int(row / p.seqlen_q % p.heads);
  const int b = int(row / (int64_t(p.seqlen_q) * p.heads));
  const SeqInfo seq{0, 0, 0, 0};
  const int64_t at = lse_index(p, b, h, seq, i);
  const float lse = p.lse[at];
  if (lse == -DM_INF) return;
  const float bias = bias_element<T>(p, bias_offset(p, b, h, seq), i, 0, p.seqlen_q, 1);
  const bool nan_row = is_nan(bias) || bias == DM_INF;
  if (!nan_row && bias * kLog2e != -DM_INF) {   // a plain shift: out stays
    p.lse[at] = lse + bias;
    return;
  }
  const float nan = __int_as_float(0x7fc00000);
  p.lse[at] = nan_row ? nan : -DM_INF;
  const T fill = from_float<T>(nan_row ? nan : 0.f);   // the row: NaN, or dropped (0)
  T* out = o_row_ptr<T>(p, b, h, seq, i);
  for (int c = 0; c < p.head_dim; ++c) out[c] = fill;
}

}  // namespace dm
