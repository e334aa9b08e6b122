// kv_params.cuh: the struct the KV-cache append kernel (kv_append.cu) receives, by value.
// Pointers, then int64 strides in ELEMENTS, then 32-bit sizes. dmattn_cupy/params.py mirrors
// it (KV_APPEND_FIELDS); the generated params_check.cuh pins the two together.
#pragma once
#include "common.cuh"

struct KvAppendParams {
  const void* k_new;            // (B, S_new, Hk, D)
  const void* v_new;
  void* k_cache;                // (B, S_max, Hk, D), or paged (num_pages, page_size, Hk, D)
  void* v_cache;
  const int32_t* block_table;   // (B, max_pages) or null (not paged)
  const int32_t* cache_seqlens; // (B,) or null: then every sequence starts at seqlen_base
  int64_t knew_batch_stride, knew_row_stride, knew_head_stride;
  int64_t vnew_batch_stride, vnew_row_stride, vnew_head_stride;
  int64_t kc_batch_stride, kc_row_stride, kc_head_stride;  // batch stride = page stride if paged
  int64_t vc_batch_stride, vc_row_stride, vc_head_stride;
  int64_t block_table_batch_stride;
  int32_t batch, seqlen_new, kv_heads, head_dim;
  int32_t page_size;            // 0 = not paged
  int32_t capacity;             // S_max, or max_pages * page_size
  int32_t seqlen_base;          // start position when cache_seqlens is null
  int32_t pad0;
};
