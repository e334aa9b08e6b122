"""Per-CTA timelines of the Hopper forward's work items: where SMs sit idle.

    PYTHONPATH=$PWD python3 tools/sm90_timeline.py [--causal] [--batch 2 --heads 16
        --seqlen 4096 --headdim 128]

Runs fwd_sm90's debug build with ``DM_SM90_TIMELINE=1`` (cuda_src/sm90/fwd.cu): each work item's
``tile_counters`` pair holds its start and end as ``(CTA << 24) | %globaltimer / 32 ns mod 2^24``
stamped by consumer 0. Prints the launch's span, the share of the SMs' time with no item
running at its start, between items and at its end (the CTAs that finished early), and the
items that ended last. The debug build adds a few instructions per item, so spans are close to,
not equal to, the release kernel's (NOTES.md, eighteenth session: causal's 12.5% idle end).
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TICK_US = 32 / 1000.0  # one stamp unit: 32 ns
WRAP = 1 << 24


def decode(stamps: list[int]) -> tuple[list[int], list[int]]:
    """(CTA, ticks) of each stamp (int32 values as read back)."""
    u = [s & 0xFFFFFFFF for s in stamps]
    return [s >> 24 for s in u], [s & (WRAP - 1) for s in u]


def analyze(starts: list[int], ends: list[int], last: int = 8) -> dict:
    """The idle shares and the last items of one launch from its items' start/end stamps
    (item i: starts[i], ends[i]). Ticks are unwrapped around the first start (a launch is far
    shorter than half the 0.54 s the 24 bits span), then counted from the earliest."""
    cta, t0 = decode(starts)
    cta_end, t1 = decode(ends)
    if cta != cta_end:
        raise ValueError("an item's start and end name different CTAs: not a timeline")

    def signed(t: int) -> int:  # ticks after the first start, negative before it
        d = (t - t0[0]) % WRAP
        return d - WRAP if d >= WRAP // 2 else d

    base = min(signed(t) for t in t0)
    s_us = [(signed(t) - base) * TICK_US for t in t0]
    e_us = [(signed(t) - base) * TICK_US for t in t1]
    span = max(e_us)
    per: dict[int, list[tuple[float, float]]] = collections.defaultdict(list)
    for c, s, e in zip(cta, s_us, e_us, strict=True):
        per[c].append((s, e))
    n = len(per)
    at_start = sum(min(s for s, _ in v) for v in per.values())
    at_end = sum(span - max(e for _, e in v) for v in per.values())
    between = 0.0
    for v in per.values():
        v.sort()
        between += sum(max(0.0, b[0] - a[1]) for a, b in zip(v, v[1:], strict=False))
    order = sorted(range(len(e_us)), key=lambda i: -e_us[i])[:last]
    return {"ctas": n, "span_us": span, "idle_start": at_start / (n * span),
            "idle_between": between / (n * span), "idle_end": at_end / (n * span),
            "last": [(i, s_us[i], e_us[i]) for i in order]}


def measure(causal: bool, batch: int, heads: int, seqlen: int, headdim: int) -> tuple[str, dict]:
    import torch

    from dmattn_cupy.forward import run_forward, select_fwd_spec
    from dmattn_cupy.validate import check_dense

    q, k, v = (torch.randn(batch, seqlen, heads, headdim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    pb = check_dense(q, k, v, None, None, None, causal, (-1, -1), 0.0, "cuda")
    spec = select_fwd_spec(pb, debug_counters=True)
    if spec.family != "fwd_sm90":
        raise SystemExit(f"the problem takes {spec.family}, not fwd_sm90: no timeline")
    items = math.ceil(seqlen / spec.block_m) * batch * heads
    stamps = torch.zeros(items, 2, dtype=torch.int32, device="cuda")
    for _ in range(6):  # the last of a few warm launches
        stamps.zero_()
        run_forward(pb, q, tile_counters=stamps)
    torch.cuda.synchronize()
    return spec.id, analyze(stamps[:, 0].tolist(), stamps[:, 1].tolist())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--headdim", type=int, default=128)
    args = ap.parse_args(argv)
    os.environ["DMATTN_NVRTC_DEFINES"] = (
        os.environ.get("DMATTN_NVRTC_DEFINES", "") + " DM_SM90_TIMELINE=1").strip()
    sid, r = measure(args.causal, args.batch, args.heads, args.seqlen, args.headdim)
    num_m = math.ceil(args.seqlen / 128)
    print(f"{sid}: {r['ctas']} CTAs, span {r['span_us']:.1f} us; SMs idle at the start "
          f"{100 * r['idle_start']:.1f}%, between items {100 * r['idle_between']:.1f}%, at the "
          f"end {100 * r['idle_end']:.1f}%")
    print("items that ended last (query tile, head-batch, start us, end us):")
    for i, s, e in r["last"]:
        print(f"  {i % num_m:4d} {i // num_m:4d} {s:8.1f} {e:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
