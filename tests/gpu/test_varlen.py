"""Varlen forward on the GPU: query-/key-based mask and bias layouts, empty sequences."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import assert_fa_close, f64

import dmattn_cupy as dm

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("both_forward_families")]

H, HK, D = 4, 2, 64


def _packed(lens_q, lens_k, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor(np.concatenate([[0], np.cumsum(lens_q)]), dtype=torch.int32)
    cu_k = torch.tensor(np.concatenate([[0], np.cumsum(lens_k)]), dtype=torch.int32)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q = torch.randn(tq, H, D, generator=g).to("cuda", dtype)
    k = torch.randn(tk, HK, D, generator=g).to("cuda", dtype)
    v = torch.randn(tk, HK, D, generator=g).to("cuda", dtype)
    return q, k, v, cu_q.cuda(), cu_k.cuda(), max(lens_q), max(lens_k)


def _layout(kind, layout, heads, tq, tk, max_k, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (tq, heads, max_k) if layout == "q" else (tk, heads)
    if kind == "mask":
        return (torch.rand(*shape, generator=g) > 0.3).cuda()
    return torch.randn(*shape, generator=g).to("cuda", torch.bfloat16)


LENS = {
    "mixed": ([5, 130, 1, 64], [70, 129, 33, 64]),
    "empty": ([0, 17, 9, 0], [12, 0, 40, 0]),
    "q_gt_k": ([90, 7], [30, 7]),
    "decode": ([1, 1, 1, 1, 1], [300, 17, 1, 4000, 64]),
}


def _check(lens, mask=None, bias=None, seed=0, **kw):
    q, k, v, cu_q, cu_k, mq, mk = _packed(*lens, seed=seed)
    out, lse = dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, attn_mask=mask,
                                           attn_bias=bias, return_lse=True, **kw)
    torch.cuda.synchronize()
    assert lse.shape == (H, q.shape[0])
    window = (-1, 0) if kw.get("is_causal") else (-1, -1)
    ref_args = dict(q=f64(q), k=f64(k), v=f64(v), cu_q=cu_q.cpu().numpy(),
                    cu_k=cu_k.cpu().numpy(), mask=f64(mask), bias=f64(bias), scale=D ** -0.5,
                    window=window)
    assert_fa_close(out, lse, ref_args, "bfloat16", varlen=True)


@pytest.mark.parametrize("lens", list(LENS), ids=list(LENS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_plain(lens, causal):
    _check(LENS[lens], is_causal=causal, seed=len(lens))


@pytest.mark.parametrize("heads", [1, HK, H], ids=lambda h: f"h{h}")
@pytest.mark.parametrize("mask_layout", ["q", "k", None], ids=lambda x: f"mask-{x}")
@pytest.mark.parametrize("bias_layout", ["q", "k", None], ids=lambda x: f"bias-{x}")
def test_varlen_layouts(heads, mask_layout, bias_layout):
    lens_q, lens_k = LENS["mixed"]
    tq, tk, mk = sum(lens_q), sum(lens_k), max(lens_k)
    mask = _layout("mask", mask_layout, heads, tq, tk, mk, 1) if mask_layout else None
    bias = _layout("bias", bias_layout, heads, tq, tk, mk, 2) if bias_layout else None
    _check(LENS["mixed"], mask=mask, bias=bias, is_causal=True, seed=heads)


def test_total_q_equals_total_k_kbased():
    lens = ([40, 24], [24, 40])
    mask = _layout("mask", "k", HK, 64, 64, 40, 3)
    _check(lens, mask=mask, seed=4)


def test_key_based_decode():
    lens = LENS["decode"]
    tk = sum(lens[1])
    mask = _layout("mask", "k", HK, 5, tk, max(lens[1]), 5)
    bias = _layout("bias", "k", HK, 5, tk, max(lens[1]), 6)
    _check(lens, mask=mask, bias=bias, seed=7)


def test_check_env_rejects_bad_cu_seqlens(monkeypatch):
    q, k, v, cu_q, cu_k, mq, mk = _packed([5, 6], [7, 8], seed=8)
    monkeypatch.setenv("DMATTN_CHECK", "1")
    bad = cu_q.clone()
    bad[1] = 9
    bad[2] = 8
    with pytest.raises(ValueError, match="non-decreasing|total"):
        dm.flash_dmattn_varlen_func(q, k, v, bad, cu_k, mq, mk)
