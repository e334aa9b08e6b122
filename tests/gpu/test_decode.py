"""Decode path (fwd_decode.cu + fwd_combine.cu) on the GPU against the float64 reference:
GQA packing, split-KV on and off (the partials merged by the decode grid itself or by the
combine launch), every varlen mask/bias layout x h', dense broadcast patterns, causal/window
edges, empty sequences, fully masked rows and all-false tiles."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import assert_fa_close, f64

import dmattn_cupy as dm
from dmattn_cupy import decode

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

# DMATTN_NUM_SPLITS: off, and forced on with the partials merged by the decode grid ("4") or by
# fwd_combine.cu ("4k"; DMATTN_SPLIT_COMBINE)
SPLITS = ["1", "4", "4k"]
# fwd_combine.cu merges a (row, head) pair with 2, 4, 8 and 8 warps (37: splits not a multiple
# of the warps x batch; 128 capped at the key tiles)
COMBINE_SPLITS = ["6", "13", "37", "128"]


def _splits(monkeypatch, splits: str) -> int:
    """Sets DMATTN_NUM_SPLITS (and who merges: a "k" suffix the combine launch, else the
    decode grid) from a SPLITS entry; returns the split count."""
    monkeypatch.setenv("DMATTN_NUM_SPLITS", splits.removesuffix("k"))
    monkeypatch.setenv("DMATTN_SPLIT_COMBINE", "kernel" if splits.endswith("k") else "grid")
    return int(splits.removesuffix("k"))


@pytest.fixture(autouse=True)
def calls(monkeypatch):
    """Forces the decode path on and records the split count of every decode launch."""
    monkeypatch.setenv("DMATTN_DECODE", "1")
    seen: list[int] = []
    choose = decode.choose_num_splits

    def spy(*a, **kw):
        n = choose(*a, **kw)
        seen.append(n)
        return n

    monkeypatch.setattr(decode, "choose_num_splits", spy)
    return seen


def _lens_cu(lens):
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32)


def _rand(shape, g, dtype):
    return torch.randn(*shape, generator=g).to("cuda", getattr(torch, dtype))


def _varlen(lens_q, lens_k, h, hk, d, seed, dtype="bfloat16"):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    return (_rand((tq, h, d), g, dtype), _rand((tk, hk, d), g, dtype),
            _rand((tk, hk, d), g, dtype), _lens_cu(lens_q).cuda(), _lens_cu(lens_k).cuda())


def _layout(kind, layout, heads, tq, tk, max_k, seed, keep=0.7, dtype="bfloat16"):
    g = torch.Generator().manual_seed(seed)
    shape = (tq, heads, max_k) if layout == "q" else (tk, heads)
    if kind == "mask":
        return (torch.rand(*shape, generator=g) < keep).cuda()
    return _rand(shape, g, dtype)


def _window(kw):
    window = list(kw.get("window_size", (-1, -1)))
    if kw.get("is_causal"):
        window[1] = 0 if window[1] < 0 else min(window[1], 0)
    return tuple(window)


def _check_varlen(lens_q, lens_k, h, hk, d=64, mask=None, bias=None, seed=0, dtype="bfloat16",
                  qkv=None, **kw):
    q, k, v, cu_q, cu_k = qkv or _varlen(lens_q, lens_k, h, hk, d, seed, dtype)
    out, lse = dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                           attn_mask=mask, attn_bias=bias, return_lse=True, **kw)
    torch.cuda.synchronize()
    assert out.shape == q.shape and lse.shape == (h, q.shape[0])
    ref_args = dict(q=f64(q), k=f64(k), v=f64(v), cu_q=cu_q.cpu().numpy(),
                    cu_k=cu_k.cpu().numpy(), mask=f64(mask), bias=f64(bias),
                    scale=kw.get("softmax_scale") or d ** -0.5, softcap=kw.get("softcap", 0.0),
                    window=_window(kw))
    assert_fa_close(out, lse, ref_args, dtype, varlen=True)
    return out, lse


def _check_dense(q, k, v, mask=None, bias=None, **kw):
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, return_lse=True,
                                    **kw)
    torch.cuda.synchronize()
    ref_args = dict(q=f64(q), k=f64(k), v=f64(v), mask=f64(mask), bias=f64(bias),
                    scale=kw.get("softmax_scale") or q.shape[-1] ** -0.5,
                    softcap=kw.get("softcap", 0.0), window=_window(kw))
    assert_fa_close(out, lse, ref_args, str(q.dtype).removeprefix("torch."))
    return out, lse


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("len_q", [1, 2, 8], ids=lambda n: f"lq{n}")
@pytest.mark.parametrize("qpk", [1, 4, 8], ids=lambda n: f"qpk{n}")
def test_gqa_packing_varlen(qpk, len_q, splits, monkeypatch, calls):
    n = _splits(monkeypatch, splits)
    hk = 2
    lens_q, lens_k = [len_q] * 4, [300, 17, 1000, 65]
    tq, tk = sum(lens_q), sum(lens_k)
    mask = _layout("mask", "k", hk, tq, tk, max(lens_k), 1)
    bias = _layout("bias", "k", hk * qpk, tq, tk, max(lens_k), 2)
    _check_varlen(lens_q, lens_k, hk * qpk, hk, mask=mask, bias=bias, seed=qpk + len_q)
    assert calls == [n]


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("len_q", [1, 2, 8], ids=lambda n: f"lq{n}")
@pytest.mark.parametrize("qpk", [1, 4, 8], ids=lambda n: f"qpk{n}")
def test_gqa_packing_dense_causal(qpk, len_q, splits, monkeypatch, calls):
    n = _splits(monkeypatch, splits)
    b, hk, sk = 3, 2, 777
    g = torch.Generator().manual_seed(qpk * 10 + len_q)
    q = _rand((b, len_q, hk * qpk, 128), g, "bfloat16")
    k, v = (_rand((b, sk, hk, 128), g, "bfloat16") for _ in range(2))
    mask = (torch.rand(b, 1, 1, sk, generator=g) < 0.8).cuda()
    bias = _rand((1, hk * qpk, len_q, sk), g, "bfloat16")
    _check_dense(q, k, v, mask=mask, bias=bias, is_causal=True)
    assert calls == [n]


LAYOUT_LENS = ([1, 3, 2, 8, 0, 4], [200, 5, 0, 129, 7, 64])


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("heads", ["1", "Hk", "H"], ids=lambda h: f"h{h}")
@pytest.mark.parametrize("mask_layout", ["q", "k", None], ids=lambda x: f"mask-{x}")
@pytest.mark.parametrize("bias_layout", ["q", "k", None], ids=lambda x: f"bias-{x}")
def test_varlen_layouts(bias_layout, mask_layout, heads, splits, monkeypatch):
    _splits(monkeypatch, splits)
    check_varlen_layouts(bias_layout, mask_layout, heads, causals=(False, True))


def check_varlen_layouts(bias_layout, mask_layout, heads: str, causals=(False,),
                         seed: int | None = None) -> None:
    """LAYOUT_LENS (odd key lengths, empty sequences) with a query- or key-based mask/bias of
    h' in {1, Hk, H} (H8, Hk2), once per causal flag; seed None: h'."""
    h, hk = 8, 2
    hp = {"1": 1, "Hk": hk, "H": h}[heads]
    lens_q, lens_k = LAYOUT_LENS
    tq, tk, mk = sum(lens_q), sum(lens_k), max(lens_k)
    mask = _layout("mask", mask_layout, hp, tq, tk, mk, 3) if mask_layout else None
    bias = _layout("bias", bias_layout, hp, tq, tk, mk, 4) if bias_layout else None
    for causal in causals:
        _check_varlen(lens_q, lens_k, h, hk, mask=mask, bias=bias, is_causal=causal,
                      seed=hp if seed is None else seed)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_split_on_and_off_agree(dtype, monkeypatch, calls):
    """Forced 1, 7 and the heuristic's split count: each within FA tolerance of the float64
    reference, and close to each other."""
    lens_q, lens_k = [1, 1, 1], [4096, 1500, 3001]
    h, hk, tk = 8, 2, sum(lens_k)
    qkv = _varlen(lens_q, lens_k, h, hk, 128, 11, dtype)
    mask = _layout("mask", "k", hk, 3, tk, max(lens_k), 12, keep=0.9)
    bias = _layout("bias", "k", hk, 3, tk, max(lens_k), 13, dtype=dtype)
    res = {}
    for splits in ("1", "7", "auto"):
        monkeypatch.setenv("DMATTN_NUM_SPLITS", splits)
        res[splits] = _check_varlen(lens_q, lens_k, h, hk, d=128, mask=mask, bias=bias,
                                    dtype=dtype, qkv=qkv)
    assert calls[0] == 1 and calls[1] == 7 and calls[2] > 1  # 3 x 2 CTAs: the heuristic splits
    o1, l1 = (f64(x) for x in res["1"])
    for s in ("7", "auto"):
        o, lse = (f64(x) for x in res[s])
        assert np.abs(o - o1).max() < 2e-2
        assert np.abs(lse - l1).max() < 1e-3


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("window", [None, (4, 0), (16, 2)],
                         ids=lambda w: "causal" if w is None else f"win{w[0]}_{w[1]}")
def test_causal_window_edges(window, splits, monkeypatch):
    """len_q > len_k (rows with no key), len_k = 0, len_q = 0, long keys, per sequence."""
    _splits(monkeypatch, splits)
    lens_q, lens_k = [8, 8, 3, 1, 5, 0, 7], [3, 0, 3, 0, 700, 9, 8]
    kw = {"is_causal": True} if window is None else {"window_size": window}
    tk = sum(lens_k)
    mask = _layout("mask", "k", 4, sum(lens_q), tk, max(lens_k), 5, keep=0.8)
    _check_varlen(lens_q, lens_k, 16, 4, mask=mask, seed=6, **kw)


BROADCAST = {
    "mask_b11k": ((2, 1, 1, 300), None),
    "bias_1hqk": (None, (1, 8, 3, 300)),
    "mask_1hkqk_bias_bhk1k": ((1, 2, 3, 300), (2, 2, 1, 300)),
    "mask_bhqk_bias_111k": ((2, 8, 3, 300), (1, 1, 1, 300)),
    "mask_11q1_bias_b1q1": ((1, 1, 3, 1), (2, 1, 3, 1)),
    "bias_expanded_view": (None, "expand"),
}


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("pattern", list(BROADCAST), ids=list(BROADCAST))
def test_dense_broadcast(pattern, splits, monkeypatch):
    _splits(monkeypatch, splits)
    g = torch.Generator().manual_seed(21)
    q = _rand((2, 3, 8, 64), g, "float16")
    k, v = (_rand((2, 300, 2, 64), g, "float16") for _ in range(2))
    ms, bs = BROADCAST[pattern]
    mask = (torch.rand(*ms, generator=g) < 0.7).cuda() if ms else None
    if bs == "expand":
        bias = _rand((2, 1, 1, 300), g, "float16").expand(2, 8, 3, 300)
    else:
        bias = _rand(bs, g, "float16") if bs else None
    _check_dense(q, k, v, mask=mask, bias=bias, is_causal=pattern.startswith("mask_bhqk"))


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: f"splits{s}")
def test_fully_masked_rows_and_false_tiles(splits, monkeypatch):
    """Sequence 0 keeps nothing (out 0, lse -inf); sequence 1 keeps keys 1000..1010 only, so
    most of its tiles are all-false (computed, since the mask travels with K/V); some heads keep
    nothing (h' = H)."""
    _splits(monkeypatch, splits)
    h, hk = 8, 2
    lens_q, lens_k = [2, 1, 3], [500, 2000, 300]
    tk = sum(lens_k)
    mask = torch.zeros(tk, h, dtype=torch.bool)
    mask[500 + 1000:500 + 1011, :] = True
    mask[2500:, :5] = torch.rand(300, 5, generator=torch.Generator().manual_seed(1)) < 0.5
    bias = torch.randn(tk, hk, generator=torch.Generator().manual_seed(2)).to("cuda", torch.float32)
    out, lse = _check_varlen(lens_q, lens_k, h, hk, mask=mask.cuda(), bias=bias, seed=8)
    assert (f64(out)[:2] == 0).all() and np.isneginf(f64(lse)[:, :2]).all()
    assert np.isneginf(f64(lse)[5:, 3:]).all()


@pytest.mark.parametrize("combine", ["kernel", "grid"])
@pytest.mark.parametrize("splits", COMBINE_SPLITS, ids=lambda s: f"splits{s}")
def test_combine_warps_per_pair(splits, combine, monkeypatch, calls):
    """Split counts the combine merges with several warps per pair: 42 pairs (the last CTA
    partly idle at 2 and 4 warps a pair), sequences shorter than the longest (their last splits
    empty) or empty, a key range no split of sequence 0 keeps, a head that keeps nothing. The
    same split counts merged by the decode grid's last CTA per group (``grid``: up to 128
    splits of up to 9 packed rows, beyond the automatic rule's bytes)."""
    monkeypatch.setenv("DMATTN_NUM_SPLITS", splits)
    monkeypatch.setenv("DMATTN_SPLIT_COMBINE", combine)
    h, hk = 6, 2
    lens_q, lens_k = [1, 3, 1, 2], [4100, 700, 0, 2500]
    tq, tk = sum(lens_q), sum(lens_k)
    mask = _layout("mask", "k", h, tq, tk, max(lens_k), 71)
    mask[1000:3000] = False
    mask[4800:, 4] = False            # sequence 3 (keys 4800..7299), head 4: nothing kept
    bias = _layout("bias", "k", hk, tq, tk, max(lens_k), 72)
    out, lse = _check_varlen(lens_q, lens_k, h, hk, d=128, mask=mask, bias=bias, seed=73)
    assert calls == [min(int(splits), -(-max(lens_k) // decode.BLOCK_N))]
    assert np.isneginf(f64(lse)[4, 5:]).all() and (f64(out)[5:, 4] == 0).all()
    assert np.isneginf(f64(lse)[:, 4]).all() and np.isfinite(f64(lse)[:4, :4]).all()


def split37_case():
    """A varlen decode of 3 sequences (8 heads, 2 kv heads, d128, key mask + bias) to run with
    37 splits: the call, and (lens_q, lens_k, mask, bias, (q, k, v, cu_q, cu_k))."""
    lens_q, lens_k = [1, 2, 1], [4000, 3100, 64]
    tq, tk = sum(lens_q), sum(lens_k)
    mask = _layout("mask", "k", 2, tq, tk, max(lens_k), 81)
    bias = _layout("bias", "k", 8, tq, tk, max(lens_k), 82)
    q, k, v, cu_q, cu_k = _varlen(lens_q, lens_k, 8, 2, 128, 83)

    def run():
        return dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                           attn_mask=mask, attn_bias=bias, return_lse=True)

    return run, (lens_q, lens_k, mask, bias, (q, k, v, cu_q, cu_k))


def test_programmatic_combine_matches_plain(monkeypatch, calls):
    """The combine launched with programmatic stream serialization (default on compute
    capability 9.0+) gives bit for bit what a plain launch gives, call after call (a cached
    plan's launches): the decode kernel's trigger and the combine's wait change nothing."""
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "37")
    monkeypatch.setenv("DMATTN_SPLIT_COMBINE", "kernel")
    run, (lens_q, lens_k, mask, bias, qkv) = split37_case()
    monkeypatch.setenv("DMATTN_PDL", "0")
    plain = run()
    monkeypatch.setenv("DMATTN_PDL", "1")
    for _ in range(3):
        out, lse = run()
        torch.cuda.synchronize()
        assert torch.equal(out, plain[0]) and torch.equal(lse, plain[1])
    _check_varlen(lens_q, lens_k, 8, 2, d=128, mask=mask, bias=bias, qkv=qkv)
    assert set(calls) == {37}


def test_grid_merge_repeats_bit_for_bit_on_any_stream(monkeypatch, calls):
    """The decode grid's own merge (37 splits, 8 packed rows per group, forced past the
    automatic rule's bytes): call after call bit for bit the first call's result, which holds
    only if each launch leaves its counters zero (a count left over makes no CTA the last
    one: no output written). On a second stream (its own counters), interleaved with the
    first without a sync: the same bits. Within FlashAttention's tolerance of float64, and of
    the combine launch's result."""
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "37")
    monkeypatch.setenv("DMATTN_SPLIT_COMBINE", "grid")
    run, (lens_q, lens_k, mask, bias, qkv) = split37_case()
    first = run()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    results = []
    for i in range(6):
        with torch.cuda.stream(side if i % 2 else torch.cuda.current_stream()):
            results.append(run())
    torch.cuda.synchronize()
    for out, lse in results:
        assert torch.equal(out, first[0]) and torch.equal(lse, first[1])
    _check_varlen(lens_q, lens_k, 8, 2, d=128, mask=mask, bias=bias, qkv=qkv)
    monkeypatch.setenv("DMATTN_SPLIT_COMBINE", "kernel")
    out, lse = run()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, first[0], rtol=2 ** -7, atol=2 ** -8)
    torch.testing.assert_close(lse, first[1], rtol=1e-5, atol=1e-5)
    assert set(calls) == {37}


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: f"splits{s}")
def test_softcap_fp16_fp32_bias_scale(splits, monkeypatch):
    _splits(monkeypatch, splits)
    lens_q, lens_k = [1, 4, 2], [333, 1200, 90]
    tq, tk = sum(lens_q), sum(lens_k)
    bias = _layout("bias", "q", 4, tq, tk, max(lens_k), 9).float()
    _check_varlen(lens_q, lens_k, 16, 4, mask=None, bias=bias, seed=10, dtype="float16",
                  softcap=20.0, softmax_scale=0.3)


