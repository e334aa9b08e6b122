// fwd_decode.cu: the forward kernel for short queries and long keys (decoding), sm_80+.
// GQA packing: a CTA owns one (sequence, kv head) and kBlockM = 16 packed rows, row
// r = i * q_per_kv + g being query i of query head kvh * q_per_kv + g, so the query heads that
// share a kv head read each K/V tile once. Split-KV: blockIdx.x = m_block * num_splits + split,
// and split s visits key tiles [n_tiles * s / S, n_tiles * (s + 1) / S) of the CTA's key range;
// with num_splits > 1 it writes an fp32 partial (normalized by its own sum) and its log2-domain
// lse to o_accum / lse_accum, which fwd_combine.cu merges. Inside the CTA, warp w owns keys
// 16w..16w+15 of every kBlockN-key tile (all warps share the m16 slab) with its own online
// softmax; the warps are merged through shared memory at the end. K/V tiles stream through
// kStages shared-memory stages with 16-byte cp.async; the mask/bias values of a tile are read
// one pipeline step before its K/V are issued (a register look-ahead, so their latency hides
// behind a tile's compute) and travel in registers until the tile is computed. Tiles whose mask
// elements are all false (for every row of the CTA) are skipped before their K/V are loaded;
// tiles outside the causal/window key range are never visited.
// Requires 16-byte aligned q/k/v rows (the launcher checks) and, when num_splits > 1, the
// partial buffers.
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

// K/V pipeline depth; dmattn_cupy/spec.py (decode_stages) sizes the dynamic smem with it.
constexpr int decode_stages(int head_dim) { return head_dim > 128 ? 2 : 3; }

// One issued K/V tile waiting in the pipeline: its index (-1: none) and this thread's keep-bits
// (j * 4 + e over its two n8 score fragments) and bias values (times log2 e).
struct DecodeTile {
  int nb;
  uint32_t bits;
  float bias[2][4];
};

// The next candidate tile's raw mask bytes and bias bits (16-bit or fp32), loaded ahead.
struct DecodeLookahead {
  int nb;
  uint32_t cand;  // keep-bits by bounds and window; loads only where set
  uint32_t mask[2][4];
  uint32_t bias[2][4];
};

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kNumWarps, bool kHasMask,
          bool kHasBias, bool kVarlen>
