// mask_pack_params.cuh: the structs the mask packing kernels (mask_pack.cu) receive, by value:
// MaskPackParams the packing, MaskListsParams the block lists made from its counts.
// dmattn_cupy/params.py mirrors them (MASK_PACK_FIELDS, MASK_LISTS_FIELDS); the generated
// params_check.cuh pins each pair together.
#pragma once
#include "common.cuh"

struct MaskPackParams {
  const uint8_t* mask;   // element (b, h, i, j) at mask + b*batch + h*head + i*row + j*col
  uint32_t* words;       // per block (b, h, rb, cb), row-major: block_m * block_n / 32 words
  int32_t* kept;         // per block: its kept in-range elements
  int64_t batch_stride, head_stride, row_stride, col_stride;  // bytes (= elements: bool)
  int32_t seqlen_q, seqlen_k;
  int32_t block_m, block_n;  // block_n % 32 == 0 (vec != 0: % 128 == 0)
  int32_t row_blocks, col_blocks;
  int32_t heads;             // the mask's head dim: blockIdx.z = b * heads + h
  int32_t vec;               // col_stride 1 and rows aligned to 16 bytes: 2 (16-byte loads),
                             // to 4 bytes: 1 (4-byte loads); else 0 (byte loads)
};

struct MaskListsParams {
  const int32_t* kept;   // per block (b, h, rb, cb), row-major: mask_pack_kernel's counts
  // per block row (b, h, rb), col_blocks entries each: counts, ascending column blocks (0
  // past the count), and per block the partial block's row of the packed words (its own
  // index) or -1
  int32_t* full_count;
  int32_t* full_idx;
  int32_t* partial_count;
  int32_t* partial_idx;
  int32_t* partial_slot;
  // mask_rows_kernel only: per block row, in the forward's work-item order, a word set to 1
  // once the row's words and lists are written (zero before; the forward resets it)
  int32_t* ready;
  int32_t seqlen_q, seqlen_k;
  int32_t block_m, block_n;
  int32_t row_blocks, col_blocks;
  int32_t rows;              // block rows in all: batches * heads * row_blocks (a warp each)
};
