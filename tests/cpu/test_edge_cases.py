"""CPU tests of issue 16's "no silent surprises" list, through the public functions on the
reference backend (NumPy and CPU torch tensors): flash-dmattn 1.x spellings (None flags,
numpy.bool_, ``scale=``, ``return_attn_probs=``), NaN propagation, int32 limits, softcap that
float32 cannot hold, ``bias_grad`` type, and empty inputs (B = 0, Sq = 0, Sk = 0)."""

from __future__ import annotations

import numpy as np
import pytest

import dmattn_cupy as dm
from dmattn_cupy import validate

B, SQ, SK, H, HK, D = 2, 5, 7, 4, 2, 16


def qkv(b=B, sq=SQ, sk=SK, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, sq, H, D)), rng.standard_normal((b, sk, HK, D)),
            rng.standard_normal((b, sk, HK, D)))


# ----------------------------------------------------------------------------- flash-dmattn 1.x


def test_none_flags_are_defaults():
    q, k, v = qkv()
    ref = dm.flash_dmattn_func(q, k, v)
    out = dm.flash_dmattn_func(q, k, v, is_causal=None, softcap=None, deterministic=None)
    np.testing.assert_array_equal(out, ref)


def test_numpy_bool_flags():
    q, k, v = qkv()
    ref, ref_lse = dm.flash_dmattn_func(q, k, v, is_causal=True, return_lse=True)
    out, lse = dm.flash_dmattn_func(q, k, v, is_causal=np.True_, deterministic=np.False_,
                                    return_lse=np.True_)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(lse, ref_lse)


def test_return_lse_none_still_rejected():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"return_lse must be a bool"):
        dm.flash_dmattn_func(q, k, v, return_lse=None)


def test_scale_alias():
    q, k, v = qkv()
    ref = dm.flash_dmattn_func(q, k, v, softmax_scale=0.3)
    np.testing.assert_array_equal(dm.flash_dmattn_func(q, k, v, scale=0.3), ref)
    np.testing.assert_array_equal(dm.flash_dmattn_func(q, k, v, softmax_scale=0.3, scale=0.3),
                                  ref)
    with pytest.raises(TypeError, match=r"softmax_scale=0.3 and its alias scale=0.5 differ"):
        dm.flash_dmattn_func(q, k, v, softmax_scale=0.3, scale=0.5)


def test_return_attn_probs_dense():
    q, k, v = qkv()
    ref, ref_lse = dm.flash_dmattn_func(q, k, v, is_causal=True, return_lse=True)
    res = dm.flash_dmattn_func(q, k, v, is_causal=True, return_attn_probs=True)
    assert len(res) == 3 and res[2] is None
    np.testing.assert_array_equal(res[0], ref)
    np.testing.assert_array_equal(res[1], ref_lse)
    assert not isinstance(dm.flash_dmattn_func(q, k, v, return_attn_probs=False), tuple)
    with pytest.raises(TypeError, match=r"return_attn_probs must be a bool or None"):
        dm.flash_dmattn_func(q, k, v, return_attn_probs="yes")


def test_return_attn_probs_varlen():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((6, H, D))
    k = rng.standard_normal((9, HK, D))
    v = rng.standard_normal((9, HK, D))
    cu_q = np.array([0, 2, 6], np.int32)
    cu_k = np.array([0, 4, 9], np.int32)
    out, lse, probs = dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, is_causal=None,
                                                  scale=0.2, return_attn_probs=True)
    ref, ref_lse = dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, softmax_scale=0.2,
                                               return_lse=True)
    assert probs is None
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(lse, ref_lse)


def test_check_options_accepts_none_and_numpy_bool():
    scale, cap, window = validate.check_options(None, None, (-1, -1), np.True_, 64)
    assert cap == 0.0 and window == (-1, 0) and scale == pytest.approx(0.125)
    assert validate.check_options(None, 1.0, (-1, -1), None, 64)[2] == (-1, -1)


# ----------------------------------------------------------------------------- NaN


