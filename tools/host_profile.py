"""Host time per call of dmattn_cupy's launch path, stage by stage.

    PYTHONPATH=$PWD python tools/host_profile.py [--stub auto|on|off] [--calls N]

On a machine without a GPU (or with ``--stub on``) the GPU is stubbed: CPU torch tensors pose
as CUDA device 0 (``arrays.describe`` reports device 0 and the tensor's own pointer), device
properties are the sm_90 preset, kernels are never compiled or loaded, launches (CuPy's and
the raw driver launch), tensor-map encodes and the copies of inputs (padded, strided) do
nothing. What is left is the Python work of a call, which is what this measures. With a GPU
and ``--stub off`` (the default there) every stage runs for real on CUDA tensors, launches
included.

Each line is microseconds per call: with a real GPU the median wall time of 5 rounds of N calls
(one synchronize per round); stubbed, the calling thread's CPU time (every stubbed call runs on
it, autograd's backward included), the minimum of 7 rounds, which a busy machine disturbs far
less than wall time. Stages of the forward:
validate (``check_dense``), select (family + spec), params (``build_fwd_params``), sm90 maps
(the Hopper family's tensor-map record), launch (one ``runtime.launch``), then end-to-end rows:
the public forward without and with autograd (the thin path's autograd.Function), a decode
step, forward + backward through ``torch.autograd.grad``, and the thin launch path alone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.bench.host import nop_function  # noqa: E402  (after the path)


class _FakeFunction:
    ptr = 0

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


@contextlib.contextmanager
def stub_gpu() -> Iterator[None]:
    """Make CPU torch tensors look like CUDA device 0 and every GPU call a no-op (see the
    module docstring). Restores everything on exit."""
    import dmattn_cupy  # noqa: F401  (every module loaded before patching)
    from dmattn_cupy import arrays, device, row_pad, runtime, tensor_map
    from dmattn_cupy import compile as dcompile
    from dmattn_cupy.arrays import ArrayInfo

    real_describe = arrays.describe

    def describe(x: Any) -> ArrayInfo:
        info = real_describe(x)
        if info.kind == "torch" and info.device < 0:
            return dataclasses.replace(info, device=0, ptr=int(x.data_ptr()))
        return info

    def get_kernel(spec: Any, dev: int) -> Any:
        ck = dcompile.CompiledKernel(spec=spec, arch=spec.arch, cubin=b"", lowered_name="k",
                                     registers=128, spill_stores=0, spill_loads=0,
                                     stack_frame=0, static_smem=0, log="")
        return runtime.Kernel(spec, dev, _FakeFunction(), ck)

    class _Stream:
        ptr = 0

    def encode(spec: Any, address: int) -> bytes:
        spec.check()
        raw = bytearray(tensor_map.MAP_BYTES)
        raw[8:16] = int(address).to_bytes(8, "little")   # a made-up layout: address at 8
        raw[16:24] = hash(spec).to_bytes(8, "little", signed=True)
        return bytes(raw)

    patches: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        patches.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    for mod in list(sys.modules.values()):
        name = getattr(mod, "__name__", "") or ""
        if name.startswith("dmattn_cupy") and getattr(mod, "describe", None) is real_describe:
            patch(mod, "describe", describe)
    patch(runtime, "device_props", lambda dev: device.PRESETS["sm_90"])
    patch(runtime, "get_kernel", get_kernel)
    patch(runtime, "launch", lambda *a, **k: None)
    patch(runtime, "prefer_shared_memory", lambda k: None)
    patch(runtime, "current_stream", lambda kind, dev: _Stream())
    for opt in ("launch_raw", "stream_ptr", "ensure_device", "stream_capturing"):
        if hasattr(runtime, opt):
            patch(runtime, opt, {"launch_raw": lambda *a: None,
                                 "stream_ptr": lambda kind, dev: 0,
                                 "ensure_device": lambda dev: None,
                                 "stream_capturing": lambda stream: False}[opt])
    for mod in (tensor_map, sys.modules.get("dmattn_cupy.forward_sm90"),
                sys.modules.get("dmattn_cupy.backward_sm90")):
        if mod is not None and hasattr(mod, "encode"):
            patch(mod, "encode", encode)

    def padded_buffer(info: ArrayInfo, stream: Any, like: Any, align: int = 16) -> Any:
        # the buffer and its layout; a copy into it would be a GPU call (a no-op here)
        buf = arrays.empty(like, (arrays.padded_bytes(info, align),), "uint8")
        return buf, dataclasses.replace(arrays.padded_rows(info, align), ptr=int(buf.data_ptr()))

    def strided_copy(info: ArrayInfo, stream: Any, like: Any = None) -> Any:
        buf = arrays.empty(like, tuple(info.shape), info.dtype)   # the copy itself: a no-op
        out = real_describe(buf)
        return buf, dataclasses.replace(info, ptr=out.ptr, strides=out.strides)

    patch(arrays, "padded_buffer", padded_buffer)
    patch(arrays, "padded_copy", padded_buffer)
    patch(arrays, "strided_copy", strided_copy)
    patch(row_pad, "copy_rows", lambda *a: None)
    fastpath = sys.modules.get("dmattn_cupy.fastpath")
    probe = getattr(tensor_map, "address_offset", None)   # the probe caches per map spec

    scratch = sys.modules.get("dmattn_cupy.scratch")

    def reset() -> None:
        if scratch is not None:
            scratch.clear()
        if fastpath is not None:
            fastpath.clear()
        if probe is not None:
            probe.cache_clear()

    reset()
    try:
        yield
    finally:
        for obj, name, old in reversed(patches):
            setattr(obj, name, old)
        reset()


def per_call_us(fn: Callable[[], Any], calls: int, sync: Callable[[], None],
                cpu_clock: bool = False) -> float:
    """Microseconds per call of ``fn``: median wall time of 5 rounds, or with ``cpu_clock``
    the minimum thread CPU time of 7 rounds (see the module docstring)."""
    clock = time.thread_time if cpu_clock else time.perf_counter
    for _ in range(max(3, calls // 20)):
        fn()
    sync()
    runs = []
    for _ in range(7 if cpu_clock else 5):
        t0 = clock()
        for _ in range(calls):
            fn()
        sync()
        runs.append((clock() - t0) * 1e6 / calls)
    return min(runs) if cpu_clock else statistics.median(runs)


# --cprofile: rows whose name contains this text also print cProfile's top functions
_cprofile_match: str | None = None


def _print_cprofile(name: str, fn: Callable[[], Any], calls: int,
                    sync: Callable[[], None]) -> None:
    """cProfile's 25 costliest functions by own time over ``calls`` calls of ``fn``, in us per
    call of ``fn`` (own and cumulative; cProfile's own overhead inflates both)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    sync()
    prof.disable()
    stats = pstats.Stats(prof).stats   # (file, line, function) -> (cc, nc, tt, ct, callers)
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:25]
    print(f"== cProfile: {name} ({calls} calls; us per call: own, cumulative, calls)")
    for (file, line, func), (_, nc, tt, ct, _) in top:
        where = f"{Path(file).name}:{line}({func})" if line else func
        print(f"  {tt * 1e6 / calls:8.2f} {ct * 1e6 / calls:8.2f} {nc / calls:6.1f}  {where}")


