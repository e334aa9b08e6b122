// fwd_decode.cu: the forward kernel for short queries and long keys (decoding), sm_80+.
// GQA packing: a CTA owns one (sequence, kv head) and kBlockM = 16 packed rows, row
// r = i * q_per_kv + g being query i of query head kvh * q_per_kv + g, so the query heads that
// share a kv head read each K/V tile once. Split-KV: blockIdx.x = m_block * num_splits + split,
// and split s visits key tiles [n_tiles * s / S, n_tiles * (s + 1) / S) of the CTA's key range;
// with num_splits > 1 it writes an fp32 partial (normalized by its own sum) and its log2-domain
// lse to o_accum / lse_accum, which fwd_combine.cu merges, or (split_counters set) the last CTA
// of the group to finish (split_combine.cuh). Inside the CTA, warp w owns keys
// 16w..16w+15 of every kBlockN-key tile (all warps share the m16 slab) with its own online
// softmax; the warps are merged through shared memory at the end.
// Pipeline: tile u of the split goes to stage u % kStages; its K/V rows (16-byte cp.async) and its
// mask/bias elements (one 4-byte cp.async per key and staged row: the aligned word holding the
// element, decoded at compute time by a per-thread byte shift) travel with its copies, so no issue
// ever waits for a load. The ring is 2 tiles deep, or the spec's stages (3 at d128, which
// decode.choose_stages takes where the grid then runs unsplit). At d64/d128/d256 the pipeline is
// warp-local (each warp copies and waits for its own 16 keys, K with the mask/bias words and V in
// groups of their own); at other head dims one cp.async group per tile and a CTA barrier. Staged
// rows ("slots", FwdParams.mask_slot_mode): key-based layouts share one row per mask head, so a CTA
// stages 1 (or q_per_kv) rows instead of 16.
// Tiles outside the causal/window key range are never visited; tiles inside it are loaded even
// when their mask keeps nothing (a skip would need the mask before the issue).
// KV cache (FwdParams.cache_seqlens / block_table): a sequence's key count comes from
// cache_seqlens; with a block table, K/V/mask/bias rows of key j are read from page
// block_table[b][j / page_size]. The page ids of tile u are copied into a small shared ring by
// cp.async kStages tiles ahead of u's K/V, so the lookup is off the issue chain too.
// Requires 16-byte aligned q/k/v rows (the launcher checks) and, when num_splits > 1, the
// partial buffers (and, for the merge in this grid, the group counters, zero at launch).
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
#include "split_combine.cuh"

