"""CPU tests of input validation: every rule of API.md gives the right exception type and a
message naming the argument, through the public functions with NumPy inputs, plus the
CUDA-backend dtype/stride rules checked on the validation layer with torch CPU tensors."""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np
import pytest

import dmattn_cupy as dm
from dmattn_cupy import validate

torch = pytest.importorskip("torch")

B, SQ, SK, H, HK, D = 2, 5, 7, 4, 2, 16


def rng_for(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def qkv(b=B, sq=SQ, sk=SK, h=H, hk=HK, d=D, dtype=np.float32, key=()):
    rng = rng_for("qkv", b, sq, sk, h, hk, d, key)
    q = rng.standard_normal((b, sq, h, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    return q, k, v


def call(**kw):
    """flash_dmattn_func on the default small problem, overridden by ``kw``."""
    q, k, v = qkv()
    args = {"query": q, "key": k, "value": v, **kw}
    return dm.flash_dmattn_func(**args)


# ----------------------------------------------------------------------------- dense: q/k/v


@pytest.mark.parametrize(
    "name,shape",
    [("query", (SQ, H, D)), ("key", (B, SK, HK, D, 1)), ("value", (SK, HK, D))],
    ids=["query-3d", "key-5d", "value-3d"],
)
def test_qkv_ndim(name, shape):
    arr = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=rf"{name} must be 4-D"):
        call(**{name: arr})


@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_qkv_required(name):
    with pytest.raises(TypeError, match=rf"{name} is required"):
        call(**{name: None})


def test_qkv_not_an_array():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"query must be a numpy\.ndarray"):
        dm.flash_dmattn_func(q.tolist(), k, v)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.complex64], ids=str)
def test_reference_rejects_int_complex_qkv(dtype):
    q, k, v = qkv(dtype=dtype)
    with pytest.raises(TypeError, match=r"query dtype must be one of .*float64.*reference"):
        dm.flash_dmattn_func(q, k, v)


@pytest.mark.parametrize("name", ["key", "value"])
def test_reference_rejects_int_key_value(name):
    q, k, v = qkv()
    args = {"query": q, "key": k, "value": v}
    args[name] = args[name].astype(np.int32)
    with pytest.raises(TypeError, match=rf"{name} dtype must be one of"):
        dm.flash_dmattn_func(**args)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=str)
def test_reference_accepts_float_qkv(dtype):
    q, k, v = qkv(dtype=dtype)
    out = dm.flash_dmattn_func(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape


def test_qkv_dtype_mismatch():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"share one dtype.*key=float64"):
        dm.flash_dmattn_func(q, k.astype(np.float64), v)


def test_batch_mismatch():
    q, _, _ = qkv()
    _, k, v = qkv(b=B + 1)
    with pytest.raises(ValueError, match=r"key batch \(3\) must equal query batch \(2\)"):
        dm.flash_dmattn_func(q, k, v)


@pytest.mark.parametrize("h,hk", [(4, 3), (6, 4), (2, 4)], ids=["4-3", "6-4", "2-4"])
def test_heads_not_divisible(h, hk):
    q, k, v = qkv(h=h, hk=hk)
    with pytest.raises(ValueError, match=rf"query heads \({h}\).*key/value heads \({hk}\)"):
        dm.flash_dmattn_func(q, k, v)


@pytest.mark.parametrize("d", [4, 12, 20, 264, 512], ids=lambda d: f"d{d}")
def test_head_dim_rule(d):
    q, k, v = qkv(d=d)
    pattern = rf"head dim must be a multiple of 8 in \[8, 256\], got {d}$"
    with pytest.raises(ValueError, match=pattern):
        dm.flash_dmattn_func(q, k, v)


@pytest.mark.parametrize("d", [8, 64, 72, 256], ids=lambda d: f"d{d}")
def test_head_dim_accepted(d):
    q, k, v = qkv(sq=2, sk=3, d=d)
    assert dm.flash_dmattn_func(q, k, v).shape == q.shape


def test_head_dim_query_vs_key():
    q, _, _ = qkv(d=16)
    _, k, v = qkv(d=32)
    with pytest.raises(ValueError, match=r"head dims of query/key/value must match, got 16 and 32"):
        dm.flash_dmattn_func(q, k, v)


