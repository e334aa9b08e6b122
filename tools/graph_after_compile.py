"""Does a torch.cuda.graph capture of a training step fail after torch.compile's CUDA-graph
trees ran in the same process, and whose call breaks it?

    PYTHONPATH=$PWD python3 tools/graph_after_compile.py [--steps 20]

The fifty-fourth session's bench (BENCHMARKS) captured the eager step (forward +
``torch.autograd.grad``, B1 S128 H1 D64 bf16) after the ``torch.compile(mode=
"reduce-overhead")`` rows, and both captures, ours and SDPA's, failed with "operation failed
due to a previous error"; alone in a new process both replayed. Each case here is one new
process (a failed capture leaves its process unusable): ``--steps`` compiled steps of
``compiled`` (dmattn, sdpa, exp: ``torch.exp`` over q alone, or none), then one capture of
``captured``'s eager step in ``mode`` (torch.cuda.graph's capture_error_mode: global,
thread_local, relaxed). A case that fails only in ``global`` mode means some thread made a
capture-unsafe CUDA call during the capture; one that fails with ``compiled=exp`` too is
torch's alone.

Answer (fifty-fifth session, H100, torch 2.11): every capture after ``compiled=dmattn`` failed
(ours and SDPA's, both modes), none after ``sdpa`` or ``none``. Torch alone does the same:
``torch.exp`` or ``torch.sin`` over a leaf, compiled the same way, then a captured eager
``torch.exp`` step over that leaf failed too (a one-off script; ``compiled=exp`` here is that
step). The error under it: "operation would make the legacy stream depend on a capturing
blocking stream", at the end of the captured backward. After our compiled steps, gc showed
inductor's graph node holding the last step's output and so its autograd graph: the leaves'
gradient accumulators stay alive with the stream they were made on (the default stream), which
the engine then syncs with inside the capture. Fresh leaves, or compiled steps without CUDA
graphs (mode="default"), pass.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.bench.host import capture  # noqa: E402  (after the path)


def one_case(compiled: str, captured: str, mode: str, steps: int) -> dict:
    """One process: ``steps`` compiled steps, then one capture and replay; its outcome."""
    import torch
    import torch.nn.functional as F

    import dmattn_cupy as dm

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))
                                              ).transpose(1, 2)

    fns = {"dmattn": dm.flash_dmattn_func, "sdpa": sdpa}
    q, k, v = (torch.randn(1, 128, 1, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    if compiled != "none":   # exp: torch alone, a step whose backward saves its own output
        step, leaves = (torch.exp, (q,)) if compiled == "exp" else (fns[compiled], (q, k, v))
        f = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        for _ in range(steps):
            torch.compiler.cudagraph_mark_step_begin()
            torch.autograd.grad(f(*leaves), leaves, dout)
        torch.cuda.synchronize()
    g = fns[captured]

    def run():
        return torch.autograd.grad(g(q, k, v), (q, k, v), dout)

    try:
        graph, static = capture(torch, run, mode)
        graph.replay()
        torch.cuda.synchronize()
        same = all(torch.equal(a, b) for a, b in zip(static, run(), strict=True))
        return {"ok": True, "replay_equals_eager": same}
    except Exception as e:  # noqa: BLE001  (the outcome is the point)
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--case", help="compiled,captured,mode (internal: one process)")
    args = ap.parse_args()
    if args.case:
        compiled, captured, mode = args.case.split(",")
        print(json.dumps(one_case(compiled, captured, mode, args.steps)))
        return 0
    failed = 0
    for compiled, captured, mode in itertools.product(
            ("none", "dmattn", "sdpa", "exp"), ("dmattn", "sdpa"), ("global", "thread_local")):
        r = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--case",
                            f"{compiled},{captured},{mode}"], capture_output=True, text=True,
                           env=os.environ)
        try:
            out = json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):   # the process died: its last words
            out = {"ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:160]}
        failed += not out.get("ok")
        print(f"compiled={compiled:6} captured={captured:6} mode={mode:12} {out}", flush=True)
    print(f"{failed} of 16 cases failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