namespace dm {

// A/B switches (DMATTN_NVRTC_DEFINES; defaults = the committed kernel):
// DM_DECODE_LEAN_ISSUE=0: the generic K/V issue loops instead of the fixed-count ones (see
// kLeanIssue below: 3425 against 2273 GB/s on the H200's decode case);
// DM_DECODE_STAGES=N: K/V ring depth N of the default-depth specs (default 2;
// families.decode_stages reads the same define, so the launch's smem follows);
// DM_DECODE_MIN_CTAS=M: __launch_bounds__ min blocks at d <= 128 (default 3: 3 CTAs of 75 KB per SM
// at <= 168 registers; 3 spills at d192/d256). Measured on the H200 decode case with 3 splits: 3771
// GB/s, 2 stages x 2 CTAs 3457.
// DM_DECODE_MIN_CTAS_SMALL=M: the same at d <= 64 (default 4: 125 registers, 0 spills; H200
// d64 decode against 3 CTAs, with decode.py's 95% split rule: 3796 vs 3573 GB/s, B256 Sk1024
// 3762 vs 3468, B8 Sk32768 3660 vs 3678).
// DM_DECODE_WARP_LOCAL=0: CTA-wide copies and a __syncthreads per tile instead of the
// warp-local pipeline (kWarpLocal below); DM_DECODE_SPLIT_KV=0: K and V of a tile in one
// cp.async group (kSplitKV). H200, decode GB/s, CTA-wide / warp-local / + split K/V: d128
// 3826 / 3853 / 3862, d64 3795 / 3817 / 3846, B8 Sk32768 3913 / 3944 / 3946, B256 Sk1024
// 3811 / 3954 / 3949, paged64 3787 / 3790 / 3782 (one process per variant, same call).
// DM_DECODE_SWIZZLE=0: K/V stage rows padded by 16 bytes instead of swizzled (DecodeKV). The
// padded rows split each 8 lanes' 128-byte copy across two shared-memory lines: ncu counted 1.5x
// the ideal L2 sectors per K/V cp.async (35% L2 hits on data read once) and 85% of DRAM peak
// against cuDNN's 92%. dmattn_cupy/families.py (decode_kv_stride) reads the same define.
// DM_DECODE_PAGED_FAST=0: paged whole tiles through the bounds-tested copy loop. H200 GB/s,
// padded / swizzled / swizzled + paged fast: decode 3983 / 4237 / 4281 (cuDNN 4187-4264 in the
// same processes), paged64 3942 / 3793 / 4070, paged16 3920 / 3782 / 4040.
#ifndef DM_DECODE_LEAN_ISSUE
#define DM_DECODE_LEAN_ISSUE 1
#endif
#ifndef DM_DECODE_STAGES
#define DM_DECODE_STAGES 0
#endif
#ifndef DM_DECODE_MIN_CTAS
#define DM_DECODE_MIN_CTAS 3
#endif
#ifndef DM_DECODE_MIN_CTAS_SMALL
#define DM_DECODE_MIN_CTAS_SMALL 4
#endif
#ifndef DM_DECODE_WARP_LOCAL
#define DM_DECODE_WARP_LOCAL 1
#endif
#ifndef DM_DECODE_SPLIT_KV
#define DM_DECODE_SPLIT_KV 1
#endif
#ifndef DM_DECODE_SWIZZLE
#define DM_DECODE_SWIZZLE 1
#endif
#ifndef DM_DECODE_PAGED_FAST
#define DM_DECODE_PAGED_FAST 1
#endif
constexpr bool kDecodeLeanIssue = DM_DECODE_LEAN_ISSUE != 0;
// K/V pipeline depth of a spec's stages argument: 2..: that depth; 1 (KernelSpec's default):
// the default depth, 2 or DM_DECODE_STAGES. dmattn_cupy/families.py (decode_stages) sizes the
// dynamic smem the same way; decode.py picks 3 where the grid then runs unsplit with long rows.
constexpr int decode_stages(int spec_stages) {
  return spec_stages >= 2 ? spec_stages : DM_DECODE_STAGES > 0 ? DM_DECODE_STAGES : 2;
}
constexpr int kDecodeBtSlots = 8;  // block-table ring, in tiles (>= kStages + 1)
// Staged mask/bias rows of a CTA for a slot mode (dmattn_cupy/decode.py, staged_rows).
DM_DEVICE int decode_slots(int mode, int qpk) { return mode == 0 ? 1 : mode == 1 ? qpk : 16; }
// A staged slot with no row (offsets may be negative: strides may be).
constexpr int64_t kNoRow = -0x7fffffffffffffffll - 1;

// Shared-memory layout of the decode kernel: a Q slab of kBlockM rows padded by 16 bytes, then
// kStages K tiles and kStages V tiles of kBlockN rows, then (kSmemBase on) the block-table ring
// and the staged rows' offsets. K/V rows (DM_DECODE_SWIZZLE=1, head dims of whole 8-chunk
// groups) are unpadded with 16-byte chunk c of row r at chunk c ^ (r & 7): 8 lanes' copies of
// 128 global bytes fill one 128-byte line, and ldmatrix's 8 rows hit 8 distinct bank groups;
// else they are padded by 16 bytes. families.decode_kv_stride / decode_smem mirror this, and
// tests/cpu/test_decode_layout.py checks both against a model.
template <int kHeadDim>
struct DecodeKV {
  static constexpr bool kSwizzle = DM_DECODE_SWIZZLE != 0 && kHeadDim % 64 == 0;
  static constexpr int kQStride = kHeadDim + 8;                     // Q slab row, elements
  static constexpr int kStride = kSwizzle ? kHeadDim : kHeadDim + 8;  // K/V row, elements
  // Element offset of (row r, column col) in a K/V tile; col a multiple of 8.
  static constexpr int at(int r, int col) {
    return kSwizzle ? r * kStride + (col ^ ((r & 7) << 3)) : r * kStride + col;
  }
  // Bytes before the block-table ring, and up to the staged mask/bias rows.
  static constexpr int kv_bytes(int block_m, int block_n, int stages) {
    return (block_m * kQStride + 2 * stages * block_n * kStride) * 2;
  }
  static constexpr int smem_base(int block_m, int block_n, int stages) {
    return kv_bytes(block_m, block_n, stages) + kDecodeBtSlots * 4 * 4 + 2 * 16 * 8;
  }
};

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kNumWarps, bool kHasMask,
          bool kHasBias, bool kVarlen, int kSpecStages>
__global__ void __launch_bounds__(kNumWarps * 32,
                                  kNumWarps > 4           ? 1
                                  : kHeadDim <= 64        ? DM_DECODE_MIN_CTAS_SMALL
                                  : kHeadDim <= 128       ? DM_DECODE_MIN_CTAS
                                                          : 2)
flash_fwd_decode_kernel(const FwdParams p) {
  static_assert(kBlockM == 16, "one m16 slab of packed (query, head) rows per CTA");
  static_assert(kBlockN == 16 * kNumWarps && kBlockN == 64, "each warp owns 16 keys of a tile");
  static_assert(kHeadDim % 16 == 0, "head dim is padded to a multiple of 16");
  constexpr int kThreads = kNumWarps * 32;
  constexpr int kStages = decode_stages(kSpecStages);
  static_assert(kDecodeBtSlots >= kStages + 1, "block-table ring holds the tiles in flight");
  static_assert(kStages >= 2, "one tile in flight while another is computed");
  using Layout = DecodeKV<kHeadDim>;
  constexpr int kQStride = Layout::kQStride;  // Q slab row: +16 bytes, conflict-free ldmatrix
  constexpr int kKVStride = Layout::kStride;
  constexpr int kDF = kHeadDim / 8;      // output fragments per row pair
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  constexpr int kKV = Layout::kv_bytes(kBlockM, kBlockN, kStages);
  constexpr int kSmemBase = Layout::smem_base(kBlockM, kBlockN, kStages);
  constexpr int kOStride = kHeadDim + 4;  // fp32 merge scratch row stride
  static_assert(kNumWarps * kBlockM * (kOStride + 1) * 4 <= 2 * kStages * kBlockN * kKVStride * 2,
                "the warp merge scratch fits in the K/V stages");
  static_assert(kThreads % kBlockN == 0, "a thread stages one key of every tile");
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;
  uint16_t* sK = sQ + kBlockM * kQStride;
  uint16_t* sV = sK + kStages * kBlockN * kKVStride;
  int32_t* sBT = reinterpret_cast<int32_t*>(reinterpret_cast<uint8_t*>(smem) + kKV);
  int64_t* sOff = reinterpret_cast<int64_t*>(sBT + kDecodeBtSlots * 4);  // [2][16]: mask, bias
  uint32_t* sMask = reinterpret_cast<uint32_t*>(sOff + 2 * 16);
  const int qpk = p.q_per_kv;
  const int rm = kHasMask ? decode_slots(p.mask_slot_mode, qpk) : 0;
  const int rb = kHasBias ? decode_slots(p.bias_slot_mode, qpk) : 0;
  uint32_t* sBias = sMask + kStages * rm * kBlockN;
  if (dynamic_smem_size() < uint32_t(kSmemBase + kStages * (rm + rb) * kBlockN * 4))
    __trap();  // launcher and kernel disagree on the layout

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int ns = p.num_splits;
  const int m_block = blockIdx.x / ns, split = blockIdx.x % ns;
  const int kvh = blockIdx.y, b = blockIdx.z;
  SeqInfo seq = seq_info<kVarlen>(p, b);
  if (p.cache_seqlens != nullptr)  // clamped to the capacity: never past the cache
    seq.len_k = dm_max(0, dm_min(p.cache_seqlens[b] + p.seqlen_k_new, p.seqlen_k));
  const bool paged = p.block_table != nullptr;
  const int rows = seq.len_q * qpk;  // packed rows of this (sequence, kv head)
  const int m0 = m_block * kBlockM;
  if (m0 >= rows) return;
  const int i_first = m0 / qpk, i_last = (dm_min(m0 + kBlockM, rows) - 1) / qpk;
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
    cp_async_16(sQ + r * kQStride + col, src, ok);
  }