@pytest.mark.parametrize(
    "vshape",
    [(B, SK + 1, HK, D), (B, SK, HK, D + 8), (B, SK, 1, D)],
    ids=["seqlen", "head-dim", "heads"],
)
def test_key_value_shape_mismatch(vshape):
    q, k, _ = qkv()
    v = np.zeros(vshape, np.float32)
    with pytest.raises(ValueError, match=r"key and value shapes must match"):
        dm.flash_dmattn_func(q, k, v)


def test_seqlen_q_zero_gives_empty():  # was rejected; now empty outputs as SDPA gives
    q, k, v = qkv(sq=0)
    out, lse = dm.flash_dmattn_func(q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == (B, H, 0)


def test_seqlen_k_zero_allowed():
    q, k, v = qkv(sk=0)
    mask = np.ones((B, 1, SQ, 0), bool)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, return_lse=True)
    assert out.shape == q.shape and lse.shape == (B, H, SQ)
    assert np.all(out == 0)
    assert np.all(np.isneginf(lse))


# ----------------------------------------------------------------------------- dense: mask/bias

VALID_DIMS = {
    "batch": (B, 1),
    "heads": (H, HK, 1),
    "rows": (SQ, 1),
    "cols": (SK, 1),
}


@pytest.mark.parametrize("name", ["attn_mask", "attn_bias"])
@pytest.mark.parametrize("batch", VALID_DIMS["batch"], ids=lambda n: f"b{n}")
@pytest.mark.parametrize("heads", VALID_DIMS["heads"], ids=lambda n: f"h{n}")
@pytest.mark.parametrize("rows", VALID_DIMS["rows"], ids=lambda n: f"q{n}")
@pytest.mark.parametrize("cols", VALID_DIMS["cols"], ids=lambda n: f"k{n}")
def test_mask_bias_broadcast_accepted(name, batch, heads, rows, cols):
    shape = (batch, heads, rows, cols)
    q, k, v = qkv()
    arr = np.ones(shape, bool) if name == "attn_mask" else np.zeros(shape, np.float32)
    pb = validate.check_dense(q, k, v, arr if name == "attn_mask" else None,
                              arr if name == "attn_bias" else None, None, False, (-1, -1), 0.0,
                              "reference")
    assert getattr(pb, name.removeprefix("attn_")).shape == shape


BAD_SHAPES = {
    "batch": (B + 1, H, SQ, SK),
    "heads": (B, 3, SQ, SK),
    "heads-over": (B, 2 * H, SQ, SK),
    "rows": (B, H, SQ + 1, SK),
    "cols": (B, H, SQ, SK + 1),
    "cols-pad": (B, H, SQ, 8),
}


@pytest.mark.parametrize("name", ["attn_mask", "attn_bias"])
@pytest.mark.parametrize("shape", list(BAD_SHAPES.values()), ids=list(BAD_SHAPES))
def test_mask_bias_broadcast_rejected(name, shape):
    arr = np.ones(shape, bool) if name == "attn_mask" else np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=rf"{name} shape must be .*each dim full or 1"):
        call(**{name: arr})


@pytest.mark.parametrize("name", ["attn_mask", "attn_bias"])
@pytest.mark.parametrize("shape", [(H, SQ, SK), (SQ, SK), (1, B, H, SQ, SK)],
                         ids=["3d", "2d", "5d"])
def test_mask_bias_not_4d(name, shape):
    arr = np.ones(shape, bool) if name == "attn_mask" else np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=rf"{name} must be 4-D"):
        call(**{name: arr})


@pytest.mark.parametrize("dtype", [np.float32, np.int8, np.uint8, np.int32], ids=str)
def test_mask_must_be_bool(dtype):
    with pytest.raises(TypeError, match=r"attn_mask dtype must be bool"):
        call(attn_mask=np.ones((B, H, SQ, SK), dtype))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=str)
def test_reference_bias_float_accepted(dtype):
    out = call(attn_bias=np.zeros((1, 1, SQ, SK), dtype))
    assert out.shape == (B, SQ, H, D)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex128], ids=str)
def test_reference_bias_bad_dtype(dtype):
    with pytest.raises(TypeError, match=r"attn_bias dtype must be one of"):
        call(attn_bias=np.zeros((1, 1, SQ, SK), dtype))


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("value", ["0.5", True, [0.5]], ids=["str", "bool", "list"])
def test_softmax_scale_type(value):
    with pytest.raises(TypeError, match=r"softmax_scale must be a float or None"):
        call(softmax_scale=value)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_softmax_scale_finite(value):
    with pytest.raises(ValueError, match=r"softmax_scale must be finite"):
        call(softmax_scale=value)


