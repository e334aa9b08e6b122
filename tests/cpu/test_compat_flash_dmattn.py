"""CPU tests of ``dmattn_cupy.compat.flash_dmattn``: flash-dmattn 1.x call patterns (ported from
its documentation's usage examples, sizes shrunk) run unchanged on CPU torch tensors (reference
backend) and match an independent torch computation; the dynamic-mask helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dmattn_cupy.compat import flash_dmattn as fdm  # noqa: E402
from dmattn_cupy.compat.flash_dmattn import (  # noqa: E402
    create_mask,
    flash_dmattn_func,
    flash_dmattn_func_auto,
    flash_dmattn_varlen_func,
    topk_mask,
)


def sdpa(q, k, v, mask=None, bias=None, scale=None, causal=False):
    """Independent oracle: torch math in float64, (B, S, H, D) layout, GQA by repeat."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if bias is not None:
        b = bias.double()
        s = s + (b.repeat_interleave(rep, 1) if b.shape[1] not in (1, q.shape[1]) else b)
    sq, sk = s.shape[-2:]
    keep = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        keep = torch.ones(sq, sk).tril(sk - sq).bool()
    if mask is not None:
        m = mask.bool()
        keep = keep & (m.repeat_interleave(rep, 1) if m.shape[1] not in (1, q.shape[1]) else m)
    s = s.masked_fill(~keep, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)


def test_port_dynamic_mask_example():
    """flash-dmattn's 'Dynamic Mask Attention' example: a float 0/1 mask from top-k of a bias."""
    torch.manual_seed(0)
    B, H, L, D = 2, 3, 48, 32
    keep_window_size = 16
    q = torch.randn(B, L, H, D)
    k = torch.randn(B, L, H, D)
    v = torch.randn(B, L, H, D)
    attention_bias = torch.randn(B, H, L, L)
    attention_mask = torch.zeros_like(attention_bias)
    if L > keep_window_size:
        topk_indices = torch.topk(attention_bias, keep_window_size, dim=-1, largest=True).indices
        attention_mask.scatter_(-1, topk_indices, 1.0)
    else:
        attention_mask.fill_(1.0)
    attn = flash_dmattn_func_auto()
    output = attn(q, k, v, attn_mask=attention_mask, attn_bias=attention_bias, is_causal=True,
                  scale=1.0 / math.sqrt(D))
    ref = sdpa(q, k, v, attention_mask, attention_bias, 1.0 / math.sqrt(D), causal=True)
    assert output.shape == (B, L, H, D)
    assert torch.allclose(output.double(), ref, atol=1e-5)


def test_port_gqa_example_positional_and_grad():
    torch.manual_seed(1)
    B, L, H, H_kv, D = 2, 24, 4, 2, 16
    q = torch.randn(B, L, H, D, requires_grad=True)
    k = torch.randn(B, L, H_kv, D, requires_grad=True)
    v = torch.randn(B, L, H_kv, D, requires_grad=True)
    attn_mask = torch.ones(B, H, L, L)
    bias = torch.randn(B, H_kv, L, L, requires_grad=True)
    # flash-dmattn's positional order: mask, bias, softmax_scale, is_causal, softcap, determ.
    out = flash_dmattn_func(q, k, v, attn_mask, bias, None, True, None, None)
    ref = sdpa(q, k, v, attn_mask, bias, causal=True)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    out.sum().backward()
    qd, kd, vd, bd = (x.detach().double().requires_grad_() for x in (q, k, v, bias))
    sdpa(qd, kd, vd, attn_mask, bd, causal=True).sum().backward()
    for a, b in ((q, qd), (k, kd), (v, vd), (bias, bd)):
        assert torch.allclose(a.grad.double(), b.grad, atol=1e-4)


def test_softcap_positional_is_softcap():
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    a = flash_dmattn_func(q, k, v, None, None, None, False, 2.0)
    b = fdm.api.flash_dmattn_func(q, k, v, softcap=2.0)
    assert torch.equal(a, b)


def test_return_attn_probs_returns_out_lse_none():
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    out, lse, probs = flash_dmattn_func(q, k, v, return_attn_probs=True)
    assert probs is None and lse.shape == (1, 2, 8) and out.shape == q.shape


def test_packed_variants():
    qkv = torch.randn(2, 10, 3, 2, 16)
    out = fdm.flash_dmattn_qkvpacked_func(qkv, is_causal=True)
    ref = sdpa(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    kv = qkv[:, :, 1:]
    out2 = fdm.flash_dmattn_kvpacked_func(qkv[:, :, 0], kv, None, None, None, True)
    assert torch.equal(out, out2)


def test_varlen_padded_4d_mask_and_bias():
    torch.manual_seed(2)
    lens_q, lens_k = [3, 5], [4, 6]
    H, D = 2, 16
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 10], dtype=torch.int32)
    q = torch.randn(8, H, D)
    k = torch.randn(10, H, D)
    v = torch.randn(10, H, D)
    mask = torch.rand(2, H, 5, 6) > 0.3
    bias = torch.randn(2, 1, 5, 6)
    out = flash_dmattn_varlen_func(q, k, v, mask.float(), bias, cu_q, cu_k, is_causal=True)
    for b in range(2):
        qs, ks = int(cu_q[b]), int(cu_k[b])
        lq, lk = lens_q[b], lens_k[b]
        ref = sdpa(q[None, qs:qs + lq], k[None, ks:ks + lk], v[None, ks:ks + lk],
                   mask[b:b + 1, :, :lq, :lk], bias[b:b + 1, :, :lq, :lk], causal=True)
        assert torch.allclose(out[qs:qs + lq].double(), ref[0], atol=1e-5)
    with pytest.raises(NotImplementedError, match=r"block_table"):
        flash_dmattn_varlen_func(q, k, v, None, None, cu_q, cu_k, 5, 6, block_table=cu_q)


