// mask_bias.cuh: per-thread reads of a mask/bias tile at the positions of the thread's score
// fragment (n8 fragment j, element e: row g (+8 for e >= 2), column 8j + 2t + (e & 1)).
// Any strides are honoured (stride 0 = broadcast, read in place; 64-bit offsets). Positions
// outside the sequence are never read: they count as excluded (mask) or 0 (bias).
#pragma once
#include "params.cuh"
#include "block_info.cuh"
#include "seqlen.cuh"

namespace dm {

// Element offset of (row 0, col 0) of this (batch, head, sequence) in the mask / bias.
DM_DEVICE int64_t mask_offset(const FwdParams& p, int b, int h, const SeqInfo& s) {
  return b * p.mask_batch_stride + (h / p.mask_head_ratio) * p.mask_head_stride +
         int64_t(s.q_start) * p.mask_qseq_stride + int64_t(s.k_start) * p.mask_kseq_stride;
}
DM_DEVICE int64_t bias_offset(const FwdParams& p, int b, int h, const SeqInfo& s) {
  return b * p.bias_batch_stride + (h / p.bias_head_ratio) * p.bias_head_stride +
         int64_t(s.q_start) * p.bias_qseq_stride + int64_t(s.k_start) * p.bias_kseq_stride;
}

struct TileCoords {
  int row[2];   // this thread's two query rows (sequence-relative)
  int col0;     // first key of the tile + 2t
};

template <int kNF>
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
      const int i = c.row[e >> 1], col = frag_col<kNF>(c, j, e);
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

// Bias value at (row i, key col) of the sequence (base: bias_offset); 0 outside it.
template <typename T>
DM_DEVICE float bias_element(const FwdParams& p, int64_t base, int i, int col, int len_q,
                             int len_k) {
  if (i >= len_q || col >= len_k) return 0.f;
  const int64_t idx = base + int64_t(i) * p.bias_row_stride + int64_t(col) * p.bias_col_stride;
  return p.bias_is_fp32 ? static_cast<const float*>(p.bias)[idx]
                        : to_float(static_cast<const T*>(p.bias)[idx]);
}

// Bias values (times log2 e) at the fragment positions; 0 outside the sequence.
template <typename T, int kNF>
DM_DEVICE void load_bias(const FwdParams& p, int64_t base, const TileCoords& c, int len_q,
                         int len_k, float (&out)[kNF][4]) {
#pragma unroll
  for (int j = 0; j < kNF; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      out[j][e] = bias_element<T>(p, base, c.row[e >> 1], frag_col<kNF>(c, j, e), len_q, len_k) *
                  kLog2e;
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
      const int k = (c.row[e >> 1] - row0) * block_n + frag_col<kNF>(c, j, e) - col0;
      if ((words[k >> 5] >> (k & 31)) & 1u) bits |= bit;
    }
  return bits;
}

}  // namespace dm