@pytest.mark.parametrize("value", [0.3, 2, np.float32(0.25)], ids=["float", "int", "np-float32"])
def test_softmax_scale_accepted(value):
    assert call(softmax_scale=value).shape == (B, SQ, H, D)


@pytest.mark.parametrize("value", ["1", True], ids=["str", "bool"])
def test_softcap_type(value):
    with pytest.raises(TypeError, match=r"softcap must be a float >= 0"):
        call(softcap=value)


@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan], ids=["negative", "inf", "nan"])
def test_softcap_range(value):
    with pytest.raises(ValueError, match=r"softcap must be a finite float >= 0"):
        call(softcap=value)


@pytest.mark.parametrize(
    "value",
    [3, (1,), (1, 2, 3), (1.0, 2), (True, 1), "ab", None],
    ids=["int", "len1", "len3", "float", "bool", "str", "none"],
)
def test_window_size_type(value):
    with pytest.raises(TypeError, match=r"window_size must be a pair of ints"):
        call(window_size=value)


@pytest.mark.parametrize("value", [(-2, 0), (0, -5), (-3, -3)], ids=["left", "right", "both"])
def test_window_size_range(value):
    with pytest.raises(ValueError, match=r"window_size entries must be >= -1"):
        call(window_size=value)


@pytest.mark.parametrize("value", [(2, -1), [0, 0], (np.int64(3), np.int32(1))],
                         ids=["tuple", "list", "numpy-ints"])
def test_window_size_accepted(value):
    assert call(window_size=value).shape == (B, SQ, H, D)


@pytest.mark.parametrize("value", [1, 0, "True"], ids=["int1", "int0", "str"])
def test_is_causal_type(value):
    with pytest.raises(TypeError, match=r"is_causal must be a bool"):
        call(is_causal=value)


@pytest.mark.parametrize("name", ["return_lse", "deterministic"])
@pytest.mark.parametrize("value", [1, None, "yes"], ids=["int", "none", "str"])
def test_flag_type(name, value):
    if name == "deterministic" and value is None:  # None = its default (flash-dmattn 1.x)
        assert call(**{name: value}).shape == (B, SQ, H, D)
        return
    with pytest.raises(TypeError, match=rf"{name} must be a bool"):
        call(**{name: value})


def test_sparse_mask_type():
    with pytest.raises(TypeError, match=r"sparse_mask must be a dmattn_cupy mask object"):
        call(sparse_mask=np.ones((SQ, SK), bool))


@pytest.mark.parametrize("sq,sk", [(SQ + 1, SK), (SQ, SK - 1), (SK, SQ)],
                         ids=["sq", "sk", "swapped"])
def test_sparse_mask_seqlen_mismatch(sq, sk):
    with pytest.raises(ValueError, match=rf"sparse_mask is for .*\({sq}, {sk}\).*\({SQ}, {SK}\)"):
        call(sparse_mask=dm.CausalMask(sq, sk))


@pytest.mark.parametrize("lead", [(B + 1, 1), (1, H + 1), (1, HK)], ids=["batch", "heads", "kv"])
def test_sparse_mask_batch_heads_mismatch(lead):
    dense = np.ones((*lead, SQ, SK), bool)
    mask = dm.BlockBitsetMask.from_dense_mask(dense, block_size=(8, 8))
    with pytest.raises(ValueError, match=r"sparse_mask batch/head dims must be 1 or"):
        call(sparse_mask=mask)


# ----------------------------------------------------------------------------- kinds, backends


@pytest.mark.parametrize("name", ["key", "value", "attn_mask", "attn_bias"])
def test_mixing_numpy_and_torch(name):
    q, k, v = qkv()
    args = {"query": q, "key": k, "value": v}
    if name == "attn_mask":
        args[name] = torch.ones((1, 1, SQ, SK), dtype=torch.bool)
    elif name == "attn_bias":
        args[name] = torch.zeros((1, 1, SQ, SK))
    else:
        args[name] = torch.from_numpy(args[name])
    with pytest.raises(TypeError, match=rf"all array arguments must be of one kind.*{name}=torch"):
        dm.flash_dmattn_func(**args)


