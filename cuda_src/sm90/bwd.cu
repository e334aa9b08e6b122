// sm90/bwd.cu: the Hopper backward's dK/dV/dQ kernel (FlashAttention-3's structure, sm_90a),
// fixed-length batches, head dims 64/128 (smaller ones padded), causal/window, softcap,
// GQA/MQA, a bias of shape (B, H, Sq, Sk) or (B, H, 1, Sk) with its gradient, a dense bool
// mask of any broadcast (kHasMask), block lists of full blocks (BwdParams::sp_grid set: a
// runtime field, no template switch; see "Block lists" below) and a deterministic mode
// (Sm90BwdArgs::dq_sem set), and lists with partial blocks without a mask (kListedBits: a
// MixedMask's element bits). Everything else (varlen, partial blocks beside a mask, other
// bias shapes) runs the sm80-class backward (dmattn_cupy/backward_sm90.py declines it).
//
// A CTA of three warpgroups owns kBlockN = 128 keys of one (batch, kv head) and walks the
// (query head of the group, query tile of kBlockM = 64 rows) items that can see its keys, so
// dK and dV accumulate in registers over the whole GQA group (no atomics):
// - warpgroup 0 is the producer: warp 0 loads K and V once, then per item Q, dO and the bias
//   tile by TMA into a 2-stage mbarrier ring; warp 1 writes the item's lse (log2 units; +inf
//   for rows past the end or rows that kept nothing, so that P = 0 there) and dsum rows into
//   the same stage and arrives on its barrier (33 arrivals: the TMA leader + 32 lanes);
//   with a mask (kHasMask), warps 2 and 3 read the item's 64 x 128 mask bytes from global
//   memory (rows 32w'.., one row per lane, 16 bytes per load where the layout allows, else
//   byte by byte through the mask's strides, so every broadcast works) and transpose them by
//   ballots into one 64-bit query word per key (bit q: row m0 + q kept; rows and keys past the
//   ends read false) plus per-warp "all kept" / "some kept" flags, and arrive with their 64
//   lanes too (Q/dO/bias are loaded regardless: the mask is read alongside, not before);
// - warpgroups 1 and 2 are consumers, 64 keys each (rows 64c.. of K and V):
//     S^T = K Q^T and dP^T = V dO^T  (wgmma, both operands K-major from shared memory),
//     P^T = exp2(x - lse) (while dP^T runs, without a softcap), dS^T = P^T (dP^T - dsum)
//     (* dz/ds) in registers; an element the mask drops gets P = 0 (hence dS = 0 and a zero
//     dbias); a tile whose mask words are all true (both flags) takes the unmasked path
//     unless a sequence end or window edge crosses it, and one the mask drops entirely is
//     released at once (no products; its deterministic turn is still taken),
//     dV += P^T dO and dK += dS^T Q  (wgmma, A from registers, dO/Q MN-major: tnspB),
//     dS^T is stored to shared memory as [key][query] (both consumers' halves: the M-major A
//     of dQ, tnspA), then dQ (64 queries x 64 columns of box c) += dS K over all 128 keys
//     (K box c as the MN-major B): consumer c owns head-dim box c (at d64 consumer 1 has none),
//     so the CTA forms each dQ element once per item. Each warp stages its 16 rows x 64
//     columns in fp32 (rows padded to 288 bytes: conflict-free float2 stores) and lane 0 adds
//     them into bp.dq_accum with one cp.reduce.async.bulk .add.f32 per row (no per-element
//     atomics). DM_SM90_BWD_DQ_ATOMIC=1 (DMATTN_NVRTC_DEFINES) keeps phase 1's dQ for an A/B:
//     each consumer adds a partial over its own 64 keys with red.global.add.v2.f32 (and
//     phase 1's per-element dbias stores).
// dQ writer (DM_SM90_BWD_DQ_WRITER=2, the default; FlashAttention-3's split): the
// consumers never wait on global memory. Producer warp 1 is the writer (warp 0 then loads:
// lane 0 the TMA, every lane two lse/dsum rows; warps 2-3 keep the mask; without a mask warp 2
// is a second writer: DM_SM90_BWD_DQ_WRITERS, DM_SM90_BWD_DQ_SHARED_SLOT). The dQ warps store
// their fragments into slot j % kDqSlots (j: the item's position in the walk) of a ring of
// whole 64-row tiles (both consumers' boxes side by side, rows (kHeadDim + 8) x 4 bytes apart: conflict-free float2 stores, each row contiguous) once the
// slot's empty mbarrier says the writer's adds have read its last tile, and arrive on its full
// mbarrier (one arrival per dQ warp; consumer 0's warp 0 also writes the slot's "nothing to
// add" word, set for a tile the mask drops entirely, which still passes the ring). The writer
// waits for full, takes the deterministic turn, adds the tile (one bulk tensor reduce), waits
// for the adds to read the slot and arrives on empty; two slots, one at d128 with a bias tile
// (shared memory).
// A/B switch (default off): DM_SM90_BWD_DQ_SLOTS=1 gives the ring one slot everywhere.
// Deterministic mode (args.dq_sem: zeroed int32 words, [0] a CTA ticket, then one counter per
// (batch, head, query tile)): a CTA takes its linear position from the ticket (atomicAdd), not
// from blockIdx, so every position below it belongs to a CTA that is running or done. Key tile
// n adds its dQ partial of query tile m after the (listed) key tiles n_lo(m) .. n - 1 did: each dQ
// warp's lane 0 waits for the counter to reach (n - n_lo) * kDqWarps, adds, waits for its bulk
// adds to complete, and increments it (with the writer: the writer alone, per item, to
// (n - n_lo) * 1, the consumers only feeding its ring; a dropped tile's turn is still waited
// for before its +1, or that +1 could stand in for an earlier tile's). The key tiles that
// visit query tile m are exactly n_lo .. n_hi with n_lo = key_range(m's rows).k_begin /
// kBlockN (query_range and key_range are transposes and both bounds move monotonically with
// the tile), so every counter a CTA
// waits on is advanced only by CTAs of smaller key tiles, i.e. smaller positions (key tile is
// the slowest-moving coordinate under causal remapping, and key tiles of one (kv head, batch)
// are ordered by x otherwise): the CTA holding the smallest unfinished position never waits,
// so no wait is forever. (With the writer, that CTA's writer finds every turn already given;
// its consumers wait only on its writer's ring and its producer's stages, which wait only on
// them: the single-CTA hand-off modelled in tests/cpu/test_sm90_bwd_barriers.py, turns across
// CTAs included.) The fp32 sums then add in one order on every run.
// Block lists (sp_grid, built by the bwd_grid kernel before this one): an item whose (row
// block, col block) no list names is skipped by every role: the producer's loads, lse rows and
// mask words and the dQ writer each scan the grid for the next listed item (32 items per ballot;
// the TMA leader alone without the writer), so they walk one sequence; the j-th listed item
// takes stage j % kStages and dQ slot j % kDqSlots. The consumers take each stage's item from
// the stage (Smem::kOffStageItem, written by the TMA leader before its arrival); after the
// last item every producer thread arrives once more on the next stage with the end marker -1
// (also without lists: the walk is then every item). In deterministic mode a target counts
// only the listed key tiles n_lo .. n - 1 of the query tile's row in the grid (the others
// never add into it), so the turns still follow key-tile order (modelled with unlisted items
// in tests/cpu/test_sm90_bwd_barriers.py).
// Bias gradients: a full tile's dbias is dx itself: each thread overwrites the bias elements
// it read in the shared-memory stage with dx, and after the dS^T barriers each consumer
// copies its 64-key box to global memory in 16-byte chunks (8 threads per 128-byte row) while
// its dQ product runs, before the stage is released (each element written by one CTA); a key
// row's dbias is the column sum of dx over the query tiles of one head, kept in registers and
// written once per (head, key): float32 where a shared row's heads are summed afterwards.
// Register budget per consumer thread (d128): dK + dV accumulators 2 x 64, S^T and dP^T 2 x 32
// (dead once P^T and dS^T are packed to 2 x 16), the dQ accumulator 32 (d64: halve the first
// two): at most 192 + addressing under the 232 setmaxnreg grants.
#pragma once
#ifndef DM_SM90_BWD_DQ_ATOMIC
#define DM_SM90_BWD_DQ_ATOMIC 0
#endif
#ifndef DM_SM90_BWD_DQ_WRITER  // 2 (default): H200 fwd+bwd +12-20% over 0 (BENCHMARKS.md)
#define DM_SM90_BWD_DQ_WRITER 2
#endif
// (1, the writer's one bulk add per row, was 4-38% slower than 2 on H200: removed)
static_assert(DM_SM90_BWD_DQ_WRITER == 0 || DM_SM90_BWD_DQ_WRITER == 2,
              "DM_SM90_BWD_DQ_WRITER: 0 or 2");
// DM_SM90_BWD_DQ_SLOTS=1: the dQ writer's ring has one slot in every spec (less shared
// memory); 2 (default): two slots, one at d128 with a bias tile.
#ifndef DM_SM90_BWD_DQ_SLOTS
#define DM_SM90_BWD_DQ_SLOTS 2
#endif
// DM_SM90_BWD_DQ_WRITERS=2 (default): with two dQ slots and no mask, the idle producer warp 2
// is a second writer (sm90_bwd_role with writers = 2): warp 1 takes the walk's even items
// (slot 0), warp 2 the odd ones (slot 1), so one item's turn poll and adds overlap the other's
// wait for its adds to complete (deterministic mode) or to read its slot (one slot: see
// DM_SM90_BWD_DQ_SHARED_SLOT). H200 deterministic fwd+bwd 1.18x -> 1.03x of the default mode
// (BENCHMARKS.md, ninth session); 1: warp 1 alone.
#ifndef DM_SM90_BWD_DQ_WRITERS
#define DM_SM90_BWD_DQ_WRITERS 2
#endif
static_assert(DM_SM90_BWD_DQ_WRITERS == 1 || DM_SM90_BWD_DQ_WRITERS == 2,
              "DM_SM90_BWD_DQ_WRITERS: 1 or 2");