__global__ void __launch_bounds__(kNumWarps * 32, kNumWarps <= 4 ? 2 : 1)  // <= 255 regs
flash_fwd_decode_kernel(const FwdParams p) {
  static_assert(kBlockM == 16, "one m16 slab of packed (query, head) rows per CTA");
  static_assert(kBlockN == 16 * kNumWarps, "each warp owns 16 keys of a tile");
  static_assert(kHeadDim % 16 == 0, "head dim is padded to a multiple of 16");
  constexpr int kThreads = kNumWarps * 32;
  constexpr int kStages = decode_stages(kHeadDim);
  constexpr int kStride = kHeadDim + 8;  // +16 bytes per row: conflict-free ldmatrix
  constexpr int kDF = kHeadDim / 8;      // output fragments per row pair
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  constexpr int kSmem = (kBlockM + 2 * kStages * kBlockN) * kStride * 2;
  constexpr int kOStride = kHeadDim + 4;  // fp32 merge scratch row stride
  static_assert(kNumWarps * kBlockM * (kOStride + 1) * 4 <= 2 * kStages * kBlockN * kStride * 2,
                "the warp merge scratch fits in the K/V stages");
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;
  uint16_t* sK = sQ + kBlockM * kStride;
  uint16_t* sV = sK + kStages * kBlockN * kStride;
  if (dynamic_smem_size() < kSmem) __trap();  // launcher and kernel disagree on the layout

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int ns = p.num_splits;
  const int m_block = blockIdx.x / ns, split = blockIdx.x % ns;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq = seq_info<kVarlen>(p, b);
  const int qpk = p.q_per_kv;
  const int rows = seq.len_q * qpk;  // packed rows of this (sequence, kv head)
  const int m0 = m_block * kBlockM;
  if (m0 >= rows) return;
  const int m_end = dm_min(m0 + kBlockM, rows);
  const int i_first = m0 / qpk, i_last = (m_end - 1) / qpk;  // queries of the slab
  const int off = seq.len_k - seq.len_q;

  const T* q = q_row_ptr<T>(p, b, 0, seq, 0);  // head 0, row 0 of the sequence
  // Q slab: packed row r -> query i, head h (rows past the sequence are zero-filled).
  for (int c = threadIdx.x; c < kBlockM * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8, pr = m0 + r;
    const bool ok = pr < rows && col < p.head_dim;
    const T* src = q;
    if (ok)
      src = q + int64_t(pr / qpk) * p.q_row_stride +
            int64_t(kvh * qpk + pr % qpk) * p.q_head_stride + col;
    cp_async_16(sQ + r * kStride + col, src, ok);
  }

  const T* k = k_row_ptr<T>(p, b, kvh, seq, 0);
  const T* v = v_row_ptr<T>(p, b, kvh, seq, 0);

  // This thread's two rows (g, g + 8 of the slab): query, head, mask/bias row offsets.
  bool row_ok[2];
  int qi[2], qh[2];
  int64_t mask_row[2] = {0, 0}, bias_row[2] = {0, 0};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int pr = m0 + lane / 4 + 8 * r;
    row_ok[r] = pr < rows;
    qi[r] = row_ok[r] ? pr / qpk : 0;
    qh[r] = kvh * qpk + (row_ok[r] ? pr % qpk : 0);
    if (kHasMask) mask_row[r] = mask_offset(p, b, qh[r], seq) + int64_t(qi[r]) * p.mask_row_stride;
    if (kHasBias) bias_row[r] = bias_offset(p, b, qh[r], seq) + int64_t(qi[r]) * p.bias_row_stride;
  }
  // Key of fragment j, element e within a tile.
  const int col_base = 16 * warp + 2 * (lane % 4);
  auto tile_col = [&](int j, int e) { return col_base + 8 * j + (e & 1); };
  uint32_t valid_rows = 0;
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (row_ok[e >> 1]) valid_rows |= 1u << (j * 4 + e);

  // Key tiles of this split.
  const KeyRange kr = key_range(p, i_first, i_last + 1, seq.len_q, seq.len_k);
  const TileSpan span = tile_span<kBlockN>(kr);
  const int n_tiles = span.last - span.first + 1;
  int cursor = span.first + int(int64_t(n_tiles) * split / ns);
  const int t_end = span.first + int(int64_t(n_tiles) * (split + 1) / ns);

  // Keep-bits by bounds and window; a tile inside both for every row keeps all valid rows.
  auto bounds_bits = [&](int nb) -> uint32_t {
    const int n0 = nb * kBlockN;
    if (visited_tile_class(p, i_first, i_last, n0, n0 + kBlockN - 1, seq.len_k, off) ==
        kTileFull)
      return valid_rows;
    uint32_t bits = 0;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, col = n0 + tile_col(j, e);
        if (row_ok[r] && col < seq.len_k && in_window(p, qi[r], col, off))
          bits |= 1u << (j * 4 + e);
      }
    return bits;
  };

  // Look-ahead: the mask/bias values of the next candidate tile are loaded one pipeline step
  // before they decide whether its K/V are issued, so their latency hides behind a tile's
  // compute. Raw values (zero where the bounds exclude) wait in registers.
  DecodeLookahead la;
  auto load_lookahead = [&]() {
    la.nb = cursor < t_end ? cursor++ : -1;
    if (la.nb < 0) return;
    const int n0 = la.nb * kBlockN;
    la.cand = bounds_bits(la.nb);
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool in = la.cand & (1u << (j * 4 + e));
        const int64_t col = n0 + tile_col(j, e);
        if (kHasMask)
          la.mask[j][e] = in ? p.mask[mask_row[e >> 1] + col * p.mask_col_stride] : 0;
        if (kHasBias) {
          const int64_t idx = bias_row[e >> 1] + col * p.bias_col_stride;
          la.bias[j][e] = !in ? 0u
                          : p.bias_is_fp32 ? __float_as_uint(static_cast<const float*>(p.bias)[idx])
                                           : uint32_t(static_cast<const uint16_t*>(p.bias)[idx]);
        }
      }
  };
  // The next look-ahead tile that some row of the CTA keeps (tiles whose mask elements are all
  // false are dropped before their K/V are loaded): its K/V go to `slot`, its keep-bits and
  // bias values to `t`, and the following candidate's mask/bias loads are started.
  auto issue_next = [&](DecodeTile& t, int slot) {
    t.nb = -1;
    t.bits = 0;
    while (la.nb >= 0) {
      const int nb = la.nb;
      uint32_t bits = la.cand;
      if (kHasMask) {
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (la.mask[j][e] == 0) bits &= ~(1u << (j * 4 + e));
      }
      if (kHasBias) {
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            T raw;
            raw.bits = uint16_t(la.bias[j][e]);
            t.bias[j][e] = (p.bias_is_fp32 ? __uint_as_float(la.bias[j][e]) : to_float(raw)) *
                           kLog2e;
          }
      }
      const bool keep = !kHasMask || cta_any(bits != 0);
      load_lookahead();
      if (!keep) continue;  // all false: K/V never loaded
      t.nb = nb;
      t.bits = bits;
      const int n0 = nb * kBlockN;
      load_tile_async<kHeadDim, kStride, kThreads>(sK + slot * kBlockN * kStride,
                                                   k + int64_t(n0) * p.k_row_stride,
                                                   p.k_row_stride, kBlockN, seq.len_k - n0,
                                                   p.head_dim);
      load_tile_async<kHeadDim, kStride, kThreads>(sV + slot * kBlockN * kStride,
                                                   v + int64_t(n0) * p.v_row_stride,
                                                   p.v_row_stride, kBlockN, seq.len_k - n0,
                                                   p.head_dim);
      return;
    }
  };

  float o[kDF][4];
