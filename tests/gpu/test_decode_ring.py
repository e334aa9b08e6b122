"""The sm_90a ring decode (sm90/fwd_decode_ring.cu, DMATTN_DECODE_RING=1) on the GPU against
the float64 reference: varlen mask/bias layouts x h', GQA packing with several 16-row slabs,
dense causal/window/softcap, head dims (4 consumer warps above d128), split on and off, the
KV-cache API dense and paged (append in place), persistent CTAs taking many items and ring
depths 2..8 (phase wrap), and determinism. Every test checks that the ring kernel ran."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import f64
from test_decode import (
    _check_dense,
    _check_varlen,
    _layout,
    _rand,
    _varlen,
    check_head_dim,
    check_varlen_layouts,
)
from test_kvcache import record_launch_families, run_case

import dmattn_cupy as dm
from dmattn_cupy import decode, fastpath, reference_kvcache

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu
SPLITS = ["1", "4"]


@pytest.fixture(autouse=True)
def ring(monkeypatch):
    """Compute capability 9.0 only; ring on, decode forced; records each plan's ring stages
    and the family of every launch. After the test: the ring ran, the cp.async kernel did not."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a ring decode runs on compute capability 9.0 only")
    monkeypatch.setenv("DMATTN_DECODE", "1")
    monkeypatch.setenv("DMATTN_DECODE_RING", "1")
    monkeypatch.delenv("DMATTN_DECODE_RING_STAGES", raising=False)
    fastpath.clear()  # each test's first call builds its plan (the spies below see it)
    stages: list[int] = []
    real = decode.ring_stages

    def spy(*a, **kw):
        n = real(*a, **kw)
        stages.append(n)
        return n

    monkeypatch.setattr(decode, "ring_stages", spy)
    families = record_launch_families(monkeypatch)
    seen = {"stages": stages, "families": families, "cp_async_too": False}
    yield seen
    if not seen["cp_async_too"]:
        assert stages and all(s >= 2 for s in stages), f"ring not taken: stages {stages}"
        assert "fwd_decode" not in families
    assert any(s >= 2 for s in stages) and "fwd_decode_ring" in families


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("heads", ["1", "Hk", "H"], ids=lambda h: f"h{h}")
@pytest.mark.parametrize("mask_layout", ["q", "k", None], ids=lambda x: f"mask-{x}")
@pytest.mark.parametrize("bias_layout", ["q", "k", None], ids=lambda x: f"bias-{x}")
def test_varlen_layouts(bias_layout, mask_layout, heads, splits, monkeypatch):
    """Odd key lengths (5, 7, 129, 200), empty sequences (0 queries / 0 keys)."""
    monkeypatch.setenv("DMATTN_NUM_SPLITS", splits)
    check_varlen_layouts(bias_layout, mask_layout, heads, seed=5)


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("len_q", [1, 3, 8], ids=lambda n: f"lq{n}")
@pytest.mark.parametrize("qpk", [1, 4, 8, 32], ids=lambda n: f"qpk{n}")
def test_gqa_packing(qpk, len_q, splits, monkeypatch):
    """Up to 16 slabs per (sequence, kv head); qpk 32: staged rows per packed row (mode 2)."""
    monkeypatch.setenv("DMATTN_NUM_SPLITS", splits)
    hk = 2
    lens_q, lens_k = [len_q] * 4, [300, 17, 1000, 65]
    tq, tk = sum(lens_q), sum(lens_k)
    mask = _layout("mask", "k", hk, tq, tk, max(lens_k), 1)
    bias = _layout("bias", "k", hk * qpk, tq, tk, max(lens_k), 2)
    _check_varlen(lens_q, lens_k, hk * qpk, hk, d=128, mask=mask, bias=bias, seed=qpk + len_q,
                  is_causal=len_q > 1)


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("opts", [dict(is_causal=True), dict(window_size=(40, 3)),
                                  dict(softcap=10.0, softmax_scale=0.2)],
                         ids=["causal", "window", "softcap"])
def test_dense_options(opts, splits, monkeypatch):
    monkeypatch.setenv("DMATTN_NUM_SPLITS", splits)
    g = torch.Generator().manual_seed(7)
    q = _rand((3, 4, 8, 128), g, "bfloat16")
    k, v = (_rand((3, 777, 2, 128), g, "bfloat16") for _ in range(2))
    mask = (torch.rand(3, 1, 1, 777, generator=g) < 0.8).cuda()
    bias = _rand((1, 8, 4, 777), g, "bfloat16")
    _check_dense(q, k, v, mask=mask, bias=bias, **opts)


HEAD_DIMS = [8, 40, 64, 128, 192, 256]


@pytest.mark.parametrize("splits", SPLITS, ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("d", HEAD_DIMS, ids=[f"d{d}" for d in HEAD_DIMS])
def test_head_dims(d, splits, monkeypatch):
    """Padded head dims (8, 40: pad columns zeroed once), fp16 and an fp32 key bias."""
    monkeypatch.setenv("DMATTN_NUM_SPLITS", splits)
    check_head_dim(d, "float16", (2, 1, 1, 451), fp32_bias=True)


@pytest.mark.parametrize("stages", ["2", "3", "8"])
def test_many_items_per_cta_and_ring_depths(stages, monkeypatch):
    """600 items on <= 132 persistent CTAs (4-5 items each, lengths 1..1100 keys, so the
    ring's phases wrap inside and across items), at each ring depth; split 3."""
    monkeypatch.setenv("DMATTN_DECODE_RING_STAGES", stages)
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "3")
    rng = np.random.default_rng(int(stages))
    lens_k = [int(x) for x in rng.integers(1, 1100, 50)]
    lens_q = [1] * 50
    h, hk, tk = 16, 4, sum(lens_k)
    mask = _layout("mask", "k", hk, 50, tk, max(lens_k), 11, keep=0.9)
    bias = _layout("bias", "k", hk, 50, tk, max(lens_k), 12)
    _check_varlen(lens_q, lens_k, h, hk, d=64, mask=mask, bias=bias, seed=13)