// DM_SM90_BWD_DQ_SHARED_SLOT=1 (default): the two writers also where the ring has one slot
// (d128 with a full bias tile, no mask). They take the slot in turn: before waiting for item
// j's tile a writer waits for the slot's empty phase of item j - 1 (the other writer's adds
// have read it; its own item j - 2's phase completed by its own arrival, so the parity names
// that phase alone), so only the reads are serial and one item's wait for its adds to complete
// overlaps the other's. Without that wait, j's writer would pass on the parity of phase j - 2
// (tests/cpu/test_sm90_bwd_barriers.py: "clobbered"). H200 backward_bias deterministic
// fwd+bwd 1.21x -> 1.06x of the default mode (BENCHMARKS.md, tenth session); 0: the one-slot
// specs keep one writer.
#ifndef DM_SM90_BWD_DQ_SHARED_SLOT
#define DM_SM90_BWD_DQ_SHARED_SLOT 1
#endif
// DM_SM90_BWD_BIAS_LDSM=1: a full bias tile reaches the consumers by ldmatrix.x4.trans and
// their dbias goes back into the stage by stmatrix.x4.trans (4 + 4 per thread per item, one
// 16 x 16 (key x query) block each: sm90_bwd_bias_ldsm_offset) instead of 32 two-byte loads
// and 32 two-byte stores at per-element swizzled addresses (0: those; the DQ_ATOMIC variant's
// only way). 1 (default): H200 backward_bias kernel 770 -> 456 us (BENCHMARKS.md).
#ifndef DM_SM90_BWD_BIAS_LDSM
#define DM_SM90_BWD_BIAS_LDSM 1
#endif
// DM_SM90_BWD_DET_KEY_MAJOR=1: deterministic mode orders its CTAs key tile first (every (kv
// head, batch) of key tile 0, then tile 1, ...) without a right-limited window too, so a head's
// turn chain per query tile is only as deep as the key tiles of it resident at once (~SMs /
// heads) instead of all of them (default: H200 deterministic fwd+bwd 1.26x -> 1.17x of the
// default mode's time, BENCHMARKS.md); 0: the grid order there.
#ifndef DM_SM90_BWD_DET_KEY_MAJOR
#define DM_SM90_BWD_DET_KEY_MAJOR 1
#endif
#include "../common.cuh"
#include "../params.cuh"
#include "../bwd_params.cuh"
#include "../block_info.cuh"
#include "../logits.cuh"
#include "primitives.cuh"
#include "wgmma_ops.cuh"

namespace dm {

// Bulk (non-tensor) reduce-add of `bytes` (a multiple of 16; both addresses 16-byte aligned)
// fp32 words from shared memory into global memory, tracked by this thread's bulk groups.
DM_DEVICE void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
               ::"l"(reinterpret_cast<uint64_t>(dst)), "r"(src), "r"(bytes)
               : "memory");
}
DM_DEVICE void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// This thread's bulk groups but the newest kPending have read their shared-memory source.
template <int kPending>
DM_DEVICE void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(kPending) : "memory");
}
// ... and have completed (their global writes are done).
template <int kPending>
DM_DEVICE void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(kPending) : "memory");
}
// The deterministic mode's counters: acquire (primitives.cuh: ld_acquire_gpu) and release at
// GPU scope.
DM_DEVICE void red_release_gpu_add(int32_t* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
// One bulk tensor reduce-add (the map's type: fp32) of a box from shared memory at the
// coordinates (c0 fastest); out-of-bounds elements are not written.
DM_DEVICE void tma_reduce_add_4d(const sm90::TmaDesc* map, uint32_t src, int c0, int c1, int c2,
                                 int c3) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group"
      " [%0, {%2, %3, %4, %5}], [%1];"
      ::"l"(reinterpret_cast<uint64_t>(map)), "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// Orders this thread's generic-proxy accesses of global memory with its async-proxy ones.
DM_DEVICE void fence_proxy_async_global() {
  asm volatile("fence.proxy.async.global;" ::: "memory");
}
// DM_SM90_BWD_BIAS_LDSM: byte offset, in a full bias stage (two 64-key boxes of kRows query rows,
// 128-byte rows, 128B swizzle: tile_offset<2, 64, kRows>(query, key)), of the 16-byte row that
// lane `lane` of consumer c's warp w addresses in the .x4.trans load/store of query block i
// (queries 16i ..; block i is 2048 i bytes further: the swizzle XOR depends on query % 8 only).
// Matrix m = lane / 8 holds queries 16i + 8(m / 2) .. + 7 of keys 64c + 16w + 8(m % 2) .. + 7,
// so that .trans hands lane (g, t) the pair (queries 16i + 8(m / 2) + 2t, + 1) of key
// 64c + 16w + g + 8(m % 2): register m is the fragment word of j = 2i + m / 2, row half m % 2.
template <int kRows>
__host__ __device__ constexpr uint32_t sm90_bwd_bias_ldsm_offset(int c, int w, int lane) {
  return sm90::tile_offset<2, 64, kRows>(8 * (lane / 16) + lane % 8,
                                         64 * c + 16 * w + 8 * ((lane / 8) % 2));
}

// Bits 0-3 of f as bytes 0-3 (0 or 1 each): the multiply puts bit i at 8i (i + 7j for i != j
// lands off the byte starts and no two products share a bit, so nothing carries).
__host__ __device__ constexpr uint32_t mask_bits_to_bytes(uint32_t f) {
  return ((f & 0xfu) * 0x00204081u) & 0x01010101u;
}
// A 64-bit value the compiler cannot see through (sm90::opaque on both halves): recomputed
// where used instead of held (and spilled) across a loop.
DM_DEVICE int64_t opaque_i64(int64_t x) {
  return int64_t(uint64_t(sm90::opaque(uint32_t(uint64_t(x) >> 32))) << 32 |
                 sm90::opaque(uint32_t(uint64_t(x))));
}
// The row-major word of a partial block (slot `slot` of sp_partial_bits, bm x bn) holding key
// n (n % 32 == 0) of row m, both relative to the block.
__host__ __device__ constexpr int64_t bwd_listed_row_word(int slot, int bm, int bn, int m, int n) {
  return int64_t(slot) * (bm / 32) * bn + (int64_t(m) * bn + n) / 32;
}

DM_DEVICE void st_shared_f32x2(uint32_t addr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(x), "f"(y) : "memory");
}
// dK/dV staging for the epilogue (over the K and V tiles: 128 rows of kHeadDim 16-bit values,
// kHeadDim * 2 bytes apart): the 16-byte chunk index XORed with row % 8, so a warp's fragment
// stores (rows g = row % 8, words t) and its row-chunk loads (8 lanes: 8 chunks of one row) both
// hit 32 distinct banks.
template <int kHeadDim>
__host__ __device__ constexpr uint32_t sm90_bwd_dkv_stage_offset(int row, int col) {
  return uint32_t(row) * (kHeadDim * 2) + (uint32_t((col / 8) ^ (row % 8)) << 4) +
         uint32_t(col % 8) * 2;
}

// A compile-time switch passed to generic lambdas (decltype(tag)::value).
template <bool kValue>
struct BoolTag {
  static constexpr bool value = kValue;
};

// DM_SM90_BWD_DQ_WRITER=2: the producer's dQ writer warp adds the staged tiles (and takes the
// deterministic turns) instead of each consumer warp's lane 0 (the header's "dQ writer"), one
// bulk tensor reduce per tile through Sm90BwdArgs::dqa. The A/B variant DM_SM90_BWD_DQ_ATOMIC
// has no staged tiles: it wins.
constexpr bool kSm90BwdDqWriter = DM_SM90_BWD_DQ_WRITER != 0 && !DM_SM90_BWD_DQ_ATOMIC;

enum Sm90BwdBias : int32_t { kBwdBiasNone = 0, kBwdBiasTile = 1, kBwdBiasKeyRow = 2 };

// The second kernel parameter (const __grid_constant__): tensor maps over (cols, rows, heads,
// batch) of q, k, v, dout and a (B, H, Sq, Sk) bias, and how the bias is read (bias_mode: the
// host's record; the kernel reads its template's kBiasRow). Mirrored by
// dmattn_cupy/backward_sm90.py (ARGS_DTYPE; size checked below and in the CPU tests).
// dqa: fp32 over dq_accum, box (kHeadDim + 8 columns, 64 rows): a writer slot as it lies in
// shared memory, the padding columns and rows past the end out of bounds (not written); only
// encoded for DM_SM90_BWD_DQ_WRITER=2. dq_sem: the deterministic mode's counters (null: the
// default, unordered adds).
struct alignas(64) Sm90BwdArgs {
  sm90::TmaDesc q, k, v, dout, bias, dqa;
  int32_t bias_mode;
  int32_t pad0;
  int32_t* dq_sem;
  int32_t pad[12];
};
static_assert(sizeof(Sm90BwdArgs) == 832, "Sm90BwdArgs: size drifted from backward_sm90.py");

// Shared-memory plan of one kernel instance; backward_sm90.smem_bytes mirrors kAlloc.
template <int kHeadDim, bool kHasMask, bool kBiasTile>
struct Sm90BwdSmem {
  static constexpr int kBlockM = 64, kBlockN = 128, kStages = 2;
  static_assert(kBlockN == kSpOrderTileN, "sp_order ranks this kernel's key tiles");
  static constexpr int kBoxes = kHeadDim / 64;              // 64-column boxes of a row
  static constexpr int kKV = kBoxes * kBlockN * 128;         // K or V (128 rows per box)
  static constexpr int kQ = kBoxes * kBlockM * 128;          // one Q or dO stage
  static constexpr int kBias = kBiasTile ? kBlockM * kBlockN * 2 : 0;  // one stage, 2 boxes
  static constexpr int kDS = 64 * kBlockM * 2;               // a consumer's dS^T [key][query]
  // dQ staging: per (head-dim box, consumer warp) 16 rows of 64 fp32, rows kDQRow bytes apart
  // (256 + 32: the 8 rows of a float2 store land in distinct banks; 16-byte aligned rows).
  static constexpr int kDQRow = (64 + 8) * 4;
  static constexpr int kDQWarp = 16 * kDQRow;
  // With the dQ writer: a ring of kDqSlots whole 64-row tiles (both consumers' boxes side by
  // side), rows kDQTileRow bytes apart (kHeadDim fp32 + 32 bytes: the 8 rows of a float2 store
  // land in distinct banks; a row is one contiguous bulk add); one slot where two do not fit
  // (d128 with a bias tile).
  static constexpr bool kDqWriter = kSm90BwdDqWriter;
  static constexpr int kDqSlots =
      !kDqWriter ? 0 : (DM_SM90_BWD_DQ_SLOTS == 1 || (kHeadDim == 128 && kBiasTile)) ? 1 : 2;
  static constexpr int kDQTileRow = (kHeadDim + 8) * 4;
  static constexpr int kDQSlot = kBlockM * kDQTileRow;
  static constexpr int kDQ = DM_SM90_BWD_DQ_ATOMIC ? 0
                             : kDqWriter             ? kDqSlots * kDQSlot
                                                     : kBoxes * 4 * kDQWarp;
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kKV;
  static constexpr int kOffQ = 2 * kKV;
  static constexpr int kOffDO = kOffQ + kStages * kQ;
  static constexpr int kOffBias = kOffDO + kStages * kQ;
  static constexpr int kOffDS = kOffBias + kStages * kBias;
  // Mask: per stage one 64-bit query word per key, then per stage two flags, one per key half
  // (bit 0: every element kept, bit 1: some element).
  static constexpr int kMaskBits = kHasMask ? kBlockN * 8 : 0;
  // K/V; per stage full, empty; per dQ slot full, empty (the writer's ring)
  static constexpr int kNumBars = 1 + 2 * kStages + 2 * kDqSlots;
  // Everything after the dS^T buffers: dQ staging, lse/dsum, mask words and flags, barriers,
  // the ticket/skip words and the stage words (their order below).
  static constexpr int kTail = kDQ + 2 * kStages * kBlockM * 4 +
                               (kHasMask ? kStages * (kMaskBits + 2 * 4) : 0) + 8 * kNumBars +
                               16 + 16 * kStages;
  // One dS^T buffer: both consumers' halves adjacent.
  static constexpr int kOffDQ = kOffDS + 2 * kDS;
  static constexpr int kOffLse = kOffDQ + kDQ;               // kStages x kBlockM floats
  static constexpr int kOffDsum = kOffLse + kStages * kBlockM * 4;
  static constexpr int kOffMask = kOffDsum + kStages * kBlockM * 4;
  static constexpr int kOffMaskFull = kOffMask + kStages * kMaskBits;
  static constexpr int kOffBars = kOffMaskFull + (kHasMask ? kStages * 2 * 4 : 0);
  // int32 words: [0] the deterministic mode's position, [1 + k] dQ slot k's "nothing to add";
  // then per stage 4 words from the producer: [0] the item (-1: the walk has ended), [1] the
  // head of the walk's previous item (-1: none), [2] the deterministic turn target (without the
  // dQ writer)
  static constexpr int kOffTicket = kOffBars + 8 * kNumBars;
  static constexpr int kOffStageItem = kOffTicket + 16;
  static constexpr int kBytes = kOffStageItem + 16 * kStages;
  static constexpr int kAlloc = kBytes + 1024;  // the base is aligned up to 1024 at run time
  static_assert(kBytes == kOffDS + 2 * kDS + kTail, "kTail lists every region");
  static_assert(4 * (1 + kDqSlots) <= 16, "ticket and skip words");
  static_assert(kDQTileRow % 16 == 0 && kDQSlot % 128 == 0 && kOffDQ % 128 == 0,
                "bulk-add rows 16-byte, tensor-reduce boxes 128-byte aligned");
  static_assert(kAlloc <= 227 * 1024, "the sm_90 shared-memory limit per block");
  static_assert(kKV % 1024 == 0 && kQ % 1024 == 0 && kBias % 1024 == 0 && kDS % 1024 == 0,
                "swizzled tiles start on 1024-byte boundaries");
  static_assert(kDQRow % 16 == 0 && kOffDQ % 16 == 0, "bulk-copy sources are 16-byte aligned");
  static_assert(kOffMask % 8 == 0 && kOffBars % 8 == 0, "64-bit mask words and mbarriers");
};

