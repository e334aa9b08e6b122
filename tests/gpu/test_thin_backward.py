"""The thin path's cached backward on the GPU: a second fwd+bwd with the same signature is
served by the cached plans (fastpath.HITS), its gradients pass the float64 reference check, and
dK/dV (one CTA per key tile: no cross-CTA adds) are bit-identical to the first, validated call.
dQ goes through one workspace (dq_accum + dsum; zeroed by the pre kernel, no host fill): a fresh
buffer in the first call, the kept scratch buffer in the second; the post kernel's dQ is torch's
own cast of that accumulator, bit for bit."""

from __future__ import annotations

import pytest
from test_backward import _qkv, _run_dense

import dmattn_cupy as dm
from dmattn_cupy import backward, fastpath, scratch

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["bwd_sm90", "bwd_dkdv"])
@pytest.mark.parametrize("shape", [(1, 128, 1, 1, 64), (2, 70, 4, 2, 64), (1, 91, 3, 3, 128)],
                         ids=["host_case", "gqa_ragged", "d128_odd_heads"])
def test_cached_backward_matches_the_validated_one(monkeypatch, family, shape):
    if family == "bwd_sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a backward runs on compute capability 9.0 only")
    monkeypatch.setenv("DMATTN_BWD_FAMILY", family)
    b, s, h, hk, d = shape
    q, k, v = _qkv(b, s, s, h, hk, d, "bfloat16", seed=s + h)
    fastpath.clear()
    runs = backward.launches[family]
    first = _run_dense(q, k, v, seed=2)
    hits = fastpath.HITS[1]
    again = _run_dense(q, k, v, seed=2)
    assert fastpath.HITS[1] == hits + 1, "the second backward did not take the cached plan"
    assert backward.launches[family] == runs + 1   # counted at planning: planned once
    for a, b_ in zip(first[1:3], again[1:3], strict=True):
        assert torch.equal(a.view(torch.int16), b_.view(torch.int16))
    assert again[0].dtype == q.dtype and again[0].is_contiguous()


@pytest.mark.parametrize("family", ["bwd_sm90", "bwd_dkdv"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(2, 70, 4, 2, 64), (1, 33, 3, 1, 136), (1, 129, 2, 2, 256)],
                         ids=["gqa_d64", "d136", "d256"])
def test_post_kernel_dq_is_torch_s_cast_of_the_accumulator(monkeypatch, family, dtype, shape):
    """The cached call's workspace is the kept scratch buffer and still holds dq_accum after
    the step: dQ must equal ``dq_accum.to(dtype)`` bit for bit (cvt.rn in both)."""
    if family == "bwd_sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a backward runs on compute capability 9.0 only")
    monkeypatch.setenv("DMATTN_BWD_FAMILY", family)
    b, s, h, hk, d = shape
    q, k, v = _qkv(b, s, s, h, hk, d, dtype, seed=s + d)
    fastpath.clear()
    scratch.clear()
    _run_dense(q, k, v, seed=3)
    hits = fastpath.HITS[1]
    dq = _run_dense(q, k, v, seed=3)[0]
    assert fastpath.HITS[1] == hits + 1 and len(scratch._bufs) == 1
    (_, ws), = scratch._bufs.values()
    acc = ws[:q.numel()].view(q.shape)
    assert torch.isfinite(acc).all() and acc.abs().sum() > 0
    assert torch.equal(dq.view(torch.int16), acc.to(q.dtype).view(torch.int16))


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_retain_graph_backward_twice(bias):
    """A cached step's backward run twice over one graph (retain_graph) returns the same
    values into buffers of its own each time (the first gradients are left as they were),
    bit for bit the validated first step's."""
    q, k, v = _qkv(1, 128, 128, 2, 1, 64, "bfloat16", seed=7)
    gen = torch.Generator().manual_seed(9)
    leaves = [x.requires_grad_(True) for x in (q, k, v)]
    if bias:
        leaves.append(torch.randn(1, 2, 128, 128, generator=gen).to(q).requires_grad_(True))
    kw = {"attn_bias": leaves[3]} if bias else {}
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(8)).to(q)
    fastpath.clear()
    validated = torch.autograd.grad(dm.flash_dmattn_func(q, k, v, deterministic=True, **kw),
                                    leaves, dout)
    out = dm.flash_dmattn_func(q, k, v, deterministic=True, **kw)
    hits = fastpath.HITS[1]
    first = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    assert fastpath.HITS[1] == hits + 1
    kept = [g.clone() for g in first]
    second = torch.autograd.grad(out, leaves, dout)
    assert fastpath.HITS[1] == hits + 2
    torch.cuda.synchronize()
    for a, b_, c, w in zip(first, second, kept, validated, strict=True):
        assert a.data_ptr() != b_.data_ptr()
        for x in (b_, c, w):
            assert torch.equal(a.view(torch.int16), x.view(torch.int16))
