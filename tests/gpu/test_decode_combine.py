"""The split-KV merge of the decode path, fused and not, on the GPU against the float64 reference.

Fused (the default): each split CTA writes its partial and takes an int32 ticket per (sequence,
kv head, slab) from a kept zero buffer (``scratch.zeroed``); the last to arrive merges all splits
and resets its ticket, so the buffer is all zero after every launch and no fill runs before the
next. Unfused (``DM_DECODE_FUSED_COMBINE=0`` in DMATTN_NVRTC_DEFINES): fwd_combine.cu merges in a
second launch. Both run here: many forced split counts (2 up to the 128-split cap, most with
splits that get no key tile), key lengths that are not multiples of the 64-key tile, empty
sequences and fully masked rows (out 0, lse -inf), repeated launches with changing split counts
on one ticket buffer, a captured graph's replays, and the paged KV-cache API."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import f64
from test_decode import _check_varlen, _layout, _varlen
from test_kvcache import run_case

import dmattn_cupy as dm
from dmattn_cupy import decode, fastpath, runtime, scratch

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

UNFUSED = "DM_DECODE_FUSED_COMBINE=0"


@pytest.fixture(params=["fused", "unfused"])
def merge(request, monkeypatch):
    """Runs a test on both merge paths; records the family of every validated-path launch."""
    monkeypatch.setenv("DMATTN_DECODE", "1")
    if request.param == "unfused":
        monkeypatch.setenv("DMATTN_NVRTC_DEFINES", UNFUSED)
    else:
        monkeypatch.delenv("DMATTN_NVRTC_DEFINES", raising=False)
    assert decode.fused_combine() == (request.param == "fused")
    seen: list[str] = []
    real = runtime.launch

    def spy(kernel, *a, **kw):
        seen.append(kernel.spec.family)
        return real(kernel, *a, **kw)

    monkeypatch.setattr(runtime, "launch", spy)
    fastpath.clear()
    scratch.clear()   # the ticket counts below are of this test's calls
    return request.param, seen


def _tickets_all_zero() -> int:
    """Checks every kept ticket buffer is all zero (after a sync); returns how many there are."""
    torch.cuda.synchronize()
    kept = [buf for key, (_, buf) in scratch._bufs.items() if key[0][-1] == "zeroed"]
    for buf in kept:
        assert not bool(buf.any()), f"a kept ticket buffer is not zero: {buf.nonzero()[:8]}"
    return len(kept)


def _expect_launches(seen: list[str], mode: str, splits: int) -> None:
    want = ["fwd_decode"] + (["fwd_combine"] if mode == "unfused" and splits > 1 else [])
    assert seen == want, seen


# 8191 keys = 128 tiles (the split cap); the others end inside a tile, one has a single key,
# one none: most split counts leave some splits of the short sequences without a tile.
LENS_Q, LENS_K = [1, 1, 2, 1, 1, 3], [8191, 1237, 65, 1, 0, 700]


@pytest.mark.parametrize("splits", [2, 3, 7, 16, 63, 128])
def test_many_splits_ragged_keys(splits, merge, monkeypatch):
    mode, seen = merge
    monkeypatch.setenv("DMATTN_NUM_SPLITS", str(splits))
    h, hk = 8, 2
    tq, tk = sum(LENS_Q), sum(LENS_K)
    mask = _layout("mask", "k", hk, tq, tk, max(LENS_K), 71, keep=0.8)
    bias = _layout("bias", "k", h, tq, tk, max(LENS_K), 72)
    out, lse = _check_varlen(LENS_Q, LENS_K, h, hk, d=128, mask=mask, bias=bias, seed=splits)
    _expect_launches(seen, mode, splits)
    # the sequence with no keys (4: query row 5) keeps nothing: out 0, lse -inf
    row = sum(LENS_Q[:4])
    assert (f64(out)[row] == 0).all() and np.isneginf(f64(lse)[:, row]).all()
    assert _tickets_all_zero() == (1 if mode == "fused" else 0)


@pytest.mark.parametrize("d", [64, 96, 256])
@pytest.mark.parametrize("splits", [2, 5])
def test_fully_masked_rows_every_split(d, splits, merge, monkeypatch):
    """Heads 0-2 of every sequence keep nothing (all splits: lse -inf, out 0); sequence 1 keeps
    only keys 700..705, so most of its splits keep nothing; fp16, fp32 bias, causal."""
    mode, seen = merge
    monkeypatch.setenv("DMATTN_NUM_SPLITS", str(splits))
    h, hk = 8, 4
    lens_q, lens_k = [2, 1, 3], [333, 1000, 130]
    tk = sum(lens_k)
    g = torch.Generator().manual_seed(d + splits)
    mask = torch.rand(tk, h, generator=g) < 0.6
    mask[:, :3] = False
    mask[333:1333, 3:] = False
    mask[333 + 700:333 + 706, 3:] = True
    bias = torch.randn(tk, hk, generator=g).to("cuda", torch.float32)
    out, lse = _check_varlen(lens_q, lens_k, h, hk, d=d, mask=mask.cuda(), bias=bias,
                             seed=d, dtype="float16", is_causal=True)
    _expect_launches(seen, mode, splits)
    o, ls = f64(out), f64(lse)
    assert (o[:, :3] == 0).all() and np.isneginf(ls[:3]).all()
    assert np.isfinite(ls[3:, 2]).all()   # sequence 1's row: kept by one split only
    assert _tickets_all_zero() == (1 if mode == "fused" else 0)


def test_repeated_launches_reset_the_tickets(merge, monkeypatch):
    """One shape and stream through the thin path (a kept ticket buffer): split counts 7, 3,
    7, 128, 2 one after another, each checked against the reference, each launch repeated with
    the same inputs for the same bits, and the tickets all zero after each. A ticket left
    non-zero would make a later launch's merge run early (or never): wrong output."""
    mode, _ = merge
    h, hk = 16, 4
    lens_q, lens_k = [1, 1, 1, 1], [8191, 4000, 77, 640]
    tk = sum(lens_k)
    qkv = _varlen(lens_q, lens_k, h, hk, 128, 81)
    bias = _layout("bias", "k", hk, 4, tk, max(lens_k), 82)
    scratch.clear()
    for splits in (7, 3, 7, 128, 2):
        monkeypatch.setenv("DMATTN_NUM_SPLITS", str(splits))
        first = _check_varlen(lens_q, lens_k, h, hk, d=128, bias=bias, qkv=qkv)
        hits = fastpath.HITS[0]
        for _ in range(3):
            again = _check_varlen(lens_q, lens_k, h, hk, d=128, bias=bias, qkv=qkv)
            for a, b in zip(first, again, strict=True):
                assert torch.equal(a, b), f"splits={splits}: a repeated launch differs"
        assert fastpath.HITS[0] == hits + 3
        assert _tickets_all_zero() == (1 if mode == "fused" else 0)