// What each thread of the producer warpgroup (warp 0..3, lane) does; the kernel dispatches on
// it, so the counts below are the kernel's own. Only warp 0's lane 0 issues TMA: warp 0's
// other lanes (and warps 2-3 without a mask) leave at once. A role that ballots or syncs over
// all 32 lanes (kBwdMaskWords: __ballot_sync(0xffffffff)) must hold every lane of its warps.
// With the dQ writer (dq_writer: kSm90BwdDqWriter) warp 1 is the writer (warp 2 too with
// writers == 2: DM_SM90_BWD_DQ_WRITERS) and the lse rows move into warp 0 (kBwdLoads: lane 0
// issues the TMA as kBwdTma does, every lane writes two rows).
enum Sm90BwdRole : int {
  kBwdIdle = 0, kBwdTma = 1, kBwdLseRows = 2, kBwdMaskWords = 3, kBwdDqWriter = 4, kBwdLoads = 5
};
__host__ __device__ constexpr int sm90_bwd_role(int warp, int lane, bool has_mask,
                                                bool dq_writer) {
  if (dq_writer)
    return warp == 0 ? kBwdLoads
           : warp == 1 ? kBwdDqWriter
           : (has_mask && (warp == 2 || warp == 3)) ? kBwdMaskWords
                                                       : kBwdIdle;
  return warp == 0 ? (lane == 0 ? kBwdTma : kBwdIdle)
         : warp == 1 ? kBwdLseRows
         : (has_mask && (warp == 2 || warp == 3)) ? kBwdMaskWords
                                                     : kBwdIdle;
}
// With writers == 2 (the kernel's DM_SM90_BWD_DQ_WRITERS, passed as 2 only with the writer,
// two slots or DM_SM90_BWD_DQ_SHARED_SLOT, and no mask: warp 2 is idle then) warp 2 writes dQ
// too.
__host__ __device__ constexpr int sm90_bwd_role(int warp, int lane, bool has_mask,
                                                bool dq_writer, int writers) {
  return writers == 2 && warp == 2 ? int(kBwdDqWriter)
                                   : sm90_bwd_role(warp, lane, has_mask, dq_writer);
}
// Arrivals of one producer thread on a stage's full barrier per item: the TMA leader's
// arrive.expect_tx, one per lse-row or mask-word lane, both for warp 0's lane 0 as kBwdLoads;
// the dQ writer never touches the stages.
__host__ __device__ constexpr int sm90_bwd_role_full_arrivals(int role, int lane) {
  return role == kBwdTma || role == kBwdLseRows || role == kBwdMaskWords ? 1
         : role == kBwdLoads ? 1 + (lane == 0)
                             : 0;
}
// Arrivals on a stage's full barrier per item (its init count).
__host__ __device__ constexpr int sm90_bwd_full_arrivals(bool has_mask, bool dq_writer) {
  int n = 0;
  for (int x = 0; x < 128; ++x)
    n += sm90_bwd_role_full_arrivals(sm90_bwd_role(x / 32, x % 32, has_mask, dq_writer), x % 32);
  return n;
}
// A warp with a warp-wide role (lse rows, the mask ballots, the writer's shuffles and waits)
// has it in all 32 lanes.
__host__ __device__ constexpr bool sm90_bwd_role_is_warp_wide(int r) {
  return r == kBwdLseRows || r == kBwdMaskWords || r == kBwdDqWriter || r == kBwdLoads;
}
__host__ __device__ constexpr bool sm90_bwd_roles_whole_warps(bool has_mask, bool dq_writer) {
  for (int w = 0; w < 4; ++w) {
    const int r0 = sm90_bwd_role(w, 0, has_mask, dq_writer);
    for (int l = 0; l < 32; ++l) {
      const int r = sm90_bwd_role(w, l, has_mask, dq_writer);
      if ((sm90_bwd_role_is_warp_wide(r) || sm90_bwd_role_is_warp_wide(r0)) && r != r0)
        return false;
    }
  }
  return true;
}
static_assert(sm90_bwd_full_arrivals(false, false) == 1 + 32 &&
                  sm90_bwd_full_arrivals(true, false) == 1 + 32 + 64 &&
                  sm90_bwd_full_arrivals(false, true) == 1 + 32 &&
                  sm90_bwd_full_arrivals(true, true) == 1 + 32 + 64,
              "full barrier: TMA leader + the lse rows' 32 lanes (+ the mask warps' 64)");
static_assert(sm90_bwd_roles_whole_warps(false, false) && sm90_bwd_roles_whole_warps(true, false) &&
                  sm90_bwd_roles_whole_warps(false, true) && sm90_bwd_roles_whole_warps(true, true),
              "warp-wide roles hold whole warps");

template <typename T, int kHeadDim, bool kHasMask, bool kHasBias, bool kBiasRow,
          bool kListedBits>
__global__ void __launch_bounds__(384, 1)
flash_bwd_sm90_kernel(const BwdParams bp, const __grid_constant__ Sm90BwdArgs args) {
  // kHasBias: a bias with its gradient; kBiasRow: it is a key row (B, H, 1, Sk), read from
  // global memory per head (no tile in the ring, so d128 keeps two dQ slots), else a full
  // (B, H, Sq, Sk) tile per item. One spec per kind: both paths in one kernel cost ~35% more
  // instructions and instruction-cache misses (ncu, BENCHMARKS.md fifth session).
  // kListedBits (with kHasMask, p.mask null): block lists with partial blocks; the mask warps
  // read each row's 16-key fields of a partial block's row-major bits (bwd_listed_row_word)
  // where they would read mask bytes, so consumers see it as mask words like any mask. Its own
  // spec: the same code behind a runtime test made the mask specs' items 12% slower (ncu,
  // BENCHMARKS.md twenty-eighth session).
  static_assert(kHasBias || !kBiasRow, "kBiasRow: only with a bias");
  static_assert(kHasMask || !kListedBits, "kListedBits: on the mask specs");
  using Smem = Sm90BwdSmem<kHeadDim, kHasMask, kHasBias && !kBiasRow>;
  constexpr int kBlockM = Smem::kBlockM, kBlockN = Smem::kBlockN, kStages = Smem::kStages;
  constexpr int kDF = kHeadDim / 8;  // dK/dV fragments (n8) per thread row pair
  constexpr int kNF = kBlockM / 8;   // S^T/dP^T fragments: one per 8 queries
  constexpr int kDqWarps = 4 * (kHeadDim / 64);  // warps adding dQ per item (d64: consumer 0's)
  // Named barriers: 0 the CTA's (__syncthreads), 1 (DQ_ATOMIC: 1, 2) the dS^T buffer's, this
  // one the epilogue's (both consumers, 256 threads).
  constexpr int kEpilogueBar = 3;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "phase 1 head dims");
  // setmaxnreg budgets: multiples of 8 summing to at most 3 x 168 (the pool at launch).
  constexpr int kProducerRegs = 40;
  constexpr int kConsumerRegs = 232;
  static_assert(kProducerRegs + 2 * kConsumerRegs <= 3 * 168, "register pool of the CTA");
  using namespace sm90;
  const FwdParams& p = bp.f;

  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  {
    uint32_t dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < uint32_t(Smem::kAlloc)) __trap();  // launcher and kernel disagree on the layout
  }
  const uint32_t sK = base + Smem::kOffK, sV = base + Smem::kOffV;
  const uint32_t sQ = base + Smem::kOffQ, sdO = base + Smem::kOffDO;
  const uint32_t sBias = base + Smem::kOffBias;
  float* sLse = reinterpret_cast<float*>(smem + Smem::kOffLse);
  float* sDsum = reinterpret_cast<float*>(smem + Smem::kOffDsum);
  const uint32_t bars = base + Smem::kOffBars;
  const uint32_t bar_kv = bars;
  auto bar_full = [&](int s) { return bars + 8 + 16 * s; };
  auto bar_empty = [&](int s) { return bars + 16 + 16 * s; };
  // The dQ writer's ring: slot k full (the dQ warps' stores) and empty (its adds read it).
  auto bar_dq_full = [&](int k) { return bars + 8 * (1 + 2 * kStages) + 16 * k; };
  auto bar_dq_empty = [&](int k) { return bars + 8 * (1 + 2 * kStages) + 8 + 16 * k; };

  // Deterministic mode: the CTA's linear position is its ticket (see the header), read after
  // the barrier below; else its block index.
  int32_t* const dq_sem = args.dq_sem;
  volatile int* ticket = reinterpret_cast<volatile int*>(smem + Smem::kOffTicket);
  // 32-bit word k: slot k's item adds nothing (a dropped tile)
  auto dq_skip = [&](int k) { return base + Smem::kOffTicket + 4 + 4 * k; };
  if (threadIdx.x == 0) {
    mbar_init(bar_kv, 1);
    for (int s = 0; s < kStages; ++s) {
      // the TMA leader's expect_tx + the lse rows' 32 lanes (+ the mask warps' 64 lanes)
      mbar_init(bar_full(s), sm90_bwd_full_arrivals(kHasMask, Smem::kDqWriter));
      mbar_init(bar_empty(s), 8 * kWarpArrivals);  // one arrival per consumer warp
    }
    for (int k = 0; k < Smem::kDqSlots; ++k) {
      mbar_init(bar_dq_full(k), kDqWarps * kWarpArrivals);  // one arrival per dQ warp
      mbar_init(bar_dq_empty(k), kWarpArrivals);            // the writer's lane 0
    }
    mbar_init_fence();
    if (dq_sem != nullptr) *ticket = atomicAdd(dq_sem, 1);
  }
  __syncthreads();

  int tile_n = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  int lin = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  if (dq_sem != nullptr || bp.sp_order != nullptr) {
    // the deterministic ticket, or the block lists' longest-first order (default mode, no
    // window: the host's rule, so the remap below never applies to it)
    lin = dq_sem != nullptr ? *ticket : bp.sp_order[lin];
    tile_n = lin % gridDim.x;
    kvh = lin / gridDim.x % gridDim.y;
    b = lin / gridDim.x / gridDim.y;
  }
