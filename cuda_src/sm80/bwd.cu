// bwd.cu: the backward kernels (FlashAttention-2 style, tensor cores, sm_80+).
//   flash_bwd_pre_kernel:  dsum[i] = rowsum(dO * O)[i] - dlse[i]  (fp32, lse layout); zeroes
//     dq_accum's rows (non-deterministic mode); with bp.lse_shifted, lse[i] = lse_shifted[i]
//     minus row i's bias (a bias constant over keys, which the later kernels then leave out).
//   flash_bwd_dkdv_kernel: a CTA owns kBlockN keys of one (batch, kv head); it loops over the
//     query heads of the kv group and the query tiles that can see its keys, recomputes
//     P = exp2(x - lse * log2 e) from the forward's lse, and accumulates dV += P^T dO and
//     dK += dS^T Q in registers (so GQA groups are summed without atomics). dbias is written
//     from a shared-memory tile (reduced over broadcast rows/cols first). Non-deterministic
//     mode also adds dQ += dS K into an fp32 buffer with atomics.
//   flash_bwd_dq_kernel:   deterministic mode: a CTA owns kBlockM query rows of one head and
//     loops over key tiles, so dQ is accumulated in registers in a fixed order.
//   flash_bwd_post_kernel: dq = dq_accum cast to the query dtype (cvt.rn, as torch's cast),
//     after the dK/dV (or Hopper) kernel; the rows the pre kernel zeroed.
//   flash_bwd_sparse_grid_kernel: a block mask's row lists as a (row block, col block) grid,
//     so the key-major dK/dV loop finds a block's state with one read (bp.sp_grid).
// Logits (log2 domain) x = softcap(scale * q.k) * log2 e + bias * log2 e; dx = P (dP - dsum);
// dbias = dx; d(q.k) = dx * scale * (1 - tanh^2) (softcap) or dx * scale.
// Block-sparse masks run the kHasMask kernels with bp.sp_grid set (f.mask may then be null):
// unlisted blocks are skipped without a sync or any load; a MixedMask's partial blocks apply
// their element bits.
// Excluded positions and rows with lse = -inf (nothing allowed) get P = 0, so every gradient
// there is 0 (never NaN). Query tiles a key tile cannot see (causal/window) are never visited,
// and tiles whose mask is all false are skipped before their Q/dO (or K/V) are loaded.
// Requires 16-byte aligned q/k/v/dout rows (the launcher copies otherwise).
#pragma once
#include "common.cuh"
#include "params.cuh"
#include "bwd_params.cuh"
#include "mma.cuh"
#include "fragment.cuh"
#include "seqlen.cuh"
#include "block_info.cuh"
#include "mask_bias.cuh"
#include "logits.cuh"
#include "tile_io.cuh"
#include "bwd_gemm.cuh"

namespace dm {

// The pre and post kernels: each warp owns kBwdRowsPerWarp consecutive query rows and issues
// every row's loads before it reduces or stores any (one row per warp kept ~0.5 KB in flight
// per warp: 2.5-2.7 TB/s on the H200). Grid: ceil(seqlen_q / (kNumWarps * kBwdRowsPerWarp))
// x heads x batch (backward.ROWS_PER_WARP mirrors it).
constexpr int kBwdRowsPerWarp = 4;

// The eight elements of a 16-byte word as floats.
template <typename T>
DM_DEVICE void unpack8(const uint4& w, float (&x)[8]) {
  const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    T lo, hi;
    lo.bits = uint16_t(u[k] & 0xffffu);
    hi.bits = uint16_t(u[k] >> 16);
    x[2 * k] = to_float(lo);
    x[2 * k + 1] = to_float(hi);
  }
}