def test_mixing_torch_query_numpy_key():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"one kind .*query=torch, key=numpy"):
        dm.flash_dmattn_func(torch.from_numpy(q), k, v, backend="reference")


def test_cuda_backend_with_numpy():
    with pytest.raises(TypeError, match=r"backend='cuda' needs GPU arrays.*backend='reference'"):
        call(backend="cuda")


@pytest.mark.parametrize("value", ["gpu", "CUDA", None, ""], ids=["gpu", "upper", "none", "empty"])
def test_unknown_backend(value):
    with pytest.raises(ValueError, match=r"backend must be one of"):
        call(backend=value)


def test_func_auto_returns_callable():
    q, k, v = qkv()
    want = dm.flash_dmattn_func(q, k, v)
    assert dm.flash_dmattn_func_auto() is dm.flash_dmattn_func
    for backend in ("auto", "reference"):
        fn = dm.flash_dmattn_func_auto(backend)
        assert callable(fn)
        np.testing.assert_array_equal(fn(q, k, v), want)


def test_func_auto_cuda_binding_rejects_numpy():
    fn = dm.flash_dmattn_func_auto("cuda")
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"backend='cuda' needs GPU arrays"):
        fn(q, k, v)


@pytest.mark.parametrize("value", ["gpu", "", 1], ids=["gpu", "empty", "int"])
def test_func_auto_bad_backend(value):
    with pytest.raises(ValueError, match=r"backend must be"):
        dm.flash_dmattn_func_auto(value)


# ----------------------------------------------------------------------------- varlen

LENS_Q = (3, 0, 4)
LENS_K = (2, 6, 0)
TQ, TK = sum(LENS_Q), sum(LENS_K)
MQ, MK = max(LENS_Q), max(LENS_K)


def cu(lens) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def vcall(tq=TQ, tk=TK, h=H, hk=HK, d=D, **kw):
    rng = rng_for("varlen", tq, tk, h, hk, d)
    args = {
        "query": rng.standard_normal((tq, h, d)).astype(np.float32),
        "key": rng.standard_normal((tk, hk, d)).astype(np.float32),
        "value": rng.standard_normal((tk, hk, d)).astype(np.float32),
        "cu_seqlens_q": cu(LENS_Q), "cu_seqlens_k": cu(LENS_K),
        "max_seqlen_q": MQ, "max_seqlen_k": MK,
    }
    args.update(kw)
    return dm.flash_dmattn_varlen_func(**args)


def test_varlen_valid_call():
    out, lse = vcall(return_lse=True)
    assert out.shape == (TQ, H, D) and lse.shape == (H, TQ)


@pytest.mark.parametrize(
    "name,shape",
    [("query", (1, TQ, H, D)), ("key", (TK, HK)), ("value", (1, TK, HK, D))],
    ids=["query-4d", "key-2d", "value-4d"],
)
def test_varlen_qkv_ndim(name, shape):
    with pytest.raises(ValueError, match=rf"{name} must be 3-D"):
        vcall(**{name: np.zeros(shape, np.float32)})


def test_varlen_heads_and_head_dim():
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple"):
        vcall(hk=3)
    with pytest.raises(ValueError, match=r"head dim must be a multiple of 8"):
        vcall(d=12)


def test_varlen_key_value_shape_mismatch():
    with pytest.raises(ValueError, match=r"key and value shapes must match"):
        vcall(value=np.zeros((TK + 1, HK, D), np.float32))


@pytest.mark.parametrize("name", ["cu_seqlens_q", "cu_seqlens_k"])
@pytest.mark.parametrize("dtype", [np.int64, np.uint32, np.float32], ids=str)
def test_varlen_cu_seqlens_dtype(name, dtype):
    lens = LENS_Q if name == "cu_seqlens_q" else LENS_K
    with pytest.raises(TypeError, match=rf"{name} dtype must be int32"):
        vcall(**{name: cu(lens).astype(dtype)})


@pytest.mark.parametrize("name", ["cu_seqlens_q", "cu_seqlens_k"])
@pytest.mark.parametrize("value", [np.zeros((2, 2), np.int32), np.zeros((0,), np.int32),
                                   np.zeros((), np.int32)],
                         ids=["2d", "empty", "0d"])