#if DM_SM90_BWD_DQ_ATOMIC
  if (dq_sem != nullptr) __trap();  // the A/B variant's dQ atomics cannot be ordered
#endif
  // Longest-first under a right-limited window (causal): key tile 0 sees the most query tiles
  // and the counts fall with the tile index, so the linear order (x fastest, the order CTAs
  // start in) is remapped to run every (kv head, batch) of key tile 0 first, then tile 1, ...;
  // without that limit every key tile has the same work and the grid order is kept (the key
  // tiles of one head run together and share its Q/dO in L2), unless DM_SM90_BWD_DET_KEY_MAJOR
  // asks for the remap in deterministic mode (turns still wait on smaller positions only).
  if (p.window_right >= 0 || (DM_SM90_BWD_DET_KEY_MAJOR && dq_sem != nullptr)) {
    const int per_tile = gridDim.y * gridDim.z;
    tile_n = lin / per_tile;
    kvh = lin % per_tile % gridDim.y;
    b = lin % per_tile / gridDim.y;
  }
  const int n0 = tile_n * kBlockN;
  const int len_q = p.seqlen_q, len_k = p.seqlen_k;
  const int off = len_k - len_q;
  // Items: (query head of the group, query tile that can see a key of this tile), head-major.
  const RowRange qr = query_range(p, n0, dm_min(n0 + kBlockN, len_k) - 1, len_q, len_k);
  const int mb_begin = qr.begin / kBlockM;
  const int n_mb = qr.begin < qr.end ? (qr.end - 1) / kBlockM + 1 - mb_begin : 0;
  const int n_items = n_mb * p.q_per_kv;
  auto head_of = [&](int i) { return kvh * p.q_per_kv + i / n_mb; };
  auto m0_of = [&](int i) { return (mb_begin + i % n_mb) * kBlockM; };
  constexpr bool bias_tile = kHasBias && !kBiasRow;
  constexpr bool bias_row = kHasBias && kBiasRow;
  // The same as bias_tile, read from the record where a tile is loaded and read: with the
  // constant alone ptxas spills 8-24 bytes at d128 (the producer's 40 registers, the masked path).
  const bool bias_tile_rt = bias_tile && args.bias_mode == kBwdBiasTile;
  const int wg = threadIdx.x / 128;
  const int lane = threadIdx.x % 32;
  const int warp = (threadIdx.x % 128) / 32;

  // Block lists (bp.sp_grid set; null: every item is listed): the walk skips the items whose
  // (row block, col block) is not listed. Every role derives the same filtered sequence from
  // the grid (the producer's loads, lse rows, mask words and the dQ writer scan it; the
  // consumers take each stage's item from the stage, Smem::kOffStageItem, -1 ending the walk),
  // so the j-th listed item uses stage j % kStages and dQ slot j % kDqSlots in every role.
  // Mask blocks tile the kernel (sp_block_m % kBlockM == 0, sp_block_n % kBlockN == 0: the
  // host declines others), so a listed item takes the dense/mask path unchanged. Lists with
  // partial blocks run on the kListedBits specs only (elsewhere a partial entry would read as
  // full), where a partial entry (its slot, >= 0) also reaches the mask warps, which fold the
  // block's bits into the item's mask words.
  const int32_t* const sp_grid = bp.sp_grid;
  auto sp_row = [&](int h, int m0) -> const int32_t* {
    return sp_grid + sparse_row_entry(p, b, h, m0) * bp.sp_grid_cols;
  };
  // (the column block from an opaque n0: hoisted out of the producer's loops, such invariants
  // spilled its 40 registers)
  auto listed = [&](int i) -> bool {
    return sp_grid == nullptr ||
           sp_row(head_of(i), m0_of(i))[int(opaque(uint32_t(n0))) / p.sp_block_n] != kSpNone;
  };
  // The first listed item >= i (n_items when none). Warp-wide: every lane calls it and 32
  // items are tested per step (one load each, a ballot).
  auto next_item_warp = [&](int i) -> int {
    if (sp_grid == nullptr) return i;
    for (; i < n_items; i += 32) {
      const uint32_t v = __ballot_sync(0xffffffffu, i + lane < n_items && listed(i + lane));
      if (v != 0u) return i + __ffs(int(v)) - 1;
    }
    return n_items;
  };
  // The same for one lane alone (the TMA leader without the dQ writer).
  auto next_item_lane = [&](int i) -> int {
    while (i < n_items && !listed(i)) ++i;
    return dm_min(i, n_items);
  };
  // Deterministic mode: the counter of query tile m0 of head h (null in the default mode).
  // args.dq_sem through opaque copies: a predicate hoisted from it and held across the dQ
  // writer's loop spilled.
  auto dq_counter = [&](int h, int m0) -> int32_t* {
    const uint64_t sem_bits = reinterpret_cast<uint64_t>(args.dq_sem);
    int32_t* const sem = reinterpret_cast<int32_t*>(uint64_t(opaque(uint32_t(sem_bits >> 32)))
                                                    << 32 | opaque(uint32_t(sem_bits)));
    if (sem == nullptr) return nullptr;
    return sem + 1 + (int64_t(b) * p.heads + h) * ((len_q + kBlockM - 1) / kBlockM) +
           m0 / kBlockM;
  };
  // ... and its count when every listed key tile n_lo .. this one - 1 has added into it: each
  // adds kTurnStep (one per dQ warp; with the writer one per item). Warp-wide (the key tiles'
  // listings in the query tile's row of the grid are counted 32 at a time). Without the writer
  // the producer's lse rows warp computes it for the consumers (stage word 2).
  constexpr int kTurnStep = Smem::kDqWriter ? 1 : kDqWarps;
  auto dq_target = [&](int h, int m0) -> int {
    const int n_lo = key_range(p, m0, dm_min(m0 + kBlockM, len_q), len_q, len_k).k_begin /
                     kBlockN;
    int before = tile_n - n_lo;
    if (sp_grid != nullptr) {
      const int32_t* row = sp_row(h, m0);
      before = 0;
      for (int t = n_lo; t < tile_n; t += 32) {
        const bool on = t + lane < tile_n && row[(t + lane) * kBlockN / p.sp_block_n] != kSpNone;
        before += __popc(__ballot_sync(0xffffffffu, on));
      }
    }
    return before * kTurnStep;
  };
  // Stage s's words from the producer (Smem::kOffStageItem): item, previous head, target.
  int* const stage_item = reinterpret_cast<int*>(smem + Smem::kOffStageItem);
  auto stage_word = [&](int s, int w) { return base + Smem::kOffStageItem + 16u * s + 4u * w; };

  if (wg == 0) {  // ------------------------------------------------------------- producer
    setmaxnreg_dec<kProducerRegs>();  // all four warps, before any leaves
    // DM_SM90_BWD_DQ_WRITERS=2: warp 2 (idle without a mask) is a second writer.
    constexpr bool kSharedSlot = DM_SM90_BWD_DQ_SHARED_SLOT != 0 && Smem::kDqSlots == 1;
    constexpr int kWriters = DM_SM90_BWD_DQ_WRITERS == 2 && Smem::kDqWriter && !kHasMask &&
                             (Smem::kDqSlots == 2 || kSharedSlot) ? 2 : 1;
    const int role = sm90_bwd_role(warp, lane, kHasMask, Smem::kDqWriter, kWriters);
    // Row m0 + r's lse (log2 units; +inf for rows past the end, where P = exp2(x - inf) = 0,
    // and for rows that kept nothing) and dsum, then their stores into stage s.
    auto lse_load = [&](int h, int m0, int r) -> float2 {
      const int row = m0 + r;
      float l = DM_INF, d = 0.f;
      if (row < len_q) {
        const int64_t idx = int64_t(b) * p.lse_batch_stride + int64_t(h) * p.lse_head_stride + row;
        const float lv = p.lse[idx];
        l = lv == -DM_INF ? DM_INF : lv * kLog2e;
        d = bp.dsum[idx];
      }
      return make_float2(l, d);
    };
    auto lse_store = [&](int s, int r, float2 ld) {
      sLse[s * kBlockM + r] = ld.x;
      sDsum[s * kBlockM + r] = ld.y;
    };
    // The TMA leader's loads: K and V once, then item i's Q, dO (and bias tile) into stage s.
    auto issue_kv = [&]() {
      tma_prefetch(&args.q);
      tma_prefetch(&args.dout);
      mbar_arrive_expect_tx(bar_kv, 2 * Smem::kKV);
#pragma unroll
      for (int x = 0; x < Smem::kBoxes; ++x) {
        tma_load_4d(sK + x * kBlockN * 128, &args.k, bar_kv, 64 * x, n0, kvh, b);
        tma_load_4d(sV + x * kBlockN * 128, &args.v, bar_kv, 64 * x, n0, kvh, b);
      }
    };
    // (it also names the item and the walk's previous head `ph` for the consumers: stage words
    // 0 and 1, released by its arrival)
    auto issue_item = [&](int s, int i, int ph) {
      const int h = head_of(i), m0 = m0_of(i);
      stage_item[4 * s] = i;
      stage_item[4 * s + 1] = ph;
      mbar_arrive_expect_tx(bar_full(s), 2 * Smem::kQ + (bias_tile_rt ? Smem::kBias : 0));
#pragma unroll
      for (int x = 0; x < Smem::kBoxes; ++x) {
        tma_load_4d(sQ + s * Smem::kQ + x * kBlockM * 128, &args.q, bar_full(s), 64 * x, m0,
                    h, b);
        tma_load_4d(sdO + s * Smem::kQ + x * kBlockM * 128, &args.dout, bar_full(s), 64 * x,
                    m0, h, b);
      }
      if (bias_tile_rt) {
        const int bias_h = h / p.bias_head_ratio, bias_b = p.bias_batch_stride != 0 ? b : 0;
#pragma unroll
        for (int x = 0; x < kBlockN / 64; ++x)
          tma_load_4d(sBias + s * Smem::kBias + x * kBlockM * 128, &args.bias, bar_full(s),
                      n0 + 64 * x, m0, bias_h, bias_b);
      }
    };
    // After the j listed items: stage j % kStages once free again, then this thread's usual
    // arrivals on its full barrier with no data (the TMA leader's without bytes, after it
    // wrote the end marker -1): the consumers leave their walk there.
    // `ph`: the last item's head, whose key-row dbias the consumers then finish.
    auto end_walk = [&](int j, int ph) {
      const int s = j % kStages;
      mbar_wait(bar_empty(s), ((j / kStages) & 1) ^ 1);
      if (role == kBwdTma || (role == kBwdLoads && lane == 0)) {
        stage_item[4 * s] = -1;
        stage_item[4 * s + 1] = ph;
      }
      for (int a = sm90_bwd_role_full_arrivals(role, lane); a > 0; --a) mbar_arrive(bar_full(s));
    };
    if (role == kBwdTma) {
      issue_kv();
      int j = 0, ph = -1;
      for (int i = next_item_lane(0); i < n_items; i = next_item_lane(i + 1), ++j) {
        const int s = j % kStages;
        mbar_wait(bar_empty(s), ((j / kStages) & 1) ^ 1);
        issue_item(s, i, ph);
        ph = head_of(i);
      }
      end_walk(j, ph);
    } else if (role == kBwdLseRows) {
      int j = 0;
      for (int i = next_item_warp(0); i < n_items; i = next_item_warp(i + 1), ++j) {
        const int s = j % kStages;
        mbar_wait(bar_empty(s), ((j / kStages) & 1) ^ 1);
        const int h = head_of(i), m0 = m0_of(i);
        for (int r = lane; r < kBlockM; r += 32) lse_store(s, r, lse_load(h, m0, r));
        if (!Smem::kDqWriter && args.dq_sem != nullptr) {  // the consumers' turn target
          const int target = dq_target(h, m0);
          if (lane == 0) stage_item[4 * s + 2] = target;
        }
        mbar_arrive(bar_full(s));  // release: this lane's stores before the consumers' reads
      }
      end_walk(j, -1);
    } else if (role == kBwdLoads) {  // warp 0 with the writer: TMA (lane 0) and the lse rows
      if (lane == 0) issue_kv();
      int j = 0, ph = -1;
      for (int i = next_item_warp(0); i < n_items; i = next_item_warp(i + 1), ++j) {
        const int s = j % kStages;
        const int h = head_of(i), m0 = m0_of(i);
        const float2 ld0 = lse_load(h, m0, lane), ld1 = lse_load(h, m0, lane + 32);
        mbar_wait(bar_empty(s), ((j / kStages) & 1) ^ 1);
        if (lane == 0) issue_item(s, i, ph);  // lane 0 arrives twice: with the bytes, then
        lse_store(s, lane, ld0);              // as a row writer (sm90_bwd_full_arrivals)
        lse_store(s, lane + 32, ld1);
        mbar_arrive(bar_full(s));  // release: this lane's stores before the consumers' reads
        ph = h;
      }
      end_walk(j, ph);
    } else if (kHasMask && role == kBwdMaskWords) {
      // warps 2, 3: the item's mask as one 64-bit query word per key, warp 2 + wh taking keys
      // 64 wh .. 64 wh + 63 of the item's 64 rows, lane the rows lane (r = 0: the word's low
      // half) and lane + 32 (r = 1: its high half). Each ballot pair is a key's whole word, lane
      // 0 stores two keys at a time (STS.128), and the "all"/"some kept" flags come from one
      // read-back of the warp's 512 bytes (~55 SASS instructions per 16 keys x 32 rows; the
      // split by rows it replaced took ~95: H100 backward_mask_bias kernel 645 -> 556 us).
      const int wh = warp - 2;
      const bool vec = p.mask_col_stride == 1 && p.mask_row_stride % 16 == 0 &&
                       p.mask_head_stride % 16 == 0 && p.mask_batch_stride % 16 == 0 &&
                       len_k % 16 == 0 && reinterpret_cast<uint64_t>(p.mask) % 16 == 0;
      // Row lane of item i (row 0 for rows past the end: never read).
      auto mask_row = [&](int i, bool& row_ok) -> const uint8_t* {
        const int row = m0_of(i) + lane;
        row_ok = row < len_q;
        if constexpr (kListedBits) return nullptr;  // block lists alone
        // (b opaque: its hoisted batch offset spilled)
        return p.mask + int64_t(opaque(uint32_t(b))) * p.mask_batch_stride +
               int64_t(head_of(i) / p.mask_head_ratio) * p.mask_head_stride +
               int64_t(row_ok ? row : 0) * p.mask_row_stride;
      };
      // The next item's two 64-byte row segments into L1 while this one is transposed.
      auto prefetch = [&](int i) {
        if (kListedBits || !vec || i >= n_items) return;
        const int k0 = int(opaque(uint32_t(n0))) + 64 * wh;  // not hoisted: see listed
        if (k0 >= len_k) return;
        const int last = dm_min(64, len_k - k0) - 1;
        bool ok;
        const uint8_t* x = mask_row(i, ok) + k0;
        if (ok) {
          asm volatile("prefetch.global.L1 [%0];" ::"l"(x));
          asm volatile("prefetch.global.L1 [%0];" ::"l"(x + last));
        }
        if (m0_of(i) + lane + 32 < len_q) {
          x += opaque_i64(p.mask_row_stride) * 32;  // (see the loads)
          asm volatile("prefetch.global.L1 [%0];" ::"l"(x));
          asm volatile("prefetch.global.L1 [%0];" ::"l"(x + last));
        }
      };
      for (int j = 0, i = -1;; ++j) {
        i = next_item_warp(i + 1);
        prefetch(i + 1);
        if (i >= n_items) {
          end_walk(j, -1);
          break;
        }
        const int s = j % kStages;
        mbar_wait(bar_empty(s), ((j / kStages) & 1) ^ 1);
        bool row_ok;  // row lane (row lane + 32: row1_ok)
        const uint8_t* mrow = mask_row(i, row_ok);
        const bool row1_ok = m0_of(i) + lane + 32 < len_q;
        const int kh = int(opaque(uint32_t(n0))) + 64 * wh;  // the warp's first key
        // Block lists alone (no attn_mask: the host declines both together): mrow (null from
        // mask_row) becomes row lane's bits of a listed partial block (two words per row here).
        if constexpr (kListedBits) {
          const int slot = sp_grid == nullptr ? kSpFull : sp_row(head_of(i), m0_of(i))[
              int(opaque(uint32_t(n0))) / p.sp_block_n];  // n0 opaque: see listed
          if (slot >= 0) {
            const int bm = int(opaque(uint32_t(p.sp_block_m)));
            const int bn = int(opaque(uint32_t(p.sp_block_n)));
            mrow = reinterpret_cast<const uint8_t*>(
                p.sp_partial_bits + bwd_listed_row_word(slot, bm, bn, (m0_of(i) + lane) % bm,
                                                        kh % bn));
          }
        }
        // keys kh + 2x, + 1: 16 bytes from here (two 64-bit words; lane 0 stores them)
        const uint32_t words = base + Smem::kOffMask + s * Smem::kMaskBits + 8 * (kh - n0);
#pragma unroll 1
        for (int ch = 0; ch < 4; ++ch) {  // keys kh + 16 ch .. + 15
          const int k0 = kh + 16 * ch;
          uint4 x[2];  // row r's key k0 + e: byte e % 4 of word e / 4 (nonzero: kept), or bit e
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            x[r] = uint4{0u, 0u, 0u, 0u};
            // rows and keys past the ends: false
            if (!(r == 0 ? row_ok : row1_ok) || k0 >= len_k) continue;
            // row lane + 32: 32 rows further (a block's bits: bn words; opaque, recomputed per
            // chunk: a held 64-bit step spilled)
            const uint8_t* mr =
                r == 0 ? mrow
                       : mrow + (kListedBits ? 4 * int64_t(opaque(uint32_t(p.sp_block_n)))
                                             : opaque_i64(p.mask_row_stride) * 32);
            if (!kListedBits && vec) {
              x[r] = __ldg(reinterpret_cast<const uint4*>(mr + k0));
              continue;
            }
            // bit e: key k0 + e kept (a block's bits, or the bytes one by one), then (bytes
            // only) spread to byte e % 4 of word e / 4 (mask_bits_to_bytes)
            const int n = dm_min(16, len_k - k0);
            uint32_t f = 0xffffu >> (16 - n);
            if constexpr (kListedBits) {
              if (mrow != nullptr)
                f &= __ldg(reinterpret_cast<const uint32_t*>(mr) + ch / 2) >> (16 * (ch % 2));
              x[r].x = f;
            } else {
              f = 0;
#pragma unroll 1
              for (int e = 0; e < n; ++e)
                f |= uint32_t(mr[int64_t(k0 + e) * p.mask_col_stride] != 0) << e;
              x[r] = uint4{mask_bits_to_bytes(f), mask_bits_to_bytes(f >> 4),
                           mask_bits_to_bytes(f >> 8), mask_bits_to_bytes(f >> 12)};
            }
          }
          auto kept = [&](int r, int e) -> bool {
            if constexpr (kListedBits) {
              return ((x[r].x >> e) & 1u) != 0;
            } else {
              const uint32_t w = e < 4 ? x[r].x : e < 8 ? x[r].y : e < 12 ? x[r].z : x[r].w;
              return (w & (0xffu << (8 * (e % 4)))) != 0;
            }
          };
#pragma unroll
          for (int e = 0; e < 16; e += 2) {  // keys k0 + e, + 1: rows 0-31, rows 32-63 each
            const uint32_t a0 = __ballot_sync(0xffffffffu, kept(0, e));
            const uint32_t a1 = __ballot_sync(0xffffffffu, kept(1, e));
            const uint32_t b0 = __ballot_sync(0xffffffffu, kept(0, e + 1));
            const uint32_t b1 = __ballot_sync(0xffffffffu, kept(1, e + 1));
            if (lane == 0) st_shared_u128(words + 8 * (16 * ch + e), uint4{a0, a1, b0, b1});
          }
        }
        __syncwarp();  // lane 0's words before every lane reads them back
        // bit 0: every element of the warp's keys kept; bit 1: some element
        const uint4 v = ld_shared_u128(words + 16 * lane);
        const bool all = __all_sync(0xffffffffu, (v.x & v.y & v.z & v.w) == ~0u);
        const bool any = __any_sync(0xffffffffu, (v.x | v.y | v.z | v.w) != 0u);
        if (lane == 0)
          reinterpret_cast<volatile int*>(smem + Smem::kOffMaskFull)[2 * s + wh] =
              (all ? 1 : 0) | (any ? 2 : 0);
        mbar_arrive(bar_full(s));  // release: this lane's stores before the consumers' reads
      }
    } else if (role == kBwdDqWriter) {  // warp 1 with the writer: dQ tiles into dq_accum
      if constexpr (Smem::kDqWriter) {
        // Per item: wait for slot k's tile (every dQ warp's stores), take the deterministic turn,
        // lane 0 adds the tile (one bulk tensor reduce through args.dqa: rows past the end and
        // the padded columns are out of bounds), frees the slot once the adds have read it, and
        // in deterministic mode waits for them to complete before passing the turn on. The
        // consumers never wait on global memory.
        // Shuffled copies are warp-uniform to the compiler (the tensor reduce's coordinates go
        // to uniform registers).
        const int b_u = __shfl_sync(0xffffffffu, b, 0);
        if (lane == 0) tma_prefetch(&args.dqa);
        int j = 0;  // the walk's position: slot j % kDqSlots, as the consumers fill them
        for (int i = next_item_warp(0); i < n_items; i = next_item_warp(i + 1), ++j) {
          if (kWriters == 2 && j % 2 != warp - 1) continue;  // the other writer's item
          const int k = j % Smem::kDqSlots;
          // DM_SM90_BWD_DQ_SHARED_SLOT: the other writer's adds of item j - 1 read the slot first
          if (kWriters == 2 && kSharedSlot && j > 0) mbar_wait(bar_dq_empty(0), (j - 1) & 1);
          // per item from an opaque base (held across the loop it spilled)
          const uint32_t ring = __shfl_sync(0xffffffffu, opaque(base) + Smem::kOffDQ, 0);
          mbar_wait(bar_dq_full(k), (j / Smem::kDqSlots) & 1);
          const int h = __shfl_sync(0xffffffffu, head_of(i), 0);
          const int m0 = __shfl_sync(0xffffffffu, m0_of(i), 0);
          const bool add = __shfl_sync(0xffffffffu, ld_shared_u32(dq_skip(k)), 0) == 0;
          int32_t* turn = dq_counter(h, m0);
          const int target = turn != nullptr ? dq_target(h, m0) : 0;
          // A dropped tile still waits for its turn: its +1 must not count for an earlier one.
          if (turn != nullptr && lane == 0) {
            while (ld_acquire_gpu(turn) < target) {
            }
            fence_proxy_async_global();  // the earlier tiles' adds, then these (async proxy)
          }
          __syncwarp();
          if (lane == 0) {
            if (add) {
              tma_reduce_add_4d(&args.dqa, ring + uint32_t(k) * Smem::kDQSlot, 0, m0, h, b_u);
              bulk_commit();
              bulk_wait_read<0>();
            }
            mbar_arrive(bar_dq_empty(k));  // the slot was read: the dQ warps may refill it
            if (turn != nullptr) {
              if (add) {  // the adds are complete in global memory: the next key tile's turn
                bulk_wait<0>();
                fence_proxy_async_global();
              }
              red_release_gpu_add(turn, 1);
            }
          }
          // (racecheck build: the other lanes read dq_skip(k) above)
          if (kWarpArrivals > 1 && lane != 0) mbar_arrive(bar_dq_empty(k));
          __syncwarp();
        }
        if (lane == 0) bulk_wait<0>();  // the adds are complete before the CTA exits
      }
    }
    return;
  }

  // ------------------------------------------------------------------------------ consumers
  setmaxnreg_inc<kConsumerRegs>();
  const int c = wg - 1;  // consumer index: keys 64c .. 64c + 63 of the tile
  const int g = lane / 4, t = lane % 4;
  const int key_l[2] = {64 * c + 16 * warp + g, 64 * c + 16 * warp + g + 8};  // tile-local
  const int key[2] = {n0 + key_l[0], n0 + key_l[1]};
  uint8_t* ds_ptr = smem + Smem::kOffDS + c * Smem::kDS;
  const bool want_dbias = kHasBias && bp.dbias_mode != 0;

  float dk[kDF][4], dv[kDF][4];
