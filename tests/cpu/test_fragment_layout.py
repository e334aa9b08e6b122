"""A NumPy emulation of ldmatrix and mma.sync m16n8k16 as the PTX ISA defines them, driven by
the per-lane ldmatrix offsets the kernels use, read from their one source (the ``ldsm_*``
functions of cuda_src/sm80/mma.cuh). It checks, without a GPU, that this addressing computes
S = Q K^T and O = P V as fwd_mma.cu / fwd_decode.cu / bwd_gemm.cuh arrange it. The P-fragment
repacking (mma.cuh's pack_a_from_c: a0..a3 = c[2ps][0:2], c[2ps][2:4], c[2ps+1][0:2],
c[2ps+1][2:4]) is re-typed here: a design proof of that layout, not a reading of the code."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dmattn_cupy.compile import cuda_src_dir

LANES = np.arange(32)


def _read_lane_offsets() -> dict:
    """``ldsm_<name>(lane)`` of sm80/mma.cuh as Python functions (C integer / and % on
    non-negative ints are Python's // and %)."""
    text = (cuda_src_dir() / "sm80" / "mma.cuh").read_text()
    found = re.findall(r"DM_DEVICE int (ldsm_\w+)\(int lane\) \{ return ([^;]+); \}", text)
    table = {}
    for name, expr in found:
        assert re.fullmatch(r"[\w\s()+*/%]+", expr), (name, expr)
        table[name] = eval(f"lambda lane: {expr.replace('/', '//')}")  # noqa: S307
    return table


LDSM = _read_lane_offsets()


def test_lane_offsets_are_read_from_the_header() -> None:
    assert set(LDSM) == {f"ldsm_{k}_{rc}" for k in ("a", "nk", "kn") for rc in ("row", "col")}
    # Each pair addresses 32 distinct 8-element rows covering the 16 x 16 block once.
    for k in ("a", "nk", "kn"):
        cells = {(LDSM[f"ldsm_{k}_row"](ln), LDSM[f"ldsm_{k}_col"](ln)) for ln in LANES}
        assert cells == {(r, c) for r in range(16) for c in (0, 8)}, k


def ldmatrix_x4(smem: np.ndarray, row_of_lane, col_of_lane, trans: bool = False) -> np.ndarray:
    """Registers (32 lanes, 4 regs, 2 halves). Lanes 8i..8i+7 give the 8 row addresses of
    matrix i (each row 8 consecutive elements). Non-trans: lane gets row lane//4, columns
    2(lane%4), +1 of each matrix; .trans: the same of the transposed matrix."""
    mats = []
    for i in range(4):
        rows = [smem[row_of_lane(lane), col_of_lane(lane):col_of_lane(lane) + 8]
                for lane in range(8 * i, 8 * i + 8)]
        m = np.stack(rows)
        mats.append(m.T if trans else m)
    regs = np.zeros((32, 4, 2))
    for lane in LANES:
        for i in range(4):
            regs[lane, i] = mats[i][lane // 4, 2 * (lane % 4):2 * (lane % 4) + 2]
    return regs


def mma_m16n8k16(acc: np.ndarray, a: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> None:
    """acc (32, 4) += A (16x16) B (16x8) with the PTX fragment layouts; a (32, 4, 2)."""
    amat = np.zeros((16, 16))
    bmat = np.zeros((16, 8))
    for lane in LANES:
        g, t = lane // 4, lane % 4
        amat[g, 2 * t:2 * t + 2] = a[lane, 0]
        amat[g + 8, 2 * t:2 * t + 2] = a[lane, 1]
        amat[g, 8 + 2 * t:8 + 2 * t + 2] = a[lane, 2]
        amat[g + 8, 8 + 2 * t:8 + 2 * t + 2] = a[lane, 3]
        bmat[2 * t:2 * t + 2, g] = b0[lane]
        bmat[8 + 2 * t:8 + 2 * t + 2, g] = b1[lane]
    c = amat @ bmat
    for lane in LANES:
        g, t = lane // 4, lane % 4
        acc[lane] += [c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1]]


def c_to_matrix(frags: np.ndarray) -> np.ndarray:
    """(nfrag, 32, 4) accumulators -> the 16 x 8*nfrag matrix they hold."""
    out = np.zeros((16, 8 * len(frags)))
    for j, acc in enumerate(frags):
        for lane in LANES:
            g, t = lane // 4, lane % 4
            out[g, 8 * j + 2 * t:8 * j + 2 * t + 2] = acc[lane, :2]
            out[g + 8, 8 * j + 2 * t:8 * j + 2 * t + 2] = acc[lane, 2:]
    return out


@pytest.mark.parametrize("head_dim,block_n", [(32, 64), (64, 64), (128, 64), (256, 32)],
                         ids=lambda x: str(x))
def test_kernel_fragments_compute_attention_products(head_dim: int, block_n: int) -> None:
    rng = np.random.default_rng(head_dim)
    warp = 1                                    # any warp: its 16 rows start at 16 * warp
    sq = rng.standard_normal((32, head_dim))    # shared Q rows of warps 0 and 1
    sk = rng.standard_normal((block_n, head_dim))
    sv = rng.standard_normal((block_n, head_dim))
    nf, df = block_n // 8, head_dim // 8

    a_row, a_col = LDSM["ldsm_a_row"], LDSM["ldsm_a_col"]
    nk_row, nk_col = LDSM["ldsm_nk_row"], LDSM["ldsm_nk_col"]
    kn_row, kn_col = LDSM["ldsm_kn_row"], LDSM["ldsm_kn_col"]

    # S = Q K^T: the addressing of fwd_mma.cu's tile_scores (q_frag, k_frag).
    s = np.zeros((nf, 32, 4))
    for ks in range(head_dim // 16):
        a = ldmatrix_x4(sq, lambda ln: 16 * warp + a_row(ln),
                        lambda ln, ks=ks: ks * 16 + a_col(ln))
        for jj in range(nf // 2):
            kb = ldmatrix_x4(sk, lambda ln, jj=jj: jj * 16 + nk_row(ln),
                             lambda ln, ks=ks: ks * 16 + nk_col(ln))
            mma_m16n8k16(s[2 * jj], a, kb[:, 0], kb[:, 1])
            mma_m16n8k16(s[2 * jj + 1], a, kb[:, 2], kb[:, 3])
    q_rows = sq[16 * warp:16 * warp + 16]
    np.testing.assert_allclose(c_to_matrix(s), q_rows @ sk.T, rtol=1e-12, atol=1e-12)

    # O = P V with P repacked from the S accumulators as the A operand, V via ldmatrix.trans.
    p = s  # any values: the check is that the repacking is the identity on the matrix
    o = np.zeros((df, 32, 4))
    for ps in range(block_n // 16):
        a = np.stack([p[2 * ps][:, 0:2], p[2 * ps][:, 2:4],
                      p[2 * ps + 1][:, 0:2], p[2 * ps + 1][:, 2:4]], axis=1)
        for dd in range(df // 2):
            vb = ldmatrix_x4(sv, lambda ln, ps=ps: ps * 16 + kn_row(ln),
                             lambda ln, dd=dd: dd * 16 + kn_col(ln), trans=True)
            mma_m16n8k16(o[2 * dd], a, vb[:, 0], vb[:, 1])
            mma_m16n8k16(o[2 * dd + 1], a, vb[:, 2], vb[:, 3])
    np.testing.assert_allclose(c_to_matrix(o), c_to_matrix(p) @ sv, rtol=1e-10, atol=1e-10)
