// sm90/fwd_decode_ring.cu: the decode forward (sm80/fwd_decode.cu's GQA packing, split-KV
// partials, KV cache, every mask/bias layout) as a persistent, warp-specialized kernel for
// compute capability 9.0 (dmattn_cupy/decode.py chooses it: DMATTN_DECODE_RING).
// Roles: warps 0..kNumWarps-1 consume, warp kNumWarps produces. Consumer warp w belongs to
// group w / 4 and owns keys 16 (w % 4)..+15 of each 64-key tile its group computes; groups
// take the CTA's tiles in turn (tile T -> group T % kGroups), each warp with its own online
// softmax, merged per item through shared memory.
// Work items are the old kernel's CTAs: item = ((b * kv_heads + kvh) * m_blocks + m_block) *
// num_splits + split; CTA c takes items c, c + gridDim.x, ... and its tiles run through one
// ring of `stages` stages (stages = what the launch's dynamic shared memory holds, see
// ring_layout), so loads of the next item start while the consumers finish this one.
// Producer, per tile T (stage T % stages): waits the stage's empty barrier, then lane 0
// loads K and V as TMA boxes (RingArgs' tensor maps, dmattn_cupy/ring_maps.py: one box of
// 64 rows per part, or for a paged pool 64 / box_rows boxes, one per page run; complete_tx
// on the stage's full barrier), and the lanes load the tile's mask/bias words by 4-byte
// cp.async (zero-filled past the end) whose completion arrives on the same barrier
// (cp.async.mbarrier.arrive.noinc: 32 arrivals + lane 0's expect_tx = 33). A box writes the
// stage's padded rows itself: its columns past head_dim are out of the map, so TMA writes
// zeros there. Rows past the sequence end hold whatever the box read (zeros past the tensor,
// else the cache's stale rows or the next sequence; paged boxes wholly past the end are not
// loaded: old stage data): the consumers zero those V rows (P = 0 there, but 0 x NaN != 0).
// Requires (decode.ring_stages): head_dim % 8 == 0 and K/V maps that TMA can encode.
// Why boxes: one-row bulk copies took a 32-iteration ELECT loop per instruction (UBLKCP
// takes uniform registers), 128 per tile, serial in one warp: ~6x below the copy bandwidth.
#pragma once
#include "../common.cuh"
#include "../params.cuh"
#include "../sm80/mma.cuh"
#include "../seqlen.cuh"
#include "../block_info.cuh"
#include "../mask_bias.cuh"
#include "../logits.cuh"
#include "../softmax.cuh"
#include "primitives.cuh"

