"""Where a kernel's warps stall, per SASS instruction, from Nsight Compute's source page.

    ncu ... -o rep python3 tools/bench --case NAME ...      # with --section SourceCounters
    ncu -i rep.ncu-rep --page source --csv --print-source sass | gzip > src.csv.gz
    python3 tools/ncu_source.py src.csv.gz [--top 30]

Prints the total of the warp-state samples, the instructions with the most samples (their
two main stall reasons and how often they executed), and the samples summed over groups of
instructions that executed equally often: a per-item loop of the consumer warps is one such
group, the producer's waits another (NOTES.md, fifth session). Reads plain or gzipped CSV.

    python3 tools/ncu_source.py a.csv.gz --against b.csv.gz

compares two kernels run on the same problem (so that a group's execution count means the same
loop in both, e.g. kbias against dense): per group (its execution count) each kernel's
instructions and samples, and the opcodes whose static counts differ (NOTES.md, eighteenth
session).
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import IO

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def _open(path: Path) -> IO[str]:
    with path.open("rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt") if gz else path.open()


def read_rows(lines: Iterable[str]) -> tuple[list[str], list[dict[str, str]]]:
    """(stall reason columns, one dict per instruction) from the source page's CSV: the first
    line names the kernel, the second the columns."""
    reader = csv.reader(lines)
    next(reader, None)
    header = next(reader, None)
    if header is None or SAMPLES not in header or "Source" not in header:
        raise ValueError("not an ncu source page (--page source --csv --print-source sass)")
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    return reasons, [dict(zip(header, r, strict=False)) for r in reader if len(r) == len(header)]


def _num(row: dict[str, str], key: str) -> int:
    try:
        return int(row.get(key, "0").replace(",", ""))
    except ValueError:
        return 0


def summarize(reasons: list[str], rows: list[dict[str, str]], top: int) -> list[str]:
    total = sum(_num(r, SAMPLES) for r in rows) or 1
    out = [f"samples {total} over {len(rows)} instructions"]
    ranked = sorted(range(len(rows)), key=lambda i: -_num(rows[i], SAMPLES))[:top]
    for i in ranked:
        r = rows[i]
        main = sorted(((_num(r, x), x[6:]) for x in reasons), reverse=True)[:2]
        why = ", ".join(f"{name} {n}" for n, name in main if n)
        out.append(f"{i:6d} {_num(r, SAMPLES):7d} {100 * _num(r, SAMPLES) / total:5.1f}%  "
                   f"{r['Source'].strip()[:56]:56s} x{_num(r, EXECUTED)}  {why}")
    # per group: instructions, samples, and the samples by stall reason
    groups: dict[int, list] = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    for r in rows:
        g = groups[_num(r, EXECUTED)]
        g[0] += 1
        g[1] += _num(r, SAMPLES)
        for x in reasons:
            g[2][x[6:]] += _num(r, x)
    out.append("by execution count (instructions executed equally often):")
    for ex, (n, samples, why) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        if samples * 100 < total:  # under 1% of the samples
            continue
        by = sum(why.values()) or 1
        mix = ", ".join(f"{k} {100 * v / by:.0f}%" for k, v in why.most_common(7) if v)
        out.append(f"  x{ex}: {n} instructions, {100 * samples / total:.1f}% of the samples: "
                   f"{mix}")
    return out


def opcode(source: str) -> str:
    """The opcode of a SASS line without its predicate and modifiers ("@!P0 LDS.64 R2, [R4]"
    -> "LDS")."""
    tokens = source.split()
    if tokens and tokens[0].startswith("@"):
        tokens = tokens[1:]
    return tokens[0].split(".")[0] if tokens else ""


def _groups(rows: list[dict[str, str]]) -> dict[int, list]:
    """execution count -> [static instructions, samples, opcode counts]"""
    groups: dict[int, list] = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    for r in rows:
        g = groups[_num(r, EXECUTED)]
        g[0] += 1
        g[1] += _num(r, SAMPLES)
        g[2][opcode(r.get("Source", ""))] += 1
    return groups


def compare(rows_a: list[dict[str, str]], rows_b: list[dict[str, str]]) -> list[str]:
    """Kernel A against kernel B by execution-count group (groups with at least 1% of either
    kernel's executed instructions), most executed first."""
    ga, gb = _groups(rows_a), _groups(rows_b)
    total_a = sum(ex * g[0] for ex, g in ga.items()) or 1
    total_b = sum(ex * g[0] for ex, g in gb.items()) or 1
    out = [f"A: {total_a} instructions executed, {sum(g[1] for g in ga.values())} samples; "
           f"B: {total_b}, {sum(g[1] for g in gb.values())}",
           "by execution count (A vs B): instructions, samples, opcodes whose counts differ"]
    empty = [0, 0, collections.Counter()]
    for ex in sorted(set(ga) | set(gb), key=lambda e: -e * (ga.get(e, empty)[0]
                                                            + gb.get(e, empty)[0])):
        a, b = ga.get(ex, empty), gb.get(ex, empty)
        if ex * a[0] * 100 < total_a and ex * b[0] * 100 < total_b:
            continue
        ops = sorted(set(a[2]) | set(b[2]))
        diff = ", ".join(f"{op} {a[2][op]}->{b[2][op]}" for op in ops if a[2][op] != b[2][op])
        out.append(f"  x{ex}: {a[0]} vs {b[0]} instructions, {a[1]} vs {b[1]} samples"
                   + (f"; {diff}" if diff else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", type=Path, help="ncu source page CSV (plain or gzipped)")
    ap.add_argument("--top", type=int, default=30, help="instructions listed (default 30)")
    ap.add_argument("--against", type=Path, default=None,
                    help="a second kernel's source page on the same problem: compare by group")
    args = ap.parse_args(argv)
    with _open(args.csv) as f:
        reasons, rows = read_rows(f)
    if args.against is None:
        print("\n".join(summarize(reasons, rows, args.top)))
        return 0
    with _open(args.against) as f:
        _, rows_b = read_rows(f)
    print("\n".join(compare(rows, rows_b)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