def test_fused_and_unfused_agree(monkeypatch):
    """Same inputs, both merges: equal up to the rounding of the lse sum's order."""
    monkeypatch.setenv("DMATTN_DECODE", "1")
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "9")
    lens_q, lens_k = [1, 2, 1], [3000, 999, 4097]
    h, hk = 32, 8
    tk = sum(lens_k)
    qkv = _varlen(lens_q, lens_k, h, hk, 128, 91)
    mask = _layout("mask", "k", hk, 4, tk, max(lens_k), 92, keep=0.9)
    bias = _layout("bias", "k", hk, 4, tk, max(lens_k), 93)
    res = {}
    for mode in ("fused", "unfused"):
        if mode == "unfused":
            monkeypatch.setenv("DMATTN_NVRTC_DEFINES", UNFUSED)
        else:
            monkeypatch.delenv("DMATTN_NVRTC_DEFINES", raising=False)
        res[mode] = [f64(x) for x in _check_varlen(lens_q, lens_k, h, hk, d=128, mask=mask,
                                                  bias=bias, qkv=qkv)]
    (of, lf), (ou, lu) = res["fused"], res["unfused"]
    assert np.abs(of - ou).max() <= 1e-2
    assert np.abs(lf - lu).max() <= 1e-4


def test_graph_replays_of_the_fused_merge(monkeypatch):
    """A captured fused decode (its ticket buffer zero-filled in the graph) replayed five times
    with new inputs copied in: each replay equals an eager call on the same inputs."""
    monkeypatch.setenv("DMATTN_DECODE", "1")
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "6")
    monkeypatch.delenv("DMATTN_NVRTC_DEFINES", raising=False)
    B, H, Hk, D, Sk = 3, 16, 4, 128, 2000
    g = torch.Generator().manual_seed(101)

    def r(*shape):
        return torch.randn(*shape, generator=g).to("cuda", torch.bfloat16)

    q, k, v, bias = r(B, 1, H, D), r(B, Sk, Hk, D), r(B, Sk, Hk, D), r(B, Hk, 1, Sk)

    def fn():
        return dm.flash_dmattn_func(q, k, v, attn_bias=bias, return_lse=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    for i in range(5):
        for x in (q, k, v, bias):
            x.copy_(torch.randn(x.shape, generator=g).to("cuda", x.dtype))
        graph.replay()
        torch.cuda.synchronize()
        want = fn()
        torch.cuda.synchronize()
        for a, b in zip(static, want, strict=True):
            assert torch.equal(a, b), f"replay {i} differs from eager"
    assert _tickets_all_zero() >= 1


@pytest.mark.parametrize("page", [0, 16, 64])
@pytest.mark.parametrize("splits", [2, 3, 5])   # 5 = the cap: the 320-key capacity's tiles
def test_kvcache_many_splits(page, splits, merge):
    """The KV-cache API (always the validated path: a kept ticket buffer there too), dense and
    paged, ragged lengths incl. 0 and a full cache, causal, key-based mask and bias."""
    mode, seen = merge
    run_case(page=page, seqlens=(0, 3, 250, None), s_new=1, mask_h=2, bias_h=8,
             is_causal=True, num_splits=splits, seed=splits + page)
    run_case(page=page, seqlens=(0, 3, 250, None), s_new=1, mask_h=2, bias_h=8,
             is_causal=True, num_splits=splits, seed=splits + page)
    want = ["kv_append", "fwd_decode"] + (["fwd_combine"] if mode == "unfused" else [])
    assert seen == want * 2, seen
    assert _tickets_all_zero() == (1 if mode == "fused" else 0)