def test_func_auto_backend_names():
    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    for name in (None, "triton", "flex", "reference"):
        assert flash_dmattn_func_auto(name)(q, k, v, is_causal=True).shape == q.shape
    with pytest.raises(ValueError, match=r"backend must be one of"):
        flash_dmattn_func_auto("tpu")
    assert "reference" in fdm.get_available_backends()


def _brute_topk(bias, k, allowed):
    s = np.where(allowed, bias, -np.inf)
    out = np.zeros(s.shape, bool)
    for idx in np.ndindex(s.shape[:-1]):
        row = s[idx]
        n_ok = int(np.isfinite(row).sum())
        keep = np.argsort(-row, kind="stable")[: min(k, n_ok)]
        out[idx][keep] = True
    return out


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("causal", [False, True])
def test_topk_mask_matches_brute_force(lib, causal):
    rng = np.random.default_rng(3)
    bias = rng.standard_normal((2, 3, 10, 12)).astype(np.float32)
    pad = np.ones((2, 1, 1, 12), bool)
    pad[1, ..., 9:] = False
    allowed = pad & (np.ones((10, 12), bool) if not causal else
                     np.arange(12)[None, :] <= np.arange(10)[:, None] + 2)
    want = _brute_topk(bias, 5, allowed)
    if lib == "torch":
        got = topk_mask(torch.from_numpy(bias), 5, torch.from_numpy(pad), is_causal=causal)
        got = got.numpy()
    else:
        got = topk_mask(bias, 5, pad, is_causal=causal)
    np.testing.assert_array_equal(got, want)
    assert (got.sum(-1) <= 5).all()


def test_topk_mask_shared_bias_expands_rows():
    bias = np.arange(8, dtype=np.float32)[None, None, None, :]  # (1, 1, 1, Sk)
    m = topk_mask(bias, 3, is_causal=True, seqlen_q=4)
    assert m.shape == (1, 1, 4, 8)
    # row i sees keys <= i + 4; the 3 largest allowed are the 3 last allowed ones
    for i in range(4):
        assert m[0, 0, i].nonzero()[0].tolist() == [i + 2, i + 3, i + 4]


def test_topk_block_mask():
    import dmattn_cupy as dm

    rng = np.random.default_rng(4)
    bias = rng.standard_normal((1, 2, 256, 256)).astype(np.float32)
    bm = topk_mask(bias, 128, block_size=64, num_heads=4)
    assert isinstance(bm, dm.BlockBitsetMask) and bm.block_size == (64, 64)
    assert bm.batch_heads == (1, 4)
    dense = np.asarray(bm.to_dense())
    assert dense.shape == (1, 4, 256, 256)
    # each 64-row block keeps exactly 2 key blocks (128 / 64), the ones with the largest max
    blocks = dense[:, :, ::64, ::64]
    assert (blocks.sum(-1) == 2).all()
    score = bias.reshape(1, 2, 4, 64, 4, 64).max(axis=(3, 5))
    best = np.sort(np.argsort(-score, -1)[..., :2], -1)
    got = np.sort(np.nonzero(blocks[0, ::2].reshape(-1, 4))[1].reshape(2, 4, 2), -1)
    np.testing.assert_array_equal(got, best[0])
    q = rng.standard_normal((1, 256, 4, 16)).astype(np.float32)
    k = rng.standard_normal((1, 256, 2, 16)).astype(np.float32)
    out = dm.flash_dmattn_func(q, k, k, sparse_mask=bm, attn_bias=bias)
    ref = dm.flash_dmattn_func(q, k, k, attn_mask=dense, attn_bias=bias)
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_create_mask_flash_dmattn_semantics():
    torch.manual_seed(5)
    B, H, Sq, Sk = 2, 2, 4, 10
    bias = torch.randn(B, H, Sq, Sk)
    pad = torch.ones(B, Sk, dtype=torch.bool)
    pad[0, :3] = False                                   # left padding of row 0
    m = create_mask(bias, pad, B, Sq, Sk, 4, torch.finfo(torch.float32).min)
    assert m.shape == (B, H, Sq, Sk) and m.dtype == torch.bool
    assert not m[0, :, :, :3].any() and (m.sum(-1) == 4).all()
    want = _brute_topk(bias.numpy(), 4, pad.numpy()[:, None, None, :])
    assert np.array_equal(m.numpy(), want)
    # a (B, query_len) mask: the cache keys in front are kept
    qmask = torch.ones(B, Sq, dtype=torch.bool)
    qmask[1, 0] = False
    m2 = create_mask(bias, qmask, B, Sq, Sk, Sk, None)
    assert m2[1, :, :, : Sk - Sq].all() and not m2[1, :, :, Sk - Sq].any()
    relu = create_mask(bias, None, B, Sq, Sk, 0, None, type="relu")
    assert torch.equal(relu, bias > 0)
    smooth = create_mask(bias, None, B, Sq, Sk, 5, None, block_size=4)
    blocks = [smooth[..., 0:4], smooth[..., 4:8], smooth[..., 8:10]]
    for blk in blocks:  # every block kept whole or dropped whole
        assert ((blk.sum(-1) == 0) | (blk.sum(-1) == blk.shape[-1])).all()
    with pytest.raises(ValueError, match=r"type must be 'topk' or 'relu'"):
        create_mask(bias, None, B, Sq, Sk, 4, None, type="softmax")
