// kv_append.cu: writes the new keys/values of a KV-cache call into the cache in place, one
// kernel for K and V: row i of sequence b goes to position cache_seqlens[b] + i (through the
// block table for a paged cache). One warp per (row, kv head); lanes copy 16-byte chunks, so
// rows must be 16-byte aligned (the launcher checks, dmattn_cupy/kvcache.py). A position past
// the capacity is dropped rather than written out of bounds (the host rejects such calls where
// it can see the lengths). The attention kernel that follows on the same stream reads them.
#pragma once
#include "common.cuh"
#include "kv_params.cuh"

namespace dm {

struct alignas(16) Chunk16 { uint32_t w[4]; };

template <int kNumWarps>
__global__ void __launch_bounds__(kNumWarps * 32)
kv_append_kernel(const KvAppendParams p) {
  const int b = blockIdx.y, lane = threadIdx.x % 32;
  const int item = blockIdx.x * kNumWarps + threadIdx.x / 32;  // (row i, kv head h)
  if (item >= p.seqlen_new * p.kv_heads) return;
  const int i = item / p.kv_heads, h = item % p.kv_heads;
  const int start = p.cache_seqlens != nullptr ? p.cache_seqlens[b] : p.seqlen_base;
  const int pos = start + i;
  if (start < 0 || pos >= p.capacity) return;
  int64_t kdst, vdst;
  if (p.page_size > 0) {
    const int64_t page = p.block_table[b * p.block_table_batch_stride + pos / p.page_size];
    const int row = pos % p.page_size;
    kdst = page * p.kc_batch_stride + int64_t(row) * p.kc_row_stride + h * p.kc_head_stride;
    vdst = page * p.vc_batch_stride + int64_t(row) * p.vc_row_stride + h * p.vc_head_stride;
  } else {
    kdst = b * p.kc_batch_stride + int64_t(pos) * p.kc_row_stride + h * p.kc_head_stride;
    vdst = b * p.vc_batch_stride + int64_t(pos) * p.vc_row_stride + h * p.vc_head_stride;
  }
  const int64_t ksrc = b * p.knew_batch_stride + int64_t(i) * p.knew_row_stride +
                       h * p.knew_head_stride;
  const int64_t vsrc = b * p.vnew_batch_stride + int64_t(i) * p.vnew_row_stride +
                       h * p.vnew_head_stride;
  const uint16_t* kn = static_cast<const uint16_t*>(p.k_new) + ksrc;
  const uint16_t* vn = static_cast<const uint16_t*>(p.v_new) + vsrc;
  uint16_t* kc = static_cast<uint16_t*>(p.k_cache) + kdst;
  uint16_t* vc = static_cast<uint16_t*>(p.v_cache) + vdst;
  for (int c = lane * 8; c < p.head_dim; c += 32 * 8) {
    const Chunk16 kx = *reinterpret_cast<const Chunk16*>(kn + c);
    const Chunk16 vx = *reinterpret_cast<const Chunk16*>(vn + c);
    *reinterpret_cast<Chunk16*>(kc + c) = kx;
    *reinterpret_cast<Chunk16*>(vc + c) = vx;
  }
}

}  // namespace dm