#pragma unroll
  for (int j = 0; j < kDF; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  OnlineSoftmax<> sm;

  // Pipeline: kStages - 1 tiles in flight ahead of the one computed (FIFO in registers).
  DecodeTile fifo[kStages - 1];
  int issued = 0, consumed = 0;
  load_lookahead();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    issue_next(fifo[s], issued % kStages);
    issued += fifo[s].nb >= 0;
    cp_async_commit();  // the first group also holds the Q slab
  }
  while (fifo[0].nb >= 0) {
    DecodeTile next;
    issue_next(next, issued % kStages);
    issued += next.nb >= 0;
    cp_async_commit();
    cp_async_wait<kStages - 1>();
    __syncthreads();

    const DecodeTile& cur = fifo[0];
    const int slot = consumed % kStages;
    const uint16_t* sKs = sK + slot * kBlockN * kStride;
    const uint16_t* sVs = sV + slot * kBlockN * kStride;

    // S = Q K^T: 16 packed rows x this warp's 16 keys.
    float s[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      uint32_t a[4], kb[4];
      ldmatrix_x4(a, sQ + ldsm_a_row(lane) * kStride + ks * 16 + ldsm_a_col(lane));
      ldmatrix_x4(kb, sKs + (16 * warp + ldsm_nk_row(lane)) * kStride + ks * 16 +
                          ldsm_nk_col(lane));
      mma_16816<T>(s[0], a, kb[0], kb[1]);
      mma_16816<T>(s[1], a, kb[2], kb[3]);
    }
    // Logits in the fused form of logits.cuh (log2 domain): softcap, bias, exclusions.
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = logit_log2(p, s[j][e]);
        if (kHasBias) x += cur.bias[j][e];
        if (!(cur.bits & (1u << (j * 4 + e)))) x = -DM_INF;
        s[j][e] = x;
      }
    float alpha[2];
    sm.update(s, alpha);
    rescale_o(o, alpha);
    // O += P V: P (16 rows x 16 keys) from registers as the A operand.
    uint32_t a[4];
    pack_a_from_c<T>(a, s, 0);
#pragma unroll
    for (int dd = 0; dd < kDF / 2; ++dd) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, sVs + (16 * warp + ldsm_kn_row(lane)) * kStride + dd * 16 +
                                ldsm_kn_col(lane));
      mma_16816<T>(o[2 * dd], a, vb[0], vb[1]);
      mma_16816<T>(o[2 * dd + 1], a, vb[2], vb[3]);
    }
    __syncthreads();  // this stage is refilled by the next issue
    ++consumed;
