// block_info.cuh: which key tiles a query tile visits, and the class of each (DESIGN.md, "Tile
// classes"): empty tiles are never loaded, full tiles do no per-element work, partial tiles
// apply element masks. Owns the causal/window rule and its key range, the class of a tile by
// formula, the transposed range (query rows a key tile can see, for key-major loops), the
// block lists of block-sparse masks, the visit iterator over dense ranges and block lists,
// and the CTA-wide all-false test. Arch-neutral: plain functions of positions and FwdParams.
// Window rule: allowed keys of row i satisfy  i + off - left <= j <= i + off + right  with
// off = Sk - Sq (bottom-right alignment); a negative bound is unbounded.
#pragma once
#include "params.cuh"

namespace dm {

struct KeyRange {
  int k_begin, k_end;  // half-open; k_begin >= k_end means the query tile sees nothing
};

// Keys that rows [row_begin, row_end) can see; tiles wholly outside are empty, never visited.
DM_DEVICE KeyRange key_range(const FwdParams& p, int row_begin, int row_end, int len_q, int len_k) {
  const int off = len_k - len_q;
  KeyRange r{0, len_k};
  if (p.window_left >= 0) r.k_begin = dm_max(0, row_begin + off - p.window_left);
  if (p.window_right >= 0) r.k_end = dm_min(len_k, row_end - 1 + off + p.window_right + 1);
  return r;
}

struct RowRange {
  int begin, end;  // half-open; begin >= end means no row
};

// Query rows that can see some key of [n0, n_last] (n_last < len_k): key_range transposed.
DM_DEVICE RowRange query_range(const FwdParams& p, int n0, int n_last, int len_q, int len_k) {
  const int off = len_k - len_q;
  RowRange r{0, len_q};
  if (p.window_right >= 0) r.begin = dm_max(0, n0 - off - p.window_right);
  if (p.window_left >= 0) r.end = dm_min(len_q, n_last - off + p.window_left + 1);
  return r;
}

// True when (i, j) passes the causal/window rule.
DM_DEVICE bool in_window(const FwdParams& p, int i, int j, int off) {
  if (p.window_left >= 0 && j < i + off - p.window_left) return false;
  if (p.window_right >= 0 && j > i + off + p.window_right) return false;
  return true;
}

// The places kk of one line of a partial tile that pass the causal/window rule and the
// sequence end, as lo <= kk <= hi clamped to [-1, kTile] (all or none of the line), computed
// once per line instead of in_window per element. d: the diagonal's place; last: the line's
// last place inside the sequence; w_hi / w_lo: the window past / before the diagonal (< 0:
// unbounded). An edge beyond the tile saturates instead of adding (no overflow for any window).
//   forward  (a query row over keys key0 + kk):  d = row + off - key0, last = len_k - 1 - key0,
//            w_hi = window_right, w_lo = window_left;
//   backward (a key over queries q0 + kk):       d = key - off - q0,   last = len_q - 1 - q0,
//            w_hi = window_left,  w_lo = window_right.
// tests/cpu/test_sm90_formula_bounds.py models both against in_window.
struct LineBounds {
  int lo, hi;
};
template <int kTile>
DM_DEVICE LineBounds window_line_bounds(int d, int last, int w_hi, int w_lo) {
  int h = last;
  if (w_hi >= 0 && w_hi <= kTile - d) h = min(h, d + w_hi);
  return {w_lo >= 0 && w_lo <= d + 1 ? min(d - w_lo, kTile) : -1, max(-1, min(h, kTile))};
}

// Key tiles [first, last] of kBlockN keys that cover a key range; none (last < first) when the
// range is empty.
struct TileSpan {
  int first, last;
};
template <int kBlockN>
DM_DEVICE TileSpan tile_span(const KeyRange& kr) {
  if (kr.k_begin >= kr.k_end) return {0, -1};
  return {kr.k_begin / kBlockN, (kr.k_end - 1) / kBlockN};
}

enum TileClass { kTileEmpty, kTilePartial, kTileFull };

// Class by bounds and window of keys [n0, n1] for query rows [i_first, i_last], a tile inside
// the key range of those rows (a tile outside it is empty and never visited): partial when it
// reaches past the sequence end or crosses a window edge of some row, else full. Element masks
// (a bool mask, a block list's partial block) can make a full tile partial, or any tile empty.
DM_DEVICE TileClass visited_tile_class(const FwdParams& p, int i_first, int i_last, int n0,
                                       int n1, int len_k, int off) {
  if (n1 >= len_k || (p.window_right >= 0 && n1 > i_first + off + p.window_right) ||
      (p.window_left >= 0 && n0 < i_last + off - p.window_left))
    return kTilePartial;
  return kTileFull;
}

// True when x holds on some thread of the CTA: the all-false skip of a tile whose element mask
// keeps nothing. A barrier: every thread of the CTA calls it, with CTA-uniform control flow.
DM_DEVICE bool cta_any(bool x) { return __syncthreads_or(x) != 0; }

// ---- Block-sparse masks: per (mask batch, mask head, row block) lists of full and partial
// blocks (params.cuh). A mask dimension of size 1 broadcasts.

// Row of the block lists for mask batch bi, mask head hi, row block mrow (no broadcast).
DM_DEVICE int64_t sparse_row(const FwdParams& p, int bi, int hi, int mrow) {
  return (int64_t(bi) * p.sp_heads + hi) * p.sp_row_blocks + mrow;
}
// Row of the block lists that holds query row m0 of batch b, head h.
DM_DEVICE int64_t sparse_row_entry(const FwdParams& p, int b, int h, int m0) {
  return sparse_row(p, p.sp_batches == 1 ? 0 : b, p.sp_heads == 1 ? 0 : h, m0 / p.sp_block_m);
}
// Element bits of the partial block in `slot` (row-major in the block, LSB first per word).
DM_DEVICE const uint32_t* sparse_block_words(const FwdParams& p, int slot) {
  return p.sp_partial_bits + int64_t(slot) * (p.sp_block_m * p.sp_block_n / 32);
}

// The key tiles a query tile visits, in order, as items 0 .. n_items - 1: the tiles of the
// causal/window key range (dense), or with kSparse the listed blocks of the query tile's row
// block, full ones then partial ones, each expanded to sp_block_n / kBlockN kernel tiles; a
// listed tile outside the key range is passed over by next_candidate. Uniform across the CTA.
// The all-false skip is the kernel's (cta_any over its keep-bits), as only it knows the mask.
template <int kBlockN, bool kSparse>
struct KeyTileVisit {
  int n_first, n_last;  // the key range in tiles (n_last < n_first: none)
  int n_items;
  const int32_t* full_idx = nullptr;
  const int32_t* partial_idx = nullptr;
  int full_count = 0, sub = 1, mrow = 0;  // sub: kernel tiles per mask block; mrow: row block
  int64_t row_entry = 0;                  // sparse_row_entry of the query tile