# 48 and 120: padded dims (64, 128) on the lean K/V issue, whose threads past head_dim zero-fill
HEAD_DIMS = [8, 32, 48, 80, 120, 128, 192, 256]


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("d", HEAD_DIMS, ids=[f"d{d}" for d in HEAD_DIMS])
def test_head_dims(d, splits, monkeypatch):
    _splits(monkeypatch, splits)
    check_head_dim(d, "bfloat16", (2, 1, 2, 451))


def check_head_dim(d: int, dtype: str, bias_shape: tuple, fp32_bias: bool = False) -> None:
    """Dense B2 Sq2 H8 Hk2, 451 keys at head dim d: a (2, 2, 1, 451) mask and a bias of
    ``bias_shape`` (in fp32 with ``fp32_bias``)."""
    g = torch.Generator().manual_seed(d)
    q = _rand((2, 2, 8, d), g, dtype)
    k, v = (_rand((2, 451, 2, d), g, dtype) for _ in range(2))
    mask = (torch.rand(2, 2, 1, 451, generator=g) < 0.8).cuda()
    bias = _rand(bias_shape, g, dtype)
    _check_dense(q, k, v, mask=mask, bias=bias.float() if fp32_bias else bias)


def test_heuristic_splits_long_context(monkeypatch, calls):
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "auto")
    g = torch.Generator().manual_seed(31)
    q = _rand((1, 1, 8, 128), g, "bfloat16")
    k, v = (_rand((1, 20000, 1, 128), g, "bfloat16") for _ in range(2))
    _check_dense(q, k, v, bias=_rand((1, 1, 1, 20000), g, "bfloat16"))
    assert calls[0] > 8