template <typename T, int kNumWarps, bool kVarlen>
__global__ void __launch_bounds__(kNumWarps * 32)
flash_bwd_pre_kernel(const BwdParams bp) {
  const FwdParams& p = bp.f;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq = seq_info<kVarlen>(p, b);
  const int i0 = (blockIdx.x * kNumWarps + warp) * kBwdRowsPerWarp;
  if (i0 >= seq.len_q) return;
  // Lane l holds elements 8l .. 8l + 7 of each row (head_dim <= 256, a multiple of 8), read
  // by 16-byte loads, all rows' before any math, where O's and dO's rows are 16-byte aligned
  // (first row and row strides); else element by element.
  const T* o0 = o_row_ptr<T>(p, b, h, seq, i0);
  const T* d0 = do_row_ptr<T>(bp, b, h, seq, i0);
  const bool vec = ((reinterpret_cast<uint64_t>(o0) | reinterpret_cast<uint64_t>(d0) |
                     uint64_t(p.o_row_stride * int64_t(sizeof(T))) |
                     uint64_t(bp.do_row_stride * int64_t(sizeof(T)))) & 15u) == 0;
  const int c = 8 * lane;
  float acc[kBwdRowsPerWarp];
  if (vec) {
    uint4 wo[kBwdRowsPerWarp], wd[kBwdRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kBwdRowsPerWarp; ++r) {
      wo[r] = wd[r] = make_uint4(0u, 0u, 0u, 0u);
      if (i0 + r < seq.len_q && c < p.head_dim) {
        wo[r] = *reinterpret_cast<const uint4*>(o0 + int64_t(r) * p.o_row_stride + c);
        wd[r] = *reinterpret_cast<const uint4*>(d0 + int64_t(r) * bp.do_row_stride + c);
      }
    }
#pragma unroll
    for (int r = 0; r < kBwdRowsPerWarp; ++r) {
      float xo[8], xd[8];
      unpack8<T>(wo[r], xo);
      unpack8<T>(wd[r], xd);
      acc[r] = 0.f;
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[r] += xo[k] * xd[k];
    }
  } else {
#pragma unroll
    for (int r = 0; r < kBwdRowsPerWarp; ++r) {
      acc[r] = 0.f;
      if (i0 + r >= seq.len_q) continue;
      const T* o = o0 + int64_t(r) * p.o_row_stride;
      const T* d = d0 + int64_t(r) * bp.do_row_stride;
      for (int cc = lane; cc < p.head_dim; cc += 32) acc[r] += to_float(o[cc]) * to_float(d[cc]);
    }
  }
#pragma unroll
  for (int r = 0; r < kBwdRowsPerWarp; ++r) {
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], s);
    const int i = i0 + r;
    if (lane == 0 && i < seq.len_q) {
      const int64_t idx = lse_index(p, b, h, seq, i);
      bp.dsum[idx] = acc[r] - (bp.dlse != nullptr ? bp.dlse[idx] : 0.f);
      if (bp.lse_shifted != nullptr) {   // the row's bias taken out of the forward's lse
        const float l = bp.lse_shifted[idx];
        p.lse[idx] = l == -DM_INF ? l : l - bias_element<T>(p, bias_offset(p, b, h, seq), i, 0,
                                                            seq.len_q, 1);
      }
    }
  }
  // Non-deterministic mode: this row's dQ accumulator starts at 0 here (the host does not
  // zero-fill it; the dK/dV kernels that add into it run after this kernel on the stream).
  // Every (row, head) of a q-shaped dq_accum is some warp's row: the buffer is zeroed whole.
  // Its rows are 16-byte aligned (a contiguous fp32 workspace, head_dim a multiple of 8).
  if (bp.dq_accum != nullptr) {
#pragma unroll
    for (int r = 0; r < kBwdRowsPerWarp; ++r) {
      const int i = i0 + r;
      if (i >= seq.len_q) continue;
      float* dqa = dqa_row_ptr(bp, b, h, seq, i);
      for (int cc = 4 * lane; cc < p.head_dim; cc += 128)
        *reinterpret_cast<float4*>(dqa + cc) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
}

// The pre kernel's grid: dq's row = dq_accum's row in T, rounded to nearest even (the same
// cvt.rn torch's float -> half/bfloat16 cast compiles to). Lane l converts elements 4l.. (and
// 4l + 128.. at head_dim > 128) of each row: 16-byte loads, 8-byte stores where dq's row is
// 8-byte aligned, else 4-byte ones (the head dim is a multiple of 8, validate).
template <typename T, int kNumWarps, bool kVarlen>
__global__ void __launch_bounds__(kNumWarps * 32)
flash_bwd_post_kernel(const BwdParams bp) {
  const FwdParams& p = bp.f;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq = seq_info<kVarlen>(p, b);
  const int i0 = (blockIdx.x * kNumWarps + warp) * kBwdRowsPerWarp;
  if (i0 >= seq.len_q) return;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int c = 4 * lane + 128 * half;
    if (c >= p.head_dim) break;
    float4 x[kBwdRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kBwdRowsPerWarp; ++r)
      if (i0 + r < seq.len_q)
        x[r] = *reinterpret_cast<const float4*>(dqa_row_ptr(bp, b, h, seq, i0 + r) + c);
#pragma unroll
    for (int r = 0; r < kBwdRowsPerWarp; ++r) {
      if (i0 + r >= seq.len_q) continue;
      T* dst = dq_row_ptr<T>(bp, b, h, seq, i0 + r) + c;
      const uint32_t lo = pack2<T>(x[r].x, x[r].y), hi = pack2<T>(x[r].z, x[r].w);
      if ((reinterpret_cast<uint64_t>(dst) & 7u) == 0) {
        *reinterpret_cast<uint2*>(dst) = make_uint2(lo, hi);
      } else {
        reinterpret_cast<uint32_t*>(dst)[0] = lo;
        reinterpret_cast<uint32_t*>(dst)[1] = hi;
      }
    }
  }
}

