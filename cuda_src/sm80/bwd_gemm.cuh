// bwd_gemm.cuh: warp-level tile products the backward kernels share, on tiles staged in shared
// memory (16-bit elements, row strides in elements, rows 16-byte aligned). Each warp computes a
// 16-row slab of C (m16n8k16 accumulator fragments, fp32). Three operand arrangements:
//   gemm_abt: C (16 x 8*kNF) += A B^T, A stored [m][k], B stored [n][k]   (S = Q K^T, dP = dO V^T)
//   gemm_atb: C (16 x 8*kNF) += A^T B, A stored [k][m], B stored [k][n]
//             (dV += P^T dO, dK += dS^T Q)
//   gemm_ab:  C (16 x 8*kNF) += A B,   A stored [m][k], B stored [k][n]   (dQ += dS K)
// `a` points at the warp's first row (abt, ab) or first column (atb) of A; `b` at the first
// column of B the warp produces (atb, ab) or at row 0 of B (abt). kK is the reduction length.
// Addresses are this lane's ldmatrix offset (mma.cuh's ldsm_*) plus the tile offsets; how the
// sum is grouped changes the register allocation by a few registers either way (the grouping
// here is the measured best).
#pragma once
#include "common.cuh"
#include "mma.cuh"

namespace dm {

// A fragment (16 x 16, row-major source) for k slice ks.
template <int kStrideA>
DM_DEVICE void load_a_rowmajor(uint32_t (&a)[4], const uint16_t* s, int ks, int lane) {
  ldmatrix_x4(a, s + ldsm_a_row(lane) * kStrideA + ldsm_a_col(lane) + ks * 16);
}

// A fragment of A^T where A^T's source is stored [k][m]: matrices (m 0-7, k 0-7), (m 8-15,
// k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15), each transposed by ldmatrix (the nk offsets).
template <int kStrideA>
DM_DEVICE void load_a_trans(uint32_t (&a)[4], const uint16_t* s, int ks, int lane) {
  ldmatrix_x4_trans(a, s + ldsm_nk_row(lane) * kStrideA + ldsm_nk_col(lane) +
                           ks * 16 * kStrideA);
}

template <typename T, int kK, int kStrideA, int kStrideB, int kNF>
DM_DEVICE void gemm_abt(float (&c)[kNF][4], const uint16_t* a, const uint16_t* b) {
  static_assert(kNF % 2 == 0 && kK % 16 == 0, "x4 loads cover two n8 fragments");
  const int lane = threadIdx.x % 32;
#pragma unroll 2
  for (int ks = 0; ks < kK / 16; ++ks) {
    uint32_t af[4];
    load_a_rowmajor<kStrideA>(af, a, ks, lane);
#pragma unroll
    for (int jj = 0; jj < kNF / 2; ++jj) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b + ldsm_nk_row(lane) * kStrideB + ldsm_nk_col(lane) + jj * 16 * kStrideB +
                          ks * 16);
      mma_16816<T>(c[2 * jj], af, bf[0], bf[1]);
      mma_16816<T>(c[2 * jj + 1], af, bf[2], bf[3]);
    }
  }
}

// B fragments (k 16 x n 16 -> two n8 fragments) from a source stored [k][n].
template <int kStrideB>
DM_DEVICE void load_b_kn(uint32_t (&bf)[4], const uint16_t* b, int ks, int jj, int lane) {
  ldmatrix_x4_trans(bf, b + (ks * 16 + ldsm_kn_row(lane)) * kStrideB + jj * 16 + ldsm_kn_col(lane));
}

// C += op(A) B with B stored [k][n]; op(A) = A^T when kATrans (A stored [k][m]), else A
// (stored [m][k]). gemm_atb and gemm_ab below name the two uses.
template <typename T, int kK, int kStrideA, int kStrideB, int kNF, bool kATrans>
DM_DEVICE void gemm_b_kn(float (&c)[kNF][4], const uint16_t* a, const uint16_t* b) {
  static_assert(kNF % 2 == 0 && kK % 16 == 0, "x4 loads cover two n8 fragments");
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks) {
    uint32_t af[4];
    if (kATrans) load_a_trans<kStrideA>(af, a, ks, lane);
    else load_a_rowmajor<kStrideA>(af, a, ks, lane);
#pragma unroll
    for (int jj = 0; jj < kNF / 2; ++jj) {
      uint32_t bf[4];
      load_b_kn<kStrideB>(bf, b, ks, jj, lane);
      mma_16816<T>(c[2 * jj], af, bf[0], bf[1]);
      mma_16816<T>(c[2 * jj + 1], af, bf[2], bf[3]);
    }
  }
}

template <typename T, int kK, int kStrideA, int kStrideB, int kNF>
DM_DEVICE void gemm_atb(float (&c)[kNF][4], const uint16_t* a, const uint16_t* b) {
  gemm_b_kn<T, kK, kStrideA, kStrideB, kNF, true>(c, a, b);
}

template <typename T, int kK, int kStrideA, int kStrideB, int kNF>
DM_DEVICE void gemm_ab(float (&c)[kNF][4], const uint16_t* a, const uint16_t* b) {
  gemm_b_kn<T, kK, kStrideA, kStrideB, kNF, false>(c, a, b);
}

template <int kNF>
DM_DEVICE void zero_frags(float (&c)[kNF][4]) {
#pragma unroll
  for (int j = 0; j < kNF; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
}

}  // namespace dm
