// mma.cuh: warp-level tensor-core primitives (sm_80+): mma.sync m16n8k16 with fp32
// accumulation, ldmatrix (plain and transposed), and cp.async 16-byte copies with zero-fill.
// Fragment layouts (PTX ISA, m16n8k16, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4):
//   A 16x16 (row-major): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 8+2t..), a3 (g+8, 8+2t..)
//   B 16x8 (k x n):      b0 (k 2t..2t+1, n g), b1 (k 8+2t.., n g)
//   C 16x8 fp32:         c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)
#pragma once
#include "common.cuh"

namespace dm {

// c += a * b for one m16n8k16 tile; T selects the f16 or bf16 instruction.
#define DM_MMA_16816(ELEM)                                                                  \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." ELEM "." ELEM ".f32 "                \
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"                     \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                             \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <typename T>
DM_DEVICE void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (IsSame<T, Half>::value) {
    DM_MMA_16816("f16");
  } else {
    DM_MMA_16816("bf16");
  }
}
#undef DM_MMA_16816

// Per-lane (row, column) offsets of the 8-element shared-memory row a lane addresses in an
// ldmatrix.x4 covering a 16 x 16 block, one pair per operand arrangement. Lanes 8i..8i+7
// address matrix i, which lands in register i. tests/cpu/test_fragment_layout.py reads these
// one-line bodies and checks them against an emulation of ldmatrix and mma.sync.
//   a:  A stored [m][k], plain:  (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15),
//       (m 8-15, k 8-15) -> a0..a3
//   nk: B stored [n][k], plain:  (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
//       (n 8-15, k 8-15) -> b0, b1 of n8 fragment 0, then of fragment 1. With .trans the
//       same offsets give A^T's fragment from A stored [k][m].
//   kn: B stored [k][n], .trans: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15),
//       (k 8-15, n 8-15) -> b0, b1 of n8 fragment 0, then of fragment 1
DM_DEVICE int ldsm_a_row(int lane) { return lane % 16; }
DM_DEVICE int ldsm_a_col(int lane) { return (lane / 16) * 8; }
DM_DEVICE int ldsm_nk_row(int lane) { return lane % 8 + (lane / 16) * 8; }
DM_DEVICE int ldsm_nk_col(int lane) { return ((lane / 8) % 2) * 8; }
DM_DEVICE int ldsm_kn_row(int lane) { return lane % 8 + ((lane / 8) % 2) * 8; }
DM_DEVICE int ldsm_kn_col(int lane) { return (lane / 16) * 8; }

// A operand (16 x 16) of the next product from the accumulators c[2ps], c[2ps + 1] kept in
// registers (P before O += P V, dS before dQ += dS K): two n8 C fragments hold exactly the A
// fragment of k columns 16ps .. 16ps + 15 (a0 = c0 c1, a1 = c2 c3 of the first; a2, a3 of the
// second).
template <typename T, int kNF>
DM_DEVICE void pack_a_from_c(uint32_t (&a)[4], const float (&c)[kNF][4], int ps) {
  a[0] = pack2<T>(c[2 * ps][0], c[2 * ps][1]);
  a[1] = pack2<T>(c[2 * ps][2], c[2 * ps][3]);
  a[2] = pack2<T>(c[2 * ps + 1][0], c[2 * ps + 1][1]);
  a[3] = pack2<T>(c[2 * ps + 1][2], c[2 * ps + 1][3]);
}

DM_DEVICE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

DM_DEVICE void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
DM_DEVICE void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Same, from a shared-memory address (bytes; 32-bit), so that unrolled loops address with
// immediate offsets instead of recomputing 64-bit generic pointers.
DM_DEVICE void ldmatrix_x4_at(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
DM_DEVICE void ldmatrix_x4_trans_at(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte global->shared copy; when !valid the destination is zero-filled and nothing is read.
DM_DEVICE void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
               :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
// 16-byte copy of which only the first `src_bytes` (0..16) are read; the rest is zero-filled.
DM_DEVICE void cp_async_16_partial(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
               :: "r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
// 4-byte copy (through L1); valid = false zero-fills without reading.
DM_DEVICE void cp_async_4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;"
               :: "r"(smem_addr(dst)), "l"(src), "r"(valid ? 4 : 0));
}
DM_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> DM_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" :: "n"(N));
}

}  // namespace dm
