// tile_io.cuh: global -> shared tile copies through cp.async.
#pragma once
#include "common.cuh"
#include "mma.cuh"

namespace dm {

// rows x kHeadDim tile of T from global (row stride in elements) into shared memory with row
// stride kStride; rows >= valid_rows and columns >= head_dim are zero-filled.
template <int kHeadDim, int kStride, int kThreads, typename T>
DM_DEVICE void load_tile_async(uint16_t* dst, const T* src, int64_t row_stride, int rows,
                               int valid_rows, int head_dim) {
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r < valid_rows && col < head_dim;
    const T* s = ok ? src + int64_t(r) * row_stride + col : src;
    cp_async_16(dst + r * kStride + col, s, ok);
  }
}

// rows x kRowBytes bytes from global into shared memory (row stride kDstStride bytes). The
// source row stride is in bytes (0: every row reads the same bytes). Bytes past `valid_bytes`
// of a row, and rows >= valid_rows, are zero-filled and never read. Source rows must be
// 16-byte aligned.
template <int kRowBytes, int kDstStride, int kThreads>
DM_DEVICE void load_bytes_async(uint8_t* dst, const uint8_t* src, int64_t row_stride, int rows,
                                int valid_rows, int valid_bytes) {
  constexpr int kChunks = kRowBytes / 16;
  for (int c = threadIdx.x; c < rows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 16;
    const int n = r < valid_rows ? dm_min(dm_max(valid_bytes - col, 0), 16) : 0;
    cp_async_16_partial(dst + r * kDstStride + col, n > 0 ? src + r * row_stride + col : src, n);
  }
}

}  // namespace dm
