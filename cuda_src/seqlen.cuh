// seqlen.cuh: where one (batch, head) problem starts and how long it is, dense or varlen.
// Read once per CTA. For dense inputs q_start = k_start = 0 and the batch strides select
// the batch; for varlen the batch strides are 0 and the starts come from cu_seqlens.
#pragma once
#include "params.cuh"

namespace dm {

struct SeqInfo {
  int q_start, k_start;  // first packed row of this sequence (0 for dense)
  int len_q, len_k;
};

template <bool kVarlen>
DM_DEVICE SeqInfo seq_info(const FwdParams& p, int b) {
  SeqInfo s;
  if (kVarlen) {
    s.q_start = p.cu_seqlens_q[b];
    s.k_start = p.cu_seqlens_k[b];
    s.len_q = p.cu_seqlens_q[b + 1] - s.q_start;
    s.len_k = p.cu_seqlens_k[b + 1] - s.k_start;
  } else {
    s.q_start = 0;
    s.k_start = 0;
    s.len_q = p.seqlen_q;
    s.len_k = p.seqlen_k;
  }
  return s;
}

// Row `row` (sequence-relative) of query head h / kv head kvh of batch b in q / k / v.
template <typename T>
DM_DEVICE const T* q_row_ptr(const FwdParams& p, int b, int h, const SeqInfo& s, int row) {
  return static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
         int64_t(s.q_start + row) * p.q_row_stride;
}
template <typename T>
DM_DEVICE const T* k_row_ptr(const FwdParams& p, int b, int kvh, const SeqInfo& s, int row) {
  return static_cast<const T*>(p.k) + b * p.k_batch_stride + kvh * p.k_head_stride +
         int64_t(s.k_start + row) * p.k_row_stride;
}
template <typename T>
DM_DEVICE const T* v_row_ptr(const FwdParams& p, int b, int kvh, const SeqInfo& s, int row) {
  return static_cast<const T*>(p.v) + b * p.v_batch_stride + kvh * p.v_head_stride +
         int64_t(s.k_start + row) * p.v_row_stride;
}

}  // namespace dm
