"""CPU tests of the float64 reference backend against torch's CPU
``scaled_dot_product_attention`` (and explicit float64 formulas) on fresh random cases:
masks, biases and every broadcast pattern, GQA/MQA, bottom-right causal and windows, softcap,
scale, lse, fully masked rows, Sk = 0, low-precision rounding, sparse masks, varlen packing and
the output-type rule."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import dmattn_cupy as dm
from dmattn_cupy import reference
from dmattn_cupy.reference_bwd import dense_backward

torch = pytest.importorskip("torch")
F = torch.nn.functional

ATOL = 1e-10
RTOL = 1e-10


def rng_for(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def make_qkv(rng, b, sq, sk, h, hk, d, dtype=np.float64):
    q = rng.standard_normal((b, sq, h, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    return q, k, v


def heads_up(x: np.ndarray, h: int) -> np.ndarray:
    """Head axis 1 of size {1, Hk, H} widened to H (Hk: head g serves query heads g*r..)."""
    n = x.shape[1]
    return x if n in (1, h) else np.repeat(x, h // n, axis=1)


def positions(sq, sk, is_causal=False, window=(-1, -1)) -> np.ndarray:
    """(Sq, Sk) keep-matrix written from the API text (bottom-right aligned)."""
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    keep = np.ones((sq, sk), bool)
    if is_causal:
        keep &= ~(j > i + sk - sq)
    left, right = window
    if left >= 0:
        keep &= ~(j < i + sk - sq - left)
    if right >= 0:
        keep &= ~(j > i + sk - sq + right)
    return keep


def sdpa(q, k, v, keep=None, bias=None, scale=None):
    """torch float64 SDPA on (B,S,H,D) NumPy arrays; keep/bias 4-D broadcastable, with head dims
    in {1, Hk, H}. K/V heads are repeat_interleaved for GQA. Rows with no allowed key -> 0."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    qt = torch.from_numpy(q).double().permute(0, 2, 1, 3)
    kt = torch.from_numpy(k).double().permute(0, 2, 1, 3).repeat_interleave(h // hk, dim=1)
    vt = torch.from_numpy(v).double().permute(0, 2, 1, 3).repeat_interleave(h // hk, dim=1)
    add = torch.zeros((1, 1, 1, 1), dtype=torch.float64)
    if bias is not None:
        add = add + torch.from_numpy(heads_up(np.asarray(bias, np.float64), h))
    if keep is not None:
        kp = torch.from_numpy(np.array(heads_up(np.asarray(keep, bool), h)))
        add = torch.where(kp, add, torch.tensor(-torch.inf, dtype=torch.float64))
    add = add.expand(b, h, sq, sk)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=add, scale=scale)
    out = out.permute(0, 2, 1, 3).numpy().copy()
    dead = np.isneginf(add.numpy()).all(axis=-1) if sk > 0 else np.ones((b, h, sq), bool)
    out[np.transpose(dead, (0, 2, 1))] = 0.0
    return out


def explicit_scores(q, k, keep=None, bias=None, scale=None, softcap=0.0):
    """float64 logits s = softcap(scale * q.k) + bias, -inf where not kept: (B, H, Sq, Sk)."""
    b, sq, h, d = q.shape
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    kk = np.repeat(k, h // k.shape[2], axis=2)
    s = scale * np.einsum("bqhd,bkhd->bhqk", q, kk)
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    if bias is not None:
        s = s + heads_up(bias, h)
    if keep is not None:
        s = np.where(heads_up(keep, h), s, -np.inf)
    return s


def explicit_attention(q, k, v, **kw):
    s = explicit_scores(q, k, **kw)
    lse = torch.logsumexp(torch.from_numpy(s), dim=-1).numpy()
    with np.errstate(invalid="ignore"):
        p = np.where(np.isfinite(lse)[..., None], np.exp(s - lse[..., None]), 0.0)
    vv = np.repeat(v, q.shape[2] // v.shape[2], axis=2)
    return np.einsum("bhqk,bkhd->bqhd", p, vv), lse


def run(q, k, v, **kw):
    """The public function on the reference backend; out in q's dtype, lse float32."""
    out, lse = dm.flash_dmattn_func(q, k, v, return_lse=True, backend="reference", **kw)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    return out, lse


def ref64(q, k, v, mask=None, bias=None, scale=None, softcap=0.0, is_causal=False,
          window=(-1, -1)):
    """reference.dense_forward with float64 lse, window folded like the library does."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    left, right = window
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    return reference.dense_forward(q, k, v, mask, bias, scale, softcap, (left, right))


def close(a, b, atol=ATOL, rtol=RTOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- dense basics

SHAPES = {
    "square": (2, 17, 17, 4, 4, 32),
    "sq<sk": (1, 9, 30, 2, 2, 16),
    "sq>sk": (2, 23, 11, 2, 1, 8),
    "d64": (1, 5, 40, 2, 2, 64),
}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("inputs", ["plain", "mask", "bias", "mask+bias"])
def test_dense_vs_sdpa(shape, inputs):
    b, sq, sk, h, hk, d = shape
    rng = rng_for("dense", shape, inputs)
    q, k, v = make_qkv(rng, b, sq, sk, h, hk, d)
    mask = rng.random((b, h, sq, sk)) < 0.7 if "mask" in inputs else None
    bias = rng.standard_normal((b, h, sq, sk)) if "bias" in inputs else None
    out, lse = run(q, k, v, attn_mask=mask, attn_bias=bias)
    close(out, sdpa(q, k, v, mask, bias))
    _, want_lse = explicit_attention(q, k, v, keep=mask, bias=bias)
    close(lse, want_lse, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("name", ["attn_mask", "attn_bias"])
@pytest.mark.parametrize("bdim", ["B", "1"])
@pytest.mark.parametrize("hdim", ["H", "Hk", "1"])
@pytest.mark.parametrize("qdim", ["Sq", "1"])
@pytest.mark.parametrize("kdim", ["Sk", "1"])
def test_broadcast_patterns(name, bdim, hdim, qdim, kdim):
    b, sq, sk, h, hk, d = 2, 6, 9, 4, 2, 16
    sizes = {"B": b, "H": h, "Hk": hk, "Sq": sq, "Sk": sk, "1": 1}
    shape = tuple(sizes[x] for x in (bdim, hdim, qdim, kdim))
    rng = rng_for("broadcast", name, shape)
    q, k, v = make_qkv(rng, b, sq, sk, h, hk, d)
    if name == "attn_mask":
        arr = rng.random(shape) < 0.6
        want = sdpa(q, k, v, keep=arr)
    else:
        arr = 2.0 * rng.standard_normal(shape)
        want = sdpa(q, k, v, bias=arr)
    out, _ = run(q, k, v, **{name: arr})
    close(out, want)
    # the same through a broadcast view with zero strides in the size-1 dims
    view = np.broadcast_to(arr, (b, sizes[hdim], sq, sk))
    out_view, _ = run(q, k, v, **{name: view})
    close(out_view, want)


@pytest.mark.parametrize("h,hk", [(8, 2), (8, 1), (6, 3), (4, 4)],
                         ids=["gqa-8-2", "mqa-8-1", "gqa-6-3", "mha-4-4"])
@pytest.mark.parametrize("heads_of", ["H", "Hk", "1"], ids=["mb-H", "mb-Hk", "mb-1"])
def test_gqa_vs_sdpa(h, hk, heads_of):
    b, sq, sk, d = 2, 7, 12, 16
    rng = rng_for("gqa", h, hk, heads_of)
    q, k, v = make_qkv(rng, b, sq, sk, h, hk, d)
    mh = {"H": h, "Hk": hk, "1": 1}[heads_of]
    mask = rng.random((b, mh, sq, sk)) < 0.7
    bias = rng.standard_normal((1, mh, sq, sk))
    out, _ = run(q, k, v, attn_mask=mask, attn_bias=bias)
    close(out, sdpa(q, k, v, mask, bias))


CAUSAL_SHAPES = {"sq=sk": (13, 13), "sq<sk": (6, 19), "sq>sk": (19, 6), "sq=1": (1, 10)}


@pytest.mark.parametrize("sq,sk", list(CAUSAL_SHAPES.values()), ids=list(CAUSAL_SHAPES))
def test_causal_bottom_right(sq, sk):
    b, h, hk, d = 2, 4, 2, 16
    rng = rng_for("causal", sq, sk)
    q, k, v = make_qkv(rng, b, sq, sk, h, hk, d)
    bias = rng.standard_normal((b, 1, sq, sk))
    keep = positions(sq, sk, is_causal=True)
    i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
    np.testing.assert_array_equal(keep, j <= i + sk - sq)
    out, lse = run(q, k, v, attn_bias=bias, is_causal=True)
    close(out, sdpa(q, k, v, keep[None, None], bias))
    dead = ~keep.any(axis=1)  # rows above the diagonal when Sq > Sk
    assert np.all(out[:, dead] == 0)
    assert np.all(np.isneginf(lse[:, :, dead]))


WINDOWS = [(-1, -1), (0, 0), (2, -1), (-1, 1), (3, 2), (0, -1), (-1, 0), (5, 7)]


@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w[0]}_{w[1]}")
@pytest.mark.parametrize("is_causal", [False, True], ids=["nocausal", "causal"])
@pytest.mark.parametrize("sq,sk", [(11, 11), (5, 14), (14, 5)], ids=["sq=sk", "sq<sk", "sq>sk"])
def test_window_vs_sdpa(window, is_causal, sq, sk):
    b, h, hk, d = 1, 2, 1, 16
    rng = rng_for("window", window, is_causal, sq, sk)
    q, k, v = make_qkv(rng, b, sq, sk, h, hk, d)
    mask = rng.random((1, 1, sq, sk)) < 0.8
    keep = positions(sq, sk, is_causal, window)[None, None] & mask
    out, _ = run(q, k, v, attn_mask=mask, window_size=window, is_causal=is_causal)
    close(out, sdpa(q, k, v, keep))


@pytest.mark.parametrize("softcap", [0.5, 5.0, 30.0], ids=lambda c: f"cap{c}")
@pytest.mark.parametrize("scale", [None, 0.7], ids=["scale-default", "scale0.7"])
def test_softcap_explicit(softcap, scale):
    b, sq, sk, h, hk, d = 2, 9, 14, 4, 2, 32
    rng = rng_for("softcap", softcap, scale)
    q, k, v = make_qkv(rng, b, sq, sk, h, hk, d)
    q *= 3.0  # large logits, so the cap matters
    bias = rng.standard_normal((b, hk, 1, sk))
    mask = rng.random((1, h, sq, sk)) < 0.8
    want_out, want_lse = explicit_attention(q, k, v, keep=mask, bias=bias, scale=scale,
                                            softcap=softcap)
    out, _ = run(q, k, v, attn_mask=mask, attn_bias=bias, softmax_scale=scale, softcap=softcap)
    close(out, want_out)
    _, lse64 = ref64(q, k, v, mask, bias, scale=scale, softcap=softcap)
    close(lse64, want_lse)
    # and it really differs from the uncapped result
    assert not np.allclose(out, sdpa(q, k, v, mask, bias, scale=scale), atol=1e-3)


@pytest.mark.parametrize("scale", [0.05, 0.3, 1.0, 2.5, -0.4], ids=lambda s: f"s{s}")
def test_softmax_scale_vs_sdpa(scale):
    b, sq, sk, h, hk, d = 1, 8, 10, 2, 2, 24
    rng = rng_for("scale", scale)
    q, k, v = make_qkv(rng, b, sq, sk, h, hk, d)
    out, _ = run(q, k, v, softmax_scale=scale)
    close(out, sdpa(q, k, v, scale=scale))


def test_default_scale_is_inv_sqrt_d():
    rng = rng_for("default-scale")
    q, k, v = make_qkv(rng, 1, 6, 9, 2, 1, 40)
    out_default, _ = run(q, k, v)
    out_explicit, _ = run(q, k, v, softmax_scale=1.0 / np.sqrt(40))
    close(out_default, out_explicit, atol=0, rtol=0)


@pytest.mark.parametrize("inputs", ["plain", "mask", "bias", "causal", "window"])
def test_lse_vs_logsumexp(inputs):
    b, sq, sk, h, hk, d = 2, 10, 15, 4, 2, 16
    rng = rng_for("lse", inputs)
    q, k, v = make_qkv(rng, b, sq, sk, h, hk, d)
    mask = rng.random((b, 1, sq, sk)) < 0.6 if inputs == "mask" else None
    bias = 3.0 * rng.standard_normal((1, h, sq, sk)) if inputs == "bias" else None
    is_causal = inputs == "causal"
    window = (3, 1) if inputs == "window" else (-1, -1)
    keep = positions(sq, sk, is_causal, window)[None, None]
    if mask is not None:
        keep = keep & mask
    s = explicit_scores(q, k, keep=keep, bias=bias)
    want = torch.logsumexp(torch.from_numpy(s), dim=-1).numpy()
    _, lse64 = ref64(q, k, v, mask, bias, is_causal=is_causal, window=window)
    assert lse64.shape == (b, h, sq)
    close(lse64, want)
    _, lse32 = run(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=is_causal,
                   window_size=window)
    assert lse32.dtype == np.float32 and lse32.shape == (b, h, sq)
    close(lse32, want, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("how", ["mask-rows", "mask-heads", "window", "causal-sq>sk", "all"])
def test_fully_masked_rows(how):
    b, sq, sk, h, hk, d = 2, 9, 6, 4, 2, 16
    rng = rng_for("dead", how)
    q, k, v = make_qkv(rng, b, sq, sk, h, hk, d)
    bias = rng.standard_normal((b, h, sq, sk))
    mask = rng.random((b, h, sq, sk)) < 0.7
    kw = {"attn_bias": bias, "attn_mask": mask}
    if how == "mask-rows":
        mask[:, :, [0, 4, 8]] = False
    elif how == "mask-heads":
        mask[1, 2] = False
    elif how == "window":
        kw["window_size"] = (0, 0)
        mask[:, :, :, -1] = False  # row i's only key is j = i - 3: dead for i < 3 and i = 8
    elif how == "causal-sq>sk":
        kw["is_causal"] = True
    else:
        mask[:] = False
    keep = mask & positions(sq, sk, kw.get("is_causal", False), kw.get("window_size", (-1, -1)))
    dead = ~keep.any(axis=-1)
    assert dead.any()
    out, lse = run(q, k, v, **kw)
    dead_bqh = np.transpose(dead, (0, 2, 1))
    assert np.all(out[dead_bqh] == 0)
    assert np.all(np.isneginf(lse[dead]))
    assert np.all(np.isfinite(lse[~dead]))
    close(out, sdpa(q, k, v, keep, bias))


@pytest.mark.parametrize("low", [np.finfo(np.float32).min, -2.4e38], ids=["f32min", "edge"])
def test_logits_below_lowest_logit_are_excluded(low):
    """A logit below LOWEST_LOGIT (-FLT_MAX / log2 e; a bias of finfo.min) counts as masked:
    such keys weigh 0, a row of only such keys is 0 with lse -inf, and the backward gives those
    positions (and such a row) zero gradients; a bias just above it is an ordinary logit."""
    b, sq, sk, h, hk, d = 2, 5, 7, 2, 1, 8
    rng = rng_for("lowest", float(low))
    q, k, v = make_qkv(rng, b, sq, sk, h, hk, d)
    bias = rng.standard_normal((b, h, sq, sk))
    bias[0] = low                                  # batch 0: every key
    bias[1, :, :, ::2] = low                       # batch 1: the even keys
    out, lse = run(q, k, v, attn_bias=bias)
    assert np.all(out[0] == 0) and np.all(np.isneginf(lse[0]))
    keep = np.ones((b, h, sq, sk), bool)
    keep[1, :, :, ::2] = False
    close(out[1:], sdpa(q[1:], k[1:], v[1:], keep[1:], bias[1:]))
    dout = rng.standard_normal(q.shape)
    dq, dk, dv, db = dense_backward(q, k, v, None, bias, dout, d ** -0.5)
    assert np.all(dq[0] == 0) and np.all(db[0] == 0) and np.all(db[1, :, :, ::2] == 0)
    assert np.isfinite(dq).all() and np.isfinite(db).all()
    near = np.full((1, h, sq, sk), reference.LOWEST_LOGIT * 0.999)  # just above: kept
    out, lse = run(q[:1], k[:1], v[:1], attn_bias=near)
    assert np.all(np.isfinite(lse)) and np.all(lse < -2e38)
    close(out, np.broadcast_to(v[:1].mean(axis=1, keepdims=True), out.shape), rtol=1e-9)


@pytest.mark.parametrize("with_mask", [False, True], ids=["plain", "mask+bias"])
def test_seqlen_k_zero(with_mask):
    rng = rng_for("sk0", with_mask)
    q, k, v = make_qkv(rng, 2, 5, 0, 4, 2, 16)
    kw = {}
    if with_mask:
        kw = {"attn_mask": np.ones((2, 4, 5, 0), bool), "attn_bias": np.zeros((1, 1, 5, 1))}
    out, lse = run(q, k, v, is_causal=True, **kw)
    assert out.shape == (2, 5, 4, 16) and lse.shape == (2, 4, 5)
    assert np.all(out == 0) and np.all(np.isneginf(lse))


# ----------------------------------------------------------------------------- low precision


def test_quantize_bfloat16_vs_torch():
    rng = rng_for("bf16")
    x = np.concatenate([
        rng.standard_normal(4000) * 10.0 ** rng.integers(-40, 39, 4000),
        [0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.39e38, 1e-40, -1e-42, 1.0, 65504.0],
    ])
    # exact ties in float32: lower 16 bits 0x8000 with even and odd upper halves
    bits = (rng.integers(0x3F000000, 0x47000000, 200, dtype=np.uint32) & 0xFFFF0000) | 0x8000
    x32 = np.concatenate([x.astype(np.float32), bits.view(np.float32)])
    want = torch.from_numpy(x32).to(torch.bfloat16).double().numpy()
    got = reference.quantize(x32.astype(np.float64), "bfloat16")
    np.testing.assert_array_equal(got, want)
    nan = reference.quantize(np.array([np.nan]), "bfloat16")
    assert np.isnan(nan).all()


def test_quantize_float16_vs_torch():
    rng = rng_for("fp16")
    x = np.concatenate([rng.standard_normal(4000) * 10.0 ** rng.integers(-9, 6, 4000),
                        [0.0, 65504.0, 65520.0, -1e6, 6e-8, np.inf]])
    want = torch.from_numpy(x).to(torch.float16).double().numpy()
    with np.errstate(over="ignore"):
        got = reference.quantize(x, "float16")
    np.testing.assert_array_equal(got, want)


def test_quantize_identity_and_float32():
    x = rng_for("q32").standard_normal(100)
    assert reference.quantize(x, None) is x
    assert reference.quantize(x, "float64") is x
    np.testing.assert_array_equal(reference.quantize(x, "float32"),
                                  x.astype(np.float32).astype(np.float64))
    with pytest.raises(ValueError, match="unknown precision"):
        reference.quantize(x, "int8")


@pytest.mark.parametrize("lowprec,tol", [("bfloat16", 5e-2), ("float16", 5e-3)],
                         ids=["bf16", "fp16"])
@pytest.mark.parametrize("inputs", ["plain", "mask+bias+causal"])
def test_lowprec_close_not_equal(lowprec, tol, inputs):
    b, sq, sk, h, hk, d = 2, 16, 24, 4, 2, 64
    rng = rng_for("lowprec", lowprec, inputs)
    q, k, v = make_qkv(rng, b, sq, sk, h, hk, d)
    mask = bias = None
    window = (-1, -1)
    if inputs != "plain":
        mask = rng.random((b, 1, sq, sk)) < 0.8
        bias = rng.standard_normal((1, h, sq, sk))
        window = (-1, 0)
    scale = 1.0 / np.sqrt(d)
    out64, lse64 = reference.dense_forward(q, k, v, mask, bias, scale, 0.0, window)
    outlp, lselp = reference.dense_forward(q, k, v, mask, bias, scale, 0.0, window,
                                           lowprec=lowprec)
    err = np.abs(outlp - out64).max()
    assert 0 < err < tol
    np.testing.assert_array_equal(reference.quantize(outlp, lowprec), outlp)
    close(lselp, lse64, atol=tol, rtol=0)


# ----------------------------------------------------------------------------- sparse masks


def _sparse_cases():
    rng = rng_for("sparse-dense")
    sq, sk = 21, 34
    dense2 = rng.random((sq, sk)) < 0.4
    dense2[:, :9] = False  # some empty blocks
    dense_bh = rng.random((2, 1, sq, sk)) < 0.5
    dense_h = rng.random((1, 4, sq, sk)) < 0.5
    return {
        "causal": dm.CausalMask(sq, sk),
        "window-int": dm.WindowMask(5, sq, sk),
        "window-pair": dm.WindowMask((4, 2), sq, sk),
        "bitset": dm.BlockBitsetMask.from_dense_mask(dense2, block_size=(8, 8)),
        "bitset-batch": dm.BlockBitsetMask.from_dense_mask(dense_bh, block_size=(16, 8)),
        "mixed": dm.MixedMask.from_dense_mask(dense2, block_size=(8, 16)),
        "mixed-heads": dm.MixedMask.from_dense_mask(dense_h, block_size=(8, 8)),
    }


SPARSE = _sparse_cases()


@pytest.mark.parametrize("mask", list(SPARSE.values()), ids=list(SPARSE))
@pytest.mark.parametrize("extra", ["alone", "with-mask-bias"])
def test_sparse_mask_equals_dense(mask, extra):
    b, sq, sk, h, hk, d = 2, 21, 34, 4, 2, 16
    rng = rng_for("sparse", repr(mask), extra)
    q, k, v = make_qkv(rng, b, sq, sk, h, hk, d)
    dense = mask.to_dense()
    dense4 = dense[None, None] if dense.ndim == 2 else dense
    kw = {}
    if extra != "alone":
        kw = {"attn_mask": rng.random((b, hk, sq, sk)) < 0.8,
              "attn_bias": rng.standard_normal((1, h, 1, sk))}
    got, got_lse = run(q, k, v, sparse_mask=mask, **kw)
    both = dense4 if "attn_mask" not in kw else dense4 & heads_up(kw["attn_mask"], h)
    want, want_lse = run(q, k, v, attn_mask=np.ascontiguousarray(both),
                         attn_bias=kw.get("attn_bias"))
    close(got, want, atol=0, rtol=0)
    close(got_lse, want_lse, atol=0, rtol=0)
    close(got, sdpa(q, k, v, both, kw.get("attn_bias")))


# ----------------------------------------------------------------------------- varlen


def cu(lens) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def seq_slice(x, qs, qe, ks, ke):
    """A varlen mask/bias of either layout as a dense 4-D (1, h', len_q|1, len_k) array."""
    if x is None:
        return None
    if x.ndim == 3:
        return np.transpose(x[qs:qe, :, : ke - ks], (1, 0, 2))[None]
    return np.transpose(x[ks:ke], (1, 0))[None, :, None, :]


def varlen_by_dense(q, k, v, lens_q, lens_k, mask=None, bias=None, **kw):
    """Per-sequence dense reference calls, packed back; lse (H, total_q) in float64."""
    total_q, h, d = q.shape
    out = np.full((total_q, h, d), np.nan)
    lse = np.full((h, total_q), np.nan)
    cq, ck = cu(lens_q), cu(lens_k)
    for bi in range(len(lens_q)):
        qs, qe, ks, ke = cq[bi], cq[bi + 1], ck[bi], ck[bi + 1]
        if qe == qs:
            continue
        o, ls = ref64(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke],
                      seq_slice(mask, qs, qe, ks, ke), seq_slice(bias, qs, qe, ks, ke), **kw)
        out[qs:qe], lse[:, qs:qe] = o[0], ls[0]
    return out, lse


def run_varlen(q, k, v, lens_q, lens_k, **kw):
    out, lse = dm.flash_dmattn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q),
                                           max(lens_k), return_lse=True, **kw)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    return out, lse


def make_layout(rng, layout, kind, heads, lens_q, lens_k):
    tq, tk, mk = sum(lens_q), sum(lens_k), max(lens_k)
    if layout == "none":
        return None
    shape = (tq, heads, mk) if layout == "query" else (tk, heads)
    if kind == "mask":
        return rng.random(shape) < 0.7
    return rng.standard_normal(shape)


LENS = {
    "mixed": ((5, 0, 7, 3, 1), (6, 4, 2, 0, 9)),
    "all-nonempty": ((4, 8), (8, 4)),
    "one-seq": ((9,), (13,)),
}


@pytest.mark.parametrize("mask_layout", ["none", "query", "key"], ids=lambda x: f"mask-{x}")
@pytest.mark.parametrize("bias_layout", ["none", "query", "key"], ids=lambda x: f"bias-{x}")
@pytest.mark.parametrize("heads_of", ["1", "Hk", "H"], ids=lambda x: f"h'={x}")
def test_varlen_vs_dense(mask_layout, bias_layout, heads_of):
    h, hk, d = 4, 2, 16
    lens_q, lens_k = LENS["mixed"]
    rng = rng_for("varlen", mask_layout, bias_layout, heads_of)
    q = rng.standard_normal((sum(lens_q), h, d))
    k = rng.standard_normal((sum(lens_k), hk, d))
    v = rng.standard_normal((sum(lens_k), hk, d))
    mh = {"1": 1, "Hk": hk, "H": h}[heads_of]
    bh = {"1": h, "Hk": 1, "H": hk}[heads_of]  # a different h' for the bias
    mask = make_layout(rng, mask_layout, "mask", mh, lens_q, lens_k)
    bias = make_layout(rng, bias_layout, "bias", bh, lens_q, lens_k)
    out, lse = run_varlen(q, k, v, lens_q, lens_k, attn_mask=mask, attn_bias=bias)
    want, want_lse = varlen_by_dense(q, k, v, lens_q, lens_k, mask, bias)
    assert out.shape == q.shape and lse.shape == (h, sum(lens_q)) and lse.dtype == np.float32
    close(out, want)
    close(lse, want_lse, atol=1e-5, rtol=1e-6)
    # rows of the sequence with len_k = 0: zero output and -inf lse
    cq = cu(lens_q)
    dead = slice(cq[3], cq[4])
    assert np.all(out[dead] == 0) and np.all(np.isneginf(lse[:, dead]))


@pytest.mark.parametrize("lens", list(LENS.values()), ids=list(LENS))
@pytest.mark.parametrize("is_causal", [False, True], ids=["nocausal", "causal"])
@pytest.mark.parametrize("window", [(-1, -1), (2, 1), (0, -1)], ids=["nowin", "w2_1", "w0_-1"])
def test_varlen_causal_window_per_sequence(lens, is_causal, window):
    """Causal/window bottom-right within each sequence (len_q > len_k and len_q < len_k)."""
    lens_q, lens_k = lens
    h, hk, d = 2, 1, 16
    rng = rng_for("varlen-causal", lens, is_causal, window)
    q = rng.standard_normal((sum(lens_q), h, d))
    k = rng.standard_normal((sum(lens_k), hk, d))
    v = rng.standard_normal((sum(lens_k), hk, d))
    bias = rng.standard_normal((sum(lens_k), 1))
    out, lse = run_varlen(q, k, v, lens_q, lens_k, attn_bias=bias, is_causal=is_causal,
                          window_size=window)
    want, want_lse = varlen_by_dense(q, k, v, lens_q, lens_k, None, bias, is_causal=is_causal,
                                     window=window)
    close(out, want)
    close(lse, want_lse, atol=1e-5, rtol=1e-6)
    # independent check of one sequence against SDPA with an explicit bottom-right mask
    cq, ck = cu(lens_q), cu(lens_k)
    bi = int(np.argmax(np.array(lens_q) * np.array(lens_k) > 0))
    qs, qe, ks, ke = cq[bi], cq[bi + 1], ck[bi], ck[bi + 1]
    keep = positions(qe - qs, ke - ks, is_causal, window)[None, None]
    bias4 = bias[ks:ke].T[None, :, None, :]
    close(out[qs:qe], sdpa(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], keep, bias4)[0])