  // K/V of key 0 (paged: of page 0, row 0; the page term is added per 16-key group).
  const int64_t b_kv = paged ? 0 : b;
  const T* k = static_cast<const T*>(p.k) + b_kv * p.k_batch_stride + kvh * p.k_head_stride +
               int64_t(seq.k_start) * p.k_row_stride;
  const T* v = static_cast<const T*>(p.v) + b_kv * p.v_batch_stride + kvh * p.v_head_stride +
               int64_t(seq.k_start) * p.v_row_stride;

  // Staged mask/bias rows: element offset of (slot, key 0) per slot, kNoRow for a slot with none.
  if (threadIdx.x < 32) {
    const int t = threadIdx.x % 16, which = threadIdx.x / 16;  // 0 mask, 1 bias
    const int mode = which == 0 ? p.mask_slot_mode : p.bias_slot_mode;
    int pr = m0 + t;                           // mode 2: packed row t of the slab
    if (mode == 0) pr = m0;                    // any row: they share one
    if (mode == 1) pr = i_first * qpk + t;     // query head kvh * qpk + t (row stride 0)
    const bool ok = (which == 0 ? kHasMask : kHasBias) && pr < rows &&
                    t < decode_slots(mode, qpk);
    int64_t o = kNoRow;
    if (ok) {
      const int qi = pr / qpk, qh = kvh * qpk + pr % qpk;
      o = which == 0 ? mask_offset(p, int(b_kv), qh, seq) + int64_t(qi) * p.mask_row_stride
                     : bias_offset(p, int(b_kv), qh, seq) + int64_t(qi) * p.bias_row_stride;
    }
    sOff[which * 16 + t] = o;
  }
  __syncthreads();