namespace dm {

constexpr int kRingMaxStages = 8;  // barrier slots; the host launches 2..kRingMaxStages stages
constexpr int64_t kRingNoRow = -0x7fffffffffffffffll - 1;  // a staged slot with no row
// Staged mask/bias rows per slot mode (decode.staged_rows).
DM_DEVICE int ring_slots(int mode, int qpk) { return mode == 0 ? 1 : mode == 1 ? qpk : 16; }

// Shared-memory layout in bytes (decode.ring_smem mirrors it; tests/cpu checks the model):
// Q x2 | O merge (16 x (D + 4) fp32) | warp lse (kNumWarps x 16 fp32) | slot offsets
// (2 x 16 int64) | full[8], empty[8] mbarriers | stages x (K | V | mask words | bias words).
// A K or V tile is kParts blocks (columns part * kPartCols..) of 64 rows x kPartStride
// elements: one TMA box per block (a box row holds at most 256 elements, so d256 takes two
// halves); kPartStride * 2 bytes is an odd multiple of 16 (conflict-free ldmatrix).
template <int kHeadDim, int kNumWarps>
struct RingLayout {
  static constexpr int kStride = kHeadDim + 8;  // elements per staged Q row (+16 B: ldmatrix)
  static constexpr int kParts = kHeadDim + 8 <= 256 ? 1 : 2;  // families.ring_parts
  static constexpr int kPartCols = kHeadDim / kParts;
  static constexpr int kPartStride = kPartCols + 8;  // elements per staged K/V row of a part
  static constexpr int kPartElems = 64 * kPartStride;
  static constexpr int kTileBytes = kParts * kPartElems * 2;
  static_assert(kPartCols % 16 == 0 && (kPartStride / 8) % 2 == 1 && kTileBytes % 128 == 0,
                "16-column ldmatrix steps stay in a part; odd 16-byte row stride; boxes "
                "128-byte aligned");
  // Element offset of (row, col) in a staged K/V tile.
  DM_DEVICE static int kv(int row, int col) {
    if constexpr (kParts == 1) return row * kPartStride + col;
    return (col / kPartCols) * kPartElems + row * kPartStride + col % kPartCols;
  }
  static constexpr int kQ = 0;
  static constexpr int kO = kQ + 2 * 16 * kStride * 2;
  static constexpr int kLse = kO + 16 * (kHeadDim + 4) * 4;
  static constexpr int kOff = kLse + kNumWarps * 16 * 4;
  static constexpr int kBars = kOff + 2 * 16 * 8;
  static constexpr int kRing = (kBars + 2 * kRingMaxStages * 8 + 127) / 128 * 128;
  static_assert(kO % 16 == 0 && kOff % 8 == 0 && kBars % 8 == 0 && kTileBytes % 16 == 0,
                "aligned regions (stages: 2 tiles + 256-byte multiples of words)");
  DM_DEVICE static int stage_bytes(int words) { return 2 * kTileBytes + words * 4; }
};

// The kernel's second parameter (const __grid_constant__), built by ring_maps.build_args:
// tensor maps over K and V (dim 0 = head_dim, box (kPartCols + 8, box_rows, 1, 1)) and the
// box rows (64; paged: gcd(page_size, 64)).
struct alignas(64) RingArgs {
  sm90::TmaDesc k, v;
  int32_t box_rows;
  int32_t pad[15];
};
static_assert(sizeof(RingArgs) == 320, "RingArgs: size drifted from ring_maps.ARGS_DTYPE");

// One work item of the CTA, as both roles derive it.
struct RingItem {
  int b, kvh, m0, rows, t_first, n_my, i_first, i_last;
  SeqInfo seq;
};

template <int kBlockN, bool kVarlen>
DM_DEVICE bool ring_item(const FwdParams& p, int item, int m_blocks, RingItem& it) {
  const int ns = p.num_splits, qpk = p.q_per_kv;
  const int split = item % ns;
  const int m_block = (item / ns) % m_blocks;
  const int bh = item / (ns * m_blocks);
  it.kvh = bh % p.kv_heads;
  it.b = bh / p.kv_heads;
  it.seq = seq_info<kVarlen>(p, it.b);
  if (p.cache_seqlens != nullptr)  // clamped to the capacity: never past the cache
    it.seq.len_k = dm_max(0, dm_min(p.cache_seqlens[it.b] + p.seqlen_k_new, p.seqlen_k));
  it.rows = it.seq.len_q * qpk;
  it.m0 = m_block * 16;
  if (it.m0 >= it.rows) return false;
  it.i_first = it.m0 / qpk;
  it.i_last = (dm_min(it.m0 + 16, it.rows) - 1) / qpk;
  const KeyRange kr = key_range(p, it.i_first, it.i_last + 1, it.seq.len_q, it.seq.len_k);
  const TileSpan span = tile_span<kBlockN>(kr);
  const int n_tiles = span.last - span.first + 1;
  it.t_first = span.first + int(int64_t(n_tiles) * split / ns);
  it.n_my = span.first + int(int64_t(n_tiles) * (split + 1) / ns) - it.t_first;
  return true;
}

// Element offset of (staged slot t, key 0) of the mask (which 0) or bias (1), or kRingNoRow.
DM_DEVICE int64_t ring_slot_offset(const FwdParams& p, int which, int t, const RingItem& it,
                                   int b_kv) {
  const int qpk = p.q_per_kv;
  const int mode = which == 0 ? p.mask_slot_mode : p.bias_slot_mode;
  int pr = it.m0 + t;                          // mode 2: packed row t of the slab
  if (mode == 0) pr = it.m0;                   // any row: they share one
  if (mode == 1) pr = it.i_first * qpk + t;    // query head kvh * qpk + t (row stride 0)
  if (pr >= it.rows || t >= ring_slots(mode, qpk)) return kRingNoRow;
  const int qi = pr / qpk, qh = it.kvh * qpk + pr % qpk;
  return which == 0 ? mask_offset(p, b_kv, qh, it.seq) + int64_t(qi) * p.mask_row_stride
                    : bias_offset(p, b_kv, qh, it.seq) + int64_t(qi) * p.bias_row_stride;
}

// An arrival on `bar` once all of this thread's earlier cp.async copies have landed (counted
// in the barrier's expected arrivals: .noinc).
DM_DEVICE void cp_async_arrive_noinc(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}

template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kNumWarps, bool kHasMask,
          bool kHasBias, bool kVarlen>
__global__ void __launch_bounds__(kNumWarps * 32 + 32, 1)
flash_fwd_decode_ring_kernel(const FwdParams p, const __grid_constant__ RingArgs args) {
  static_assert(kBlockM == 16, "one m16 slab of packed (query, head) rows per item");
  static_assert(kBlockN == 64 && kNumWarps % 4 == 0, "a group of 4 warps x 16 keys per tile");
  static_assert(kHeadDim % 16 == 0, "head dim is padded to a multiple of 16");
  using L = RingLayout<kHeadDim, kNumWarps>;
  constexpr int kGroups = kNumWarps / 4;
  constexpr int kConsumers = kNumWarps * 32;
  constexpr int kStride = L::kStride;
  constexpr int kDF = kHeadDim / 8;      // output fragments per row pair
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  constexpr int kOStride = kHeadDim + 4;
  extern __shared__ __align__(128) uint8_t smem[];
  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem + L::kQ);
  float* sO = reinterpret_cast<float*>(smem + L::kO);
  float* sLse = reinterpret_cast<float*>(smem + L::kLse);
  int64_t* sOff = reinterpret_cast<int64_t*>(smem + L::kOff);
  const uint32_t bars = sm90::smem_u32(smem + L::kBars);  // full[s] at +8s, empty[s] at +64+8s
  uint8_t* ring = smem + L::kRing;

