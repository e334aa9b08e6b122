// item_order.cuh: how the Hopper forward numbers its work items (query tile, batch * heads),
// shared with the mask packing that feeds it block rows in the same order (mask_pack.cu:
// mask_rows_kernel), so the rows the forward runs first are packed first.
#pragma once
#include "common.cuh"

// - DM_SM90_LPT_HEADS: N > 0 numbers the other items longest first within sections of N
//   head-batches (FlashAttention-3's L2 swizzle) where N divides batch * heads; 0: longest
//   first across all of them. H200 causal (B2 H16 S4096 d128): 0 501.5, 4 525.6, 8 518.0,
//   16 516.5 TFLOP/s; default 4.
#ifndef DM_SM90_LPT_HEADS
#define DM_SM90_LPT_HEADS 4
#endif

namespace dm {

// Work item i's query tile and head-batch index hb = b * heads + h (the kernel's numbering, see
// its work items): query tile fastest where head_major, else longest first, within sections of
// DM_SM90_LPT_HEADS head-batches where lpt_sections.
DM_DEVICE void sm90_item_coords(int i, int num_m, int bh, bool head_major, bool lpt_sections,
                                int& m_block, int& hb) {
  if (head_major) {
    m_block = i % num_m;
    hb = i / num_m;
  } else if (lpt_sections) {
    // longest first within sections of DM_SM90_LPT_HEADS head-batches: a section's K/V stay
    // in L2 while its items run (one runtime division, as the plain order below; a division by
    // a shorter last section spilled)
    const int per = DM_SM90_LPT_HEADS * num_m;
    const int sec = i / per, r = i - sec * per;
    m_block = num_m - 1 - r / DM_SM90_LPT_HEADS;
    hb = sec * DM_SM90_LPT_HEADS + r % DM_SM90_LPT_HEADS;
  } else {
    m_block = num_m - 1 - i / bh;
    hb = i % bh;
  }
}

DM_DEVICE bool sm90_lpt_sections(int bh) {
  return DM_SM90_LPT_HEADS > 0 && bh > DM_SM90_LPT_HEADS && bh % DM_SM90_LPT_HEADS == 0;
}

}  // namespace dm