def test_varlen_cu_seqlens_shape(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be 1-D"):
        vcall(**{name: value})


@pytest.mark.parametrize("name", ["cu_seqlens_q", "cu_seqlens_k"])
def test_varlen_cu_seqlens_required(name):
    with pytest.raises(TypeError, match=rf"{name} is required"):
        vcall(**{name: None})


def test_varlen_cu_seqlens_list():
    with pytest.raises(TypeError, match=r"cu_seqlens_k must be a numpy\.ndarray"):
        vcall(cu_seqlens_k=[0, 2, 8, 8])


def test_varlen_cu_seqlens_torch_with_numpy():
    with pytest.raises(TypeError, match=r"one kind .*cu_seqlens_q=torch"):
        vcall(cu_seqlens_q=torch.from_numpy(cu(LENS_Q)))


def test_varlen_cu_seqlens_unequal_lengths():
    with pytest.raises(ValueError, match=r"cu_seqlens_q and cu_seqlens_k must have one shape"):
        vcall(cu_seqlens_k=np.array([0, TK], np.int32))


@pytest.mark.parametrize("name", ["max_seqlen_q", "max_seqlen_k"])
def test_varlen_max_seqlen_negative(name):
    with pytest.raises(ValueError, match=rf"{name} must be an int >= 0"):
        vcall(**{name: -1})


@pytest.mark.parametrize("name", ["max_seqlen_q", "max_seqlen_k"])
@pytest.mark.parametrize("value", [4.0, None, True, "4"], ids=["float", "none", "bool", "str"])
def test_varlen_max_seqlen_not_int(name, value):
    # API.md does not say which; the library raises ValueError for every non-int.
    with pytest.raises((TypeError, ValueError), match=rf"{name} must be an int"):
        vcall(**{name: value})


def test_varlen_max_seqlen_numpy_int_accepted():
    assert vcall(max_seqlen_q=np.int64(MQ), max_seqlen_k=np.int32(MK)).shape == (TQ, H, D)


@pytest.mark.parametrize(
    "kw,pattern",
    [
        ({"cu_seqlens_q": np.array([1, 3, 3, 7], np.int32)}, r"cu_seqlens_q\[0\] must be 0"),
        ({"cu_seqlens_k": np.array([1, 3, 8, 8], np.int32)}, r"cu_seqlens_k\[0\] must be 0"),
        ({"cu_seqlens_q": np.array([0, 4, 3, 7], np.int32)}, r"cu_seqlens_q must be non-decr"),
        ({"cu_seqlens_k": np.array([0, 5, 2, 8], np.int32)}, r"cu_seqlens_k must be non-decr"),
        ({"cu_seqlens_q": np.array([0, 3, 3, 6], np.int32)},
         rf"cu_seqlens_q\[-1\] must equal the packed total {TQ}, got 6"),
        ({"cu_seqlens_k": np.array([0, 2, 8, 9], np.int32)},
         rf"cu_seqlens_k\[-1\] must equal the packed total {TK}, got 9"),
        ({"max_seqlen_q": MQ - 1}, rf"max_seqlen_q={MQ - 1} is smaller than the longest"),
        ({"max_seqlen_k": MK - 1}, rf"max_seqlen_k={MK - 1} is smaller than the longest"),
    ],
    ids=["q-first", "k-first", "q-decreasing", "k-decreasing", "q-last", "k-last", "max-q",
         "max-k"],
)
def test_varlen_cu_seqlens_contents(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        vcall(**kw)


def test_varlen_cuda_backend_with_numpy():
    with pytest.raises(TypeError, match=r"backend='cuda' needs GPU arrays"):
        vcall(backend="cuda")


def test_varlen_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of"):
        vcall(backend="cpu")


def test_varlen_mask_dtype():
    with pytest.raises(TypeError, match=r"attn_mask dtype must be bool"):
        vcall(attn_mask=np.ones((TK, 1), np.float32))


def test_varlen_bias_dtype():
    with pytest.raises(TypeError, match=r"attn_bias dtype must be one of"):
        vcall(attn_bias=np.ones((TK, 1), np.int32))


def _both_shapes(tq: int, tk: int, mk: int) -> str:
    heads = rf"\{{{H}\|{HK}\|1\}}"
    return (rf"must be query-based 3-D \({tq}, {heads}, {mk}\) or key-based 2-D "
            rf"\({tk}, {heads}\); got shape")


@pytest.mark.parametrize("name", ["attn_mask", "attn_bias"])
@pytest.mark.parametrize("heads", [1, HK, H], ids=lambda n: f"h{n}")
@pytest.mark.parametrize("layout", ["query-3d", "key-2d"])
def test_varlen_layouts_accepted(name, heads, layout):
    shape = (TQ, heads, MK) if layout == "query-3d" else (TK, heads)
    arr = np.ones(shape, bool) if name == "attn_mask" else np.zeros(shape, np.float32)
    assert vcall(**{name: arr}).shape == (TQ, H, D)


BAD_VARLEN = {
    "3d-total-k": (TK, 1, MK),
    "3d-max-q": (TQ, 1, MQ + 1),
    "3d-heads": (TQ, 3, MK),
    "2d-total-q": (TQ, 1),
    "2d-heads": (TK, 3),
    "2d-transposed": (1, TK),
    "4d": (1, TQ, 1, MK),
    "1d": (TK,),
}


@pytest.mark.parametrize("name", ["attn_mask", "attn_bias"])
@pytest.mark.parametrize("shape", list(BAD_VARLEN.values()), ids=list(BAD_VARLEN))
def test_varlen_layouts_rejected(name, shape):
    arr = np.ones(shape, bool) if name == "attn_mask" else np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=rf"{name} {_both_shapes(TQ, TK, MK)}"):
        vcall(**{name: arr})


EQUAL_LENS = (3, 4)
TOTAL = sum(EQUAL_LENS)


@pytest.mark.parametrize(
    "shape,ok",
    [((TOTAL, 1, 4), True), ((TOTAL, H), True), ((TOTAL, 1), True),
     ((TOTAL, 1, 3), False), ((TOTAL, 4, 1), False), ((TOTAL, 3), False),
     ((TOTAL, 4, 4, 1), False)],
    ids=["3d-ok", "2d-ok-H", "2d-ok-1", "3d-short", "3d-heads-as-cols", "2d-heads", "4d"],
)
def test_varlen_equal_totals_only_ndim_decides(shape, ok):
    """total_q == total_k: the layout comes from ndim alone, and errors still list both."""
    c = cu(EQUAL_LENS)
    bias = np.zeros(shape, np.float32)
    kw = {"tq": TOTAL, "tk": TOTAL, "cu_seqlens_q": c, "cu_seqlens_k": c, "max_seqlen_q": 4,
          "max_seqlen_k": 4, "attn_bias": bias}
    if ok:
        assert vcall(**kw).shape == (TOTAL, H, D)
    else:
        with pytest.raises(ValueError, match=rf"attn_bias {_both_shapes(TOTAL, TOTAL, 4)}"):
            vcall(**kw)


# ----------------------------------------------------------------------------- cuda rules
# torch CPU tensors stand in for CUDA ones: only the validation layer is called, never a launch.
# The fixture makes them report CUDA device 0, so these tests hold whether or not host tensors
# are (eventually) refused on the cuda backend.


@pytest.fixture
def on_device(monkeypatch):
    real = validate.describe

    def describe(x):
        info = real(x)
        return dataclasses.replace(info, device=0) if info.device < 0 else info

    monkeypatch.setattr(validate, "describe", describe)


def tq(shape, dtype=torch.bfloat16, key=()):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, key)).encode()))
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


