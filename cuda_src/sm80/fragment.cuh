// fragment.cuh: per-thread positions of the m16n8 accumulator fragments of mma.sync
// (PTX ISA: lane = threadIdx.x % 32, g = lane / 4, t = lane % 4; n8 fragment j, element e:
// row g (+8 for e >= 2), column 8j + 2t + (e & 1)), and what the sm80 kernels do at those
// positions: the keep-bits (bit j * 4 + e) by bounds and window, by a bool mask read from
// global memory and by a block's element bits, and stores of accumulators as 16-bit pairs to
// shared or global memory. The rules themselves (window, mask/bias addressing, block lists)
// are arch-neutral (block_info.cuh, mask_bias.cuh).
#pragma once
#include "common.cuh"
#include "params.cuh"
#include "block_info.cuh"
#include "softmax.cuh"

namespace dm {

// This thread's positions in a 16-row slab x key tile.
struct TileCoords {
  int row[2];   // this thread's two query rows, g and g + 8 of the slab (sequence-relative)
  int col0;     // first key of the tile + 2t
};

// Key of fragment j, element e.
DM_DEVICE int frag_col(const TileCoords& c, int j, int e) { return c.col0 + 8 * j + (e & 1); }

// Bits (j*4 + e) of the positions the causal/window rule and the bounds keep.
template <int kNF>
DM_DEVICE uint32_t window_bits(const FwdParams& p, const TileCoords& c, int len_q, int len_k) {
  const int off = len_k - len_q;
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j < kNF; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = c.row[e >> 1], col = frag_col(c, j, e);
      if (i < len_q && col < len_k && in_window(p, i, col, off)) bits |= 1u << (j * 4 + e);
    }
  return bits;
}

// Bits of `candidates` whose mask element is true. `mask` points at (row 0, col 0).
template <int kNF>
DM_DEVICE uint32_t mask_bits(const FwdParams& p, const uint8_t* mask, const TileCoords& c,
                             uint32_t candidates) {
  // Row pointers hoisted; the fragment loop is not unrolled so the 4*kNF byte loads do not
  // hold 4*kNF 64-bit addresses live next to the output accumulator.
  const uint8_t* rows[2] = {mask + int64_t(c.row[0]) * p.mask_row_stride,
                            mask + int64_t(c.row[1]) * p.mask_row_stride};
  const int64_t cs = p.mask_col_stride;
  uint32_t bits = 0;
#pragma unroll 1
  for (int j = 0; j < kNF; ++j) {
    const int64_t col = int64_t(c.col0 + 8 * j) * cs;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint32_t bit = 1u << (j * 4 + e);
      if ((candidates & bit) && rows[e >> 1][col + ((e & 1) ? cs : 0)] != 0) bits |= bit;
    }
  }
  return bits;
}

// Bits of `candidates` kept by a block's element mask: element (r, c) of the block (origin
// row0, col0; width block_n) is bit k = r * block_n + c of `words`, LSB first per word.
template <int kNF>
DM_DEVICE uint32_t block_element_bits(const uint32_t* words, const TileCoords& c, int row0,
                                      int col0, int block_n, uint32_t candidates) {
  uint32_t bits = 0;
#pragma unroll 1
  for (int j = 0; j < kNF; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint32_t bit = 1u << (j * 4 + e);
      if (!(candidates & bit)) continue;
      const int k = (c.row[e >> 1] - row0) * block_n + frag_col(c, j, e) - col0;
      if ((words[k >> 5] >> (k & 31)) & 1u) bits |= bit;
    }
  return bits;
}


// P and dS accumulators (16 x 8*kNF each: rows r0, r0 + 8 with r0 = first row + g; columns
// col0 + 8j + 2t) to shared memory as T pairs, both with row stride `stride` elements (the
// dK/dV kernel's operands of dV += P^T dO and dK += dS^T Q). Stored in one loop: the
// interleaved stores keep fewer values live than two passes.
template <typename T, int kNF>
DM_DEVICE void store_p_ds_smem(uint16_t* sp, uint16_t* sds, int stride, const float (&p)[kNF][4],
                               const float (&ds)[kNF][4], int r0, int col0) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < kNF; ++j) {
    const int col = col0 + 8 * j + 2 * t;
    *reinterpret_cast<uint32_t*>(sp + r0 * stride + col) = pack2<T>(p[j][0], p[j][1]);
    *reinterpret_cast<uint32_t*>(sp + (r0 + 8) * stride + col) = pack2<T>(p[j][2], p[j][3]);
    *reinterpret_cast<uint32_t*>(sds + r0 * stride + col) = pack2<T>(ds[j][0], ds[j][1]);
    *reinterpret_cast<uint32_t*>(sds + (r0 + 8) * stride + col) = pack2<T>(ds[j][2], ds[j][3]);
  }
}

// Stores a warp's 16 x (8 * kNF) fp32 fragments, row r scaled by row_scale[r], as T rows
// (row0 = first row of the slab relative to `base`; rows >= valid_rows and columns >= head_dim
// are not written).
template <typename T, int kNF>
DM_DEVICE void store_frags(T* base, int64_t row_stride, const float (&c)[kNF][4], int row0,
                           int col0, int valid_rows, int head_dim, int lane,
                           const float (&row_scale)[2] = {1.f, 1.f}) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + lane / 4 + 8 * r;
    if (row >= valid_rows) continue;
#pragma unroll
    for (int j = 0; j < kNF; ++j) {
      const int col = col0 + 8 * j + 2 * (lane % 4);
      if (col < head_dim)
        *reinterpret_cast<uint32_t*>(base + int64_t(row) * row_stride + col) =
            pack2<T>(normalize_out(c[j][2 * r], row_scale[r]),
                     normalize_out(c[j][2 * r + 1], row_scale[r]));
    }
  }
}

}  // namespace dm
