"""CPU tests of dmattn_cupy.layout: mask/bias strides (broadcast dims get stride 0, varlen
query-based vs key-based layouts), head ratios, and the FwdParams fields built for a dense GQA
problem and a varlen problem (Problems come from the validation layer on NumPy arrays)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dmattn_cupy import layout, validate
from dmattn_cupy.arrays import ArrayInfo, describe
from dmattn_cupy.params import FWD_DTYPE


def info(shape, strides, dtype="float32") -> ArrayInfo:
    return ArrayInfo("numpy", dtype, tuple(shape), tuple(strides), -1, 0)


def fields(ts: layout.TensorStrides) -> tuple[int, ...]:
    return ts.batch, ts.head, ts.row, ts.col, ts.qseq, ts.kseq


# ----------------------------------------------------------------------------- mask_bias_strides

DENSE_CASES = {
    # shape, reported strides, expected (batch, head, row, col)
    "contiguous": ((2, 4, 5, 7), (140, 35, 7, 1), (140, 35, 7, 1)),
    "b1": ((1, 4, 5, 7), (140, 35, 7, 1), (0, 35, 7, 1)),
    "h1": ((2, 1, 5, 7), (35, 35, 7, 1), (35, 0, 7, 1)),
    "q1": ((2, 4, 1, 7), (28, 7, 7, 1), (28, 7, 0, 1)),
    "k1": ((2, 4, 5, 1), (20, 5, 1, 1), (20, 5, 1, 0)),
    "b1-h1-q1": ((1, 1, 1, 7), (7, 7, 7, 1), (0, 0, 0, 1)),
    "all-1": ((1, 1, 1, 1), (1, 1, 1, 1), (0, 0, 0, 0)),
    # size-1 dims report arbitrary strides (torch/cupy slices): still 0
    "odd-size1-strides": ((1, 2, 1, 7), (999, 14, 123, 1), (0, 14, 0, 1)),
    "transposed": ((2, 4, 5, 7), (140, 7, 28, 1), (140, 7, 28, 1)),
    "col-strided": ((2, 1, 5, 7), (70, 70, 14, 2), (70, 0, 14, 2)),
}


@pytest.mark.parametrize("case", list(DENSE_CASES.values()), ids=list(DENSE_CASES))
def test_dense_strides(case):
    shape, strides, want = case
    got = layout.mask_bias_strides(info(shape, strides), varlen=False)
    assert fields(got) == (*want, 0, 0)


BROADCAST_FROM = {
    "bias-row": (1, 1, 1, 7),
    "per-batch-key": (2, 1, 1, 7),
    "per-head-query": (1, 4, 5, 1),
    "scalar": (1, 1, 1, 1),
    "full": (2, 4, 5, 7),
}


@pytest.mark.parametrize("src", list(BROADCAST_FROM.values()), ids=list(BROADCAST_FROM))
@pytest.mark.parametrize("dtype", [np.bool_, np.float16, np.float32], ids=str)
def test_numpy_broadcast_view_strides(src, dtype):
    """np.broadcast_to views: every broadcast dim reads with stride 0; no copy is made."""
    base = np.zeros(src, dtype)
    view = np.broadcast_to(base, (2, 4, 5, 7))
    st = layout.mask_bias_strides(describe(view), varlen=False)
    base_strides = [s // base.itemsize for s in base.strides]
    want = tuple(0 if n == 1 else bs for n, bs in zip(src, base_strides, strict=True))
    assert fields(st)[:4] == want
    # reading element (b, h, i, j) at those strides gives the broadcast value
    flat = np.arange(base.size).reshape(src)
    idx = (1, 3, 4, 6)
    off = sum(i * s for i, s in zip(idx, want, strict=True))
    assert flat.reshape(-1)[off] == np.broadcast_to(flat, (2, 4, 5, 7))[idx]


@pytest.mark.parametrize("heads", [1, 2, 8], ids=lambda h: f"h'{h}")
def test_varlen_query_based_strides(heads):
    total_q, max_k = 11, 6
    arr = np.zeros((total_q, heads, max_k), np.float32)
    st = layout.mask_bias_strides(describe(arr), varlen=True)
    row = heads * max_k
    assert fields(st) == (0, 0 if heads == 1 else max_k, row, 1, row, 0)


@pytest.mark.parametrize("heads", [1, 2, 8], ids=lambda h: f"h'{h}")
def test_varlen_key_based_strides(heads):
    total_k = 13
    arr = np.zeros((total_k, heads), bool)
    st = layout.mask_bias_strides(describe(arr), varlen=True)
    assert fields(st) == (0, 0 if heads == 1 else 1, 0, heads, 0, heads)


def test_varlen_strided_views():
    """Non-contiguous varlen views: the reported strides pass through (size-1 dims -> 0)."""
    big = np.zeros((11, 4, 20), np.float32)
    qb = big[:, 1:2, :6]          # (11, 1, 6) with strides (80, 20, 1)
    st = layout.mask_bias_strides(describe(qb), varlen=True)
    assert fields(st) == (0, 0, 80, 1, 80, 0)
    kb = np.zeros((4, 13), np.float32).T   # (13, 4) with strides (1, 13)
    st = layout.mask_bias_strides(describe(kb), varlen=True)
    assert fields(st) == (0, 13, 0, 1, 0, 1)
    kb_bcast = np.broadcast_to(np.zeros((13, 1), np.float32), (13, 8))
    st = layout.mask_bias_strides(describe(kb_bcast), varlen=True)
    assert fields(st) == (0, 0, 0, 1, 0, 1)


# ----------------------------------------------------------------------------- head_ratio


@pytest.mark.parametrize("h,hk", [(8, 2), (8, 1), (6, 3), (4, 4)],
                         ids=["8-2", "8-1", "6-3", "4-4"])
@pytest.mark.parametrize("kind", ["dense", "varlen-query", "varlen-key"])
@pytest.mark.parametrize("heads_of", ["H", "Hk", "1"])
def test_head_ratio(h, hk, kind, heads_of):
    n = {"H": h, "Hk": hk, "1": 1}[heads_of]
    shape = {"dense": (1, n, 3, 4), "varlen-query": (5, n, 3), "varlen-key": (7, n)}[kind]
    varlen = kind != "dense"
    ratio = layout.head_ratio(h, describe(np.zeros(shape, np.float32)), varlen)
    assert ratio >= 1 and h % ratio == 0
    # mask head = h // ratio is the head API.md assigns (h // (H // n), or 0 for one head)
    for qh in range(h):
        assert qh // ratio == (qh // (h // n) if n > 1 else 0)
    assert layout.head_ratio(h, None, varlen) == 1


# ----------------------------------------------------------------------------- build_fwd_params

LOG2E = math.log2(math.e)


def f32(x: float) -> float:
    return float(np.float32(x))


def dense_problem(bias_dtype=np.float32, softcap=0.0, is_causal=False, window=(-1, -1),
                  scale=None, mask=True):
    b, sq, sk, h, hk, d = 2, 5, 9, 8, 2, 64
    q = np.zeros((b, h, sq, d), np.float16).transpose(0, 2, 1, 3)  # (B, Sq, H, D) strided
    k = np.zeros((b, sk, hk, d), np.float16)
    v = np.zeros((b, sk, 2 * hk, d), np.float16)[:, :, ::2]
    bias = np.zeros((b, 1, 1, sk), bias_dtype)
    m = np.ones((1, hk, sq, sk), bool) if mask else None
    pb = validate.check_dense(q, k, v, m, bias, scale, is_causal, window, softcap, "reference")
    return pb, q


def test_fwd_params_dense_gqa():
    pb, q = dense_problem()
    out = describe(np.empty((2, 5, 8, 64), np.float16))
    rec = layout.build_fwd_params(pb, out, lse_ptr=0x1000, cu_q_ptr=0, cu_k_ptr=0,
                                  counters_ptr=0x2000)
    assert rec.dtype == FWD_DTYPE and rec.shape == (1,)
    r = rec[0]
    assert (r["q"], r["k"], r["v"], r["o"], r["mask"], r["bias"]) == (0,) * 6  # host arrays
    assert r["lse"] == 0x1000 and r["tile_counters"] == 0x2000
    assert (r["cu_seqlens_q"], r["cu_seqlens_k"]) == (0, 0)
    d = 64
    # q is a (B, H, Sq, D) buffer seen as (B, Sq, H, D)
    assert (r["q_batch_stride"], r["q_row_stride"], r["q_head_stride"]) == (8 * 5 * d, d, 5 * d)
    assert (r["k_batch_stride"], r["k_row_stride"], r["k_head_stride"]) == (9 * 2 * d, 2 * d, d)
    assert (r["v_batch_stride"], r["v_row_stride"], r["v_head_stride"]) == (9 * 4 * d, 4 * d,
                                                                             2 * d)
    assert (r["o_batch_stride"], r["o_row_stride"], r["o_head_stride"]) == (5 * 8 * d, 8 * d, d)
    assert (r["lse_batch_stride"], r["lse_head_stride"]) == (8 * 5, 5)
    # bias (B, 1, 1, Sk): batch stride Sk, everything else broadcast
    bias = [r[f"bias_{f}_stride"] for f in ("batch", "head", "row", "col", "qseq", "kseq")]
    assert bias == [9, 0, 0, 1, 0, 0]
    mask = [r[f"mask_{f}_stride"] for f in ("batch", "head", "row", "col", "qseq", "kseq")]
    assert mask == [0, 5 * 9, 9, 1, 0, 0]
    assert (r["batch"], r["heads"], r["kv_heads"]) == (2, 8, 2)
    assert (r["seqlen_q"], r["seqlen_k"], r["head_dim"]) == (5, 9, 64)
    assert r["q_per_kv"] == 4
    assert r["mask_head_ratio"] == 4 and r["bias_head_ratio"] == 8
    assert (r["window_left"], r["window_right"]) == (-1, -1)
    assert r["bias_is_fp32"] == 1
    assert r["scale_log2"] == pytest.approx(LOG2E / 8.0, rel=1e-7)
    assert r["softcap"] == 0 and r["scale_over_softcap"] == 0
    assert r["pad0"] == 0


def test_fwd_params_no_mask_no_bias():
    pb = validate.check_dense(np.zeros((1, 3, 2, 8)), np.zeros((1, 4, 1, 8)),
                              np.zeros((1, 4, 1, 8)), None, None, None, False, (-1, -1), 0.0,
                              "reference")
    r = layout.build_fwd_params(pb, pb.q, 0)[0]
    assert r["mask"] == 0 and r["bias"] == 0
    assert all(r[f"{n}_{f}_stride"] == 0 for n in ("mask", "bias")
               for f in ("batch", "head", "row", "col", "qseq", "kseq"))
    assert r["mask_head_ratio"] == 1 and r["bias_head_ratio"] == 1 and r["bias_is_fp32"] == 0


@pytest.mark.parametrize("bias_dtype,want", [(np.float16, 0), (np.float32, 1), (np.float64, 0)],
                         ids=["fp16", "fp32", "fp64"])
def test_fwd_params_bias_is_fp32(bias_dtype, want):
    pb, q = dense_problem(bias_dtype=bias_dtype)
    assert layout.build_fwd_params(pb, describe(q), 0)[0]["bias_is_fp32"] == want


@pytest.mark.parametrize(
    "is_causal,window,want",
    [(False, (-1, -1), (-1, -1)), (True, (-1, -1), (-1, 0)), (True, (4, -1), (4, 0)),
     (True, (4, 3), (4, 0)), (True, (-1, 0), (-1, 0)), (False, (2, 3), (2, 3)),
     (False, (0, 0), (0, 0))],
    ids=["none", "causal", "causal-left", "causal-right-clamped", "causal-right0", "window",
         "window-0"],
)
def test_fwd_params_window_folds_causal(is_causal, window, want):
    pb, q = dense_problem(is_causal=is_causal, window=window)
    r = layout.build_fwd_params(pb, describe(q), 0)[0]
    assert (int(r["window_left"]), int(r["window_right"])) == want


@pytest.mark.parametrize("scale", [None, 0.3, 2.0], ids=["default", "s0.3", "s2"])
@pytest.mark.parametrize("softcap", [0.0, 15.0, 50.0], ids=["nocap", "cap15", "cap50"])
def test_fwd_params_scale_softcap(scale, softcap):
    pb, q = dense_problem(scale=scale, softcap=softcap)
    s = 1.0 / math.sqrt(64) if scale is None else scale
    r = layout.build_fwd_params(pb, describe(q), 0)[0]
    assert r["scale_log2"] == f32(s * LOG2E)
    assert r["softcap"] == f32(softcap)
    assert r["scale_over_softcap"] == (f32(s / softcap) if softcap > 0 else 0.0)


def test_fwd_params_varlen():
    lens_q, lens_k = (3, 0, 6), (5, 2, 4)
    tq, tk, h, hk, d = sum(lens_q), sum(lens_k), 6, 3, 32
    cq = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = np.zeros((tq, h, d), np.float32)
    k = np.zeros((tk, hk, 2 * d), np.float32)[:, :, :d]
    v = np.zeros((tk, hk, d), np.float32)
    mask = np.ones((tq, 1, max(lens_k)), bool)        # query-based, one head
    bias = np.zeros((tk, h), np.float32)               # key-based, all heads
    pb = validate.check_varlen(q, k, v, cq, ck, max(lens_q), max(lens_k), mask, bias, 0.5, True,
                               (2, -1), 10.0, "reference")
    rec = layout.build_fwd_params(pb, describe(q), 0xABC, cu_q_ptr=0x10, cu_k_ptr=0x20)
    r = rec[0]
    assert (r["lse"], r["cu_seqlens_q"], r["cu_seqlens_k"]) == (0xABC, 0x10, 0x20)
    assert (r["q_batch_stride"], r["q_row_stride"], r["q_head_stride"]) == (0, h * d, d)
    assert (r["k_batch_stride"], r["k_row_stride"], r["k_head_stride"]) == (0, hk * 2 * d, 2 * d)
    assert (r["v_batch_stride"], r["v_row_stride"], r["v_head_stride"]) == (0, hk * d, d)
    assert (r["o_batch_stride"], r["o_row_stride"], r["o_head_stride"]) == (0, h * d, d)
    assert (r["lse_batch_stride"], r["lse_head_stride"]) == (0, tq)
    mk = max(lens_k)
    mstr = [r[f"mask_{f}_stride"] for f in ("batch", "head", "row", "col", "qseq", "kseq")]
    assert mstr == [0, 0, mk, 1, mk, 0]
    bstr = [r[f"bias_{f}_stride"] for f in ("batch", "head", "row", "col", "qseq", "kseq")]
    assert bstr == [0, 1, 0, h, 0, h]
    assert (r["batch"], r["heads"], r["kv_heads"], r["head_dim"]) == (3, h, hk, d)
    assert (r["seqlen_q"], r["seqlen_k"]) == (max(lens_q), max(lens_k))
    assert r["q_per_kv"] == 2 and r["mask_head_ratio"] == h and r["bias_head_ratio"] == 1
    assert (r["window_left"], r["window_right"]) == (2, 0)
    assert r["bias_is_fp32"] == 1
    assert r["scale_log2"] == f32(0.5 * LOG2E)
    assert r["softcap"] == f32(10.0) and r["scale_over_softcap"] == f32(0.05)
    assert (pb.total_q, pb.total_k) == (tq, tk)


def test_num_m_blocks():
    assert [layout.num_m_blocks(s, 64) for s in (0, 1, 64, 65, 128)] == [1, 1, 1, 2, 2]
