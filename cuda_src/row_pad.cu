// row_pad.cu: copies rows of any byte alignment into rows that start 16 bytes apart (a
// mask/bias whose layout alone keeps it from a tensor map: dmattn_cupy/row_pad.py). One
// thread per 16-byte destination chunk: it reads the aligned 4-byte source words that overlap
// its 16 bytes (never one that starts past the row's end), funnel-shifts them into place and
// stores one 16-byte word, zero past the row's width. Grid: chunks of a row in x (kNumWarps *
// 32 per block), rows in y (a stride loop past 65535).
#pragma once
#include "common.cuh"
#include "row_pad_params.cuh"

namespace dm {

template <int kNumWarps>
__global__ void __launch_bounds__(kNumWarps * 32)
row_pad_kernel(const RowPadParams p) {
  const int64_t c0 = (int64_t(blockIdx.x) * (kNumWarps * 32) + threadIdx.x) * 16;
  if (c0 >= p.dst_pitch) return;
  for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y) {
    uint32_t out[4] = {0u, 0u, 0u, 0u};
    if (c0 < p.width) {
      const uint8_t* row = p.src + r * p.src_pitch;
      const uint64_t at = reinterpret_cast<uint64_t>(row + c0);
      const uint32_t* w = reinterpret_cast<const uint32_t*>(at & ~uint64_t(3));
      const uint64_t end = reinterpret_cast<uint64_t>(row + p.width);
      uint32_t x[5];
#pragma unroll
      for (int k = 0; k < 5; ++k)
        x[k] = reinterpret_cast<uint64_t>(w + k) < end ? w[k] : 0u;
      const uint32_t shift = uint32_t(at & 3u) * 8u;
#pragma unroll
      for (int k = 0; k < 4; ++k) out[k] = __funnelshift_r(x[k], x[k + 1], shift);
      const int64_t valid = p.width - c0;  // bytes of this chunk inside the row (> 0)
      if (valid < 16) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int64_t keep = valid - 4 * k;  // bytes of word k to keep
          out[k] = keep <= 0 ? 0u : keep >= 4 ? out[k] : out[k] & ((1u << (8 * keep)) - 1u);
        }
      }
    }
    *reinterpret_cast<uint4*>(p.dst + r * p.dst_pitch + c0) =
        make_uint4(out[0], out[1], out[2], out[3]);
  }
}

}  // namespace dm
