// sm90/fwd.cu: the Hopper forward kernel (FlashAttention-3's structure, sm_90a).
// A CTA of three warpgroups owns kBlockM = 128 query rows of one (batch, head):
// - warpgroup 0 is the producer: one warp walks the key tiles, classifies each (empty tiles
//   are never loaded; with a bool mask the mask tiles stream through their own ring a few
//   tiles ahead, and an all-false tile is dropped before its K/V/bias are requested; an
//   all-true one needs no per-element work) and loads K, V and the bias tile by TMA into a
//   kStages-deep ring of mbarrier stages;
// - warpgroups 1 and 2 are consumers, 64 rows each: S = Q K^T by wgmma from shared memory,
//   the logit transform and online softmax in registers, O += P V by wgmma with P from
//   registers. Each software-pipelines its tiles (S of tile j is issued with P V of tile
//   j - 1, and the softmax of j runs while P V is in flight), and the two take turns issuing
//   their products (ping-pong), so one's softmax runs under the other's products.
// The producer hands each stage's tile index and class to the consumers in shared memory; an
// index of -1 ends the walk. Q, K, V, the mask and the bias tile are 64-column (or mask:
// 64-/128-byte) boxes with the 128B/64B swizzle that the wgmma descriptors and the
// consumers' reads (primitives.cuh: tile_offset) expect. Output rows are stored from
// registers, predicated on the sequence and head_dim.
// Mask/bias operands (Sm90FwdArgs::mask_mode / bias_mode, uniform per launch):
//   kTile     (.., Sq, Sk) tiles by TMA; kKeyRow (.., 1, Sk): one row per stage, shared by
//   every query row; kQueryRow (.., Sq, 1) or a scalar: one value per query row, read once
//   (a mask row then keeps or drops the whole row; a bias row only shifts lse, which is
//   exact for finite values only: forward_sm90 sends such biases to the portable kernel);
//   kKeyChunk (varlen key-based (total_k, h')): per stage one chunk of kBlockN keys x
//   chunk_heads values, contiguous in global memory, by 1-D boxes; consumers read their
//   head's column.
//   Key-based loads (kKeyRow, kKeyChunk) start at key_load_start: a TMA box whose first global
//   element is not 16-byte aligned faults ("illegal instruction"), and a packed sequence's
//   first key may sit anywhere; the stage's values then start key_lead elements in.
// Varlen (p.cu_seqlens_q != nullptr, a runtime switch): Q/K/V/O and the mask/bias are packed;
// the maps cover the packed tensors and coordinates start at the sequence's first row
// (cu_seqlens). A box reaching past a sequence's end reads the next sequence: keys >= len_k
// are excluded by formula (their tiles are partial), rows >= len_q are never stored, and the
// all-false/all-true tests over such tiles only err towards doing more work. An empty
// sequence (len_q = 0) exits; len_k = 0 visits no tile (out 0, lse -inf).
// Block-sparse lists (p.sp_full_count != nullptr, runtime): the producer walks the query
// tile's row-block list (full blocks, then MixedMask partial ones, each expanded to
// sp_block_n / kBlockN tiles) instead of the key range; unlisted blocks are never loaded, a
// listed tile outside the causal/window range is passed over, and a partial block's element
// bits are read by the consumers from p.sp_partial_bits (class bit kListedPartial).
#pragma once
#include "../common.cuh"
#include "../params.cuh"
#include "../seqlen.cuh"
#include "../block_info.cuh"
#include "../logits.cuh"
#include "../item_order.cuh"
#include "../softmax.cuh"
#include "primitives.cuh"
#include "wgmma_ops.cuh"

namespace dm {

// A/B switches (DMATTN_NVRTC_DEFINES; forward_sm90 reads the same defines for its tiles and
// shared memory):
// - DM_SM90_MB_MASK_SLOTS: mask slots of the 64-key tiles at head dim <= 128 (the mask + bias
//   specs), default 6 beside their 3 K/V/bias stages (host: DM_SM90_MB_STAGES, default 3;
//   2 stages and 8 slots measured 213-258 TFLOP/s against 277 on the H200's mask_bias case).
// - DM_SM90_KBIAS_F32: without a mask, a key-based bias (a dense key row (B|1, H|1, 1, Sk);
//   varlen: a key row or this head's column of a key chunk) is read by the producer warp
//   (plain loads at any strides, issued before it waits for the stage) and stored as one
//   fp32 row per stage in the bias stage's space instead of by TMA (no tensor map: forward_sm90
//   plans none, so any Sk and any alignment of the element type serve). 0: TMA as for a
//   mask; 1: the consumers add it with the same FFMA from one 8-byte load per key pair (no
//   bf16 unpacking); 2: without a softcap the row is stored divided by the softmax
//   scale and loaded into S's accumulator before S = Q K^T accumulates onto it, so the
//   softmax runs as in the no-bias kernel (with a softcap the producer stores the bf16 row,
//   read by the consumers as a TMA key row would be); 3: as 2, each row half's pair by its
//   own 8-byte load (2 copies it by two moves); 4 (default): on the _krow specs the row enters
//   S by one more k16 step of S = Q K^T instead of the accumulator start (kbias_aux_offset;
//   the tile-bias spec keeps 2's start). H200 kbias: 0 547.5, 1 561.9, 2 566.2, 3 553.8 TFLOP/s.
// - DM_SM90_PERSISTENT: how CTAs get their work items (numbered longest first). 0: one CTA
//   per item; 1: a grid of min(items, SMs) CTAs, each walking a static snake (the same
//   kernel: only the host's grid differs); 2 (default): the dynamic scheduler
//   (FlashAttention-3's): a grid of min(items, SMs) CTAs, CTA x starts with item x and claims
//   each next item from a global counter (Sm90FwdArgs::item_counter) with atomicInc, so the
//   first free CTA takes the longest item left. forward_sm90 reads it for the grid and the
//   shared memory. H200, 2 against 0 (two runs): dense +3.0/+3.3%, causal +4.6/+2.8%,
//   mask_bias +4.7%, kbias -4.9/+1.5%, gqa -2.9/+0.4%.
#ifndef DM_SM90_MB_MASK_SLOTS
#define DM_SM90_MB_MASK_SLOTS 6
#endif
#ifndef DM_SM90_PERSISTENT
#define DM_SM90_PERSISTENT 2
#endif
static_assert(DM_SM90_PERSISTENT >= 0 && DM_SM90_PERSISTENT <= 2, "DM_SM90_PERSISTENT: 0, 1 or 2");
constexpr bool kDynamicItems = DM_SM90_PERSISTENT == 2;

// The dynamic scheduler's claims (DM_SM90_PERSISTENT=2). The counter is zero when a launch
// starts; claim v (the v-th atomicInc on it, counting from 0) is item v + grid, or none
// (num_items) past the end. Every CTA whose first item exists claims until a claim fails, so a
// launch makes exactly num_items claims (num_items - min(grid, num_items) that succeed, one
// failing per CTA), and atomicInc(counter, num_items - 1) wraps the counter back to 0 at the
// last one: the next launch finds it zero without a memset. Mirrored by forward_sm90's model
// (tests/cpu/test_sm90_sched.py).
__host__ __device__ constexpr uint32_t atom_inc_next(uint32_t old, uint32_t limit) {
  return old >= limit ? 0u : old + 1u;  // what atomicInc(addr, limit) leaves at addr
}
__host__ __device__ constexpr int claimed_item(uint32_t claim, uint32_t grid, int num_items) {
  return claim + grid < uint32_t(num_items) ? int(claim + grid) : num_items;  // no overflow:
}                                                          // claim < num_items < 2^31, grid < 2^31
#ifndef DM_SM90_KBIAS_F32
#define DM_SM90_KBIAS_F32 4
#endif
// - DM_SM90_TIMELINE=1 (measurement, debug builds; tools/sm90_timeline.py): tile_counters get
//   each item's start and end as consumer 0 sees them instead of its tile counts, stamped
//   (CTA << 24) | (%globaltimer / 32 ns mod 2^24).
#ifndef DM_SM90_TIMELINE
#define DM_SM90_TIMELINE 0
#endif
DM_DEVICE uint32_t timeline_stamp() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return (uint32_t(blockIdx.x) << 24) | uint32_t((t >> 5) & 0xffffffu);
}
// - DM_SM90_Q_BUFS: 2 (default) gives Q two buffers where shared memory allows (Sm90FwdSmem::
//   kQBufs), so the producer loads the next work item's Q while the consumers still run the
//   current one; 1: one buffer, loaded once the consumers released the last item's.
// - DM_SM90_CLAIM_AHEAD: 0 (default) makes the dynamic scheduler's claim of the next item after
//   the current one's end stage; 1: at the current one's start (its atomic's round trip hidden
//   behind the item's tiles). A CTA that claims a whole item ahead commits to it an item early,
//   which undoes longest-first at the end of a causal launch: the last section's longest items
//   start behind other items (H200 causal B2 H16 S4096 d128: 542 TFLOP/s and 12.5% of the SMs'
//   time idle at the end with 1, 609 with 0; dense 651-674 either way).
#ifndef DM_SM90_Q_BUFS
#define DM_SM90_Q_BUFS 2
#endif
#ifndef DM_SM90_CLAIM_AHEAD
#define DM_SM90_CLAIM_AHEAD 0
#endif
static_assert(DM_SM90_Q_BUFS == 1 || DM_SM90_Q_BUFS == 2, "DM_SM90_Q_BUFS: 1 or 2");
// - DM_SM90_HEAD_MAJOR: 1 (default) numbers equal-length work items query tile fastest (see
//   the work items below); 0 keeps the longest-first order for them too.
#ifndef DM_SM90_HEAD_MAJOR
#define DM_SM90_HEAD_MAJOR 1
#endif
// - DM_SM90_BIAS_L2_AHEAD: N > 0 (default 1) has the producer of a mask tile spec (a bias tile
//   beside mask tiles, no block lists) prefetch into L2 the bias tile N tiles after the one it
//   loads (TMA prefetches). H100 mask_bias (64-key tiles): 334 -> 345.5 TFLOP/s with 1, 340.6
//   with 2; the document mask unchanged with 1 (-3.6% with 2). The bias-only spec gained
//   nothing (-0.5%) and lost 3.3% beside the pack warps, so it has none.
#ifndef DM_SM90_BIAS_L2_AHEAD
#define DM_SM90_BIAS_L2_AHEAD 1
#endif
// - DM_SM90_ITEM_REMAT: 1 reads the work-item grid's sizes (query tiles, head-batches, items,
//   the numbering switches) from the parameters through opaque at each use, so that none is
//   one value held across the roles. CPU build (NVRTC 12.9): the lists spec
//   (fwd_sm90_bf16_d128_m128n128w12_mask0_bias1_varlen0_st2) then fits 224 consumer registers
//   without spills (at 0: 60 bytes), the ~8 registers the listed bits' fold needs
//   (NOTES, fifty-ninth and sixty-first sessions). Not GPU-run; default 0.
#ifndef DM_SM90_ITEM_REMAT
#define DM_SM90_ITEM_REMAT 0
#endif
// - DM_SM90_LISTED_BIAS: 1 applies a block list's element bits (kListedPartial) on a bias-tile
//   spec to the bias words before their unpack (a dropped key's bias becomes -inf:
//   listed_bias_word), instead of 32 selects per row after the add; a row whose max is then
//   NaN takes the selects after all (drop_listed_nan). Needs DM_SM90_ITEM_REMAT=1's registers
//   (NOTES, fifty-ninth and sixty-first sessions). Not GPU-run; default 0.
#ifndef DM_SM90_LISTED_BIAS
#define DM_SM90_LISTED_BIAS 0
#endif
// - DM_SM90_LPT_HEADS: see ../item_order.cuh (the mask packing of the attn_mask route numbers
//   its block rows the same way).
// - DM_SM90_MB_FOLD: 1 makes the producer warpgroup's warps 1-3 (idle otherwise) fold each
//   mask + bias tile pair (both kTile, 64-key tiles, DM_SM90_PERSISTENT=2) once K's barrier
//   completed: the bias tile is rewritten in place in fragment order (primitives.cuh:
//   frag_order_offset; 4 16-byte loads per consumer thread instead of 16 swizzled 4-byte
//   ones) with -inf where the mask is false (fold_word; only for kMaskPartial tiles), then a
//   per-stage barrier full_f says so. The consumers read no mask words and run the bias-only
//   path; a row whose values in the tile hold a NaN (a NaN or infinite score: -inf + NaN or
//   +-inf) re-reads the mask slot and excludes its masked keys, so NaN handling equals the
//   mask path's (a NaN at a masked key is dropped). The fold warps also arrive on empty_k,
//   so the producer never rewrites a stage (or its info) they still read. 1 (default): H200
//   mask_bias kernel 943 -> 823 us (BENCHMARKS.md); 0: off.
#ifndef DM_SM90_MB_FOLD
#define DM_SM90_MB_FOLD 1
#endif
// - DM_SM90_LAZY_RESCALE: 1 (default) rescales O once the P V product completed (after the
//   softmax, off the GEMM turn) and lazily: a row keeps its softmax max while a tile raises it
//   by at most DM_SM90_LAZY_GAP (log2 units; softmax.cuh: kLazyGap; default 0: only a max
//   that did not move, bit for bit the same values), and a warp skips the rescale (64 FMUL
//   per thread at d128) when none of its rows moved. Only where the softmax is longer than the
//   GEMMs it hides under (a mask or a bias, or one Q buffer: d256); the dense d64/d128 specs
//   keep the eager rescale between their S and P V issues (the late one cost them 1-2%).
//   H200 (ninth session, ncu): full bias 179.2 -> 165.5 us (with the bias ldmatrix and O
//   staging), mask_bias 818.3 -> 801.3, d256 800.5 -> 790.1; 0: eager everywhere. (A gap of 8
//   failed FlashAttention's tolerance rule by 1-10% in 15 GPU tests: P's largest value is
//   then no longer an exact 1.)
#ifndef DM_SM90_LAZY_RESCALE
#define DM_SM90_LAZY_RESCALE 1
#endif
#ifndef DM_SM90_LAZY_GAP
#define DM_SM90_LAZY_GAP 0
#endif
// DM_SM90_EACH_THREAD_ARRIVES=1: the racecheck build (primitives.cuh, warp_arrive): info[],
// stage_item[] and the key-bias/fold rows are handed over by every thread's arrival.