def _row_recorder(rows: list[tuple[str, float | None]], calls: int, device: str,
                  sync: Callable[[], None]) -> Callable[[str, Callable[[], Any]], None]:
    """``row(name, fn)``: appends (name, us per call of fn), or the error a stage raised."""
    def row(name: str, fn: Callable[[], Any]) -> None:
        try:
            rows.append((name, per_call_us(fn, calls, sync, cpu_clock=device == "cpu")))
            if _cprofile_match and _cprofile_match in name:
                _print_cprofile(name, fn, calls, sync)
        except Exception as e:  # noqa: BLE001
            rows.append((f"{name} [{type(e).__name__}: {str(e)[:60]}]", None))
    return row


def stages(calls: int, device: str) -> list[tuple[str, float | None]]:
    import torch

    import dmattn_cupy as dm
    from dmattn_cupy import arrays, autograd, forward, runtime
    from dmattn_cupy.arrays import describe
    from dmattn_cupy.layout import build_fwd_params
    from dmattn_cupy.validate import check_dense

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dt = torch.bfloat16
    B, S, H, D = 1, 32, 2, 64    # tiny: on a stubbed GPU the CPU tensors are real work
    q, k, v = (torch.randn(B, S, H, D, device=device, dtype=dt) for _ in range(3))
    rows: list[tuple[str, float | None]] = []
    row = _row_recorder(rows, calls, device, sync)

    pb = check_dense(q, k, v, None, None, None, False, (-1, -1), 0.0, "auto")
    out = torch.empty_like(q)
    oinfo = describe(out)
    row("validate (check_dense)", lambda: check_dense(q, k, v, None, None, None, False,
                                                      (-1, -1), 0.0, "auto"))
    row("select (family + spec)", lambda: forward.select_fwd_spec(pb))
    spec = forward.select_fwd_spec(pb)
    row("params (build_fwd_params)", lambda: build_fwd_params(pb, oinfo, 0))
    row(f"extra args ({spec.family})", lambda: spec.row.extra_args(pb, oinfo, spec))
    row("describe x1 (DLPack-free)", lambda: describe(q))
    row("current stream", lambda: runtime.current_stream("torch", 0))
    kernel = runtime.get_kernel(spec, 0)
    rec = build_fwd_params(pb, oinfo, 0)
    args = (rec[0], *spec.row.extra_args(pb, oinfo, spec))
    stream = runtime.current_stream("torch", 0)
    grid = spec.row.grid(pb, spec, runtime.device_props(0).sm_count)
    row("launch (runtime.launch)", lambda: runtime.launch(kernel, grid, args, stream))
    row("run_forward (validated)", lambda: forward.run_forward(pb, q, return_lse=False))
    row("forward, no grad (api)", lambda: dm.flash_dmattn_func(q, k, v))
    row("forward + lse, no grad (api)", lambda: dm.flash_dmattn_func(q, k, v, return_lse=True))
    causal = dm.CausalWindowMask(16, S, S)  # folded into the window (api._fold_parametric)
    row("forward, sparse_mask=CausalWindowMask (api)",
        lambda: dm.flash_dmattn_func(q, k, v, sparse_mask=causal))
    bits = torch.ones(1, 1, 1, 1, dtype=torch.bool).numpy()
    blocks = dm.BlockBitsetMask(bits, S, S, block_size=(128, 128))  # lists uploaded once
    row("forward, sparse_mask=BlockBitsetMask (api)",
        lambda: dm.flash_dmattn_func(q, k, v, sparse_mask=blocks))
    mask = torch.rand(B, H, S, S, device=device) > 0.1
    bias = torch.randn(B, H, S, S, device=device, dtype=dt)
    row("forward mask+bias, no grad (api)",
        lambda: dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    row("forward, grad (autograd.Function)", lambda: dm.flash_dmattn_func(qg, kg, vg))
    dout = torch.randn_like(q)
    row("fwd+bwd (autograd.grad)", lambda: torch.autograd.grad(
        dm.flash_dmattn_func(qg, kg, vg), (qg, kg, vg), dout))
    qf, kf, vf = q.detach(), k.detach(), v.detach()

    def functional_step() -> Any:  # a training step outside torch's engine
        o, lse = dm.flash_dmattn_func(qf, kf, vf, return_lse=True)
        return dm.flash_dmattn_backward(dout, qf, kf, vf, o, lse)

    row("fwd+bwd, functional (no autograd)", functional_step)
    if device == "cuda":
        # the same calls on CuPy views of the same tensors (7-9 us dearer per call on the
        # H200 host in the bench, fortieth session)
        import cupy

        qc, kc, vc, dc = (cupy.from_dlpack(x) for x in (qf, kf, vf, dout))
        row("forward, no grad, CuPy arrays (api)", lambda: dm.flash_dmattn_func(qc, kc, vc))

        def functional_cupy() -> Any:
            o, lse = dm.flash_dmattn_func(qc, kc, vc, return_lse=True)
            return dm.flash_dmattn_backward(dc, qc, kc, vc, o, lse)

        row("fwd+bwd, functional, CuPy arrays", functional_cupy)
        row("calib: the thin path's CuPy allocator (arrays.allocator)",
            arrays.allocator(qc, tuple(qc.shape), "float16"))
        row("calib: CuPy array .device.id", lambda: qc.device.id)
        row("calib: cupy current stream ptr", lambda: cupy.cuda.get_current_stream(0).ptr)
    row("fwd+bwd, sparse_mask=BlockBitsetMask (autograd.grad)", lambda: torch.autograd.grad(
        dm.flash_dmattn_func(qg, kg, vg, sparse_mask=blocks), (qg, kg, vg), dout))
    # decode step: 1 query, 4096 keys, H32/Hk8, key-based bias (tools/bench host_decode)
    Sk, Hq, Hk = 4096, 32, 8
    q1 = torch.randn(1, Hq, D, device=device, dtype=dt)
    k1, v1 = (torch.randn(Sk, Hk, D, device=device, dtype=dt) for _ in range(2))
    kb = torch.randn(Sk, Hk, device=device, dtype=dt)
    cu_q = torch.tensor([0, 1], device=device, dtype=torch.int32)
    cu_k = torch.tensor([0, Sk], device=device, dtype=torch.int32)
    row("decode step, varlen key bias (api)", lambda: dm.flash_dmattn_varlen_func(
        q1, k1, v1, cu_q, cu_k, 1, Sk, attn_bias=kb))
    qd = q1.reshape(1, 1, Hq, D)
    kd, vd = k1.reshape(1, Sk, Hk, D), v1.reshape(1, Sk, Hk, D)
    bd = kb.t().reshape(1, Hk, 1, Sk)
    row("decode step, dense (1,Hk,1,Sk) bias (api)",
        lambda: dm.flash_dmattn_func(qd, kd, vd, attn_bias=bd))
    # the same step through the KV-cache API: a paged cache (pages of 64) with a key mask + bias
    pages = Sk // 64
    kc, vc = k1.reshape(pages, 64, Hk, D), v1.reshape(pages, 64, Hk, D)
    mc = torch.ones(pages, 64, Hk, device=device, dtype=torch.bool)
    bc = kb.reshape(pages, 64, Hk)
    table = torch.arange(pages, device=device, dtype=torch.int32).reshape(1, pages)
    lens = torch.full((1,), Sk, device=device, dtype=torch.int32)
    row("decode step, kvcache paged64 mask + bias (api)", lambda: dm.flash_dmattn_with_kvcache(
        qd, kc, vc, cache_seqlens=lens, block_table=table, attn_mask=mc, attn_bias=bc))
    row("fwd+bwd, validated route (autograd.dense)", lambda: torch.autograd.grad(
        autograd.dense(qg, kg, vg, None, None, None, False, (-1, -1), 0.0, None, False, False,
                       "auto"), (qg, kg, vg), dout))
    # calibration: what torch itself costs on this machine
    row("calib: torch.empty", lambda: torch.empty((B, S, H, D), dtype=dt, device=device))

    class _Nop(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx: Any, g: Any) -> Any:
            return g

    row("calib: autograd.Function no-op fwd+bwd", lambda: torch.autograd.grad(
        _Nop.apply(qg), (qg,), dout))

    _Nop3 = nop_function(torch)  # the bench's floor row's Function
    row("calib: the same over q, k, v (bench's floor row)", lambda: torch.autograd.grad(
        _Nop3.apply(qg, kg, vg), (qg, kg, vg), dout))
    kept = dm.flash_dmattn_func(qg, kg, vg)
    row("backward alone (retain_graph)", lambda: torch.autograd.grad(
        kept, (qg, kg, vg), dout, retain_graph=True))
    nop_kept = _Nop3.apply(qg, kg, vg)
    row("calib: no-op Function backward alone", lambda: torch.autograd.grad(
        nop_kept, (qg, kg, vg), dout, retain_graph=True))
    rows.extend(_thin_pieces(calls, device, q, k, v, dout, sync))
    if device == "cuda":
        F = torch.nn.functional
        qt, kt, vt = (x.transpose(1, 2) for x in (qg, kg, vg))
        row("peer: SDPA forward", lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))
        row("peer: SDPA fwd+bwd", lambda: torch.autograd.grad(
            F.scaled_dot_product_attention(qt, kt, vt), (qg, kg, vg), dout.transpose(1, 2)))
    return rows


