"""Host-cost cases (``--suite host``): host time per call with tiny shapes and cached kernels,
and the wall time of the first forward + backward in a new process.

How it is measured: after a warm-up (kernels compiled and cached, plans built), N calls are
made back to back with one synchronize at the end; time per call = elapsed wall time / N,
the median of 5 such runs (min / max shown). With shapes this small the GPU finishes each
call before the host issues the next, so the number is the host-side cost of a call (argument
checks, plan lookup, allocation, launch). 'first call' runs a fresh Python process (imports,
first forward + backward, synchronize) and reports its wall time; the kernel disk cache
(DMATTN_CACHE_DIR) is whatever this machine has, normally warm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cases import CASES, case_shape
from .common import reason, torch_dtype, tr
from .ctx import Ctx
from .report import CaseResult, ImplResult

Maker = Callable[[], Callable[[], Any]]


def _calls(ctx: Ctx) -> int:
    n = 200 if ctx.args.quick else 2000
    return n if ctx.cuda else min(n, max(1, ctx.args.repeat) * 10)


def _row(ctx: Ctx, res: CaseResult, name: str, role: str, make: Maker, note: str = "") -> None:
    r = ImplResult(name=name, role=role, note=note)
    res.impls.append(r)
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn = make()
            t0 = time.perf_counter()
            fn()
            ctx.sync()
            r.first_call_s = time.perf_counter() - t0
        hits = _thin_hits(ctx) if role in ("dmattn", "variant") else None
        tm = ctx.host_per_call(fn, _calls(ctx))
        r.wall_ms, r.ms_min, r.ms_p90, r.reps = (tm["wall_ms"], tm["ms_min"], tm["ms_p90"],
                                                 tm["reps"])
        if hits is not None:  # how many forward / backward calls cached plans served
            now = _thin_hits(ctx)
            done, bwd = now[0] - hits[0], now[1] - hits[1]
            calls = tm["reps"] + max(ctx.args.warmup, 3)   # host_per_call warms up too
            r.note = (r.note + "; " if r.note else "") + f"thin path {done}/{calls} calls" + (
                f", backward {bwd}/{calls}" if bwd else "")
    except Exception as e:  # noqa: BLE001
        r.status = ("n/a" if role.startswith("peer") or not isinstance(e, RuntimeError)
                    else "error")
        r.note = reason(e, caught)


def _thin_hits(ctx: Ctx) -> list[int] | None:
    fp = sys.modules.get("dmattn_cupy.fastpath")
    return list(fp.HITS) if fp is not None and ctx.cuda else None


def _qkv(ctx: Ctx, shape: dict[str, Any], grad: bool = False) -> tuple[Any, Any, Any]:
    torch = ctx.torch
    dt = torch_dtype(torch, shape["dtype"])
    B, H, Hk, S, Sk, D = (shape[k] for k in ("batch", "heads", "kv_heads", "seqlen",
                                             "seqlen_k", "headdim"))
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.args.seed)
    q, k, v = (torch.randn(B, s, h, D, generator=gen, device=ctx.device, dtype=dt)
               for s, h in ((S, H), (Sk, Hk), (Sk, Hk)))
    if grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v


def _sdpa(ctx: Ctx, q: Any, k: Any, v: Any, **kw: Any) -> Any:
    """SDPA on (B,S,H,D) tensors with torch's own backend choice."""
    F = ctx.torch.nn.functional
    if k.shape[2] != q.shape[2]:
        kw["enable_gqa"] = True
    return F.scaled_dot_product_attention(tr(q), tr(k), tr(v), **kw)


def _host_fwd(ctx: Ctx, res: CaseResult, shape: dict[str, Any]) -> None:
    q, k, v = _qkv(ctx, shape)

    def dm_torch() -> Callable[[], Any]:
        f = ctx.dm_attr("flash_dmattn_func")
        return lambda: f(q, k, v)

    def dm_cupy() -> Callable[[], Any]:
        import cupy

        f = ctx.dm_attr("flash_dmattn_func")
        qc, kc, vc = (cupy.from_dlpack(x) for x in (q, k, v))
        return lambda: f(qc, kc, vc)

    _row(ctx, res, "dmattn (torch tensors)", "dmattn", dm_torch)
    _row(ctx, res, "dmattn (CuPy arrays)", "variant", dm_cupy)
    _row(ctx, res, "floor: torch.empty_like(q)", "floor", lambda: lambda: ctx.torch.empty_like(q),
         "one allocation, no launch: torch's own cost per op")
    _peers_fwd(ctx, res, q, k, v)