// Tile classes the producer hands over (bits; 0 = full: no per-element work).
constexpr int kFormulaPartial = 1;  // crosses the key end or a causal/window edge
constexpr int kMaskPartial = 2;     // its mask tile has false elements
constexpr int kListedPartial = 4;   // a block list's partial block: its element bits apply

// kOperandPackWarps (mask_mode of a spec without mask tiles, Sm90FwdSmem::kPackWarps): a bool
// (.., Sq, Sk) mask read by the producer's warps 1-3 from p.mask (pack_mask_warps).
enum Sm90Operand : int32_t { kOperandNone = 0, kOperandTile = 1, kOperandKeyRow = 2,
                             kOperandQueryRow = 3, kOperandKeyChunk = 4, kOperandPackWarps = 5 };

// The second kernel parameter (const __grid_constant__): tensor maps over (cols, rows, heads,
// batch) with broadcast dims of size 1, and how the mask/bias are read. Mirrored by
// dmattn_cupy/forward_sm90.py (ARGS_DTYPE; size checked below).
// Key-based operands (kKeyRow: chunk_heads 1; kKeyChunk: chunk_heads values per key, this
// head's column h / head ratio): per stage chunk_boxes boxes of chunk_box elements, covering
// the kBlockN * chunk_heads values and their lead (forward_sm90.chunk_box).
struct alignas(64) Sm90FwdArgs {
  sm90::TmaDesc q, k, v, mask, bias;
  int32_t mask_mode, bias_mode;
  int32_t mask_chunk_heads, bias_chunk_heads, mask_chunk_box, bias_chunk_box;
  int32_t mask_chunk_boxes, bias_chunk_boxes;
  uint32_t* item_counter;  // DM_SM90_PERSISTENT=2: the claim counter (zero between launches)
  // Block lists without a window (forward_sm90.item_order_items): the work item (the kernel's
  // numbering) run as the c-th (flash_fwd_sparse_order_kernel). Null: item c.
  int32_t* item_order;
  // The attn_mask route's overlapped packing (mask_pack.overlaps): per work item a word that
  // mask_rows_kernel sets once the item's block row of lists and bits is written; the producer
  // waits for it before the item and resets it (wait_row_ready). Null: the lists were complete
  // before the launch.
  int32_t* row_ready;
  int32_t pad[2];
};
static_assert(sizeof(Sm90FwdArgs) == 704, "Sm90FwdArgs: size drifted from forward_sm90.py");

// Shared-memory plan of one kernel instance; forward_sm90.smem_bytes mirrors kAlloc.
// kBiasKeyRow (the _krow specs, forward_sm90.key_row_spec): the bias is a key row or key chunk
// read by the producer's plain loads (bias_loads; no mask), so a bias stage holds one row of
// kBlockN values (fp32, or bf16 under a softcap) instead of a tile: at d128 Q then gets two
// buffers, as in the dense spec.
template <int kHeadDim, int kBlockN, int kStages, bool kHasMask, bool kHasBias,
          bool kBiasKeyRow = false>
struct Sm90FwdSmem {
  static constexpr int kBlockM = 128;
  static constexpr int kBoxes = kHeadDim / 64;               // 64-column boxes of Q/K/V rows
  static constexpr int kMaskBoxCols = kBlockN >= 128 ? 128 : kBlockN;  // bytes per mask box row
  static constexpr int kQ = kBoxes * kBlockM * 128;
  static constexpr int kKV = kBoxes * kBlockN * 128;         // one K or V stage
  // DM_SM90_KBIAS_F32 == 4 on a _krow spec (kAuxStep): each K stage is followed by its aux tile
  // (kBlockN key rows of 32 bytes: kbias_aux_offset), at a fixed distance from K's own
  // descriptor (kbias_aux_desc_from_k).
  static constexpr bool kAuxStep = DM_SM90_KBIAS_F32 == 4 && kBiasKeyRow;
  static constexpr int kAux = kAuxStep ? kBlockN * 32 : 0;
  static constexpr int kKStage = kKV + kAux;                 // K stage stride
  static_assert(!kBiasKeyRow || (kHasBias && !kHasMask && DM_SM90_KBIAS_F32 != 0),
                "a key-row bias spec: a bias read by the producer's loads, no mask");
  static constexpr int kBias = !kHasBias ? 0 : kBiasKeyRow ? 1024  // one stage (1 KB aligned)
                                                           : kBlockM * kBlockN * 2;
  // kAuxStep: the aux step's A fragment words (c0 c1, c0 c1, c2, c2) and the producer's two
  // keep masks (kbias_aux_offset) sit at the end of bias stage 0, past its row (kBlockN 16-bit
  // values).
  static constexpr int kAuxA = 992;
  static_assert(!kAuxStep || kBlockN * 2 <= kAuxA, "the A words clear the row");
  static constexpr int kMask = kHasMask ? kBlockM * kBlockN : 0;       // one slot
  // Mask tiles have their own ring, loaded ahead of the K/V ring: the producer classifies a
  // tile from its mask before it spends a K/V stage on it.
  // Consumers hold up to kStages + 1 slots (the tiles in their K/V stages and the one being
  // released), so a load kMaskAhead tiles ahead of the classified one never waits for them.
  // 64-key tiles (8 KB at 128 rows) get 8 slots where shared memory allows, 128-key ones 4.
  static constexpr int kMaskSlots =
      !kHasMask ? 0 : (kBlockN == 64 && kHeadDim <= 128) ? DM_SM90_MB_MASK_SLOTS : 4;
  static constexpr int kMaskAhead = kMaskSlots - kStages - 1;
  static_assert(!kHasMask || kMaskAhead >= 1, "at least one mask tile in flight ahead");
  static constexpr int kMaskRing = kHasMask ? kMaskSlots : 1;  // a nonzero modulus
  // DM_SM90_MB_FOLD: per stage one more barrier (full_f: the folded bias tile is ready).
  static constexpr bool kFold = DM_SM90_MB_FOLD != 0 && kHasMask && kHasBias && kBlockN == 64 &&
                                kDynamicItems;
  // The pack warps (Sm90FwdArgs::mask_mode kOperandPackWarps: a bool mask beside a bias spec
  // without mask tiles, packed by the producer's warps 1-3): per stage one more barrier
  // (info_p: the producer warp wrote the stage's tile). Never beside kFold (it has a mask).
  static constexpr bool kPackWarps = !kHasMask && kHasBias && !kBiasKeyRow && kDynamicItems;
  static constexpr int kStageBars2 = kFold || kPackWarps ? kStages : 0;  // full_f or info_p
  // Everything but Q's buffers (one per work item in flight), then the count that fits.
  static constexpr int kRest = kStages * (kKStage + kKV + kBias) + kMaskSlots * kMask;
  // per stage full_k, full_v, empty_k, empty_v; per mask slot full_m, empty_m; per Q buffer
  // full_q, empty_q; DM_SM90_MB_FOLD: per stage full_f, kPackWarps: per stage info_p (8-byte
  // mbarriers); then per stage the tile index, class and mask slot the producer hands over (4
  // ints); DM_SM90_PERSISTENT=2: per stage its work item (16 bytes).
  static constexpr int alloc_bytes(int q_bufs) {
    return q_bufs * kQ + kRest + 8 * (4 * kStages + 2 * kMaskSlots + 2 * q_bufs + kStageBars2) +
           16 * kStages + (kDynamicItems ? 16 : 0) + 1024;  // base aligned up to 1024 at run time
  }
  static constexpr int kQBufs =
      DM_SM90_Q_BUFS == 2 && alloc_bytes(2) <= 227 * 1024 ? 2 : 1;
  static constexpr int kOffK = kQBufs * kQ;
  static constexpr int kOffV = kOffK + kStages * kKStage;
  static constexpr int kOffBias = kOffV + kStages * kKV;
  static constexpr int kOffMask = kOffBias + kStages * kBias;
  static constexpr int kOffBars = kOffMask + kMaskSlots * kMask;
  static constexpr int kNumBars = 4 * kStages + 2 * kMaskSlots + 2 * kQBufs + kStageBars2;
  static constexpr int kOffStageBars2 = kOffBars + 8 * (4 * kStages + 2 * kMaskSlots + 2 * kQBufs);
  static constexpr int kOffInfo = kOffBars + 8 * kNumBars;
  static constexpr int kOffItems = kOffInfo + 16 * kStages;
  static_assert(kStages <= 4, "one 16-byte block of item indices");
  static constexpr int kBytes = kOffItems + (kDynamicItems ? 16 : 0);
  static constexpr int kAlloc = kBytes + 1024;
  static_assert(kAlloc == alloc_bytes(kQBufs), "the layout and its size agree");
  static_assert(kQ % 1024 == 0 && kKStage % 1024 == 0 && kKV % 1024 == 0 && kBias % 1024 == 0 &&
                    kMask % 1024 == 0,
                "swizzled tiles start on 1024-byte boundaries");
};

// DM_SM90_KBIAS_F32 == 4 (the aux step, _krow specs: Sm90FwdSmem::kAuxStep): a key-based bias
// read by the producer's loads enters S by one more k16 step of S = Q K^T instead of an
// accumulator start that costs each consumer loads and moves per tile. c0 + c1 + c2 = 1 / scale
// split into T values truncated toward zero (each >= 0, so b * c_i keeps b's sign and -inf
// stays -inf; the products are exact in fp32). A (registers) = the same two words in every
// lane, (c0, c1) and (c2, 0) (Sm90FwdSmem::kAuxA), so each row of A is (c0, c1) four times,
// then (c2, 0) four times; B = the K stage's aux tile: kBlockN key rows of 16 T (32-byte
// rows, 32B swizzle) holding b in columns 0, 1 and 8 (each only where its c_i != 0, by the
// keep masks beside the A words: 0 * inf is NaN) and zeros elsewhere (zeroed once per launch).
// S then starts from b / scale as with the accumulator start. The step is issued on every tile
// of such a spec (a branch around it splits the product into two wgmma groups), and the
// producer stores the bf16 row too (in the bias stage): where a launch cannot use the step
// (kbias_aux_on: a softcap adds the bias after the cap; fp16 holds 1 / scale in three parts
// only below 2^15) A and the keep masks are 0, the aux tile stays all zeros, and the consumers
// add the row after the product as a TMA key row.
__host__ __device__ constexpr uint32_t kbias_aux_offset(int key, int chunk) {  // 8 columns
  return sm90::swizzle<32>(uint32_t(key) * 32 + 16 * chunk);
}
__host__ __device__ constexpr uint64_t kbias_aux_desc(uint32_t tile_base) {
  return sm90::make_desc(tile_base, 16, 256, 32);  // 8-row groups 256 bytes apart; LBO unused
}
// The aux tile's descriptor from its K stage's step-0 descriptor (the tile sits kKV bytes
// after it): one 64-bit add of a constant (address fields stay below 2^14: no carry out).
template <int kBlockN, int kKV>
__host__ __device__ constexpr uint64_t kbias_aux_desc_from_k(uint64_t dk) {
  return dk + (kbias_aux_desc(kKV) - sm90::desc_k_major<kBlockN>(0, 0));
}
DM_DEVICE uint16_t bits_rz(BFloat16, float x) { return uint16_t(__float_as_uint(x) >> 16); }
DM_DEVICE uint16_t bits_rz(Half, float x) {
  uint16_t h;
  asm("cvt.rz.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return h;
}
DM_DEVICE bool kbias_aux_fits(BFloat16, float) { return true; }
DM_DEVICE bool kbias_aux_fits(Half, float inv_scale) { return inv_scale < 32768.f; }
// Whether a launch of a kAuxStep spec (whose bias is a key row or chunk: the kernel traps
// otherwise) takes the aux step.
template <typename T>
DM_DEVICE bool kbias_aux_on(const FwdParams& p) {
  return !has_softcap(p) && kbias_aux_fits(T{}, kLog2e / p.scale_log2);
}
template <typename T>
DM_DEVICE void kbias_aux_split(float x, uint16_t (&c)[3]) {
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    T v;
    v.bits = c[i] = bits_rz(T{}, x);
    x -= to_float(v);
  }
}

// -inf twice, as two 16-bit values of T (DM_SM90_MB_FOLD's masked keys).
constexpr uint32_t neg_inf_pair(Half) { return 0xfc00fc00u; }
constexpr uint32_t neg_inf_pair(BFloat16) { return 0xff80ff80u; }

// DM_SM90_MB_FOLD: the consumer's row r of a kMaskPartial tile holds a NaN (the folded -inf plus
// a NaN or infinite score is NaN, and so is a NaN at a kept key): its masked keys (mask bytes
// of tile row `row` in mask slot `smk`) become -inf, as the mask path makes them; a NaN at a
// kept key stays and propagates. Returns the thread's new max of the row.
template <int kBlockM, int kMaskBoxCols, int kNF>
DM_DEVICE float drop_masked_nan(float (&x)[kNF][4], int r, const uint8_t* smk, int row, int t) {
  float mx = -DM_INF;
#pragma unroll
  for (int j = 0; j < kNF; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (smk[sm90::tile_offset<1, kMaskBoxCols, kBlockM>(row, 8 * j + 2 * t + e)] == 0)
        x[j][2 * r + e] = -DM_INF;
      mx = fmax_nan(mx, x[j][2 * r + e]);
    }
  return mx;
}

// A full bias stage (64-key boxes of kRows rows, 128-byte rows, 128B swizzle:
// tile_offset<2, 64, kRows>(row, key)) reaches consumer c's warp w by one ldmatrix.x4 per 16
// keys: block i (keys 16i ..) at sm90_fwd_bias_ldsm_offset(c, w, lane, i), where matrix
// m = lane / 8 holds rows 64c + 16w + 8(m % 2) .. + 7 of keys 16i + 8(m / 2) .. + 7, so that
// register m of lane (g, t) is the fragment word of j = 2i + m / 2, row half m % 2 (keys
// 8j + 2t, + 1 of row 64c + 16w + g + 8(m % 2)). Within a box only the 16-byte chunk index
// moves with i, and the swizzle XORs it: block i is block i % 4's offset XOR 32 (i % 4).
// A block list's element bits (class kListedPartial): of a row word w (keys k..k + 31, bit i:
// key k + i), the keys 8j + 2t + e (j = 0..3, e = 0..1) of quad lane t as bits 24 + 2j + e of
// the result. Bits 2t, 2t + 1 of each byte are masked to a 2-bit field at bit 8j, and one
// multiply by 2^24 + 2^18 + 2^12 + 2^6 moves field j to bit 24 + 2j; every other partial
// product lands below bit 24 or above bit 31 (tests/cpu/test_sm90_listed_bits.py).
__host__ __device__ constexpr uint32_t listed_keep_fields(uint32_t w, int t) {
  return ((w >> (2 * t)) & 0x03030303u) * 0x01041040u;
}

