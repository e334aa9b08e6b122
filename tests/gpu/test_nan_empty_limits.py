"""Issue 16's GPU-visible contract: NaN propagation (the CUDA kernels agree with the reference: a
NaN at an allowed position makes its row NaN; a fully masked row stays 0 with lse -inf), empty
inputs (B = 0, Sq = 0, Sk = 0) give empty/zero outputs, lse and gradients, int32 limits and an
unusable softcap raise a named ValueError before anything launches, and the GPU passes the
compute-capability gate."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import f64

import dmattn_cupy as dm
from dmattn_cupy import device_check
from dmattn_cupy.reference import LOWEST_LOGIT
from dmattn_cupy.reference_bwd import dense_backward

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


def test_device_passes_capability_gate():
    major, minor = device_check.require_supported_device(torch.cuda.current_device())
    assert (major, minor) >= (8, 0)
    assert (major, minor) == torch.cuda.get_device_capability()


def _inputs(b, sq, sk, h, hk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    q = torch.randn(b, sq, h, d, generator=g).to(dt)
    k = torch.randn(b, sk, hk, d, generator=g).to(dt)
    v = torch.randn(b, sk, hk, d, generator=g).to(dt)
    return q, k, v


def _check_nan_rows(out, lse, ref, ref_lse, masked_row):
    o, r = f64(out), f64(ref)
    nan_got = np.isnan(o).any(axis=-1)
    nan_ref = np.isnan(r).any(axis=-1)
    np.testing.assert_array_equal(nan_got, nan_ref)          # same rows are NaN
    assert nan_ref.any(), "the case must poison at least one row"
    fine = ~nan_ref
    assert np.isfinite(o[fine]).all()
    assert np.abs(o[fine] - r[fine]).max() < 5e-2
    assert np.all(o[:, masked_row] == 0)                       # fully masked row: 0, lse -inf
    assert np.all(np.isneginf(f64(lse)[:, :, masked_row]))
    np.testing.assert_array_equal(np.isnan(f64(lse)), np.isnan(f64(ref_lse)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("where", ["query", "key", "value", "bias", "query_masked_row"])
@pytest.mark.parametrize("sq,sk", [(150, 200), (3, 300)], ids=["prefill", "decode"])
def test_nan_propagates_like_reference(dtype, where, sq, sk):
    b, h, hk, d = 2, 4, 2, 64
    q, k, v = _inputs(b, sq, sk, h, hk, d, dtype)
    bias = torch.zeros(b, h, sq, sk, dtype=q.dtype)
    mask = torch.ones(b, 1, sq, sk, dtype=torch.bool)
    r = sq - 1                                    # fully masked row
    mask[:, :, r] = False
    if where == "query":
        q[0, 1, 0, 5] = float("nan")
    elif where == "key":
        k[1, 7, 1, 3] = float("nan")
    elif where == "value":
        v[0, 11, 0, 9] = float("nan")
    elif where == "bias":
        bias[1, 2, 0, 20] = float("nan")
    else:
        q[0, r, :, :] = float("nan")              # NaN only in a row that sees no key
        q[1, 0, 3, 0] = float("nan")
    ref, ref_lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias,
                                        return_lse=True, backend="reference")
    out, lse = dm.flash_dmattn_func(q.cuda(), k.cuda(), v.cuda(), attn_mask=mask.cuda(),
                                    attn_bias=bias.cuda(), return_lse=True)
    torch.cuda.synchronize()
    _check_nan_rows(out, lse, ref, ref_lse, r)


def _lowest_bias(b, h, sq, sk, layout, dtype):
    """A bias whose batch 0 is all finfo(dtype).min and batch 1 has it on every other key."""
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(b, h, sq if layout == "tile" else 1, sk, generator=g)
    low = torch.finfo(getattr(torch, dtype)).min
    bias[0] = low
    bias[1, :, :, ::2] = low
    return bias.to(getattr(torch, dtype))


@pytest.mark.parametrize("bias_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("layout", ["tile", "key_row"])
@pytest.mark.parametrize("sq,sk", [(150, 200), (3, 300)], ids=["prefill", "decode"])
def test_lowest_bias_excludes_its_key(bias_dtype, layout, sq, sk):
    """A bias of finfo(bfloat16|float32).min (transformers' additive padding) is below
    LOWEST_LOGIT, so its key counts as masked (docs/api.md): a row of only such keys gives out 0
    and lse -inf, as the reference does, and a row with ordinary keys ignores the rest."""
    b, h, hk, d = 2, 4, 2, 64
    q, k, v = _inputs(b, sq, sk, h, hk, d, "bfloat16", seed=3)
    bias = _lowest_bias(b, h, sq, sk, layout, bias_dtype)
    assert float(bias.min()) < LOWEST_LOGIT
    ref, ref_lse = dm.flash_dmattn_func(q, k, v, attn_bias=bias, return_lse=True,
                                        backend="reference")
    out, lse = dm.flash_dmattn_func(q.cuda(), k.cuda(), v.cuda(), attn_bias=bias.cuda(),
                                    return_lse=True)
    torch.cuda.synchronize()
    o, r = f64(out), f64(ref)
    got_lse, want_lse = f64(lse), f64(ref_lse)
    assert np.isneginf(want_lse[0]).all() and np.isfinite(want_lse[1]).all()
    assert np.all(o[0] == 0) and np.isneginf(got_lse[0]).all()
    assert np.isfinite(o).all() and np.abs(o - r).max() < 5e-2
    np.testing.assert_allclose(got_lse[1], want_lse[1], rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("layout", ["tile", "key_row"])
def test_lowest_bias_backward(layout):
    """The backward agrees: keys at finfo.min get no gradient, rows of only such keys none at
    all, and the other rows match the float64 reference (no NaN from the extreme values)."""
    b, sq, sk, h, hk, d = 2, 150, 200, 4, 2, 64
    q, k, v = (x.cuda() for x in _inputs(b, sq, sk, h, hk, d, "bfloat16", seed=5))
    bias = _lowest_bias(b, h, sq, sk, layout, "bfloat16").cuda()
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(q)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, bias)]
    dm.flash_dmattn_func(*leaves[:3], attn_bias=leaves[3]).backward(dout)
    torch.cuda.synchronize()
    want = dense_backward(*(f64(x) for x in (q, k, v)), None, f64(bias),
                          f64(dout), d ** -0.5)
    for name, leaf, w in zip("q k v bias".split(), leaves, want, strict=True):
        g = f64(leaf.grad)
        assert np.isfinite(g).all(), f"d{name}: not finite"
        tol = 5e-2 * np.abs(w).max() + 1e-3
        assert np.abs(g - w).max() <= tol, f"d{name}: {np.abs(g - w).max():.3e} > {tol:.3e}"
    assert np.all(f64(leaves[0].grad)[0] == 0)          # batch 0: every key excluded
    db = f64(leaves[3].grad)
    assert np.all(db[0] == 0) and np.all(db[1, :, :, ::2] == 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_nan_causal_no_mask(dtype):
    q, k, v = _inputs(1, 130, 130, 2, 2, 128, dtype, seed=3)
    k[0, 70, 0, 0] = float("nan")                 # causal: rows >= 70 of heads 0 see it
    out = dm.flash_dmattn_func(q.cuda(), k.cuda(), v.cuda(), is_causal=True)
    nan_rows = np.isnan(f64(out)).any(axis=-1)[0]  # (Sq, H)
    want = np.zeros((130, 2), bool)
    want[70:, 0] = True
    np.testing.assert_array_equal(nan_rows, want)


def test_nan_varlen():
    q = torch.randn(10, 2, 64, dtype=torch.float16)
    k = torch.randn(12, 2, 64, dtype=torch.float16)
    v = torch.randn(12, 2, 64, dtype=torch.float16)
    k[8, 1, 0] = float("nan")                     # sequence 1, head 1
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32)
    out = dm.flash_dmattn_varlen_func(q.cuda(), k.cuda(), v.cuda(), cu_q.cuda(), cu_k.cuda(),
                                      6, 7)
    nan_rows = np.isnan(f64(out)).any(axis=-1)
    want = np.zeros((10, 2), bool)
    want[4:, 1] = True
    np.testing.assert_array_equal(nan_rows, want)


@pytest.mark.parametrize("lib", ["torch", "cupy"])
@pytest.mark.parametrize("b,sq,sk", [(0, 8, 8), (2, 0, 8), (2, 8, 0), (0, 0, 0)])
def test_empty_inputs(lib, b, sq, sk):
    q, k, v = (x.cuda() for x in _inputs(b, sq, sk, 4, 2, 64, "float16"))
    bias = torch.zeros(b, 4, sq, sk, dtype=torch.float16, device="cuda")
    if lib == "cupy":
        cupy = pytest.importorskip("cupy")
        q, k, v, bias = (cupy.from_dlpack(x) for x in (q, k, v, bias))
    out, lse = dm.flash_dmattn_func(q, k, v, attn_bias=bias, is_causal=True, return_lse=True)
    assert tuple(out.shape) == (b, sq, 4, 64) and tuple(lse.shape) == (b, 4, sq)
    assert not bool((out != 0).any()) and bool((lse == -np.inf).all())
    g = dm.flash_dmattn_backward(out, q, k, v, out, lse, attn_bias=bias)
    assert [tuple(x.shape) for x in g] == [tuple(x.shape) for x in (q, k, v, bias)]
    assert not any(bool((x != 0).any()) for x in g)


def test_empty_autograd_and_varlen():
    q = torch.randn(0, 16, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(0, 16, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dm.flash_dmattn_func(q, k, k).sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape
    qv = torch.zeros(0, 4, 64, device="cuda", dtype=torch.float16)
    cu = torch.zeros(3, dtype=torch.int32, device="cuda")
    out, lse = dm.flash_dmattn_varlen_func(qv, qv[:, :2], qv[:, :2], cu, cu, 0, 0,
                                           return_lse=True)
    assert out.shape == (0, 4, 64) and lse.shape == (4, 0)


def test_empty_batch_with_block_mask_autograd():
    b, sq, sk = 0, 128, 128       # (mask objects need seqlens >= 1; an empty batch is fine)
    q = torch.randn(b, sq, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    k = torch.randn(b, sk, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    bits = torch.ones(2, 2, dtype=torch.bool, device="cuda")
    mask = dm.BlockBitsetMask(bits, sq, sk, block_size=(64, 64))
    out = dm.flash_dmattn_func(q, k, k, sparse_mask=mask)
    assert out.shape == q.shape
    out.float().sum().backward()
    assert k.grad.shape == k.shape and not bool((k.grad != 0).any())


def test_limits_raise_before_launch():
    base = torch.zeros(1, 1, 1, 64, device="cuda", dtype=torch.float16)
    huge = base.expand(1, 2**31, 1, 64)           # stride 0: no memory
    small = base.expand(1, 4, 1, 64)
    with pytest.raises(ValueError, match=r"query seqlen"):
        dm.flash_dmattn_func(huge, small, small)
    with pytest.raises(ValueError, match=r"key seqlen"):
        dm.flash_dmattn_func(small, huge, huge)
    with pytest.raises(ValueError, match=r"window_size\[0\]"):
        dm.flash_dmattn_func(small, small, small, window_size=(2**31, 0))
    with pytest.raises(ValueError, match=r"softcap=1e-50 does not survive float32"):
        dm.flash_dmattn_func(small, small, small, softcap=1e-50)