  const int qpk = p.q_per_kv;
  const int rm = kHasMask ? ring_slots(p.mask_slot_mode, qpk) : 0;
  const int rb = kHasBias ? ring_slots(p.bias_slot_mode, qpk) : 0;
  const int stage_bytes = L::stage_bytes((rm + rb) * kBlockN);
  const int stages = int((dynamic_smem_size() - uint32_t(L::kRing)) / uint32_t(stage_bytes));
  if (stages < 2 || stages > kRingMaxStages) __trap();  // launcher and kernel disagree
  if (sm90::smem_u32(ring) % 128) __trap();               // TMA box destinations: 128 B

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool paged = p.block_table != nullptr;
  const int m_blocks = dm_max(1, (p.seqlen_q * qpk + kBlockM - 1) / kBlockM);
  const int n_items = m_blocks * p.num_splits * p.kv_heads * p.batch;
  constexpr bool kStaged = kHasMask || kHasBias;
  auto full_bar = [&](int s) { return bars + 8 * s; };
  auto empty_bar = [&](int s) { return bars + 8 * kRingMaxStages + 8 * s; };

  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      sm90::mbar_init(full_bar(s), kStaged ? 33 : 1);
      sm90::mbar_init(empty_bar(s), 4);  // the 4 warps of the group that computed it
    }
    sm90::mbar_init_fence();
  }
  // Pad columns (head_dim..kHeadDim) of Q and of every K/V row are never copied: zero them
  // once (K pad x Q pad must be 0, not NaN), before any bulk copy writes the ring.
  {
    const int n16 = (L::kRing + stages * stage_bytes) / 16;
    for (int i = threadIdx.x; i < n16; i += blockDim.x)
      if (i * 16 < L::kO || i * 16 >= L::kRing)
        reinterpret_cast<uint4*>(smem)[i] = make_uint4(0, 0, 0, 0);
    sm90::fence_proxy_async_smem();
  }
  __syncthreads();

  if (warp == kNumWarps) {
    // ------------------------------- producer ----------------------------------------------
    const int R = args.box_rows;  // rows per box: 64, paged gcd(page_size, 64)
    if (R < 16 || kBlockN % R || (paged ? p.page_size % R : R != kBlockN)) __trap();
    constexpr int kRowBytes = L::kPartStride * 2;
    if (lane == 0) {
      sm90::tma_prefetch(&args.k);
      sm90::tma_prefetch(&args.v);
    }
    int stage = 0, phase = 0;
    for (int item = blockIdx.x; item < n_items; item += gridDim.x) {
      RingItem it;
      if (!ring_item<kBlockN, kVarlen>(p, item, m_blocks, it)) continue;
      const int64_t b_kv = paged ? 0 : it.b;
      if (kStaged) {
        __syncwarp();  // the previous item's tiles have read sOff
        const int which = lane / 16, t = lane % 16;
        const bool has = which == 0 ? kHasMask : kHasBias;
        sOff[lane] = has ? ring_slot_offset(p, which, t, it, int(b_kv)) : kRingNoRow;
        __syncwarp();
      }
      for (int u = 0; u < it.n_my; ++u) {
        const int n0 = (it.t_first + u) * kBlockN;
        const int valid = dm_min(kBlockN, it.seq.len_k - n0);
        // This lane's mask/bias keys l and l + 32 (past the end: the last key) and pages.
        int page[2], key[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int n = n0 + dm_min(lane + 32 * h, valid - 1);
          page[h] = 0;
          key[h] = n;
          if (paged) {
            page[h] = p.block_table[it.b * p.block_table_batch_stride + n / p.page_size];
            key[h] = n % p.page_size;
          }
        }
        // Boxes: one of 64 rows at key n0, or (paged) one per R keys up to the end, box i in
        // the page of key n0 + i R (lane (i R) % 32's page[(i R) / 32]; i R <= valid - 1).
        const int nbox = paged ? (valid + R - 1) / R : 1;
        int box_outer[kBlockN / 16], box_row[kBlockN / 16];
#pragma unroll
        for (int i = 0; i < kBlockN / 16; ++i) {
          const int r0 = dm_min(i * R, kBlockN - 1);
          const int pg = __shfl_sync(0xffffffffu, r0 < 32 ? page[0] : page[1], r0 % 32);
          box_outer[i] = paged ? pg : kVarlen ? 0 : it.b;
          box_row[i] = paged ? (n0 + i * R) % p.page_size : it.seq.k_start + n0;
        }
        sm90::mbar_wait(empty_bar(stage), phase ^ 1);
        uint8_t* st = ring + stage * stage_bytes;
        const uint32_t full = full_bar(stage);
        if (lane == 0) {
          const uint32_t dst = sm90::smem_u32(st);
          sm90::mbar_arrive_expect_tx(full, uint32_t(2 * L::kParts * nbox * R * kRowBytes));
#pragma unroll
          for (int i = 0; i < kBlockN / 16; ++i) {
            if (i < nbox) {
#pragma unroll
              for (int part = 0; part < L::kParts; ++part) {
                const uint32_t at = dst + uint32_t(part * L::kPartElems * 2 + i * R * kRowBytes);
                sm90::tma_load_4d(at, &args.k, full, part * L::kPartCols, box_row[i], it.kvh,
                                  box_outer[i]);
                sm90::tma_load_4d(at + L::kTileBytes, &args.v, full, part * L::kPartCols,
                                  box_row[i], it.kvh, box_outer[i]);
              }
            }
          }
        }
        __syncwarp();
        if (kStaged) {
          uint32_t* sM = reinterpret_cast<uint32_t*>(st + 2 * L::kTileBytes);
          uint32_t* sB = sM + rm * kBlockN;
          // Per staged row s (a runtime count: mode 0 stages one): this lane's keys l, l + 32
          // of a key-based operand (element size es) as 4-byte words from offsets[s].
          auto stage_words = [&](uint32_t* dst, const uint8_t* base, int64_t batch_stride,
                                 int64_t col_stride, int rows, const int64_t* offsets, int es) {
            int64_t col[2];
#pragma unroll
            for (int h = 0; h < 2; ++h)
              col[h] = int64_t(page[h]) * batch_stride + int64_t(key[h]) * col_stride;
#pragma unroll 1
            for (int s = 0; s < rows; ++s) {
              const int64_t o = offsets[s];
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const bool ok = lane + 32 * h < valid && o != kRingNoRow;
                const uint8_t* src = base + (ok ? (o + col[h]) * es : 0);
                cp_async_4(dst + s * kBlockN + lane + 32 * h,
                           reinterpret_cast<const void*>(reinterpret_cast<uint64_t>(src) & ~3ull),
                           ok);
              }
            }
          };
          if (kHasMask)
            stage_words(sM, p.mask, p.mask_batch_stride, p.mask_col_stride, rm, sOff, 1);
          if (kHasBias)
            stage_words(sB, static_cast<const uint8_t*>(p.bias), p.bias_batch_stride,
                        p.bias_col_stride, rb, sOff + 16, p.bias_is_fp32 ? 4 : 2);
          cp_async_arrive_noinc(full);
        }
        if (++stage == stages) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
    return;  // the consumers' last waits need nothing more from this warp
  }

  // --------------------------------- consumers ---------------------------------------------
  const int grp = warp / 4, kw = warp % 4;
  const int col_base = 16 * kw + 2 * (lane % 4);
  auto tile_col = [&](int j, int e) { return col_base + 8 * j + (e & 1); };
  const int bias_es = p.bias_is_fp32 ? 4 : 2;

  // Q slab of an item into buffer `buf` (rows past the sequence are zero-filled): one group.
  auto load_q = [&](const RingItem& it, int buf) {
    const T* q = q_row_ptr<T>(p, it.b, 0, it.seq, 0);
    uint16_t* dq = sQ + buf * 16 * kStride;
    for (int c = threadIdx.x; c < kBlockM * kChunks; c += kConsumers) {
      const int r = c / kChunks, col = (c % kChunks) * 8, pr = it.m0 + r;
      const bool ok = pr < it.rows && col < p.head_dim;
      const T* src = q;
      if (ok)
        src = q + int64_t(pr / qpk) * p.q_row_stride +
              int64_t(it.kvh * qpk + pr % qpk) * p.q_head_stride + col;
      cp_async_16(dq + r * kStride + col, src, ok);
    }
    cp_async_commit();
  };
  // The first item of this CTA at or after `item` that has rows (n_items: none).
  auto next_item = [&](int item, RingItem& it) {
    for (; item < n_items; item += gridDim.x)
      if (ring_item<kBlockN, kVarlen>(p, item, m_blocks, it)) return item;
    return n_items;
  };

  int stage = 0, phase = 0, T_ = 0, buf = 0;
  RingItem it;
  int item = next_item(blockIdx.x, it);
  if (item < n_items) load_q(it, 0);
  while (item < n_items) {
    RingItem nit;
    const int nitem = next_item(item + gridDim.x, nit);
    cp_async_wait<0>();
    sm90::named_bar_sync(1, kConsumers);  // Q landed for every consumer; last epilogue done
    const uint16_t* sQb = sQ + buf * 16 * kStride;
    const int b_kv = paged ? 0 : it.b;
    const int off = it.seq.len_k - it.seq.len_q;

    // This thread's rows (g, g + 8 of the slab): query, staged slot, byte position in the
    // staged word of each element (2 bits per (row, fragment, pair)).
    bool row_ok[2];
    int qi[2], slot_m[2] = {0, 0}, slot_b[2] = {0, 0};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int lr = lane / 4 + 8 * r, pr = it.m0 + lr;
      row_ok[r] = pr < it.rows;
      qi[r] = row_ok[r] ? pr / qpk : 0;
      const int g = pr % qpk;
      slot_m[r] = p.mask_slot_mode == 0 ? 0 : p.mask_slot_mode == 1 ? g : lr;
      slot_b[r] = p.bias_slot_mode == 0 ? 0 : p.bias_slot_mode == 1 ? g : lr;
    }
    uint32_t shift_m = 0, shift_b = 0;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      int64_t so_m = 0, so_b = 0;
      if (kHasMask) {
        so_m = ring_slot_offset(p, 0, slot_m[r], it, b_kv);
        if (so_m == kRingNoRow) so_m = 0;
      }
      if (kHasBias) {
        so_b = ring_slot_offset(p, 1, slot_b[r], it, b_kv);
        if (so_b == kRingNoRow) so_b = 0;
      }
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e1 = 0; e1 < 2; ++e1) {
          const int idx = r * 4 + j * 2 + e1, tc = tile_col(j, e1);
          if (kHasMask) {
            const int64_t o = so_m + int64_t(tc) * p.mask_col_stride;
            shift_m |= uint32_t((reinterpret_cast<uint64_t>(p.mask) + uint64_t(o)) & 3)
                       << (2 * idx);
          }
          if (kHasBias) {
            const int64_t o = so_b + int64_t(tc) * p.bias_col_stride;
            shift_b |= uint32_t((reinterpret_cast<uint64_t>(p.bias) + uint64_t(o) * bias_es) & 3)
                       << (2 * idx);
          }
        }
    }
    uint32_t valid_rows = 0;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (row_ok[e >> 1]) valid_rows |= 1u << (j * 4 + e);
    auto bounds_bits = [&](int nb) -> uint32_t {
      const int n0 = nb * kBlockN;
      if (visited_tile_class(p, it.i_first, it.i_last, n0, n0 + kBlockN - 1, it.seq.len_k,
                             off) == kTileFull)
        return valid_rows;
      uint32_t bits = 0;
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1, col = n0 + tile_col(j, e);
          if (row_ok[r] && col < it.seq.len_k && in_window(p, qi[r], col, off))
            bits |= 1u << (j * 4 + e);
        }
      return bits;
    };

    float o[kDF][4];