  DM_DEVICE KeyTileVisit(const FwdParams& p, int b, int h, int m0, const KeyRange& kr) {
    const TileSpan span = tile_span<kBlockN>(kr);
    n_first = span.first;
    n_last = span.last;
    n_items = n_last - n_first + 1;
    if (kSparse) {
      mrow = m0 / p.sp_block_m;
      row_entry = sparse_row_entry(p, b, h, m0);
      full_count = p.sp_full_count[row_entry];
      full_idx = p.sp_full_idx + row_entry * p.sp_full_width;
      partial_idx = p.sp_partial_idx + row_entry * p.sp_partial_width;
      sub = p.sp_block_n / kBlockN;
      n_items = (full_count + p.sp_partial_count[row_entry]) * sub;
    }
  }

  // Tile of item i; `listed_partial`: a MixedMask partial block, whose element bits apply.
  DM_DEVICE int tile_at(int i, bool& listed_partial) const {
    if (!kSparse) {
      listed_partial = false;
      return n_first + i;
    }
    const int entry = i / sub;
    listed_partial = entry >= full_count;
    const int blk = listed_partial ? partial_idx[entry - full_count] : full_idx[entry];
    return blk * sub + i % sub;
  }

  // First item >= i whose tile lies in the key range (n_items when none).
  DM_DEVICE int next_candidate(int i) const {
    for (; kSparse && i < n_items; ++i) {
      bool lp;
      const int nb = tile_at(i, lp);
      if (nb >= n_first && nb <= n_last) break;
    }
    return i;
  }
};

}  // namespace dm