def test_cupy_inputs_and_strided_views(monkeypatch, calls):
    cp = pytest.importorskip("cupy")
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "3")
    g = torch.Generator().manual_seed(41)
    big = _rand((2, 4, 8, 80), g, "float16")
    q = cp.asarray(big[:, :, :, :64])       # strides (2560, 640, 80, 1): aligned, not contiguous
    kv = _rand((2, 500, 2, 2, 64), g, "float16")
    k, v = cp.asarray(kv[:, :, 0]), cp.asarray(kv[:, :, 1])  # (2, 500, 2, 64), row stride 256
    bias = cp.asarray(_rand((2, 1, 1, 500), g, "float16"))
    out, lse = dm.flash_dmattn_func(q, k, v, attn_bias=bias, return_lse=True)
    cp.cuda.Device().synchronize()
    assert isinstance(out, cp.ndarray) and calls == [3]
    ref_args = dict(q=f64(q), k=f64(k), v=f64(v), mask=None, bias=f64(bias), scale=64 ** -0.5)
    assert_fa_close(out, lse, ref_args, "float16")


def test_auto_mode_takes_short_queries_only(monkeypatch, calls):
    monkeypatch.setenv("DMATTN_DECODE", "auto")
    g = torch.Generator().manual_seed(51)
    k, v = (_rand((1, 100, 2, 64), g, "bfloat16") for _ in range(2))
    _check_dense(_rand((1, 9, 4, 64), g, "bfloat16"), k, v)
    assert calls == []
    _check_dense(_rand((1, 8, 4, 64), g, "bfloat16"), k, v)
    assert len(calls) == 1
    monkeypatch.setenv("DMATTN_DECODE", "0")
    _check_dense(_rand((1, 1, 4, 64), g, "bfloat16"), k, v)
    assert len(calls) == 1


def test_large_batch_many_rows(monkeypatch):
    """More than one m16 slab per (sequence, kv head): 8 queries x 8 heads = 64 packed rows,
    and a 12-query sequence under DMATTN_DECODE=1."""
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "2")
    lens_q, lens_k = [8, 12, 5] * 3, [40, 300, 64] * 3
    tk = sum(lens_k)
    mask = _layout("mask", "k", 16, sum(lens_q), tk, max(lens_k), 61)
    _check_varlen(lens_q, lens_k, 16, 2, mask=mask, seed=62, is_causal=True)
