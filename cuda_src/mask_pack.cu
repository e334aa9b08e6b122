// mask_pack.cu: a bool mask (B, H, Sq, Sk) at any strides into per-block bit words and kept
// counts (dmattn_cupy/mask_pack.py; MixedMask.from_dense_mask's device path, and with the
// block lists of mask_lists_kernel below, the forward's route for attn_mask). One CTA per
// block (cb, rb, b * H + h). Element (r, c) of a block is bit k = r * block_n + c of its
// words: bit k % 32 of word k / 32, so word j of block row r holds keys 32j .. 32j + 31;
// elements past Sq or Sk are 0 and not counted. A nonzero byte is true.
// vec 2 (16-byte aligned rows): lane l reads keys 16 (l % 8) .. + 15 of a 128-key chunk of row
// 4 w + l / 8 (+ 32 i) with one 16-byte load, turns them into 16 bits (four nibbles), and
// the even lane of each pair stores its bits and its neighbour's as one word.
// vec 1: lane l reads keys 4l .. 4l + 3 of a 128-key chunk with one 4-byte load, turns them
// into a 4-bit nibble, and the 8 lanes of a word OR their shifted nibbles together; else
// lane l reads key 32j + l and a ballot makes word j. A row's last partial group is read byte
// by byte. Each warp takes as many block rows per pass as keep kMaskPackRows loads (16-byte:
// kMaskPackRows16; byte loads: kMaskPackRowsScalar) per lane in flight before the first is
// used.
#pragma once
#include "common.cuh"
#include "mask_pack_params.cuh"
#include "item_order.cuh"

