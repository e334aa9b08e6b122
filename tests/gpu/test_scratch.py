"""Reused workspaces (dmattn_cupy.scratch) on the GPU. Cached calls run their split-KV partials
and the backward's dq_accum + dsum on one kept buffer per (stream, thread), which holds the
previous call's data. Poisoned with NaN before each cached call, it must still give the same
bits as the validated call (decode: every partial is written before the combine reads it) and
gradients that pass the float64 reference (backward: the pre kernel zeroes dq_accum; nothing
zero-fills it on the host any more). A CUDA graph captured after the warm-up must not use the
kept buffer: eager calls that overwrite it between replays leave the replay's answer intact."""

from __future__ import annotations

import numpy as np
import pytest
from test_backward import _qkv, _run_dense

import dmattn_cupy as dm
from dmattn_cupy import fastpath, scratch

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


def _poison() -> int:
    n = 0
    for _, buf in scratch._bufs.values():
        buf.fill_(float("nan"))
        n += 1
    return n


def _decode_inputs(seed: int, splits_keys: int = 4096):
    g = torch.Generator().manual_seed(seed)
    H, Hk, D, Sk = 32, 8, 128, splits_keys

    def r(*shape):
        return torch.randn(*shape, generator=g).to("cuda", torch.bfloat16)

    return r(1, H, D), r(Sk, Hk, D), r(Sk, Hk, D), r(Sk, Hk)


@pytest.mark.parametrize("splits", ["auto", "7"])
def test_decode_on_a_poisoned_kept_buffer_matches_the_validated_call(monkeypatch, splits):
    monkeypatch.setenv("DMATTN_NUM_SPLITS", splits)
    q, k, v, bias = _decode_inputs(1)
    Sk = k.shape[0]
    cu_q = torch.tensor([0, 1], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, Sk], device="cuda", dtype=torch.int32)

    def call():
        return dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, 1, Sk, attn_bias=bias,
                                           return_lse=True)

    fastpath.clear()
    scratch.clear()
    want = call()                       # validated: its own fresh partials
    call()                              # cached: creates the kept buffer
    torch.cuda.synchronize()
    assert _poison() == 1, "the cached decode did not use a kept buffer"
    hits = fastpath.HITS[0]
    got = call()
    torch.cuda.synchronize()
    assert fastpath.HITS[0] == hits + 1
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["bwd_sm90", "bwd_dkdv"])
@pytest.mark.parametrize("shape", [(1, 128, 1, 1, 64), (2, 70, 4, 2, 96), (1, 91, 3, 3, 128)])
def test_backward_on_a_poisoned_kept_buffer_passes_the_reference(monkeypatch, family, shape):
    if family == "bwd_sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a backward runs on compute capability 9.0 only")
    monkeypatch.setenv("DMATTN_BWD_FAMILY", family)
    b, s, h, hk, d = shape
    q, k, v = _qkv(b, s, s, h, hk, d, "bfloat16", seed=s + d)
    fastpath.clear()
    scratch.clear()
    _run_dense(q, k, v, seed=3)          # validated
    _run_dense(q, k, v, seed=3)          # cached: the kept buffer now holds dq_accum + dsum
    assert _poison() >= 1, "the cached backward did not use a kept buffer"
    hits = fastpath.HITS[1]
    _run_dense(q, k, v, seed=3)          # reference check inside (NaN would fail it)
    assert fastpath.HITS[1] == hits + 1


def test_a_captured_decode_does_not_use_the_kept_buffer(monkeypatch):
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "8")
    q, k, v, bias = _decode_inputs(2)
    Sk = k.shape[0]
    cu_q = torch.tensor([0, 1], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, Sk], device="cuda", dtype=torch.int32)

    def call():
        return dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, 1, Sk, attn_bias=bias)

    fastpath.clear()
    scratch.clear()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    kept = {key: buf.data_ptr() for key, (_, buf) in scratch._bufs.items()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = call()
    torch.cuda.synchronize()
    assert {key: buf.data_ptr() for key, (_, buf) in scratch._bufs.items()} == kept
    graph.replay()
    torch.cuda.synchronize()
    want = static.clone()
    # eager calls (on a side stream, with other inputs) overwrite the kept buffers
    q2, k2, v2, b2 = _decode_inputs(3)
    with torch.cuda.stream(s):
        dm.flash_dmattn_varlen_func(q2, k2, v2, cu_q, cu_k, 1, Sk, attn_bias=b2)
    graph.replay()
    with torch.cuda.stream(s):
        dm.flash_dmattn_varlen_func(q2, k2, v2, cu_q, cu_k, 1, Sk, attn_bias=b2)
    torch.cuda.synchronize()
    assert torch.equal(static, want)


def test_calls_routed_to_a_private_pool_keep_nothing_there(monkeypatch):
    """While torch routes a thread's allocations to a private pool (as inductor's CUDA-graph
    trees do while they warm a graph up), calls keep no workspace, counter or mask upload:
    once their outputs are gone the pool holds nothing. The same calls outside the pool do
    keep them (a split decode's partials, the Hopper forward's counter, the backward's
    dq_accum, a block mask's lists)."""
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "8")
    q, k, v, bias = _decode_inputs(4)
    Sk = k.shape[0]
    cu_q = torch.tensor([0, 1], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, Sk], device="cuda", dtype=torch.int32)
    qd, kd, vd = _qkv(1, 256, 256, 4, 2, 128, "bfloat16", seed=5)
    pattern = np.tril(np.ones((2, 2), dtype=bool))
    pattern[1, 0] = False
    block = dm.BlockBitsetMask(pattern, 256, 256, block_size=(128, 128))

    def calls():
        for _ in range(3):   # validated, then cached
            dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, 1, Sk, attn_bias=bias)
            out, lse = dm.flash_dmattn_func(qd, kd, vd, is_causal=True, return_lse=True)
            dm.flash_dmattn_backward(out, qd, kd, vd, out, lse, is_causal=True)
            dm.flash_dmattn_func(qd, kd, vd, sparse_mask=block)

    fastpath.clear()
    scratch.clear()
    dev = torch.cuda.current_device()
    pool = torch.cuda.MemPool()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.use_mem_pool(pool):
        calls()
    torch.cuda.synchronize()
    assert not scratch._bufs and not scratch._counters
    assert not block.__dict__.get("_dmattn_device_lists")
    assert not block.__dict__.get(fastpath._TOKEN_ATTR)
    assert torch._C._cuda_checkPoolLiveAllocations(dev, pool.id, set())
    with torch.cuda.stream(s):
        calls()
    torch.cuda.synchronize()
    assert scratch._bufs, "the split decode and the backward kept no workspace"
    assert block.__dict__.get("_dmattn_device_lists"), "the block mask's lists were not kept"
    assert block.__dict__.get(fastpath._TOKEN_ATTR), "the thin path kept no token of the mask"
    if torch.cuda.get_device_capability() == (9, 0):
        assert scratch._counters, "the Hopper forward kept no counter outside the pool"
    scratch.clear()
