// params.cuh: the one struct a forward launch receives, by value. Pointers, then int64
// strides in ELEMENTS, then 32-bit sizes and scalars. dmattn_cupy/params.py mirrors it with
// a NumPy structured dtype; the static_asserts in the generated "params_check.cuh" (added
// at compile time) fail the build if the two ever drift.
#pragma once
#include "common.cuh"

struct FwdParams {
  // ---- pointers (8 bytes each) ----
  const void* q;               // (B, Sq, H, D) or varlen (total_q, H, D)
  const void* k;               // (B, Sk, Hk, D) or (total_k, Hk, D)
  const void* v;
  void* o;                     // like q
  float* lse;                  // (B, H, Sq) or varlen (H, total_q); may be null
  const uint8_t* mask;         // bool, any strides; null when absent
  const void* bias;            // query dtype or float32; null when absent
  const int32_t* cu_seqlens_q; // varlen only: (batch + 1,)
  const int32_t* cu_seqlens_k;
  uint32_t* tile_counters;     // debug builds: per CTA {tiles loaded, tiles masked}
  // Block-sparse masks (kernels built with kSparse): per (mask batch, mask head, row block)
  // the full and partial key blocks, int32, contiguous; counts (Bm, Hm, nrb), indices
  // (Bm, Hm, nrb, width). MixedMask only: slot per block (Bm, Hm, nrb, ncb), -1 = none, and
  // the element bits of each partial block (row-major in the block, LSB first per word).
  const int32_t* sp_full_count;
  const int32_t* sp_full_idx;
  const int32_t* sp_partial_count;
  const int32_t* sp_partial_idx;
  const int32_t* sp_partial_slot;
  const uint32_t* sp_partial_bits;
  // Split-KV decode (fwd_decode.cu / fwd_combine.cu): per (query row, head, split) partial
  // outputs normalized by their own sum, fp32 (rows*H*splits, kHeadDim), and their log2-domain
  // lse (rows*H*splits); row = b*seqlen_q + i (dense) or the packed query index (varlen).
  float* o_accum;
  float* lse_accum;
  // KV cache (fwd_decode.cu, dmattn_cupy/kvcache.py): cache_seqlens (batch,) int32 or null; when
  // set, sequence b has min(cache_seqlens[b] + seqlen_k_new, seqlen_k) keys (seqlen_k = the cache
  // capacity). block_table (batch, max_pages) int32 or null: with it, key j of sequence b lives in
  // page block_table[b * block_table_batch_stride + j / page_size], row j % page_size; k/v (and a
  // mask/bias) then have their batch stride = the page stride (a paged tensor's first dim).
  const int32_t* cache_seqlens;
  const int32_t* block_table;
  // Split-KV decode merged by its own grid (split_combine.cuh): one int32 per (sequence, kv
  // head, row slab), zero at launch and left zero; null: fwd_combine.cu merges the partials.
  int32_t* split_counters;

  // ---- strides in elements (8 bytes each) ----
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;   // row stride is 1 (dense) / 1 (varlen)
  // mask/bias: element (b, h', i, j) at b*batch + h'*head + i*row + j*col; a broadcast
  // dimension has stride 0. `*_kseq_stride` multiplies a varlen sequence's first key index
  // (key-based layout: the column stride; query-based: 0). Likewise `*_qseq_stride` for
  // the first query index (query-based: the row stride; key-based: 0).
  int64_t mask_batch_stride, mask_head_stride, mask_row_stride, mask_col_stride;
  int64_t mask_qseq_stride, mask_kseq_stride;
  int64_t bias_batch_stride, bias_head_stride, bias_row_stride, bias_col_stride;
  int64_t bias_qseq_stride, bias_kseq_stride;
  int64_t block_table_batch_stride;

  // ---- sizes and scalars (4 bytes each) ----
  int32_t batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim;
  int32_t q_per_kv;            // heads / kv_heads
  int32_t mask_head_ratio;     // heads / mask heads (mask head = h / ratio)
  int32_t bias_head_ratio;
  int32_t window_left;         // keep j >= i + Sk - Sq - left; < 0: unbounded
  int32_t window_right;        // keep j <= i + Sk - Sq + right; < 0: unbounded (causal: 0)
  int32_t bias_is_fp32;        // bias element type: 1 = float32, 0 = the query dtype
  int32_t sp_batches, sp_heads;         // mask batch/head dims (1 = broadcast)
  int32_t sp_row_blocks, sp_col_blocks;
  int32_t sp_full_width, sp_partial_width;
  int32_t sp_block_m, sp_block_n;       // the mask's block: multiples of the kernel tile
  int32_t num_splits;          // split-KV decode: key ranges per (sequence, kv head); 1 = none
  int32_t total_rows;          // query rows over all sequences: batch*seqlen_q or total_q
  int32_t page_size;           // paged KV cache: keys per page (a multiple of 16); 0 = not paged
  int32_t seqlen_k_new;        // keys appended this call (added to cache_seqlens[b])
  // fwd_decode.cu: how the CTA's 16 packed rows share staged mask/bias rows (decode.slot_mode):
  // 0 = one row for all (key-based, one mask head per kv head), 1 = row pr % q_per_kv
  // (key-based, one per query head), 2 = one per packed row.
  int32_t mask_slot_mode, bias_slot_mode;
  float scale_log2;            // softmax_scale * log2(e)
  float softcap;               // > 0: logits = softcap * tanh(scale*qk / softcap)
  float scale_over_softcap;    // softmax_scale / softcap (when softcap > 0)
  int32_t pad0;
};