#pragma unroll
    for (int j = 0; j < kDF; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    OnlineSoftmax<> sm;
    for (int u = 0; u < it.n_my; ++u, ++T_) {
      if (T_ % kGroups == grp) {
        sm90::mbar_wait(full_bar(stage), phase);
        uint8_t* st = ring + stage * stage_bytes;
        const uint16_t* sKs = reinterpret_cast<const uint16_t*>(st);
        const uint16_t* sVs = reinterpret_cast<const uint16_t*>(st + L::kTileBytes);
        const int valid = it.seq.len_k - (it.t_first + u) * kBlockN;
        if (valid < 16 * kw + 16) {
          // This warp's V rows past the sequence end hold what the box read there (or an
          // older tile): zero them (P = 0 there; 0 x NaN would not be), then order these
          // generic writes before the TMA that refills the stage (async proxy).
          uint16_t* sVw = reinterpret_cast<uint16_t*>(st + L::kTileBytes);
          for (int c = lane; c < 16 * kChunks; c += 32) {
            const int r = 16 * kw + c / kChunks;
            if (r >= valid)
              *reinterpret_cast<uint4*>(sVw + L::kv(r, (c % kChunks) * 8)) =
                  make_uint4(0, 0, 0, 0);
          }
          sm90::fence_proxy_async_smem();
          __syncwarp();
        }
        const uint32_t* sMs = reinterpret_cast<const uint32_t*>(st + 2 * L::kTileBytes);
        const uint32_t* sBs = sMs + rm * kBlockN;
        float s[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < kHeadDim / 16; ++ks) {
          uint32_t a[4], kb[4];
          ldmatrix_x4(a, sQb + ldsm_a_row(lane) * kStride + ks * 16 + ldsm_a_col(lane));
          ldmatrix_x4(kb, sKs + L::kv(16 * kw + ldsm_nk_row(lane), ks * 16 + ldsm_nk_col(lane)));
          mma_16816<T>(s[0], a, kb[0], kb[1]);
          mma_16816<T>(s[1], a, kb[2], kb[3]);
        }
        const uint32_t bits = bounds_bits(it.t_first + u);
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >> 1, tc = tile_col(j, e), idx = r * 4 + j * 2 + (e & 1);
            float x = logit_log2(p, s[j][e]);
            bool keep = bits & (1u << (j * 4 + e));
            if (kHasMask) {
              const uint32_t w = sMs[slot_m[r] * kBlockN + tc];
              keep = keep && ((w >> (8 * ((shift_m >> (2 * idx)) & 3))) & 0xffu) != 0;
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
        float alpha[2];
        sm.update(s, alpha);
        rescale_o(o, alpha);
        uint32_t a[4];
        pack_a_from_c<T>(a, s, 0);
#pragma unroll
        for (int dd = 0; dd < kDF / 2; ++dd) {
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, sVs + L::kv(16 * kw + ldsm_kn_row(lane),
                                            dd * 16 + ldsm_kn_col(lane)));
          mma_16816<T>(o[2 * dd], a, vb[0], vb[1]);
          mma_16816<T>(o[2 * dd + 1], a, vb[2], vb[3]);
        }
        __syncwarp();
        if (lane == 0) sm90::mbar_arrive(empty_bar(stage));  // this warp is done with it
      }
      if (++stage == stages) {
        stage = 0;
        phase ^= 1;
      }
    }
    if (nitem < n_items) load_q(nit, buf ^ 1);  // lands while this item is merged

    // Merge the warps in warp order (the old kernel's sum order): lse exchange, then warp w
    // adds its weighted, normalized rows into sO, one warp per turn.
    float inv_l[2], warp_lse2[2];
    sm.finalize(inv_l, warp_lse2);
    if (lane % 4 == 0) {
      sLse[warp * 16 + lane / 4] = warp_lse2[0];
      sLse[warp * 16 + lane / 4 + 8] = warp_lse2[1];
    }
    sm90::named_bar_sync(1, kConsumers);
    auto row_lse2 = [&](int row) {
      float mx = -DM_INF;
#pragma unroll
      for (int w = 0; w < kNumWarps; ++w) mx = fmax_nan(mx, sLse[w * 16 + row]);
      float lse2 = -DM_INF;
      if (mx != -DM_INF) {
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < kNumWarps; ++w) sum += fast_exp2(sLse[w * 16 + row] - mx);
        lse2 = mx + __log2f(sum);
      }
      return lse2;
    };
    float lw[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = lane / 4 + 8 * r;
      const float lse2 = row_lse2(row);
      lw[r] = lse2 == -DM_INF ? 0.f : fast_exp2(sLse[warp * 16 + row] - lse2);
    }
    for (int w = 0; w < kNumWarps; ++w) {
      if (warp == w) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float* dst = sO + (lane / 4 + 8 * r) * kOStride + 2 * (lane % 4);
#pragma unroll
          for (int j = 0; j < kDF; ++j) {
            float2 add = make_float2(lw[r] * normalize_out(o[j][2 * r], inv_l[r]),
                                     lw[r] * normalize_out(o[j][2 * r + 1], inv_l[r]));
            float2* d2 = reinterpret_cast<float2*>(dst + 8 * j);
            if (w > 0) {
              const float2 prev = *d2;
              add.x += prev.x;
              add.y += prev.y;
            }
            *d2 = add;
          }
        }
      }
      sm90::named_bar_sync(1, kConsumers);
    }

    // Thread -> (row, column chunk) of the merged slab.
    constexpr int kPerRow = kConsumers / kBlockM;
    constexpr int kCols = kHeadDim / kPerRow;
    static_assert(kConsumers % kBlockM == 0 && kHeadDim % (2 * kPerRow) == 0, "merge tiling");
    const int row = threadIdx.x / kPerRow, c0 = (threadIdx.x % kPerRow) * kCols;
    const int pr = it.m0 + row;
    if (pr < it.rows) {
      const float lse2 = row_lse2(row);
      const int i = pr / qpk, h = it.kvh * qpk + pr % qpk;
      const int64_t grow =
          kVarlen ? int64_t(it.seq.q_start) + i : int64_t(it.b) * p.seqlen_q + i;
      const float* src = sO + row * kOStride;
      if (p.num_splits > 1) {  // partial for fwd_combine.cu
        const int64_t pid = (grow * p.heads + h) * p.num_splits + (item % p.num_splits);
        float* dst = p.o_accum + pid * kHeadDim;
#pragma unroll
        for (int c = 0; c < kCols; c += 2) {
          const int col = c0 + c;
          if (col < p.head_dim)
            *reinterpret_cast<float2*>(dst + col) = *reinterpret_cast<const float2*>(src + col);
        }
        if (c0 == 0) p.lse_accum[pid] = lse2;
      } else {
        T* out = o_row_ptr<T>(p, it.b, h, it.seq, i);
#pragma unroll
        for (int c = 0; c < kCols; c += 2) {
          const int col = c0 + c;
          if (col < p.head_dim)
            *reinterpret_cast<uint32_t*>(out + col) = pack2<T>(src[col], src[col + 1]);
        }
        if (p.lse != nullptr && c0 == 0)
          p.lse[lse_index(p, it.b, h, it.seq, i)] = lse_natural(lse2);
      }
    }
    item = nitem;
    it = nit;
    buf ^= 1;
  }
}

}  // namespace dm
