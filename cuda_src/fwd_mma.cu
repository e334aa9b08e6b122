// fwd_mma.cu: the tensor-core forward kernel (FlashAttention-2 style, sm_80+).
// A CTA owns kBlockM = 16 * kNumWarps query rows of one (batch, head); warp w owns rows
// 16w..16w+15. Q is staged once; K/V tiles of kBlockN keys are double-buffered in shared
// memory with cp.async (the next non-empty tile is fetched while the current one computes).
// S = Q K^T and O += P V use mma.sync m16n8k16 with fp32 accumulation; P stays in registers
// as the A operand. Tile classes: tiles outside the causal/window key range are never
// visited; tiles whose mask elements are all false are skipped before their K/V are loaded;
// full tiles (no mask, inside bounds and window) do no per-element work.
// Requires 16-byte aligned q/k/v/o rows (pointers and strides multiples of 8 elements); the
// launcher falls back to fwd.cu otherwise.
#pragma once
#include "common.cuh"
#include "params.cuh"
#include "mma.cuh"
#include "seqlen.cuh"
#include "block_info.cuh"
#include "mask_bias.cuh"
#include "softmax.cuh"
#include "tile_io.cuh"

namespace dm {

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kNumWarps, bool kHasMask,
          bool kHasBias, bool kVarlen, bool kSparse, bool kDebug>
__global__ void __launch_bounds__(kNumWarps * 32, 1)
flash_fwd_mma_kernel(const FwdParams p) {
  static_assert(kBlockM == 16 * kNumWarps, "one m16 row slab per warp");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 64, "mask bits of a tile fit one uint32");
  static_assert(kHeadDim % 16 == 0, "head dim is padded to a multiple of 16");
  constexpr int kThreads = kNumWarps * 32;
  constexpr int kStride = kHeadDim + 8;  // +16 bytes per row: conflict-free ldmatrix
  constexpr int kNF = kBlockN / 8;       // score fragments per row pair
  constexpr int kDF = kHeadDim / 8;      // output fragments
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;
  uint16_t* sK = sQ + kBlockM * kStride;           // 2 stages
  uint16_t* sV = sK + 2 * kBlockN * kStride;       // 2 stages

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq = seq_info<kVarlen>(p, b);
  const int m0 = blockIdx.x * kBlockM;
  if (m0 >= seq.len_q) return;
  const int m_end = dm_min(m0 + kBlockM, seq.len_q);
  const int kvh = h / p.q_per_kv;
  const int off = seq.len_k - seq.len_q;

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
               int64_t(seq.q_start + m0) * p.q_row_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + kvh * p.k_head_stride +
               int64_t(seq.k_start) * p.k_row_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + kvh * p.v_head_stride +
               int64_t(seq.k_start) * p.v_row_stride;
  const uint8_t* mask = kHasMask ? p.mask + mask_offset(p, b, h, seq) : nullptr;
  const int64_t bias_base = kHasBias ? bias_offset(p, b, h, seq) : 0;

  load_tile_async<kHeadDim, kStride, kThreads>(sQ, q, p.q_row_stride, kBlockM, m_end - m0,
                                               p.head_dim);

  const KeyRange kr = key_range(p, m0, m_end, seq.len_q, seq.len_k);
  const int n_last = kr.k_begin < kr.k_end ? (kr.k_end - 1) / kBlockN : -1;

  TileCoords tc;
  tc.row[0] = m0 + 16 * warp + lane / 4;
  tc.row[1] = tc.row[0] + 8;