def _peers_fwd(ctx: Ctx, res: CaseResult, q: Any, k: Any, v: Any, **sdpa_kw: Any) -> None:
    _row(ctx, res, "sdpa (torch's backend choice)", "peer", lambda: lambda: _sdpa(
        ctx, q, k, v, **sdpa_kw))
    if "fa4" in ctx.peers:
        def fa4() -> Callable[[], Any]:
            f = ctx.fa4()
            return lambda: f(q, k, v)[0]

        _row(ctx, res, "fa4", "peer", fa4, "no bias" if sdpa_kw else "")


def _host_decode(ctx: Ctx, res: CaseResult, shape: dict[str, Any]) -> None:
    torch = ctx.torch
    dt = torch_dtype(torch, shape["dtype"])
    H, Hk, Sq, Sk, D = (shape[k] for k in ("heads", "kv_heads", "seqlen", "seqlen_k",
                                           "headdim"))
    q, k, v = _qkv(ctx, dict(shape, batch=1))
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.args.seed + 1)
    bias = torch.randn(Sk, Hk, generator=gen, device=ctx.device, dtype=dt)
    cu_q = torch.tensor([0, Sq], device=ctx.device, dtype=torch.int32)
    cu_k = torch.tensor([0, Sk], device=ctx.device, dtype=torch.int32)
    q1, k1, v1 = q[0], k[0], v[0]

    def dm_varlen() -> Callable[[], Any]:
        f = ctx.dm_attr("flash_dmattn_varlen_func")
        return lambda: f(q1, k1, v1, cu_q, cu_k, Sq, Sk, attn_bias=bias)

    def dm_dense() -> Callable[[], Any]:
        f = ctx.dm_attr("flash_dmattn_func")
        b = bias.t().reshape(1, Hk, 1, Sk)
        return lambda: f(q, k, v, attn_bias=b)

    def dm_kvcache() -> Callable[[], Any]:
        """The same keys as a paged KV cache (pages of 64, in order) with the key bias."""
        f = ctx.dm_attr("flash_dmattn_with_kvcache")
        pages = Sk // 64
        kc, vc = k.reshape(pages, 64, Hk, D), v.reshape(pages, 64, Hk, D)
        table = torch.arange(pages, device=ctx.device, dtype=torch.int32).reshape(1, pages)
        lens = torch.full((1,), Sk, device=ctx.device, dtype=torch.int32)
        bc = bias.reshape(pages, 64, Hk)
        return lambda: f(q, kc, vc, cache_seqlens=lens, block_table=table, attn_bias=bc)

    def dm_varlen_cupy() -> Callable[[], Any]:
        import cupy

        f = ctx.dm_attr("flash_dmattn_varlen_func")
        a = [cupy.from_dlpack(x) for x in (q1, k1, v1, cu_q, cu_k, bias)]
        return lambda: f(a[0], a[1], a[2], a[3], a[4], Sq, Sk, attn_bias=a[5])

    _row(ctx, res, "dmattn varlen (bias (total_k, Hk))", "dmattn", dm_varlen)
    if ctx.cuda:
        _row(ctx, res, "dmattn varlen, CuPy arrays", "variant", dm_varlen_cupy)
    _row(ctx, res, "dmattn dense (bias (1,Hk,1,Sk))", "variant", dm_dense)
    if Sk % 64 == 0:
        _row(ctx, res, "dmattn kvcache (paged 64, bias)", "variant", dm_kvcache)
    am = bias.t().repeat_interleave(H // Hk, dim=0).reshape(1, H, 1, Sk).contiguous()
    _peers_fwd(ctx, res, q, k, v, attn_mask=am)


def capture(torch: Any, run: Callable[[], Any], mode: str = "global") -> tuple[Any, Any]:
    """``run`` warmed up three times on a side stream, then captured by torch.cuda.graph
    (``mode``: its capture_error_mode); returns (the graph, run's output in its pool)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode=mode):
        static = run()
    return graph, static


def _host_fwd_bwd(ctx: Ctx, res: CaseResult, shape: dict[str, Any]) -> None:
    torch = ctx.torch
    q, k, v = _qkv(ctx, shape, grad=True)
    dout = torch.randn_like(q)

    def step(fwd: Callable[[], Any], ours: bool) -> Callable[[], Any]:
        d = dout if ours else tr(dout)
        return lambda: torch.autograd.grad(fwd(), (q, k, v), d)

    def dm() -> Callable[[], Any]:
        f = ctx.dm_attr("flash_dmattn_func")
        return step(lambda: f(q, k, v), True)

    _row(ctx, res, "dmattn fwd+bwd", "dmattn", dm)

    def functional(arrays: Callable[[Any], Any]) -> Maker:
        """A training step outside torch's engine: forward with lse, then the functional
        backward (both thin-path calls), on the tensors ``arrays`` makes."""
        def make() -> Callable[[], Any]:
            f, b = ctx.dm_attr("flash_dmattn_func"), ctx.dm_attr("flash_dmattn_backward")
            qa, ka, va, da = (arrays(x.detach()) for x in (q, k, v, dout))

            def run() -> Any:
                out, lse = f(qa, ka, va, return_lse=True)
                return b(da, qa, ka, va, out, lse)
            return run
        return make

    def as_cupy(x: Any) -> Any:
        import cupy

        return cupy.from_dlpack(x)

    _row(ctx, res, "dmattn fwd+bwd, functional (torch tensors)", "variant",
         functional(lambda x: x), "flash_dmattn_func(return_lse=True) + flash_dmattn_backward")
    if ctx.cuda:
        _row(ctx, res, "dmattn fwd+bwd, functional (CuPy arrays)", "variant",
             functional(as_cupy))

    def floor() -> Callable[[], Any]:
        apply = nop_function(torch).apply   # one class, made once
        return step(lambda: apply(q, k, v), True)

    _row(ctx, res, "floor: no-op autograd.Function", "floor", floor,
         "forward torch.empty_like(q), backward returns dout thrice: torch's own cost")
    _row(ctx, res, "sdpa fwd+bwd (torch's backend choice)", "peer",
         lambda: step(lambda: _sdpa(ctx, q, k, v), False))
    if ctx.cuda:   # the step replayed as CUDA graphs: captured whole, then as torch.compile
        # runs it (in that order: after compiled steps torch 2.11 cannot capture a backward over
        # the same leaves; tools/graph_after_compile.py)
        def graphed(attention: Callable[[], Callable[..., Any]], ours: bool) -> Maker:
            """The whole step captured once by torch.cuda.graph (after a warm-up on the
            capture's side stream); one step = one replay: the least host time a step has."""
            def make() -> Callable[[], Any]:
                f = attention()
                return capture(torch, step(lambda: f(q, k, v), ours))[0].replay
            return make

        def compiled(attention: Callable[[], Callable[..., Any]], ours: bool) -> Maker:
            def make() -> Callable[[], Any]:
                f = torch.compile(attention(), mode="reduce-overhead", fullgraph=True)
                run = step(lambda: f(q, k, v), ours)

                def replay() -> Any:
                    torch.compiler.cudagraph_mark_step_begin()
                    return run()
                return replay
            return make

        for way, wrap, note in (
                ("one captured CUDA graph", graphed,
                 "torch.cuda.graph over forward + autograd.grad: one step = one replay"),
                ("compiled with CUDA graphs", compiled,
                 "torch.compile(mode='reduce-overhead'): one step = a forward and a backward "
                 "replay")):
            _row(ctx, res, f"dmattn fwd+bwd, {way}", "variant",
                 wrap(lambda: ctx.dm_attr("flash_dmattn_func"), True), note)
            _row(ctx, res, f"sdpa fwd+bwd, {way}", "peer-variant",
                 wrap(lambda: lambda q, k, v: _sdpa(ctx, q, k, v), False), note)
    if "fa4" in ctx.peers:
        def fa4() -> Callable[[], Any]:
            f = ctx.fa4()
            return step(lambda: f(q, k, v)[0], True)

        _row(ctx, res, "fa4 fwd+bwd", "peer", fa4)


def nop_function(torch: Any) -> Any:
    """An autograd.Function doing no work: the floor of a custom-op fwd+bwd step."""
    class Nop(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, v: Any) -> Any:
            return torch.empty_like(q)

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            return g, g, g

    return Nop


# The phases a first-call process reports (seconds; the second fwd+bwd in ms).
FIRST_CALL_PHASES = ("torch_import_s", "lib_import_s", "init_s", "first_fwd_s",
                     "first_bwd_s", "second_ms")

_FIRST_CALL = r"""
import cProfile, io, json, pstats, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
which, device, top = sys.argv[1], sys.argv[2], int(sys.argv[3])
B, H, S, D = map(int, sys.argv[4:8])
if which == "dmattn":
    import dmattn_cupy as dm
    f = lambda q, k, v: dm.flash_dmattn_func(q, k, v)
else:
    F = torch.nn.functional
    f = lambda q, k, v: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
if device == "stub":
    from host_profile import stub_gpu
    stub = stub_gpu()  # held: a dropped context manager's generator closes and unpatches
    stub.__enter__()
t2 = time.perf_counter()
q, k, v = (torch.randn(B, S, H, D, device="cpu" if device == "stub" else device,
                       dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
sync()
t3 = time.perf_counter()
prof = cProfile.Profile() if top else None
if prof:
    prof.enable()
out = f(q, k, v)
sync()
t4 = time.perf_counter()
torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
sync()
t5 = time.perf_counter()
if prof:
    prof.disable()
out = f(q, k, v)
torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
sync()
t6 = time.perf_counter()
print("RESULT " + json.dumps({"torch_import_s": t1 - t0, "lib_import_s": t2 - t1,
                              "init_s": t3 - t2, "first_fwd_s": t4 - t3, "first_bwd_s": t5 - t4,
                              "second_ms": (t6 - t5) * 1e3}))
if prof:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(top)
    print(s.getvalue())
"""

# The same phases for a CuPy user without torch: ``import torch`` is blocked (torch_import_s 0,
# lib_import_s is CuPy's import and the library's), fp16 CuPy arrays, and the training step is
# the functional one (forward with lse, then flash_dmattn_backward). Inputs are copied from
# NumPy: CuPy's random and astype kernels are compiled at a machine's first use (into CuPy's
# own cache), which torch.randn in the torch script never does.
_FIRST_CALL_CUPY = r"""
import json, sys, time
sys.modules["torch"] = None   # as if torch were not installed: its import raises ImportError
t1 = time.perf_counter()
import cupy
import dmattn_cupy as dm
t2 = time.perf_counter()
import numpy
B, H, S, D = map(int, sys.argv[4:8])
rng = numpy.random.default_rng(0)
q, k, v = (cupy.asarray(rng.standard_normal((B, S, H, D), dtype=numpy.float32)
                        .astype(numpy.float16)) for _ in range(3))
dout = cupy.asarray(numpy.ones((B, S, H, D), numpy.float16))
sync = cupy.cuda.Device().synchronize
sync()
t3 = time.perf_counter()
out, lse = dm.flash_dmattn_func(q, k, v, return_lse=True)
sync()
t4 = time.perf_counter()
dm.flash_dmattn_backward(dout, q, k, v, out, lse)
sync()
t5 = time.perf_counter()
out, lse = dm.flash_dmattn_func(q, k, v, return_lse=True)
dm.flash_dmattn_backward(dout, q, k, v, out, lse)
sync()
t6 = time.perf_counter()
print("RESULT " + json.dumps({"torch_import_s": 0.0, "lib_import_s": t2 - t1,
                              "init_s": t3 - t2, "first_fwd_s": t4 - t3, "first_bwd_s": t5 - t4,
                              "second_ms": (t6 - t5) * 1e3}))
"""


def run_first_call(which: str, device: str = "cuda", top: int = 0,
                   dims: tuple[int, int, int, int] = (1, 1, 128, 64)
                   ) -> tuple[dict[str, float], str, float]:
    """A new Python process's first forward + backward of ``which`` ("dmattn" or "sdpa" on
    (B, H, S, D) = ``dims`` bf16 torch tensors; "dmattn-cupy": fp16 CuPy arrays with torch's
    import blocked, CUDA only): its phases (FIRST_CALL_PHASES), what it printed after
    them (cProfile's ``top`` functions of the first fwd+bwd when ``top`` > 0) and the process's
    wall seconds. ``device``: cuda, cpu, or stub (CPU tensors posing as CUDA with every GPU
    call a no-op: tools/host_profile.stub_gpu). RuntimeError when the process fails."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join((str(root), str(root / "tools"),
                                         env.get("PYTHONPATH", "")))
    t0 = time.perf_counter()
    script = _FIRST_CALL_CUPY if which == "dmattn-cupy" else _FIRST_CALL
    p = subprocess.run([sys.executable, "-c", script, which, device, str(top),
                        *map(str, dims)], env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    lines = p.stdout.splitlines()
    res = [i for i, ln in enumerate(lines) if ln.startswith("RESULT ")]
    if p.returncode or not res:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise RuntimeError(f"{which} on {device}: exit {p.returncode}: {tail}")
    return json.loads(lines[res[-1]][7:]), "\n".join(lines[res[-1] + 1:]), wall


def _host_first_call(ctx: Ctx, res: CaseResult, shape: dict[str, Any]) -> None:
    dims = (int(shape["batch"]), int(shape["heads"]), int(shape["seqlen"]),
            int(shape["headdim"]))
    for which, role in (("dmattn", "dmattn"), ("dmattn-cupy", "variant"), ("sdpa", "peer")):
        name = ("dmattn first fwd+bwd, CuPy without torch" if which == "dmattn-cupy" else
                f"{which} first fwd+bwd, new process")
        r = ImplResult(name=name, role=role)
        res.impls.append(r)
        if not ctx.cuda:
            r.status, r.note = "n/a", "needs a CUDA device"
            continue
        try:
            d, _, wall = run_first_call(which, "cuda", dims=dims)
        except RuntimeError as e:
            r.status = "n/a" if role == "peer" else "error"
            r.note = str(e)
            continue
        r.wall_ms = r.ms_min = r.ms_p90 = wall * 1e3
        r.first_call_s = d["first_fwd_s"] + d["first_bwd_s"]
        r.reps = 1
        imports = d["torch_import_s"] + d["lib_import_s"]
        r.note = (f"process wall {wall:.2f} s: import {imports:.2f} s"
                  f"{' (CuPy + library; torch blocked)' if which == 'dmattn-cupy' else ''}"
                  f", CUDA init + inputs "
                  f"{d['init_s']:.2f} s, first fwd {d['first_fwd_s']:.3f} s, first bwd "
                  f"{d['first_bwd_s']:.3f} s, second {d['second_ms']:.2f} ms")


_RUN = {"host_fwd": _host_fwd, "host_decode": _host_decode, "host_fwd_bwd": _host_fwd_bwd,
        "host_first_call": _host_first_call}


def run_host_case(ctx: Ctx, name: str) -> CaseResult:
    t0 = time.perf_counter()
    shape = case_shape(name, ctx.args)
    res = CaseResult(name=name, title=CASES[name], params=dict(shape), metric="us")
    res.info.append("host us = wall time per call of back-to-back calls, one synchronize at "
                    "the end, median of 5 runs" if name != "host_first_call" else
                    "host us = wall time of a whole new Python process (see note)")
    ctx.new_case()
    try:
        _RUN[name](ctx, res, shape)
    except Exception as e:  # noqa: BLE001
        res.error = reason(e)
    res.elapsed_s = time.perf_counter() - t0
    return res
