"""The Hopper backward's dQ writer (the default, DM_SM90_BWD_DQ_WRITER=2: the producer's writer
warp adds each staged tile by one bulk tensor reduce through the dq_accum map) against the
consumer-side adds (DM_SM90_BWD_DQ_WRITER=0), built side by side in one process (kernels and
plans are cached per DMATTN_NVRTC_DEFINES).

Deterministic mode: every build adds each query tile's key-tile partials in key-tile order into
the same zeroed fp32 accumulator, and a key-row bias is the logit's FFMA addend (logits.cuh),
so the builds' gradients are bitwise equal. Default mode: each build against the reference.
Cases: the ring of two slots (d64, d128 without a bias) and of one (d128 with a full bias tile,
with and without a mask), masks that drop whole tiles (they pass the ring with nothing to add,
still taking their turn), causal and window turns, GQA, Sq past the last 64-row tile, a head
dim padded inside its box (72 of 128: the tensor reduce's columns past 72 are out of
bounds)."""

from __future__ import annotations

import pytest
from test_backward import _qkv, _run_dense

from dmattn_cupy import backward

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("bwd_sm90_only")]

BUILDS = ("", "DM_SM90_BWD_DQ_WRITER=0")


def _build(monkeypatch, defines: str, q, k, v, **kw):
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", defines)
    before = backward.launches["bwd_sm90"]
    grads = _run_dense(q, k, v, **kw)
    assert backward.launches["bwd_sm90"] > before, f"bwd_sm90 did not run ({defines!r})"
    return grads


def _block_mask(b, h, sq, sk, seed):
    """Random elements, then whole 64 x 128 blocks dropped (tiles with nothing to add)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, h, sq, sk, generator=g) < 0.8
    for (i, j) in ((0, 0), (2, 1), (4, 3)):
        mask[:, :, 64 * i:64 * i + 64, 128 * j:128 * j + 128] = False
    return mask.to("cuda")


def _case(name):
    """(q, k, v, keyword arguments of the call) of each case."""
    if name == "d128":
        q, k, v = _qkv(2, 330, 600, 4, 2, 128, "bfloat16", seed=41)
        return q, k, v, {"seed": 42}
    if name == "d128_causal":
        q, k, v = _qkv(2, 330, 600, 8, 2, 128, "bfloat16", seed=43)
        return q, k, v, {"seed": 44, "is_causal": True}
    if name == "d128_bias":  # one ring slot, no mask (DM_SM90_BWD_DQ_SHARED_SLOT's case)
        q, k, v = _qkv(2, 330, 608, 4, 2, 128, "bfloat16", seed=53)
        bias = torch.randn(2, 4, 330, 608, device="cuda", dtype=torch.bfloat16)
        return q, k, v, {"seed": 54, "bias": bias}
    if name == "d128_bias_mask":  # one ring slot; dropped tiles
        q, k, v = _qkv(2, 330, 608, 4, 4, 128, "float16", seed=45)
        bias = torch.randn(2, 4, 330, 608, device="cuda", dtype=torch.float16)
        return q, k, v, {"seed": 46, "bias": bias, "mask": _block_mask(2, 4, 330, 608, 47)}
    if name == "d64_kbias_window":
        q, k, v = _qkv(2, 300, 520, 8, 2, 40, "bfloat16", seed=48)
        bias = torch.randn(2, 8, 1, 520, device="cuda", dtype=torch.bfloat16)
        return q, k, v, {"seed": 49, "bias": bias, "mask": _block_mask(2, 8, 300, 520, 50),
                         "window_size": (150, 100)}
    q, k, v = _qkv(1, 200, 400, 2, 1, 72, "bfloat16", seed=51)  # "d72"
    return q, k, v, {"seed": 52, "window_size": (-1, 50)}


CASES = ("d128", "d128_causal", "d128_bias", "d128_bias_mask", "d64_kbias_window", "d72")


def check_builds_bitwise_equal(monkeypatch, case: str, builds) -> None:
    """Deterministic gradients of ``case`` under every one of ``builds`` (DMATTN_NVRTC_DEFINES)
    equal the first build's bit for bit."""
    q, k, v, kw = _case(case)
    ref = None
    for defines in builds:
        got = _build(monkeypatch, defines, q, k, v, deterministic=True, **kw)
        if ref is None:
            ref = got
            continue
        for name, a, b in zip(("dq", "dk", "dv", "dbias"), ref, got, strict=True):
            assert (a is None) == (b is None), name
            if a is None:
                continue
            assert torch.equal(a, b), f"{name} of {defines!r} differs from the default build"


@pytest.mark.parametrize("case", CASES)
def test_deterministic_gradients_are_bitwise_equal_across_builds(monkeypatch, case):
    check_builds_bitwise_equal(monkeypatch, case, BUILDS)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("defines", BUILDS[1:], ids=["consumer_adds"])
def test_default_mode_matches_the_reference(monkeypatch, case, defines):
    q, k, v, kw = _case(case)
    _build(monkeypatch, defines, q, k, v, **kw)