  // This thread's two rows (g, g + 8 of the slab): query, staged slot, and the byte position of
  // each of its elements in the 32-bit word staged for it (2 bits per (row, fragment, pair)).
  bool row_ok[2];
  int qi[2], slot_m[2] = {0, 0}, slot_b[2] = {0, 0};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int lr = lane / 4 + 8 * r, pr = m0 + lr;
    row_ok[r] = pr < rows;
    qi[r] = row_ok[r] ? pr / qpk : 0;
    const int g = pr % qpk;
    slot_m[r] = p.mask_slot_mode == 0 ? 0 : p.mask_slot_mode == 1 ? g : lr;
    slot_b[r] = p.bias_slot_mode == 0 ? 0 : p.bias_slot_mode == 1 ? g : lr;
  }
  // Key of fragment j, element e within a tile.
  const int col_base = 16 * warp + 2 * (lane % 4);
  auto tile_col = [&](int j, int e) { return col_base + 8 * j + (e & 1); };
  // A tile starts at a key that is a multiple of 64 (and a page row that is a multiple of 16),
  // so an element's byte position in its word is the same in every tile (the launcher checks
  // that page strides are multiples of 4 bytes).
  const int bias_es = p.bias_is_fp32 ? 4 : 2;
  uint32_t shift_m = 0, shift_b = 0;
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e1 = 0; e1 < 2; ++e1) {
        const int idx = r * 4 + j * 2 + e1, tc = tile_col(j, e1);
        if (kHasMask) {
          const int64_t so = sOff[slot_m[r]];
          const int64_t o = (so == kNoRow ? 0 : so) + int64_t(tc) * p.mask_col_stride;
          shift_m |= uint32_t((reinterpret_cast<uint64_t>(p.mask) + uint64_t(o)) & 3) << (2 * idx);
        }
        if (kHasBias) {
          const int64_t so = sOff[16 + slot_b[r]];
          const int64_t o = (so == kNoRow ? 0 : so) + int64_t(tc) * p.bias_col_stride;
          shift_b |= uint32_t((reinterpret_cast<uint64_t>(p.bias) + uint64_t(o) * bias_es) & 3)
                     << (2 * idx);
        }
      }
  uint32_t valid_rows = 0;
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (row_ok[e >> 1]) valid_rows |= 1u << (j * 4 + e);

  // Key tiles of this split: first + u for u in [0, n_my).
  const KeyRange kr = key_range(p, i_first, i_last + 1, seq.len_q, seq.len_k);
  const TileSpan span = tile_span<kBlockN>(kr);
  const int n_tiles = span.last - span.first + 1;
  const int t_first = span.first + int(int64_t(n_tiles) * split / ns);
  const int n_my = span.first + int(int64_t(n_tiles) * (split + 1) / ns) - t_first;

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

  // Lean K/V issue (default; DM_DECODE_LEAN_ISSUE=0: the generic loop): thread t copies the
  // 16-byte chunk lcol of rows lr0 + m * kRowStep of a tile; needs kThreads % kChunks == 0 and kRowStep | 16
  // (d64/d128/d256), else the generic loop below runs.
  constexpr int kRowStep = kThreads % kChunks == 0 ? kThreads / kChunks : 16;
  constexpr bool kLeanIssue = kDecodeLeanIssue && kThreads % kChunks == 0 && 16 % kRowStep == 0;
  const int lr0 = threadIdx.x / kChunks, lcol = (threadIdx.x % kChunks) * 8;
  const bool col_ok = lcol < p.head_dim;
  const T* k_thr = k + int64_t(lr0) * p.k_row_stride + lcol;
  const T* v_thr = v + int64_t(lr0) * p.v_row_stride + lcol;
  const int64_t k_step = int64_t(kRowStep) * p.k_row_stride;
  const int64_t v_step = int64_t(kRowStep) * p.v_row_stride;
  // Warp-local pipeline (DM_DECODE_WARP_LOCAL=1, lean head dims whose row chunks divide a
  // warp): warp w copies only rows 16w..16w+15 of a tile (its keys: the only rows its S and
  // P V read), its keys' mask/bias words and its 16-key group's page id, so a tile needs a
  // __syncwarp instead of a __syncthreads (the Q slab's first wait and the merge keep theirs).
  constexpr bool kWarpLocal = DM_DECODE_WARP_LOCAL != 0 && kLeanIssue && 32 % kChunks == 0;
  constexpr int kRowStepW = kWarpLocal ? 32 / kChunks : 1;  // rows per pass of one warp
  const int wr0 = 16 * warp + lane / kChunks, wcol = (lane % kChunks) * 8;
  const bool wcol_ok = wcol < p.head_dim;
  const T* k_w = k + int64_t(lane / kChunks) * p.k_row_stride + wcol;
  const T* v_w = v + int64_t(lane / kChunks) * p.v_row_stride + wcol;
  // K and V in cp.async groups of their own (DM_DECODE_SPLIT_KV=1, warp-local only): K of
  // tile u + kStages (with its mask/bias words) goes out once S(u) has read K's stage, V's once
  // P V(u) has read V's, so half a tile more is in flight while a tile is computed.
  constexpr bool kSplitKV = kWarpLocal && DM_DECODE_SPLIT_KV != 0;
  constexpr int kPartK = 1, kPartV = 2, kPartKV = 3;  // issue_tile's parts

  // Page ids of tile u's four 16-key groups into ring slot u % kDecodeBtSlots (paged only).
  auto issue_pages = [&](int u) {
    if constexpr (kWarpLocal) {  // lane 0 of warp g: the page of the warp's 16-key group
      if (!paged || lane != 0) return;
      const int n = (t_first + u) * kBlockN + 16 * warp;
      const bool ok = u < n_my && n < seq.len_k;
      const int32_t* src =
          p.block_table + b * p.block_table_batch_stride + (ok ? n / p.page_size : 0);
      cp_async_4(sBT + (u % kDecodeBtSlots) * 4 + warp, src, ok);
      return;
    }
    if (!paged || threadIdx.x >= 4) return;
    const int n = (t_first + u) * kBlockN + 16 * threadIdx.x;
    const bool ok = u < n_my && n < seq.len_k;
    const int32_t* src = p.block_table + b * p.block_table_batch_stride + (ok ? n / p.page_size : 0);
    cp_async_4(sBT + (u % kDecodeBtSlots) * 4 + threadIdx.x, src, ok);
  };
  // K/V rows and mask/bias words of tile u into stage u % kStages; warp-local, only the
  // parts named (kPartK: K rows + mask/bias words, kPartV: V rows); else always both.
  auto issue_tile = [&](int u, int parts) {
    if (u >= n_my) return;
    const int st = u % kStages, n0 = (t_first + u) * kBlockN;
    const int valid = seq.len_k - n0;
    uint16_t* dK = sK + st * kBlockN * kKVStride;
    uint16_t* dV = sV + st * kBlockN * kKVStride;
    if constexpr (kWarpLocal) {
      // This warp's 16 rows (one page group when paged): whole tiles without tests
      // (DM_DECODE_PAGED_FAST=0: whole unpaged tiles only).
      const T* ks = k_w + int64_t(n0 + 16 * warp) * p.k_row_stride;
      const T* vs = v_w + int64_t(n0 + 16 * warp) * p.v_row_stride;
      if (paged) {
        const int64_t page = sBT[(u % kDecodeBtSlots) * 4 + warp];
        const int in_page = (n0 + 16 * warp) % p.page_size;
        ks = k_w + page * p.k_batch_stride + int64_t(in_page) * p.k_row_stride;
        vs = v_w + page * p.v_batch_stride + int64_t(in_page) * p.v_row_stride;
      }
      const int64_t ksw = int64_t(kRowStepW) * p.k_row_stride;
      const int64_t vsw = int64_t(kRowStepW) * p.v_row_stride;
      if ((DM_DECODE_PAGED_FAST || !paged) && valid >= kBlockN && wcol_ok) {
#pragma unroll
        for (int j = 0; j < 16 / kRowStepW; ++j) {
          const int r = wr0 + j * kRowStepW;
          if (parts & kPartK) cp_async_16(dK + Layout::at(r, wcol), ks, true);
          if (parts & kPartV) cp_async_16(dV + Layout::at(r, wcol), vs, true);
          ks += ksw;
          vs += vsw;
        }
      } else {
#pragma unroll
        for (int j = 0; j < 16 / kRowStepW; ++j) {
          const int r = wr0 + j * kRowStepW;
          const bool ok = wcol_ok && r < valid;
          if (parts & kPartK) cp_async_16(dK + Layout::at(r, wcol), ok ? ks : k, ok);
          if (parts & kPartV) cp_async_16(dV + Layout::at(r, wcol), ok ? vs : v, ok);
          ks += ksw;
          vs += vsw;
        }
      }
    } else if (kLeanIssue && !paged && valid >= kBlockN) {
      // A whole unpaged tile: every row in bounds, so no bounds test and no address select.
      if (col_ok) {
        const T* ks = k_thr + int64_t(n0) * p.k_row_stride;
        const T* vs = v_thr + int64_t(n0) * p.v_row_stride;
#pragma unroll
        for (int j = 0; j < kBlockN / kRowStep; ++j) {
          const int r = j * kRowStep + lr0;
          cp_async_16(dK + Layout::at(r, lcol), ks, true);
          cp_async_16(dV + Layout::at(r, lcol), vs, true);
          ks += k_step;
          vs += v_step;
        }
      } else {  // columns past head_dim (a padded dim): zero-filled, never stale (0 * NaN)
#pragma unroll
        for (int j = 0; j < kBlockN / kRowStep; ++j) {
          const int r = j * kRowStep + lr0;
          cp_async_16(dK + Layout::at(r, lcol), k, false);
          cp_async_16(dV + Layout::at(r, lcol), v, false);
        }
      }
    } else if constexpr (kLeanIssue) {
      // Fixed trip counts, per-thread offsets hoisted: pass m copies row lr0 + m * kRowStep;
      // unpaged rows are contiguous in steps, paged ones restart at each 16-key group's page.
      const T* ks = k_thr + int64_t(n0) * p.k_row_stride;
      const T* vs = v_thr + int64_t(n0) * p.v_row_stride;
      int in_page = paged ? n0 % p.page_size : 0;
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        if (paged) {
          const int64_t page = sBT[(u % kDecodeBtSlots) * 4 + g];
          ks = k_thr + page * p.k_batch_stride + int64_t(in_page) * p.k_row_stride;
          vs = v_thr + page * p.v_batch_stride + int64_t(in_page) * p.v_row_stride;
          in_page += 16;
          if (in_page == p.page_size) in_page = 0;
        }
#pragma unroll
        for (int j = 0; j < 16 / kRowStep; ++j) {
          const int r = 16 * g + j * kRowStep + lr0;
          const bool ok = col_ok && r < valid;
          cp_async_16(dK + Layout::at(r, lcol), ok ? ks : k, ok);
          cp_async_16(dV + Layout::at(r, lcol), ok ? vs : v, ok);
          ks += k_step;
          vs += v_step;
        }
      }
    } else {
      // Element offsets of key n0 + 16 g in K and V (paged: its page and row in the page).
      int64_t gk[4], gv[4];
      int in_page = 0;
      if (paged) in_page = n0 % p.page_size;
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        if (paged) {
          const int64_t page = sBT[(u % kDecodeBtSlots) * 4 + g];
          gk[g] = page * p.k_batch_stride + int64_t(in_page) * p.k_row_stride;
          gv[g] = page * p.v_batch_stride + int64_t(in_page) * p.v_row_stride;
          in_page += 16;
          if (in_page == p.page_size) in_page = 0;
        } else {
          gk[g] = int64_t(n0 + 16 * g) * p.k_row_stride;
          gv[g] = int64_t(n0 + 16 * g) * p.v_row_stride;
        }
      }