#pragma unroll
    for (int s2 = 0; s2 + 1 < kStages - 1; ++s2) fifo[s2] = fifo[s2 + 1];
    fifo[kStages - 2] = next;
  }
  cp_async_wait<0>();
  __syncthreads();

  // Merge the warps: each writes its normalized rows and log2-domain lse to the K/V stages.
  float* sO = reinterpret_cast<float*>(sK);           // (warps, 16, kOStride)
  float* sLse = sO + kNumWarps * kBlockM * kOStride;  // (warps, 16)
  float inv_l[2], warp_lse2[2];
  sm.finalize(inv_l, warp_lse2);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = lane / 4 + 8 * r;
    float* dst = sO + (warp * kBlockM + row) * kOStride + 2 * (lane % 4);
#pragma unroll
    for (int j = 0; j < kDF; ++j) {
      dst[8 * j] = normalize_out(o[j][2 * r], inv_l[r]);
      dst[8 * j + 1] = normalize_out(o[j][2 * r + 1], inv_l[r]);
    }
    if (lane % 4 == 0) sLse[warp * kBlockM + row] = warp_lse2[r];
  }
  __syncthreads();

  // Thread -> (row, column chunk) of the merged slab.
  constexpr int kPerRow = kThreads / kBlockM;     // threads per row
  constexpr int kCols = kHeadDim / kPerRow;       // columns per thread (even)
  static_assert(kThreads % kBlockM == 0 && kHeadDim % (2 * kPerRow) == 0, "merge tiling");
  const int row = threadIdx.x / kPerRow, c0 = (threadIdx.x % kPerRow) * kCols;
  const int pr = m0 + row;
  if (pr >= rows) return;
  float lw[kNumWarps], mx = -DM_INF;
#pragma unroll
  for (int w = 0; w < kNumWarps; ++w) {
    lw[w] = sLse[w * kBlockM + row];
    mx = fmax_nan(mx, lw[w]);  // a NaN warp makes the row NaN
  }
  float lse2 = -DM_INF;
  if (mx != -DM_INF) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) sum += fast_exp2(lw[w] - mx);
    lse2 = mx + __log2f(sum);
  }
#pragma unroll
  for (int w = 0; w < kNumWarps; ++w) lw[w] = lse2 == -DM_INF ? 0.f : fast_exp2(lw[w] - lse2);
  const int i = pr / qpk, h = kvh * qpk + pr % qpk;
  const int64_t grow = kVarlen ? int64_t(seq.q_start) + i : int64_t(b) * p.seqlen_q + i;

  if (ns > 1) {  // partial for fwd_combine.cu
    const int64_t pid = (grow * p.heads + h) * ns + split;
    float* dst = p.o_accum + pid * kHeadDim;
#pragma unroll
    for (int c = 0; c < kCols; c += 2) {
      const int col = c0 + c;
      float2 acc = make_float2(0.f, 0.f);
#pragma unroll
      for (int w = 0; w < kNumWarps; ++w) {
        acc.x += lw[w] * sO[(w * kBlockM + row) * kOStride + col];
        acc.y += lw[w] * sO[(w * kBlockM + row) * kOStride + col + 1];
      }
      if (col < p.head_dim) *reinterpret_cast<float2*>(dst + col) = acc;
    }
    if (c0 == 0) p.lse_accum[pid] = lse2;
    return;
  }
  T* out = o_row_ptr<T>(p, b, h, seq, i);
#pragma unroll
  for (int c = 0; c < kCols; c += 2) {
    const int col = c0 + c;
    float x = 0.f, y = 0.f;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) {
      x += lw[w] * sO[(w * kBlockM + row) * kOStride + col];
      y += lw[w] * sO[(w * kBlockM + row) * kOStride + col + 1];
    }
    if (col < p.head_dim) *reinterpret_cast<uint32_t*>(out + col) = pack2<T>(x, y);
  }
  if (p.lse != nullptr && c0 == 0)
    p.lse[lse_index(p, b, h, seq, i)] = lse_natural(lse2);
}

}  // namespace dm