def test_deterministic_and_agrees_with_the_cp_async_kernel(monkeypatch, ring):
    lens_q, lens_k = [1, 2, 1], [4096, 1500, 3001]
    h, hk, tk = 8, 2, sum(lens_k)
    qkv = _varlen(lens_q, lens_k, h, hk, 128, 21)
    mask = _layout("mask", "k", hk, 4, tk, max(lens_k), 22, keep=0.9)
    bias = _layout("bias", "k", hk, 4, tk, max(lens_k), 23)
    a = _check_varlen(lens_q, lens_k, h, hk, d=128, mask=mask, bias=bias, qkv=qkv)
    b = _check_varlen(lens_q, lens_k, h, hk, d=128, mask=mask, bias=bias, qkv=qkv)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert "fwd_decode" not in ring["families"]
    ring["cp_async_too"] = True
    monkeypatch.setenv("DMATTN_DECODE_RING", "0")
    c = _check_varlen(lens_q, lens_k, h, hk, d=128, mask=mask, bias=bias, qkv=qkv)
    assert np.abs(f64(a[0]) - f64(c[0])).max() < 2e-2
    assert np.abs(f64(a[1]) - f64(c[1])).max() < 1e-3
    assert "fwd_decode" in ring["families"]


PAGES = [0, 16, 64, 256]
KV_LAYOUTS = [(None, None), ("hk", "hk"), ("1", "h"), ("h", None), (None, "1")]


def _heads(spec, h, hk):
    return {None: None, "1": 1, "hk": hk, "h": h}[spec]


@pytest.mark.parametrize("splits", [0, 1, 4], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("layout", KV_LAYOUTS, ids=lambda x: f"mask{x[0]}_bias{x[1]}")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: f"page{p}")
def test_kvcache(page, layout, splits):
    """Dense and paged caches (pages shuffled), key-based mask/bias over the cache, odd
    lengths (0, 1, 150, capacity - s_new), 5 appended keys under causal."""
    h, hk = 8, 2
    run_case(page=page, sq=5, s_new=5, h=h, hk=hk, mask_h=_heads(layout[0], h, hk),
             bias_h=_heads(layout[1], h, hk), num_splits=splits, is_causal=True,
             seed=page + splits + len(str(layout)))


@pytest.mark.parametrize("page", [16, 64], ids=lambda p: f"page{p}")
def test_kvcache_window_softcap_d128(page):
    run_case(page=page, d=128, h=16, hk=2, mask_h=2, bias_h=16, window_size=(70, 0),
             softcap=4.0, seed=page)


@pytest.mark.parametrize("d", [64, 256], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: f"page{p}")
def test_kvcache_rows_past_the_end_hold_nan(page, d):
    """The K/V boxes read whole tiles (paged: whole page runs), so rows past a sequence's end
    are read as stored: here NaN in K and +inf in V (never-written cache memory may hold
    anything). The consumers zero those V rows (P = 0 there, but 0 x inf is NaN): the output
    must match the reference over the clean cache."""
    g = torch.Generator().manual_seed(page + d)
    b, s_max, h, hk = 4, 320, 8, 2
    lens = [1, 63, 150, 257]                    # each ends inside a tile (and a page)
    q = _rand((b, 1, h, d), g, "bfloat16")
    kc, vc = _rand((b, s_max, hk, d), g, "bfloat16"), _rand((b, s_max, hk, d), g, "bfloat16")
    ref_args = dict(q=f64(q), k_cache=f64(kc), v_cache=f64(vc), cache_seqlens=np.array(lens),
                    scale=d ** -0.5)
    for i, n in enumerate(lens):
        kc[i, n:] = float("nan")
        vc[i, n:] = float("inf")
    table = None
    if page:
        per = -(-s_max // page)
        perm = torch.randperm(b * per + 3, generator=torch.Generator().manual_seed(page))
        table = perm[:b * per].reshape(b, per).to(torch.int32).cuda()
        pool_k = torch.full((b * per + 3, page, hk, d), float("nan"), dtype=kc.dtype,
                            device="cuda")
        pool_v = torch.full_like(pool_k, float("inf"))
        pad = per * page - s_max
        for pool, x in ((pool_k, kc), (pool_v, vc)):
            xp = torch.cat([x, x[:, :pad].clone().fill_(float("nan"))], 1)
            pool[table.reshape(-1).long()] = xp.reshape(b * per, page, hk, d)
        kc, vc = pool_k, pool_v
        ref_args.update(k_cache=np.nan_to_num(f64(kc), nan=0.0, posinf=0.0),
                        v_cache=np.nan_to_num(f64(vc), nan=0.0, posinf=0.0),
                        block_table=table.cpu().numpy())
    seqlens = torch.tensor(lens, dtype=torch.int32).cuda()
    out = dm.flash_dmattn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=table)
    torch.cuda.synchronize()
    o = f64(out)
    assert np.isfinite(o).all(), "a non-finite row past the end reached the output"
    ref, _ = reference_kvcache.kvcache_forward(**ref_args)
    low, _ = reference_kvcache.kvcache_forward(**ref_args, lowprec="bfloat16")
    err, tol = np.abs(o - ref).max(), 2 * np.abs(low - ref).max() + 1e-4
    assert err <= tol, f"max|out-ref| = {err:.3e} > {tol:.3e}"
