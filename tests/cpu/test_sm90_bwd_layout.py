"""The sm_90a backward's layout arithmetic (cuda_src/sm90/bwd.cu), checked on the CPU:

- each of its five products, run through the NumPy model of TMA's 128B-swizzled boxes and of
  wgmma's K-/MN-major descriptor reads (test_sm90_layout.py), equals the plain matrix product:
  S^T = K Q^T and dP^T = V dO^T (both operands K-major), dV += P^T dO and dK += dS^T Q (dO/Q as
  MN-major B), dQ += dS K with dS^T written by both consumers' threads' fragments as
  [key][query] (two adjacent 64-key halves) and read back as an M-major A over all 128 keys
  (tnspA; the model reads an MN-major A as it reads an MN-major B, as the PTX ISA's canonical
  layouts define both) and head-dim box c of K as an MN-major B (the A/B variant
  DM_SM90_BWD_DQ_ATOMIC: one consumer's 64 keys and K rows 64c..);
- the fp32 dQ staging of the bulk reduce-add: each warp's float2 fragment stores are
  bank-conflict-free and lay out whole rows contiguously, so one bulk add per row adds the
  warp's 16 x 64 block to the right global elements; likewise the dQ writer's ring slots
  (DM_SM90_BWD_DQ_WRITER: whole 64-row tiles of both consumers' boxes, one add per row);
- the constexpr helpers and Sm90BwdSmem / Sm90BwdArgs equal the model and the host mirror
  (NVRTC static_asserts), and every spec compiles for sm_90a without spills or slow-kernel
  advisories, with HGMMA in its SASS when nvdisasm is present.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from nvrtc_check import compile_static_asserts
from test_sm90_layout import (
    desc_k_major,
    desc_mn_major,
    swizzle128,
    tma_box_address,
    wgmma_k_major,
    wgmma_mn_major,
)

from dmattn_cupy import backward_sm90 as b90

BASE = 4 * 16384  # any 1024-aligned shared-memory address


def _tma_store(smem: dict, base: int, rows: int, mat: np.ndarray) -> None:
    """What TMA writes for a (rows x cols) tile of 64-column boxes (element per byte address)."""
    r, c = np.meshgrid(np.arange(mat.shape[0]), np.arange(mat.shape[1]), indexing="ij")
    for a, v in zip(tma_box_address(base, rows, r, c).ravel(), mat.ravel(), strict=True):
        smem[int(a)] = v


def _read(smem: dict, addr: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda a: smem[int(a)])(addr)


def _ss_k_major(smem, desc_a, desc_b, n: int) -> np.ndarray:
    """One k16 step D[m, n] = sum_k A[m, k] B[n, k], both K-major."""
    m, k = np.meshgrid(np.arange(64), np.arange(16), indexing="ij")
    nn, kn = np.meshgrid(np.arange(n), np.arange(16), indexing="ij")
    return _read(smem, wgmma_k_major(desc_a, m, k)) @ _read(smem, wgmma_k_major(desc_b, nn, kn)).T


def _b_mn_major(smem, desc_b, n: int) -> np.ndarray:
    """B[k, n] (16 x n) of an MN-major operand."""
    k, nn = np.meshgrid(np.arange(16), np.arange(n), indexing="ij")
    return _read(smem, wgmma_mn_major(desc_b, k, nn))


def _a_m_major(smem, desc_a) -> np.ndarray:
    """A[m, k] (64 x 16) of an M-major (tnspA) operand."""
    k, m = np.meshgrid(np.arange(16), np.arange(64), indexing="ij")
    return _read(smem, wgmma_mn_major(desc_a, k, m)).T


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("c", [0, 1])
def test_scores_transposed_k_q(head_dim, c):
    """S^T (64 keys of consumer c x 64 queries) = K Q^T; the same code reads V and dO."""
    rng = np.random.default_rng(head_dim + c)
    kt, q = rng.integers(-4, 5, (128, head_dim)), rng.integers(-4, 5, (64, head_dim))
    smem: dict = {}
    k_base, q_base = BASE, BASE + 2 * 16384
    _tma_store(smem, k_base, 128, kt)
    _tma_store(smem, q_base, 64, q)
    got = sum(_ss_k_major(smem, desc_k_major(k_base + c * 64 * 128, 128, ks),
                          desc_k_major(q_base, 64, ks), 64) for ks in range(head_dim // 16))
    np.testing.assert_array_equal(got, kt[64 * c:64 * c + 64] @ q.T)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_dv_dk_read_do_and_q_as_mn_major_b(head_dim):
    """dV (64 keys x head_dim) += P^T dO: K = the tile's 64 queries, dO rows as TMA wrote them."""
    rng = np.random.default_rng(head_dim)
    pt, do = rng.integers(-4, 5, (64, 64)), rng.integers(-4, 5, (64, head_dim))
    smem: dict = {}
    _tma_store(smem, BASE, 64, do)
    got = sum(pt[:, 16 * kk:16 * kk + 16] @ _b_mn_major(smem, desc_mn_major(BASE, 64, kk),
                                                           head_dim) for kk in range(4))
    np.testing.assert_array_equal(got, pt @ do)


