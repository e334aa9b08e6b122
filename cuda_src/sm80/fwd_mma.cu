// fwd_mma.cu: the tensor-core forward kernel (FlashAttention-2 style, sm_80+).
// A CTA owns kBlockM query rows of one (batch, head). Warp w owns kSlabs m16 row slabs:
// rows 16w + 16*kNumWarps*s (+0..15), s < kSlabs, so every K/V fragment read from shared
// memory feeds kSlabs mma instructions. Q is staged once; K/V tiles of kBlockN keys (and
// the bias tile) are double-buffered in shared memory with cp.async: the next non-empty
// tile is fetched while the current one computes. A bool mask tile is fetched one tile
// further ahead, so the all-false test of a tile happens before its K/V are requested.
// S = Q K^T and O += P V use mma.sync m16n8k16 with fp32 accumulation; P stays in registers
// as the A operand. Tile classes: tiles outside the causal/window key range are never
// visited; tiles whose mask elements are all false are skipped before their K/V are loaded;
// full tiles (no mask, inside bounds and window) do no per-element work.
// Mask and bias tiles go through shared memory when their rows are contiguous and 16-byte
// aligned (any row stride, 0 included) or when one row serves every query (strided keys);
// other layouts are read per element from global.
// The kernel body is the prologue (layout, visit order, first loads), the mainloop over the
// visited tiles (tile_scores, the logit/mask step, the softmax update, tile_pv) and the
// epilogue (fwd_epilogue).
// Requires 16-byte aligned q/k/v/o rows (pointers and strides multiples of 8 elements).
#pragma once
#include "common.cuh"
#include "params.cuh"
#include "mma.cuh"
#include "fragment.cuh"
#include "seqlen.cuh"
#include "block_info.cuh"
#include "mask_bias.cuh"
#include "logits.cuh"
#include "softmax.cuh"
#include "tile_io.cuh"

namespace dm {

// S = Q K^T for a warp's kSlabs slabs of one key tile; each K fragment feeds every slab.
// q_frag / k_stage: this lane's ldmatrix addresses (bytes) of fragment 0 of Q (slab 0) and of
// the K stage; slab s is 16 * kNumWarps rows below slab 0.
template <typename T, int kHeadDim, int kNumWarps, int kStride, int kSlabs, int kNF>
DM_DEVICE void tile_scores(float (&sc)[kSlabs][kNF][4], uint32_t q_frag, uint32_t k_stage) {
#pragma unroll
  for (int s = 0; s < kSlabs; ++s)
#pragma unroll
    for (int j = 0; j < kNF; ++j) sc[s][j][0] = sc[s][j][1] = sc[s][j][2] = sc[s][j][3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < kHeadDim / 16; ++ks) {
    uint32_t a[kSlabs][4];
#pragma unroll
    for (int s = 0; s < kSlabs; ++s)
      ldmatrix_x4_at(a[s], q_frag + (s * 16 * kNumWarps * kStride + ks * 16) * 2);
#pragma unroll
    for (int jj = 0; jj < kNF / 2; ++jj) {
      uint32_t kb[4];
      ldmatrix_x4_at(kb, k_stage + (jj * 16 * kStride + ks * 16) * 2);
#pragma unroll
      for (int s = 0; s < kSlabs; ++s) {
        mma_16816<T>(sc[s][2 * jj], a[s], kb[0], kb[1]);
        mma_16816<T>(sc[s][2 * jj + 1], a[s], kb[2], kb[3]);
      }
    }
  }
}

// O += P V, P (the probabilities in sc) from registers as the A operand; each V fragment
// feeds every slab. v_stage: this lane's ldmatrix.trans address (bytes) of the V stage.
template <typename T, int kBlockN, int kStride, int kSlabs, int kNF, int kDF>
DM_DEVICE void tile_pv(float (&o)[kSlabs][kDF][4], const float (&sc)[kSlabs][kNF][4],
                       uint32_t v_stage) {
#pragma unroll
  for (int ps = 0; ps < kBlockN / 16; ++ps) {
    uint32_t a[kSlabs][4];
#pragma unroll
    for (int s = 0; s < kSlabs; ++s) pack_a_from_c<T>(a[s], sc[s], ps);
#pragma unroll
    for (int dd = 0; dd < kDF / 2; ++dd) {
      uint32_t vb[4];
      ldmatrix_x4_trans_at(vb, v_stage + (ps * 16 * kStride + dd * 16) * 2);
#pragma unroll
      for (int s = 0; s < kSlabs; ++s) {
        mma_16816<T>(o[s][2 * dd], a[s], vb[0], vb[1]);
        mma_16816<T>(o[s][2 * dd + 1], a[s], vb[2], vb[3]);
      }
    }
  }
}

// Normalized output rows and the natural-log lse of a warp's slabs (query tile at row m0).
template <typename T, int kNumWarps, int kSlabs, int kDF>
DM_DEVICE void fwd_epilogue(const FwdParams& p, int b, int h, const SeqInfo& seq, int m0,
                            int warp, int lane, const float (&o)[kSlabs][kDF][4],
                            const OnlineSoftmax<> (&sm)[kSlabs]) {
  T* out = o_row_ptr<T>(p, b, h, seq, m0);
#pragma unroll
  for (int s = 0; s < kSlabs; ++s) {
    float inv_l[2], lse2[2];
    sm[s].finalize(inv_l, lse2);
    const int row0 = 16 * kNumWarps * s + 16 * warp;  // slab's first row in the query tile
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = m0 + row0 + lane / 4 + 8 * r;
      if (p.lse != nullptr && lane % 4 == 0 && i < seq.len_q)
        p.lse[lse_index(p, b, h, seq, i)] = lse_natural(lse2[r]);
    }
    store_frags<T, kDF>(out, p.o_row_stride, o[s], row0, 0, seq.len_q - m0, p.head_dim, lane,
                        inv_l);
  }
}