#pragma unroll
      for (int g = 0; g < 4; ++g)
#pragma unroll
        for (int c = threadIdx.x; c < 16 * kChunks; c += kThreads) {
          const int rr = c / kChunks, col = (c % kChunks) * 8, r = 16 * g + rr;
          const bool ok = r < valid && col < p.head_dim;
          cp_async_16(dK + Layout::at(r, col), ok ? k + gk[g] + rr * p.k_row_stride + col : k, ok);
          cp_async_16(dV + Layout::at(r, col), ok ? v + gv[g] + rr * p.v_row_stride + col : v, ok);
        }
    }
    if ((kHasMask || kHasBias) && (parts & kPartK)) {
      // This thread stages key c of the tile for slots threadIdx.x / 64 + 2 * t (warp-local:
      // key 16 * warp + lane % 16, slots lane / 16 + 2 * t).
      const int c = kWarpLocal ? 16 * warp + lane % 16 : int(threadIdx.x % kBlockN);
      const int slot0 = kWarpLocal ? lane / 16 : int(threadIdx.x / kBlockN);
      const bool key_ok = c < valid;
      int64_t page = 0;
      int key = n0 + c;  // paged: the key's row in its page
      if (paged) {
        page = sBT[(u % kDecodeBtSlots) * 4 + c / 16];
        key = (n0 + (c & ~15)) % p.page_size + (c & 15);
      }
      // Slots threadIdx.x / kBlockN + t * (kThreads / kBlockN): a runtime trip count (mostly 0
      // or 1: key-based layouts stage 1 or q_per_kv rows), not 16 / (kThreads / kBlockN) tests.
#pragma unroll 1
      for (int slot = slot0; slot < dm_max(rm, rb); slot += kThreads / kBlockN) {
        if (kHasMask && slot < rm) {
          const int64_t o = sOff[slot];
          const bool ok = key_ok && o != kNoRow;
          const uint8_t* src = p.mask + (ok ? o + page * p.mask_batch_stride +
                                                  int64_t(key) * p.mask_col_stride : 0);
          cp_async_4(sMask + (st * rm + slot) * kBlockN + c,
                     reinterpret_cast<const void*>(reinterpret_cast<uint64_t>(src) & ~3ull), ok);
        }
        if (kHasBias && slot < rb) {
          const int64_t o = sOff[16 + slot];
          const bool ok = key_ok && o != kNoRow;
          const uint8_t* src = static_cast<const uint8_t*>(p.bias) +
                               (ok ? (o + page * p.bias_batch_stride +
                                      int64_t(key) * p.bias_col_stride) * bias_es : 0);
          cp_async_4(sBias + (st * rb + slot) * kBlockN + c,
                     reinterpret_cast<const void*>(reinterpret_cast<uint64_t>(src) & ~3ull), ok);
        }
      }
    }
  };

  float o[kDF][4];
