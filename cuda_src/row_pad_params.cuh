// row_pad_params.cuh: the struct the row padding copy (row_pad.cu) receives, by value.
// dmattn_cupy/params.py mirrors it (ROW_PAD_FIELDS); the generated params_check.cuh pins the
// two together.
#pragma once
#include "common.cuh"

struct RowPadParams {
  const uint8_t* src;   // row r at src + r * src_pitch: any alignment
  uint8_t* dst;         // row r at dst + r * dst_pitch: 16-byte aligned, dst_pitch % 16 == 0
  int64_t src_pitch;    // bytes
  int64_t dst_pitch;    // bytes, >= width
  int64_t rows;
  int64_t width;        // bytes per row copied; the rest of each destination row is zeroed
};