def _thin_pieces(calls: int, device: str, q: Any, k: Any, v: Any, dout: Any,
                 sync: Callable[[], None]) -> list[tuple[str, float | None]]:
    """The thin path's pieces, from the cached plans of the rows before (the fwd+bwd of
    q, k, v): where a step's time goes without autograd around it."""
    import torch

    from dmattn_cupy import fastpath, runtime

    rows: list[tuple[str, float | None]] = []
    row = _row_recorder(rows, calls, device, sync)

    fe = next((e for e in list(fastpath.forward_plans.values())
               if e is not None and e.bwd and e.lse and "sp_full_count" not in e.plan.inputs),
              None)   # (the block mask row's plans take its lists too)
    be = next((e for e in fe.bwd.values() if e is not None), None) if fe is not None else None
    if be is None:
        return [("thin pieces [no cached fwd+bwd plan]", None)]
    xs = (q, k, v, None, None, None, None)
    xptrs = [0 if x is None else x.data_ptr() for x in xs]
    bufs = (fe.run or fastpath._bind(fe, "torch", q))(xptrs, q)   # out, lse (+ workspaces)
    out, lse = bufs[:2]
    stream = runtime.stream_ptr("torch", fe.plan.device)
    ptrs = xptrs + [x.data_ptr() for x in bufs]
    row("thin: forward plan.execute (patch + launch)", lambda: fe.plan.execute(ptrs, stream))
    row("thin: forward runner (alloc + patch + launch)", lambda: fe.run(xptrs, q))
    row("thin: backward, no autograd (_exec_backward)", lambda: fastpath._exec_backward(
        be, "torch", dout, None, q, k, v, None, None, None, None, out, lse))
    rows.extend(_engine_pieces(calls, device, q, k, v, dout, sync, be, out, lse))
    row("thin: stream_ptr", lambda: runtime.stream_ptr("torch", fe.plan.device))
    row("thin: stream_capturing", lambda: runtime.stream_capturing(stream))
    ws = torch.empty(q.numel() + 64, dtype=torch.float32, device=device)
    shape, st = tuple(q.shape), tuple(q.stride())
    row("calib: dQ cast (as_strided + .to)", lambda: ws.as_strided(shape, st, 0).to(q.dtype))
    return rows