def _store_ds_fragments(smem: dict, base: int, dst: np.ndarray) -> None:
    """The consumer's dS^T (64 keys x 64 queries) from its wgmma accumulator fragments (warp w,
    lane g, t: dpt[j][e] at key 16w + g + 8(e >> 1), query 8j + 2t + (e & 1)), packed as the
    register A words da[kk][w] and stored as in bwd.cu: word w of step kk is fragment
    j = 2kk + (w >> 1), row half r = w & 1, at tile_offset<2, 64, 64>(16 warp + g + 8r, 8j + 2t)."""
    for warp in range(4):
        for g in range(8):
            for t in range(4):
                dpt = {(j, e): dst[16 * warp + g + 8 * (e >> 1), 8 * j + 2 * t + (e & 1)]
                       for j in range(8) for e in range(4)}
                for kk in range(4):
                    da = [(dpt[2 * kk, 0], dpt[2 * kk, 1]), (dpt[2 * kk, 2], dpt[2 * kk, 3]),
                          (dpt[2 * kk + 1, 0], dpt[2 * kk + 1, 1]),
                          (dpt[2 * kk + 1, 2], dpt[2 * kk + 1, 3])]
                    for w in range(4):
                        j, r = 2 * kk + (w >> 1), w & 1
                        addr = int(tma_box_address(base, 64, np.int64(16 * warp + g + 8 * r),
                                                   np.int64(8 * j + 2 * t)))
                        smem[addr], smem[addr + 2] = da[w]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("c", [0, 1])
