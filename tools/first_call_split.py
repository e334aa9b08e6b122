"""Where the first forward + backward of a new process spends its time (issue 15: <= 1.5 s).

    PYTHONPATH=$PWD python tools/first_call_split.py [--device cuda|cpu|stub] [--runs 2]
                                                     [--profile 25]

Each run is a fresh Python process per implementation (dmattn_cupy, then torch SDPA as the
peer), which times its phases with perf_counter: ``import torch``, the library's import,
CUDA init + the inputs (B1 S128 H1 D64 bf16; a synchronize), the first forward, the first
backward (``torch.autograd.grad``), and a second forward + backward. ``--profile N`` adds one
more process per implementation with cProfile around the first forward + backward and prints
its N most expensive functions by cumulative time. The kernel disk cache (DMATTN_CACHE_DIR)
is whatever the machine has: run a process once before to time cached kernels.
``--device stub``: CPU tensors posing as CUDA with every GPU call a no-op
(``tools/host_profile.stub_gpu``), so that a machine without a GPU times the Python of the
CUDA route (``cpu`` takes the CPU route: the validated path and the reference backend).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PHASES = ("torch_import_s", "lib_import_s", "init_s", "first_fwd_s", "first_bwd_s",
          "second_ms")

_CHILD = r"""
import cProfile, io, json, pstats, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
which, device, top = sys.argv[1], sys.argv[2], int(sys.argv[3])
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
q, k, v = (torch.randn(1, 128, 1, 64, device="cpu" if device == "stub" else device,
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


def run_child(which: str, device: str, top: int = 0) -> tuple[dict[str, float], str]:
    """One new process for ``which`` ("dmattn" or "sdpa"): its phases (PHASES, seconds but
    ``second_ms``) and what it printed after them (the profile with ``top`` > 0)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join((str(ROOT), str(ROOT / "tools"),
                                         env.get("PYTHONPATH", "")))
    p = subprocess.run([sys.executable, "-c", _CHILD, which, device, str(top)], env=env,
                       capture_output=True, text=True, timeout=600)
    lines = p.stdout.splitlines()
    res = [i for i, ln in enumerate(lines) if ln.startswith("RESULT ")]
    if p.returncode or not res:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{which} on {device}: exit {p.returncode}: {tail}")
    return json.loads(lines[res[-1]][7:]), "\n".join(lines[res[-1] + 1:])


def format_row(which: str, ph: dict[str, float]) -> str:
    return (f"{which:7s} import torch {ph['torch_import_s']:.2f} s, library "
            f"{ph['lib_import_s']:.2f} s, init + inputs {ph['init_s']:.2f} s, first fwd "
            f"{ph['first_fwd_s']:.3f} s, first bwd {ph['first_bwd_s']:.3f} s, second fwd+bwd "
            f"{ph['second_ms']:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu", "stub"),
                    help="cuda; cpu (the CPU route); stub (the CUDA route, GPU calls no-ops)")
    ap.add_argument("--runs", type=int, default=2, help="timed processes per implementation")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="one more process each with cProfile: its N top functions")
    args = ap.parse_args(argv)
    for i in range(args.runs):
        for which in ("dmattn", "sdpa"):
            print(f"run {i + 1}: " + format_row(which, run_child(which, args.device)[0]))
    if args.profile > 0:
        for which in ("dmattn", "sdpa"):
            ph, text = run_child(which, args.device, args.profile)
            print(f"== profile of the first fwd+bwd, {format_row(which, ph)}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