#pragma unroll
  for (int j = 0; j < kDF; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[j][e] = dv[j][e] = 0.f;
  float colsum[2] = {0.f, 0.f};  // key-row dbias of the current head
  float row_bias[2] = {0.f, 0.f};  // key-row bias of the current head (log2 units)

  auto release = [&](uint32_t bar) { warp_arrive(bar, lane); };

  // Deterministic mode: waits (the whole warp polls one word) for this warp's turn to add
  // into query tile m0 of head h (its count `target`: the stage's word 2, read before the
  // stage was released) and returns its counter; null in the default mode.
  auto dq_turn = [&](int h, int m0, int target) -> int32_t* {
    int32_t* turn = dq_counter(h, m0);
    if (turn == nullptr) return nullptr;
    while (ld_acquire_gpu(turn) < target) {
    }
    fence_proxy_async_global();  // the earlier adds, then this warp's (async proxy)
    return turn;
  };
  // Key-row dbias: the column sums of head h (-1: none) are complete once the walk reaches
  // another head's item or ends (a head with no listed item keeps its zero fill); the stage
  // names the walk's previous head (word 1), so no register holds it across items.
  auto finish_head = [&](int h) {
    if (bias_row && want_dbias && h >= 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float v = colsum[r];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        colsum[r] = 0.f;
        if (t == 0 && key[r] < len_k) {
          const int64_t at = int64_t(b) * bp.dbias_batch_stride +
                             int64_t(h) * bp.dbias_head_stride +
                             int64_t(key[r]) * bp.dbias_col_stride;
          if (bp.dbias_is_fp32)  // a shared key row's float32 partials (summed on the host side)
            static_cast<float*>(bp.dbias)[at] = v;
          else
            static_cast<T*>(bp.dbias)[at] = from_float<T>(v);
        }
      }
    }
  };

  mbar_wait(bar_kv, 0);
  for (int jw = 0;; ++jw) {  // the walk's position: stage jw % kStages, dQ slot jw % kDqSlots
    const int s = jw % kStages;
    mbar_wait(bar_full(s), (jw / kStages) & 1);
    // the producer's item (-1: the walk has ended), read once: the stage is refilled after
    // this item releases it
    const int i = int(ld_shared_u32(stage_word(s, 0)));
    if (i < 0) {
      if (bias_row) finish_head(int(ld_shared_u32(stage_word(s, 1))));
      break;
    }
    const int h = head_of(i), m0 = m0_of(i);
    if (bias_row && h != int(ld_shared_u32(stage_word(s, 1)))) {
      finish_head(int(ld_shared_u32(stage_word(s, 1))));
      const int bias_h = h / p.bias_head_ratio, bias_b = p.bias_batch_stride != 0 ? b : 0;
      const T* bb = static_cast<const T*>(p.bias) + int64_t(bias_b) * p.bias_batch_stride +
                    int64_t(bias_h) * p.bias_head_stride;
#pragma unroll
      for (int r = 0; r < 2; ++r)
        row_bias[r] = key[r] < len_k ? to_float(bb[int64_t(key[r]) * p.bias_col_stride]) * kLog2e
                                     : 0.f;
    }
    if constexpr (kHasMask) {
      // A tile the mask drops entirely adds nothing (P = dS = 0; dbias stays the zero it was
      // filled with): release the stage, take the deterministic turn, finish a key row's dbias.
      const int* flags = reinterpret_cast<const int*>(smem + Smem::kOffMaskFull) + 2 * s;
      if (!((flags[0] | flags[1]) & 2)) {
        const int target = Smem::kDqWriter ? 0 : int(ld_shared_u32(stage_word(s, 2)));
        release(bar_empty(s));
        if (Smem::kBoxes == 2 || c == 0) {
          if constexpr (Smem::kDqWriter) {  // the item still passes the ring: its turn
            const int k = jw % Smem::kDqSlots;
            mbar_wait(bar_dq_empty(k), ((jw / Smem::kDqSlots) & 1) ^ 1);
            if (c == 0 && warp == 0 && lane == 0) st_shared_u32(dq_skip(k), 1);
            release(bar_dq_full(k));
          } else {
            int32_t* turn = dq_turn(h, m0, target);
            __syncwarp();
            if (turn != nullptr && lane == 0) red_release_gpu_add(turn, 1);
          }
        }
        continue;
      }
    }

    // S^T = K Q^T and dP^T = V dO^T: 64 keys x 64 queries each, committed as two groups so
    // that P^T can be formed while dP^T is still running (below).
    float st[kNF][4], dpt[kNF][4];
    {
      const uint32_t k_base = opaque(sK + c * 64 * 128), v_base = opaque(sV + c * 64 * 128);
      const uint32_t q_base = opaque(sQ + s * Smem::kQ), o_base = opaque(sdO + s * Smem::kQ);
      fence_operands(st);
      fence_operands(dpt);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kHeadDim / 16; ++ks)
        Wgmma<T, kBlockM>::template ss<0>(st, desc_k_major<kBlockN>(k_base, ks),
                                          desc_k_major<kBlockM>(q_base, ks), ks > 0);
      wgmma_commit();
#pragma unroll
      for (int ks = 0; ks < kHeadDim / 16; ++ks)
        Wgmma<T, kBlockM>::template ss<0>(dpt, desc_k_major<kBlockN>(v_base, ks),
                                          desc_k_major<kBlockM>(o_base, ks), ks > 0);
      wgmma_commit();
    }

    // Pointwise: st <- P^T, dpt <- dS^T = dx * dz/ds; dbias from dx.
    // edge: a sequence end or window edge crosses the tile; partial: also the mask drops
    // something in it (its words are not all true).
    const bool edge = n0 + kBlockN > len_k || m0 + kBlockM > len_q ||
                      (p.window_right >= 0 && n0 + kBlockN - 1 > m0 + off + p.window_right) ||
                      (p.window_left >= 0 && n0 < m0 + kBlockM - 1 + off - p.window_left);
    bool partial = edge;
    // This thread's two keys' query words, shifted so that bit 8j + (e & 1) is the row of
    // element (j, e).
    uint64_t mword[2] = {~0ull, ~0ull};
    if constexpr (kHasMask) {
      const int* full = reinterpret_cast<const int*>(smem + Smem::kOffMaskFull) + 2 * s;
      partial = edge || !(full[0] & full[1] & 1);
      const uint64_t* words = reinterpret_cast<const uint64_t*>(smem + Smem::kOffMask +
                                                                s * Smem::kMaskBits);
#pragma unroll
      for (int r = 0; r < 2; ++r) mword[r] = words[key_l[r]] >> (2 * t);
    }
    const float* sl = sLse + s * kBlockM;
    const float* sd = sDsum + s * kBlockM;
    uint8_t* sb = smem + Smem::kOffBias + s * Smem::kBias;
    // Bias-tile offsets are recomputed per item from opaque values: hoisted out of the item
    // loop they would hold 32 registers (primitives.cuh: opaque).
    const int kb_l[2] = {int(opaque(uint32_t(key_l[0]))), int(opaque(uint32_t(key_l[1])))};
    // A full tile's dbias (dx) replaces the bias element it was read from in the stage (the
    // same thread, or with DM_SM90_BWD_BIAS_LDSM the same warp, reads and writes each element);
    // dbias_out copies the box to global memory.
    const bool db_tile = want_dbias && bias_tile;
