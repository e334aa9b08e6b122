"""The decode kernel's 3-stage specialization (d128, ``decode.choose_stages``) on the GPU
against the float64 reference: forced by DMATTN_DECODE_STAGES=3 over varlen and dense layouts,
split-KV on and off, causal/window, fp16 with a float32 bias and the KV-cache API (dense and
paged); and the automatic choice on a grid that then runs unsplit."""

from __future__ import annotations

import pytest
from test_decode import _check_dense, _check_varlen, _layout, _rand, _varlen
from test_kvcache import run_case

from dmattn_cupy import decode, fastpath

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


@pytest.fixture
def stages(monkeypatch):
    """Forces the decode path on and records every depth choose_stages returns (cached plans
    dropped first: a thin-path hit would not choose again)."""
    fastpath.clear()
    monkeypatch.setenv("DMATTN_DECODE", "1")
    seen: list[int] = []
    choose = decode.choose_stages

    def spy(*a, **kw):
        seen.append(choose(*a, **kw))
        return seen[-1]

    monkeypatch.setattr(decode, "choose_stages", spy)
    return seen


@pytest.fixture
def forced(monkeypatch, stages):
    monkeypatch.setenv("DMATTN_DECODE_STAGES", "3")
    yield stages
    assert stages and set(stages) == {3}, stages


@pytest.mark.parametrize("splits", ["1", "4"], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("layout", ["k", "q"], ids=lambda x: f"mb-{x}")
@pytest.mark.parametrize("qpk", [1, 4, 8], ids=lambda n: f"qpk{n}")
def test_varlen(qpk, layout, splits, monkeypatch, forced):
    monkeypatch.setenv("DMATTN_NUM_SPLITS", splits)
    hk = 2
    lens_q, lens_k = [1, 2, 1, 3], [3000, 17, 1000, 64 * 3 + 1]
    tq, tk = sum(lens_q), sum(lens_k)
    mask = _layout("mask", layout, hk, tq, tk, max(lens_k), 1)
    bias = _layout("bias", layout, hk * qpk, tq, tk, max(lens_k), 2)
    _check_varlen(lens_q, lens_k, hk * qpk, hk, d=128, mask=mask, bias=bias, seed=qpk)


@pytest.mark.parametrize("splits", ["1", "3"], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("opts", [dict(is_causal=True), dict(window_size=(300, 0)),
                                  dict(softcap=4.0)], ids=lambda o: "_".join(o))
def test_dense_broadcast(opts, splits, monkeypatch, forced):
    monkeypatch.setenv("DMATTN_NUM_SPLITS", splits)
    b, hk, qpk, sq, sk = 3, 2, 4, 2, 2500
    g = torch.Generator().manual_seed(sk + len(opts))
    q = _rand((b, sq, hk * qpk, 128), g, "bfloat16")
    k, v = (_rand((b, sk, hk, 128), g, "bfloat16") for _ in range(2))
    mask = (torch.rand(b, 1, 1, sk, generator=g) < 0.8).cuda()
    bias = _rand((1, hk * qpk, sq, sk), g, "bfloat16")
    _check_dense(q, k, v, mask=mask, bias=bias, **opts)


def test_fp16_fp32_bias(monkeypatch, forced):
    lens_q, lens_k = [1, 1], [4097, 700]
    q, k, v, cu_q, cu_k = _varlen(lens_q, lens_k, 8, 2, 128, 5, "float16")
    bias = _layout("bias", "k", 2, 2, sum(lens_k), 0, 6).float()
    _check_varlen(lens_q, lens_k, 8, 2, d=128, bias=bias, dtype="float16",
                  qkv=(q, k, v, cu_q, cu_k))


@pytest.mark.parametrize("splits", [0, 3], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("page", [0, 16, 64], ids=lambda p: f"page{p}")
def test_kvcache(page, splits, forced):
    run_case(page=page, d=128, mask_h=2, bias_h=8, is_causal=True, s_new=2, sq=2,
             num_splits=splits, seed=page + splits)


def test_auto_choice_on_an_unsplit_grid(stages, monkeypatch):
    """32 sequences x 8 kv heads x 2048 keys (32 tiles per CTA): on a 132-SM Hopper the 256
    CTAs fill 2 CTAs per SM without a split, so choose_stages takes 3 stages."""
    for var in ("DMATTN_DECODE_STAGES", "DMATTN_NUM_SPLITS", "DMATTN_NVRTC_DEFINES"):
        monkeypatch.delenv(var, raising=False)
    lens_q, lens_k = [1] * 32, [2048] * 32
    q, k, v, cu_q, cu_k = _varlen(lens_q, lens_k, 32, 8, 128, 9)
    mask = _layout("mask", "k", 8, 32, sum(lens_k), 0, 10)
    bias = _layout("bias", "k", 8, 32, sum(lens_k), 0, 11)
    _check_varlen(lens_q, lens_k, 32, 8, d=128, mask=mask, bias=bias,
                  qkv=(q, k, v, cu_q, cu_k))
    props = torch.cuda.get_device_properties(0)
    if (props.major, props.minor) == (9, 0) and props.multi_processor_count == 132:
        assert stages == [3]
    else:
        assert len(stages) == 1