// One CTA per (row block, mask head, mask batch): clears its grid row, then marks the listed
// blocks. Only a MixedMask lists partial blocks (block-granular masks keep whole blocks, and
// a DynamicMask lists full ones only), so a partial entry takes its slot from sp_partial_slot.
template <int kNumWarps>
__global__ void __launch_bounds__(kNumWarps * 32)
flash_bwd_sparse_grid_kernel(const BwdParams bp) {
  const FwdParams& p = bp.f;
  const int64_t row = sparse_row(p, blockIdx.z, blockIdx.y, blockIdx.x);
  int32_t* g = bp.sp_grid + row * bp.sp_grid_cols;
  for (int c = threadIdx.x; c < bp.sp_grid_cols; c += blockDim.x) g[c] = kSpNone;
  __syncthreads();
  const int n_full = p.sp_full_count[row], n_part = p.sp_partial_count[row];
  for (int t = threadIdx.x; t < n_full; t += blockDim.x)
    g[p.sp_full_idx[row * p.sp_full_width + t]] = kSpFull;
  for (int t = threadIdx.x; t < n_part; t += blockDim.x) {
    const int blk = p.sp_partial_idx[row * p.sp_partial_width + t];
    g[blk] = p.sp_partial_slot != nullptr ? p.sp_partial_slot[row * p.sp_col_blocks + blk]
                                          : kSpFull;
  }
}

// The Hopper backward's CTAs (item i = key tile t + tiles * (kv head + kv_heads * batch)) in
// groups of kSpOrderGroup consecutive items, each group longest first: CTA g of this kernel
// (a multiple of kSpOrderGroup threads) ranks group g's items by their listed blocks (over
// the kv group's heads and every row block, read from sp_grid: adjacent items read adjacent
// columns; ties in item order) and writes bp.sp_order[i] = the item the i-th bwd_sm90 CTA
// runs. In-order CTA dispatch then ends each ~wave with its shortest CTAs (random 10% block
// masks left ~12% of the SMs' time idle in grid order); a group spans about two heads, so the
// CTAs in flight share Q/dO/dQ in L2 as in grid order (one longest-first order over all CTAs
// put every head in flight and gained nothing).
template <int kNumWarps>
__global__ void __launch_bounds__(kNumWarps * 32)
flash_bwd_sparse_order_kernel(const BwdParams bp) {
  // kSub threads per item (adjacent lanes): each counts every kSub-th row block, and each ranks
  // the item against every kSub-th item of the group, so all of a thread's loads are in flight
  // at once (one thread per item: ~7.5 us for 1024 CTAs, latency-bound).
  constexpr int kSub = kNumWarps * 32 / kSpOrderGroup;
  static_assert(kSub * kSpOrderGroup == kNumWarps * 32 && 32 % kSub == 0, "kSub lanes per item");
  const FwdParams& p = bp.f;
  __shared__ int32_t counts[kSpOrderGroup];
  const int tid = threadIdx.x, sub = tid % kSub, x = tid / kSub;
  const int tiles = (p.seqlen_k + kSpOrderTileN - 1) / kSpOrderTileN;
  const int items = tiles * p.kv_heads * p.batch;
  const int first = blockIdx.x * kSpOrderGroup, n = dm_min(kSpOrderGroup, items - first);
  const int i = first + x;
  int count = 0;
  if (x < n) {
    const int t = i % tiles, kvh = i / tiles % p.kv_heads, b = i / tiles / p.kv_heads;
    const int col = t * kSpOrderTileN / p.sp_block_n;
    for (int j = 0; j < p.q_per_kv; ++j) {
      const int h = kvh * p.q_per_kv + j;
      const int32_t* g = bp.sp_grid +
          sparse_row(p, p.sp_batches == 1 ? 0 : b, p.sp_heads == 1 ? 0 : h, 0) *
              bp.sp_grid_cols + col;
#pragma unroll 8
      for (int rb = sub; rb < p.sp_row_blocks; rb += kSub)
        count += g[int64_t(rb) * bp.sp_grid_cols] != kSpNone;
    }
  }
#pragma unroll
  for (int d = kSub / 2; d > 0; d /= 2) count += __shfl_xor_sync(0xffffffffu, count, d);
  if (sub == 0) counts[x] = count;
  __syncthreads();
  // the items of the group before this one: more blocks, or as many and earlier
  int rank = 0;
  if (x < n)
    for (int j = sub; j < n; j += kSub) rank += counts[j] > count || (counts[j] == count && j < x);
#pragma unroll
  for (int d = kSub / 2; d > 0; d /= 2) rank += __shfl_xor_sync(0xffffffffu, rank, d);
  if (x < n && sub == 0) bp.sp_order[first + rank] = i;
}

