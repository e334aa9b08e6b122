// seqlen.cuh: where one (batch, head) problem starts and how long it is, dense or varlen,
// and the one place that turns (batch, head, sequence row) into addresses: the row pointers
// of every tensor (q, k, v, o; dout, dq, dk, dv, dq_accum) and the lse index (lse, dlse and
// dsum share the lse layout). SeqInfo is read once per CTA. For dense inputs
// q_start = k_start = 0 and the batch strides select the batch; for varlen the batch strides
// are 0 and the starts come from cu_seqlens. Rows are sequence-relative; offsets are 64-bit.
#pragma once
#include "params.cuh"
#include "bwd_params.cuh"

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

template <typename T>
DM_DEVICE T* o_row_ptr(const FwdParams& p, int b, int h, const SeqInfo& s, int row) {
  return static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride +
         int64_t(s.q_start + row) * p.o_row_stride;
}

// Index of (batch b, head h, sequence row i) in lse-layout buffers: (B, H, Sq) dense,
// (H, total_q) varlen (row stride 1 in both).
// (64-bit b and i: fwd_combine.cu derives them from a 64-bit packed index.)
DM_DEVICE int64_t lse_index(const FwdParams& p, int64_t b, int h, const SeqInfo& s,
                            int64_t i) {
  return b * p.lse_batch_stride + h * p.lse_head_stride + s.q_start + i;
}

// Backward tensors: dout and dq like q, dk and dv like k, dq_accum fp32 like q.
template <typename T>
DM_DEVICE const T* do_row_ptr(const BwdParams& bp, int b, int h, const SeqInfo& s, int row) {
  return static_cast<const T*>(bp.dout) + b * bp.do_batch_stride + h * bp.do_head_stride +
         int64_t(s.q_start + row) * bp.do_row_stride;
}
template <typename T>
DM_DEVICE T* dq_row_ptr(const BwdParams& bp, int b, int h, const SeqInfo& s, int row) {
  return static_cast<T*>(bp.dq) + b * bp.dq_batch_stride + h * bp.dq_head_stride +
         int64_t(s.q_start + row) * bp.dq_row_stride;
}
template <typename T>
DM_DEVICE T* dk_row_ptr(const BwdParams& bp, int b, int kvh, const SeqInfo& s, int row) {
  return static_cast<T*>(bp.dk) + b * bp.dk_batch_stride + kvh * bp.dk_head_stride +
         int64_t(s.k_start + row) * bp.dk_row_stride;
}
template <typename T>
DM_DEVICE T* dv_row_ptr(const BwdParams& bp, int b, int kvh, const SeqInfo& s, int row) {
  return static_cast<T*>(bp.dv) + b * bp.dv_batch_stride + kvh * bp.dv_head_stride +
         int64_t(s.k_start + row) * bp.dv_row_stride;
}
DM_DEVICE float* dqa_row_ptr(const BwdParams& bp, int b, int h, const SeqInfo& s, int row) {
  return bp.dq_accum + b * bp.dqa_batch_stride + h * bp.dqa_head_stride +
         int64_t(s.q_start + row) * bp.dqa_row_stride;
}

}  // namespace dm
