// sm90/primitives.cuh: the Hopper building blocks the sm_90a kernels share, as thin PTX
// wrappers: mbarriers (transaction-counted), TMA tile loads (cp.async.bulk.tensor), wgmma
// fences/commit/wait, register reallocation (setmaxnreg), and the shared-memory matrix
// descriptor and 128-/64-byte swizzle arithmetic. The constexpr layout helpers are checked
// against a NumPy model on the CPU (tests/cpu/test_sm90_layout.py).
#pragma once
#include "../common.cuh"

namespace dm {
namespace sm90 {

// A CUDA tensor map (CUtensorMap), encoded on the host by cuTensorMapEncodeTiled and passed
// inside a `const __grid_constant__` kernel parameter (its address is then a param address).
struct alignas(64) TmaDesc {
  uint64_t opaque[16];
};

// ---- layout arithmetic (host and device) -------------------------------------------------

// Byte offset after the TMA/wgmma swizzle of `kSwizzleBytes` (128, 64 or 32; 0 = none): the
// 16-byte chunk index (bits 4..6) is XORed with the 128-byte line index (bits 7..9), masked
// to the pattern's width. Valid for tiles whose base is aligned to 8 * kSwizzleBytes.
template <int kSwizzleBytes>
__host__ __device__ constexpr uint32_t swizzle(uint32_t off) {
  return kSwizzleBytes == 0 ? off : off ^ ((off >> 3) & uint32_t((kSwizzleBytes / 16 - 1) << 4));
}

// Byte offset of element (row, col) of a tile stored as boxes of kBoxCols columns (each box a
// rows x kBoxCols block, rows of kBoxCols * kElemBytes bytes, swizzled by that row width).
template <int kElemBytes, int kBoxCols, int kRows>
__host__ __device__ constexpr uint32_t tile_offset(int row, int col) {
  constexpr int kRowBytes = kBoxCols * kElemBytes;
  return uint32_t(col / kBoxCols) * (kRows * kRowBytes) +
         swizzle<(kRowBytes >= 128 ? 128 : kRowBytes)>(
             uint32_t(row * kRowBytes + (col % kBoxCols) * kElemBytes));
}

// A row of `ncols` 16-bit elements whose first one sits `lead` (0..7) elements past a 16-byte
// boundary, stored by 16-byte chunks (bwd.cu: dbias rows that are no 8-element multiple):
// chunk q < row_chunks(lead, ncols) covers the row's elements e0 .. e0 + 7, e0 = 8q - lead
// (negative before the row's start), of which [lo, hi) lie in the row; a chunk with lo == 0 and
// hi == 8 is one aligned 16-byte store, the first and last may be partial.
struct RowChunk {
  int e0, lo, hi;
};
__host__ __device__ constexpr int row_chunks(int lead, int ncols) { return (lead + ncols + 7) / 8; }
__host__ __device__ constexpr RowChunk row_chunk(int q, int lead, int ncols) {
  const int e0 = 8 * q - lead;
  return RowChunk{e0, e0 < 0 ? -e0 : 0, ncols - e0 < 8 ? ncols - e0 : 8};
}

// Fragment order of a folded 128 x 64 bias tile (fwd.cu: DM_SM90_MB_FOLD). Consumer warp w
// (0..7: rows 16w .. 16w + 15) reads 2 KB block w by 4 conflict-free 16-byte loads per lane:
// lane (g, t) = (lane / 4, lane % 4) finds the word of fragment j, row half r (keys 8j + 2t,
// 8j + 2t + 1 of row 16w + g + 8r) at byte 512 (j / 2) + 16 lane + 4 (2 (j % 2) + r) of its
// block. The same words sit in the TMA tile (128B swizzle, 128-byte rows) inside the same 2 KB
// (rows 16w .. 16w + 15), so one warp can reorder a block in place.
__host__ __device__ constexpr uint32_t frag_order_offset(int w, int lane, int j, int r) {
  return uint32_t(w) * 2048 + uint32_t(j / 2) * 512 + uint32_t(lane) * 16 +
         uint32_t(2 * (j % 2) + r) * 4;
}

// tile_offset<2, 64, kRows>(r8 + g, 8 j + 2 t) and tile_offset<1, 64, kRows>(r8 + g, 8 j + 2 t)
// for r8 % 8 == 0, g < 8, j < 8, t < 4, as a row part and a chunk part so that the swizzle's
// XOR needs only g: the 128B swizzle of 128-byte rows XORs chunk j with (r8 + g) % 8 = g, the
// 64B swizzle of 64-byte rows chunk j / 2 with (r8 + g) / 2 % 4 = g / 2. Row r8 + 8 + g is
// 1024 (512) bytes past row r8 + g.
__host__ __device__ constexpr uint32_t frag_row_b16(int r8, int g, int t) {
  return uint32_t(r8 + g) * 128 + uint32_t(t) * 4;
}
__host__ __device__ constexpr uint32_t frag_chunk_b16(int g, int j) { return uint32_t(j ^ g) << 4; }
__host__ __device__ constexpr uint32_t frag_row_b8(int r8, int g, int t) {
  return uint32_t(r8 + g) * 64 + uint32_t(t) * 2;
}
__host__ __device__ constexpr uint32_t frag_chunk_b8(int g, int j) {
  return (uint32_t(((j >> 1) ^ (g >> 1)) & 3) << 4) + uint32_t(j & 1) * 8;
}

// A bias word (two 16-bit values, low one first) with each value whose mask byte in mask2
// (bits 0-7: the low value's, 8-15: the high one's; any nonzero byte keeps) is zero replaced
// by that half of neg_inf2 (the dtype's -inf twice), by kept_bits (common.cuh). The constexpr
// fold_word is the model the CPU tests check; the device folds two rows' words at once
// (fold_words_dev: one kept_bits over both rows' mask bytes, then prmt with sign replication
// widens byte b's bit 7 to a 16-bit mask: 0x9988 for bytes 0, 1, 0xbbaa for bytes 2, 3).
__host__ __device__ constexpr uint32_t fold_word(uint32_t bias, uint32_t mask2, uint32_t neg_inf2) {
  const uint32_t nz = kept_bits(mask2 & 0xffffu);
  const uint32_t keep = ((nz >> 7) & 1u) * 0xffffu | ((nz >> 15) & 1u) * 0xffff0000u;
  return (bias & keep) | (neg_inf2 & ~keep);
}
// b0, b1: two bias words; m0, m1: their mask bytes (low 16 bits each).
DM_DEVICE void fold_words_dev(uint32_t& b0, uint32_t& b1, uint32_t m0, uint32_t m1,
                              uint32_t neg_inf2) {
  uint32_t m, k0, k1;
  asm("prmt.b32 %0, %1, %2, 0x5410;" : "=r"(m) : "r"(m0), "r"(m1));
  const uint32_t nz = kept_bits(m);
  asm("prmt.b32 %0, %1, 0, 0x9988;" : "=r"(k0) : "r"(nz));
  asm("prmt.b32 %0, %1, 0, 0xbbaa;" : "=r"(k1) : "r"(nz));
  b0 = (b0 & k0) | (neg_inf2 & ~k0);
  b1 = (b1 & k1) | (neg_inf2 & ~k1);
}

// wgmma shared-memory matrix descriptor: start address, leading and stride byte offsets (all
// >> 4, 14 bits each) and the swizzle mode in bits 62-63 (1 = 128B, 2 = 64B, 3 = 32B).
__host__ __device__ constexpr uint64_t make_desc(uint32_t smem_addr, uint32_t lbo, uint32_t sbo,
                                                 int swizzle_bytes) {
  const uint64_t mode = swizzle_bytes == 128 ? 1 : swizzle_bytes == 64 ? 2 : swizzle_bytes == 32 ? 3 : 0;
  return uint64_t((smem_addr & 0x3FFFF) >> 4) | (uint64_t((lbo >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo >> 4) & 0x3FFF) << 32) | (mode << 62);
}

// K-major operand (rows x K, 16-bit, stored as 64-column boxes with 128B swizzle): the
// descriptor of its k16 step `ks`. Inside a box a step advances 32 bytes; boxes are
// kRows * 128 bytes apart. 8-row groups are 1024 bytes apart (SBO); LBO is unused.
template <int kRows>
__host__ __device__ constexpr uint64_t desc_k_major(uint32_t base, int ks) {
  return make_desc(base + uint32_t(ks / 4) * (kRows * 128) + uint32_t(ks % 4) * 32, 16, 1024, 128);
}

// MN-major operand (K rows x N columns, 16-bit, N in 64-column boxes with 128B swizzle; the B
// operand V of O += P V): the descriptor of its k16 step `ks` (16 rows = 2048 bytes). LBO =
// bytes between 64-column boxes (kRows * 128), SBO = bytes between 8-row groups (1024).
template <int kRows>
__host__ __device__ constexpr uint64_t desc_mn_major(uint32_t base, int ks) {
  return make_desc(base + uint32_t(ks) * 2048, kRows * 128, 1024, 128);
}

// A k16 step's descriptor is its operand's step-0 descriptor plus this (the start-address
// field holds address >> 4 in bits 0-13; shared addresses stay below 256 KB, so the add never
// carries out of the field): one 64-bit add per wgmma instead of rebuilding the descriptor.
template <int kRows>
__host__ __device__ constexpr uint64_t k_major_step(int ks) {
  return uint64_t(uint32_t(ks / 4) * (kRows * 128) + uint32_t(ks % 4) * 32) >> 4;
}
__host__ __device__ constexpr uint64_t mn_major_step(int ks) { return uint64_t(ks) * (2048 >> 4); }
static_assert(desc_k_major<128>(0x12400, 5) == desc_k_major<128>(0x12400, 0) + k_major_step<128>(5) &&
                  desc_k_major<64>(0x38000, 15) == desc_k_major<64>(0x38000, 0) + k_major_step<64>(15) &&
                  desc_mn_major<128>(0x20000, 7) == desc_mn_major<128>(0x20000, 0) + mn_major_step(7),
              "step descriptors: one add from the step-0 descriptor");

// A value the compiler must recompute where it is used: descriptors derived from it are then
// formed next to their wgmma (one add) instead of being hoisted out of the loop, where a
// d256 tile's 32 descriptors would hold 64 registers.
DM_DEVICE uint32_t opaque(uint32_t x) {
  uint32_t y;
  asm volatile("mov.b32 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

// A load with acquire semantics at gpu scope: the reads after it see what the writer of the
// value wrote before its release (another kernel running beside this one).
DM_DEVICE int32_t ld_acquire_gpu(const int32_t* p) {
  int32_t v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// A relaxed load at gpu scope (a flag polled without invalidating L1 each time: a
// fence_acquire_gpu after the poll that saw it set makes it an acquire).
DM_DEVICE int32_t ld_relaxed_gpu(const int32_t* p) {
  int32_t v;
  asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
DM_DEVICE void fence_acquire_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// ---- mbarriers ---------------------------------------------------------------------------

DM_DEVICE uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

DM_DEVICE void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
// Makes the initializations visible to the async proxy (TMA) before any use.
DM_DEVICE void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }

DM_DEVICE void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
// `count` arrivals at once (count >= 1).
DM_DEVICE void mbar_arrive_count(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
// DM_SM90_EACH_THREAD_ARRIVES=1 (compute-sanitizer racecheck builds only): every thread of a
// warp that read or wrote a ring's stage arrives on its barrier, instead of lane 0 after
// __syncwarp. Both are ordered under PTX (bar.warp.sync orders the warp's accesses before
// lane 0's release); racecheck orders only the arriving thread's own accesses, so the default
// build shows WAR/RAW hazards on what warps hand over by plain shared-memory stores and reads
// that this build does not. 256 arrivals per phase cost the forward 1.7-4% (fourteenth
// session): never the default. (Its bwd_sm90 mask + key-row bias specs spill 76 bytes.)
#ifndef DM_SM90_EACH_THREAD_ARRIVES
#define DM_SM90_EACH_THREAD_ARRIVES 0
#endif
constexpr int kWarpArrivals = DM_SM90_EACH_THREAD_ARRIVES ? 32 : 1;  // arrivals per warp
// A warp's arrival on `bar` (and `bar2`, if not 0) after its lanes' accesses (the warp
// converged).
DM_DEVICE void warp_arrive(uint32_t bar, int lane, uint32_t bar2 = 0) {
  if constexpr (kWarpArrivals == 1) {
    __syncwarp();
    if (lane != 0) return;
  }
  mbar_arrive(bar);
  if (bar2 != 0) mbar_arrive(bar2);
}
// Bytes the barrier's current phase also waits for, without an arrival (one follows later).
DM_DEVICE void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}
// One arrival that also expects `bytes` of TMA transactions in the current phase.
DM_DEVICE void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}
// Blocks until the phase with parity `parity` has completed. A fresh barrier is in phase 0,
// so waiting on parity 1 returns at once ("the previous phase is complete").
DM_DEVICE void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// ---- TMA ---------------------------------------------------------------------------------

DM_DEVICE void tma_prefetch(const TmaDesc* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// One box of a rank-4 tensor map into shared memory at `dst`, completing on `bar`.
DM_DEVICE void tma_load_4d(uint32_t dst, const TmaDesc* map, uint32_t bar, int c0, int c1, int c2,
                           int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// The box of a rank-4 tensor map at these coordinates into L2 (no shared memory, no barrier).
DM_DEVICE void tma_prefetch_l2_4d(const TmaDesc* map, int c0, int c1, int c2, int c3) {
  asm volatile("cp.async.bulk.prefetch.tensor.4d.L2.global.tile [%0, {%1, %2, %3, %4}];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}

// Orders this thread's generic-proxy shared-memory stores before later async-proxy reads
// (wgmma descriptors, TMA stores) of the same bytes; a barrier must still follow for other
// threads' stores.
DM_DEVICE void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Named barrier `id` over `threads` threads (multiples of 32; id 0 is __syncthreads).
DM_DEVICE void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// The same barrier, returning whether `pred` held in every one of the threads.
DM_DEVICE bool named_bar_and(int id, int threads, bool pred) {
  uint32_t all;
  asm volatile(
      "{\n.reg .pred p, q;\n"
      "setp.ne.u32 p, %1, 0;\n"
      "bar.red.and.pred q, %2, %3, p;\n"
      "selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(all)
      : "r"(uint32_t(pred)), "r"(id), "r"(threads)
      : "memory");
  return all != 0;
}
// The global-memory line holding `p` into L2 (no registers, no completion to wait for).
DM_DEVICE void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Plain shared-memory and 16-byte global accesses (epilogues staging a tile through shared
// memory; st_global_u128: a uint4 assignment through a T* came out as 4 STG.E).
DM_DEVICE void st_shared_u32(uint32_t addr, uint32_t x) {
  asm volatile("st.shared.u32 [%0], %1;" ::"r"(addr), "r"(x) : "memory");
}
DM_DEVICE void st_shared_u16(uint32_t addr, uint16_t x) {
  asm volatile("st.shared.u16 [%0], %1;" ::"r"(addr), "h"(x) : "memory");
}
DM_DEVICE void st_shared_u128(uint32_t addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};"
               ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
DM_DEVICE uint32_t ld_shared_u32(uint32_t addr) {
  uint32_t x;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(x) : "r"(addr) : "memory");
  return x;
}
DM_DEVICE uint4 ld_shared_u128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}
DM_DEVICE void st_global_u128(void* ptr, uint4 v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}
// ldmatrix / stmatrix of four 8 x 8 matrices of 16-bit values (lanes 8m .. 8m + 7 name the
// 16-byte rows of matrix m; register m of lane (g, t) = (lane / 4, lane % 4) holds row g's
// pair 2t, 2t + 1, or with .trans column g's pair of rows 2t, 2t + 1).
DM_DEVICE void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
DM_DEVICE void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
DM_DEVICE void stsm_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1,%2,%3,%4};"
               ::"r"(addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}

// ---- wgmma and registers ------------------------------------------------------------------

DM_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
DM_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
DM_DEVICE void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}
// Pins accumulator registers around a batch of wgmma so that ptxas neither moves other
// instructions onto them nor serializes the batch (advisory C7515).
template <int kRows>
DM_DEVICE void fence_operands(float (&d)[kRows][4]) {
#pragma unroll
  for (int j = 0; j < kRows; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}

// The same for a register A operand written just before the batch (its four packed pairs).
DM_DEVICE void fence_operands(uint32_t (&a)[4]) {
#pragma unroll
  for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[e])::"memory");
}

// Keeps register A operands (packed 16-bit pairs) allocated up to this point: call it after
// the wait of the wgmma that reads them, so nothing reuses their registers while it runs.
template <int kSteps>
DM_DEVICE void keep_live(uint32_t (&a)[kSteps][4]) {
#pragma unroll
  for (int j = 0; j < kSteps; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[j][e])::"memory");
}

template <int kRegs>
DM_DEVICE void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs)); }
template <int kRegs>
DM_DEVICE void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs)); }

}  // namespace sm90
}  // namespace dm