namespace dm {

// Bit e: byte e of x nonzero (16 mask bytes, one 16-byte load).
DM_DEVICE uint32_t kept_bits16(const uint4& x) {
  return kept_nibble(x.x) | kept_nibble(x.y) << 4 | kept_nibble(x.z) << 8 |
         kept_nibble(x.w) << 12;
}

constexpr int kMaskPackRows16 = 4;      // 16-byte loads per lane and pass (vec 2: 4 rows each)
constexpr int kMaskPackRows = 8;        // block rows per pass of a warp (vec 1)
constexpr int kMaskPackRowsScalar = 4;  // the same with byte loads

template <int kNumWarps>
__global__ void __launch_bounds__(kNumWarps * 32)
mask_pack_kernel(const MaskPackParams p) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int cb = blockIdx.x, rb = blockIdx.y, z = blockIdx.z;
  const int mb = z / p.heads, mh = z - mb * p.heads;
  const int wpr = p.block_n / 32;  // words per block row
  const int64_t blk = (int64_t(z) * p.row_blocks + rb) * p.col_blocks + cb;
  uint32_t* out = p.words + blk * (int64_t(p.block_m) * wpr);
  const int row0 = rb * p.block_m, key0 = cb * p.block_n;
  const int rows = min(p.block_m, p.seqlen_q - row0);  // in-range rows and keys (>= 1)
  const int keys = min(p.block_n, p.seqlen_k - key0);
  const uint8_t* base = p.mask + int64_t(mb) * p.batch_stride + int64_t(mh) * p.head_stride +
                        int64_t(row0) * p.row_stride + int64_t(key0) * p.col_stride;
  uint32_t kept = 0;  // this lane's share (vec: its nibbles; else lane 0: whole words)
  constexpr int kStep = kNumWarps * kMaskPackRows;
  if (p.vec == 2) {
    constexpr int kStep16 = 4 * kNumWarps * kMaskPackRows16;
    for (int q = 0; q < p.block_n / 128; ++q) {
      const int key = 128 * q + 16 * (lane % 8);  // this lane's first key in the block
      const bool whole = key + 16 <= keys;         // its 16 keys in range: one load per row
      const int tail = keys - key;                 // else 1..15 keys in range (<= 0: none)
      // (r0 warp-uniform: every lane takes the loop's shuffles)
      for (int r0 = 4 * warp; r0 < p.block_m; r0 += kStep16) {
        uint32_t v[kMaskPackRows16];  // bit e: key key + e of row r0 + l / 8 + 4 kNumWarps i
        uint4 x[kMaskPackRows16];
#pragma unroll
        for (int i = 0; i < kMaskPackRows16; ++i) {  // predicated loads, all in flight at once
          const int r = r0 + lane / 8 + i * 4 * kNumWarps;
          const bool ok = whole && r < rows;
          const uint4* s = reinterpret_cast<const uint4*>(
              base + (ok ? int64_t(r) * p.row_stride + key : 0));
          x[i] = ok ? __ldg(s) : uint4{0u, 0u, 0u, 0u};
        }
#pragma unroll
        for (int i = 0; i < kMaskPackRows16; ++i) v[i] = kept_bits16(x[i]);
        if (!whole && tail > 0) {  // a row's last partial group: byte by byte
#pragma unroll
          for (int i = 0; i < kMaskPackRows16; ++i) {
            const int r = r0 + lane / 8 + i * 4 * kNumWarps;
            const uint8_t* s = base + int64_t(r) * p.row_stride + key;
#pragma unroll 1
            for (int e = 0; r < rows && e < tail; ++e) v[i] |= uint32_t(s[e] != 0) << e;
          }
        }
#pragma unroll
        for (int i = 0; i < kMaskPackRows16; ++i) {
          const int r = r0 + lane / 8 + i * 4 * kNumWarps;
          kept += __popc(v[i]);
          const uint32_t w = v[i] | __shfl_down_sync(0xffffffffu, v[i], 1) << 16;
          if (lane % 2 == 0 && r < p.block_m) out[r * wpr + 4 * q + (lane % 8) / 2] = w;
        }
      }
    }
  } else if (p.vec) {
    for (int q = 0; q < p.block_n / 128; ++q) {
      const int key = 128 * q + 4 * lane;  // this lane's first key in the block
      const bool whole = key + 4 <= keys;  // its 4 keys in range: one load per row
      const int tail = keys - key;         // else 1..3 keys in range (<= 0: none)
      for (int r0 = warp; r0 < p.block_m; r0 += kStep) {
        uint32_t x[kMaskPackRows];
#pragma unroll
        for (int i = 0; i < kMaskPackRows; ++i) {  // predicated loads, all in flight at once
          const int r = r0 + i * kNumWarps;
          const bool ok = whole && r < rows;
          const uint32_t* s = reinterpret_cast<const uint32_t*>(
              base + (ok ? int64_t(r) * p.row_stride + key : 0));
          x[i] = ok ? __ldg(s) : 0u;
        }
        if (!whole && tail > 0) {  // a row's last partial group (one lane): byte by byte
#pragma unroll
          for (int i = 0; i < kMaskPackRows; ++i) {  // (unrolled: x stays in registers)
            const int r = r0 + i * kNumWarps;
            const uint8_t* s = base + int64_t(r) * p.row_stride + key;
#pragma unroll 1
            for (int e = 0; r < rows && e < tail; ++e) x[i] |= uint32_t(s[e] != 0) << (8 * e);
          }
        }
#pragma unroll
        for (int i = 0; i < kMaskPackRows; ++i) {
          const int r = r0 + i * kNumWarps;
          uint32_t v = kept_nibble(x[i]);  // bit e: byte e nonzero
          kept += __popc(v);
          v <<= 4 * (lane % 8);
          v |= __shfl_xor_sync(0xffffffffu, v, 1);
          v |= __shfl_xor_sync(0xffffffffu, v, 2);
          v |= __shfl_xor_sync(0xffffffffu, v, 4);
          if (lane % 8 == 0 && r < p.block_m) out[r * wpr + 4 * q + lane / 8] = v;
        }
      }
    }
  } else {
    constexpr int kStepS = kNumWarps * kMaskPackRowsScalar;
    for (int j = 0; j < wpr; ++j) {
      const int key = 32 * j + lane;
      for (int r0 = warp; r0 < p.block_m; r0 += kStepS) {
        bool on[kMaskPackRowsScalar];
#pragma unroll
        for (int i = 0; i < kMaskPackRowsScalar; ++i) {
          const int r = r0 + i * kNumWarps;
          on[i] = r < rows && key < keys &&
                  base[int64_t(r) * p.row_stride + int64_t(key) * p.col_stride] != 0;
        }
#pragma unroll
        for (int i = 0; i < kMaskPackRowsScalar; ++i) {
          const int r = r0 + i * kNumWarps;
          const uint32_t w = __ballot_sync(0xffffffffu, on[i]);
          if (lane == 0 && r < p.block_m) {
            out[r * wpr + j] = w;
            kept += __popc(w);
          }
        }
      }
    }
  }
  // the block's count: each warp's lanes summed, then the warps' sums
#pragma unroll
  for (int o = 16; o > 0; o /= 2) kept += __shfl_xor_sync(0xffffffffu, kept, o);
  __shared__ uint32_t total;
  if (threadIdx.x == 0) total = 0u;
  __syncthreads();
  if (lane == 0) atomicAdd(&total, kept);
  __syncthreads();
  if (threadIdx.x == 0) p.kept[blk] = int32_t(total);
}

