"""Autograd with block sparse masks on the thin launch path: a second fwd+bwd step with the same
signature is served by the cached forward and backward plans (fastpath.HITS), with the mask's
list pointers patched in; its gradients pass float64 autograd's check of the dense formulation
(test_backward's FlashAttention rule), and dK/dV (one CTA per key tile: no cross-CTA adds) are
the validated custom-op route's bits. Both backward families: bwd_sm90 walking the lists
(DMATTN_SM90_BWD_SPARSE=1, the default), bwd_sm90 declining them (=0) and the portable bwd_dkdv
(DMATTN_BWD_FAMILY). A DynamicMask updated between steps is seen; updated between a step's
forward and its backward it is not (the step's lists are copied at the forward). A step
captured in a CUDA graph replays bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from test_backward import _attention, _check_grads, _qkv, _run_dense
from test_graphs import _capture

import dmattn_cupy as dm
from dmattn_cupy import autograd, backward, fastpath

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")

pytestmark = pytest.mark.gpu

B, SQ, SK, H, HK = 2, 300, 520, 4, 2
FAMILIES = {"sm90": {"DMATTN_SM90_BWD_SPARSE": "1"},
            "sm90_lists_off": {"DMATTN_SM90_BWD_SPARSE": "0"},
            "dkdv": {"DMATTN_BWD_FAMILY": "bwd_dkdv"}}


@pytest.fixture(params=list(FAMILIES))
def family(request, monkeypatch):
    if request.param != "dkdv" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a backward runs on compute capability 9.0 only")
    for var in ("DMATTN_SM90_BWD_SPARSE", "DMATTN_BWD_FAMILY"):
        monkeypatch.delenv(var, raising=False)
    for var, val in FAMILIES[request.param].items():
        monkeypatch.setenv(var, val)
    return request.param


def _bits(lead, block, seed, p=0.4, sq=SQ, sk=SK):
    rng = np.random.default_rng(seed)
    nrb, ncb = -(-sq // block[0]), -(-sk // block[1])
    bits = rng.random((*lead, nrb, ncb)) < p
    bits[..., :, 0] = True
    bits[..., 1, :] = False            # a block row nothing lists: zero dQ there
    return bits


def _dense(seed, lead=(), sq=SQ, sk=SK):
    rng = np.random.default_rng(seed)
    d = rng.random((*lead, sq, sk)) < 0.5
    d[..., :128, :128] = True
    d[..., 128:256, 256:] = False
    return d


def _mask(kind, block=(128, 128), seed=0):
    if kind == "bitset":
        return dm.BlockBitsetMask(_bits((), block, seed), SQ, SK, block_size=block)
    if kind == "bitset_h":
        return dm.BlockBitsetMask(_bits((1, H), block, seed), SQ, SK, block_size=block)
    if kind == "bcsr":
        return dm.BCSRMask.from_dense_mask(_dense(seed), block_size=block)
    if kind == "mixed":
        return dm.MixedMask.from_dense_mask(_dense(seed, (B, H)), block_size=block)
    if kind == "dynamic":
        return dm.DynamicMask(cupy.asarray(_bits((B, H), block, seed)), SQ, SK,
                              block_size=block)
    if kind == "bitset&bcsr":
        return _mask("bitset", block, seed) & _mask("bcsr", block, seed + 1)
    if kind == "causal&bitset_h":
        return dm.CausalMask(SQ, SK) & _mask("bitset_h", block, seed)
    raise AssertionError(kind)


KINDS = ["bitset", "bitset_h", "bcsr", "mixed", "dynamic", "bitset&bcsr", "causal&bitset_h"]


def _validated_dkdv(q, k, v, b, m, seed):
    """dK, dV of the custom-op route (run_forward / run_backward with the lists)."""
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(q)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = autograd.dense(*leaves, None, b, None, False, (-1, -1), 0.0, m, False, False, "auto")
    out.backward(dout)
    return leaves[1].grad, leaves[2].grad


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("block", [(128, 128), (64, 128)], ids=["128x128", "64x128"])
@pytest.mark.parametrize("kind", KINDS)
def test_steps_hit_and_match_the_reference(family, kind, block, bias):
    q, k, v = _qkv(B, SQ, SK, H, HK, 64, "bfloat16", seed=3)
    m = _mask(kind, block, seed=1)
    b = torch.randn(B, H, SQ, SK, generator=torch.Generator().manual_seed(4)).to(
        "cuda", torch.bfloat16) if bias else None
    fastpath.clear()
    runs = dict(backward.launches)
    first = _run_dense(q, k, v, bias=b, seed=2, sparse_mask=m)
    hits = list(fastpath.HITS)
    again = _run_dense(q, k, v, bias=b, seed=2, sparse_mask=m)
    assert fastpath.HITS == [hits[0] + 1, hits[1] + 1], "the step did not take the cached plans"
    ran = {f: backward.launches[f] - runs.get(f, 0) for f in ("bwd_sm90", "bwd_dkdv")}
    # planned once (a hit plans nothing); a MixedMask's partial blocks (an `&` of block masks
    # is one) too: bwd_sm90's listed-bits specs read their element bits
    sm90 = family == "sm90"
    assert ran == {"bwd_sm90": int(sm90), "bwd_dkdv": int(not sm90)}
    for a, c in zip(first[1:3], again[1:3], strict=True):
        assert torch.equal(a.view(torch.int16), c.view(torch.int16))
    vk, vv = _validated_dkdv(q, k, v, b, m, seed=2)
    assert torch.equal(again[1].view(torch.int16), vk.view(torch.int16))
    assert torch.equal(again[2].view(torch.int16), vv.view(torch.int16))
    if b is not None:   # a (B, H, Sq, Sk) bias: each dbias element stored once by one CTA
        assert torch.equal(again[3].view(torch.int16), first[3].view(torch.int16))


@pytest.mark.parametrize("h,hk", [(4, 4), (8, 1)], ids=["g1", "g8"])
def test_gqa_deterministic_hits_are_bitwise_stable(family, h, hk):
    q, k, v = _qkv(1, 512, 768, h, hk, 128, "bfloat16", seed=5)
    m = dm.BlockBitsetMask(_bits((1, h), (128, 128), 6, sq=512, sk=768), 512, 768,
                           block_size=(128, 128))
    fastpath.clear()
    first = _run_dense(q, k, v, seed=7, sparse_mask=m, deterministic=True)   # validated
    hits = list(fastpath.HITS)
    g1 = _run_dense(q, k, v, seed=7, sparse_mask=m, deterministic=True)
    g2 = _run_dense(q, k, v, seed=7, sparse_mask=m, deterministic=True)
    assert fastpath.HITS == [hits[0] + 2, hits[1] + 2]
    for a, c, w in zip(g1[:3], g2[:3], first[:3], strict=True):   # the validated call's bits
        assert torch.equal(a, c) and torch.equal(a, w)


def _step_grads(q, k, v, m, dout, between=None):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = dm.flash_dmattn_func(*leaves, sparse_mask=m)
    if between is not None:
        between()
    out.backward(dout)
    torch.cuda.synchronize()
    return [x.grad for x in leaves]


def test_dynamic_mask_updates_between_steps_and_before_backward(family):
    block = (128, 128)
    q, k, v = _qkv(B, SQ, SK, H, HK, 64, "bfloat16", seed=11)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).to(q)
    pats = [_bits((B, H), block, s) for s in (20, 21, 22)]
    m = dm.DynamicMask(cupy.asarray(pats[0]), SQ, SK, block_size=block)
    fastpath.clear()
    _step_grads(q, k, v, m, dout)
    scale = 64 ** -0.5

    def check(got, pattern):
        keep = torch.from_numpy(np.array(dm.DynamicMask(pattern, SQ, SK, block_size=block)
                                         .to_dense(), dtype=bool)).cuda()
        _check_grads(got + [None], [q, k, v, None], dout, lambda q_, k_, v_, b_: _attention(
            q_, k_, v_, None, b_, scale, 0.0, (-1, -1), keep))

    for i in (1, 2):      # an update between steps is seen by the next step
        m.update(cupy.asarray(pats[i]))
        hits = list(fastpath.HITS)
        got = _step_grads(q, k, v, m, dout)
        assert fastpath.HITS == [hits[0] + 1, hits[1] + 1]
        check(got, pats[i])
    # an update between a step's forward and its backward reaches neither
    hits = list(fastpath.HITS)
    got = _step_grads(q, k, v, m, dout, between=lambda: m.update(cupy.asarray(pats[0])))
    assert fastpath.HITS == [hits[0] + 1, hits[1] + 1]
    check(got, pats[2])
    m.update(cupy.asarray(pats[2]))
    same = _step_grads(q, k, v, m, dout)
    for a, c in zip(got[1:], same[1:], strict=True):   # dK, dV: the pattern-2 step's bits
        assert torch.equal(a, c)


@pytest.mark.parametrize("kind", ["bitset_h", "mixed", "dynamic"])
def test_step_with_a_block_mask_replays_in_a_cuda_graph(family, kind):
    """Deterministic fwd+bwd captured as a thin hit: replay == eager bit for bit, also after q
    changes in place and (DynamicMask) after an update."""
    q, k, v = _qkv(B, SQ, SK, H, HK, 64, "bfloat16", seed=31)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(32)).to(q)
    m = _mask(kind, seed=3)

    def fn():
        out = dm.flash_dmattn_func(q, k, v, sparse_mask=m, deterministic=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    fastpath.clear()
    captured = []
    graph, static = _capture(fn, captured)
    assert captured == [1, 1], f"the captured step did not take the cached plans: {captured}"
    hits = list(fastpath.HITS)
    for step in range(3):
        if step == 1:
            with torch.no_grad():
                q.copy_(torch.randn_like(q))
        if step == 2 and kind == "dynamic":
            m.update(cupy.asarray(_bits((B, H), (128, 128), 40)))
        graph.replay()
        torch.cuda.synchronize()
        eager = fn()
        torch.cuda.synchronize()
        for a, e in zip(static, eager, strict=True):
            assert torch.equal(a, e), f"max diff {(a.float() - e.float()).abs().max().item()}"
    assert fastpath.HITS == [hits[0] + 3, hits[1] + 3]   # the eager steps hit too