#if DM_SM90_BWD_BIAS_LDSM && !DM_SM90_BWD_DQ_ATOMIC
    // Query block i (fragments j = 2i, 2i + 1) of this warp's keys, loaded and stored just in
    // time inside the loops below (all 16 words live at once spilled d128): word 2 (j % 2) + r
    // is key key_l[r], queries 8j + 2t (low half) and + 1 (high half).
    constexpr bool kBiasLdsm = true;
    const uint32_t ldsm_at = smem_u32(sb) + sm90_bwd_bias_ldsm_offset<kBlockM>(c, warp, lane);
#else
    constexpr bool kBiasLdsm = false;
    const uint32_t ldsm_at = 0;
#endif
    uint32_t bq[4] = {0, 0, 0, 0}, dq4[4] = {0, 0, 0, 0};  // kBiasLdsm: block i's words
    auto bias_block = [&](int j) {  // before fragment j = 2i: its bias words
      if (kBiasLdsm && bias_tile_rt && j % 2 == 0) ldsm_x4_trans(bq, ldsm_at + 1024 * j);
    };
    auto dbias_block = [&](int j) {  // after fragment j = 2i + 1: its dbias words
      if (kBiasLdsm && db_tile && j % 2 == 1)
        stsm_x4_trans(ldsm_at + 1024 * (j - 1), dq4[0], dq4[1], dq4[2], dq4[3]);
    };
    // Query m0 + 2t + kk (kk = 8j + e % 2) of key r passes the sequence ends and the
    // causal/window rule iff qb[r].lo <= kk <= qb[r].hi (block_info.cuh: window_line_bounds;
    // a key past len_k passes nothing): set once per tile before the masked copy runs.
    LineBounds qb[2];
    auto query_bounds = [&]() {
      const int q0 = m0 + 2 * t;
#pragma unroll
      for (int r = 0; r < 2; ++r)
        qb[r] = window_line_bounds<kBlockM>(key[r] - off - q0,
                                            key[r] < len_k ? len_q - 1 - q0 : -1,
                                            p.window_left, p.window_right);
    };
    // P of element (j, e) from the raw score st[j][e] and the row's lse (log2 units); dsoft =
    // dz/ds. The masked copy (BoolTag<true>) tests the element when the tile is partial
    // (sequence ends, window edges, the mask's words) against qb and the mask word; the
    // unmasked copy has no per-element test (full tiles).
    auto prob = [&](auto masked, int j, int e, float lse2, float& dsoft) -> float {
      const int r = e >> 1, qq = 8 * j + 2 * t + (e & 1);
      float x;
      if constexpr (bias_row) x = logit_log2(p, st[j][e], bp.scale, dsoft, row_bias[r]);
      else x = logit_log2(p, st[j][e], bp.scale, dsoft);
      if (bias_tile_rt) {
        T bv;
        if constexpr (kBiasLdsm) {
          const uint32_t w = bq[2 * (j % 2) + r];
          bv.bits = uint16_t((e & 1) ? w >> 16 : w & 0xffffu);
        } else {
          bv.bits = *reinterpret_cast<const uint16_t*>(sb + tile_offset<2, 64, kBlockM>(qq, kb_l[r]));
        }
        x += to_float(bv) * kLog2e;
      }
      if constexpr (decltype(masked)::value) {
        const int kk = 8 * j + (e & 1);
        bool keep = kk >= qb[r].lo && kk <= qb[r].hi;
        if constexpr (kHasMask) keep = keep && ((mword[r] >> (8 * j + (e & 1))) & 1u) != 0;
        return keep ? fast_exp2(x - lse2) : 0.f;
      }
      return fast_exp2(x - lse2);
    };
    // dx = P (dP - dsum) into dbias and the column sums; dpt[j][e] <- dS = dx * dsoft.
    auto grad = [&](int j, int e, float pr, float dsum, float dsoft) {
      const int r = e >> 1, qq = 8 * j + 2 * t + (e & 1);
      const float dx = pr * (dpt[j][e] - dsum);
#if DM_SM90_BWD_DQ_ATOMIC  // the A/B variant keeps phase 1's per-element global stores
      if (db_tile && key[r] < len_k && m0 + qq < len_q)
        static_cast<T*>(bp.dbias)[int64_t(b) * bp.dbias_batch_stride +
                                  int64_t(h) * bp.dbias_head_stride +
                                  int64_t(m0 + qq) * bp.dbias_row_stride +
                                  int64_t(key[r]) * bp.dbias_col_stride] = from_float<T>(dx);
#else
      if (db_tile) {
        if constexpr (kBiasLdsm) {  // packed by pairs (e, e + 1); dbias_block stores them
          const uint32_t h = from_float<T>(dx).bits;
          uint32_t& w = dq4[2 * (j % 2) + r];
          w = (e & 1) ? (w & 0xffffu) | (h << 16) : h;
        } else {
          *reinterpret_cast<uint16_t*>(sb + tile_offset<2, 64, kBlockM>(qq, kb_l[r])) =
              from_float<T>(dx).bits;
        }
      }
#endif
      colsum[r] += dx;
      dpt[j][e] = dx * dsoft;
    };
    // This consumer's dbias box (64 queries x keys 64c..) from the stage to global memory, by
    // 16-byte chunks where rows allow (8 threads per 128-byte row), by aligned 16-byte chunks
    // of rows at any alignment (2 threads per row), else by element; only in-bounds elements.
    // Called after a barrier that follows every consumer thread's writes.
    auto dbias_out = [&]() {
      T* db = static_cast<T*>(bp.dbias) + int64_t(b) * bp.dbias_batch_stride +
              int64_t(h) * bp.dbias_head_stride;
      const uint8_t* box = sb + c * (64 * kBlockM * 2);
      const int tid = threadIdx.x % 128, k0 = n0 + 64 * c;
      const bool vec = bp.dbias_col_stride == 1 && bp.dbias_row_stride % 8 == 0 &&
                       len_k % 8 == 0 && reinterpret_cast<uint64_t>(db) % 16 == 0;
      if (vec) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int chunk = tid + 128 * i, row = chunk / 8, col = 8 * (chunk % 8);
          if (m0 + row < len_q && k0 + col < len_k)
            *reinterpret_cast<uint4*>(db + int64_t(m0 + row) * bp.dbias_row_stride + k0 + col) =
                *reinterpret_cast<const uint4*>(box + swizzle<128>(uint32_t(row * 128 + 2 * col)));
        }
      } else if (bp.dbias_col_stride == 1) {
        // Rows at any 2-byte alignment (Sk no multiple of 8, a view): two threads per box row,
        // each storing every other 16-byte chunk of it (primitives.cuh: row_chunk; up to 9 per
        // row), full chunks by one 16-byte store of the five box words from the even column at
        // or below the chunk's first element, shifted by one element where that is odd.
        const int row = tid / 2, ncols = dm_min(64, len_k - k0);
        if (m0 + row < len_q && ncols > 0) {
          T* dst = db + int64_t(m0 + row) * bp.dbias_row_stride + k0;
          const int lead = int(reinterpret_cast<uint64_t>(dst) / sizeof(T) % 8);
          const uint8_t* brow = box + row * 128;
          const uint32_t xr = uint32_t(row % 8) << 4;  // swizzle<128> of this row's bytes
          for (int q = tid % 2; q < row_chunks(lead, ncols); q += 2) {
            const RowChunk ch = row_chunk(q, lead, ncols);
            const int c0 = ch.e0 - (ch.e0 & 1);
            uint32_t w[5];
#pragma unroll
            for (int k = 0; k < 5; ++k) {
              const int cc = c0 + 2 * k;  // even: one word, both elements in the box or neither
              w[k] = cc >= 0 && cc < 64
                         ? *reinterpret_cast<const uint32_t*>(brow + ((2 * cc) ^ xr))
                         : 0u;
            }
            uint32_t o[4];
#pragma unroll
            for (int m = 0; m < 4; ++m) o[m] = __funnelshift_r(w[m], w[m + 1], 16 * (ch.e0 & 1));
            if (ch.lo == 0 && ch.hi == 8) {
              st_global_u128(dst + ch.e0, uint4{o[0], o[1], o[2], o[3]});
            } else {
#pragma unroll
              for (int j = 0; j < 8; ++j)
                if (j >= ch.lo && j < ch.hi) {
                  T v;
                  v.bits = uint16_t(o[j / 2] >> (16 * (j % 2)));
                  dst[ch.e0 + j] = v;
                }
            }
          }
        }
      } else {
        for (int i = 0; i < 32; ++i) {
          const int el = tid + 128 * i, row = el / 64, col = el % 64;
          if (m0 + row < len_q && k0 + col < len_k) {
            T v;
            v.bits = *reinterpret_cast<const uint16_t*>(box + swizzle<128>(uint32_t(row * 128 + 2 * col)));
            db[int64_t(m0 + row) * bp.dbias_row_stride + int64_t(k0 + col) * bp.dbias_col_stride] = v;
          }
        }
      }
    };
    auto row_pair = [&](const float* v, int j) {  // rows 8j + 2t, +1 of a per-query vector
      return *reinterpret_cast<const float2*>(v + 8 * j + 2 * t);
    };
    // Without a softcap dz/ds is the scale: P^T is formed while dP^T runs (wait<1>: only the
    // S^T group is complete), then dS^T after wait<0>.
    auto probs_only = [&](auto masked) {
#pragma unroll
      for (int j = 0; j < kNF; ++j) {
        const float2 l2 = row_pair(sl, j);
        bias_block(j);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float dsoft;
          st[j][e] = prob(masked, j, e, (e & 1) ? l2.y : l2.x, dsoft);
        }
      }
    };
    // With a softcap dz/ds varies per element (1 - tanh^2): one pass after both products,
    // testing every element (a copy specialized for full tiles made d128 spill).
    auto probs_and_grads = [&](auto masked) {
#pragma unroll
      for (int j = 0; j < kNF; ++j) {
        const float2 l2 = row_pair(sl, j), d2 = row_pair(sd, j);
        bias_block(j);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float dsoft;
          const float pr = prob(masked, j, e, (e & 1) ? l2.y : l2.x, dsoft);
          grad(j, e, pr, (e & 1) ? d2.y : d2.x, dsoft);
          st[j][e] = pr;
        }
        dbias_block(j);
      }
    };
    if (!has_softcap(p)) {
      wgmma_wait<1>();
      fence_operands(st);
      if (partial) {
        query_bounds();
        probs_only(BoolTag<true>());
      } else
        probs_only(BoolTag<false>());
      wgmma_wait<0>();
      fence_operands(dpt);
#pragma unroll
      for (int j = 0; j < kNF; ++j) {
        const float2 d2 = row_pair(sd, j);
#pragma unroll
        for (int e = 0; e < 4; ++e) grad(j, e, st[j][e], (e & 1) ? d2.y : d2.x, bp.scale);
        dbias_block(j);
      }
    } else {
      wgmma_wait<0>();
      fence_operands(st);
      fence_operands(dpt);
      query_bounds();
      probs_and_grads(BoolTag<true>());
    }
    uint32_t pa[kBlockM / 16][4], da[kBlockM / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      pa[kk][0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
      pa[kk][1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
      pa[kk][2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      pa[kk][3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      da[kk][0] = pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]);
      da[kk][1] = pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]);
      da[kk][2] = pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      da[kk][3] = pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
    }

    // dV += P^T dO, dK += dS^T Q (K = the tile's 64 queries; dO and Q are MN-major B).
    {
      const uint32_t q_base = opaque(sQ + s * Smem::kQ), o_base = opaque(sdO + s * Smem::kQ);
      fence_operands(dv);
      fence_operands(dk);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk)
        Wgmma<T, kHeadDim>::template rs<1>(dv, pa[kk], desc_mn_major<kBlockM>(o_base, kk), 1);
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk)
        Wgmma<T, kHeadDim>::template rs<1>(dk, da[kk], desc_mn_major<kBlockM>(q_base, kk), 1);
      wgmma_commit();
    }

    // dS^T to shared memory as [key][query] (128-byte rows, 128B swizzle): the M-major A of
    // dQ. One buffer: the first barrier says every warp whose dQ products read this buffer
    // (both consumers'; the A/B variant: this consumer's) has finished the previous item's
    // (each waited on them).
    constexpr int kDsBarThreads = DM_SM90_BWD_DQ_ATOMIC ? 128 : 256;
    const int ds_bar = DM_SM90_BWD_DQ_ATOMIC ? 1 + c : 1;
    named_bar_sync(ds_bar, kDsBarThreads);
    const int ds_row = int(opaque(uint32_t(16 * warp + g)));  // not hoisted: see kb_l
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk)
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const int j = 2 * kk + (w >> 1), r = w & 1;
        *reinterpret_cast<uint32_t*>(ds_ptr + tile_offset<2, 64, 64>(ds_row + 8 * r,
                                                                     8 * j + 2 * t)) = da[kk][w];
      }
    fence_proxy_async_smem();  // also orders the dbias stage writes before the next TMA
    named_bar_sync(ds_bar, kDsBarThreads);

    float* dqa = bp.dq_accum + int64_t(b) * bp.dqa_batch_stride + int64_t(h) * bp.dqa_head_stride;