def _nan_case(where):
    q, k, v = qkv(b=1)
    bias = np.zeros((1, H, SQ, SK))
    mask = np.ones((1, 1, SQ, SK), bool)
    mask[0, 0, 3] = False                 # row 3: fully masked
    mask[0, 0, 0, 6] = False              # row 0: key 6 excluded
    if where == "query":
        q[0, 1, 0, 2] = np.nan            # row 1, head 0 sees it everywhere
        rows = [(1, 0)]
    elif where == "key":
        k[0, 2, 0, 5] = np.nan            # key 2 of kv head 0: rows of heads 0, 1 (GQA)
        rows = [(i, h) for i in (0, 1, 2, 4) for h in (0, 1)]
    elif where == "value":
        v[0, 4, 1, 0] = np.nan            # key 4 of kv head 1: heads 2, 3
        rows = [(i, h) for i in (0, 1, 2, 4) for h in (2, 3)]
    elif where == "bias":
        bias[0, 2, 4, 1] = np.nan         # row 4, head 2, allowed key 1
        rows = [(4, 2)]
    else:
        rows = []
    return q, k, v, mask, bias, rows


@pytest.mark.parametrize("where", ["query", "key", "value", "bias"])
def test_nan_propagates_to_its_rows(where):
    q, k, v, mask, bias, rows = _nan_case(where)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, return_lse=True)
    nan_rows = np.isnan(out[0]).any(axis=-1)          # (Sq, H)
    want = np.zeros((SQ, H), bool)
    for i, h in rows:
        want[i, h] = True
    np.testing.assert_array_equal(nan_rows, want)
    assert np.all(out[0, 3] == 0) and np.all(np.isneginf(lse[0, :, 3]))  # fully masked row
    if where != "value":  # a NaN logit also makes lse NaN; a NaN value leaves lse finite
        assert np.all(np.isnan(lse[0].T[want]))
    assert np.isfinite(out[0][~want]).all()


def test_nan_at_excluded_position_is_ignored():
    q, k, v, mask, bias, _ = _nan_case("none")
    bias[0, :, 0, 6] = np.nan             # excluded by the mask
    out = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=False)
    assert np.isfinite(out).all()
    q2 = q.copy()
    q2[0, 3] = np.nan                     # the fully masked row
    out = dm.flash_dmattn_func(q2, k, v, attn_mask=mask)
    assert np.all(out[0, 3] == 0)


def test_nan_backward_reference_propagates():
    q, k, v, mask, bias, _ = _nan_case("query")
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, return_lse=True)
    dq, dk, dv, _ = dm.flash_dmattn_backward(np.ones_like(out), q, k, v, out, lse, attn_mask=mask)
    assert np.isnan(dk).any() and np.isnan(dv).any()


# ----------------------------------------------------------------------------- limits


def _huge(shape):
    return np.broadcast_to(np.zeros((1,) * len(shape), np.float16), shape)  # no memory


@pytest.mark.parametrize("which,pattern", [("q", r"query seqlen \(query.shape\[1\]\) must be <= "
                                                 r"2147483647"),
                                           ("k", r"key seqlen \(key.shape\[1\]\) must be <= ")])
def test_dense_lengths_beyond_int32(which, pattern):
    n = 2**31
    q = _huge((1, n if which == "q" else 4, 1, 8))
    k = _huge((1, n if which == "k" else 4, 1, 8))
    with pytest.raises(ValueError, match=pattern):
        dm.flash_dmattn_func(q, k, k)


def test_varlen_lengths_beyond_int32():
    n = 2**31
    cu = np.array([0, 4], np.int32)
    small = _huge((4, 1, 8))
    with pytest.raises(ValueError, match=r"total_q \(query.shape\[0\]\) must be <= 2147483647"):
        dm.flash_dmattn_varlen_func(_huge((n, 1, 8)), small, small, cu, cu, 4, 4)
    with pytest.raises(ValueError, match=r"total_k \(key.shape\[0\]\) must be <="):
        dm.flash_dmattn_varlen_func(small, _huge((n, 1, 8)), _huge((n, 1, 8)), cu, cu, 4, 4)
    with pytest.raises(ValueError, match=r"max_seqlen_k must be <= 2147483647"):
        dm.flash_dmattn_varlen_func(small, small, small, cu, cu, 4, n)


@pytest.mark.parametrize("window,name", [((2**31, -1), r"window_size\[0\] \(left\)"),
                                         ((0, 2**40), r"window_size\[1\] \(right\)")])
