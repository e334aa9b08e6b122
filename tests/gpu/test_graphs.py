"""CUDA-graph capture of forward, decode and backward: torch.cuda.graph with torch tensors and
CuPy stream capture with CuPy arrays. After a warm-up (kernels compiled and loaded, plans
cached) a captured call replays bit for bit what the eager call computes, and replaying after
the inputs change in place gives the new answer (the graph reads the inputs' memory, nothing
was baked in on the host). Also: the thin path is what gets captured (its plan is cached), and
the outputs live in the graph's memory pool."""

from __future__ import annotations

import os
import sys

import pytest

import dmattn_cupy as dm
from dmattn_cupy import fastpath

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


def _rand(shape, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to("cuda", dtype)


def _capture(fn, hits=None):
    """Warm up ``fn`` on a side stream (as torch's docs ask), then capture it. ``hits``: a list
    that receives what the captured call alone added to ``fastpath.HITS`` (calls served by a
    cached forward / backward plan)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    before = list(fastpath.HITS)
    with torch.cuda.graph(graph):
        static = fn()
    if hits is not None:
        hits[:] = [n - b for n, b in zip(fastpath.HITS, before, strict=True)]
    torch.cuda.synchronize()
    return graph, static


def _same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
        return
    if a is None:
        assert b is None
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a, b), f"max diff {(a.float() - b.float()).abs().max().item()}"


def _replay_matches_eager(fn, inputs, seed=100):
    """Capture ``fn``; replay == eager; change every input in place; replay == new eager.
    Returns what the captured call alone added to ``fastpath.HITS`` ([forward, backward])."""
    captured = []
    graph, static = _capture(fn, captured)
    graph.replay()
    torch.cuda.synchronize()
    eager = fn()
    torch.cuda.synchronize()
    _same(static, eager)
    before = [x.clone() for x in (static if isinstance(static, tuple) else (static,))]
    with torch.no_grad():
        for i, x in enumerate(inputs):
            if x.dtype == torch.bool:
                x.copy_(torch.rand(x.shape, device="cuda") > 0.3)
            else:
                x.copy_(_rand(x.shape, seed + i, x.dtype))
    graph.replay()
    torch.cuda.synchronize()
    eager2 = fn()
    torch.cuda.synchronize()
    _same(static, eager2)
    after = static if isinstance(static, tuple) else (static,)
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    return captured


FWD_CASES = {
    "dense": dict(),
    "mask_bias": dict(mask=True, bias=True),
    "causal_gqa": dict(is_causal=True, hk=2),
    "bias_lse": dict(bias=True, return_lse=True),
}


@pytest.mark.parametrize("case", list(FWD_CASES))
@pytest.mark.parametrize("d", [64, 128])
def test_forward_graph_torch(case, d, both_forward_families):
    o = dict(FWD_CASES[case])
    B, S, H, hk = 2, 320, 4, o.pop("hk", 4)   # 320: mask/bias rows TMA can read (sm90)
    q, k, v = _rand((B, S, H, d), 1), _rand((B, S, hk, d), 2), _rand((B, S, hk, d), 3)
    inputs = [q, k, v]
    kw = {}
    if o.pop("mask", False):
        kw["attn_mask"] = torch.rand(B, H, S, S, device="cuda") > 0.2
        inputs.append(kw["attn_mask"])
    if o.pop("bias", False):
        kw["attn_bias"] = _rand((B, 1, S, S), 4)
        inputs.append(kw["attn_bias"])
    kw.update(o)

    def fn():
        return dm.flash_dmattn_func(q, k, v, **kw)

    captured = _replay_matches_eager(fn, inputs)
    # the captured call itself was a thin hit (a miss would run the validated path: no count)
    assert captured == [1, 0], f"the captured call was not served by the cached plan: {captured}"
    plans = [e for e in fastpath.forward_plans.values() if e is not None]
    assert plans, "the captured call did not come from a cached plan"
    # the attention kernel's family (a routed attn_mask launches mask_pack/mask_lists first)
    families = [ln.kernel.spec.family for ln in plans[0].plan.launches]
    hopper = torch.cuda.get_device_capability() == (9, 0)
    want = "fwd_sm90" if hopper and both_forward_families == "auto" else "fwd_mma"
    assert want in families and {"fwd_sm90", "fwd_mma"} & set(families) == {want}, families


@pytest.mark.parametrize("combine", ["grid", "kernel"])
@pytest.mark.parametrize("splits", ["1", "4", "auto"])
@pytest.mark.parametrize("layout", ["varlen_key_bias", "dense_key_bias"])
def test_decode_graph_torch(splits, layout, combine, monkeypatch):
    """(``combine``: who merges the split partials: the decode grid, its counters zero-filled
    in the graph, or the combine launch.)"""
    monkeypatch.setenv("DMATTN_NUM_SPLITS", splits)
    monkeypatch.setenv("DMATTN_SPLIT_COMBINE", combine)
    H, Hk, D, Sk, B = 32, 8, 128, 4096, 2
    if layout == "varlen_key_bias":
        q, k, v = _rand((B, H, D), 1), _rand((B * Sk, Hk, D), 2), _rand((B * Sk, Hk, D), 3)
        bias = _rand((B * Sk, Hk), 4)
        cu_q = torch.tensor([0, 1, 2], device="cuda", dtype=torch.int32)
        cu_k = torch.tensor([0, Sk, 2 * Sk], device="cuda", dtype=torch.int32)

        def fn():
            return dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, 1, Sk, attn_bias=bias,
                                               return_lse=True)
    else:
        q, k, v = _rand((B, 1, H, D), 1), _rand((B, Sk, Hk, D), 2), _rand((B, Sk, Hk, D), 3)
        bias = _rand((B, Hk, 1, Sk), 4)

        def fn():
            return dm.flash_dmattn_func(q, k, v, attn_bias=bias, return_lse=True)

    _replay_matches_eager(fn, [q, k, v, bias])


@pytest.mark.parametrize("splits", [1, 0])
@pytest.mark.parametrize("paged", [False, True], ids=["dense_cache", "paged64"])
def test_kvcache_graph_torch(paged, splits):
    """The KV-cache API with an append, a key mask and bias: captured from its cached plan
    (the append rewrites the same cache rows on every replay, so replay == eager holds)."""
    B, H, Hk, D, S, page = 4, 8, 2, 128, 1024, 64
    q, kn, vn = _rand((B, 1, H, D), 1), _rand((B, 2, Hk, D), 2), _rand((B, 2, Hk, D), 3)
    lens = torch.tensor([0, 17, 500, S - 2], device="cuda", dtype=torch.int32)
    table = None
    if paged:
        lead, rows = B * S // page, page
        g = torch.Generator().manual_seed(5)
        table = torch.randperm(lead, generator=g).view(B, S // page).to("cuda", torch.int32)
    else:
        lead, rows = B, S
    kc, vc = _rand((lead, rows, Hk, D), 4), _rand((lead, rows, Hk, D), 5)
    mask = torch.rand(lead, rows, Hk, device="cuda") > 0.3
    bias = _rand((lead, rows, H), 6)

    def fn():
        return dm.flash_dmattn_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=lens,
                                            block_table=table, attn_mask=mask, attn_bias=bias,
                                            num_splits=splits, return_lse=True)

    hits = fastpath.HITS[0]
    captured = _replay_matches_eager(fn, [q, kn, vn, kc, vc, mask, bias])
    assert captured == [1, 0], f"the captured call was not served by the cached plan: {captured}"
    # 3 warm-ups (the first a miss: it builds the plan), the capture, 2 eager calls; the
    # replays run no host code
    assert fastpath.HITS[0] - hits == 5


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_graph_torch(bias, deterministic):
    """Forward + backward through autograd inside torch.cuda.graph (static tensors)."""
    B, S, H, Hk, D = 2, 256, 4, 2, 64
    q = _rand((B, S, H, D), 1).requires_grad_()
    k, v = _rand((B, S, Hk, D), 2).requires_grad_(), _rand((B, S, Hk, D), 3).requires_grad_()
    dout = _rand((B, S, H, D), 5)
    b = _rand((1, H, S, S), 4).requires_grad_() if bias else None
    params = (q, k, v) + ((b,) if bias else ())

    def fn():
        out = dm.flash_dmattn_func(q, k, v, attn_bias=b, is_causal=True,
                                   deterministic=deterministic)
        return (out, *torch.autograd.grad(out, params, dout))

    if deterministic:
        _replay_matches_eager(fn, list(params) + [dout])
        return
    # Default mode: dQ is added into an fp32 buffer in any order (dbias too where several
    # CTAs share an element), so replay equals eager up to the rounding of that sum: a last
    # place of bf16 (rtol 2**-7) plus the fp32 sum's reordering near 0 (atol). The forward,
    # and dK/dV (one CTA per key tile and kv head sums the GQA group in registers, then stores:
    # no atomics, in both backward families), are bit for bit.
    graph, static = _capture(fn)
    with torch.no_grad():
        q.copy_(_rand(q.shape, 9))
    graph.replay()
    torch.cuda.synchronize()
    eager = fn()
    torch.cuda.synchronize()
    _same(static[0], eager[0])        # out
    _same(static[2:4], eager[2:4])    # dk, dv
    for a, e in zip(static[1:2] + static[4:], eager[1:2] + eager[4:], strict=True):   # dq, dbias
        torch.testing.assert_close(a, e, rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_training_step_replays(bias):
    """torch.compile(mode="reduce-overhead") over the attention call: inductor's CUDA-graph
    trees take the forward and the backward AOTAutograd made (no graph skipped), a replayed
    step runs none of our host code, and every step equals eager bit for bit (deterministic
    mode) while all inputs change between steps."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    B, S, H, Hk, D = 2, 256, 4, 2, 64
    shapes = [(B, S, H, D), (B, S, Hk, D), (B, S, Hk, D)] + ([(1, H, S, S)] if bias else [])
    params = [torch.empty(s, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for s in shapes]

    def attention(*p):
        return dm.flash_dmattn_func(*p[:3], attn_bias=p[3] if bias else None, is_causal=True,
                                    deterministic=True)

    compiled = torch.compile(attention, mode="reduce-overhead", fullgraph=True)
    package = os.path.dirname(dm.__file__)
    ours = []   # the functions of this package that a compiled step entered

    def probe(frame, event, _):
        if event == "call" and frame.f_code.co_filename.startswith(package):
            ours.append(frame.f_code.co_name)
    for step in range(5):   # warm-up, recording, then replays
        with torch.no_grad():
            for i, x in enumerate(params):
                x.copy_(_rand(x.shape, 10 * step + i))
        dout = _rand((B, S, H, D), 10 * step + 9)
        torch.compiler.cudagraph_mark_step_begin()
        ours.clear()
        sys.setprofile(probe)
        try:
            out = compiled(*params)
            grads = torch.autograd.grad(out, params, dout)
        finally:
            sys.setprofile(None)
        got = [out.detach().clone(), *(g.clone() for g in grads)]
        ref = attention(*params)
        _same(got, [ref.detach(), *torch.autograd.grad(ref, params, dout)])
        if step == 0:
            assert ours, "the warm-up step never entered dmattn_cupy: the probe is blind"
        if step >= 3:
            assert not ours, f"step {step} is no replay: it ran {sorted(set(ours))[:8]}"
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def _cupy_capture(fn):
    cp = pytest.importorskip("cupy")
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        for _ in range(3):   # warm-up on the capture stream (CuPy's pool is per stream)
            fn()
        s.synchronize()
        s.begin_capture()
        static = fn()
        graph = s.end_capture()
    return s, graph, static


@pytest.mark.parametrize("case", ["dense", "mask_bias", "decode_split", "backward"])
def test_graph_cupy(case, monkeypatch):
    cp = pytest.importorskip("cupy")
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "4")
    rng = cp.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape, dtype=cp.float32).astype(cp.float16)

    B, S, H, D = 2, 200, 4, 64
    Sq = 1 if case == "decode_split" else S
    Sk = 3000 if case == "decode_split" else S
    q, k, v = r(B, Sq, H, D), r(B, Sk, H, D), r(B, Sk, H, D)
    kw = {}
    inputs = [q, k, v]
    if case in ("mask_bias", "decode_split"):
        kw["attn_bias"] = r(B, 1, 1, Sk) if case == "decode_split" else r(B, H, Sq, Sk)
        inputs.append(kw["attn_bias"])
    if case == "mask_bias":
        kw["attn_mask"] = rng.random((B, 1, Sq, Sk)) > 0.2
    if case == "backward":
        dout = r(B, Sq, H, D)
        inputs.append(dout)

        def fn():
            out, lse = dm.flash_dmattn_func(q, k, v, return_lse=True, is_causal=True)
            dq, dk, dv, _ = dm.flash_dmattn_backward(dout, q, k, v, out, lse, is_causal=True,
                                                     deterministic=True)
            return out, dq, dk, dv
    else:
        def fn():
            return dm.flash_dmattn_func(q, k, v, **kw)

    s, graph, static = _cupy_capture(fn)
    static = static if isinstance(static, tuple) else (static,)
    with s:
        graph.launch(s)
        s.synchronize()
        eager = fn()
        eager = eager if isinstance(eager, tuple) else (eager,)
        s.synchronize()
        for a, e in zip(static, eager, strict=True):
            assert cp.array_equal(a, e)
        before = [a.copy() for a in static]
        for i, x in enumerate(inputs):
            x[...] = cp.random.default_rng(10 + i).standard_normal(x.shape,
                                                                   dtype=cp.float32)
        graph.launch(s)
        s.synchronize()
        eager = fn()
        eager = eager if isinstance(eager, tuple) else (eager,)
        s.synchronize()
        for a, e in zip(static, eager, strict=True):
            assert cp.array_equal(a, e)
        assert any(not cp.array_equal(a, b) for a, b in zip(static, before, strict=True))