// The block lists of block row `row` ((b * H + h) * row_blocks + rb) from its blocks' kept
// counts (kept_of(cb)), by one warp, as fwd_sm90 reads a MixedMask's: the warp walks the
// column blocks 32 at a time, classes each block by its kept count against its in-range
// element count (0: empty; all: full; else partial), and appends full and partial ones in
// ascending order (a ballot's lower lanes give each its place). A partial block's slot is its
// own index, the row of `words` it was packed into (no prefix sum over all blocks: the lists
// are made without a host read).
template <typename KeptOf>
DM_DEVICE void write_row_lists(const MaskListsParams& p, int64_t row, int lane, KeptOf kept_of) {
  const int ncb = p.col_blocks;
  const int rb = int(row % p.row_blocks);
  const int rows = min(p.block_m, p.seqlen_q - rb * p.block_m);
  const uint32_t below = (1u << lane) - 1u;
  int32_t* full_idx = p.full_idx + row * ncb;
  int32_t* partial_idx = p.partial_idx + row * ncb;
  int nfull = 0, npart = 0;
  for (int cb0 = 0; cb0 < ncb; cb0 += 32) {
    const int cb = cb0 + lane;
    const int64_t blk = row * ncb + cb;
    const bool in = cb < ncb;
    const int kept = in ? kept_of(cb) : 0;
    const int all = in ? rows * min(p.block_n, p.seqlen_k - cb * p.block_n) : 0;
    const bool full = in && kept == all, part = kept > 0 && kept < all;
    const uint32_t fb = __ballot_sync(0xffffffffu, full), pb = __ballot_sync(0xffffffffu, part);
    if (full) full_idx[nfull + __popc(fb & below)] = cb;
    if (part) partial_idx[npart + __popc(pb & below)] = cb;
    if (in) p.partial_slot[blk] = part ? int32_t(blk) : -1;  // < 2^31: the host checks words
    nfull += __popc(fb);
    npart += __popc(pb);
  }
  for (int cb = lane; cb < ncb; cb += 32) {  // the unused tails: zeros, not stale memory
    if (cb >= nfull) full_idx[cb] = 0;
    if (cb >= npart) partial_idx[cb] = 0;
  }
  if (lane == 0) {
    p.full_count[row] = nfull;
    p.partial_count[row] = npart;
  }
}

// The block lists of the packed mask (mask_pack_kernel's counts): one warp per block row.
template <int kNumWarps>
__global__ void __launch_bounds__(kNumWarps * 32)
mask_lists_kernel(const MaskListsParams p) {
  const int64_t row = int64_t(blockIdx.x) * kNumWarps + threadIdx.x / 32;  // (b*H + h)*nrb + rb
  if (row >= p.rows) return;
  const int64_t first = row * p.col_blocks;
  write_row_lists(p, row, threadIdx.x % 32, [&](int cb) { return p.kept[first + cb]; });
}

// The attn_mask route's packing overlapped with its forward (mask_pack.overlaps,
// DMATTN_MASK_ROUTE=overlap): a persistent grid of a few CTAs (32 warps, one per SM: the
// forward's CTAs take the other SMs) packs whole block rows of 128 x 128 blocks from a mask of
// its own per (batch, head) with 16-byte aligned rows (vec 2), writes each row's lists as
// mask_lists_kernel does, and then sets the ready word of the forward's work item that reads
// the row (after the CTA's barrier: fence, then the store). The forward is launched
// programmatically behind this grid, whose CTAs let it start at once; it waits on each item's
// word before the item and resets it (sm90/fwd.cu: wait_row_ready). Block rows go in the
// forward's item order (item_order.cuh; block row rb is the forward's query tile, unit u its
// item u), so the rows it runs first are ready first. Thread t takes row t / 8 of the block row and keys 16 (t % 8) .. + 15 of every
// 128-key block, kMaskRowsLoads blocks' 16-byte loads in flight; a block's kept count is
// summed by a warp reduction and one shared atomic per warp. Words and lists are laid out as
// mask_pack_kernel's and mask_lists_kernel's (`kept` is not written).
#ifndef DM_MASK_ROWS_LOADS
#define DM_MASK_ROWS_LOADS 8
#endif
constexpr int kMaskRowsLoads = DM_MASK_ROWS_LOADS;

