"""Timing: GPU time with CUDA events (CPU queued ahead of the GPU), wall time of back-to-back
calls, host time per call, copy bandwidth; the pure parts (percentile, rotation) need no torch."""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any


def rotation_sets(set_bytes: int, l2_bytes: int, max_sets: int = 8) -> int:
    """How many input sets to rotate among so that consecutive calls do not hit in L2."""
    if set_bytes <= 0:
        return 1
    if set_bytes >= 3 * l2_bytes:
        return 1
    return max(1, min(max_sets, math.ceil(3 * l2_bytes / set_bytes)))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)




class Timer:
    """Times callables on ``device``; ``args`` holds warmup, repeat, max_repeat, min_time,
    quick."""

    def __init__(self, torch: Any, device: Any, args: argparse.Namespace):
        self.torch = torch
        self.device = device
        self.args = args
        self.cuda = device.type == "cuda"
        self.cycles_per_ms: float | None = None
        if self.cuda:
            self._calibrate_sleep()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def _calibrate_sleep(self) -> None:
        torch = self.torch
        if not hasattr(torch.cuda, "_sleep"):
            return
        try:
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1000)
            s.record()
            torch.cuda._sleep(20_000_000)
            e.record()
            torch.cuda.synchronize()
            ms = s.elapsed_time(e)
            if ms > 0:
                self.cycles_per_ms = 20_000_000 / ms
        except Exception:  # noqa: BLE001
            self.cycles_per_ms = None

    def gpu_sleep(self, ms: float) -> None:
        if self.cycles_per_ms and ms > 0:
            self.torch.cuda._sleep(int(min(ms, 2000.0) * self.cycles_per_ms))

    def time_calls(self, fns: Sequence[Callable[[], Any]]) -> dict[str, Any]:
        """Median per-call time of ``fns`` (rotating among them) after a warm-up."""
        a = self.args
        n = len(fns)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(a.warmup):
                fns[i % n]()
            self.sync()
            if not self.cuda:
                return self._time_calls_host(fns)
            torch = self.torch
            k = 5
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            s.record()
            for i in range(k):
                fns[i % n]()
            e.record()
            host_ms = (time.perf_counter() - t0) * 1e3 / k
            self.sync()
            est_ms = max(s.elapsed_time(e) / k, 1e-3)
            reps = int(min(max(math.ceil(a.min_time * 1e3 / est_ms), a.repeat), a.max_repeat))
            times: list[float] = []
            chunk = 64
            for c0 in range(0, reps, chunk):
                nrep = min(chunk, reps - c0)
                starts = [torch.cuda.Event(enable_timing=True) for _ in range(nrep)]
                ends = [torch.cuda.Event(enable_timing=True) for _ in range(nrep)]
                # queue the CPU ahead of the GPU so launch overhead is not in the events; 3x
                # the sampled host time: at 1.5x the fwd+bwd rows' events still held 0-44 us of
                # GPU idle per step on the H200 (host time varies between calls)
                self.gpu_sleep(nrep * host_ms * 3.0 + 0.5)
                for r in range(nrep):
                    starts[r].record()
                    fns[(c0 + r) % n]()
                    ends[r].record()
                self.sync()
                times += [st.elapsed_time(en) for st, en in zip(starts, ends, strict=True)]
            nwall = int(max(3, min(reps, math.ceil(a.min_time * 1e3 / max(est_ms, host_ms)))))
            self.sync()
            t0 = time.perf_counter()
            for r in range(nwall):
                fns[r % n]()
            self.sync()
            wall = (time.perf_counter() - t0) * 1e3 / nwall
        return {"ms": statistics.median(times), "ms_min": min(times),
                "ms_p10": percentile(times, 10), "ms_p90": percentile(times, 90),
                "reps": len(times), "wall_ms": wall}

    def _time_calls_host(self, fns: Sequence[Callable[[], Any]]) -> dict[str, Any]:
        a = self.args
        times: list[float] = []
        t_end = time.perf_counter() + a.min_time
        i = 0
        while i < a.repeat or (time.perf_counter() < t_end and i < a.max_repeat):
            t0 = time.perf_counter()
            fns[i % len(fns)]()
            times.append((time.perf_counter() - t0) * 1e3)
            i += 1
        med = statistics.median(times)
        return {"ms": med, "ms_min": min(times), "ms_p10": percentile(times, 10),
                "ms_p90": percentile(times, 90), "reps": len(times), "wall_ms": med}

    def copy_bandwidth(self) -> float | None:
        """Device-to-device copy bandwidth in GB/s, (read + write bytes) / time."""
        torch = self.torch
        nbytes = (256 if self.args.quick else 1024) * 2**20 if self.cuda else 64 * 2**20
        try:
            src = torch.empty(nbytes, dtype=torch.uint8, device=self.device).fill_(1)
            dst = torch.empty_like(src)
            r = self.time_calls([lambda: dst.copy_(src)])
            return 2 * nbytes / (r["ms"] * 1e-3) / 1e9
        except Exception as e:  # noqa: BLE001
            print(f"copy bandwidth: n/a: {type(e).__name__}: {e}")
            return None

    def host_per_call(self, fn: Callable[[], Any], calls: int, rounds: int = 5
                      ) -> dict[str, Any]:
        """Host time per call: ``calls`` back-to-back calls with one synchronize at the end,
        (elapsed wall time) / calls; the median of ``rounds`` such runs after a warm-up. With
        tiny shapes the GPU keeps up, so this is the host-side cost of one call."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(max(self.args.warmup, 3)):
                fn()
            self.sync()
            per: list[float] = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                self.sync()
                per.append((time.perf_counter() - t0) * 1e3 / calls)
        return {"wall_ms": statistics.median(per), "ms_min": min(per), "ms_p10": min(per),
                "ms_p90": max(per), "reps": calls * rounds}
