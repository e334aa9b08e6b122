"""A bias broadcast over keys ((.., Sq, 1) or a scalar) under DMATTN_FWD_ROW_BIAS=1: the Hopper
forward without it, then the lse shift (cuda_src/fwd_row_bias.cu), against the float64
reference: every such layout and bias dtype, head dims 64/128/256, causal, window and softcap,
lse returned or not; the values that are not a plain shift (NaN, +-inf, below LOWEST_LOGIT,
a row the mask drops) as the reference backend has them; gradients as with the portable
forward (the switch off); the Hopper backward without the bias, on lse minus it, against
float64 autograd."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import assert_fa_close, f64
from test_backward import _attention, _check_grads, _run_dense
from test_kvcache import record_launch_families

import dmattn_cupy as dm
from dmattn_cupy import backward
from dmattn_cupy.forward_sm90 import item_order_items

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("hopper_only")]

B, H, HK, SQ, SK = 2, 4, 2, 150, 256
SHAPES = {"rows": (B, H, SQ, 1), "rows_b1": (1, H, SQ, 1), "rows_h1": (B, 1, SQ, 1),
          "scalar": (1, 1, 1, 1)}


@pytest.fixture(autouse=True)
def shift_on(monkeypatch):
    monkeypatch.setenv("DMATTN_FWD_ROW_BIAS", "1")


def _qkv(d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, s, n, d, generator=g).to("cuda", dtype)
                 for s, n in ((SQ, H), (SK, HK), (SK, HK)))


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"window_size": (40, 8)},
                                {"softcap": 15.0}], ids=str)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32], ids=["qdtype", "fp32"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("d", [64, 128, 256])
def test_shift_matches_the_reference(d, shape, bias_dtype, kw, monkeypatch):
    q, k, v = _qkv(d, seed=d + len(shape))
    g = torch.Generator().manual_seed(3)
    bias = (8 * torch.randn(*SHAPES[shape], generator=g)).to("cuda", bias_dtype or q.dtype)
    families = record_launch_families(monkeypatch)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_bias=bias, return_lse=True, **kw)
    torch.cuda.synchronize()
    assert families == ["fwd_sm90", "fwd_row_bias"], families
    window = list(kw.get("window_size", (-1, -1)))
    if kw.get("is_causal"):
        window[1] = 0
    assert_fa_close(out, lse, dict(q=f64(q), k=f64(k), v=f64(v), mask=None, bias=f64(bias),
                                   scale=d ** -0.5, softcap=kw.get("softcap", 0.0),
                                   window=tuple(window)), "bfloat16")
    again = dm.flash_dmattn_func(q, k, v, attn_bias=bias, **kw)   # lse made for the shift only
    torch.cuda.synchronize()
    assert torch.equal(again, out)


@pytest.mark.parametrize("mask_heads", [1, H], ids=["shared_mask", "own_mask"])
def test_shift_beside_a_mask(mask_heads, monkeypatch):
    """Beside an attn_mask: a shared one takes the route's block lists, a mask of its own per
    (batch, head) its bytes (no bias tile left beside it); the shift follows either."""
    q, k, v = _qkv(128, seed=21)
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(B, mask_heads, SQ, SK, generator=g) > 0.3).cuda()
    mask[..., 5, :] = False                       # a row with no allowed key
    bias = (4 * torch.randn(B, H, SQ, 1, generator=g)).to("cuda", torch.bfloat16)
    families = record_launch_families(monkeypatch)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, return_lse=True)
    torch.cuda.synchronize()
    routed = ["mask_pack", "mask_lists"] if mask_heads == 1 else []
    if mask_heads == 1 and item_order_items(SQ, H, B, False, (-1, -1), True):
        routed.append("fwd_order")                # the lists' items ranked longest first
    assert families == [*routed, "fwd_sm90", "fwd_row_bias"], families
    assert_fa_close(out, lse, dict(q=f64(q), k=f64(k), v=f64(v), mask=f64(mask),
                                   bias=f64(bias), scale=128 ** -0.5), "bfloat16")


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}], ids=str)
def test_shift_beside_a_block_mask(kw, monkeypatch):
    """Beside a block mask of whole 128 x 128 blocks (a row block of no kept block included:
    lse -inf, out 0, which the shift keeps): the Hopper forward walks the lists without the
    bias, then the shift."""
    q, k, v = _qkv(128, seed=23)
    g = torch.Generator().manual_seed(24)
    bias = (4 * torch.randn(B, H, SQ, 1, generator=g)).to("cuda", torch.bfloat16)
    pattern = np.array([[True, True], [False, False]])
    sparse = dm.BlockBitsetMask(pattern, SQ, SK, block_size=(128, 128))
    families = record_launch_families(monkeypatch)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_bias=bias, sparse_mask=sparse,
                                    return_lse=True, **kw)
    torch.cuda.synchronize()
    assert families[-2:] == ["fwd_sm90", "fwd_row_bias"], families
    assert set(families[:-2]) <= {"fwd_order"}, families
    assert torch.isneginf(lse[:, :, 128:]).all() and (out[:, 128:] == 0).all()
    keep = np.broadcast_to(np.asarray(sparse.to_dense(), dtype=bool), (1, 1, SQ, SK))
    assert_fa_close(out, lse, dict(q=f64(q), k=f64(k), v=f64(v), mask=keep, bias=f64(bias),
                                   scale=128 ** -0.5, window=(-1, 0) if kw else (-1, -1)),
                    "bfloat16")


def test_values_that_are_not_a_shift_match_the_reference_backend(monkeypatch):
    """NaN and +inf make the row NaN; -inf and -3e38 (below LOWEST_LOGIT) drop it (out 0, lse
    -inf); a row the mask drops stays dropped under a NaN; the rest shift."""
    q, k, v = _qkv(128, seed=5)
    bias = torch.zeros(B, H, SQ, 1, device="cuda", dtype=torch.float32)
    specials = (float("nan"), float("inf"), float("-inf"), -3e38, 1e4, -1e4)
    for i, x in enumerate(specials):
        bias[0, 1, i] = x
    bias[1, 2, 9] = float("nan")
    mask = torch.ones(B, H, SQ, SK, device="cuda", dtype=torch.bool)
    mask[1, 2, 9] = False
    families = record_launch_families(monkeypatch)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, return_lse=True)
    assert families == ["fwd_sm90", "fwd_row_bias"], families   # the shift took these values
    ref, ref_lse = dm.flash_dmattn_func(q.cpu(), k.cpu(), v.cpu(), attn_mask=mask.cpu(),
                                        attn_bias=bias.cpu(), return_lse=True,
                                        backend="reference")
    torch.cuda.synchronize()
    o, lo, r, rl = (x.float().cpu() for x in (out, lse, ref, ref_lse))
    assert torch.equal(torch.isnan(o), torch.isnan(r)) and torch.equal(torch.isnan(lo),
                                                                        torch.isnan(rl))
    assert torch.isnan(o[0, 0, 1]).all() and torch.isnan(o[0, 1, 1]).all()
    for b, i, h in ((0, 2, 1), (0, 3, 1), (1, 9, 2)):
        assert (o[b, i, h] == 0).all() and torch.isneginf(lo[b, h, i])
    fin = torch.isfinite(rl)
    assert torch.allclose(lo[fin], rl[fin], rtol=1e-5, atol=2e-3)
    ok = ~torch.isnan(r)
    assert torch.allclose(o[ok], r[ok], atol=2e-2)


@pytest.mark.parametrize("shape", ["rows", "scalar"])
def test_gradients_match_the_portable_forward(shape, monkeypatch):
    """fwd+bwd with lse in the loss, with the shift and with the switch off (the portable
    forward): each one's q/k/v gradients by FlashAttention's rule against float64 autograd, and
    dbias the sum of dlse over the rows each bias value serves (out does not depend on it)."""
    q, k, v = _qkv(64, seed=11)
    g = torch.Generator().manual_seed(12)
    bias = torch.randn(*SHAPES[shape], generator=g).to("cuda", torch.float32)
    dout = torch.randn(q.shape, generator=g).to(q)
    dlse = torch.randn(B, H, SQ, generator=g).cuda()
    want = dlse.unsqueeze(-1) if shape == "rows" else dlse.sum().reshape(1, 1, 1, 1)

    def dense(q_, k_, v_, _none):   # (out, lse rows) of the dense formulation, this bias
        return _attention(q_, k_, v_, None, bias, 64 ** -0.5, 0.0, (-1, -1), with_lse=True)

    for switch in ("1", "0"):
        monkeypatch.setenv("DMATTN_FWD_ROW_BIAS", switch)
        leaves = [x.clone().requires_grad_() for x in (q, k, v, bias)]
        families = record_launch_families(monkeypatch)
        out, lse = dm.flash_dmattn_func(*leaves[:3], attn_bias=leaves[3], return_lse=True)
        assert ("fwd_row_bias" in families) == (switch == "1"), families
        got = torch.autograd.grad((out, lse), leaves, (dout, dlse))
        torch.testing.assert_close(got[3], want, rtol=8e-3, atol=8e-3)
        _check_grads(list(got[:3]) + [None], [q, k, v, None], (dout, dlse.transpose(1, 2)),
                     dense, lse_fn=dense, stored_out=out.detach())


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"softcap": 15.0}], ids=str)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32], ids=["qdtype", "fp32"])
@pytest.mark.parametrize("shape", ["rows", "rows_hk", "scalar"])
def test_backward_runs_on_hopper_without_the_bias(shape, bias_dtype, kw, deterministic):
    """fwd+bwd with a bias of one value per query row: the Hopper backward runs without it, on
    lse minus the row's value (backward.py, unshift); gradients by FlashAttention's rule
    against float64 autograd of the dense formulation, a row dropped by a -inf bias included."""
    q, k, v = _qkv(128, seed=31)
    shapes = {"rows": (B, H, SQ, 1), "rows_hk": (B, HK, SQ, 1), "scalar": (1, 1, 1, 1)}
    g = torch.Generator().manual_seed(32)
    bias = (4 * torch.randn(*shapes[shape], generator=g)).to("cuda", bias_dtype or q.dtype)
    if shape == "rows":
        bias[1, 2, 7] = float("-inf")
    before = dict(backward.launches)
    _run_dense(q, k, v, bias=bias, seed=33, deterministic=deterministic, **kw)
    ran = {f: backward.launches[f] - before.get(f, 0) for f in ("bwd_sm90", "bwd_dkdv")}
    assert ran == {"bwd_sm90": 1, "bwd_dkdv": 0}, ran


@pytest.mark.parametrize("with_mask", ["attn_mask", "block_mask"])
def test_backward_without_the_bias_beside_a_mask(with_mask):
    """The unshift beside an attn_mask (a row of no allowed key included) and beside a block
    mask of whole 128 x 128 blocks (block lists on the Hopper backward): gradients by
    FlashAttention's rule, on the Hopper backward."""
    q, k, v = _qkv(128, seed=41)
    g = torch.Generator().manual_seed(42)
    bias = (4 * torch.randn(B, H, SQ, 1, generator=g)).to("cuda", q.dtype)
    kw = {}
    if with_mask == "attn_mask":
        mask = (torch.rand(B, H, SQ, SK, generator=g) > 0.3).cuda()
        mask[0, 1, 5] = False
        kw["mask"] = mask
    else:
        pattern = np.array([[True, False], [True, True]])
        kw["sparse_mask"] = dm.BlockBitsetMask(pattern, SQ, SK, block_size=(128, 128))
    before = dict(backward.launches)
    _run_dense(q, k, v, bias=bias, seed=43, **kw)
    ran = {f: backward.launches[f] - before.get(f, 0) for f in ("bwd_sm90", "bwd_dkdv")}
    assert ran == {"bwd_sm90": 1, "bwd_dkdv": 0}, ran
