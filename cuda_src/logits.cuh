// logits.cuh: the one logit transform of every kernel: a raw score s = q.k becomes the
// natural-log logit z = softcap * tanh(scale * s / softcap) (softcap > 0) or scale * s, plus
// the bias. Kernels work in the log2 domain, x = z * log2 e, so that exp2 is the exponential.
// Two equivalent forms, chosen by the kernel:
//   fused: x = logit_log2(p, s) + bias * log2 e, one value per element (decode, backward);
//   split: x = y * exp_scale with y = s (no softcap, no bias) or y = z (+ bias, one FFMA by
//          add_bias), so that without softcap and bias the scale folds into the softmax's
//          FFMA (forward mma kernels; see LogitScales).
// Plain per-element functions over CTA-uniform FwdParams scalars (read from the kernel
// parameters, never copied to registers): usable from any kernel and any fragment layout.
// softcap is CTA-uniform, so tanh is never evaluated without it.
#pragma once
#include "params.cuh"

namespace dm {

DM_DEVICE bool has_softcap(const FwdParams& p) { return p.softcap > 0.f; }

// z for a softcapped score (only when has_softcap(p)): softcap * tanh(scale * s / softcap).
DM_DEVICE float softcap_logit(const FwdParams& p, float s) {
  return p.softcap * fast_tanh(s * p.scale_over_softcap);
}

// x = z * log2 e without the bias.
DM_DEVICE float logit_log2(const FwdParams& p, float s) {
  return p.softcap > 0.f ? p.softcap * kLog2e * fast_tanh(s * p.scale_over_softcap)
                         : s * p.scale_log2;
}

// Same, and dz/ds (natural units; `scale` is the softmax scale): scale * (1 - tanh^2) with a
// softcap, scale without. The backward multiplies dx by it to get d(q.k).
DM_DEVICE float logit_log2(const FwdParams& p, float s, float scale, float& dz_ds) {
  if (p.softcap > 0.f) {
    const float t = fast_tanh(s * p.scale_over_softcap);
    dz_ds = scale * (1.f - t * t);
    return p.softcap * kLog2e * t;
  }
  dz_ds = scale;
  return s * p.scale_log2;
}

// Same plus an addend in log2 units (a key-row bias), taken as the last FFMA's addend: the
// sum is one rounding wherever the compiler's basic blocks fall, so builds that differ
// elsewhere (the backward's dQ writer A/B) compute bitwise equal logits.
DM_DEVICE float logit_log2(const FwdParams& p, float s, float scale, float& dz_ds, float addend) {
  if (p.softcap > 0.f) {
    const float t = fast_tanh(s * p.scale_over_softcap);
    dz_ds = scale * (1.f - t * t);
    return fmaf(p.softcap * kLog2e, t, addend);
  }
  dz_ds = scale;
  return fmaf(s, p.scale_log2, addend);
}

// The split form's two factors. y is z (softcap) or s (no softcap): with a bias
// y' = y * bias_scale + bias is z + bias (natural units); then x = y' * exp_scale.
struct LogitScales {
  float bias_scale;  // 1 with a softcap, scale without
  float exp_scale;   // log2 e when y' is natural-log (softcap or bias), scale * log2 e if y = s
};

template <bool kHasBias>
DM_DEVICE LogitScales logit_scales(const FwdParams& p) {
  const bool capped = p.softcap > 0.f;
  return {capped ? 1.f : p.scale_log2 * (1.f / kLog2e),
          (kHasBias || capped) ? kLog2e : p.scale_log2};
}

// y' = y * bias_scale + bias (bias in natural units; one FFMA).
DM_DEVICE float add_bias(float y, const LogitScales& ls, float bias) {
  return fmaf(y, ls.bias_scale, bias);
}

}  // namespace dm
