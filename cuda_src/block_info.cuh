// block_info.cuh: the key range a query tile can see under causal/window rules.
// Allowed keys of row i satisfy  i + off - left <= j <= i + off + right  with off = Sk - Sq
// (bottom-right alignment); a negative bound is unbounded. Tiles wholly outside
// [k_begin, k_end) are empty and never loaded.
#pragma once
#include "params.cuh"

namespace dm {

struct KeyRange {
  int k_begin, k_end;  // half-open; k_begin >= k_end means the query tile sees nothing
};

DM_DEVICE KeyRange key_range(const FwdParams& p, int row_begin, int row_end, int len_q, int len_k) {
  const int off = len_k - len_q;
  KeyRange r{0, len_k};
  if (p.window_left >= 0) r.k_begin = dm_max(0, row_begin + off - p.window_left);
  if (p.window_right >= 0) r.k_end = dm_min(len_k, row_end - 1 + off + p.window_right + 1);
  return r;
}

// True when (i, j) passes the causal/window rule.
DM_DEVICE bool in_window(const FwdParams& p, int i, int j, int off) {
  if (p.window_left >= 0 && j < i + off - p.window_left) return false;
  if (p.window_right >= 0 && j > i + off + p.window_right) return false;
  return true;
}

}  // namespace dm