// kDebug: per-CTA debug counters {tiles loaded, tiles masked} in p.tile_counters.
template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kNumWarps, bool kHasMask,
          bool kHasBias, bool kVarlen, bool kSparse, bool kDebug>
__global__ void __launch_bounds__(kNumWarps * 32, 1)
flash_fwd_mma_kernel(const FwdParams p) {
  constexpr int kSlabs = kBlockM / (16 * kNumWarps);
  static_assert(kSlabs * 16 * kNumWarps == kBlockM && kSlabs >= 1 && kSlabs <= 2,
                "each warp owns one or two m16 row slabs");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 64, "keep-bits of a slab fit one uint32");
  static_assert(kHeadDim % 16 == 0, "head dim is padded to a multiple of 16");
  constexpr int kThreads = kNumWarps * 32;
  constexpr int kStride = kHeadDim + 8;      // +16 bytes per row: conflict-free ldmatrix
  constexpr int kBiasStride = kBlockN + 8;   // elements; 16-byte rows, conflict-free pairs
  constexpr int kMaskStride = kBlockN + 16;  // bytes; 16-byte rows, conflict-free pairs
  constexpr int kNF = kBlockN / 8;           // score fragments per slab row pair
  constexpr int kDF = kHeadDim / 8;          // output fragments
  // Shared memory (spec.py's dynamic_smem mirrors this): Q | K x2 | V x2 | bias x2 | mask.
  constexpr int kSmemBytes =
      2 * (kBlockM * kStride + 4 * kBlockN * kStride + (kHasBias ? 2 * kBlockM * kBiasStride : 0)) +
      (kHasMask ? kBlockM * kMaskStride : 0);
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;
  uint16_t* sK = sQ + kBlockM * kStride;
  uint16_t* sV = sK + 2 * kBlockN * kStride;
  uint16_t* sBias = sV + 2 * kBlockN * kStride;
  uint8_t* sMask = reinterpret_cast<uint8_t*>(sBias + (kHasBias ? 2 * kBlockM * kBiasStride : 0));
  if (dynamic_smem_size() < kSmemBytes) __trap();  // launcher and kernel disagree on the layout

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq = seq_info<kVarlen>(p, b);
  const int m0 = blockIdx.x * kBlockM;
  if (m0 >= seq.len_q) return;
  const int m_end = dm_min(m0 + kBlockM, seq.len_q);
  const int kvh = h / p.q_per_kv;
  const int off = seq.len_k - seq.len_q;

  const T* q = q_row_ptr<T>(p, b, h, seq, m0);
  const T* k = k_row_ptr<T>(p, b, kvh, seq, 0);
  const T* v = v_row_ptr<T>(p, b, kvh, seq, 0);
  const uint8_t* mask = kHasMask ? p.mask + mask_offset(p, b, h, seq) : nullptr;
  const int64_t bias_base = kHasBias ? bias_offset(p, b, h, seq) : 0;
  // Shared-memory paths: contiguous, 16-byte aligned rows (CTA-uniform decisions).
  const bool mask_vec = kHasMask && p.mask_col_stride == 1 && p.mask_row_stride % 16 == 0 &&
                        reinterpret_cast<size_t>(mask) % 16 == 0;
  const uint8_t* bias_bytes =
      kHasBias ? static_cast<const uint8_t*>(p.bias) + bias_base * (p.bias_is_fp32 ? 4 : 2)
               : nullptr;
  const bool bias_vec = kHasBias && !p.bias_is_fp32 && p.bias_col_stride == 1 &&
                        p.bias_row_stride % 8 == 0 && reinterpret_cast<size_t>(bias_bytes) % 16 == 0;
  const bool mask_one_row = p.mask_row_stride == 0, bias_one_row = p.bias_row_stride == 0;
  // A mask/bias shared by every query row but with strided keys (e.g. varlen key-based
  // (total_k, h') layouts) is staged one element per key by plain loads: the mask as bytes,
  // the bias as float.
  const bool mask_smem = mask_vec || mask_one_row;
  const bool bias_row_f32 = kHasBias && !bias_vec && bias_one_row;

  load_tile_async<kHeadDim, kStride, kThreads>(sQ, q, p.q_row_stride, kBlockM, m_end - m0,
                                               p.head_dim);
  cp_async_commit();

  const KeyTileVisit<kBlockN, kSparse> visit(
      p, b, h, m0, key_range(p, m0, m_end, seq.len_q, seq.len_k));
  const int n_items = visit.n_items;

  // This thread's rows: slab s, half r -> CTA-local row 16*kNumWarps*s + 16*warp + g + 8r.
  auto local_row = [&](int s, int r) { return 16 * kNumWarps * s + 16 * warp + lane / 4 + 8 * r; };
  TileCoords tc[kSlabs];
  uint32_t valid_rows[kSlabs];  // fragment positions on rows inside the sequence