// dst[0] += a, dst[1] += b without a return value; dst is 8-byte aligned. sm_90 has a
// two-float reduction (one instruction, one L2 transaction); elsewhere two scalar ones.
DM_DEVICE void red_add2(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(dst), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

// State (kSpNone, kSpFull or a partial slot) of the mask block holding tile (m0, n0).
DM_DEVICE int sparse_state(const BwdParams& bp, int b, int h, int m0, int n0) {
  return bp.sp_grid[sparse_row_entry(bp.f, b, h, m0) * bp.sp_grid_cols + n0 / bp.f.sp_block_n];
}

// Keep-bits of a listed block: all candidates when full, its element bits when partial.
template <int kNF>
DM_DEVICE uint32_t sparse_bits(const FwdParams& p, int state, const TileCoords& tc, int m0,
                               int n0, uint32_t candidates) {
  if (state < 0) return candidates;
  return block_element_bits<kNF>(sparse_block_words(p, state), tc, m0 / p.sp_block_m * p.sp_block_m,
                                 n0 / p.sp_block_n * p.sp_block_n, p.sp_block_n, candidates);
}

// Per-element backward math on one warp's S and dP fragments (16 rows x 8*kNF keys starting
// at tile column c0; the bias/dx tile has row stride kBStride):
// s <- P, dp <- d(q.k) (the dS operand of dQ/dK). With kHasBias, the bias is read from `raw`
// (the tile as staged by cp.async, T elements, row stride kRawStride, one row when
// `one_row`) or, when raw is null, from sb (log2 units); sb holds dx (= dbias) on exit.
// lse is the forward's natural-log lse; -inf (nothing allowed) gives P = 0.
template <typename T, int kNF, int kBStride, int kRawStride, bool kHasBias>
DM_DEVICE void bwd_pointwise(const FwdParams& p, float scale, float (&s)[kNF][4],
                             float (&dp)[kNF][4], uint32_t bits, const float (&lse_nat)[2],
                             const float (&dsum)[2], float* sb, const uint16_t* raw,
                             bool one_row, int r0, int c0, int lane) {
  float lse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) lse[r] = lse_nat[r] == -DM_INF ? DM_INF : lse_nat[r] * kLog2e;
#pragma unroll
  for (int j = 0; j < kNF; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e >> 1;
      float dsoft;
      float x = logit_log2(p, s[j][e], scale, dsoft);
      const int col = c0 + 8 * j + 2 * (lane % 4) + (e & 1);
      const int sidx = (r0 + 8 * r) * kBStride + col;
      if (kHasBias)
        x += raw != nullptr ? to_float(T{raw[(one_row ? 0 : r0 + 8 * r) * kRawStride + col]}) *
                                  kLog2e
                            : sb[sidx];
      const float pr = (bits >> (j * 4 + e)) & 1u ? fast_exp2(x - lse[r]) : 0.f;
      const float dx = pr * (dp[j][e] - dsum[r]);
      if (kHasBias) sb[sidx] = dx;
      s[j][e] = pr;
      dp[j][e] = dx * dsoft;
    }
}

// Adds the dx tile (shared memory, [kBlockM][kBStride] fp32) into dbias, summing first over a
// broadcast row and/or column dimension (stride 0). The thread that touches an address is the
// same at every call, so mode 2 (plain add) is race-free and ordered.
template <typename T, int kBlockM, int kBlockN, int kBStride, int kThreads>
DM_DEVICE void write_dbias(const BwdParams& bp, const float* sb, int64_t base, int m0, int n0,
                           int len_q, int len_k) {
  const int64_t rs = bp.dbias_row_stride, cs = bp.dbias_col_stride;
  const int rows = dm_min(kBlockM, len_q - m0), cols = dm_min(kBlockN, len_k - n0);
  auto put = [&](int64_t idx, float v) {
    if (bp.dbias_mode == 1) {
      if (bp.dbias_is_fp32) static_cast<float*>(bp.dbias)[idx] = v;
      else static_cast<T*>(bp.dbias)[idx] = from_float<T>(v);
    } else if (bp.dbias_mode == 2) {
      static_cast<float*>(bp.dbias)[idx] += v;
    } else {
      atomicAdd(static_cast<float*>(bp.dbias) + idx, v);
    }
  };
  if (rs != 0 && cs != 0) {
    for (int e = threadIdx.x; e < kBlockM * kBlockN; e += kThreads) {
      const int r = e / kBlockN, c = e % kBlockN;
      if (r < rows && c < cols)
        put(base + int64_t(m0 + r) * rs + int64_t(n0 + c) * cs, sb[r * kBStride + c]);
    }
  } else if (cs != 0) {  // one row: sum over queries
    for (int c = threadIdx.x; c < cols; c += kThreads) {
      float sum = 0.f;
      for (int r = 0; r < rows; ++r) sum += sb[r * kBStride + c];
      put(base + int64_t(n0 + c) * cs, sum);
    }
  } else if (rs != 0) {  // one column: sum over keys
    for (int r = threadIdx.x; r < rows; r += kThreads) {
      float sum = 0.f;
      for (int c = 0; c < cols; ++c) sum += sb[r * kBStride + c];
      put(base + int64_t(m0 + r) * rs, sum);
    }
  } else if (threadIdx.x < 32) {  // one element
    float sum = 0.f;
    for (int e = threadIdx.x; e < kBlockM * kBlockN; e += 32)
      if (e / kBlockN < rows && e % kBlockN < cols)
        sum += sb[(e / kBlockN) * kBStride + e % kBlockN];
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, s);
    if (threadIdx.x == 0) put(base, sum);
  }
}