def _engine_pieces(calls: int, device: str, q: Any, k: Any, v: Any, dout: Any,
                   sync: Callable[[], None], be: Any, out: Any, lse: Any
                   ) -> list[tuple[str, float | None]]:
    """Where the backward's time goes between torch's autograd engine and our Function: each
    row is ``torch.autograd.grad(..., retain_graph=True)`` (backward alone) through one more
    piece of what ``_Attention`` does, from a no-op Function over q, k, v up to our backward
    kernels on held tensors. On CUDA the engine runs these on its device thread (a CPU graph
    runs on the caller's: the stub cannot show that hand-off), so the last row times
    ``_exec_backward`` in a second Python thread (compare "thin: backward, no autograd")."""
    import threading

    import torch

    from dmattn_cupy import fastpath

    rows: list[tuple[str, float | None]] = []
    row = _row_recorder(rows, calls, device, sync)
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    held = [torch.empty_like(x) for x in (q, k, v)]

    def run_kernels(g: Any) -> tuple[Any, ...]:
        return fastpath._exec_backward(be, "torch", g, None, q, k, v, None, None, None, None,
                                       out, lse)[:3]

    # backward bodies: held grads / fresh empties / our kernels (dQ, dK, dV of dout)
    # ("3 empty_like dropped": allocating in the engine's thread without handing the engine
    # fresh gradients; the "engine fwd+bwd" rows below: allocating them there or in the forward)
    bodies = {"held grads": lambda ctx, g: tuple(held),
              "3 fresh empty_like": lambda ctx, g: tuple(torch.empty_like(x) for x in held),
              "3 empty_like dropped, held grads": lambda ctx, g: (
                  [torch.empty_like(x) for x in held], tuple(held))[1],
              "saved_tensors + our kernels": lambda ctx, g: (ctx.saved_tensors, run_kernels(g)
                                                             )[1]}
    for name, body in bodies.items():
        class _Piece(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, q: Any, k: Any, v: Any, bias: Any, call: Any) -> Any:
                ctx.save_for_backward(q, k, v, bias, out, lse, None, None, None)
                ctx.call = call
                return torch.empty_like(q)

            @staticmethod
            def backward(ctx: Any, g: Any, body: Any = body) -> Any:
                return (*body(ctx, g), None, None)

        kept = _Piece.apply(qg, kg, vg, None, object())
        row(f"engine: Function like ours, {name}", lambda kept=kept: torch.autograd.grad(
            kept, (qg, kg, vg), dout, retain_graph=True))

    for where in ("backward", "forward"):
        class _Grads(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, q: Any, k: Any, v: Any, where: str = where) -> Any:
                if where == "forward":   # on the caller's thread, held until the backward
                    ctx.made = tuple(torch.empty_like(x) for x in (q, k, v))
                return torch.empty_like(q)

            @staticmethod
            def backward(ctx: Any, g: Any, where: str = where) -> Any:
                if where == "forward":
                    return ctx.made
                return tuple(torch.empty_like(x) for x in held)   # on the engine's thread

        row(f"engine fwd+bwd: 3 gradients allocated in the {where}",
            lambda f=_Grads: torch.autograd.grad(f.apply(qg, kg, vg), (qg, kg, vg), dout))

    timed: list[Any] = []   # timed inside the thread (a stubbed row counts its CPU time)

    def in_thread() -> None:
        try:
            timed.append(per_call_us(lambda: run_kernels(dout), calls, sync,
                                     cpu_clock=device == "cpu"))
        except Exception as e:  # noqa: BLE001
            timed.append(e)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    name = "engine: _exec_backward in a second thread"
    rows.append((name, timed[0]) if not isinstance(timed[0], Exception) else
                (f"{name} [{type(timed[0]).__name__}]", None))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stub", choices=("auto", "on", "off"), default="auto",
                    help="stub the GPU (auto: when torch sees no CUDA device)")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--cprofile", metavar="TEXT",
                    help="also print cProfile's top functions for rows whose name has TEXT")
    args = ap.parse_args(argv)
    global _cprofile_match
    _cprofile_match = args.cprofile
    import torch

    stub = args.stub == "on" or (args.stub == "auto" and not torch.cuda.is_available())
    device = "cpu" if stub else "cuda"
    ctx = stub_gpu() if stub else contextlib.nullcontext()
    with ctx:
        rows = stages(args.calls, device)
    print(f"host us/call ({'GPU stubbed: Python work only' if stub else 'real GPU'}, "
          f"torch {torch.__version__}, {args.calls} calls x "
          f"{'7 rounds, min thread CPU time' if stub else '5 rounds, median wall time'})")
    for name, us in rows:
        print(f"  {name:<48} {'n/a' if us is None else f'{us:8.2f}'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