template <int kNumWarps>
__global__ void __launch_bounds__(kNumWarps * 32, 1)
mask_rows_kernel(const MaskPackParams p, const MaskListsParams l) {
  static_assert(kNumWarps == 32, "a thread per row and 16-key group of a 128 x 128 block");
  grid_dependents_launch();  // the forward may start: it waits per block row
  extern __shared__ int32_t kept_s[];  // per column block of the current block row
  const int tid = threadIdx.x, lane = tid % 32;
  const int r = tid / 8, s = tid % 8;  // block row's row, 16-key group of a block
  const int ncb = p.col_blocks, nrb = p.row_blocks;
  const int bh = int(l.rows / nrb);    // the mask's batch * heads (the forward's, own masks)
  const bool lpt = sm90_lpt_sections(bh);
  for (int u = blockIdx.x; u < l.rows; u += gridDim.x) {
    int rb, z;  // the forward's item u: query tile rb of head-batch z
    sm90_item_coords(u, nrb, bh, false, lpt, rb, z);
    const int64_t row = int64_t(z) * nrb + rb;
    const int mb = z / p.heads, mh = z - mb * p.heads;
    for (int c = tid; c < ncb; c += kNumWarps * 32) kept_s[c] = 0;
    __syncthreads();
    const int row0 = rb * 128;
    const bool row_in = r < p.seqlen_q - row0;
    const uint8_t* src = p.mask + int64_t(mb) * p.batch_stride + int64_t(mh) * p.head_stride +
                         int64_t(row0 + (row_in ? r : 0)) * p.row_stride + 16 * s;
    uint32_t* out = p.words + row * ncb * (128 * 4) + r * 4 + s / 2;
    for (int cb0 = 0; cb0 < ncb; cb0 += kMaskRowsLoads) {
      uint4 x[kMaskRowsLoads];
#pragma unroll
      for (int i = 0; i < kMaskRowsLoads; ++i) {  // predicated loads, all in flight at once
        const int key = (cb0 + i) * 128 + 16 * s;
        const bool ok = row_in && cb0 + i < ncb && key + 16 <= p.seqlen_k;
        const uint4* a = reinterpret_cast<const uint4*>(src + (ok ? (cb0 + i) * 128 : 0));
        x[i] = ok ? __ldg(a) : uint4{0u, 0u, 0u, 0u};
      }
#pragma unroll
      for (int i = 0; i < kMaskRowsLoads; ++i) {
        const int cb = cb0 + i;  // warp-uniform
        if (cb >= ncb) break;
        uint32_t v = kept_bits16(x[i]);
        const int tail = p.seqlen_k - (cb * 128 + 16 * s);  // 1..15: the row's last keys
        if (row_in && tail > 0 && tail < 16) {
#pragma unroll 1
          for (int e = 0; e < tail; ++e) v |= uint32_t(src[cb * 128 + e] != 0) << e;
        }
        const uint32_t n = __reduce_add_sync(0xffffffffu, uint32_t(__popc(v)));
        const uint32_t w = v | __shfl_down_sync(0xffffffffu, v, 1) << 16;
        if (s % 2 == 0) out[int64_t(cb) * (128 * 4)] = w;
        if (lane == 0 && n != 0) atomicAdd(&kept_s[cb], int32_t(n));
      }
    }
    __syncthreads();
    if (tid < 32) write_row_lists(l, row, lane, [&](int cb) { return kept_s[cb]; });
    __syncthreads();
    if (tid == 0) {
      __threadfence();  // every thread's words and warp 0's lists (ordered by the barrier)
      atomicExch(l.ready + u, 1);
    }
  }
}

}  // namespace dm