#pragma unroll
  for (int j = 0; j < kDF; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  OnlineSoftmax<> sm;

  // Prologue: (paged) the page ids of the first kStages tiles, waited for; then tiles
  // 0 .. kStages - 2, each group also carrying the page ids of the tile kStages later.
  if (paged) {
#pragma unroll
    for (int u = 0; u < kStages; ++u) issue_pages(u);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
  }
  // Split K/V: groups K(0) V(0) .. K(kStages - 1) V(kStages - 1), each K group carrying the
  // page ids of the tile kStages later; K(u) and V(u) then each have 2 kStages - 1 groups
  // committed after them when tile u reads them.
#pragma unroll
  for (int s = 0; s < (kSplitKV ? kStages : kStages - 1); ++s) {
    issue_tile(s, kSplitKV ? kPartK : kPartKV);
    issue_pages(s + kStages);
    cp_async_commit();  // the first group also holds the Q slab
    if constexpr (kSplitKV) {
      issue_tile(s, kPartV);
      cp_async_commit();
    }
  }
  for (int u = 0; u < n_my; ++u) {
    if constexpr (kSplitKV) {
      cp_async_wait<2 * kStages - 1>();  // K(u), its mask/bias words
    } else {
      // Tile u + kStages - 1 reuses the stage tile u - 1 left (freed by the last barrier); its
      // page ids came with tile u - 1's group, complete since the last wait.
      issue_tile(u + kStages - 1, kPartKV);
      issue_pages(u + 2 * kStages - 1);
      cp_async_commit();
      cp_async_wait<kStages - 1>();
    }
    if (kWarpLocal && u > 0)
      __syncwarp();
    else
      __syncthreads();  // (warp-local: the Q slab of the first group)

    const int st = u % kStages;
    const uint16_t* sKs = sK + st * kBlockN * kKVStride;
    const uint16_t* sVs = sV + st * kBlockN * kKVStride;
    const uint32_t* sMs = sMask + st * rm * kBlockN;
    const uint32_t* sBs = sBias + st * rb * kBlockN;

    // S = Q K^T: 16 packed rows x this warp's 16 keys.
    float s[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      uint32_t a[4], kb[4];
      ldmatrix_x4(a, sQ + ldsm_a_row(lane) * kQStride + ks * 16 + ldsm_a_col(lane));
      ldmatrix_x4(kb,
                  sKs + Layout::at(16 * warp + ldsm_nk_row(lane), ks * 16 + ldsm_nk_col(lane)));
      mma_16816<T>(s[0], a, kb[0], kb[1]);
      mma_16816<T>(s[1], a, kb[2], kb[3]);
    }
    // Logits in the fused form of logits.cuh (log2 domain): softcap, bias, exclusions.
    const uint32_t bits = bounds_bits(t_first + u);
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1, tc = tile_col(j, e), idx = r * 4 + j * 2 + (e & 1);
        float x = logit_log2(p, s[j][e]);
        bool keep = bits & (1u << (j * 4 + e));
        if (kHasMask) {
          const uint32_t w = sMs[slot_m[r] * kBlockN + tc];
          keep &= ((w >> (8 * ((shift_m >> (2 * idx)) & 3))) & 0xffu) != 0;  // no branch
        }
        if (kHasBias) {
          const uint32_t w = sBs[slot_b[r] * kBlockN + tc];
          float bv;
          if (p.bias_is_fp32) {
            bv = __uint_as_float(w);
          } else {
            T raw;
            raw.bits = uint16_t(w >> (8 * ((shift_b >> (2 * idx)) & 3)));
            bv = to_float(raw);
          }
          x = fmaf(bv, kLog2e, x);
        }
        s[j][e] = keep ? x : -DM_INF;
      }
    if constexpr (kSplitKV) {
      // K's stage and the mask/bias words are read: K(u + kStages) refills them (its page ids
      // came with K(u)'s group), then V(u) is waited for.
      __syncwarp();
      issue_tile(u + kStages, kPartK);
      issue_pages(u + 2 * kStages);
      cp_async_commit();
      cp_async_wait<2 * kStages - 1>();
      __syncwarp();
    }
    float alpha[2];
    sm.update(s, alpha);
    // alpha is exactly 1 for a row whose max did not move: a warp whose written rows all kept
    // theirs skips the multiply (padded rows are never written; a NaN alpha still rescales).
    const bool moved = (row_ok[0] && alpha[0] != 1.f) || (row_ok[1] && alpha[1] != 1.f);
    if (__any_sync(0xffffffffu, moved)) rescale_o(o, alpha);
    // O += P V: P (16 rows x 16 keys) from registers as the A operand.
    uint32_t a[4];
    pack_a_from_c<T>(a, s, 0);
#pragma unroll
    for (int dd = 0; dd < kDF / 2; ++dd) {
      uint32_t vb[4];
      const int vr = 16 * warp + ldsm_kn_row(lane);
      ldmatrix_x4_trans(vb, sVs + Layout::at(vr, dd * 16 + ldsm_kn_col(lane)));
      mma_16816<T>(o[2 * dd], a, vb[0], vb[1]);
      mma_16816<T>(o[2 * dd + 1], a, vb[2], vb[3]);
    }
    if (kSplitKV) {
      __syncwarp();  // V's stage is read: V(u + kStages) refills it
      issue_tile(u + kStages, kPartV);
      cp_async_commit();
    } else if (kWarpLocal)
      __syncwarp();  // this warp's rows of the stage are refilled by its next issue
    else
      __syncthreads();  // this stage is refilled by the next issue
  }
  cp_async_wait<0>();
  __syncthreads();
  // The split combine (a programmatic launch) may start once every CTA is past its key loop:
  // its CTAs then wait in grid_dependency_wait for the partials instead of behind this grid's
  // end and a launch. (A trigger at the kernel's start measured no better: BENCHMARKS.md.)
  grid_dependents_launch();

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
  const int64_t row0 = kVarlen ? int64_t(seq.q_start) : int64_t(b) * p.seqlen_q;
  // The row's merged lse (a NaN warp: NaN) and each warp's weight in it.
  float lw[kNumWarps];