#if DM_SM90_BWD_DQ_ATOMIC
    // dQ (64 queries x 64 columns per pass) += dS (M-major A) K (rows 64c.., MN-major B).
#pragma unroll
    for (int nh = 0; nh < Smem::kBoxes; ++nh) {
      float acc[8][4];
      const uint32_t ds_base = opaque(base + Smem::kOffDS + c * Smem::kDS);
      const uint32_t kb = opaque(sK + nh * kBlockN * 128 + c * 64 * 128);
      fence_operands(acc);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        Wgmma<T, 64>::template ss<1, 1>(acc, desc_mn_major<64>(ds_base, kk),
                                        desc_mn_major<kBlockN>(kb, kk), kk > 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(acc);
      if (nh == 0) {  // dV/dK (committed earlier) are complete too: the stage is free
        fence_operands(dv);
        fence_operands(dk);
        keep_live(pa);  // the register A operands stay allocated until their wgmma is done
        keep_live(da);
        release(bar_empty(s));
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int q = m0 + 16 * warp + g + 8 * r;
        if (q >= len_q) continue;
        float* row = dqa + int64_t(q) * bp.dqa_row_stride;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int col = 64 * nh + 8 * j + 2 * t;
          if (col < p.head_dim)
            asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(row + col),
                         "f"(acc[j][2 * r]), "f"(acc[j][2 * r + 1])
                         : "memory");
        }
      }
    }