def test_window_beyond_int32(window, name):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=name + r" must be <= 2147483647"):
        dm.flash_dmattn_func(q, k, v, window_size=window)
    assert dm.flash_dmattn_func(q, k, v, window_size=(2**31 - 1, 0)).shape == q.shape


@pytest.mark.parametrize("cap", [1e-50, 1e-39, 1e39])
def test_softcap_outside_float32(cap):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"softcap=.* does not survive float32"):
        dm.flash_dmattn_func(q, k, v, softcap=cap)


def test_small_normal_softcap_accepted():
    q, k, v = qkv()
    assert np.isfinite(dm.flash_dmattn_func(q, k, v, softcap=1e-30)).all()


@pytest.mark.parametrize("value", [1, "yes", None])
def test_bias_grad_must_be_bool(value):
    q, k, v = qkv()
    bias = np.zeros((B, 1, 1, SK))
    out, lse = dm.flash_dmattn_func(q, k, v, attn_bias=bias, return_lse=True)
    with pytest.raises(TypeError, match=r"bias_grad must be a bool"):
        dm.flash_dmattn_backward(out, q, k, v, out, lse, attn_bias=bias, bias_grad=value)
    g = dm.flash_dmattn_backward(out, q, k, v, out, lse, attn_bias=bias, bias_grad=np.False_)
    assert g[3] is None


def test_backward_none_flags():
    q, k, v = qkv()
    out, lse = dm.flash_dmattn_func(q, k, v, return_lse=True)
    a = dm.flash_dmattn_backward(out, q, k, v, out, lse, is_causal=None, softcap=None,
                                 deterministic=None)
    b = dm.flash_dmattn_backward(out, q, k, v, out, lse)
    for x, y in zip(a[:3], b[:3], strict=True):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- empty inputs


@pytest.mark.parametrize("b,sq,sk", [(0, SQ, SK), (B, 0, SK), (0, 0, 0), (B, SQ, 0)],
                         ids=["batch0", "sq0", "all0", "sk0"])
def test_dense_empty(b, sq, sk):
    q, k, v = qkv(b=b, sq=sq, sk=sk)
    bias = np.zeros((b, H, sq, sk))
    out, lse = dm.flash_dmattn_func(q, k, v, attn_bias=bias, is_causal=True, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (b, H, sq)
    assert lse.dtype == np.float32
    assert np.all(out == 0) and np.all(np.isneginf(lse))
    dq, dk, dv, db = dm.flash_dmattn_backward(out, q, k, v, out, lse, attn_bias=bias)
    assert (dq.shape, dk.shape, dv.shape, db.shape) == (q.shape, k.shape, v.shape, bias.shape)
    assert not (dq.any() or dk.any() or dv.any() or db.any())


def test_varlen_empty():
    q = np.zeros((0, H, D))
    k = np.zeros((0, HK, D))
    for cu in (np.array([0], np.int32), np.array([0, 0, 0], np.int32)):
        out, lse = dm.flash_dmattn_varlen_func(q, k, k, cu, cu, 0, 0, return_lse=True)
        assert out.shape == (0, H, D) and lse.shape == (H, 0)
        g = dm.flash_dmattn_varlen_backward(out, q, k, k, out, lse, cu, cu, 0, 0)
        assert [x.shape for x in g[:3]] == [q.shape, k.shape, k.shape] and g[3] is None
    q = np.ones((3, H, D))
    out, lse = dm.flash_dmattn_varlen_func(q, k, k, np.array([0, 3], np.int32),
                                           np.array([0, 0], np.int32), 3, 0, return_lse=True)
    assert np.all(out == 0) and np.all(np.isneginf(lse))


def test_torch_empty_with_autograd():
    torch = pytest.importorskip("torch")
    q = torch.randn(0, SQ, H, D, requires_grad=True)
    k = torch.randn(0, SK, HK, D, requires_grad=True)
    v = torch.randn(0, SK, HK, D, requires_grad=True)
    out = dm.flash_dmattn_func(q, k, v)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    q = torch.randn(B, 0, H, D, requires_grad=True)
    k = torch.randn(B, SK, HK, D, requires_grad=True)
    out = dm.flash_dmattn_func(q, k, k)
    out.sum().backward()
    assert torch.all(k.grad == 0) and k.grad.shape == k.shape