// Warp roles (kNumWarps = 8; kBlockM = 64, or 128 without mask/bias where shared memory
// allows): with S = kBlockM / 16 query slabs, for S/dP warp w owns query rows 16 (w % S) and
// key columns kSCols * (w / S); for dK/dV, key rows 16 (w % kWarpsN) and head-dim columns
// kDCols * (w / kWarpsN); for the atomic dQ, query rows 16 (w % S) and head-dim columns
// kDqCols * (w / S).
template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kNumWarps, bool kHasMask,
          bool kHasBias, bool kVarlen, bool kDeterministic>
__global__ void __launch_bounds__(kNumWarps * 32, 1)
flash_bwd_dkdv_kernel(const BwdParams bp) {
  const FwdParams& p = bp.f;
  constexpr int kThreads = kNumWarps * 32;
  constexpr int kStride = kHeadDim + 8;
  constexpr int kPStride = kBlockN + 8;
  constexpr int kMSlabs = kBlockM / 16;          // query slabs of S/dP
  static_assert(kNumWarps % kMSlabs == 0, "warps tile the S/dP block");
  constexpr int kSGroups = kNumWarps / kMSlabs;  // key column groups of S/dP
  constexpr int kSCols = kBlockN / kSGroups;
  static_assert(kSCols % 16 == 0 && kSCols <= 64, "keep-bits of a warp tile fit one uint32");
  constexpr int kNF = kSCols / 8;
  constexpr int kWarpsN = kBlockN / 16;          // key slabs of dK/dV
  static_assert(kNumWarps % kWarpsN == 0, "warps tile the dK/dV block");
  constexpr int kWarpsD = kNumWarps / kWarpsN;   // column groups of dK/dV
  constexpr int kDCols = kHeadDim / kWarpsD;
  static_assert(kDCols % 16 == 0, "dK/dV column group is a multiple of 16");
  constexpr int kGF = kDCols / 8;
  constexpr int kDqCols = kHeadDim / kSGroups;
  constexpr int kDqChunk = kDqCols % 64 == 0 ? 64 : (kDqCols % 32 == 0 ? 32 : 16);
  static_assert(kDqCols % kDqChunk == 0, "dQ chunks tile the column group");
  // Q/dO (and their lse/dsum rows) are double-buffered when shared memory allows: the next
  // visited query tile is fetched while the current one computes.
  constexpr int kStages = kHeadDim <= 128 ? 2 : 1;
  constexpr int kBStride = kBlockN + 8;  // bias/dx tile row stride (fewer bank conflicts)
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;                                 // kStages x kBlockM x kStride
  uint16_t* sdO = sQ + kStages * kBlockM * kStride;    // kStages x kBlockM x kStride
  uint16_t* sK = sdO + kStages * kBlockM * kStride;
  uint16_t* sV = sK + kBlockN * kStride;
  uint16_t* sP = sV + kBlockN * kStride;
  uint16_t* sdS = sP + kBlockM * kPStride;
  float* sLse = reinterpret_cast<float*>(sdS + kBlockM * kPStride);  // kStages x kBlockM
  float* sDsum = sLse + kStages * kBlockM;                             // kStages x kBlockM
  float* sB = sDsum + kStages * kBlockM;  // with a bias: its tile, then dx (kBlockM x kBStride)
  // With a bias: kStages x kBlockM x kRawStride raw 16-bit tiles, staged with Q/dO (bias_src).
  constexpr int kRawStride = kBlockN + 8;
  uint16_t* sBraw = reinterpret_cast<uint16_t*>(sB + (kHasBias ? kBlockM * kBStride : 0));

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int kvh = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq = seq_info<kVarlen>(p, b);
  const int n0 = blockIdx.x * kBlockN;
  if (n0 >= seq.len_k) return;

  const T* k = k_row_ptr<T>(p, b, kvh, seq, n0);
  const T* v = v_row_ptr<T>(p, b, kvh, seq, n0);
  load_tile_async<kHeadDim, kStride, kThreads>(sK, k, p.k_row_stride, kBlockN, seq.len_k - n0,
                                               p.head_dim);
  load_tile_async<kHeadDim, kStride, kThreads>(sV, v, p.v_row_stride, kBlockN, seq.len_k - n0,
                                               p.head_dim);
  cp_async_commit();

  // Query rows that can see a key of this tile under the causal/window rule.
  const RowRange qr =
      query_range(p, n0, dm_min(n0 + kBlockN, seq.len_k) - 1, seq.len_q, seq.len_k);
  const int mb_begin = qr.begin / kBlockM;
  const int n_mb = qr.begin < qr.end ? (qr.end - 1) / kBlockM + 1 - mb_begin : 0;
  const int n_items = n_mb * p.q_per_kv;  // (query head of the group, query tile) pairs

  float dk[kGF][4], dv[kGF][4];
  zero_frags(dk);
  zero_frags(dv);
  const int ws = warp % kWarpsN, wd = warp / kWarpsN;     // dK/dV roles
  const int wm = warp % kMSlabs, wc = warp / kMSlabs;     // S/dP and dQ roles
  const int r0 = 16 * wm + lane / 4;  // this thread's first row in the query tile
  const int c0 = kSCols * wc;         // first key column of this warp in the tile
  const bool want_dbias = kHasBias && bp.dbias_mode != 0;

  auto head_of = [&](int item) { return kvh * p.q_per_kv + item / n_mb; };
  auto m0_of = [&](int item) { return (mb_begin + item % n_mb) * kBlockM; };
  // Keep-bits of this thread for an item; the first item >= i that someone in the CTA keeps
  // (a tile whose mask is all false is skipped before anything of it is loaded).
  // state: the item's sparse_state (only read when bp.sp_grid is set).
  auto item_bits = [&](int item, int state) -> uint32_t {
    TileCoords tc;
    tc.row[0] = m0_of(item) + r0;
    tc.row[1] = tc.row[0] + 8;
    tc.col0 = n0 + c0 + 2 * (lane % 4);
    uint32_t bits = window_bits<kNF>(p, tc, seq.len_q, seq.len_k);
    if (kHasMask && p.mask != nullptr)
      bits = mask_bits<kNF>(p, p.mask + mask_offset(p, b, head_of(item), seq), tc, bits);
    if (kHasMask && bp.sp_grid != nullptr)
      bits = sparse_bits<kNF>(p, state, tc, m0_of(item), n0, bits);
    return bits;
  };
  auto next_item = [&](int i, uint32_t& bits) {
    for (; i < n_items; ++i) {
      // Uniform across the CTA: an unlisted block costs one read, no sync.
      const int state = kHasMask && bp.sp_grid != nullptr
                            ? sparse_state(bp, b, head_of(i), m0_of(i), n0) : kSpFull;
      if (state == kSpNone) continue;
      bits = item_bits(i, state);
      if (!kHasMask || cta_any(bits != 0)) return i;
    }
    return i;
  };
  // A 16-bit bias with unit column stride and 16-byte aligned rows (the common dense case)
  // is copied by cp.async with the query tile it belongs to; any other goes through
  // load_bias_tile. Uniform across the CTA for an item.
  const bool bias_one_row = p.bias_row_stride == 0;
  auto bias_src = [&](int h, int m0) -> const uint8_t* {
    if (!kHasBias || p.bias_is_fp32 || p.bias_col_stride != 1 || p.bias_row_stride % 8 != 0)
      return nullptr;
    const uint8_t* src = static_cast<const uint8_t*>(p.bias) +
                         2 * (bias_offset(p, b, h, seq) + int64_t(m0) * p.bias_row_stride + n0);
    return reinterpret_cast<size_t>(src) % 16 == 0 ? src : nullptr;
  };
  auto load_q = [&](int item, int stage) {
    const int h = head_of(item), m0 = m0_of(item);
    const T* q = q_row_ptr<T>(p, b, h, seq, m0);
    const T* dout = do_row_ptr<T>(bp, b, h, seq, m0);
    load_tile_async<kHeadDim, kStride, kThreads>(sQ + stage * kBlockM * kStride, q,
                                                 p.q_row_stride, kBlockM, seq.len_q - m0,
                                                 p.head_dim);
    load_tile_async<kHeadDim, kStride, kThreads>(sdO + stage * kBlockM * kStride, dout,
                                                 bp.do_row_stride, kBlockM, seq.len_q - m0,
                                                 p.head_dim);
    // lse/dsum rows (natural-log lse; rows past the end read as 0: their keep-bits are 0)
    if (threadIdx.x < kBlockM) {
      const int i = m0 + threadIdx.x;
      const bool ok = i < seq.len_q;
      const int64_t idx = lse_index(p, b, h, seq, ok ? i : 0);
      cp_async_4(sLse + stage * kBlockM + threadIdx.x, p.lse + idx, ok);
      cp_async_4(sDsum + stage * kBlockM + threadIdx.x, bp.dsum + idx, ok);
    }
    if (kHasBias) {
      const uint8_t* src = bias_src(h, m0);
      if (src != nullptr)
        load_bytes_async<2 * kBlockN, 2 * kRawStride, kThreads>(
            reinterpret_cast<uint8_t*>(sBraw + stage * kBlockM * kRawStride), src,
            2 * p.bias_row_stride, bias_one_row ? 1 : kBlockM, seq.len_q - m0,
            2 * (seq.len_k - n0));
    }
  };

  uint32_t bits = 0;
  int item = next_item(0, bits);
  if (kStages == 2 && item < n_items) load_q(item, 0);
  cp_async_commit();
  int stage = 0;
  while (item < n_items) {
    uint32_t bits_next = 0;
    const int item_next = next_item(item + 1, bits_next);
    if (kStages == 2) {
      if (item_next < n_items) load_q(item_next, stage ^ 1);
    } else {
      load_q(item, 0);
    }
    cp_async_commit();
    const int h = head_of(item), m0 = m0_of(item);
    const bool bias_staged = kHasBias && bias_src(h, m0) != nullptr;
    if (kHasBias && !bias_staged) load_bias_tile<T, kBlockM, kBlockN, kBStride, kThreads, 16>(
        p, bias_offset(p, b, h, seq), m0, n0, seq.len_q, seq.len_k, sB);
    if (kStages == 2) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();
    const uint16_t* sQs = sQ + stage * kBlockM * kStride;
    const uint16_t* sdOs = sdO + stage * kBlockM * kStride;

    {
      float s[kNF][4], dp[kNF][4];
      zero_frags(s);
      zero_frags(dp);
      gemm_abt<T, kHeadDim, kStride, kStride, kNF>(s, sQs + 16 * wm * kStride, sK + c0 * kStride);
      gemm_abt<T, kHeadDim, kStride, kStride, kNF>(dp, sdOs + 16 * wm * kStride, sV + c0 * kStride);
      const float lse[2] = {sLse[stage * kBlockM + r0], sLse[stage * kBlockM + r0 + 8]};
      const float dsum[2] = {sDsum[stage * kBlockM + r0], sDsum[stage * kBlockM + r0 + 8]};
      bwd_pointwise<T, kNF, kBStride, kRawStride, kHasBias>(
          p, bp.scale, s, dp, bits, lse, dsum, sB,
          bias_staged ? sBraw + stage * kBlockM * kRawStride : nullptr, bias_one_row, r0, c0,
          lane);
      store_p_ds_smem<T>(sP, sdS, kPStride, s, dp, r0, c0);
    }
    __syncthreads();

    gemm_atb<T, kBlockM, kPStride, kStride, kGF>(dv, sP + 16 * ws, sdOs + wd * kDCols);
    gemm_atb<T, kBlockM, kPStride, kStride, kGF>(dk, sdS + 16 * ws, sQs + wd * kDCols);
    if (!kDeterministic) {  // dQ += dS K, fp32 atomics
      // dq_accum is a fresh contiguous fp32 buffer and the head dim a multiple of 8: every
      // pair (col, col + 1) with col < head_dim is 8-byte aligned and in range.
      float* dqa = dqa_row_ptr(bp, b, h, seq, m0);
#pragma unroll 1
      for (int cc = wc * kDqCols; cc < (wc + 1) * kDqCols && cc < p.head_dim; cc += kDqChunk) {
        float acc[kDqChunk / 8][4];
        zero_frags(acc);
        gemm_ab<T, kBlockN, kPStride, kStride, kDqChunk / 8>(acc, sdS + 16 * wm * kPStride,
                                                            sK + cc);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = r0 + 8 * r;
          if (m0 + row >= seq.len_q) continue;
#pragma unroll
          for (int j = 0; j < kDqChunk / 8; ++j) {
            const int col = cc + 8 * j + 2 * (lane % 4);
            if (col < p.head_dim)
              red_add2(dqa + int64_t(row) * bp.dqa_row_stride + col, acc[j][2 * r],
                       acc[j][2 * r + 1]);
          }
        }
      }
    }
    if (want_dbias)
      write_dbias<T, kBlockM, kBlockN, kBStride, kThreads>(
          bp, sB, dbias_offset(bp, b, h, seq), m0, n0, seq.len_q, seq.len_k);
    __syncthreads();  // this stage, P/dS and the bias tile are rewritten next
    item = item_next;
    bits = bits_next;
    stage = kStages == 2 ? stage ^ 1 : 0;
  }
  cp_async_wait<0>();

  T* dkp = dk_row_ptr<T>(bp, b, kvh, seq, n0);
  T* dvp = dv_row_ptr<T>(bp, b, kvh, seq, n0);
  store_frags<T, kGF>(dkp, bp.dk_row_stride, dk, 16 * ws, wd * kDCols, seq.len_k - n0,
                      p.head_dim, lane);
  store_frags<T, kGF>(dvp, bp.dv_row_stride, dv, 16 * ws, wd * kDCols, seq.len_k - n0,
                      p.head_dim, lane);
}