// A kListedPartial tile's row half r (words: the row's kWords words of the tile): quad lane t's
// dropped keys become -inf in x (keep's bit 2j + e: key 8j + 2t + e, listed_keep_fields).
template <int kNF, int kWords>
DM_DEVICE void drop_listed_row(float (&x)[kNF][4], int r, const uint32_t (&w)[kWords], int t) {
  uint32_t keep = 0;
#pragma unroll
  for (int q = 0; q < kWords; ++q)
    keep |= (listed_keep_fields(w[q], t) >> (24 - 8 * q)) & (0xffu << (8 * q));
#pragma unroll
  for (int j = 0; j < kNF; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (!((keep >> (2 * j + e)) & 1u)) x[j][2 * r + e] = -DM_INF;
}

// DM_SM90_LISTED_BIAS: row r of a kListedPartial tile holds a NaN (a folded -inf plus a NaN or
// infinite score is NaN, and so is a NaN at a kept key): its dropped keys (row_words: the row's
// first word of the tile) become -inf, as the selects make them; a NaN at a kept key stays.
// Returns the thread's new max of the row.
template <int kNF>
DM_DEVICE float drop_listed_nan(float (&x)[kNF][4], int r, const uint32_t* row_words, int t) {
  uint32_t w[kNF / 4];
#pragma unroll
  for (int q = 0; q < kNF / 4; ++q) w[q] = row_words[q];
  drop_listed_row(x, r, w, t);
  float mx = -DM_INF;
#pragma unroll
  for (int j = 0; j < kNF; ++j) mx = fmax_nan(mx, fmax_nan(x[j][2 * r], x[j][2 * r + 1]));
  return mx;
}

// DM_SM90_LISTED_BIAS: of row word w, quad lane t's keys 8jj + 2t (low half) and 8jj + 2t + 1
// (high half) as a 32-bit keep mask, 0xffff per kept key (listed_keep_halves_model). The
// shifts put the two keys on bit 7 of byte jj of u and v, and prmt's sign-replicating selector
// (listed_keep_selector) spreads each byte's bit 7 over its result byte (prmt_model: the
// instruction in plain arithmetic; tests/cpu/test_sm90_listed_bits.py checks the chain).
__host__ __device__ constexpr uint32_t listed_keep_selector(int jj) {
  return 0xcc88u + 0x1111u * uint32_t(jj);
}
__host__ __device__ constexpr uint32_t listed_keep_u(uint32_t w, int t) { return w << (7 - 2 * t); }
__host__ __device__ constexpr uint32_t listed_keep_v(uint32_t w, int t) { return w << (6 - 2 * t); }
// PTX prmt.b32 (default mode): result byte i is byte (c_i & 7) of b:a (a bytes 0-3, b 4-7),
// or with c_i & 8 that byte's bit 7 in all 8 bits (c_i: nibble i of c).
__host__ __device__ constexpr uint32_t prmt_model(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t ci = (c >> (4 * i)) & 0xfu, sel = ci & 7u;
    const uint32_t byte = ((sel < 4 ? a : b) >> (8 * (sel & 3u))) & 0xffu;
    d |= ((ci & 8u) ? ((byte & 0x80u) ? 0xffu : 0u) : byte) << (8 * i);
  }
  return d;
}
__host__ __device__ constexpr uint32_t listed_keep_halves_model(uint32_t w, int t, int jj) {
  return (((w >> (8 * jj + 2 * t)) & 1u) ? 0x0000ffffu : 0u) |
         (((w >> (8 * jj + 2 * t + 1)) & 1u) ? 0xffff0000u : 0u);
}
DM_DEVICE uint32_t listed_keep_halves(uint32_t w, int t, int jj) {
  uint32_t m;
  asm("prmt.b32 %0, %1, %2, %3;"
      : "=r"(m)
      : "r"(listed_keep_u(w, t)), "r"(listed_keep_v(w, t)), "r"(listed_keep_selector(jj)));
  return m;
}
// A bias word (two 16-bit values of T) with -inf where keep's half is 0.
template <typename T>
DM_DEVICE uint32_t listed_bias_word(uint32_t bias, uint32_t keep) {
  return (bias & keep) | (neg_inf_pair(T{}) & ~keep);
}

template <int kRows>
__host__ __device__ constexpr uint32_t sm90_fwd_bias_ldsm_offset(int c, int w, int lane, int i) {
  return uint32_t(i / 4) * (kRows * 128) +
         (sm90::tile_offset<2, 64, kRows>(64 * c + 16 * w + lane % 8 + 8 * ((lane / 8) % 2),
                                          8 * (lane / 16)) ^
          uint32_t(32 * (i % 4)));
}

// The first element (of `elem` bytes) a key-based stage loads: that of key k_start + n0 (times
// heads) aligned down to 16 bytes, TMA's rule for a box's global start. Its values start
// key_lead elements into the stage (n0 % 64 == 0, so n0 * heads * elem is a 16-byte multiple).
// Mirrored by forward_sm90.key_load_start / key_lead (tests/cpu check them equal).
__host__ __device__ constexpr int key_load_start(int k_start, int n0, int heads, int elem) {
  return ((k_start + n0) * heads) & ~(16 / elem - 1);
}
__host__ __device__ constexpr int key_lead(int k_start, int heads, int elem) {
  return (k_start * heads) & (16 / elem - 1);
}