  // Fragment positions on rows inside the sequence (the only ones a mask may be read at).
  uint32_t valid_rows = 0;
#pragma unroll
  for (int j = 0; j < kNF; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (tc.row[e >> 1] < seq.len_q) valid_rows |= 1u << (j * 4 + e);

  // A tile is partial by formula when it crosses the sequence end or a window edge.
  auto tile_partial = [&](int nb) {
    const int n0 = nb * kBlockN, n1 = n0 + kBlockN - 1;
    if (n1 >= seq.len_k) return true;
    if (p.window_right >= 0 && n1 > m0 + off + p.window_right) return true;
    if (p.window_left >= 0 && n0 < m_end - 1 + off - p.window_left) return true;
    return false;
  };
  // Candidate tiles in visiting order: the key range (dense) or, for block-sparse masks, the
  // listed blocks of this row block (full ones, then partial ones), each expanded to
  // sp_block_n / kBlockN kernel tiles. Both are uniform across the CTA.
  const int n_first = kr.k_begin < kr.k_end ? kr.k_begin / kBlockN : 0;
  int n_items = n_last - n_first + 1;
  const int32_t* full_idx = nullptr;
  const int32_t* partial_idx = nullptr;
  int full_count = 0, sub = 1, mrow = 0;
  int64_t row_entry = 0;
  if (kSparse) {
    const int bi = p.sp_batches == 1 ? 0 : b, hi = p.sp_heads == 1 ? 0 : h;
    mrow = m0 / p.sp_block_m;
    row_entry = (int64_t(bi) * p.sp_heads + hi) * p.sp_row_blocks + mrow;
    full_count = p.sp_full_count[row_entry];
    full_idx = p.sp_full_idx + row_entry * p.sp_full_width;
    partial_idx = p.sp_partial_idx + row_entry * p.sp_partial_width;
    sub = p.sp_block_n / kBlockN;
    n_items = (full_count + p.sp_partial_count[row_entry]) * sub;
  }
  // Tile of item i; `listed_partial`: a MixedMask partial block, whose element bits apply.
  auto tile_at = [&](int i, bool& listed_partial) {
    if (!kSparse) {
      listed_partial = false;
      return n_first + i;
    }
    const int entry = i / sub;
    listed_partial = entry >= full_count;
    const int blk = listed_partial ? partial_idx[entry - full_count] : full_idx[entry];
    return blk * sub + i % sub;
  };
  // Keep-bits of this thread for tile nb (valid rows only for a full tile without mask).
  auto tile_bits = [&](int nb, bool listed_partial) -> uint32_t {
    tc.col0 = nb * kBlockN + 2 * (lane % 4);
    uint32_t bits = tile_partial(nb) ? window_bits<kNF>(p, tc, seq.len_q, seq.len_k)
                                     : valid_rows;
    if (kHasMask) bits = mask_bits<kNF>(p, mask, tc, bits);
    if (kSparse && listed_partial) {
      const int blk = nb / sub;
      const int slot = p.sp_partial_slot[row_entry * p.sp_col_blocks + blk];
      bits = block_element_bits<kNF>(p.sp_partial_bits + int64_t(slot) * (p.sp_block_m *
                                     p.sp_block_n / 32), tc, mrow * p.sp_block_m,
                                     blk * p.sp_block_n, p.sp_block_n, bits);
    }
    return bits;
  };
  // First item >= i whose tile is in the key range and kept by someone in the CTA.
  auto next_item = [&](int i, int& nb, uint32_t& bits, bool& listed_partial) {
    for (; i < n_items; ++i) {
      nb = tile_at(i, listed_partial);
      if (kSparse && (nb < n_first || nb > n_last)) continue;
      bits = tile_bits(nb, listed_partial);
      // Without a mask or element bits the key range holds no empty tile.
      if (!kHasMask && !listed_partial) return i;
      if (__syncthreads_or(bits != 0)) return i;
    }
    return i;
  };
  auto load_kv = [&](int nb, int stage) {
    const int n0 = nb * kBlockN;
    load_tile_async<kHeadDim, kStride, kThreads>(sK + stage * kBlockN * kStride,
                                                 k + int64_t(n0) * p.k_row_stride, p.k_row_stride,
                                                 kBlockN, seq.len_k - n0, p.head_dim);
    load_tile_async<kHeadDim, kStride, kThreads>(sV + stage * kBlockN * kStride,
                                                 v + int64_t(n0) * p.v_row_stride, p.v_row_stride,
                                                 kBlockN, seq.len_k - n0, p.head_dim);
  };

  float o[kDF][4];
#pragma unroll
  for (int j = 0; j < kDF; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  OnlineSoftmax<kNF> sm;

  uint32_t bits = 0;
  bool listed_partial = false;
  int nb = 0;
  int item = next_item(0, nb, bits, listed_partial);
  if (item < n_items) load_kv(nb, 0);
  cp_async_commit();
  int stage = 0;
  while (item < n_items) {
    uint32_t bits_next = 0;
    bool listed_partial_next = false;
    int nb_next = 0;
    const int item_next = next_item(item + 1, nb_next, bits_next, listed_partial_next);
    if (item_next < n_items) load_kv(nb_next, stage ^ 1);
    cp_async_commit();
    const bool partial = kHasMask || listed_partial || tile_partial(nb);
#ifdef DMATTN_DEBUG_COUNTERS
    if (threadIdx.x == 0) {
      const int cta = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
      atomicAdd(p.tile_counters + 2 * cta, 1u);
      if (partial) atomicAdd(p.tile_counters + 2 * cta + 1, 1u);
    }
#endif
    float bias[kNF][4];
    if (kHasBias) {
      tc.col0 = nb * kBlockN + 2 * (lane % 4);
      load_bias<T, kNF>(p, bias_base, tc, seq.len_q, seq.len_k, bias);
    }
    cp_async_wait<1>();
    __syncthreads();

    // S = Q K^T for this warp's 16 rows.
    const uint16_t* sKs = sK + stage * kBlockN * kStride;
    float s[kNF][4];
#pragma unroll
    for (int j = 0; j < kNF; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      uint32_t a[4];
      ldmatrix_x4(a, sQ + (16 * warp + lane % 16) * kStride + ks * 16 + (lane / 16) * 8);
#pragma unroll
      for (int jj = 0; jj < kNF / 2; ++jj) {
        uint32_t kb[4];
        ldmatrix_x4(kb, sKs + (jj * 16 + lane % 8 + (lane / 16) * 8) * kStride + ks * 16 +
                            ((lane / 8) % 2) * 8);
        mma_16816<T>(s[2 * jj], a, kb[0], kb[1]);
        mma_16816<T>(s[2 * jj + 1], a, kb[2], kb[3]);
      }
    }

    // Logits in the log2 domain: softcap, bias, exclusions (partial tiles only).
#pragma unroll
    for (int j = 0; j < kNF; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = p.softcap > 0.f ? p.softcap * kLog2e * fast_tanh(s[j][e] * p.scale_over_softcap)
                                  : s[j][e] * p.scale_log2;
        if (kHasBias) x += bias[j][e];
        if (partial && !(bits & (1u << (j * 4 + e)))) x = -DM_INF;
        s[j][e] = x;
      }
    float alpha[2];
    sm.update(s, alpha);
#pragma unroll
    for (int j = 0; j < kDF; ++j) {
      o[j][0] *= alpha[0];
      o[j][1] *= alpha[0];
      o[j][2] *= alpha[1];
      o[j][3] *= alpha[1];
    }

    // O += P V, P from registers as the A operand.
    const uint16_t* sVs = sV + stage * kBlockN * kStride;
#pragma unroll
    for (int ps = 0; ps < kBlockN / 16; ++ps) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * ps][0], s[2 * ps][1]);
      a[1] = pack2<T>(s[2 * ps][2], s[2 * ps][3]);
      a[2] = pack2<T>(s[2 * ps + 1][0], s[2 * ps + 1][1]);
      a[3] = pack2<T>(s[2 * ps + 1][2], s[2 * ps + 1][3]);
#pragma unroll
      for (int dd = 0; dd < kDF / 2; ++dd) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sVs + (ps * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kStride +
                                  dd * 16 + (lane / 16) * 8);
        mma_16816<T>(o[2 * dd], a, vb[0], vb[1]);
        mma_16816<T>(o[2 * dd + 1], a, vb[2], vb[3]);
      }
    }
    __syncthreads();  // this stage is refilled two iterations from now
    item = item_next;
    nb = nb_next;
    bits = bits_next;
    listed_partial = listed_partial_next;
    stage ^= 1;
  }
  cp_async_wait<0>();

  float inv_l[2], lse[2];
  sm.finalize(inv_l, lse);
  T* out = static_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride +
           int64_t(seq.q_start) * p.o_row_stride;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = tc.row[r];
    if (i >= seq.len_q) continue;
#pragma unroll
    for (int j = 0; j < kDF; ++j) {
      const int col = 8 * j + 2 * (lane % 4);
      if (col < p.head_dim)
        *reinterpret_cast<uint32_t*>(out + int64_t(i) * p.o_row_stride + col) =
            pack2<T>(o[j][2 * r] * inv_l[r], o[j][2 * r + 1] * inv_l[r]);
    }
    if (p.lse != nullptr && lane % 4 == 0)
      p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + seq.q_start + i] = lse[r];
  }
}

}  // namespace dm
