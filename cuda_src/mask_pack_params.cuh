// mask_pack_params.cuh: the struct the mask packing kernels (mask_pack.cu: the packing and the
// block lists made from its counts) receive, by value.
// dmattn_cupy/params.py mirrors it (MASK_PACK_FIELDS); the generated params_check.cuh pins the
// two together.
#pragma once
#include "common.cuh"

struct MaskPackParams {
  const uint8_t* mask;   // element (b, h, i, j) at mask + b*batch + h*head + i*row + j*col
  uint32_t* words;       // per block (b, h, rb, cb), row-major: block_m * block_n / 32 words
  int32_t* kept;         // per block: its kept in-range elements
  // mask_lists_kernel's outputs, per block row (b, h, rb) (ncb = col_blocks entries each):
  // counts, ascending column blocks (0 past the count), and per block the partial block's
  // row of `words` (its own index) or -1
  int32_t* full_count;
  int32_t* full_idx;
  int32_t* partial_count;
  int32_t* partial_idx;
  int32_t* partial_slot;
  int64_t batch_stride, head_stride, row_stride, col_stride;  // bytes (= elements: bool)
  int32_t seqlen_q, seqlen_k;
  int32_t block_m, block_n;  // block_n % 32 == 0 (vec: % 128 == 0)
  int32_t row_blocks, col_blocks;
  int32_t heads;             // the mask's head dim: blockIdx.z = b * heads + h
  int32_t batches;           // the mask's batch dim
  int32_t vec;               // col_stride 1 and 4-byte aligned rows: 4-byte loads
};