def tqkv(dtype=torch.bfloat16):
    return tq((B, SQ, H, D), dtype, "q"), tq((B, SK, HK, D), dtype, "k"), tq(
        (B, SK, HK, D), dtype, "v")


def dense_cuda(q, k, v, mask=None, bias=None):
    return validate.check_dense(q, k, v, mask, bias, None, False, (-1, -1), 0.0, "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_rejects_wide_qkv(dtype, on_device):
    with pytest.raises(TypeError, match=r"query dtype must be one of \('float16', 'bfloat16'\) "
                                        r"on the cuda backend"):
        dense_cuda(*tqkv(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_accepts_half_qkv(dtype, on_device):
    pb = dense_cuda(*tqkv(dtype))
    assert pb.backend == "cuda" and pb.dtype == str(dtype).removeprefix("torch.")


def test_cuda_qkv_dtype_mismatch(on_device):
    q, k, v = tqkv()
    with pytest.raises(TypeError, match=r"share one dtype"):
        dense_cuda(q, k.half(), v)


@pytest.mark.parametrize("name", ["query", "key", "value"])
def test_cuda_last_dim_stride(name, on_device):
    q, k, v = tqkv()
    args = {"query": q, "key": k, "value": v}
    x = args[name]
    args[name] = tq((*x.shape[:-1], 2 * x.shape[-1]), key=name)[..., ::2]
    assert args[name].stride(-1) == 2
    with pytest.raises(ValueError, match=rf"{name} must have stride 1 in its last.*strides"):
        dense_cuda(args["query"], args["key"], args["value"])


def test_cuda_other_strides_free(on_device):
    """Non-contiguous views in every dim but the last are used in place."""
    q = tq((B, H, SQ, D)).transpose(1, 2)
    k = tq((B, SK, 2 * HK, D))[:, :, ::2]
    v = tq((2 * B, SK, HK, D))[::2]
    pb = dense_cuda(q, k, v)
    assert pb.q.strides == tuple(q.stride()) and pb.k.strides == tuple(k.stride())
    assert pb.v.strides == tuple(v.stride())


@pytest.mark.parametrize("qdtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bdtype", [torch.float32, "query"], ids=["fp32", "query-dtype"])
def test_cuda_bias_accepted(qdtype, bdtype, on_device):
    bias = tq((1, 1, SQ, SK), qdtype if bdtype == "query" else bdtype)
    pb = dense_cuda(*tqkv(qdtype), bias=bias)
    assert pb.bias.dtype == str(bias.dtype).removeprefix("torch.")


@pytest.mark.parametrize(
    "qdtype,bdtype",
    [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16),
     (torch.bfloat16, torch.float64)],
    ids=["bf16-fp16", "fp16-bf16", "bf16-fp64"],
)
def test_cuda_bias_rejected(qdtype, bdtype, on_device):
    with pytest.raises(TypeError, match=r"attn_bias dtype must be one of .*float32.*cuda"):
        dense_cuda(*tqkv(qdtype), bias=tq((1, 1, SQ, SK), bdtype))


def test_cuda_mask_bool_only(on_device):
    with pytest.raises(TypeError, match=r"attn_mask dtype must be bool"):
        dense_cuda(*tqkv(), mask=torch.ones((1, 1, SQ, SK), dtype=torch.uint8))
    pb = dense_cuda(*tqkv(), mask=torch.ones((1, 1, 1, 1), dtype=torch.bool).expand(B, H, SQ, SK))
    assert pb.mask.strides == (0, 0, 0, 0)


def test_cuda_varlen_rules(on_device):
    q = tq((TQ, H, D))
    k, v = tq((TK, HK, D), key="k"), tq((TK, HK, D), key="v")
    cq, ck = torch.from_numpy(cu(LENS_Q)), torch.from_numpy(cu(LENS_K))

    def check(q=q, k=k, bias=None):
        return validate.check_varlen(q, k, v, cq, ck, MQ, MK, None, bias, None, False, (-1, -1),
                                     0.0, "cuda")

    pb = check(bias=tq((TK, 1), torch.float32))
    assert pb.varlen and pb.backend == "cuda" and pb.total_q == TQ and pb.total_k == TK
    with pytest.raises(TypeError, match=r"query dtype must be one of \('float16', 'bfloat16'\)"):
        check(q=q.float(), k=k.float())
    with pytest.raises(ValueError, match=r"key must have stride 1"):
        check(k=tq((TK, HK, 2 * D))[..., ::2])


def test_cuda_backend_refuses_host_torch():
    with pytest.raises(TypeError, match=r"backend='cuda' needs GPU arrays.*host \(CPU\) torch"):
        dense_cuda(*tqkv())


def test_auto_backend_runs_host_torch_on_reference():
    q, k, v = tqkv()
    out = dm.flash_dmattn_func(q, k, v)
    assert isinstance(out, torch.Tensor) and out.dtype == q.dtype and out.device.type == "cpu"


def test_cuda_grid_limits(on_device):
    q = torch.zeros(1, 1, 65536, 8, dtype=torch.float16).expand(1, 1, 65536, 8)
    k = torch.zeros(1, 1, 1, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"query heads must be <= 65535 on the CUDA backend"):
        dense_cuda(q, k, k)
    qb = torch.zeros(1, 1, 1, 8, dtype=torch.float16).expand(65536, 1, 1, 8)
    kb = torch.zeros(1, 1, 1, 8, dtype=torch.float16).expand(65536, 1, 1, 8)
    with pytest.raises(ValueError, match=r"batch must be <= 65535 on the CUDA backend"):
        dense_cuda(qb, kb, kb)