def test_varlen_all_empty_and_empty_k():
    h, hk, d = 2, 2, 8
    rng = rng_for("varlen-empty")
    lens_q, lens_k = (0, 3, 0), (4, 0, 0)
    q = rng.standard_normal((3, h, d))
    k = rng.standard_normal((4, hk, d))
    out, lse = run_varlen(q, k, k.copy(), lens_q, lens_k, attn_mask=np.ones((4, 1), bool))
    assert out.shape == (3, h, d) and lse.shape == (h, 3)
    assert np.all(out == 0) and np.all(np.isneginf(lse))
    q0 = np.zeros((0, h, d))
    out0, lse0 = run_varlen(q0, k, k.copy(), (0, 0), (4, 0))
    assert out0.shape == (0, h, d) and lse0.shape == (h, 0)


@pytest.mark.parametrize("kind", ["mask", "bias"])
@pytest.mark.parametrize("heads_of", ["1", "Hk", "H"], ids=lambda x: f"h'={x}")
def test_varlen_key_based_equals_broadcast_query_based(kind, heads_of):
    h, hk, d = 4, 2, 16
    lens_q, lens_k = LENS["mixed"]
    tq, tk, mk = sum(lens_q), sum(lens_k), max(lens_k)
    rng = rng_for("kb-vs-qb", kind, heads_of)
    q = rng.standard_normal((tq, h, d))
    k = rng.standard_normal((tk, hk, d))
    v = rng.standard_normal((tk, hk, d))
    hh = {"1": 1, "Hk": hk, "H": h}[heads_of]
    kb = make_layout(rng, "key", kind, hh, lens_q, lens_k)
    # the query-based layout, with garbage past len_k(b) that must be ignored
    qb = (rng.random((tq, hh, mk)) < 0.5) if kind == "mask" else np.full((tq, hh, mk), 1e30)
    cq, ck = cu(lens_q), cu(lens_k)
    for bi in range(len(lens_q)):
        lk = ck[bi + 1] - ck[bi]
        qb[cq[bi]:cq[bi + 1], :, :lk] = kb[ck[bi]:ck[bi + 1]].T[None]
    name = "attn_mask" if kind == "mask" else "attn_bias"
    out_kb, lse_kb = run_varlen(q, k, v, lens_q, lens_k, is_causal=True, **{name: kb})
    out_qb, lse_qb = run_varlen(q, k, v, lens_q, lens_k, is_causal=True, **{name: qb})
    close(out_kb, out_qb)
    close(lse_kb, lse_qb, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- output types


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=str)
def test_numpy_output_type(dtype):
    rng = rng_for("otype-np", dtype)
    q, k, v = make_qkv(rng, 1, 4, 6, 2, 1, 8, dtype)
    out, lse = dm.flash_dmattn_func(q, k, v, return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == q.shape
    assert isinstance(lse, np.ndarray) and lse.dtype == np.float32
    want = sdpa(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    close(out, want.astype(dtype), atol=2e-3 if dtype == np.float16 else 1e-6, rtol=0)
    vout = dm.flash_dmattn_varlen_func(q[0], k[0], v[0], cu([4]), cu([6]), 4, 6)
    assert isinstance(vout, np.ndarray) and vout.dtype == dtype
    close(vout, out[0], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_torch_cpu_output_type(dtype):
    rng = rng_for("otype-torch", str(dtype))
    q, k, v = make_qkv(rng, 2, 5, 7, 4, 2, 16)
    tq, tk, tv = (torch.from_numpy(x).to(dtype) for x in (q, k, v))
    bias = torch.from_numpy(rng.standard_normal((1, 1, 5, 7))).to(dtype)
    out, lse = dm.flash_dmattn_func(tq, tk, tv, attn_bias=bias, return_lse=True,
                                    backend="reference")
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.device == tq.device
    assert isinstance(lse, torch.Tensor) and lse.dtype == torch.float32
    assert tuple(out.shape) == q.shape and tuple(lse.shape) == (2, 4, 5)
    want = sdpa(tq.double().numpy(), tk.double().numpy(), tv.double().numpy(),
                bias=bias.double().numpy())
    close(out.double().numpy(), torch.from_numpy(want).to(dtype).double().numpy(),
          atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=0)
    vout = dm.flash_dmattn_varlen_func(tq[0], tk[0], tv[0], torch.from_numpy(cu([5])),
                                       torch.from_numpy(cu([7])), 5, 7, backend="reference")
    assert isinstance(vout, torch.Tensor) and vout.dtype == dtype


@pytest.mark.parametrize("lowprec", ["bfloat16", "float16"])
def test_key_block_rounding_is_each_blocks_own(lowprec):
    """``key_block``: P rounded against each key block's max, rescaled to the row's max after
    rounding; a block as long as the row is the plain reference, and so is no ``lowprec``."""
    rng = rng_for("key_block", lowprec)
    q, k, v = make_qkv(rng, 1, 3, 37, 2, 2, 8)
    mask = rng.random((1, 2, 3, 37)) < 0.7
    mask[0, 0, 0] = False   # a row with no key
    mask[0, 1, 1, 16:32] = False   # a block with no key
    kw = dict(mask=mask, bias=None, scale=0.9)
    plain = reference.dense_forward(q, k, v, **kw, lowprec=lowprec)
    for kb in (37, 64):
        np.testing.assert_array_equal(
            reference.dense_forward(q, k, v, **kw, lowprec=lowprec, key_block=kb)[0], plain[0])
    exact = reference.dense_forward(q, k, v, **kw)
    np.testing.assert_array_equal(reference.dense_forward(q, k, v, **kw, key_block=16)[0],
                                  exact[0])
    got, lse = reference.dense_forward(q, k, v, **kw, lowprec=lowprec, key_block=16)
    np.testing.assert_array_equal(lse, plain[1])
    qq, kq, vq = (reference.quantize(x, lowprec) for x in (q, k, v))
    for h in range(2):
        for i in range(3):
            s = reference.quantize(qq[0, i, h] @ kq[0, :, h].T * 0.9, "float32")
            s = np.where(mask[0, h, i], s, -np.inf)
            if not mask[0, h, i].any():
                assert (got[0, i, h] == 0).all()
                continue
            m = s.max()
            num = np.zeros(8)
            for j in range(0, 37, 16):
                sb = s[j:j + 16]
                if np.isneginf(sb).all():
                    continue
                mb = sb.max()
                num += (reference.quantize(np.exp(sb - mb), lowprec) * np.exp(mb - m)) @ vq[
                    0, j:j + 16, h]
            want = reference.quantize(num / np.exp(s - m).sum(), lowprec)
            np.testing.assert_allclose(got[0, i, h], want, rtol=0, atol=1e-12)
    assert np.abs(got - plain[0]).max() > 0   # the orders differ somewhere