#else
    // dQ (64 queries x the 64 columns of box c) += dS (M-major A: 8 k16 steps over both
    // consumers' dS^T halves, adjacent in shared memory) K (all 128 rows of box c, MN-major B).
    if (Smem::kBoxes == 2 || c == 0) {
      float acc[8][4];
      {
        const uint32_t ds_base = opaque(base + Smem::kOffDS);
        const uint32_t kb = opaque(sK + c * kBlockN * 128);
        fence_operands(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk)
          Wgmma<T, 64>::template ss<1, 1>(acc, desc_mn_major<64>(ds_base, kk),
                                          desc_mn_major<kBlockN>(kb, kk), kk > 0);
        wgmma_commit();
        if (db_tile) dbias_out();  // while the dQ product runs; the stage is released below
        wgmma_wait<0>();
        fence_operands(acc);
      }
      fence_operands(dv);  // dV/dK (committed earlier) are complete too: the stage is free
      fence_operands(dk);
      keep_live(pa);  // the register A operands stay allocated until their wgmma is done
      keep_live(da);
      // (without the writer: the turn target, before the stage goes back to the producer)
      const int target = Smem::kDqWriter ? 0 : int(ld_shared_u32(stage_word(s, 2)));
      release(bar_empty(s));
      if constexpr (Smem::kDqWriter) {
        // Into slot k of the writer's ring once its adds have read the slot's last tile: this
        // warp's rows 16 warp + g (+ 8), consumer c's 64 columns; then the writer takes it.
        const int k = jw % Smem::kDqSlots;
        mbar_wait(bar_dq_empty(k), ((jw / Smem::kDqSlots) & 1) ^ 1);
        const uint32_t tile = base + Smem::kOffDQ + uint32_t(k) * Smem::kDQSlot + 256u * c;
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            st_shared_f32x2(tile + uint32_t(16 * warp + g + 8 * r) * Smem::kDQTileRow +
                                uint32_t(8 * j + 2 * t) * 4,
                            acc[j][2 * r], acc[j][2 * r + 1]);
        fence_proxy_async_smem();  // this lane's stores before the writer's bulk adds read them
        if (c == 0 && warp == 0 && lane == 0) st_shared_u32(dq_skip(k), 0);
        release(bar_dq_full(k));
      } else {
        // Stage this warp's 16 rows x 64 columns, then lane 0 adds them row by row (the global
        // rows are dqa_row_stride apart). The previous item's adds (issued by lane 0) must have
        // read the buffer first. The shuffled copies of warp and c are warp-uniform to the
        // compiler, so lane 0's loop runs on uniform registers (UBLKRED takes only those).
        const int warp_u = __shfl_sync(0xffffffffu, warp, 0);
        const int c_u = __shfl_sync(0xffffffffu, c, 0);
        const uint32_t stage = base + Smem::kOffDQ + uint32_t(c_u * 4 + warp_u) * Smem::kDQWarp;
        if (lane == 0) bulk_wait_read<0>();
        __syncwarp();
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int r = 0; r < 2; ++r)
            st_shared_f32x2(stage + uint32_t(g + 8 * r) * Smem::kDQRow +
                                uint32_t(8 * j + 2 * t) * 4,
                            acc[j][2 * r], acc[j][2 * r + 1]);
        fence_proxy_async_smem();  // this lane's stores before the async proxy reads them
        __syncwarp();
        int32_t* turn = dq_turn(h, m0, target);
        if (lane == 0) {
          const int q0 = m0 + 16 * warp_u;
          const int rows = dm_min(16, len_q - q0);              // rows past the end are not added
          const int cols = dm_min(64, p.head_dim - 64 * c_u);  // nor padded columns
          if (cols > 0) {
            float* dst = dqa + int64_t(q0) * bp.dqa_row_stride + 64 * c_u;
            uint32_t src = stage;
            for (int rr = 0; rr < rows; ++rr, dst += bp.dqa_row_stride, src += Smem::kDQRow)
              bulk_reduce_add_f32(dst, src, uint32_t(cols) * 4);
          }
          bulk_commit();
          if (turn != nullptr) {  // this warp's adds are complete in global memory: next turn
            bulk_wait<0>();
            fence_proxy_async_global();
            red_release_gpu_add(turn, 1);
          }
        }
      }
    } else {  // d64: consumer 1 has no dQ columns; its dV/dK must still finish
      if (db_tile) dbias_out();
      wgmma_wait<0>();
      fence_operands(dv);
      fence_operands(dk);
      keep_live(pa);
      keep_live(da);
      release(bar_empty(s));
    }
#endif
  }

#if !DM_SM90_BWD_DQ_ATOMIC
  // this warp's dQ adds are complete before the CTA exits (with the writer: it waits)
  if (!Smem::kDqWriter && lane == 0) bulk_wait<0>();
#endif
  // dK, dV rows of this thread (keys key[r]); columns past head_dim are padding.
  T* dkp = static_cast<T*>(bp.dk) + int64_t(b) * bp.dk_batch_stride + int64_t(kvh) * bp.dk_head_stride;
  T* dvp = static_cast<T*>(bp.dv) + int64_t(b) * bp.dv_batch_stride + int64_t(kvh) * bp.dv_head_stride;
  // Where rows allow 16-byte stores (the same for every consumer thread), this warp's 16 rows go
  // through shared memory: dK over the K tile, dV over the V tile (free once both consumers'
  // last products, which read all 128 keys of K and V, completed: the barrier), then one
  // coalesced 16-byte store per chunk of 8 columns; 64 scattered 4-byte stores per thread took
  // ~8% of the no-mask kernel's samples (store-queue bound, one CTA per SM).
  const bool vec = p.head_dim % 8 == 0 && bp.dk_row_stride % 8 == 0 &&
                   bp.dv_row_stride % 8 == 0 && reinterpret_cast<uint64_t>(dkp) % 16 == 0 &&
                   reinterpret_cast<uint64_t>(dvp) % 16 == 0;
  if (vec) {
    static_assert(Smem::kKV == kBlockN * kHeadDim * 2 && Smem::kOffV == Smem::kKV,
                  "K and V tiles hold one staged 128-row dK / dV tile each");
    named_bar_sync(kEpilogueBar, 256);
    const uint32_t stage = smem_u32(smem + Smem::kOffK);
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int j = 0; j < kDF; ++j) {
        const uint32_t o = sm90_bwd_dkv_stage_offset<kHeadDim>(key_l[r], 8 * j + 2 * t);
        st_shared_u32(stage + o, pack2<T>(dk[j][2 * r], dk[j][2 * r + 1]));
        st_shared_u32(stage + Smem::kKV + o, pack2<T>(dv[j][2 * r], dv[j][2 * r + 1]));
      }
    __syncwarp();
    constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
    const int row0 = 64 * c + 16 * warp;   // this warp's rows: key_l[0] - g ..
#pragma unroll
    for (int i = 0; i < 16 * kChunks / 32; ++i) {
      const int chunk = lane + 32 * i, row = row0 + chunk / kChunks, col = 8 * (chunk % kChunks);
      if (n0 + row >= len_k || col >= p.head_dim) continue;
      const uint32_t o = sm90_bwd_dkv_stage_offset<kHeadDim>(row, col);
      st_global_u128(dkp + int64_t(n0 + row) * bp.dk_row_stride + col, ld_shared_u128(stage + o));
      st_global_u128(dvp + int64_t(n0 + row) * bp.dv_row_stride + col,
                     ld_shared_u128(stage + Smem::kKV + o));
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= len_k) continue;
#pragma unroll
    for (int j = 0; j < kDF; ++j) {
      const int col = 8 * j + 2 * t;
      if (col >= p.head_dim) continue;
      *reinterpret_cast<uint32_t*>(dkp + int64_t(key[r]) * bp.dk_row_stride + col) =
          pack2<T>(dk[j][2 * r], dk[j][2 * r + 1]);
      *reinterpret_cast<uint32_t*>(dvp + int64_t(key[r]) * bp.dv_row_stride + col) =
          pack2<T>(dv[j][2 * r], dv[j][2 * r + 1]);
    }
  }
}

}  // namespace dm
