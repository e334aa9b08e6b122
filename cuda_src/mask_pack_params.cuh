// mask_pack_params.cuh: the struct the mask packing kernel (mask_pack.cu) receives, by value.
// dmattn_cupy/params.py mirrors it (MASK_PACK_FIELDS); the generated params_check.cuh pins the
// two together.
#pragma once
#include "common.cuh"

struct MaskPackParams {
  const uint8_t* mask;   // element (b, h, i, j) at mask + b*batch + h*head + i*row + j*col
  uint32_t* words;       // per block (b, h, rb, cb), row-major: block_m * block_n / 32 words
  int32_t* kept;         // per block: its kept in-range elements
  int64_t batch_stride, head_stride, row_stride, col_stride;  // bytes (= elements: bool)
  int32_t seqlen_q, seqlen_k;
  int32_t block_m, block_n;  // block_n % 32 == 0 (vec: % 128 == 0)
  int32_t row_blocks, col_blocks;
  int32_t heads;             // the mask's head dim: blockIdx.z = b * heads + h
  int32_t vec;               // col_stride 1 and 4-byte aligned rows: 4-byte loads
};