#pragma unroll
  for (int s = 0; s < kSlabs; ++s) {
    tc[s].row[0] = m0 + local_row(s, 0);
    tc[s].row[1] = m0 + local_row(s, 1);
    valid_rows[s] = 0;
#pragma unroll
    for (int j = 0; j < kNF; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (tc[s].row[e >> 1] < seq.len_q) valid_rows[s] |= 1u << (j * 4 + e);
  }

  // A visited tile is partial by formula when it crosses the sequence end or a window edge.
  auto tile_partial = [&](int nb) {
    return visited_tile_class(p, m0, m_end - 1, nb * kBlockN, nb * kBlockN + kBlockN - 1,
                             seq.len_k, off) != kTileFull;
  };
  auto load_mask = [&](int nb) {  // shared-memory paths only
    const int n0 = nb * kBlockN;
    if (mask_vec) {
      load_bytes_async<kBlockN, kMaskStride, kThreads>(
          sMask, mask + int64_t(m0) * p.mask_row_stride + n0, p.mask_row_stride,
          mask_one_row ? 1 : kBlockM, m_end - m0, seq.len_k - n0);
    } else {
      for (int c = threadIdx.x; c < kBlockN; c += kThreads)
        sMask[c] = n0 + c < seq.len_k && mask[int64_t(n0 + c) * p.mask_col_stride] != 0;
    }
  };
  // Keep-bits (bit j*4+e of slab s) of this thread for tile nb. The shared-memory mask path
  // expects the tile's mask in sMask.
  auto tile_bits = [&](int nb, bool listed_partial, uint32_t (&bits)[kSlabs]) {
    const bool by_formula = tile_partial(nb);
#pragma unroll
    for (int s = 0; s < kSlabs; ++s) {
      tc[s].col0 = nb * kBlockN + 2 * (lane % 4);
      uint32_t x = by_formula ? window_bits<kNF>(p, tc[s], seq.len_q, seq.len_k) : valid_rows[s];
      if (kHasMask) {
        if (mask_smem) {
          uint32_t keep = 0;
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const uint8_t* row = sMask + (mask_one_row ? 0 : local_row(s, r)) * kMaskStride +
                                 2 * (lane % 4);
#pragma unroll
            for (int j = 0; j < kNF; ++j) {
              const uint32_t two = *reinterpret_cast<const uint16_t*>(row + 8 * j);
              if (two & 0x00ffu) keep |= 1u << (j * 4 + 2 * r);
              if (two & 0xff00u) keep |= 1u << (j * 4 + 2 * r + 1);
            }
          }
          x &= keep;
        } else {
          x = mask_bits<kNF>(p, mask, tc[s], x);
        }
      }
      if (kSparse && listed_partial) {
        const int blk = nb / visit.sub;
        const int slot = p.sp_partial_slot[visit.row_entry * p.sp_col_blocks + blk];
        x = block_element_bits<kNF>(sparse_block_words(p, slot), tc[s],
                                    visit.mrow * p.sp_block_m, blk * p.sp_block_n,
                                    p.sp_block_n, x);
      }
      bits[s] = x;
    }
  };
  int mask_item = -1;  // item whose mask tile is in (or on its way to) sMask
  // First item >= i whose tile is in the key range and kept by someone in the CTA.
  auto next_item = [&](int i, int& nb, uint32_t (&bits)[kSlabs], bool& listed_partial) {
    for (i = visit.next_candidate(i); i < n_items; i = visit.next_candidate(i + 1)) {
      nb = visit.tile_at(i, listed_partial);
      if (kHasMask && mask_smem) {
        if (mask_item != i) {
          load_mask(nb);
          cp_async_commit();
          mask_item = i;
        }
        cp_async_wait<0>();
        __syncthreads();
      }
      tile_bits(nb, listed_partial, bits);
      // Without a mask or element bits the key range holds no empty tile.
      if (!kHasMask && !listed_partial) return i;
      uint32_t any = 0;
#pragma unroll
      for (int s = 0; s < kSlabs; ++s) any |= bits[s];
      if (cta_any(any != 0)) return i;  // also: every sMask read is done
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
    if (kHasBias && bias_vec)
      load_bytes_async<2 * kBlockN, 2 * kBiasStride, kThreads>(
          reinterpret_cast<uint8_t*>(sBias + stage * kBlockM * kBiasStride),
          bias_bytes + 2 * (int64_t(m0) * p.bias_row_stride + n0), 2 * p.bias_row_stride,
          bias_one_row ? 1 : kBlockM, m_end - m0, 2 * (seq.len_k - n0));
    if (kHasBias && bias_row_f32) {
      float* row = reinterpret_cast<float*>(sBias + stage * kBlockM * kBiasStride);
      for (int c = threadIdx.x; c < kBlockN; c += kThreads)
        row[c] = bias_element<T>(p, bias_base, 0, n0 + c, seq.len_q, seq.len_k);
    }
  };
  // Prefetch (shared-memory mask path) the mask of the first candidate after item i.
  auto prefetch_mask = [&](int i) {
    if (kHasMask && mask_smem) {
      const int c = visit.next_candidate(i + 1);
      if (c < n_items) {
        bool lp;
        load_mask(visit.tile_at(c, lp));
        mask_item = c;
      }
    }
    cp_async_commit();  // possibly empty: every iteration commits K/V then mask groups
  };

  // Per-thread ldmatrix addresses (shared memory, bytes) of fragment 0: Q rows of slab 0
  // (A operand, x4 = rows 0-15 x cols 0-15), K (B operand of S, x4 = 16 keys x 2 k-halves),
  // V (B operand of O, transposed, x4 = 16 keys x 2 column blocks).
  const uint32_t q_frag =
      smem_addr(sQ + (16 * warp + ldsm_a_row(lane)) * kStride + ldsm_a_col(lane));
  const uint32_t k_frag = smem_addr(sK + ldsm_nk_row(lane) * kStride + ldsm_nk_col(lane));
  const uint32_t v_frag = smem_addr(sV + ldsm_kn_row(lane) * kStride + ldsm_kn_col(lane));

  float o[kSlabs][kDF][4];
#pragma unroll
  for (int s = 0; s < kSlabs; ++s)
#pragma unroll
    for (int j = 0; j < kDF; ++j) o[s][j][0] = o[s][j][1] = o[s][j][2] = o[s][j][3] = 0.f;
  OnlineSoftmax<> sm[kSlabs];

  uint32_t bits[kSlabs];
  bool listed_partial = false;
  int nb = 0;
  int item = next_item(0, nb, bits, listed_partial);
  if (item < n_items) load_kv(nb, 0);
  cp_async_commit();
  prefetch_mask(item);
  int stage = 0;
  while (item < n_items) {
    uint32_t bits_next[kSlabs];
    bool listed_partial_next = false;
    int nb_next = 0;
    const int item_next = next_item(item + 1, nb_next, bits_next, listed_partial_next);
    if (item_next < n_items) load_kv(nb_next, stage ^ 1);
    cp_async_commit();
    prefetch_mask(item_next);
    const bool partial = kHasMask || listed_partial || tile_partial(nb);
    if (kDebug && threadIdx.x == 0) {
      const int cta = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
      atomicAdd(p.tile_counters + 2 * cta, 1u);
      if (partial) atomicAdd(p.tile_counters + 2 * cta + 1, 1u);
    }
    cp_async_wait<2>();  // all but the two groups just committed: Q and this tile's K/V/bias
    __syncthreads();

    float sc[kSlabs][kNF][4];
    tile_scores<T, kHeadDim, kNumWarps, kStride, kSlabs, kNF>(
        sc, q_frag, k_frag + stage * (kBlockN * kStride * 2));

    // Logits in the split form of logits.cuh: y (softcapped, plus the bias), then excluded
    // positions to -inf; the softmax applies exp_scale.
    if (has_softcap(p)) {
#pragma unroll
      for (int s = 0; s < kSlabs; ++s)
#pragma unroll
        for (int j = 0; j < kNF; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) sc[s][j][e] = softcap_logit(p, sc[s][j][e]);
    }
    const LogitScales ls = logit_scales<kHasBias>(p);
    const uint16_t* sB = sBias + stage * kBlockM * kBiasStride;
#pragma unroll
    for (int s = 0; s < kSlabs; ++s) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const uint16_t* brow = sB + (bias_one_row ? 0 : local_row(s, r)) * kBiasStride +
                               2 * (lane % 4);
#pragma unroll
        for (int j = 0; j < kNF; ++j) {
          float bv[2] = {0.f, 0.f};
          if (kHasBias) {
            if (bias_vec) {
              const uint32_t two = *reinterpret_cast<const uint32_t*>(brow + 8 * j);
              bv[0] = to_float(T{uint16_t(two & 0xffffu)});
              bv[1] = to_float(T{uint16_t(two >> 16)});
            } else if (bias_row_f32) {
              const float2 two = *reinterpret_cast<const float2*>(
                  reinterpret_cast<const float*>(sB) + 8 * j + 2 * (lane % 4));
              bv[0] = two.x;
              bv[1] = two.y;
            } else {
              const int col = nb * kBlockN + 8 * j + 2 * (lane % 4);
              bv[0] = bias_element<T>(p, bias_base, tc[s].row[r], col, seq.len_q, seq.len_k);
              bv[1] = bias_element<T>(p, bias_base, tc[s].row[r], col + 1, seq.len_q, seq.len_k);
            }
          }
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int e = 2 * r + c;
            float x = sc[s][j][e];
            if (kHasBias) x = add_bias(x, ls, bv[c]);
            if (partial && !(bits[s] & (1u << (j * 4 + e)))) x = -DM_INF;
            sc[s][j][e] = x;
          }
        }
      }
      float alpha[2];
      sm[s].update(sc[s], alpha, ls.exp_scale);
      rescale_o(o[s], alpha);
    }

    tile_pv<T, kBlockN, kStride, kSlabs, kNF, kDF>(o, sc,
                                                   v_frag + stage * (kBlockN * kStride * 2));
    __syncthreads();  // this stage is refilled next iteration
    item = item_next;
    nb = nb_next;
#pragma unroll
    for (int s = 0; s < kSlabs; ++s) bits[s] = bits_next[s];
    listed_partial = listed_partial_next;
    stage ^= 1;
  }
  cp_async_wait<0>();

  fwd_epilogue<T, kNumWarps, kSlabs, kDF>(p, b, h, seq, m0, warp, lane, o, sm);
}

}  // namespace dm