// dQ without atomics: it runs in deterministic mode only.
template <typename T, int kHeadDim, int kBlockM, int kBlockN, int kNumWarps, bool kHasMask,
          bool kHasBias, bool kVarlen>
__global__ void __launch_bounds__(kNumWarps * 32, 1)
flash_bwd_dq_kernel(const BwdParams bp) {
  const FwdParams& p = bp.f;
  static_assert(kBlockM == 16 * kNumWarps, "one m16 query slab per warp");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 64, "keep-bits of a tile fit one uint32");
  constexpr int kThreads = kNumWarps * 32;
  constexpr int kStride = kHeadDim + 8;
  constexpr int kNF = kBlockN / 8;
  constexpr int kDF = kHeadDim / 8;
  constexpr int kBStride = kBlockN + 8;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;
  uint16_t* sdO = sQ + kBlockM * kStride;
  uint16_t* sK = sdO + kBlockM * kStride;
  uint16_t* sV = sK + kBlockN * kStride;
  float* sB = reinterpret_cast<float*>(sV + kBlockN * kStride);  // bias tile (with a bias)

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq = seq_info<kVarlen>(p, b);
  const int m0 = blockIdx.x * kBlockM;
  if (m0 >= seq.len_q) return;
  const int m_end = dm_min(m0 + kBlockM, seq.len_q);
  const int kvh = h / p.q_per_kv;

  const T* q = q_row_ptr<T>(p, b, h, seq, m0);
  const T* dout = do_row_ptr<T>(bp, b, h, seq, m0);
  const T* k = k_row_ptr<T>(p, b, kvh, seq, 0);
  const T* v = v_row_ptr<T>(p, b, kvh, seq, 0);
  const uint8_t* mask = kHasMask && p.mask != nullptr ? p.mask + mask_offset(p, b, h, seq)
                                                      : nullptr;
  const int64_t bias_base = kHasBias ? bias_offset(p, b, h, seq) : 0;
  load_tile_async<kHeadDim, kStride, kThreads>(sQ, q, p.q_row_stride, kBlockM, m_end - m0,
                                               p.head_dim);
  load_tile_async<kHeadDim, kStride, kThreads>(sdO, dout, bp.do_row_stride, kBlockM, m_end - m0,
                                               p.head_dim);
  cp_async_commit();

  const int r0 = 16 * warp + lane / 4;
  float lse[2], dsum[2];
  const int64_t lse_base = lse_index(p, b, h, seq, 0);  // + i: row i
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = m0 + r0 + 8 * r;
    lse[r] = 0.f;  // natural log (bwd_pointwise converts); rows past the end: keep-bits 0
    dsum[r] = 0.f;
    if (i < seq.len_q) {
      lse[r] = p.lse[lse_base + i];
      dsum[r] = bp.dsum[lse_base + i];
    }
  }

  TileCoords tc;
  tc.row[0] = m0 + r0;
  tc.row[1] = tc.row[0] + 8;
  float dq[kDF][4];
  zero_frags(dq);
  const KeyRange kr = key_range(p, m0, m_end, seq.len_q, seq.len_k);
  for (int n0 = kr.k_begin / kBlockN * kBlockN; n0 < kr.k_end; n0 += kBlockN) {
    tc.col0 = n0 + 2 * (lane % 4);
    int state = kSpFull;
    if (kHasMask && bp.sp_grid != nullptr) {
      state = sparse_state(bp, b, h, m0, n0);
      if (state == kSpNone) continue;  // uniform: no sync needed
    }
    uint32_t bits = window_bits<kNF>(p, tc, seq.len_q, seq.len_k);
    if (kHasMask && mask != nullptr) bits = mask_bits<kNF>(p, mask, tc, bits);
    if (kHasMask) bits = sparse_bits<kNF>(p, state, tc, m0, n0, bits);
    if (!cta_any(bits != 0)) continue;  // also frees the previous K/V tile
    load_tile_async<kHeadDim, kStride, kThreads>(sK, k + int64_t(n0) * p.k_row_stride,
                                                 p.k_row_stride, kBlockN, seq.len_k - n0,
                                                 p.head_dim);
    load_tile_async<kHeadDim, kStride, kThreads>(sV, v + int64_t(n0) * p.v_row_stride,
                                                 p.v_row_stride, kBlockN, seq.len_k - n0,
                                                 p.head_dim);
    cp_async_commit();
    // (batches of 8: this kernel holds dQ for the whole head dim in registers)
    if (kHasBias) load_bias_tile<T, kBlockM, kBlockN, kBStride, kThreads, 8>(
        p, bias_base, m0, n0, seq.len_q, seq.len_k, sB);
    cp_async_wait<0>();
    __syncthreads();

    float s[kNF][4], dp[kNF][4];
    zero_frags(s);
    zero_frags(dp);
    gemm_abt<T, kHeadDim, kStride, kStride, kNF>(s, sQ + 16 * warp * kStride, sK);
    gemm_abt<T, kHeadDim, kStride, kStride, kNF>(dp, sdO + 16 * warp * kStride, sV);
    bwd_pointwise<T, kNF, kBStride, kBStride, kHasBias>(p, bp.scale, s, dp, bits, lse, dsum, sB,
                                                        nullptr, false, r0, 0, lane);
    // dQ += dS K with dS from registers as the A operand.
#pragma unroll
    for (int ps = 0; ps < kNF / 2; ++ps) {
      uint32_t a[4];
      pack_a_from_c<T>(a, dp, ps);
#pragma unroll
      for (int dd = 0; dd < kDF / 2; ++dd) {
        uint32_t bf[4];
        load_b_kn<kStride>(bf, sK, ps, dd, lane);
        mma_16816<T>(dq[2 * dd], a, bf[0], bf[1]);
        mma_16816<T>(dq[2 * dd + 1], a, bf[2], bf[3]);
      }
    }
  }
  cp_async_wait<0>();
  T* dqp = dq_row_ptr<T>(bp, b, h, seq, m0);
  store_frags<T, kDF>(dqp, bp.dq_row_stride, dq, 16 * warp, 0, m_end - m0, p.head_dim, lane);
}

}  // namespace dm