// DM_SM90_MB_FOLD: the producer warpgroup's warps 1 .. kFoldWarps walk the stages as the
// consumers do (every use of every stage, up to the dynamic scheduler's last stage) and put each
// tile's bias in fragment order, folding the mask into it (kMaskPartial tiles); then they
// arrive on the stage's full_f and empty_k.
constexpr int kFoldWarps = 3;
// bar_full_k, bar_empty_k, bar_full_f: the kernel's barrier addresses of a stage; info,
// stage_item: what the producer hands over per stage.
template <typename T, typename Smem, int kStages, typename Bar1, typename Bar2, typename Bar3>
DM_DEVICE void fold_warps(uint8_t* smem, int lane, const Bar1& bar_full_k, const Bar2& bar_empty_k,
                          const Bar3& bar_full_f, volatile int32_t* info,
                          volatile int32_t* stage_item) {
  using namespace sm90;
  constexpr int kBlockM = Smem::kBlockM, kNF = 8;
  const int fw = threadIdx.x / 32 - 1;
  const int g = lane / 4, t = lane % 4;
  int stage = 0;
  uint32_t phase = 0;
  for (;;) {
    mbar_wait(bar_full_k(stage), phase);
    if (stage_item[stage] < 0) break;  // no more items: never released
    if (info[4 * stage] >= 0) {
      const bool masked = (info[4 * stage + 1] & kMaskPartial) != 0;
      uint8_t* sb = smem + Smem::kOffBias + stage * Smem::kBias;
      const uint8_t* smk = smem + Smem::kOffMask + info[4 * stage + 2] * Smem::kMask;
      // Block w (consumer warp w's 16 rows) is read whole by this warp before any of it
      // is written back in fragment order: the reorder stays inside the 2 KB.
#pragma unroll 1
      for (int w = fw; w < kBlockM / 16; w += kFoldWarps) {
        static_assert(kNF == 8 && Smem::kMaskBoxCols == 64, "64-key tiles");
        uint32_t wd[kNF][2];  // row 16w + g + 8r, keys 8j + 2t, 8j + 2t + 1
        const uint8_t* src = sb + frag_row_b16(16 * w, g, t);
#pragma unroll
        for (int j = 0; j < kNF; ++j) {
          wd[j][0] = *reinterpret_cast<const uint32_t*>(src + frag_chunk_b16(g, j));
          wd[j][1] = *reinterpret_cast<const uint32_t*>(src + frag_chunk_b16(g, j) + 1024);
        }
        if (masked) {
          const uint8_t* msrc = smk + frag_row_b8(16 * w, g, t);
#pragma unroll
          for (int j = 0; j < kNF; ++j)
            fold_words_dev(wd[j][0], wd[j][1],
                           *reinterpret_cast<const uint16_t*>(msrc + frag_chunk_b8(g, j)),
                           *reinterpret_cast<const uint16_t*>(msrc + frag_chunk_b8(g, j) + 512),
                           neg_inf_pair(T{}));
        }
        __syncwarp();
        uint8_t* dst = sb + frag_order_offset(w, lane, 0, 0);
#pragma unroll
        for (int k = 0; k < kNF / 2; ++k)
          *reinterpret_cast<uint4*>(dst + 512 * k) =
              uint4{wd[2 * k][0], wd[2 * k][1], wd[2 * k + 1][0], wd[2 * k + 1][1]};
      }
      fence_proxy_async_smem();  // these stores before the stage's next TMA write
    }
    warp_arrive(bar_full_f(stage), lane, bar_empty_k(stage));
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
}

// Sm90FwdArgs::row_ready: before work item i the producer warp waits until the packing kernel
// running beside this one (mask_rows_kernel) has set word i (the item's block row written),
// then resets it, so every word is zero again when the launch ends, as the next call's
// packing expects. Every lane polls (relaxed loads at gpu scope: no L1 invalidation per poll)
// and the warp exits together (a divergent loop on one lane took item values off the uniform
// datapath: the producer spilled); the fence after the poll that saw the word set makes it an
// acquire, and the __syncwarp orders every lane's later reads after it (one lane's poll may
// have been the one that saw it). A word never set (a host bug) traps after ~2^26 polls (over
// 8 s) instead of hanging the device.
DM_DEVICE void wait_row_ready(int32_t* ready, bool leader) {
  for (uint32_t polls = 0;
       __reduce_max_sync(0xffffffffu, uint32_t(sm90::ld_relaxed_gpu(ready))) == 0; ++polls) {
    if (polls == (1u << 26)) __trap();
    __nanosleep(128);
  }
  sm90::fence_acquire_gpu();
  __syncwarp();
  if (leader) *ready = 0;
}

// The kernel's item numbering switches (see its work items).
DM_DEVICE bool sm90_head_major(const FwdParams& p) {
  return DM_SM90_HEAD_MAJOR && p.window_left < 0 && p.window_right < 0 &&
         p.cu_seqlens_q == nullptr && p.sp_full_count == nullptr;
}
// A parameter as DM_SM90_ITEM_REMAT reads it.
DM_DEVICE int item_param(int x) {
  return DM_SM90_ITEM_REMAT ? int(sm90::opaque(uint32_t(x))) : x;
}

// A 32-key word of bits from its 32 mask bytes (bit i: byte i nonzero; tests/cpu/
// test_sm90_pack_warps.py), built from the last bytes down. Any bytes: 4 at a time, the bits so
// far move up a nibble and kept_nibble(w) enters at the bottom (5 instructions). Bytes that
// are all 0 or 1 (what bool tensors hold): 8 at a time, 4-byte words lo, hi: lo | hi << 4 puts
// key i at bit 8i and key 4 + i at 8i + 4, and one multiply by 2^24 + 2^17 + 2^10 + 2^3 moves
// both to bits 24 + i and 28 + i (every other partial product lands below 24 or past 31, no
// two on one bit) (3 instructions: two IMAD, one funnel shift).
__host__ __device__ constexpr uint32_t pack_word_bits(uint32_t bits, uint32_t w) {
  return bits << 4 | kept_nibble(w);
}
__host__ __device__ constexpr uint32_t pack_word_bits01(uint32_t bits, uint32_t lo, uint32_t hi) {
  return bits << 8 | (lo | hi << 4) * 0x01020408u >> 24;
}

// The pack warps (mask_mode kOperandPackWarps, Sm90FwdSmem::kPackWarps): warps 1-3 of the
// producer warpgroup (pt = threadIdx.x - 32 < 96) turn a tile's bool mask bytes (p.mask: unit
// key stride, every row 16-byte aligned, Sk % 32 == 0: forward_sm90.packs_mask; a nonzero byte
// is true) into the layout of a block list's element bits (kListedPartial), which the
// consumers then read as a MixedMask's: row r's keys 32q .. 32q + 31 in word r * kBlockN / 32
// + q of the stage's slot in this CTA's scratch, p.sp_partial_bits + (blockIdx.x * kStages +
// stage) * kWords. They walk the stages as the consumers do (every use of every stage, up to
// the dynamic scheduler's last), each once the producer warp wrote the stage's tile and item
// (info_p), so the bytes load while the stage's K/V/bias are in flight; then they publish the
// tile's class (kListedPartial unless every bit is set; rows and keys past the mask read as
// true: such keys are excluded by formula, such rows never stored) and slot in info[], and
// arrive on full_k (which completes with the producer warp's arrival and the TMA bytes). Each
// tile prefetches the rows of the next one (an item's tiles run n_last .. n_first) into L2,
// and an item's first tile its own, so the loads hit there. (Packing one tile ahead into
// kStages + 1 slots measured no faster on an H100: NOTES.md, forty-fourth session.)
constexpr int kPackThreads = 96;
constexpr int kPackBarrier = 5;  // named barrier of the pack warps (1-4: the consumers')
// info, stage_item: the shared addresses of the kernel's info[] and stage_item[] (32-bit
// addresses: generic pointers held across the loop spilled the 40-register warps).
template <int kBlockM, int kBlockN, int kStages, typename BarInfo, typename BarFull>
DM_DEVICE void pack_mask_warps(const FwdParams& p, const BarInfo& bar_info,
                               const BarFull& bar_full_k, uint32_t info, uint32_t stage_item) {
  using namespace sm90;
  constexpr int kWpr = kBlockN / 32, kWords = kBlockM * kWpr;
  const int pt = int(threadIdx.x) - 32, lane = pt % 32;
  // Tile n of work item `item` into the slot of `stage`; whether every bit is set. `own`:
  // also prefetch its own rows (an item's first tile: nothing prefetched them).
  auto pack = [&](int item, int n, int stage, bool own) {
    // the item's coordinates as the kernel numbers them (no lists, no varlen here), from p
    // through opaque: values shared with the kernel's own spilled them
    const int heads = int(opaque(uint32_t(p.heads))), bh = p.batch * heads;
    const bool head_major = DM_SM90_HEAD_MAJOR &&
                            (int(opaque(uint32_t(p.window_left))) & p.window_right) < 0;
    int m_block, hb;
    sm90_item_coords(item, (int(opaque(uint32_t(p.seqlen_q))) + kBlockM - 1) / kBlockM, bh,
                     head_major, sm90_lpt_sections(bh), m_block, hb);
    const int h = hb % heads, b = hb / heads;
    const int m0 = m_block * kBlockM, n0 = n * kBlockN;
    const int rows = dm_min(kBlockM, p.seqlen_q - m0), keys = p.seqlen_k - n0;  // >= 1
    const uint32_t rs = uint32_t(p.mask_row_stride);  // kBlockM rows < 2^32 bytes (host)
    const uint8_t* tile = p.mask + int64_t(b) * p.mask_batch_stride +
                          int64_t(h / p.mask_head_ratio) * p.mask_head_stride +
                          int64_t(m0) * rs + n0;
    // L2 prefetches (no registers held): each row's first and last bytes' lines
    for (int r = pt; r < rows; r += kPackThreads) {
      const uint8_t* a = tile + uint32_t(r) * rs;
      if (own) {
        prefetch_l2(a);
        prefetch_l2(a + kBlockN - 1);
      }
      if (n > 0) {
        prefetch_l2(a - kBlockN);
        prefetch_l2(a - 1);
      }
    }
    uint32_t* out = const_cast<uint32_t*>(p.sp_partial_bits) +
                    (int(blockIdx.x) * kStages + stage) * kWords;
    bool all = true;
#pragma unroll 1
    for (int w0 = pt; w0 < kWords; w0 += 2 * kPackThreads) {
      uint4 x[2][2];  // words w0 and w0 + 96: loads all in flight before the first is used
#pragma unroll
      for (int g = 0; g < 2; ++g) {
        const int w = w0 + g * kPackThreads, r = w / kWpr, k = 32 * (w % kWpr);
        const bool whole = w < kWords && r < rows && k < keys;  // keys % 32 == 0
        const uint4* src =
            reinterpret_cast<const uint4*>(tile + (whole ? uint32_t(r) * rs + k : 0u));
        x[g][0] = whole ? __ldg(src) : uint4{~0u, ~0u, ~0u, ~0u};
        x[g][1] = whole ? __ldg(src + 1) : uint4{~0u, ~0u, ~0u, ~0u};
      }
#pragma unroll
      for (int g = 0; g < 2; ++g) {
        const int w = w0 + g * kPackThreads;
        if (w >= kWords) break;
        // byte 4j + i -> bit 4j + i; past the mask's rows and keys all kept
        const uint32_t wd[8] = {x[g][0].x, x[g][0].y, x[g][0].z, x[g][0].w,
                                x[g][1].x, x[g][1].y, x[g][1].z, x[g][1].w};
        uint32_t bits = 0, any = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) any |= wd[j];
        if (any & 0xfefefefeu) {  // a byte other than 0 or 1 (rows past the mask too)
#pragma unroll
          for (int j = 7; j >= 0; --j) bits = pack_word_bits(bits, wd[j]);
        } else {
#pragma unroll
          for (int j = 3; j >= 0; --j) bits = pack_word_bits01(bits, wd[2 * j], wd[2 * j + 1]);
        }
        all = all && bits == ~0u;
        out[w] = bits;
      }
    }
    return named_bar_and(kPackBarrier, kPackThreads, all);
  };
  int stage = 0, prev_item = -1;
  uint32_t phase = 0;
  for (;;) {
    mbar_wait(bar_info(stage), phase);
    const int item = int(ld_shared_u32(stage_item + 4 * stage));
    const int n = item >= 0 ? int(ld_shared_u32(info + 16 * stage)) : -1;  // -1: an item's
    if (n >= 0) {                                                           // end, the last
      const bool all = pack(item, n, stage, item != prev_item);
      prev_item = item;
      if (pt == 0) {
        const uint32_t cls = info + 16 * stage + 4;
        if (!all) st_shared_u32(cls, ld_shared_u32(cls) | kListedPartial);
        st_shared_u32(info + 16 * stage + 12,
                      uint32_t((int(blockIdx.x) * kStages + stage) * kWords));
      }
    }
    warp_arrive(bar_full_k(stage), lane);  // this warp's words (and pt 0's class) before it
    if (item < 0) return;                   // the last stage: never released
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
}

template <typename T, int kHeadDim, int kBlockN, int kStages, bool kHasMask, bool kHasBias,
          bool kBiasKeyRow, bool kDebug>
__global__ void __launch_bounds__(384, 1)
flash_fwd_sm90_kernel(const FwdParams p, const __grid_constant__ Sm90FwdArgs args) {
  using Smem = Sm90FwdSmem<kHeadDim, kBlockN, kStages, kHasMask, kHasBias, kBiasKeyRow>;
  constexpr int kBlockM = Smem::kBlockM;
  constexpr int kNF = kBlockN / 8;    // score fragments (n8) per consumer thread row pair
  constexpr int kDF = kHeadDim / 8;   // output fragments
  static_assert(kHeadDim % 64 == 0 && kBlockN % 64 == 0, "64-column boxes");
  // Register split after setmaxnreg: multiples of 8, and the three warpgroups together may not
  // exceed the 168 per thread the CTA was launched with (65536 / 384, rounded down to 8), or
  // setmaxnreg.inc waits forever for registers that do not exist. With a mask the producer
  // (its mask classification and the work-item loop) needs 56; without one the consumers
  // take 232 (their work-item state beside the accumulators: 224 spills a bias spec).
  // Debug builds' tile counters and DM_SM90_MB_FOLD's fold warps take the mask producer to 64
  // at d <= 128 (the fold at 56/224 spilled 12/40 bytes under NVRTC 13; 64/216 did not).
  constexpr bool kWideProducer = (kDebug || Smem::kFold) && kHeadDim <= 128;
  constexpr int kProducerRegs = !kHasMask ? 40 : kWideProducer ? 64 : 56;
  constexpr int kConsumerRegs = !kHasMask ? 232 : kWideProducer ? 216 : 224;
  static_assert(kProducerRegs + 2 * kConsumerRegs <= 3 * 168, "register pool of the CTA");
  using namespace sm90;

  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* smem = smem_raw + (base - raw);
  {
    uint32_t dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    if (dyn < uint32_t(Smem::kAlloc)) __trap();  // launcher and kernel disagree on the layout
    if (kBiasKeyRow && args.bias_mode != kOperandKeyRow && args.bias_mode != kOperandKeyChunk)
      __trap();  // a bias stage of one row: forward_sm90.key_row_spec sends only such biases
  }
  const uint32_t sQ = base, sK = base + Smem::kOffK, sV = base + Smem::kOffV;
  const uint32_t sBias = base + Smem::kOffBias, sMask = base + Smem::kOffMask;
  const uint32_t bars = base + Smem::kOffBars;
  auto bar_full_k = [&](int s) { return bars + 32 * s; };
  auto bar_full_v = [&](int s) { return bars + 8 + 32 * s; };
  // Released by the 8 consumer warps: K (with its bias tile) once the tile's softmax is done,
  // V once O += P V has read it; a mask slot with K (or by the producer for an empty tile).
  auto bar_empty_k = [&](int s) { return bars + 16 + 32 * s; };
  auto bar_empty_v = [&](int s) { return bars + 24 + 32 * s; };
  auto bar_full_m = [&](int x) { return bars + 32 * kStages + 16 * x; };
  auto bar_empty_m = [&](int x) { return bars + 8 + 32 * kStages + 16 * x; };
  // Q buffer x holds the CTA's work items u with u % kQBufs == x (u counts the items that
  // reach the consumers, in the same order in every role); empty_q: released by the 8
  // consumer warps once every S = Q K^T of the item has completed.
  auto bar_full_q = [&](int x) { return bars + 32 * kStages + 16 * Smem::kMaskSlots + 16 * x; };
  auto bar_empty_q = [&](int x) {
    return bars + 8 + 32 * kStages + 16 * Smem::kMaskSlots + 16 * x;
  };
  // DM_SM90_MB_FOLD (fold_on: a mask tile and a bias tile): completed by the kFoldWarps fold
  // warps once stage s's bias tile is in fragment order (and folded), for every use of the
  // stage (end stages too), so its phase follows full_k's.
  const bool fold_on = Smem::kFold && args.mask_mode == kOperandTile &&
                       args.bias_mode == kOperandTile;
  auto bar_full_f = [&](int s) { return base + Smem::kOffStageBars2 + 8 * s; };
  // kOperandPackWarps (pack_on): info_p, completed by the producer warp once it wrote stage s's
  // tile and item (every use of the stage, as full_k); full_k then also waits for the pack
  // warps (pack_mask_warps).
  // (the mode re-read at each use through opaque: no value held from here into the roles)
  auto pack_on = [&]() {
    return Smem::kPackWarps && int(opaque(uint32_t(args.mask_mode))) == kOperandPackWarps;
  };
  auto bar_info_p = [&](int s) { return base + Smem::kOffStageBars2 + 8 * s; };
  // DM_SM90_KBIAS_F32 == 4: a _krow spec's bias may take the aux step (kbias_aux_offset; the
  // tile-bias spec keeps the accumulator start: the step spilled it).
  constexpr bool kAuxStep = Smem::kAuxStep;
  volatile int32_t* info = reinterpret_cast<volatile int32_t*>(smem + Smem::kOffInfo);
  volatile int32_t* stage_item = reinterpret_cast<volatile int32_t*>(smem + Smem::kOffItems);

  // Work items (query tile, head, batch), numbered longest first: item i is query tile
  // num_m - 1 - i / (batch * heads) of head i % heads, batch (i / heads) % batch, so that under
  // causal masking the longest rows go first. Where every item sees the same keys (fixed
  // lengths, no causal/window edge, no block lists) and DM_SM90_HEAD_MAJOR is on, the query
  // tile moves fastest instead (item i: tile i % num_m of head-batch i / num_m): the CTAs in
  // flight then share a few heads' K/V in L2 rather than each reading its own from DRAM.
  // Otherwise DM_SM90_LPT_HEADS sections keep a few head-batches together (item_coords).
  // CTA x of a grid of G takes items r * G + x in even rounds r and r * G + G - 1 - x in odd
  // ones (a snake: long and short items pair up); a grid of one CTA per item takes item
  // blockIdx.x. Varlen: tiles of max_seqlen_q, a tile
  // past its own sequence's end (or of an empty one) is skipped by every warp alike.
  // DM_SM90_PERSISTENT=2 (kDynamicItems): the producer warp alone decides the sequence (item
  // blockIdx.x, then claimed_item of each atomicInc) and writes each stage's item into
  // stage_item[] before the stage's full_k arrive; the consumers read the item of an item's
  // first stage (a tile or its end), so all roles walk the same items. An item with nothing
  // to do (varlen, past its sequence) never reaches the consumers; -1 ends their walk.
  // Held from here, or with DM_SM90_ITEM_REMAT computed at each use.
  const int num_m_held = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int bh_held = p.batch * p.heads;
  const int num_items_held = num_m_held * bh_held;  // <= forward_sm90.MAX_ITEMS
  const bool head_major_held = sm90_head_major(p);
  const bool lpt_held = sm90_lpt_sections(bh_held);
  auto num_m = [&] {
    return DM_SM90_ITEM_REMAT ? (item_param(p.seqlen_q) + kBlockM - 1) / kBlockM : num_m_held;
  };
  auto bh = [&] {
    return DM_SM90_ITEM_REMAT ? item_param(p.batch) * item_param(p.heads) : bh_held;
  };
  auto num_items = [&] { return DM_SM90_ITEM_REMAT ? num_m() * bh() : num_items_held; };
  auto head_major = [&] {
    return DM_SM90_ITEM_REMAT
        ? DM_SM90_HEAD_MAJOR && (item_param(p.window_left) & item_param(p.window_right)) < 0 &&
              p.cu_seqlens_q == nullptr && p.sp_full_count == nullptr
        : head_major_held;
  };
  auto lpt_sections = [&] { return DM_SM90_ITEM_REMAT ? sm90_lpt_sections(bh()) : lpt_held; };
  // The c-th item to run (c < num_items; num_items passes through: "none left"): item c, or
  // with args.item_order its entry c (flash_fwd_sparse_order_kernel).
  auto ordered = [&](int c) {
    return args.item_order != nullptr && c < num_items() ? args.item_order[c] : c;
  };
  auto item_of_round = [&](int r) {
    return ordered(r * int(gridDim.x) + int((r & 1) ? gridDim.x - 1 - blockIdx.x : blockIdx.x));
  };
  const bool varlen = p.cu_seqlens_q != nullptr;
  // One work item's coordinates and key range.
  struct Item {
    int m_block, h, b, m0, m_end, len_q, len_k, off, n_first, n_last;
    int kvh, mask_h, mask_b, bias_h, bias_b, qkv_b;
    SeqInfo seq;
  };
  // Item i's query tile and head-batch index hb = b * heads + h.
  auto item_coords = [&](int i, int& m_block, int& hb) {
    sm90_item_coords(i, num_m(), bh(), head_major(), lpt_sections(), m_block, hb);
  };
  // Debug builds: item i's pair of tile_counters, in (b * H + h) * num_m + m order.
  auto counter_pair = [&](int i) {
    int m_block, hb;
    item_coords(i, m_block, hb);
    return p.tile_counters + 2 * (hb * num_m() + m_block);
  };
  auto make_item = [&](int i, Item& it) {  // false: nothing to do (past the sequence)
    int hb;
    item_coords(i, it.m_block, hb);
    it.h = hb % p.heads;
    it.b = hb / p.heads;
    it.seq = varlen ? seq_info<true>(p, it.b) : seq_info<false>(p, it.b);
    it.len_q = it.seq.len_q;
    it.len_k = it.seq.len_k;
    it.m0 = it.m_block * kBlockM;
    if (it.m0 >= it.len_q) return false;
    it.m_end = dm_min(it.m0 + kBlockM, it.len_q);
    it.off = it.len_k - it.len_q;
    const KeyRange kr = key_range(p, it.m0, it.m_end, it.len_q, it.len_k);
    it.n_first = kr.k_begin < kr.k_end ? kr.k_begin / kBlockN : 0;
    it.n_last = kr.k_begin < kr.k_end ? (kr.k_end - 1) / kBlockN : -1;
    it.kvh = it.h / p.q_per_kv;
    it.mask_h = it.h / p.mask_head_ratio;
    it.mask_b = p.mask_batch_stride != 0 ? it.b : 0;
    it.bias_h = it.h / p.bias_head_ratio;
    it.bias_b = p.bias_batch_stride != 0 ? it.b : 0;
    it.qkv_b = varlen ? 0 : it.b;  // packed tensors have one batch
    return true;
  };
  // The names the per-item code reads. Each role writes its item loop out (round -> item ->
  // make_item): a shared next_item(round, it) lambda kept the Item live across the loop and
  // spilled 80-616 bytes per spec.
#define DM_SM90_ITEM_NAMES(it)                                                              \
  const int m_block = it.m_block, h = it.h, b = it.b, m0 = it.m0, m_end = it.m_end;          \
  const int len_q = it.len_q, len_k = it.len_k, off = it.off;                                \
  const int n_first = it.n_first, n_last = it.n_last, kvh = it.kvh, qkv_b = it.qkv_b;        \
  const int mask_h = it.mask_h, mask_b = it.mask_b, bias_h = it.bias_h, bias_b = it.bias_b;  \
  const SeqInfo seq = it.seq;                                                                \
  (void)m_block; (void)m_end; (void)len_q; (void)off; (void)n_first; (void)kvh; (void)qkv_b; \
  (void)mask_h; (void)mask_b; (void)bias_h; (void)bias_b

  if (threadIdx.x == 0) {
    for (int x = 0; x < Smem::kQBufs; ++x) {
      mbar_init(bar_full_q(x), 1);
      mbar_init(bar_empty_q(x), 8 * kWarpArrivals);  // one arrival per consumer warp
    }
    for (int s = 0; s < kStages; ++s) {
      // the producer warp (it writes info, rows), and the pack warps
      mbar_init(bar_full_k(s), (pack_on() ? 4 : 1) * kWarpArrivals);
      mbar_init(bar_full_v(s), 1);
      // one arrival per consumer warp (and per fold warp: they read the stage too)
      mbar_init(bar_empty_k(s), (fold_on ? 8 + kFoldWarps : 8) * kWarpArrivals);
      mbar_init(bar_empty_v(s), 8 * kWarpArrivals);
      if (Smem::kFold) mbar_init(bar_full_f(s), kFoldWarps * kWarpArrivals);
      if (Smem::kPackWarps) mbar_init(bar_info_p(s), kWarpArrivals);
    }
    for (int x = 0; x < Smem::kMaskSlots; ++x) {
      mbar_init(bar_full_m(x), 1);
      mbar_init(bar_empty_m(x), 8 * kWarpArrivals);
    }
    mbar_init_fence();
  }
  __syncthreads();

  const int wg = threadIdx.x / 128;
  const int lane = threadIdx.x % 32;

  if (wg == 0) {  // ------------------------------------------------------------- producer
    // kAuxStep: warp 0 zeroes the aux tiles (each tile then rewrites columns 0, 1, 8 by the
    // keep masks) and writes the A words and keep masks (all 0 without the step: it adds 0
    // then), before its first full_k arrive orders them before the consumers' reads, and
    // before its registers shrink (the 40-register producer spilled with this inside).
    if (kAuxStep && threadIdx.x < 32) {
      for (int i = int(threadIdx.x); i < kStages * kBlockN * 2; i += 32)
        *reinterpret_cast<uint4*>(smem + Smem::kOffK + (i / (kBlockN * 2)) * Smem::kKStage +
                                  Smem::kKV + 16 * (i % (kBlockN * 2))) = uint4{0u, 0u, 0u, 0u};
      if (threadIdx.x == 0) {
        uint16_t c3[3];
        kbias_aux_split<T>(kLog2e / p.scale_log2, c3);
        const bool on = kbias_aux_on<T>(p);
        const uint32_t a01 = on ? uint32_t(c3[0]) | uint32_t(c3[1]) << 16 : 0u;
        const uint32_t a2 = on ? uint32_t(c3[2]) : 0u;
        uint32_t* w = reinterpret_cast<uint32_t*>(smem + Smem::kOffBias + Smem::kAuxA);
        *reinterpret_cast<uint4*>(w) = make_uint4(a01, a01, a2, a2);
        *reinterpret_cast<uint2*>(w + 4) =
            make_uint2(on ? (c3[0] ? 0xffffu : 0u) | (c3[1] ? 0xffff0000u : 0u) : 0u,
                       on && c3[2] ? 0xffffu : 0u);
      }
      fence_proxy_async_smem();  // generic-proxy stores before the async-proxy (wgmma) reads
      __syncwarp();
    }
    setmaxnreg_dec<kProducerRegs>();
    if constexpr (Smem::kFold) {
      // DM_SM90_MB_FOLD: warps 1-3 walk the stages as the consumers do (every use of every
      // stage, up to the dynamic scheduler's last stage) and reorder/fold each tile's bias.
      // The warp index by a shuffle is warp-uniform to the compiler: with threadIdx.x itself
      // the branch is divergent to it, and warp 0's code left the uniform datapath (spills).
      if (__shfl_sync(0xffffffffu, int(threadIdx.x) / 32, 0) != 0) {
        if (fold_on)
          fold_warps<T, Smem, kStages>(smem, lane, bar_full_k, bar_empty_k, bar_full_f, info,
                                       stage_item);
        return;
      }
    } else if (__shfl_sync(0xffffffffu, int(threadIdx.x) / 32, 0) != 0) {
      if constexpr (Smem::kPackWarps)
        if (pack_on())
          pack_mask_warps<kBlockM, kBlockN, kStages>(p, bar_info_p, bar_full_k,
                                                     base + Smem::kOffInfo, base + Smem::kOffItems);
      return;
    }
    const bool leader = lane == 0;
    // A stage whose info and item this lane wrote (or passed) goes to the pack warps (info_p),
    // then to the consumers (full_k); the leader's tile stages arrive on full_k with their bytes.
    auto hand_over = [&](int s) {
      if (pack_on()) mbar_arrive(bar_info_p(s));
      mbar_arrive(bar_full_k(s));
    };
    if (leader) {
      tma_prefetch(&args.q);
      tma_prefetch(&args.k);
      tma_prefetch(&args.v);
    }
    // The K/V ring and the mask ring (candidates of earlier items: mask_base) run on across
    // work items.
    int stage = 0;
    uint32_t phase = 0;
    int mask_base = 0;
    int q_item = 0;  // items handed to the consumers so far: the next one's Q buffer
    int item = kDynamicItems ? ordered(int(blockIdx.x)) : 0;  // the first needs no claim
    // kDynamicItems: the next item's claim (claim_issue, on the leader's lane), turned into an
    // item by claim_item (0 on the other lanes; the warp takes the max: REDUX leaves it in a
    // uniform register, so the item arithmetic stays on the uniform datapath as in the static
    // schedules; with a shuffle the mask + bias specs' producer spilled): both after the item's
    // end stage, or with DM_SM90_CLAIM_AHEAD issued at the item's start and read at its end.
    // Without a counter (a launch that passed none) each CTA strides by the grid instead.
    uint32_t claim_raw = 0;
    auto claim_issue = [&]() {
      if (leader)
        claim_raw = args.item_counter != nullptr
                        ? atomicInc(args.item_counter, uint32_t(num_items() - 1))
                        : uint32_t(item);
    };
    auto claim_item = [&]() {
      return int(__reduce_max_sync(
          0xffffffffu, leader ? uint32_t(claimed_item(claim_raw, gridDim.x, num_items())) : 0u));
    };
    for (int round = 0;; ++round) {
      if (!kDynamicItems) item = item_of_round(round);
      if (item >= num_items()) break;
      if (args.row_ready != nullptr) wait_row_ready(args.row_ready + item, leader);
      Item it;
      if (!make_item(item, it)) {
        if (kDynamicItems) {
          claim_issue();
          item = ordered(claim_item());
        }
        continue;
      }
      DM_SM90_ITEM_NAMES(it);
      // A tile is partial by formula when it crosses the key end or a window edge.
      auto partial_by_formula = [&](int n) {
        const int n0 = n * kBlockN, n1 = n0 + kBlockN - 1;
        if (n1 >= len_k) return true;
        if (p.window_right >= 0 && n1 > m0 + off + p.window_right) return true;
        if (p.window_left >= 0 && n0 < m_end - 1 + off - p.window_left) return true;
        return false;
      };
      // Q buffer qx is free once the consumers released the item kQBufs before this one
      // (after its last S = Q K^T had completed).
      {
        const int qx = q_item % Smem::kQBufs;
        mbar_wait(bar_empty_q(qx), ((q_item / Smem::kQBufs) & 1) ^ 1);
        if (leader) {
          mbar_arrive_expect_tx(bar_full_q(qx), Smem::kQ);
#pragma unroll
          for (int x = 0; x < Smem::kBoxes; ++x)
            tma_load_4d(sQ + qx * Smem::kQ + x * kBlockM * 128, &args.q, bar_full_q(qx), 64 * x,
                        seq.q_start + m0, h, qkv_b);
        }
        ++q_item;
      }
      if (kDynamicItems && DM_SM90_CLAIM_AHEAD) claim_issue();
      const bool mask_tile = kHasMask && args.mask_mode == kOperandTile;
      const bool mask_chunk = kHasMask && args.mask_mode == kOperandKeyChunk;
      const bool mask_keys =
          mask_tile || mask_chunk || (kHasMask && args.mask_mode == kOperandKeyRow);
      const bool bias_tile = kHasBias && args.bias_mode == kOperandTile;
      const bool bias_row = kHasBias && args.bias_mode == kOperandKeyRow;
      const bool bias_chunk = kHasBias && args.bias_mode == kOperandKeyChunk;
      // DM_SM90_KBIAS_F32: without a mask a key-based bias reaches its stage by this warp's
      // plain loads, not by TMA (bias_loads; keys past len_k read 0, excluded by formula
      // anyway): as an fp32 row times row_mult (bias_f32), or under a softcap with
      // DM_SM90_KBIAS_F32 >= 2 as the bf16 row the TMA key-row path would have loaded (lead 0).
      const bool bias_loads = DM_SM90_KBIAS_F32 != 0 && !kHasMask && (bias_row || bias_chunk);
      const bool bias_f32 = bias_loads && (DM_SM90_KBIAS_F32 == 1 || !has_softcap(p));
      const float row_mult = DM_SM90_KBIAS_F32 >= 2 ? kLog2e / p.scale_log2 : 1.f;
      const uint16_t* bias_keyrow = static_cast<const uint16_t*>(p.bias) +
                                    int64_t(bias_b) * p.bias_batch_stride +
                                    int64_t(bias_h) * p.bias_head_stride +
                                    int64_t(seq.k_start) * p.bias_kseq_stride;
      // Key-based operands: chunk_boxes 1-D boxes of chunk_box elements from key_load_start (one
      // box, or boxes of 256 elements: each starts 128-byte aligned in shared memory); every box
      // counts its full bytes (zero-filled past the tensor).
      const uint32_t bias_bytes = bias_tile ? Smem::kBias
          : (bias_row || bias_chunk) && !bias_loads
              ? args.bias_chunk_boxes * args.bias_chunk_box * 2 : 0;
      const uint32_t mask_bytes = mask_tile ? Smem::kMask
          : args.mask_chunk_boxes * args.mask_chunk_box;
      // This head's column in a key chunk (chunk_heads 1: the only one), past the stage's lead.
      const int mask_hp = mask_chunk ? args.mask_chunk_heads : 1;
      const int mask_col = (mask_hp > 1 ? mask_h : 0) + key_lead(seq.k_start, mask_hp, 1);
      auto load_chunk = [&](uint32_t dst, const TmaDesc* map, uint32_t bar, int n0, int heads,
                            int box, int boxes, int elem) {
        const int e0 = key_load_start(seq.k_start, n0, heads, elem);
        for (int y = 0; y < boxes; ++y)
          tma_load_4d(dst + y * box * elem, map, bar, e0 + y * box, 0, 0, 0);
      };
      // The candidates: key tiles n_last .. n_first (descending: partial tiles first), or with
      // block lists the listed blocks' tiles (full blocks, then partial ones). A listed tile
      // outside [n_first, n_last] sees no key of the query tile: passed over like an empty one.
      const bool sparse = p.sp_full_count != nullptr;
      int n_cand = n_last - n_first + 1, full_count = 0, sub = 1;
      int64_t row_entry = 0;
      if (sparse) {
        row_entry = sparse_row_entry(p, b, h, m0);
        full_count = p.sp_full_count[row_entry];
        // kDynamicItems: read per item (hoisted out of the item loop, ptxas spilled it)
        sub = int(kDynamicItems ? opaque(uint32_t(p.sp_block_n)) : uint32_t(p.sp_block_n)) /
              kBlockN;
        n_cand = (full_count + p.sp_partial_count[row_entry]) * sub;
      }
      auto cand_tile = [&](int i, bool& listed_partial) {
        listed_partial = false;
        if (!sparse) return n_last - i;
        const int entry = i / sub;
        listed_partial = entry >= full_count;
        const int blk = listed_partial
            ? p.sp_partial_idx[row_entry * p.sp_partial_width + entry - full_count]
            : p.sp_full_idx[row_entry * p.sp_full_width + entry];
        return blk * sub + i % sub;
      };
      // Candidate i's mask goes to slot i % kMaskSlots, use i / kMaskSlots of that slot.
      int issued = 0;
      auto issue_mask = [&](int i) {
        const int x = (mask_base + i) % Smem::kMaskRing, use = (mask_base + i) / Smem::kMaskRing;
        mbar_wait(bar_empty_m(x), (use & 1) ^ 1);
        if (!leader) return;
        bool lp;
        const int n = cand_tile(i, lp), n0 = n * kBlockN;
        if (n < n_first || n > n_last) {  // passed over unread: the slot completes empty
          mbar_arrive(bar_full_m(x));
          return;
        }
        const uint32_t dst = sMask + x * Smem::kMask;
        mbar_arrive_expect_tx(bar_full_m(x), mask_bytes);
        if (mask_tile) {  // query-based: keys are sequence-relative, rows packed
          for (int y = 0; y < kBlockN / Smem::kMaskBoxCols; ++y)
            tma_load_4d(dst + y * kBlockM * Smem::kMaskBoxCols, &args.mask, bar_full_m(x),
                        n0 + y * Smem::kMaskBoxCols, seq.q_start + m0, mask_h, mask_b);
        } else if (mask_chunk) {
          load_chunk(dst, &args.mask, bar_full_m(x), n0, args.mask_chunk_heads,
                     args.mask_chunk_box, args.mask_chunk_boxes, 1);
        } else {
          tma_load_4d(dst, &args.mask, bar_full_m(x), key_load_start(seq.k_start, n0, 1, 1), 0,
                      mask_h, mask_b);
        }
      };
      for (int i = 0; i < n_cand; ++i) {
        bool listed_partial;
        const int n = cand_tile(i, listed_partial), n0 = n * kBlockN;
        const bool in_range = n >= n_first && n <= n_last;
        // 0: a full tile; a listed partial block's element bits apply (kListedPartial), the
        // formula only where the tile crosses the key end or an edge.
        int cls = listed_partial ? kListedPartial : 0;
        if (in_range && partial_by_formula(n)) cls |= kFormulaPartial;
        int slot = 0;
        if (mask_keys) {
          while (issued < n_cand && issued <= i + Smem::kMaskAhead) issue_mask(issued++);
          slot = (mask_base + i) % Smem::kMaskRing;
          mbar_wait(bar_full_m(slot), ((mask_base + i) / Smem::kMaskRing) & 1);
          // OR / AND of the bytes of this tile (of this head's column in a key row / chunk). Rows
          // and keys past the tensor read as zero (TMA fill), past a packed sequence as the next
          // one's: either only makes "any" true or "all" false, i.e. more work, never less.
          const uint8_t* src = smem + (sMask - base) + slot * Smem::kMask;
          uint32_t any = 0, all = 0x01010101u;
          if (!in_range) {
            // not loaded: nothing to test
          } else if (!mask_tile) {  // key-based: the tile's kBlockN values past the lead
#pragma unroll
            for (int it = 0; it < kBlockN / 32; ++it) {
              const uint32_t x = src[(it * 32 + lane) * mask_hp + mask_col];
              any |= x;
              all &= x != 0 ? 0x01010101u : 0u;
            }
          } else {
#pragma unroll 4
            for (int it = 0; it < Smem::kMask / 512; ++it) {  // 16 bytes per lane per step
              const int c = (it * 32 + lane) * 16;
              if (c < int(mask_bytes)) {
                const uint4 w = *reinterpret_cast<const uint4*>(src + c);
                any |= w.x | w.y | w.z | w.w;
                all &= w.x & w.y & w.z & w.w;
              }
            }
          }
          const bool keep_any = __any_sync(0xffffffffu, any != 0);
          const bool keep_all = __all_sync(0xffffffffu, all == 0x01010101u);
          if (!keep_any || !in_range) {  // empty tile: no K/V/bias; the slot is free again
            if (lane < 8) {
              if constexpr (kWarpArrivals == 1) mbar_arrive(bar_empty_m(slot));
              else mbar_arrive_count(bar_empty_m(slot), kWarpArrivals);
            }
            continue;
          }
          if (!keep_all) cls |= kMaskPartial;
        } else if (!in_range) {
          continue;
        }
        uint16_t bias_words[kBlockN / 32];  // keys n0 + lane + 32 i, loaded before the wait
        if (bias_loads) {
#pragma unroll
          for (int y = 0; y < kBlockN / 32; ++y) {
            const int key = n0 + lane + 32 * y;
            bias_words[y] = key < len_k ? bias_keyrow[int64_t(key) * p.bias_col_stride]
                                        : uint16_t(0);
          }
        }
        mbar_wait(bar_empty_k(stage), phase ^ 1);
        // kAuxStep: K's TMA is issued (mbarrier.expect_tx) before the row/aux stores, the
        // leader's arrive after them (-2.1% on the kbias kernel against issuing it after).
        if (kAuxStep && leader) {
          mbar_expect_tx(bar_full_k(stage), Smem::kKV);
#pragma unroll
          for (int x = 0; x < Smem::kBoxes; ++x)
            tma_load_4d(sK + stage * Smem::kKStage + x * kBlockN * 128, &args.k,
                        bar_full_k(stage), 64 * x, seq.k_start + n0, kvh, qkv_b);
        }
        if constexpr (kAuxStep) {  // the keys' aux columns 0-1, 8-9 (keep masks); the row
          // key lane + 32 y's aux words at kbias_aux_offset(lane, chunk) + 1024 y (the swizzle
          // XORs bit 4 with the key's bit 2: y leaves it); shared addresses, not pointers (the
          // 40-register producer spilled with them)
          const uint32_t aux =
              sK + stage * Smem::kKStage + Smem::kKV + kbias_aux_offset(lane, 0);
          const uint32_t row = sBias + stage * Smem::kBias + 2 * lane;
          const uint2 keep =
              *reinterpret_cast<const uint2*>(smem + Smem::kOffBias + Smem::kAuxA + 16);
#pragma unroll
          for (int y = 0; y < kBlockN / 32; ++y) {
            const uint32_t b = bias_words[y];
            st_shared_u32(aux + 1024 * y, (b * 0x10001u) & keep.x);
            st_shared_u32((aux ^ 16u) + 1024 * y, b & keep.y);
            st_shared_u16(row + 64 * y, uint16_t(b));
          }
          fence_proxy_async_smem();  // before the wgmma reads the leader's arrive releases
          __syncwarp();
        } else if (bias_f32) {  // ordered before the consumers' reads by the leader's arrive below
          float* row = reinterpret_cast<float*>(smem + Smem::kOffBias + stage * Smem::kBias);
#pragma unroll
          for (int y = 0; y < kBlockN / 32; ++y) {
            T x;
            x.bits = bias_words[y];
            row[lane + 32 * y] = to_float(x) * row_mult;
          }
          __syncwarp();
        } else if (bias_loads) {
          uint16_t* row = reinterpret_cast<uint16_t*>(smem + Smem::kOffBias + stage * Smem::kBias);
#pragma unroll
          for (int y = 0; y < kBlockN / 32; ++y) row[lane + 32 * y] = bias_words[y];
          __syncwarp();
        }
        if (leader) {
          info[4 * stage] = n;
          info[4 * stage + 1] = cls;
          info[4 * stage + 2] = slot;
          if (kDynamicItems) stage_item[stage] = item;
          if (pack_on()) mbar_arrive(bar_info_p(stage));  // the pack warps read info, item
          // A partial block's element bits: the word of (row m0, key n0) in its slot (an int:
          // the host refuses more than 2^31 - 1 words, sparse_plan.check_partial_words).
          if (listed_partial) {
            const int bm = p.sp_block_m, bn = p.sp_block_n;
            const int slot_b = p.sp_partial_slot[row_entry * p.sp_col_blocks + n / sub];
            info[4 * stage + 3] = slot_b * (bm / 32) * bn + ((m0 % bm) * bn + n0 % bn) / 32;
          }
          // per item {tiles loaded, tiles masked}, in (batch, head, m) order
          if (kDebug && !DM_SM90_TIMELINE) {
            uint32_t* pair = counter_pair(item);
            atomicAdd(pair, 1u);
            if (cls != 0) atomicAdd(pair + 1, 1u);
          }
          if (kAuxStep) {
            mbar_arrive(bar_full_k(stage));
          } else {
            mbar_arrive_expect_tx(bar_full_k(stage), Smem::kKV + bias_bytes);
#pragma unroll
            for (int x = 0; x < Smem::kBoxes; ++x)
              tma_load_4d(sK + stage * Smem::kKStage + x * kBlockN * 128, &args.k,
                          bar_full_k(stage), 64 * x, seq.k_start + n0, kvh, qkv_b);
          }
          if (bias_tile) {
#pragma unroll
            for (int x = 0; x < kBlockN / 64; ++x)
              tma_load_4d(sBias + stage * Smem::kBias + x * kBlockM * 128, &args.bias,
                          bar_full_k(stage), n0 + 64 * x, seq.q_start + m0, bias_h, bias_b);
            if (kHasMask && DM_SM90_BIAS_L2_AHEAD > 0 && !sparse &&
                n - DM_SM90_BIAS_L2_AHEAD >= n_first) {  // tiles run n_last .. n_first
#pragma unroll
              for (int x = 0; x < kBlockN / 64; ++x)
                tma_prefetch_l2_4d(&args.bias, n0 - DM_SM90_BIAS_L2_AHEAD * kBlockN + 64 * x,
                                   seq.q_start + m0, bias_h, bias_b);
            }
          } else if (bias_row && !bias_loads) {
            tma_load_4d(sBias + stage * Smem::kBias, &args.bias, bar_full_k(stage),
                        key_load_start(seq.k_start, n0, 1, 2), 0, bias_h, bias_b);
          } else if (bias_chunk && !bias_loads) {
            load_chunk(sBias + stage * Smem::kBias, &args.bias, bar_full_k(stage), n0,
                       args.bias_chunk_heads, args.bias_chunk_box, args.bias_chunk_boxes, 2);
          }
        }
        if (kWarpArrivals > 1 && !leader) hand_over(stage);  // after the row
        mbar_wait(bar_empty_v(stage), phase ^ 1);
        if (leader) {
          mbar_arrive_expect_tx(bar_full_v(stage), Smem::kKV);
#pragma unroll
          for (int x = 0; x < Smem::kBoxes; ++x)
            tma_load_4d(sV + stage * Smem::kKV + x * kBlockN * 128, &args.v, bar_full_v(stage),
                        64 * x, seq.k_start + n0, kvh, qkv_b);
        }
        __syncwarp();
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
      }
      // The item's end: a stage with tile -1 (its K and V barriers complete without data, the
      // consumers release both).
      mbar_wait(bar_empty_k(stage), phase ^ 1);
      if (leader) {
        info[4 * stage] = -1;
        if (kDynamicItems) stage_item[stage] = item;
        hand_over(stage);
      }
      if (kWarpArrivals > 1 && !leader) hand_over(stage);
      mbar_wait(bar_empty_v(stage), phase ^ 1);
      if (leader) mbar_arrive(bar_full_v(stage));
      __syncwarp();
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
      mask_base += n_cand;
      if (kDynamicItems) {
        if (!DM_SM90_CLAIM_AHEAD) claim_issue();
        item = ordered(claim_item());
      }
    }
    if (kDynamicItems) {  // no more items: a last stage (no data, never released) says so
      mbar_wait(bar_empty_k(stage), phase ^ 1);
      if (leader) {
        stage_item[stage] = -1;
        hand_over(stage);
      }
      if (kWarpArrivals > 1 && !leader) hand_over(stage);
    }
    return;
  }

  // ------------------------------------------------------------------------------ consumers
  setmaxnreg_inc<kConsumerRegs>();
  const int c = wg - 1;                      // consumer index: rows 64c .. 64c + 63
  const int warp = (threadIdx.x % 128) / 32;
  const int g = lane / 4, t = lane % 4;
  const int lrow[2] = {64 * c + 16 * warp + g, 64 * c + 16 * warp + g + 8};  // CTA-local
  auto release = [&](uint32_t bar) { warp_arrive(bar, lane); };
  // Ping-pong: the two consumers take turns issuing their GEMMs (named barriers 1 and 2, each
  // 128 syncing + 128 arriving threads), so one's softmax runs under the other's GEMMs. The
  // turns alternate across work items too (a consumer never arrives twice in a row on one
  // barrier): consumer 1 lets consumer 0 go first, consumer 0 takes the last turn back after
  // the CTA's last item.
  auto turn_wait = [&] {
    if (c == 0) asm volatile("bar.sync 1, 256;" ::: "memory");
    else asm volatile("bar.sync 2, 256;" ::: "memory");
  };
  auto turn_pass = [&] {
    if (c == 0) asm volatile("bar.arrive 2, 256;" ::: "memory");
    else asm volatile("bar.arrive 1, 256;" ::: "memory");
  };
  if (c == 1) turn_pass();
  int stage = 0;  // the K/V ring and Q's buffer run on across work items
  uint32_t phase = 0;
  int q_uses = 0;
  for (int round = 0;; ++round) {
    int item;
    if (kDynamicItems) {  // the item's first stage names it (the wait below then passes at once)
      mbar_wait(bar_full_k(stage), phase);
      item = stage_item[stage];
      if (item < 0) break;
    } else {
      item = item_of_round(round);
      if (item >= num_items()) break;
    }
    Item it;
    if (!make_item(item, it)) continue;  // kDynamicItems: never (the producer passed it over)
    DM_SM90_ITEM_NAMES(it);
    const bool stamps = kDebug && DM_SM90_TIMELINE && c == 0 && threadIdx.x % 128 == 0;
    if (stamps) counter_pair(item)[0] = timeline_stamp();
    const int qx = q_uses % Smem::kQBufs;  // this item's Q buffer (the producer's q_item)
    const int row[2] = {m0 + lrow[0], m0 + lrow[1]};                            // sequence rows

    // kQueryRow operands: one value per query row (a scalar is the same value for every row).
    bool row_kept[2] = {true, true};
    float row_bias[2] = {0.f, 0.f};
    if (kHasMask && args.mask_mode == kOperandQueryRow) {
      const uint8_t* m = p.mask + int64_t(mask_b) * p.mask_batch_stride +
                         int64_t(mask_h) * p.mask_head_stride;
      for (int r = 0; r < 2; ++r)
        row_kept[r] = row[r] < len_q && m[int64_t(row[r]) * p.mask_row_stride] != 0;
    }
    if (kHasBias && args.bias_mode == kOperandQueryRow) {
      const int64_t o =
          int64_t(bias_b) * p.bias_batch_stride + int64_t(bias_h) * p.bias_head_stride;
      for (int r = 0; r < 2; ++r) {
        if (row[r] >= len_q) continue;
        const int64_t idx = o + int64_t(row[r]) * p.bias_row_stride;
        row_bias[r] = p.bias_is_fp32 ? static_cast<const float*>(p.bias)[idx]
                                     : to_float(static_cast<const T*>(p.bias)[idx]);
      }
    }
    float o[kDF][4];
#pragma unroll
    for (int j = 0; j < kDF; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    // DM_SM90_LAZY_RESCALE: where O's rescale waits for the P V product and may be skipped (a
    // key-row bias spec's softmax is the dense one's: eager, as there)
    constexpr bool kLazy = DM_SM90_LAZY_RESCALE != 0 &&
                           (kHasMask || (kHasBias && !kBiasKeyRow) || Smem::kQBufs == 1);
    // rows g and g + 8 of the warp's 16, over the 4 lanes of a quad
    OnlineSoftmax<2, 4, kLazy ? DM_SM90_LAZY_GAP : -1> sm;
    const bool mask_keys = kHasMask && (args.mask_mode == kOperandTile ||
                                         args.mask_mode == kOperandKeyRow ||
                                         args.mask_mode == kOperandKeyChunk);
    const bool bias_tile = kHasBias && args.bias_mode == kOperandTile;
    const bool bias_keys = bias_tile || (kHasBias && (args.bias_mode == kOperandKeyRow ||
                                                      args.bias_mode == kOperandKeyChunk));
    // Key chunks of more than one head: values chunk_heads apart, this head's column first; key
    // rows and chunks: the stage's values start key_lead elements in (fwd.cu: key_load_start).
    // A key-based bias by the producer's plain loads (no mask: bias_loads there) is one row of
    // this head's values from the tile's first key.
    const bool bias_loads =
        DM_SM90_KBIAS_F32 != 0 && !kHasMask && kHasBias &&
        (args.bias_mode == kOperandKeyRow || args.bias_mode == kOperandKeyChunk);
    const int bias_hp = kHasBias && args.bias_mode == kOperandKeyChunk && !bias_loads
                            ? args.bias_chunk_heads : 1;
    const int mask_hp = kHasMask && args.mask_mode == kOperandKeyChunk ? args.mask_chunk_heads : 1;
    const int bias_col =
        bias_loads ? 0 : (bias_hp > 1 ? bias_h : 0) + key_lead(seq.k_start, bias_hp, 2);
    const int mask_col = (mask_hp > 1 ? mask_h : 0) + key_lead(seq.k_start, mask_hp, 1);
    // The split logit transform (logits.cuh): the scale folds into the softmax's FFMA unless a
    // softcap or a key-dependent bias makes the logit natural-log first.
    const bool capped = has_softcap(p);
    // DM_SM90_KBIAS_F32 (the producer stores a key-based bias as an fp32 row): 1 adds it by the
    // FFMA below; 2 (no softcap; with one the producer's bf16 row takes the key-row path)
    // starts S's accumulator at it (stored as bias / scale): the logit is the plain scaled score.
    const bool bias_f32 = bias_loads && (DM_SM90_KBIAS_F32 == 1 || !capped) &&
                          (!kAuxStep || kbias_aux_on<T>(p));  // else the row after the product
    const bool fold = DM_SM90_KBIAS_F32 >= 2 && bias_f32;
    // fold: S holds b / scale after its product; by the accumulator start (acc_start: the
    // consumers load the row into S first), or on the _krow specs by the aux k16 step.
    const bool acc_start = fold && !kAuxStep;
    const LogitScales ls = bias_keys && !fold ? logit_scales<true>(p) : logit_scales<false>(p);

    // The bias and mask words of one tile this thread needs (class bit kMaskPartial: the tile's
    // mask has false elements).
    struct TileOperands {
      uint32_t bias[kNF][2];  // two 16-bit bias values per (fragment, row half)
      uint32_t mask[kNF];     // two mask bytes per row half: row g in bits 0-15, g + 8 in 16-31
    };
    const bool mask_tile = kHasMask && args.mask_mode == kOperandTile;
    auto load_operands = [&](TileOperands& ops, int stage, int cls) {
#if DM_SM90_MB_FOLD  // (#if, not if constexpr: DM_SM90_MB_FOLD=0 builds the kernel without it)
      if (fold_on) {  // the fold warps' fragment order (stage's phase: the caller's `phase`)
        mbar_wait(bar_full_f(stage), phase);
        const uint8_t* sb = smem + (sBias - base) + stage * Smem::kBias;
#pragma unroll
        for (int k = 0; k < kNF / 2; ++k) {
          const uint4 v = *reinterpret_cast<const uint4*>(
              sb + frag_order_offset(4 * c + warp, lane, 2 * k, 0));
          ops.bias[2 * k][0] = v.x;
          ops.bias[2 * k][1] = v.y;
          ops.bias[2 * k + 1][0] = v.z;
          ops.bias[2 * k + 1][1] = v.w;
        }
      } else
#endif
      if (bias_tile) {
        // Block 0's offset; block i's is derived from it (sm90_fwd_bias_ldsm_offset) on the
        // stage's address, whose 1024-byte aligned start leaves the XORed bits 5-6 as they are.
        const uint32_t sb = sBias + stage * Smem::kBias +
                            sm90_fwd_bias_ldsm_offset<kBlockM>(c, warp, lane, 0);
#pragma unroll
        for (int i = 0; i < kNF / 2; ++i) {
          uint32_t x[4];
          ldsm_x4(x, (sb ^ uint32_t(32 * (i % 4))) + uint32_t(i / 4) * (kBlockM * 128));
          ops.bias[2 * i][0] = x[0];
          ops.bias[2 * i][1] = x[1];
          ops.bias[2 * i + 1][0] = x[2];
          ops.bias[2 * i + 1][1] = x[3];
        }
      } else if (bias_f32) {  // the fp32 row is read by transform, next to its FFMA
      } else if (bias_keys) {  // one key row (or this head's column of a chunk) for both rows
        const uint16_t* sv = reinterpret_cast<const uint16_t*>(smem + (sBias - base) +
                                                               stage * Smem::kBias) +
                             2 * t * bias_hp + bias_col;
        if (bias_hp == 1 && bias_col % 2 == 0) {  // 4-byte aligned pairs
#pragma unroll
          for (int j = 0; j < kNF; ++j)
            ops.bias[j][0] = ops.bias[j][1] = *reinterpret_cast<const uint32_t*>(sv + 8 * j);
        } else {
#pragma unroll
          for (int j = 0; j < kNF; ++j) {
            const uint16_t* x = sv + 8 * j * bias_hp;
            ops.bias[j][0] = ops.bias[j][1] = uint32_t(x[0]) | uint32_t(x[bias_hp]) << 16;
          }
        }
      }
#if DM_SM90_MB_FOLD
      if (mask_keys && (cls & kMaskPartial) && !fold_on) {
#else
      if (mask_keys && (cls & kMaskPartial)) {
#endif
        const uint8_t* smk = smem + (sMask - base) + info[4 * stage + 2] * Smem::kMask;
        if (mask_tile) {
#pragma unroll
          for (int j = 0; j < kNF; ++j) {
            uint32_t w = 0;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const uint32_t o1 =
                  tile_offset<1, Smem::kMaskBoxCols, kBlockM>(lrow[r], 8 * j + 2 * t);
              w |= uint32_t(*reinterpret_cast<const uint16_t*>(smk + o1)) << (16 * r);
            }
            ops.mask[j] = w;
          }
        } else if (mask_hp == 1 && mask_col % 2 == 0) {  // one key row for both row halves
#pragma unroll
          for (int j = 0; j < kNF; ++j)
            ops.mask[j] = uint32_t(*reinterpret_cast<const uint16_t*>(smk + mask_col + 8 * j +
                                                                        2 * t)) * 0x00010001u;
        } else {  // this head's column of a key chunk (or a key row at an odd lead)
          const uint8_t* sv = smk + 2 * t * mask_hp + mask_col;
#pragma unroll
          for (int j = 0; j < kNF; ++j) {
            const uint8_t* x = sv + 8 * j * mask_hp;
            ops.mask[j] = (uint32_t(x[0]) | uint32_t(x[mask_hp]) << 8) * 0x00010001u;
          }
        }
      }
    };
    // A block list's partial block (class bit kListedPartial): this thread's two rows of the
    // tile's element bits, loaded from global memory when the tile's class is read, so that
    // the loads run under S's product. info[+3]: the word of (this CTA's row 0, the tile's
    // key 0) in p.sp_partial_bits; rows are sp_block_n / 32 words, LSB first.
    struct ListedWords {
      uint32_t w[2][kBlockN / 32];
    };
    auto load_listed = [&](ListedWords& lw, int stage, int cls) {
      if (!(cls & kListedPartial)) return;
      const uint32_t* words = p.sp_partial_bits + info[4 * stage + 3];
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int q = 0; q < kBlockN / 32; ++q)
          lw.w[r][q] = words[lrow[r] * (p.sp_block_n / 32) + q];  // not __ldg: the pack
                                                                  // warps write them in-launch
    };
    // DM_SM90_LISTED_BIAS: a listed partial tile's bits go into its bias tile's words.
    auto listed_fold = [&](int cls) {
      return DM_SM90_LISTED_BIAS && bias_tile && (cls & kListedPartial) != 0;
    };
    // Softcap, bias and exclusion (by the mask's words and/or by formula, as the tile's class
    // says), for the tile whose first key is n0.
    auto transform = [&](float (&s)[kNF][4], const TileOperands& ops, const ListedWords& lw,
                         int n0, int cls, int stage) {
      if (capped) {
#pragma unroll
        for (int j = 0; j < kNF; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[j][e] = softcap_logit(p, s[j][e]);
      }
      if (bias_f32 && !fold) {  // keys 8j + 2t, 8j + 2t + 1 of the fp32 row, both rows
        const float* row = reinterpret_cast<const float*>(smem + (sBias - base) +
                                                          stage * Smem::kBias) + 2 * t;
#pragma unroll
        for (int j = 0; j < kNF; ++j) {
          const float2 v = *reinterpret_cast<const float2*>(row + 8 * j);
#pragma unroll
          for (int e = 0; e < 4; ++e) s[j][e] = add_bias(s[j][e], ls, e & 1 ? v.y : v.x);
        }
      } else if (bias_keys && !fold) {
        // The fold in a branch of its own: as one loop with a select, ptxas predicated it and
        // every tile, full ones too, ran its PRMT/LOP3s.
        auto add_word = [&](int j, int r, uint32_t bw) {  // keys 8j + 2t, + 1 of row half r
          T lo, hi;
          lo.bits = static_cast<uint16_t>(bw & 0xffffu);
          hi.bits = static_cast<uint16_t>(bw >> 16);
          s[j][2 * r] = add_bias(s[j][2 * r], ls, to_float(lo));
          s[j][2 * r + 1] = add_bias(s[j][2 * r + 1], ls, to_float(hi));
        };
        if (listed_fold(cls)) {
#pragma unroll
          for (int j = 0; j < kNF; ++j)
#pragma unroll
            for (int r = 0; r < 2; ++r)
              add_word(j, r, listed_bias_word<T>(ops.bias[j][r],
                                                 listed_keep_halves(lw.w[r][j / 4], t, j % 4)));
        } else {
#pragma unroll
          for (int j = 0; j < kNF; ++j)
#pragma unroll
            for (int r = 0; r < 2; ++r) add_word(j, r, ops.bias[j][r]);
        }
      }
#if DM_SM90_MB_FOLD
      if (mask_keys && (cls & kMaskPartial) && !fold_on) {  // folded into the bias
#else
      if (mask_keys && (cls & kMaskPartial)) {
#endif
#pragma unroll
        for (int j = 0; j < kNF; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (!((ops.mask[j] >> (16 * (e >> 1) + 8 * (e & 1))) & 0xffu)) s[j][e] = -DM_INF;
      }
      // Exclusion by formula (the key end, the causal/window edges) and, for a block list's
      // partial block, by its element bits.
      if (cls & kFormulaPartial) {
        // Key n0 + 2t + kk (kk = 8j + e % 2) of row half r passes the formula iff
        // lb[r].lo <= kk <= lb[r].hi (block_info.cuh: window_line_bounds).
        LineBounds lb[2];
        const int key0 = n0 + 2 * t;
#pragma unroll
        for (int r = 0; r < 2; ++r)
          lb[r] = window_line_bounds<kBlockN>(row[r] + off - key0, len_k - 1 - key0,
                                              p.window_right, p.window_left);
#pragma unroll
        for (int j = 0; j < kNF; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int kk = 8 * j + (e & 1);
            if (kk < lb[e >> 1].lo || kk > lb[e >> 1].hi) s[j][e] = -DM_INF;
          }
      }
      if ((cls & kListedPartial) && !listed_fold(cls)) {  // from the prefetched words
#pragma unroll
        for (int r = 0; r < 2; ++r) drop_listed_row(s, r, lw.w[r], t);
      }
    };
    // fold: S's accumulator starts at the fp32 row (keys 8j + 2t, 8j + 2t + 1 in both rows).
    auto fold_bias = [&](float (&s)[kNF][4], int stage) {
      const float* row = reinterpret_cast<const float*>(smem + (sBias - base) +
                                                        stage * Smem::kBias) + 2 * t;
#pragma unroll
      for (int j = 0; j < kNF; ++j) {
        const float2 v = *reinterpret_cast<const float2*>(row + 8 * j);
        s[j][0] = v.x;
        s[j][1] = v.y;
        if (DM_SM90_KBIAS_F32 == 3) {  // a second load (volatile: not merged into moves)
          asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];"
                       : "=f"(s[j][2]), "=f"(s[j][3]) : "r"(smem_u32(row + 8 * j)));
        } else {
          s[j][2] = v.x;
          s[j][3] = v.y;
        }
      }
    };
    auto issue_s = [&](float (&s)[kNF][4], int stage) {
      // Descriptors are formed next to their wgmma (primitives.cuh: opaque): hoisted out of the
      // loop they would hold two registers each beside the accumulators.
      const uint64_t dq = desc_k_major<kBlockM>(opaque(sQ + qx * Smem::kQ + c * 64 * 128), 0);
      const uint64_t dk = desc_k_major<kBlockN>(opaque(sK + stage * Smem::kKStage), 0);
      // kAuxStep: A is every lane's four words (0 without the step), loaded before the fence
      // (registers a wgmma reads are written before it, or ptxas serializes the group)
      uint32_t aux_a[4] = {0u, 0u, 0u, 0u};
      if constexpr (kAuxStep) {
        const uint4 w = ld_shared_u128(sBias + Smem::kAuxA);
        aux_a[0] = w.x;
        aux_a[1] = w.y;
        aux_a[2] = w.z;
        aux_a[3] = w.w;
        fence_operands(aux_a);
      }
      fence_operands(s);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kHeadDim / 16; ++ks)
        Wgmma<T, kBlockN>::template ss<0>(s, dq + k_major_step<kBlockM>(ks),
                                          dk + k_major_step<kBlockN>(ks),
                                          ks > 0 || acc_start);
      if constexpr (kAuxStep)
        Wgmma<T, kBlockN>::template rs<0>(s, aux_a,
                                          kbias_aux_desc_from_k<kBlockN, Smem::kKV>(dk), 1);
      wgmma_commit();
    };
    auto issue_pv = [&](const uint32_t (&pa)[kBlockN / 16][4], int stage) {
      const uint64_t dv = desc_mn_major<kBlockN>(opaque(sV + stage * Smem::kKV), 0);
      fence_operands(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk)
        Wgmma<T, kHeadDim>::template rs<1>(o, pa[kk], dv + mn_major_step(kk), 1);
      wgmma_commit();
    };
    auto pack_p = [&](const float (&s)[kNF][4], uint32_t (&pa)[kBlockN / 16][4]) {
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        pa[kk][0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
        pa[kk][1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
        pa[kk][2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[kk][3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      }
    };
    // kLazy: O follows its rows' new max where a row of the warp moved it
    auto rescale_lazy = [&](const float (&alpha)[2]) {
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) rescale_o(o, alpha);
    };
    auto release_k = [&](int stage) {  // K, its bias tile and its mask slot
      if (mask_keys) release(bar_empty_m(info[4 * stage + 2]));
      release(bar_empty_k(stage));
    };
    // Software pipeline: iteration j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} together
    // (O rescaled to S_{j-1}'s max between the two issues), then runs the softmax of S_j while
    // the second product is in flight; kLazy rescales O to S_j's max once that product
    // completed instead (the first tile's O is 0: no rescale).
    mbar_wait(bar_full_q(qx), (q_uses / Smem::kQBufs) & 1);
    ++q_uses;
    mbar_wait(bar_full_k(stage), phase);
    int n = info[4 * stage];
    if (n >= 0) {
      float s[kNF][4];
      uint32_t pa[kBlockN / 16][4];
      float alpha[2];
      TileOperands ops;
      int cls = info[4 * stage + 1];
#if DM_SM90_MB_FOLD
      // A NaN in a folded kMaskPartial tile's row: its masked keys go back to -inf first.
      auto row_fix = [&](auto& x, int r, float mx) {
        if (DM_SM90_LISTED_BIAS && listed_fold(cls) && is_nan(mx))  // then the mask's, if any
          mx = drop_listed_nan(x, r, p.sp_partial_bits + info[4 * stage + 3] +
                                         lrow[r] * (p.sp_block_n / 32), t);
        return !fold_on || !(cls & kMaskPartial) || !is_nan(mx) ? mx
            : drop_masked_nan<kBlockM, Smem::kMaskBoxCols>(
                  x, r, smem + (sMask - base) + info[4 * stage + 2] * Smem::kMask, lrow[r], t);
      };
#elif DM_SM90_LISTED_BIAS
      auto row_fix = [&](auto& x, int r, float mx) {
        return !listed_fold(cls) || !is_nan(mx) ? mx
            : drop_listed_nan(x, r, p.sp_partial_bits + info[4 * stage + 3] +
                                        lrow[r] * (p.sp_block_n / 32), t);
      };
#else
      const KeepRowMax row_fix;
#endif
      ListedWords lw;
      if (acc_start) fold_bias(s, stage);
      turn_wait();
      issue_s(s, stage);
      turn_pass();
      load_listed(lw, stage, cls);
      wgmma_wait<0>();
      fence_operands(s);
      load_operands(ops, stage, cls);
      transform(s, ops, lw, n * kBlockN, cls, stage);
      sm.update(s, alpha, ls.exp_scale, row_fix);
      release_k(stage);
      pack_p(s, pa);
      if (varlen && (n + 1) * kBlockN > len_k) {
        // Varlen: V rows past the sequence end hold the next sequence's values (no TMA zero
        // fill); P is 0 there, but 0 * inf/NaN is not. Only the first tile visited can cross
        // the end (tiles go in descending order), so it is zeroed here once, by both consumers
        // (the same zeros: a benign overlap), before any O += P V reads it.
        mbar_wait(bar_full_v(stage), phase);
        const int r0 = len_k - n * kBlockN;
        uint8_t* sv = smem + (sV - base) + stage * Smem::kKV;
        for (int e = threadIdx.x % 128; e < (kBlockN - r0) * Smem::kBoxes * 8; e += 128) {
          const int row = r0 + e / (8 * Smem::kBoxes), rem = e % (8 * Smem::kBoxes);
          // a swizzled row stays within its 128 bytes: zeroing them zeroes the row
          *reinterpret_cast<uint4*>(sv + (rem / 8) * kBlockN * 128 + row * 128 + (rem % 8) * 16) =
              uint4{0u, 0u, 0u, 0u};
        }
        fence_proxy_async_smem();  // generic-proxy stores before the async-proxy (wgmma) reads
        named_bar_sync(3 + c, 128);
      }
      int prev = stage;
      uint32_t prev_phase = phase;
      while (true) {
        if (++stage == kStages) {
          stage = 0;
          phase ^= 1;
        }
        mbar_wait(bar_full_k(stage), phase);
        n = info[4 * stage];
        if (acc_start && n >= 0) fold_bias(s, stage);
        turn_wait();
        if (n < 0) break;  // the turn is taken by the last O += P V below
        issue_s(s, stage);
        if (!kLazy) rescale_o(o, alpha);
        mbar_wait(bar_full_v(prev), prev_phase);
        issue_pv(pa, prev);
        turn_pass();
        cls = info[4 * stage + 1];
        load_listed(lw, stage, cls);
        wgmma_wait<1>();
        fence_operands(s);
        load_operands(ops, stage, cls);
        transform(s, ops, lw, n * kBlockN, cls, stage);
        sm.update(s, alpha, ls.exp_scale, row_fix);
        release_k(stage);
        wgmma_wait<0>();
        fence_operands(o);
        release(bar_empty_v(prev));
        pack_p(s, pa);
        if (kLazy) rescale_lazy(alpha);  // O (P_{j-1} V_{j-1} in) follows S_j's max
        prev = stage;
        prev_phase = phase;
      }
      if (!kLazy) rescale_o(o, alpha);
      mbar_wait(bar_full_v(prev), prev_phase);
      issue_pv(pa, prev);
      turn_pass();
      wgmma_wait<0>();
      fence_operands(o);
      release(bar_empty_v(prev));
    }
    // Where rows allow 16-byte stores (the same for the whole consumer), this consumer's 64 rows
    // of O go through shared memory (64-column boxes, 128B swizzle: conflict-free fragment
    // stores and row-chunk loads), then each warp copies its 16 rows by coalesced 16-byte
    // stores (8 lanes per 128-byte box row) instead of 4-byte stores that scatter over 8 rows.
    // With two Q buffers (the next item's Q loads into the other one meanwhile) O goes through
    // its rows of the item's Q buffer; with one (whose release lets the next item's Q load
    // during the epilogue) through the end-of-item stage's K buffer (consumer 0) or V buffer
    // (consumer 1), which carry no data. Either buffer is released after the copy.
    T* out = o_row_ptr<T>(p, b, h, seq, 0);
    const bool stage_o = p.head_dim % 8 == 0 && p.o_row_stride % 8 == 0 &&
                         reinterpret_cast<uint64_t>(out) % 16 == 0;
    constexpr bool kOInQ = Smem::kQBufs >= 2;
    static_assert(kOInQ || 64 * kHeadDim * 2 <= Smem::kKV, "a consumer's O fits a K/V buffer");
    // The end-of-item stage: no data. Q's buffer is free too (every S = Q K^T of the item has
    // completed).
    const int end_stage = stage;
    const uint32_t end_phase = phase;
    if (!stage_o || kOInQ) {
      release(bar_empty_k(stage));
      release(bar_empty_v(stage));
    }
    if (!stage_o || !kOInQ) release(bar_empty_q(qx));
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }

    // Epilogue: normalize, store this thread's rows, lse (natural log; -inf for empty rows).
    float inv_l[2], lse[2];
    sm.finalize(inv_l, lse);
    lse[0] = lse_natural(lse[0]);
    lse[1] = lse_natural(lse[1]);
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (!row_kept[r]) {
        inv_l[r] = 0.f;
        lse[r] = -DM_INF;
      }
    if (stage_o) {
      uint32_t so;  // this consumer's staging buffer; o_at: a CTA-local row's element there
      if (kOInQ) {
        named_bar_sync(3 + c, 128);  // this consumer's S GEMMs (its Q rows) completed in every warp
        so = sQ + qx * Smem::kQ;
      } else {
        // the stage's previous K and V reads (both consumers') completed before its end
        mbar_wait(bar_full_v(end_stage), end_phase);
        so = c == 0 ? sK + end_stage * Smem::kKStage : sV + end_stage * Smem::kKV;
      }
      auto o_at = [&](int lr, int col) {
        if constexpr (kOInQ) return tile_offset<2, 64, kBlockM>(lr, col);
        else return tile_offset<2, 64, 64>(lr - 64 * c, col);
      };
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int j = 0; j < kDF; ++j)
          st_shared_u32(so + o_at(lrow[r], 8 * j + 2 * t),
                        pack2<T>(normalize_out(o[j][2 * r], inv_l[r]),
                                 normalize_out(o[j][2 * r + 1], inv_l[r])));
      __syncwarp();
      const int row0 = 64 * c + 16 * warp;  // this warp's rows (CTA-local)
#pragma unroll
      for (int i = 0; i < 4 * Smem::kBoxes; ++i) {  // box i / 4, rows 4 (i % 4) + lane / 8
        const int lr = row0 + 4 * (i % 4) + lane / 8, col = 64 * (i / 4) + 8 * (lane % 8);
        if (m0 + lr < len_q && col < p.head_dim)
          st_global_u128(out + int64_t(m0 + lr) * p.o_row_stride + col,
                         ld_shared_u128(so + o_at(lr, col)));
      }
      fence_proxy_async_smem();  // these generic accesses before the buffer's next TMA write
      if (kOInQ) {
        release(bar_empty_q(qx));
      } else {
        release(bar_empty_k(end_stage));
        release(bar_empty_v(end_stage));
      }
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (row[r] >= len_q) continue;
        T* orow = out + int64_t(row[r]) * p.o_row_stride;
#pragma unroll
        for (int j = 0; j < kDF; ++j) {
          const int col = 8 * j + 2 * t;
          if (col < p.head_dim)
            *reinterpret_cast<uint32_t*>(orow + col) =
                pack2<T>(normalize_out(o[j][2 * r], inv_l[r]),
                         normalize_out(o[j][2 * r + 1], inv_l[r]));
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (row[r] < len_q && p.lse != nullptr && t == 0)
        p.lse[lse_index(p, b, h, seq, row[r])] =
            lse[r] == -DM_INF ? lse[r] : lse[r] + row_bias[r];
    if (stamps) counter_pair(item)[1] = timeline_stamp();
  }
  if (c == 0) turn_wait();  // consumer 1's last pass
}
#undef DM_SM90_ITEM_NAMES

// Block lists without a window (forward_sm90.item_order_items): fwd_sm90's work items longest
// first within groups of kItemOrderGroup consecutive ones of the kernel's own numbering (block
// lists: sections of DM_SM90_LPT_HEADS head-batches, so a group spans a few heads and the CTAs
// in flight still share K/V in L2). CTA g ranks group g's items by their listed blocks (full +
// partial of the item's row of the lists: a 128-row item lies in one row block, whose height
// forward_sm90 requires to be a multiple of 128), ties in item order, and writes
// item_order[first + rank] = i. The dynamic scheduler then ends each ~wave with its shortest
// items (random 10% block lists left ~14% of the SMs' time idle at the end of fwd_sm90).
constexpr int kItemOrderGroup = 128;
template <int kNumWarps>
__global__ void __launch_bounds__(kNumWarps * 32)
flash_fwd_sparse_order_kernel(const FwdParams p, const __grid_constant__ Sm90FwdArgs args) {
  static_assert(kNumWarps * 32 == kItemOrderGroup, "one thread per item of a group");
  constexpr int kBlockM = Sm90FwdSmem<128, 128, 2, false, false>::kBlockM;
  __shared__ int32_t counts[kItemOrderGroup];
  const int tid = threadIdx.x;
  const int num_m = (p.seqlen_q + kBlockM - 1) / kBlockM;
  const int bh = p.batch * p.heads, items = num_m * bh;
  const bool lpt_sections = sm90_lpt_sections(bh);  // as the kernel's (no head_major)
  const int first = blockIdx.x * kItemOrderGroup, n = dm_min(kItemOrderGroup, items - first);
  const int i = first + tid;
  int count = 0;
  if (tid < n) {
    int m_block, hb;
    sm90_item_coords(i, num_m, bh, false, lpt_sections, m_block, hb);
    const int64_t row = sparse_row_entry(p, hb / p.heads, hb % p.heads, m_block * kBlockM);
    count = p.sp_full_count[row] + p.sp_partial_count[row];
  }
  counts[tid] = count;
  __syncthreads();
  if (tid < n) {
    int rank = 0;  // the group's items before this one: more blocks, or as many and earlier
    for (int j = 0; j < n; ++j) rank += counts[j] > count || (counts[j] == count && j < tid);
    args.item_order[first + rank] = i;
  }
}

}  // namespace dm