@pytest.mark.parametrize("case", ["dense", "mask_bias", "decode", "varlen", "fwd_bwd"])
def test_thin_path_matches_the_validated_first_call(case, both_forward_families, monkeypatch):
    """The first call with a signature (validated, plan built) and the next ones (cached plan,
    new arrays of the same signature) give the bits the validated path gives those arrays."""
    monkeypatch.delenv("DMATTN_CHECK", raising=False)   # its host check keeps varlen uncached
    B, S, H, Hk, D = 2, 333, 4, 2, 128
    Sq = 1 if case == "decode" else S

    def make(seed):
        t = [_rand((B, Sq, H, D), seed), _rand((B, S, Hk, D), seed + 1),
             _rand((B, S, Hk, D), seed + 2)]
        if case in ("mask_bias", "decode"):
            t.append(_rand((B, Hk, Sq, S), seed + 3))
        if case == "varlen":
            t = [x.reshape(B * x.shape[1], *x.shape[2:]) for x in t]
        if case == "fwd_bwd":
            t = [x.requires_grad_() for x in t] + [_rand((B, Sq, H, D), seed + 4)]
        return t

    cu = torch.tensor([0, 100, 2 * S], device="cuda", dtype=torch.int32)
    mask = torch.rand(B, 1, Sq, S, device="cuda") > 0.3

    def run(t):
        if case == "varlen":
            return dm.flash_dmattn_varlen_func(*t[:3], cu, cu, 2 * S - 100, 2 * S - 100,
                                               is_causal=True,
                                               return_lse=True)
        if case == "fwd_bwd":
            out = dm.flash_dmattn_func(*t[:3], deterministic=True)
            return (out, *torch.autograd.grad(out, t[:3], t[3]))
        kw = dict(attn_bias=t[3]) if len(t) > 3 else {}
        if case == "mask_bias":
            kw["attn_mask"] = mask
        return dm.flash_dmattn_func(*t[:3], return_lse=True, **kw)

    a, b = make(1), make(50)
    first_a = run(a)                      # validated, plan built
    hits = list(fastpath.HITS)
    thin_b = run(b)                       # cached plan, other arrays
    thin_a = run(a)
    torch.cuda.synchronize()
    # both served by the cached plans (fwd_bwd: the backward's too), not the validated path
    want = [hits[0] + 2, hits[1] + (2 if case == "fwd_bwd" else 0)]
    assert fastpath.HITS == want, f"HITS {fastpath.HITS}, want {want}"
    fastpath.clear()
    first_b = run(b)                      # validated again, for b
    torch.cuda.synchronize()
    _same(thin_a, first_a)
    _same(thin_b, first_b)