def test_dq_over_both_consumers_ds_and_k_box_of_its_consumer(head_dim, c):
    """dQ (64 queries x the 64 columns of box c) += dS (M-major A: 8 k16 steps over the two
    consumers' adjacent dS^T halves) K (all 128 rows of box c, MN-major B); at d64 only
    consumer 0 has a box."""
    if c >= head_dim // 64:
        pytest.skip("d64: consumer 1 has no dQ columns")
    rng = np.random.default_rng(11 * head_dim + c)
    dst, kt = rng.integers(-4, 5, (128, 64)), rng.integers(-4, 5, (128, head_dim))
    smem: dict = {}
    ds_base, k_base = BASE + 8 * 16384, BASE
    _tma_store(smem, k_base, 128, kt)
    for half in range(2):  # consumer `half` stores its 64 keys at ds_base + half * kDS
        _store_ds_fragments(smem, ds_base + half * 64 * 64 * 2, dst[64 * half:64 * half + 64])
    kb = k_base + c * 128 * 128
    got = sum(_a_m_major(smem, desc_mn_major(ds_base, 64, kk)) @
              _b_mn_major(smem, desc_mn_major(kb, 128, kk), 64) for kk in range(8))
    np.testing.assert_array_equal(got, dst.T @ kt[:, 64 * c:64 * c + 64])


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("c", [0, 1])
def test_dq_reads_ds_transposed_and_k_rows_of_its_consumer(head_dim, c):
    """The A/B variant (DM_SM90_BWD_DQ_ATOMIC): dQ (64 queries x 64 columns, pass nh) += dS
    (M-major A) K (rows 64c.., MN-major B)."""
    rng = np.random.default_rng(7 * head_dim + c)
    dst, kt = rng.integers(-4, 5, (64, 64)), rng.integers(-4, 5, (128, head_dim))
    smem: dict = {}
    ds_base, k_base = BASE + 8 * 16384, BASE
    _tma_store(smem, k_base, 128, kt)
    _store_ds_fragments(smem, ds_base, dst)
    for nh in range(head_dim // 64):
        kb = k_base + nh * 128 * 128 + c * 64 * 128
        got = sum(_a_m_major(smem, desc_mn_major(ds_base, 64, kk)) @
                  _b_mn_major(smem, desc_mn_major(kb, 128, kk), 64) for kk in range(4))
        np.testing.assert_array_equal(got, dst.T @ kt[64 * c:64 * c + 64, 64 * nh:64 * nh + 64])


DQ_ROW, DQ_WARP = b90.DQ_ROW_BYTES, b90.DQ_WARP_BYTES


def _dq_stage_address(stage: int, g, t, j, r, x):
    """Byte address of acc[j][2r + x] of lane (g, t) in its warp's staging region (bwd.cu:
    stage + (g + 8r) * kDQRow + (8j + 2t) * 4, element x of the float2)."""
    return stage + (g + 8 * r) * DQ_ROW + (8 * j + 2 * t) * 4 + 4 * x


def test_dq_staging_stores_are_bank_conflict_free():
    """A float2 store (st.shared.v2.f32) of a warp is served per half-warp (16 lanes x 8 bytes
    = 128 bytes): the 32 words of each half-warp must fall in 32 distinct banks."""
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    for j in range(8):
        for r in range(2):
            for half in range(2):
                sel = slice(16 * half, 16 * half + 16)
                words = np.concatenate([
                    _dq_stage_address(0, g[sel], t[sel], j, r, x) // 4 for x in range(2)])
                assert len(set((words % 32).tolist())) == 32, (j, r, half)


@pytest.mark.parametrize("head_dim,c", [(128, 0), (128, 1), (64, 0), (96, 1), (40, 0)])
def test_dq_staging_rows_and_bulk_adds_give_the_tile(head_dim, c):
    """Each warp stores its accumulator fragments (rows 16w + g + 8r, columns 8j + 2t + x of box
    c), then lane 0 adds, for each row l < min(16, seqlen - m0 - 16w), the
    cols = min(64, head_dim - 64c) floats at stage + l * kDQRow into dq_accum row m0 + 16w + l
    from column 64c (one bulk add per row): modelled on a flat fp32 accumulator with
    the (B, S, H, d) strides, every element of the 64 x head_dim tile gets exactly its value
    and nothing past head_dim or the sequence end is touched."""
    rng = np.random.default_rng(head_dim + c)
    heads, seqlen, m0, h = 3, 100, 64, 1
    row_stride = heads * head_dim
    tile = rng.standard_normal((64, 64))  # this consumer's (queries x box-c columns) result
    accum = np.zeros(seqlen * row_stride)
    base_stage = 1 << 14
    cols = min(64, head_dim - 64 * c)
    for w in range(4):
        smem = {}
        stage = base_stage + (c * 4 + w) * DQ_WARP
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for j in range(8):
                for r in range(2):
                    for x in range(2):
                        smem[int(_dq_stage_address(stage, g, t, j, r, x))] = \
                            tile[16 * w + g + 8 * r, 8 * j + 2 * t + x]
        for rr in range(min(16, seqlen - (m0 + 16 * w))):
            q = m0 + 16 * w + rr
            if cols <= 0:
                continue
            assert (stage + rr * DQ_ROW) % 16 == 0 and (cols * 4) % 16 == 0
            src = [smem[stage + rr * DQ_ROW + 4 * e] for e in range(cols)]
            dst = q * row_stride + h * head_dim + 64 * c
            assert (dst * 4) % 16 == 0
            accum[dst:dst + cols] += src
    want = np.zeros((seqlen, heads, head_dim))
    n = min(64, seqlen - m0)
    want[m0:m0 + n, h, 64 * c:64 * c + cols] = tile[:n, :cols]
    np.testing.assert_array_equal(accum.reshape(seqlen, heads, head_dim), want)


def _dq_slot_address(slot: int, head_dim: int, c: int, w: int, g, t, j, r, x):
    """Byte address of acc[j][2r + x] of consumer c's warp w, lane (g, t) in a dQ writer slot
    (bwd.cu: slot + 256c + (16w + g + 8r) * kDQTileRow + (8j + 2t) * 4, element x)."""
    pitch = b90.dq_tile_row_bytes(head_dim)
    return slot + 256 * c + (16 * w + g + 8 * r) * pitch + (8 * j + 2 * t) * 4 + 4 * x


@pytest.mark.parametrize("head_dim", [64, 128])
def test_dq_writer_slot_stores_are_bank_conflict_free(head_dim):
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    for c in range(head_dim // 64):
        for w in range(4):
            for j in range(8):
                for r in range(2):
                    for half in range(2):
                        sel = slice(16 * half, 16 * half + 16)
                        words = np.concatenate([_dq_slot_address(
                            0, head_dim, c, w, g[sel], t[sel], j, r, x) // 4 for x in range(2)])
                        assert len(set((words % 32).tolist())) == 32, (c, w, j, r, half)


def _stage_tile(slot: int, spec_dim: int, tile: np.ndarray) -> dict:
    """Shared memory (byte address -> value) after every dQ warp stored its fragments of the
    (64 queries x spec_dim) tile into the slot at ``slot`` (consumer c: columns 64c..), each at
    _dq_slot_address; no address is used twice."""
    smem = {}
    for c in range(spec_dim // 64):
        for w in range(4):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for j in range(8):
                    for r in range(2):
                        for x in range(2):
                            a = int(_dq_slot_address(slot, spec_dim, c, w, g, t, j, r, x))
                            assert a not in smem
                            smem[a] = tile[16 * w + g + 8 * r, 64 * c + 8 * j + 2 * t + x]
    return smem


@pytest.mark.parametrize("head_dim,spec_dim", [(128, 128), (72, 128), (64, 64), (40, 64)])
@pytest.mark.parametrize("seqlen", [100, 128, 70])
def test_dq_writer_slot_rows_and_bulk_adds_give_the_tile(head_dim, spec_dim, seqlen):
    """Every dQ warp stores its fragments into the slot (consumer c: columns 64c..), then the
    writer adds, for each row l < min(64, seqlen - m0), head_dim floats at slot + l *
    kDQTileRow into dq_accum row m0 + l (one bulk add per row): modelled on a flat fp32
    accumulator with the (B, S, H, d) strides, the 64 x head_dim tile lands exactly, nothing
    past head_dim or the sequence end is touched."""
    rng = np.random.default_rng(head_dim + seqlen)
    heads, m0, h = 3, 64, 2
    row_stride = heads * head_dim
    tile = rng.standard_normal((64, spec_dim))  # the CTA's (queries x padded head dim) dQ
    slot = 1 << 14
    smem = _stage_tile(slot, spec_dim, tile)
    accum = np.zeros(seqlen * row_stride)
    pitch = b90.dq_tile_row_bytes(spec_dim)
    assert pitch % 16 == 0 and (4 * head_dim) % 16 == 0
    for rr in range(min(64, seqlen - m0)):
        src = [smem[slot + rr * pitch + 4 * e] for e in range(head_dim)]
        dst = (m0 + rr) * row_stride + h * head_dim
        assert (dst * 4) % 16 == 0
        accum[dst:dst + head_dim] += src
    want = np.zeros((seqlen, heads, head_dim))
    n = min(64, seqlen - m0)
    want[m0:m0 + n, h] = tile[:n, :head_dim]
    np.testing.assert_array_equal(accum.reshape(seqlen, heads, head_dim), want)


@pytest.mark.parametrize("head_dim,spec_dim", [(128, 128), (72, 128), (64, 64), (40, 64)])
@pytest.mark.parametrize("seqlen", [100, 128, 70])
def test_dq_writer_slot_is_the_tensor_reduce_box(head_dim, spec_dim, seqlen):
    """DM_SM90_BWD_DQ_WRITER=2: one bulk tensor reduce of the slot at coordinates (0, m0, h, b)
    through the dqa map adds box element (row l, column x), which a non-swizzled box holds at
    slot + (l * box[0] + x) * 4, into dq_accum (m0 + l, h, x) where l < seqlen - m0 and
    x < head_dim (out-of-bounds elements are not written): the slot as the dQ warps store it
    is that box, so the tile lands exactly."""
    from dmattn_cupy.arrays import describe

    rng = np.random.default_rng(head_dim + seqlen)
    heads, m0, h = 3, 64, 2
    q = describe(np.zeros((1, seqlen, heads, head_dim), np.float16))
    spec = b90.plan_maps(q, q, q, q, None, b90.BIAS_NONE, True)["dqa"]
    box_cols, box_rows = spec.box[0], spec.box[1]
    assert box_cols * 4 == b90.dq_tile_row_bytes(spec_dim) and box_rows == 64
    tile = rng.standard_normal((64, spec_dim))
    slot = 1 << 14
    smem = _stage_tile(slot, spec_dim, tile)
    accum = np.zeros((seqlen, heads, head_dim))
    for row in range(box_rows):
        for col in range(box_cols):
            if m0 + row < spec.dims[1] and col < spec.dims[0]:
                accum[m0 + row, h, col] += smem.get(slot + (row * box_cols + col) * 4, np.nan)
    want = np.zeros((seqlen, heads, head_dim))
    n = min(64, seqlen - m0)
    want[m0:m0 + n, h] = tile[:n, :head_dim]
    np.testing.assert_array_equal(accum, want)


def test_bias_tile_reads_what_tma_wrote():
    """The (64 query rows x 128 keys) bias stage: two boxes of 64 keys; a consumer reads
    element (query, key) at tile_offset<2, 64, 64>(query, key) (static_asserts below)."""
    bias = np.arange(64 * 128).reshape(64, 128)
    smem: dict = {}
    _tma_store(smem, BASE, 64, bias)
    q, k = np.meshgrid(np.arange(64), np.arange(128), indexing="ij")
    np.testing.assert_array_equal(_read(smem, tma_box_address(BASE, 64, q, k)), bias)


def bias_ldsm_offset(c: int, w: int, lane: int) -> int:
    """bwd.cu's sm90_bwd_bias_ldsm_offset<64> (DM_SM90_BWD_BIAS_LDSM): the 16-byte row lane
    ``lane`` of consumer c's warp w addresses in the .x4.trans of query block 0: matrix
    m = lane // 8 holds queries 8 (m // 2) .. + 7 of keys 64c + 16w + 8 (m % 2) .. + 7."""
    m = lane // 8
    return int(tma_box_address(0, 64, np.int64(8 * (m // 2) + lane % 8),
                               np.int64(64 * c + 16 * w + 8 * (m % 2))))


def _ldsm_x4_trans(smem: dict, rows: list[int]) -> list[list[tuple]]:
    """ldmatrix.x4.trans on 2-byte elements (one per even byte address): lanes 8m .. 8m + 7
    name the 8 rows of matrix m (8 consecutive elements each); lane L gets, in register m, the
    pair (row 2 (L % 4), + 1; column L // 4) of matrix m (low half first)."""
    regs = [[None] * 4 for _ in range(32)]
    for m in range(4):
        mat = [[smem[rows[8 * m + i] + 2 * k] for k in range(8)] for i in range(8)]
        for lane in range(32):
            regs[lane][m] = (mat[2 * (lane % 4)][lane // 4], mat[2 * (lane % 4) + 1][lane // 4])
    return regs


def _stsm_x4_trans(smem: dict, rows: list[int], regs: list[list[tuple]]) -> None:
    """stmatrix.x4.trans: the inverse of _ldsm_x4_trans (same rows, same register pairs)."""
    for m in range(4):
        for lane in range(32):
            lo, hi = regs[lane][m]
            smem[rows[8 * m + 2 * (lane % 4)] + 2 * (lane // 4)] = lo
            smem[rows[8 * m + 2 * (lane % 4) + 1] + 2 * (lane // 4)] = hi


@pytest.mark.parametrize("c", [0, 1])
def test_bias_ldsm_blocks_are_the_fragments_and_stsm_writes_them_back(c):
    """DM_SM90_BWD_BIAS_LDSM: block i's .x4.trans at sm90_bwd_bias_ldsm_offset + 2048 i hands
    lane (g, t) of warp w, in register 2 (j % 2) + r (j = 2i + j % 2), the bias of key
    64c + 16w + g + 8r at queries 8j + 2t and + 1: what the element-wise reads of
    tile_offset<2, 64, 64>(query, key) gave. The .trans store of dbias fragments packed the same
    way puts every element where the element-wise stores did (and touches nothing else)."""
    bias = np.arange(64 * 128).reshape(64, 128) + 1
    smem: dict = {}
    _tma_store(smem, BASE, 64, bias)
    dbias = -bias
    out = dict(smem)
    for w in range(4):
        for i in range(4):
            rows = [BASE + bias_ldsm_offset(c, w, lane) + 2048 * i for lane in range(32)]
            regs = _ldsm_x4_trans(smem, rows)
            back = [[None] * 4 for _ in range(32)]
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for jm in range(2):
                    for r in range(2):
                        j, key = 2 * i + jm, 64 * c + 16 * w + g + 8 * r
                        assert regs[lane][2 * jm + r] == (bias[8 * j + 2 * t, key],
                                                          bias[8 * j + 2 * t + 1, key])
                        back[lane][2 * jm + r] = (dbias[8 * j + 2 * t, key],
                                                  dbias[8 * j + 2 * t + 1, key])
            _stsm_x4_trans(out, rows, back)
    q, k = np.meshgrid(np.arange(64), np.arange(128), indexing="ij")
    got = _read(out, tma_box_address(BASE, 64, q, k))
    mine = (k >= 64 * c) & (k < 64 * c + 64)
    np.testing.assert_array_equal(got[mine], dbias[mine])
    np.testing.assert_array_equal(got[~mine], bias[~mine])
    assert set(out) == set(smem)


def dkv_stage_offset(head_dim: int, row, col):
    """bwd.cu's sm90_bwd_dkv_stage_offset<head_dim>: element (row, col) of the staged 128-row
    dK or dV tile, rows of head_dim 16-bit values, the 16-byte chunk index XORed with row % 8."""
    return row * 2 * head_dim + (((col // 8) ^ (row % 8)) << 4) + (col % 8) * 2


@pytest.mark.parametrize("head_dim", [64, 128])
def test_dkv_epilogue_staging_round_trips_without_bank_conflicts(head_dim):
    """The epilogue's staging (over the K or V tile, 128 x head_dim x 2 bytes): every element
    has its own 2 bytes; each warp's fragment stores (lane (g, t): rows 64c + 16w + g + 8r,
    columns 8j + 2t, 4 bytes) hit 32 distinct banks; its copy loop (chunk = lane + 32 i: row
    row0 + chunk // (head_dim / 8), 8 columns) reads back exactly the fragments' values, each
    8-lane phase of a 16-byte load touching 8 distinct 16-byte bank groups."""
    rows, cols = np.meshgrid(np.arange(128), np.arange(head_dim), indexing="ij")
    off = dkv_stage_offset(head_dim, rows, cols)
    assert sorted(off.ravel().tolist()) == list(range(0, 128 * head_dim * 2, 2))
    tile = np.random.default_rng(3).integers(0, 1 << 16, (128, head_dim))
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    chunks = head_dim // 8
    for c in range(2):
        for w in range(4):
            smem: dict = {}
            for r in range(2):
                for j in range(chunks):
                    row, col = 64 * c + 16 * w + g + 8 * r, 8 * j + 2 * t
                    words = dkv_stage_offset(head_dim, row, col)
                    assert len(set((words // 4 % 32).tolist())) == 32, (c, w, r, j)
                    for x in range(2):
                        for a_, v in zip(words + 2 * x, tile[row, col + x], strict=True):
                            smem[int(a_)] = v
            row0 = 64 * c + 16 * w
            for i in range(16 * chunks // 32):
                chunk = lane + 32 * i
                row, col = row0 + chunk // chunks, 8 * (chunk % chunks)
                at = dkv_stage_offset(head_dim, row, col)
                for phase in range(4):
                    sel = slice(8 * phase, 8 * phase + 8)
                    assert len(set((at[sel] // 16 % 8).tolist())) == 8, (c, w, i, phase)
                for ln in range(32):
                    got = [smem[int(at[ln]) + 2 * e] for e in range(8)]
                    np.testing.assert_array_equal(got, tile[row[ln], col[ln]:col[ln] + 8])


def _static_asserts(writer: bool = False) -> str:
    lines = ['#include "sm90/bwd.cu"', "using namespace dm::sm90;"]
    rng = np.random.default_rng(2)
    for c in range(2):
        for w in range(4):
            for lane in range(32):
                lines.append(f"static_assert(dm::sm90_bwd_bias_ldsm_offset<64>({c}, {w}, {lane})"
                             f" == {bias_ldsm_offset(c, w, lane)}u);")
    for hd in (64, 128):
        for r, c in zip(rng.integers(0, 128, 24), rng.integers(0, hd, 24), strict=True):
            lines.append(f"static_assert(dm::sm90_bwd_dkv_stage_offset<{hd}>({r}, {c}) == "
                         f"{dkv_stage_offset(hd, int(r), int(c))}u);")
    rng = np.random.default_rng(1)
    for r, c in zip(rng.integers(0, 64, 32), rng.integers(0, 128, 32), strict=True):
        want = int(tma_box_address(0, 64, np.int64(r), np.int64(c)))
        lines.append(f"static_assert(tile_offset<2, 64, 64>({r}, {c}) == {want}u);")
    for base in (0, 8192, 73728):
        for ks in range(8):
            lines.append(f"static_assert(desc_k_major<64>({base}u, {ks}) == "
                         f"{desc_k_major(base, 64, ks)}ull);")
            lines.append(f"static_assert(desc_mn_major<128>({base}u, {ks % 8}) == "
                         f"{desc_mn_major(base, 128, ks % 8)}ull);")
    for hd in b90.HEAD_DIMS:
        for mask in (False, True):
            for bias in (False, True):
                smem = f"dm::Sm90BwdSmem<{hd}, {str(mask).lower()}, {str(bias).lower()}>"
                lines.append(f"static_assert({smem}::kAlloc == "
                             f"{b90.smem_bytes(hd, bias, mask, writer)});")
                lines.append(f"static_assert({smem}::kDQSlot == "
                             f"{b90.dq_slot_bytes(hd)});")
                lines.append(f"static_assert({smem}::kDqSlots == "
                             f"{b90.dq_slots(hd, bias, writer)});")
                lines.append(f"static_assert({smem}::kDQTileRow == "
                             f"{b90.dq_tile_row_bytes(hd)});")
    lines.append(f"static_assert(dm::kSm90BwdDqWriter == {str(writer).lower()});")
    lines.append(f"static_assert(sizeof(dm::Sm90BwdArgs) == {b90.ARGS_DTYPE.itemsize});")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("mode", [None, 0, 2])
@pytest.mark.parametrize("extra", [(), ("DM_SM90_BWD_DQ_SLOTS=1",)])
def test_constexpr_helpers_and_smem_plan_equal_the_model(mode, extra, monkeypatch):
    defines = ((f"DM_SM90_BWD_DQ_WRITER={mode}",) if mode is not None else ()) + extra
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", " ".join(defines))  # the host's dq_slots
    mode = 2 if mode is None else mode  # the source's default
    compile_static_asserts(_static_asserts(mode > 0), "sm90_bwd_layout_check.cu", defines)


@pytest.mark.parametrize("writer", [False, True])
def test_every_spec_fits_shared_memory(writer):
    for hd in b90.HEAD_DIMS:
        for mask in (False, True):
            for bias in (False, True):
                assert b90.smem_bytes(hd, bias, mask, writer) <= b90.SMEM_LIMIT


@pytest.mark.parametrize("defines,mode", [("", 2), ("DM_SM90_BWD_DQ_WRITER=0", 0),
                                          ("DM_SM90_BWD_DQ_WRITER=2", 2),
                                          ("DM_SM90_BWD_DQ_WRITER=2 DM_SM90_BWD_DQ_ATOMIC=1",
                                           0)])
def test_host_reads_the_writer_define(monkeypatch, defines, mode):
    """The launcher's shared memory follows DMATTN_NVRTC_DEFINES as the kernel's kAlloc does
    (a launch with less would trap), and so does the dqa map."""
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", defines)
    assert b90.dq_writer_mode() == mode
    want = mode > 0
    assert b90.dq_writer() is want
    assert b90.smem_bytes(128, False) == b90.smem_bytes(128, False, False, want)
    assert b90.smem_bytes(128, False, False, True) > b90.smem_bytes(128, False, False, False)


@pytest.mark.parametrize("value", ["1", "3"])
def test_host_refuses_a_removed_writer_mode(monkeypatch, value):
    """DM_SM90_BWD_DQ_WRITER takes 0 or 2 (1, one bulk add per row, was removed): anything else
    is a ValueError naming the define, not a kernel that fails its static_assert."""
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", f"DM_SM90_BWD_DQ_WRITER={value}")
    with pytest.raises(ValueError, match=f"DM_SM90_BWD_DQ_WRITER={value}; accepted: 0 or 2"):
        b90.dq_writer_mode()


@pytest.mark.parametrize("defines,one_slot", [("", False), ("DM_SM90_BWD_DQ_SLOTS=1", True)])
def test_host_reads_the_slots_define(monkeypatch, defines, one_slot):
    """The launcher's shared memory follows DM_SM90_BWD_DQ_SLOTS as kAlloc does: the ring has
    one slot everywhere with DM_SM90_BWD_DQ_SLOTS=1, else one only at d128 beside a bias
    tile."""
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", defines)
    writer = b90.dq_writer()
    for hd in b90.HEAD_DIMS:
        for mask in (False, True):
            for bias in (False, True):
                slots = b90.dq_slots(hd, bias, writer)
                assert slots == (1 if one_slot or (hd == 128 and bias) else 2)
                smem = b90.smem_bytes(hd, bias, mask)
                assert smem <= b90.SMEM_LIMIT
                assert smem == b90.smem_bytes(hd, bias, mask, writer)
    q = describe_zeros((1, 100, 2, 128))
    dqa = b90.plan_maps(q, q, q, q, None, b90.BIAS_NONE)["dqa"]
    assert (dqa is not None) is (b90.dq_writer_mode() == 2)
    if dqa is not None:
        assert dqa.box == (136, 64, 1, 1)


def describe_zeros(shape: tuple[int, ...]):
    from dmattn_cupy.arrays import describe

    return describe(np.zeros(shape, np.float16))


def _nvdisasm() -> str | None:
    import sys

    cand = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" \
        / "site-packages" / "nvidia" / "cu13" / "bin" / "nvdisasm"
    return str(cand) if cand.is_file() else shutil.which("nvdisasm")


def _compile_sass(dtype: str, head_dim: int, mask: bool, bias: str, defines: str, tmp_path,
                  monkeypatch):
    """The bwd_sm90 spec compiled for sm_90a under ``defines`` (asserted free of spills and
    slow advisories) and its SASS (None without nvdisasm)."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="needs CuPy's NVRTC bindings")
    from dmattn_cupy.compile import compile_spec
    from dmattn_cupy.select import backward_sm90_spec

    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", defines)
    ck = compile_spec(backward_sm90_spec(dtype, head_dim, mask, bias != "none", bias == "key_row"),
                      use_disk_cache=False)
    assert ck.arch == "sm_90a"
    assert not ck.spills, ck.log
    assert not ck.slow, ck.advisories
    tool = _nvdisasm()
    if tool is None:
        return ck, None
    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(ck.cubin + b"\0")  # CuPy's getCUBIN is one byte short
    return ck, subprocess.run([tool, str(cubin)], capture_output=True, text=True).stdout


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("bias", ["none", "tile", "key_row"])
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("writer", [0, 2])
def test_spec_compiles_without_spills_or_slow_advisories(dtype, head_dim, bias, mask, writer,
                                                         tmp_path, monkeypatch):
    ck, sass = _compile_sass(dtype, head_dim, mask, bias, f"DM_SM90_BWD_DQ_WRITER={writer}",
                             tmp_path, monkeypatch)
    if sass is None:
        return
    # S^T, dP^T (head_dim / 16 k16 steps each), dV, dK (4 each, 64 x head_dim), dQ (8 k16
    # steps over all 128 keys, 64 columns)
    want = collections.Counter({"64x64x16": 2 * (head_dim // 16) + 8})
    want[f"64x{head_dim}x16"] += 8
    assert collections.Counter(re.findall(r"HGMMA\.(64x\d+x16)\.F32", sass)) == want
    assert "UTMALDG.4D" in sass and "USETMAXREG" in sass
    if writer == 2:  # dQ: one bulk tensor reduce per tile, from the writer
        assert len(re.findall(r"UTMAREDG\.4D\.ADD", sass)) == 1 and "UBLKRED" not in sass
    else:
        assert "UBLKRED.G.S.ADD.F32" in sass                  # dQ: bulk reduce-add by row
    # no per-element float atomics (the deterministic mode's counters are int32 words)
    assert not [ln for ln in re.findall(r"\bREDG?\.[^;]*", sass) if "F32" in ln or "F16" in ln]
    if mask:  # the producer's transpose of the mask into words
        assert "VOTE.ANY" in sass


def test_mask_bits_to_bytes_equals_the_model():
    """The mask words' byte-by-byte path: bits 0-3 of f become bytes 0-3 (0 or 1) whatever f's
    higher bits, so that its words read as the 16-byte path's."""
    checks = ['#include "sm90/bwd.cu"']
    for f in list(range(16)) + [0xfff0, 0x1235, 0xffffffff, 0x8000000a]:
        want = sum(((f >> i) & 1) << (8 * i) for i in range(4))
        checks.append(f"static_assert(dm::mask_bits_to_bytes({f}u) == {want}u, \"spread\");")
    compile_static_asserts("\n".join(checks) + "\n", "bwd_mask_bits.cu")


def _block_of(lin: int, grid: tuple[int, int, int], right_limited: bool) -> tuple[int, int, int]:
    """bwd.cu's (key tile, kv head, batch) of the CTA at linear position ``lin`` of the grid
    (x fastest): remapped key-tile-major under a right-limited window (causal)."""
    gx, gy, gz = grid
    if not right_limited:
        return lin % gx, lin // gx % gy, lin // (gx * gy)
    per_tile = gy * gz
    return lin // per_tile, lin % per_tile % gy, lin % per_tile // gy


@pytest.mark.parametrize("grid", [(16, 16, 2), (3, 2, 2), (1, 5, 3), (7, 1, 1)])
def test_causal_grid_order_is_a_longest_first_bijection(grid):
    """Every (key tile, kv head, batch) is served once; under causal masking the key tiles
    start in increasing order, i.e. by non-increasing count of query tiles that see them."""
    n = grid[0] * grid[1] * grid[2]
    for right_limited in (False, True):
        blocks = [_block_of(i, grid, right_limited) for i in range(n)]
        assert sorted(blocks) == sorted((x, y, z) for x in range(grid[0])
                                        for y in range(grid[1]) for z in range(grid[2]))
    tiles = [_block_of(i, grid, True)[0] for i in range(n)]
    assert tiles == sorted(tiles)


@pytest.mark.parametrize("c", [0, 1])
def test_dbias_stage_writes_and_chunk_copy_out_agree(c):
    """A full tile's dx is written in place of the bias element the thread read (at
    tile_offset<2, 64, 64>(query, key) of the stage, key = 64c + 16w + g + 8r); the copy-out
    reads box c (stage + c * 8192) as 16-byte chunks at swizzle<128>(row * 128 + 16 ch): chunk
    (row, ch) must hold keys 64c + 8ch .. + 7 of that query row, in order."""
    rng = np.random.default_rng(c)
    dx = rng.integers(0, 1 << 15, (64, 128))  # (queries, keys) of the stage
    smem: dict = {}
    for q in range(64):
        for w in range(4):
            for g in range(8):
                for r in range(2):
                    key = 64 * c + 16 * w + g + 8 * r
                    smem[int(tma_box_address(BASE, 64, np.int64(q), np.int64(key)))] = dx[q, key]
    box = BASE + c * 64 * 64 * 2
    for tid in range(128):
        for i in range(4):
            chunk = tid + 128 * i
            row, col = chunk // 8, 8 * (chunk % 8)
            addr = box + int(swizzle128(np.int64(row * 128 + 2 * col)))
            assert addr % 16 == 0
            got = [smem[addr + 2 * e] for e in range(8)]
            assert got == list(dx[row, 64 * c + col:64 * c + col + 8]), (row, col)


def row_chunk(q: int, lead: int, ncols: int) -> tuple[int, int, int]:
    """primitives.cuh row_chunk: (e0, lo, hi) of 16-byte chunk q of a row of ``ncols`` 16-bit
    elements starting ``lead`` elements past a 16-byte boundary."""
    e0 = 8 * q - lead
    return e0, max(0, -e0), min(8, ncols - e0)


def row_chunks(lead: int, ncols: int) -> int:
    return (lead + ncols + 7) // 8


def dbias_row_store(box_row: np.ndarray, lead: int, ncols: int) -> dict[int, int]:
    """What bwd.cu's dbias_out stores for one box row (64 uint16 values, as the 128-byte
    swizzled row holds them) into a destination row starting ``lead`` elements past a 16-byte
    boundary: {element index in the row: value}; full chunks must be aligned 16-byte stores."""
    words = box_row.astype(np.uint32)[0::2] | (box_row.astype(np.uint32)[1::2] << 16)
    out: dict[int, int] = {}
    for q in range(row_chunks(lead, ncols)):
        e0, lo, hi = row_chunk(q, lead, ncols)
        c0 = e0 - (e0 & 1)
        w = [int(words[(c0 + 2 * k) // 2]) if 0 <= c0 + 2 * k < 64 else 0 for k in range(5)]
        sh = 16 * (e0 & 1)
        o = [((w[m] >> sh) | (w[m + 1] << (32 - sh))) & 0xFFFFFFFF if sh else w[m]
             for m in range(4)]
        if lo == 0 and hi == 8:
            assert (lead + e0) % 8 == 0          # one aligned 16-byte store
        for j in range(lo, hi):
            assert e0 + j not in out             # every element stored once
            out[e0 + j] = (o[j // 2] >> (16 * (j % 2))) & 0xFFFF
    return out


def test_dbias_rows_at_any_alignment_store_every_element_once():
    """The dbias chunk path (rows that are no 8-element multiple): for every start alignment
    and every in-bounds width of a box row, the 16-byte chunks (up to 9, two threads per row)
    store exactly the row's elements, each its own box value, full chunks aligned."""
    # the kernel's word address in the box, brow + ((2 cc) ^ xr), is swizzle<128> of (row, cc)
    row, cc = np.meshgrid(np.arange(64), np.arange(0, 64, 2), indexing="ij")
    assert (row * 128 + ((2 * cc) ^ ((row % 8) << 4)) == swizzle128(row * 128 + 2 * cc)).all()
    rng = np.random.default_rng(0)
    box_row = rng.integers(0, 1 << 16, 64, dtype=np.uint16)
    for lead in range(8):
        for ncols in range(1, 65):
            assert row_chunks(lead, ncols) <= 9
            got = dbias_row_store(box_row, lead, ncols)
            assert got == {c: int(box_row[c]) for c in range(ncols)}, (lead, ncols)


def test_row_chunk_helpers_equal_the_model():
    lines = ['#include "sm90/primitives.cuh"', "using namespace dm::sm90;"]
    for lead in range(8):
        for ncols in (1, 7, 8, 9, 57, 63, 64):
            lines.append(f"static_assert(row_chunks({lead}, {ncols}) == "
                         f"{row_chunks(lead, ncols)});")
            for q in range(row_chunks(lead, ncols)):
                e0, lo, hi = row_chunk(q, lead, ncols)
                lines.append(f"static_assert(row_chunk({q}, {lead}, {ncols}).e0 == {e0} && "
                             f"row_chunk({q}, {lead}, {ncols}).lo == {lo} && "
                             f"row_chunk({q}, {lead}, {ncols}).hi == {hi});")
    compile_static_asserts("\n".join(lines) + "\n", "sm90_row_chunk_check.cu")