#pragma unroll
  for (int w = 0; w < kNumWarps; ++w) lw[w] = sLse[w * kBlockM + row];
  const float lse2 = merged_lse2(kNumWarps, [&](int w) { return lw[w]; });
#pragma unroll
  for (int w = 0; w < kNumWarps; ++w) lw[w] = lse2 == -DM_INF ? 0.f : fast_exp2(lw[w] - lse2);
  const int i = pr / qpk, h = kvh * qpk + pr % qpk;

  if (ns > 1) {  // this split's partial, merged by fwd_combine.cu or by this grid's last CTA
    if (pr < rows) {
      const int64_t pid = ((row0 + i) * p.heads + h) * ns + split;
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
    }
    if (p.split_counters == nullptr) return;
    // Every thread gets here. Past the count's barriers the K/V stages (sO) and the staged
    // rows' offsets (sOff, read only by the key loop's issues) are free.
    const int64_t group = (int64_t(b) * p.kv_heads + kvh) * (gridDim.x / ns) + m_block;
    if (!last_split_of_group(p.split_counters + group, ns, reinterpret_cast<int*>(sOff)))
      return;
    static_assert(16 * (kMaxCombineSplits + 1) * 4 <= 2 * kStages * kBlockN * kKVStride * 2,
                  "the merge's weights fit in the K/V stages");
    combine_group<T, kHeadDim, kThreads, kVarlen>(p, reinterpret_cast<float*>(sK));
    return;
  }
  if (pr >= rows) return;
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
