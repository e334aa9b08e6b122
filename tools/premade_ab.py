"""A/B of the gradients made by the forward (``fastpath._PREMADE_BYTES``; 0: off, the
default) on the host fwd+bwd step at the bench's host shape, interleaved rounds, through
``autograd.grad`` and ``.backward()``. On a GPU machine: ``PYTHONPATH=$PWD python3
tools/premade_ab.py``."""

from __future__ import annotations

import statistics
import time

import torch

import dmattn_cupy as dm
from dmattn_cupy import fastpath

ROUNDS, CALLS = 4, 500


def main() -> None:
    q, k, v = (torch.randn(1, 128, 1, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)

    def grad_step() -> None:
        torch.autograd.grad(dm.flash_dmattn_func(q, k, v), (q, k, v), dout)

    def backward_step() -> None:   # the gradients go to .grad (AccumulateGrad)
        dm.flash_dmattn_func(q, k, v).backward(dout)

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(ROUNDS):
        for name, limit in (("off", 0), ("on", 4 << 20)):
            fastpath._PREMADE_BYTES = limit
            fastpath.clear()
            for tag, step in (("autograd.grad", grad_step), ("backward()", backward_step)):
                for _ in range(50):
                    step()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(CALLS):
                    step()
                torch.cuda.synchronize()
                times.setdefault((tag, name), []).append((time.perf_counter() - t0) / CALLS * 1e6)
    for (tag, name), xs in sorted(times.items()):
        print(f"{tag:14s} premade {name:3s}: median {statistics.median(xs):6.1f} us/step, "
              f"min {min(xs):6.1f} ({', '.join(f'{x:.1f}' for x in xs)})")


if __name__ == "__main__":
    main()
