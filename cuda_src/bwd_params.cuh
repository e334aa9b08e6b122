// bwd_params.cuh: the one struct a backward launch receives, by value: the forward's record
// (inputs, out, lse, mask/bias, sizes, window) followed by the gradient buffers and strides
// (in elements). dmattn_cupy/backward.py mirrors it (BWD_EXTRA_FIELDS) and generates the
// static_asserts that keep the two sides from drifting, as for FwdParams.
#pragma once
#include "params.cuh"

struct BwdParams {
  FwdParams f;
  const void* dout;            // like q
  const float* dlse;           // optional incoming gradient of lse (lse layout); null = 0
  float* dsum;                 // rowsum(dO * O) - dlse, lse layout
  float* dq_accum;             // fp32 (dqa strides), zeroed by the pre kernel; atomic mode
  void* dq;                    // like q
  void* dk;                    // like k
  void* dv;
  void* dbias;                 // mode 1: bias dtype; modes 2/3: float32
  // Block-sparse masks: per (mask batch, mask head, row block, col block) of the mask's own
  // blocks (sp_* sizes of f), int32: kSpNone (-2) not listed, kSpFull (-1) full, >= 0 the
  // partial block's slot in f.sp_partial_bits. Null without a block mask. Built from f's
  // row lists by flash_bwd_sparse_grid_kernel, so key-major loops look a block up directly.
  int32_t* sp_grid;
  // The Hopper backward's CTAs (key tile, kv head, batch; tile fastest) longest first within
  // groups of kSpOrderGroup: a permutation written by flash_bwd_sparse_order_kernel from
  // sp_grid, read by sm90/bwd.cu in the default mode of a block mask without a window. Null:
  // grid order.
  int32_t* sp_order;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
  int64_t dqa_batch_stride, dqa_row_stride, dqa_head_stride;
  // dbias has the bias's own shape; a broadcast dimension has stride 0 (summed over).
  int64_t dbias_batch_stride, dbias_head_stride, dbias_row_stride, dbias_col_stride;
  int64_t dbias_qseq_stride, dbias_kseq_stride;
  int32_t dbias_mode;          // 0 none; 1 store once; 2 fp32 add (CTA-exclusive); 3 fp32 atomic
  int32_t dbias_is_fp32;       // mode 1: element type of dbias (1 = float32, 0 = query dtype)
  float scale;                 // softmax_scale (natural units)
  int32_t sp_grid_cols;        // column blocks of sp_grid (ceil(seqlen_k / f.sp_block_n))
  // A bias of one value per query row that the kernels after the pre kernel run without
  // (backward.py: unshift): the forward's lse (lse layout), from which the pre kernel writes
  // f.lse = lse_shifted - bias (rows at -inf stay so). Null: f.lse is the forward's lse.
  const float* lse_shifted;
};

// States of an sp_grid entry besides a partial block's slot (>= 0).
constexpr int32_t kSpNone = -2, kSpFull = -1;
// Keys per CTA of the Hopper backward (sm90/bwd.cu kBlockN; backward_sm90.BLOCK_N): the key
// tiles sp_order ranks.
constexpr int kSpOrderTileN = 128;
// sp_order ranks the CTAs in groups of kSpOrderGroup consecutive ones (backward.ORDER_GROUP):
// about one wave of an H100/H200's 132 SMs, about two heads of 64 key tiles.
constexpr int kSpOrderGroup = 128;
