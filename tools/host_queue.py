"""Host time per call with the GPU held busy: what a call costs the CPU alone.

    PYTHONPATH=$PWD python3 tools/host_queue.py [--calls N] [--rounds R]

tools/bench's host suite times N calls back to back and divides the wall time. When a call's
GPU work outlasts its host work, that figure is the GPU's. Here each round first queues a long
sleep kernel (``torch.cuda._sleep``), so every call of the round only enqueues: the time per
call is host time alone, launches included, whatever the kernels cost on the GPU. A round
whose sleep had ended before its last call was issued is marked (the GPU caught up).

Rows (issue 15's decode step: 1 query, 4096 keys, H32/Hk8, key bias): the varlen, dense and
KV-cache decode steps, a tiny forward, the varlen step's cached plan launched alone (both
launches, the split kernel alone, the programmatic combine alone), ``torch.empty_like``, and
SDPA. Microseconds per call: the minimum and the median over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def per_call_us(torch: Any, fn: Callable[[], Any], calls: int, rounds: int) -> tuple[float,
                                                                                     float, int]:
    """(min, median) us per call over ``rounds`` rounds of ``calls`` calls queued behind a
    sleep kernel, and how many rounds the GPU caught up in (their figures are kept: they are
    then an upper bound on the host time)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    cycles = int(calls * 200e-6 * 2.0e9)   # 200 us a call at 2 GHz: far more than any call
    times, caught = [], 0
    for _ in range(rounds):
        torch.cuda._sleep(cycles)
        done = torch.cuda.Event()
        done.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t = time.perf_counter() - t0
        caught += bool(done.query())
        torch.cuda.synchronize()
        times.append(t / calls * 1e6)
    return min(times), statistics.median(times), caught


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()

    import torch

    import dmattn_cupy as dm
    from dmattn_cupy import fastpath, runtime

    dev = torch.device("cuda")
    dt = torch.bfloat16
    H, Hk, Sk, D = 32, 8, 4096, 128
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, 1, H, D, device=dev, dtype=dt, generator=gen)
    k = torch.randn(1, Sk, Hk, D, device=dev, dtype=dt, generator=gen)
    v = torch.randn(1, Sk, Hk, D, device=dev, dtype=dt, generator=gen)
    bias = torch.randn(Sk, Hk, device=dev, dtype=dt, generator=gen)
    cu_q = torch.tensor([0, 1], device=dev, dtype=torch.int32)
    cu_k = torch.tensor([0, Sk], device=dev, dtype=torch.int32)
    q1, k1, v1 = q[0], k[0], v[0]
    pages = Sk // 64
    kc, vc = k.reshape(pages, 64, Hk, D), v.reshape(pages, 64, Hk, D)
    table = torch.arange(pages, device=dev, dtype=torch.int32).reshape(1, pages)
    lens = torch.full((1,), Sk, device=dev, dtype=torch.int32)
    bias_dense = bias.t().reshape(1, Hk, 1, Sk)
    bias_paged = bias.reshape(pages, 64, Hk)
    am = bias.t().repeat_interleave(H // Hk, dim=0).reshape(1, H, 1, Sk).contiguous()
    tq = torch.randn(1, 128, 1, 64, device=dev, dtype=dt, generator=gen)   # tiny forward

    def varlen() -> Any:
        return dm.flash_dmattn_varlen_func(q1, k1, v1, cu_q, cu_k, 1, Sk, attn_bias=bias)

    # the varlen step's plan, alone: its records keep the last call's pointers (kept alive)
    fastpath.clear()
    keep = varlen()
    varlen()
    (entry,) = fastpath.forward_plans.values()
    plan = entry.plan
    _, launches, _ = plan._bound or plan._bind()
    stream = torch.cuda.current_stream().cuda_stream

    def launch(sel: tuple) -> Callable[[], None]:
        def run() -> None:
            for fn, grid, block, smem, params, config in sel:
                runtime.launch_raw(plan.device, fn, grid, block, smem, stream, params, config)
        return run

    # the thin path's pieces of the varlen step (fastpath.varlen on a hit)
    xs = (q1, k1, v1, None, bias, cu_q, cu_k)
    ptrs: list[int] = []
    fastpath._tsigs(xs, ptrs)
    run = entry.run or fastpath._bind(entry, "torch", q1)
    bufs = run(ptrs, q1)                       # the plan's buffers, kept for execute's row
    all_ptrs = ptrs + [b.data_ptr() for b in bufs]

    def sigs() -> Any:
        return fastpath._tsigs(xs, [])

    rows: list[tuple[str, Callable[[], Any]]] = [
        ("decode step, varlen (bias (total_k, Hk))", varlen),
        ("  fastpath.varlen (no api wrapper)", lambda: fastpath.varlen(
            q1, k1, v1, cu_q, cu_k, 1, Sk, None, bias, None, False, (-1, -1), 0.0, False,
            False, "auto")),
        ("  signatures and pointers of its 7 arguments", sigs),
        ("  runner: allocate, patch, launch", lambda: run(ptrs, q1)),
        ("  plan.execute: patch, launch", lambda: plan.execute(all_ptrs, stream)),
        ("  runtime.stream_ptr", lambda: runtime.stream_ptr("torch", plan.device)),
        ("decode step, dense (bias (1, Hk, 1, Sk))",
         lambda: dm.flash_dmattn_func(q, k, v, attn_bias=bias_dense)),
        ("decode step, KV cache paged 64",
         lambda: dm.flash_dmattn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table,
                                              attn_bias=bias_paged)),
        ("forward, tiny (1, 128, 1, 64)", lambda: dm.flash_dmattn_func(tq, tq, tq)),
        (f"varlen plan's {len(launches)} launches alone", launch(launches)),
        ("its first launch alone (split decode)", launch(launches[:1])),
    ]
    if len(launches) > 1:
        rows.append(("its second launch alone (combine, "
                     f"{'cuLaunchKernelEx' if launches[1][5] is not None else 'cuLaunchKernel'})",
                     launch(launches[1:2])))
    F = torch.nn.functional
    rows += [
        ("torch.empty_like(q)", lambda: torch.empty_like(q)),
        ("sdpa decode (attn_mask (1, H, 1, Sk))",
         lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                v.transpose(1, 2), attn_mask=am,
                                                enable_gqa=True)),
        ("python call floor (lambda: None)", lambda: None),
    ]
    print(f"{torch.cuda.get_device_name()}: host us per call, {args.calls} calls queued behind "
          f"a sleep kernel, {args.rounds} rounds")
    print(f"{'row':58s} {'min':>8s} {'median':>8s}  GPU caught up")
    for name, fn in rows:
        lo, med, caught = per_call_us(torch, fn, args.calls, args.rounds)
        print(f"{name:58s} {lo:8.2f} {med:8.2f}  {caught}/{args.rounds}")
    del keep, bufs


if __name__ == "__main__":
    main()
