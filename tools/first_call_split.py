"""Where the first forward + backward of a new process spends its time (issue 15: <= 1.5 s).

    PYTHONPATH=$PWD python tools/first_call_split.py [--device cuda|cpu|stub] [--runs 2]
                                                     [--profile 25]

Each run is a fresh Python process per implementation (dmattn_cupy, then torch SDPA as the
peer; the bench's host_first_call process, ``tools/bench/host.run_first_call``), which times
its phases with perf_counter: ``import torch``, the library's import, CUDA init + the inputs
(B1 S128 H1 D64 bf16; a synchronize), the first forward, the first backward
(``torch.autograd.grad``), and a second forward + backward. ``--profile N`` adds one more
process per implementation with cProfile around the first forward + backward and prints its N
most expensive functions by cumulative time. The kernel disk cache (DMATTN_CACHE_DIR) is
whatever the machine has: run a process once before to time cached kernels.
``--device stub``: CPU tensors posing as CUDA with every GPU call a no-op
(``tools/host_profile.stub_gpu``), so that a machine without a GPU times the Python of the
CUDA route (``cpu`` takes the CPU route: the validated path and the reference backend).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.bench.host import FIRST_CALL_PHASES as PHASES  # noqa: E402,F401  (after the path)
from tools.bench.host import run_first_call  # noqa: E402


def run_child(which: str, device: str, top: int = 0) -> tuple[dict[str, float], str]:
    """One new process for ``which`` ("dmattn" or "sdpa"): its phases (PHASES, seconds but
    ``second_ms``) and what it printed after them (the profile with ``top`` > 0)."""
    phases, text, _ = run_first_call(which, device, top)
    return phases, text


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
