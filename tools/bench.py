#!/usr/bin/env python3
"""Benchmark ``dmattn_cupy`` against torch SDPA (flash / cuDNN / efficient) and FlexAttention.

Run from the repository root::

    PYTHONPATH=$PWD python3 tools/bench.py                      # every case
    PYTHONPATH=$PWD python3 tools/bench.py --case decode --case sparse_random --quick
    PYTHONPATH=$PWD python3 tools/bench.py --suite backward --json out.json --plot out.png

Everything runs in one process. Timings are CUDA-event timings of the callable only (inputs,
combined biases, block masks, compiled FlexAttention are all built beforehand), the median of
many repetitions after a warm-up. The CPU is queued ahead of the GPU (a ``torch.cuda._sleep``
before each batch of repetitions), so ``ms`` is GPU time; ``wall ms`` is back-to-back calls
timed on the host, host overhead included.

The module imports only the standard library at import time: torch, CuPy, dmattn_cupy and
matplotlib are imported inside functions, so the pure parts (FLOP counting, argument parsing,
table formatting, JSON writing) are testable on a machine without them.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

# --------------------------------------------------------------------------------------
# Cases, suites, defaults
# --------------------------------------------------------------------------------------

CASES: dict[str, str] = {
    "dense": "no mask, no bias",
    "causal": "causal (bottom-right aligned)",
    "mask_bias": "full (B,H,Sq,Sk) bool mask (random, 90% kept) + (B,H,Sq,Sk) bias",
    "kbias": "key-side bias (B,H,1,Sk)",
    "kbias_hk": "key-side bias (B,Hk,1,Sk) per kv head, GQA",
    "sparse_window": "CausalWindowMask(1024) block-sparse",
    "sparse_random": "BlockBitsetMask: random 10% of 128x128 blocks (+ diagonal)",
    "decode": "varlen decode: key-based bool mask + bias (total_k, Hk), GQA",
    "prefill_varlen": "varlen prefill, random lengths, key-based bias (total_k, H)",
    "backward": "forward + backward, no mask / bias",
    "backward_bias": "forward + backward, full (B,H,S,S) bias with grad",
    "backward_sparse": "forward + backward, BlockBitsetMask: random 10% of 128x128 blocks "
                       "(+ diagonal)",
}

SUITES: dict[str, list[str]] = {
    "all": list(CASES),
    "forward": ["dense", "causal", "mask_bias", "kbias", "kbias_hk"],
    "mask": ["mask_bias", "kbias", "kbias_hk", "decode"],
    "sparse": ["sparse_window", "sparse_random"],
    "varlen": ["decode", "prefill_varlen"],
    "backward": ["backward", "backward_bias", "backward_sparse"],
}

# Per-case default shapes; every flag given on the command line overrides them.
# decode: batch = sequences, seqlen = queries per sequence, seqlen_k = keys per sequence.
# prefill_varlen: batch = sequences, seqlen = longest length (lengths in [seqlen/8, seqlen]).
_BASE = {"batch": 4, "heads": 16, "kv_heads": None, "seqlen": 4096, "seqlen_k": None,
         "headdim": 128, "dtype": "bf16"}
CASE_DEFAULTS: dict[str, dict[str, Any]] = {
    "dense": {},
    "causal": {},
    "mask_bias": {"batch": 2},
    "kbias": {},
    "kbias_hk": {"heads": 32, "kv_heads": 8},
    "sparse_window": {"batch": 2, "seqlen": 8192},
    "sparse_random": {"batch": 2, "seqlen": 8192},
    "decode": {"batch": 64, "heads": 32, "kv_heads": 8, "seqlen": 1, "seqlen_k": 4096},
    "prefill_varlen": {"batch": 8, "heads": 16, "seqlen": 4096},
    "backward": {"batch": 2, "seqlen": 2048},
    "backward_bias": {"batch": 2, "seqlen": 2048},
    "backward_sparse": {"batch": 1, "seqlen": 8192},
}
SHAPE_KEYS = ("batch", "heads", "kv_heads", "seqlen", "seqlen_k", "headdim", "dtype")

WINDOW = 1024             # sparse_window: CausalWindowMask(WINDOW)
SPARSE_BLOCK = 128        # sparse_random: block size of the bitset mask
SPARSE_DENSITY = 0.10     # sparse_random: fraction of random blocks kept (diagonal added)
MASK_KEEP = 0.90          # mask_bias / decode: fraction of mask elements kept
BWD_FACTOR = 3.5          # fwd + bwd FLOPs = forward FLOPs * 3.5 (bwd = 2.5 x fwd)
PEERS = ("flash", "cudnn", "efficient", "flex")

FLOP_CONVENTION = (
    "FLOPs: forward = 4*B*H*Sq*Sk*D (FlashAttention convention), halved for causal; "
    "fwd+bwd = forward*3.5 (bwd = 2.5x fwd); varlen = sum over sequences. Sparse cases: "
    "'TFLOP/s' counts only allowed (unmasked) elements, 'tile TFLOP/s' counts every "
    "visited block tile (block-sparse kernels) or every tile (SDPA, dense masks). "
    "decode GB/s = bytes of K+V+mask+bias read / time (same bytes for every row); "
    "'%copy' = that GB/s over the measured device-to-device copy bandwidth."
)
RATIO_CONVENTION = (
    "dmattn/x = dmattn throughput / row throughput (= row ms / dmattn ms for the same work); "
    ">1 means dmattn is faster."
)


# --------------------------------------------------------------------------------------
# Pure helpers: FLOPs, bytes, shapes (no torch)
# --------------------------------------------------------------------------------------

def attn_fwd_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, headdim: int,
                   causal: bool = False) -> float:
    """Forward FLOPs, FlashAttention convention: ``4*B*H*Sq*Sk*D``, halved for causal."""
    f = 4.0 * batch * heads * seqlen_q * seqlen_k * headdim
    return f / 2 if causal else f


def fwd_bwd_flops(fwd_flops: float) -> float:
    """Forward + backward FLOPs: forward * 3.5 (the backward costs 2.5 forwards)."""
    return fwd_flops * BWD_FACTOR


def varlen_fwd_flops(lens_q: Sequence[int], lens_k: Sequence[int], heads: int, headdim: int,
                     causal: bool = False) -> float:
    """Sum of the per-sequence forward FLOPs."""
    return sum(attn_fwd_flops(1, heads, lq, lk, headdim, causal) for lq, lk in
               zip(lens_q, lens_k, strict=True))


def elements_flops(allowed: int, batch: int, heads: int, headdim: int) -> float:
    """FLOPs of ``allowed`` (query, key) pairs per (batch, head): 4*D each (QK^T and PV)."""
    return 4.0 * allowed * batch * heads * headdim


def visited_tile_flops(n_tiles: int, block_m: int, block_n: int, batch: int, heads: int,
                       headdim: int) -> float:
    """FLOPs of ``n_tiles`` full ``block_m x block_n`` tiles per (batch, head)."""
    return 4.0 * n_tiles * block_m * block_n * batch * heads * headdim


def causal_window_allowed(seqlen_q: int, seqlen_k: int, window: int) -> int:
    """Number of (i, j) with ``0 <= i + Sk - Sq - j < window`` (CausalWindowMask)."""
    off = seqlen_k - seqlen_q
    total = 0
    for i in range(seqlen_q):
        c = i + off
        lo = max(c - window + 1, 0)
        hi = min(c, seqlen_k - 1)
        if hi >= lo:
            total += hi - lo + 1
    return total


def causal_window_tiles(seqlen_q: int, seqlen_k: int, window: int, block_m: int,
                        block_n: int) -> int:
    """Number of ``block_m x block_n`` tiles holding at least one CausalWindowMask element."""
    off = seqlen_k - seqlen_q
    n = 0
    for r0 in range(0, seqlen_q, block_m):
        r1 = min(r0 + block_m, seqlen_q)
        for c0 in range(0, seqlen_k, block_n):
            c1 = min(c0 + block_n, seqlen_k)
            dmin = r0 + off - (c1 - 1)
            dmax = r1 - 1 + off - c0
            if max(dmin, 0) <= min(dmax, window - 1):
                n += 1
    return n


def block_table_allowed(table: Sequence[Sequence[bool]], seqlen_q: int, seqlen_k: int,
                        block_m: int, block_n: int) -> int:
    """Elements covered by the kept blocks of a block table (edge blocks clipped)."""
    total = 0
    for bi, row in enumerate(table):
        rows = min(block_m, seqlen_q - bi * block_m)
        for bj, keep in enumerate(row):
            if keep:
                total += rows * min(block_n, seqlen_k - bj * block_n)
    return total


def random_block_table(n_rows: int, n_cols: int, density: float, seed: int,
                       diagonal: bool = True) -> list[list[bool]]:
    """Random block table (fixed seed); with ``diagonal`` every block row keeps its diagonal
    block so that no query row is fully masked (SDPA would return NaN there)."""
    import random

    rng = random.Random(seed)
    table = [[rng.random() < density for _ in range(n_cols)] for _ in range(n_rows)]
    if diagonal:
        for i in range(n_rows):
            j = min(n_cols - 1, (i * n_cols) // max(n_rows, 1))
            table[i][j] = True
    return table


def varlen_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """``n`` sequence lengths drawn uniformly from ``[lo, hi]`` with a fixed seed; the first
    two are pinned to ``lo`` and ``hi`` so the range is always covered."""
    import random

    rng = random.Random(seed)
    lens = [rng.randint(lo, hi) for _ in range(n)]
    if n >= 1:
        lens[0] = hi
    if n >= 2:
        lens[1] = lo
    return lens


def rotation_sets(set_bytes: int, l2_bytes: int, max_sets: int = 8) -> int:
    """How many input sets to rotate among so that consecutive calls do not hit in L2."""
    if set_bytes <= 0:
        return 1
    if set_bytes >= 3 * l2_bytes:
        return 1
    return max(1, min(max_sets, math.ceil(3 * l2_bytes / set_bytes)))


def case_shape(name: str, args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Default shape of a case with the command-line overrides applied."""
    if name not in CASES:
        raise KeyError(f"unknown case {name!r}")
    shape = dict(_BASE)
    shape.update(CASE_DEFAULTS[name])
    if args is not None:
        for key in SHAPE_KEYS:
            val = getattr(args, key, None)
            if val is not None:
                shape[key] = val
    kv = shape["kv_heads"]
    if kv is None or (getattr(args, "kv_heads", None) is None
                      and (kv > shape["heads"] or shape["heads"] % kv)):
        # --heads without --kv-heads: keep the case's GQA group when it still divides
        shape["kv_heads"] = shape["heads"]
    if shape["seqlen_k"] is None:
        shape["seqlen_k"] = shape["seqlen"]
    return shape


def tflops(flops: float | None, ms: float | None) -> float | None:
    if not flops or not ms:
        return None
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float | None, ms: float | None) -> float | None:
    if not nbytes or not ms:
        return None
    return nbytes / (ms * 1e-3) / 1e9


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --------------------------------------------------------------------------------------
# Results, table, JSON, plot
# --------------------------------------------------------------------------------------

@dataclass
class ImplResult:
    """One row of a case table."""

    name: str
    role: str = "peer"              # "dmattn" | "variant" (another dmattn call) | "peer"
    status: str = "ok"              # "ok" | "n/a" | "error"
    note: str = ""
    ms: float | None = None         # median GPU time per call
    ms_min: float | None = None
    ms_p10: float | None = None
    ms_p90: float | None = None
    wall_ms: float | None = None    # back-to-back calls, host overhead included
    reps: int = 0
    flops: float | None = None      # useful FLOPs per call
    visited_flops: float | None = None
    bytes: float | None = None      # bytes for the GB/s metric
    first_call_s: float | None = None
    max_abs_diff: float | None = None
    rel_diff: float | None = None

    @property
    def tflops(self) -> float | None:
        return tflops(self.flops, self.ms) if self.status == "ok" else None

    @property
    def visited_tflops(self) -> float | None:
        return tflops(self.visited_flops, self.ms) if self.status == "ok" else None

    @property
    def gbps(self) -> float | None:
        return gbps(self.bytes, self.ms) if self.status == "ok" else None

    def metric(self, kind: str) -> float | None:
        return self.gbps if kind == "gbps" else self.tflops

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(tflops=self.tflops, visited_tflops=self.visited_tflops, gbps=self.gbps)
        return d


@dataclass
class CaseResult:
    name: str
    title: str = ""
    metric: str = "tflops"          # "tflops" | "gbps"
    params: dict[str, Any] = field(default_factory=dict)
    info: list[str] = field(default_factory=list)
    impls: list[ImplResult] = field(default_factory=list)
    copy_bw_gbps: float | None = None
    smoke_ref: str = ""
    elapsed_s: float | None = None
    error: str = ""

    def dmattn(self) -> ImplResult | None:
        for r in self.impls:
            if r.role == "dmattn":
                return r
        return None

    def best_peer(self) -> ImplResult | None:
        best: ImplResult | None = None
        for r in self.impls:
            m = r.metric(self.metric)
            if r.role == "peer" and m is not None:
                if best is None or m > (best.metric(self.metric) or 0.0):
                    best = r
        return best

    def ratio(self, row: ImplResult) -> float | None:
        """dmattn throughput / row throughput."""
        dm = self.dmattn()
        if dm is None:
            return None
        a, b = dm.metric(self.metric), row.metric(self.metric)
        if a is None or not b:
            return None
        return a / b

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["impls"] = [r.to_dict() for r in self.impls]
        best = self.best_peer()
        d["best_peer"] = best.name if best else None
        d["dmattn_vs_best_peer"] = self.ratio(best) if best else None
        return d


def _fmt(x: float | None, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _fmt_ratio(r: float) -> str:
    return f"{r:.2f}x" if r >= 0.095 else f"{r:.3f}x"


def _short(s: str, n: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def format_table(case: CaseResult, note_width: int = 70) -> str:
    """The case table: rows = implementations; columns = ms, wall ms, TFLOP/s, (tile
    TFLOP/s), (GB/s, %copy), max|diff|, dmattn/x, note."""
    show_tile = any(r.visited_flops for r in case.impls)
    show_gb = case.metric == "gbps" or any(r.bytes for r in case.impls)
    show_copy = show_gb and bool(case.copy_bw_gbps)
    cols: list[tuple[str, int]] = [("impl", 34), ("ms", 9), ("wall ms", 9), ("TFLOP/s", 8)]
    if show_tile:
        cols.append(("tile TF/s", 9))
    if show_gb:
        cols.append(("GB/s", 8))
    if show_copy:
        cols.append(("%copy", 6))
    cols += [("max|diff|", 9), ("dmattn/x", 8), ("note", 0)]
    head = " ".join(h.ljust(w) if i == 0 else h.rjust(w) if w else h
                    for i, (h, w) in enumerate(cols))
    lines = [head.rstrip(), "-" * max(len(head), 100)]
    for r in case.impls:
        name = r.name if r.role != "variant" else "  " + r.name
        cells = [name.ljust(34)[:34]]
        if r.status == "ok":
            cells += [_fmt(r.ms, ".4f").rjust(9), _fmt(r.wall_ms, ".4f").rjust(9),
                      _fmt(r.tflops, ".1f").rjust(8)]
            if show_tile:
                cells.append(_fmt(r.visited_tflops, ".1f").rjust(9))
            if show_gb:
                cells.append(_fmt(r.gbps, ".0f").rjust(8))
            if show_copy:
                g = r.gbps
                frac = None if g is None or not case.copy_bw_gbps else 100 * g / case.copy_bw_gbps
                cells.append((_fmt(frac, ".0f") + "%" if frac is not None else "-").rjust(6))
            cells.append(_fmt(r.max_abs_diff, ".1e").rjust(9))
            ratio = case.ratio(r)
            cells.append((_fmt_ratio(ratio) if ratio is not None else "-").rjust(8))
            note = r.note
        else:
            ncols = len(cols) - 2
            cells += ["-".rjust(w) for _, w in cols[1:ncols]]
            note = f"{r.status}: {r.note}" if r.note else r.status
        cells.append(_short(note, note_width) if note_width else note)
        lines.append(" ".join(cells).rstrip())
    return "\n".join(lines)


def summary_line(case: CaseResult) -> str:
    """``summary <case>: dmattn X vs best peer <p> Y -> dmattn/peer = Z``."""
    unit = "GB/s" if case.metric == "gbps" else "TFLOP/s"
    dm = case.dmattn()
    best = case.best_peer()
    if dm is None or dm.metric(case.metric) is None:
        why = f" ({_short(dm.note, 80)})" if dm is not None and dm.note else ""
        peer = (f"; best peer {best.name} {best.metric(case.metric):.1f} {unit}"
                if best is not None else "")
        return f"summary {case.name}: dmattn n/a{why}{peer}"
    dmv = dm.metric(case.metric)
    if best is None:
        return f"summary {case.name}: dmattn {dmv:.1f} {unit}; no peer ran"
    ratio = case.ratio(best)
    return (f"summary {case.name}: dmattn {dmv:.1f} {unit} vs best peer {best.name} "
            f"{best.metric(case.metric):.1f} {unit} -> dmattn/peer = {_fmt_ratio(ratio or 0.0)}")


def format_case(case: CaseResult) -> str:
    p = case.params
    shape = " ".join(f"{k}={p[k]}" for k in p if k in SHAPE_KEYS or k in ("lens",))
    out = [f"== {case.name}: {case.title}", f"   {shape}"]
    out += [f"   {line}" for line in case.info]
    if case.smoke_ref:
        out.append(f"   smoke: max|diff| vs {case.smoke_ref}")
    if case.error:
        out.append(f"   case error: {case.error}")
    out.append(format_table(case))
    out.append(summary_line(case))
    return "\n".join(out)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, str | int | float | bool) or x is None:
        return x
    return str(x)


def results_to_json(meta: dict[str, Any], results: Sequence[CaseResult | dict[str, Any]]
                    ) -> dict[str, Any]:
    cases = [r.to_dict() if isinstance(r, CaseResult) else dict(r) for r in results]
    return _jsonable({"meta": meta, "conventions": {"flops": FLOP_CONVENTION,
                                                     "ratio": RATIO_CONVENTION},
                      "cases": cases})


def write_json(path: str, meta: dict[str, Any],
               results: Sequence[CaseResult | dict[str, Any]]) -> None:
    """Write every number of the run (NaN/inf as null) to ``path``."""
    with open(path, "w") as f:
        json.dump(results_to_json(meta, results), f, indent=2)
        f.write("\n")


def plot_results(path: str, results: Sequence[CaseResult], title: str = "") -> None:
    """One bar chart per case (TFLOP/s or GB/s per implementation) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(results))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 3.6 * nrows), squeeze=False)
    for ax, case in zip([a for row in axes for a in row], results, strict=False):
        unit = "GB/s" if case.metric == "gbps" else "TFLOP/s"
        names, vals, colors = [], [], []
        for r in case.impls:
            names.append(r.name)
            v = r.metric(case.metric)
            vals.append(v or 0.0)
            colors.append("tab:red" if r.role == "dmattn" else
                          "tab:orange" if r.role == "variant" else "tab:blue")
        y = list(range(len(names)))
        ax.barh(y, vals, color=colors)
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        for yi, (v, r) in enumerate(zip(vals, case.impls, strict=True)):
            ax.text(v, yi, f" {v:.0f}" if r.status == "ok" else f" {r.status}",
                    va="center", fontsize=7)
        ax.set_title(f"{case.name} ({unit})", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    for ax in [a for row in axes for a in row][len(results):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    case_help = "; ".join(f"{k}: {v}" for k, v in CASES.items())
    p = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark dmattn_cupy against torch SDPA (flash/cuDNN/efficient) and "
                    "compiled FlexAttention, in one process, timed with CUDA events.",
        epilog=f"Cases: {case_help}. Suites: "
               + "; ".join(f"{k} = {','.join(v)}" for k, v in SUITES.items())
               + ". " + FLOP_CONVENTION,
    )
    p.add_argument("--case", action="append", default=[], metavar="NAME",
                   help="case to run (repeatable, or comma-separated); see the list below")
    p.add_argument("--suite", choices=sorted(SUITES), default=None,
                   help="a named group of cases (default: all when no --case is given)")
    p.add_argument("--list", action="store_true", help="list cases and suites, then exit")
    g = p.add_argument_group("shape overrides (apply to every selected case)")
    g.add_argument("--batch", type=int, help="batch (decode/prefill_varlen: sequences)")
    g.add_argument("--heads", type=int, help="query heads H")
    g.add_argument("--kv-heads", type=int, dest="kv_heads", help="key/value heads Hk")
    g.add_argument("--seqlen", type=int,
                   help="query length (decode: queries per sequence; prefill_varlen: "
                        "longest sequence)")
    g.add_argument("--seqlen-k", type=int, dest="seqlen_k",
                   help="key length (default: --seqlen; decode: keys per sequence)")
    g.add_argument("--headdim", type=int, help="head dimension D")
    g.add_argument("--dtype", choices=("bf16", "fp16"), help="q/k/v (and bias) dtype")
    t = p.add_argument_group("timing")
    t.add_argument("--quick", action="store_true",
                   help="few repetitions for a fast sanity run (warmup 3, >=10 reps)")
    t.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 10)")
    t.add_argument("--repeat", type=int, default=None,
                   help="minimum timed repetitions (default 30)")
    t.add_argument("--max-repeat", type=int, default=None, dest="max_repeat",
                   help="maximum timed repetitions (default 1000)")
    t.add_argument("--min-time", type=float, default=None, dest="min_time",
                   help="repeat until at least this many seconds are timed (default 0.2)")
    o = p.add_argument_group("peers, checks, output")
    o.add_argument("--peers", default="all",
                   help="comma list of peers to run among "
                        f"{','.join(PEERS)} (or 'all', 'none'); default all")
    o.add_argument("--flex-mode", choices=("compile", "eager"), default="compile",
                   dest="flex_mode", help="FlexAttention compiled (default) or eager")
    o.add_argument("--no-smoke", action="store_true", dest="no_smoke",
                   help="skip the fp32 correctness smoke check")
    o.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    o.add_argument("--json", metavar="PATH", help="write all numbers to this JSON file")
    o.add_argument("--plot", metavar="PATH", help="write a PNG bar chart per case")
    o.add_argument("--device", default="cuda",
                   help="cuda (default); 'cpu' only dry-runs the harness (meaningless times)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and resolve: ``args.cases`` (ordered, de-duplicated), ``args.peer_set`` and the
    timing settings (``--quick`` lowers the defaults; explicit values win)."""
    p = build_parser()
    args = p.parse_args(argv)
    names: list[str] = []
    if args.suite:
        names += SUITES[args.suite]
    for item in args.case:
        for n in item.split(","):
            n = n.strip()
            if not n:
                continue
            if n not in CASES:
                p.error(f"unknown case {n!r}; choose from {', '.join(CASES)}")
            names.append(n)
    if not names:
        names = list(SUITES["all"])
    args.cases = list(dict.fromkeys(names))
    peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    if peers in (["all"], []):
        peer_set = set(PEERS)
    elif peers == ["none"]:
        peer_set = set()
    else:
        bad = [s for s in peers if s not in PEERS]
        if bad:
            p.error(f"unknown peer(s) {bad}; choose from {', '.join(PEERS)}, all, none")
        peer_set = set(peers)
    args.peer_set = peer_set
    q = args.quick
    if args.warmup is None:
        args.warmup = 3 if q else 10
    if args.repeat is None:
        args.repeat = 10 if q else 30
    if args.max_repeat is None:
        args.max_repeat = 100 if q else 1000
    if args.min_time is None:
        args.min_time = 0.02 if q else 0.2
    for key in ("batch", "heads", "kv_heads", "seqlen", "seqlen_k", "headdim"):
        v = getattr(args, key)
        if v is not None and v < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def list_text() -> str:
    lines = ["cases:"]
    for k, v in CASES.items():
        s = case_shape(k)
        lines.append(f"  {k:15s} {v}  [B={s['batch']} H={s['heads']} Hk={s['kv_heads']} "
                     f"Sq={s['seqlen']} Sk={s['seqlen_k']} D={s['headdim']} {s['dtype']}]")
    lines.append("suites:")
    for k, v in SUITES.items():
        lines.append(f"  {k:15s} {', '.join(v)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Torch side: context, timing
# --------------------------------------------------------------------------------------

class Ctx:
    """torch, the device, dmattn (or why it is missing), peers, FlexAttention."""

    def __init__(self, args: argparse.Namespace, dm: Any = None):
        import torch

        self.torch = torch
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.peers = args.peer_set
        self.dm = dm
        self.dm_error = ""
        if self.dm is None:
            try:
                import dmattn_cupy

                self.dm = dmattn_cupy
            except Exception as e:  # noqa: BLE001 - report and go on
                self.dm_error = f"import dmattn_cupy failed: {type(e).__name__}: {e}"
        self._flex: Any = None
        self._flex_error = ""
        self.cycles_per_ms: float | None = None
        self.copy_bw: float | None = None
        self.l2_bytes = 50 * 2**20
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            self.l2_bytes = int(getattr(props, "L2_cache_size", 0) or self.l2_bytes)
            self._calibrate_sleep()

    # -- dmattn ------------------------------------------------------------------------
    def dm_attr(self, name: str) -> Any:
        if self.dm is None:
            raise ImportError(self.dm_error or "dmattn_cupy is not importable")
        if not hasattr(self.dm, name):
            raise NotImplementedError(f"dmattn_cupy has no {name}")
        return getattr(self.dm, name)

    # -- FlexAttention -----------------------------------------------------------------
    def flex(self) -> Any:
        if self._flex is None and not self._flex_error:
            try:
                from torch.nn.attention.flex_attention import flex_attention

                if self.args.flex_mode == "compile":
                    self._flex = self.torch.compile(flex_attention, dynamic=False)
                else:
                    self._flex = flex_attention
            except Exception as e:  # noqa: BLE001
                self._flex_error = f"{type(e).__name__}: {e}"
        if self._flex is None:
            raise RuntimeError(f"FlexAttention unavailable: {self._flex_error}")
        return self._flex

    def new_case(self) -> None:
        """A fresh compiled FlexAttention per case (compile once per case)."""
        torch = self.torch
        self._flex = None
        self._flex_error = ""
        try:
            torch._dynamo.reset()
        except Exception:  # noqa: BLE001
            pass
        try:
            cfg = torch._dynamo.config
            for name in ("cache_size_limit", "recompile_limit",
                         "accumulated_cache_size_limit", "accumulated_recompile_limit"):
                if hasattr(cfg, name):
                    setattr(cfg, name, max(int(getattr(cfg, name)), 256))
        except Exception:  # noqa: BLE001
            pass
        if self.cuda:
            torch.cuda.empty_cache()

    # -- timing ------------------------------------------------------------------------
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
                # queue the CPU ahead of the GPU so launch overhead is not in the events
                self.gpu_sleep(nrep * host_ms * 1.5 + 0.2)
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


# --------------------------------------------------------------------------------------
# Case set-up
# --------------------------------------------------------------------------------------

@dataclass
class Impl:
    """``make(inputs, info)`` returns the timed callable for one input set (all preparation
    happens there, outside timing); it may store ``visited_flops``/``note`` into ``info``.
    ``to_ours(output)`` maps the callable's output onto the comparison layout."""

    name: str
    role: str
    make: Callable[[dict[str, Any], dict[str, Any]], Callable[[], Any]]
    flops: float | None = None
    visited_flops: float | None = None
    bytes: float | None = None
    to_ours: Callable[[Any], Any] | None = None
    check: bool = True


@dataclass
class Setup:
    title: str
    params: dict[str, Any]
    metric: str
    make_inputs: Callable[[int], dict[str, Any]]
    impls: list[Impl]
    reference: Callable[[dict[str, Any]], list[Any]] | None = None
    select: Callable[[Any], list[Any]] | None = None
    ref_note: str = ""
    info: list[str] = field(default_factory=list)


def _dtype(torch: Any, name: str) -> Any:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _sdpa_backend(torch: Any, peer: str) -> Any:
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[peer]


def _sdpa_call(ctx: Ctx, peer: str, q: Any, k: Any, v: Any, attn_mask: Any = None,
               is_causal: bool = False, gqa: bool = False) -> Callable[[], Any]:
    """A callable running SDPA with one backend on (B,H,S,D) views."""
    torch = ctx.torch
    from torch.nn.attention import sdpa_kernel

    F = torch.nn.functional
    backend = _sdpa_backend(torch, peer)
    kw: dict[str, Any] = {"attn_mask": attn_mask, "is_causal": is_causal}
    if gqa:
        kw["enable_gqa"] = True

    def fn() -> Any:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, **kw)

    return fn


def _sdpa_peer(ctx: Ctx, peer: str, q: Any, k: Any, v: Any, attn_mask: Any, is_causal: bool,
               info: dict[str, Any], grad: bool = False) -> Callable[[], Any]:
    """SDPA with GQA through ``enable_gqa=True``; where the backend refuses that, K/V are
    ``repeat_interleave``d (once, outside timing; inside the call when gradients flow to
    the un-expanded K/V) and the row says so."""
    H, Hk = q.shape[1], k.shape[1]
    if H == Hk:
        return _sdpa_call(ctx, peer, q, k, v, attn_mask, is_causal)
    fn = _sdpa_call(ctx, peer, q, k, v, attn_mask, is_causal, gqa=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
        return fn
    except RuntimeError:
        g = H // Hk
        info["note"] = "GQA via repeat_interleave (enable_gqa refused)"
        if not grad:
            return _sdpa_call(ctx, peer, q, k.repeat_interleave(g, dim=1),
                              v.repeat_interleave(g, dim=1), attn_mask, is_causal)

        def expanded() -> Any:
            return _sdpa_call(ctx, peer, q, k.repeat_interleave(g, dim=1),
                              v.repeat_interleave(g, dim=1), attn_mask, is_causal)()

        return expanded


def _t(x: Any) -> Any:
    """(B,S,H,D) <-> (B,H,S,D) view."""
    return x.transpose(1, 2)


def _additive(torch: Any, allowed: Any, bias: Any = None, dtype: Any = None) -> Any:
    """Additive mask: bias (or 0) where allowed, -inf elsewhere."""
    dtype = dtype or (bias.dtype if bias is not None else torch.float32)
    base = bias.to(dtype) if bias is not None else torch.zeros((), dtype=dtype,
                                                               device=allowed.device)
    return torch.where(allowed, base, torch.tensor(float("-inf"), dtype=dtype,
                                                   device=allowed.device))


def _ref_dense(ctx: Ctx, q: Any, k: Any, v: Any, add_fn: Callable[[int, int], Any] | None,
               nb: int, chunk: int = 1024) -> Any:
    """fp32 SDPA-math reference on batch[:nb], (B,S,H,D) in and out; ``add_fn(r0, r1)``
    gives the additive fp32 mask rows r0:r1 (broadcastable to (nb,H,rows,Sk)) or None."""
    torch = ctx.torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    H, Hk = q.shape[2], k.shape[2]
    qf = _t(q[:nb].float())
    kf = _t(k[:nb].float())
    vf = _t(v[:nb].float())
    if Hk != H:
        kf = kf.repeat_interleave(H // Hk, dim=1)
        vf = vf.repeat_interleave(H // Hk, dim=1)
    outs = []
    for r0 in range(0, q.shape[1], chunk):
        r1 = min(q.shape[1], r0 + chunk)
        am = add_fn(r0, r1) if add_fn is not None else None
        with sdpa_kernel(SDPBackend.MATH):
            outs.append(F.scaled_dot_product_attention(qf[:, :, r0:r1], kf, vf, attn_mask=am))
    out = _t(torch.cat(outs, dim=2))
    return torch.nan_to_num(out, nan=0.0)


def _smoke_batches(shape: dict[str, Any]) -> int:
    return min(shape["batch"], 2)


def _flex_impl(ctx: Ctx, name: str, flops: float, make_args: Callable[[dict[str, Any]], dict],
               visited: float | None = None, to_ours: Callable[[Any], Any] | None = None
               ) -> Impl:
    """FlexAttention peer: ``make_args(inputs)`` returns q/k/v (B,H,S,D) views and the
    flex keyword arguments (score_mod, block_mask, enable_gqa) built outside timing."""

    def make(inp: dict[str, Any], info: dict[str, Any]) -> Callable[[], Any]:
        flex = ctx.flex()
        a = make_args(inp)
        q, k, v = a.pop("q"), a.pop("k"), a.pop("v")

        def fn() -> Any:
            return flex(q, k, v, **a)

        return fn

    return Impl(name, "peer", make, flops=flops, visited_flops=visited,
                to_ours=to_ours or _t)


def _causal_allowed(torch: Any, r0: int, r1: int, sq: int, sk: int, device: Any,
                    window: int | None = None) -> Any:
    i = torch.arange(r0, r1, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    d = i + (sk - sq) - j
    ok = d >= 0
    if window is not None:
        ok = ok & (d < window)
    return ok


def _setup_dense_family(ctx: Ctx, name: str, shape: dict[str, Any]) -> Setup:
    """dense, causal, mask_bias, kbias, kbias_hk, sparse_window, sparse_random."""
    torch = ctx.torch
    dev = ctx.device
    B, H, Hk = shape["batch"], shape["heads"], shape["kv_heads"]
    Sq, Sk, D = shape["seqlen"], shape["seqlen_k"], shape["headdim"]
    dt = _dtype(torch, shape["dtype"])
    if H % Hk:
        raise ValueError(f"heads {H} is not a multiple of kv_heads {Hk}")
    g = H // Hk
    gqa = Hk != H
    causal = name == "causal"
    seed = ctx.args.seed
    info: list[str] = []
    flops = attn_fwd_flops(B, H, Sq, Sk, D, causal)
    visited_dm: float | None = None
    visited_flex: float | None = None
    dense_tiles = None

    table_t = None
    table: list[list[bool]] | None = None
    if name == "sparse_window":
        allowed = causal_window_allowed(Sq, Sk, WINDOW)
        flops = elements_flops(allowed, B, H, D)
        tiles = causal_window_tiles(Sq, Sk, WINDOW, 128, 128)
        visited_dm = visited_flex = visited_tile_flops(tiles, 128, 128, B, H, D)
        dense_tiles = attn_fwd_flops(B, H, Sq, Sk, D)
        info.append(f"CausalWindowMask({WINDOW}): {allowed / (Sq * Sk):.2%} of elements allowed,"
                    f" {tiles} of {math.ceil(Sq / 128) * math.ceil(Sk / 128)} 128x128 tiles "
                    "visited")
    elif name == "sparse_random":
        nrb, ncb = math.ceil(Sq / SPARSE_BLOCK), math.ceil(Sk / SPARSE_BLOCK)
        table = random_block_table(nrb, ncb, SPARSE_DENSITY, seed)
        allowed = block_table_allowed(table, Sq, Sk, SPARSE_BLOCK, SPARSE_BLOCK)
        kept = sum(map(sum, table))
        flops = elements_flops(allowed, B, H, D)
        visited_dm = visited_flex = visited_tile_flops(kept, SPARSE_BLOCK, SPARSE_BLOCK, B, H, D)
        dense_tiles = attn_fwd_flops(B, H, Sq, Sk, D)
        table_t = torch.tensor(table, dtype=torch.bool, device=dev)
        info.append(f"random blocks: {kept} of {nrb * ncb} {SPARSE_BLOCK}x{SPARSE_BLOCK} blocks "
                    f"kept ({kept / (nrb * ncb):.1%}; p={SPARSE_DENSITY} + one per block row), "
                    f"{allowed / (Sq * Sk):.2%} of elements")
    if name.startswith("sparse"):
        info.append("TFLOP/s counts allowed elements only; tile TF/s counts visited tiles "
                    "(SDPA: every tile)")

    def make_inputs(i: int) -> dict[str, Any]:
        gen = torch.Generator(device=dev).manual_seed(seed * 1000 + i)

        def rn(*s: int) -> Any:
            return torch.randn(*s, generator=gen, device=dev, dtype=dt)

        inp = {"q": rn(B, Sq, H, D), "k": rn(B, Sk, Hk, D), "v": rn(B, Sk, Hk, D)}
        if name == "mask_bias":
            inp["mask"] = torch.rand(B, H, Sq, Sk, generator=gen, device=dev) < MASK_KEEP
            inp["bias"] = rn(B, H, Sq, Sk)
        elif name == "kbias":
            inp["bias"] = rn(B, H, 1, Sk)
        elif name == "kbias_hk":
            inp["bias"] = rn(B, Hk, 1, Sk)
        return inp

    # ---- dmattn ----
    def dm_kwargs(inp: dict[str, Any], info_: dict[str, Any]) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if causal:
            kw["is_causal"] = True
        if "mask" in inp:
            kw["attn_mask"] = inp["mask"]
        if "bias" in inp:
            kw["attn_bias"] = inp["bias"]
        if name == "sparse_window":
            kw["sparse_mask"] = ctx.dm_attr("CausalWindowMask")(WINDOW, Sq, Sk)
        elif name == "sparse_random":
            kw["sparse_mask"] = _make_bitset_mask(ctx, table_t, Sq, Sk, info_)
        if "sparse_mask" in kw:
            _mask_visited(ctx, kw["sparse_mask"], B, H, D, info_)
        return kw

    def make_dm(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
        f = ctx.dm_attr("flash_dmattn_func")
        q, k, v = inp["q"], inp["k"], inp["v"]
        kw = dm_kwargs(inp, info_)
        return lambda: f(q, k, v, **kw)

    impls = [Impl("dmattn", "dmattn", make_dm, flops=flops, visited_flops=visited_dm,
                  to_ours=None)]
    if causal:
        def make_dm_cm(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
            f = ctx.dm_attr("flash_dmattn_func")
            m = ctx.dm_attr("CausalMask")(Sq, Sk)
            _mask_visited(ctx, m, B, H, D, info_)
            q, k, v = inp["q"], inp["k"], inp["v"]
            return lambda: f(q, k, v, sparse_mask=m)

        impls.append(Impl("dmattn sparse_mask=CausalMask", "variant", make_dm_cm, flops=flops))
    if name == "sparse_window":
        def make_dm_ws(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
            f = ctx.dm_attr("flash_dmattn_func")
            q, k, v = inp["q"], inp["k"], inp["v"]
            return lambda: f(q, k, v, window_size=(WINDOW - 1, 0))

        impls.append(Impl(f"dmattn window_size=({WINDOW - 1},0)", "variant", make_dm_ws,
                          flops=flops))

    # ---- SDPA peers ----
    def sdpa_mask(inp: dict[str, Any]) -> tuple[Any, bool]:
        """attn_mask for SDPA (additive, query dtype, built once) and is_causal."""
        if causal:
            if Sq == Sk:
                return None, True
            from torch.nn.attention.bias import causal_lower_right

            return causal_lower_right(Sq, Sk), False
        if name == "mask_bias":
            return _additive(torch, inp["mask"], inp["bias"], dt), False
        if name == "kbias":
            return inp["bias"], False
        if name == "kbias_hk":
            return inp["bias"].repeat_interleave(g, dim=1), False
        if name == "sparse_window":
            ok = _causal_allowed(torch, 0, Sq, Sq, Sk, dev, WINDOW)
            return _additive(torch, ok, None, dt)[None, None], False
        if name == "sparse_random":
            ok = _block_dense(torch, table_t, Sq, Sk)
            return _additive(torch, ok, None, dt)[None, None], False
        return None, False

    for peer in ("flash", "cudnn", "efficient"):
        if peer not in ctx.peers:
            continue

        def make_sdpa(inp: dict[str, Any], info_: dict[str, Any], peer: str = peer
                      ) -> Callable[[], Any]:
            am, ic = sdpa_mask(inp)
            return _sdpa_peer(ctx, peer, _t(inp["q"]), _t(inp["k"]), _t(inp["v"]), am, ic,
                              info_)

        impls.append(Impl(f"sdpa-{peer}", "peer", make_sdpa, flops=flops,
                          visited_flops=dense_tiles, to_ours=_t))

    # ---- FlexAttention ----
    if "flex" in ctx.peers:
        def flex_args(inp: dict[str, Any]) -> dict[str, Any]:
            from torch.nn.attention.flex_attention import create_block_mask

            a: dict[str, Any] = {"q": _t(inp["q"]), "k": _t(inp["k"]), "v": _t(inp["v"])}
            if gqa:
                a["enable_gqa"] = True
            off = Sk - Sq
            if causal:
                def causal_mm(b: Any, h: Any, qi: Any, kv: Any) -> Any:
                    return qi + off >= kv

                a["block_mask"] = create_block_mask(causal_mm, None, None, Sq, Sk,
                                                    device=dev)
            elif name == "sparse_window":
                def window_mm(b: Any, h: Any, qi: Any, kv: Any) -> Any:
                    d = qi + off - kv
                    return (d >= 0) & (d < WINDOW)

                a["block_mask"] = create_block_mask(window_mm, None, None, Sq, Sk,
                                                    device=dev)
            elif name == "sparse_random":
                tab = table_t

                def random_mm(b: Any, h: Any, qi: Any, kv: Any) -> Any:
                    return tab[qi // SPARSE_BLOCK, kv // SPARSE_BLOCK]

                a["block_mask"] = create_block_mask(random_mm, None, None, Sq, Sk,
                                                    device=dev)
            elif name == "mask_bias":
                mask, bias = inp["mask"], inp["bias"]

                def mb_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                    return torch.where(mask[b, h, qi, kv], score + bias[b, h, qi, kv],
                                       -float("inf"))

                a["score_mod"] = mb_sm
            elif name == "kbias":
                bias = inp["bias"]

                def kb_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                    return score + bias[b, h, 0, kv]

                a["score_mod"] = kb_sm
            elif name == "kbias_hk":
                bias = inp["bias"]

                def kbh_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                    return score + bias[b, h // g, 0, kv]

                a["score_mod"] = kbh_sm
            return a

        impls.append(_flex_impl(ctx, "flex", flops, flex_args, visited_flex))

    # ---- reference ----
    nb = _smoke_batches(shape)

    def reference(inp: dict[str, Any]) -> list[Any]:
        def add_fn(r0: int, r1: int) -> Any:
            if causal:
                return _additive(torch, _causal_allowed(torch, r0, r1, Sq, Sk, dev))
            if name == "sparse_window":
                return _additive(torch, _causal_allowed(torch, r0, r1, Sq, Sk, dev, WINDOW))
            if name == "sparse_random":
                return _additive(torch, _block_dense(torch, table_t, Sq, Sk)[r0:r1])
            if name == "mask_bias":
                return _additive(torch, inp["mask"][:nb, :, r0:r1],
                                 inp["bias"][:nb, :, r0:r1].float())
            if name == "kbias":
                return inp["bias"][:nb].float()
            if name == "kbias_hk":
                return inp["bias"][:nb].float().repeat_interleave(g, dim=1)
            return None

        return [_ref_dense(ctx, inp["q"], inp["k"], inp["v"], add_fn, nb)]

    def select(out: Any) -> list[Any]:
        return [out[:nb]]

    return Setup(CASES[name], shape, "tflops", make_inputs, impls, reference, select,
                 f"fp32 SDPA-math on batch[:{nb}]", info)


def _block_dense(torch: Any, table_t: Any, sq: int, sk: int) -> Any:
    rows = torch.arange(sq, device=table_t.device) // SPARSE_BLOCK
    cols = torch.arange(sk, device=table_t.device) // SPARSE_BLOCK
    return table_t[rows][:, cols]


def _to_numpy(x: Any) -> Any:
    import numpy as np

    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    if hasattr(x, "get") and not isinstance(x, dict):
        return x.get()
    return np.asarray(x)


def _make_bitset_mask(ctx: Ctx, table_t: Any, sq: int, sk: int, info: dict[str, Any]) -> Any:
    """``dm.BlockBitsetMask`` for the random block table: ``from_dense_mask`` on the dense
    element mask (torch, then NumPy), else the constructor on the block table; the first
    whose ``to_dense()`` matches is used."""
    import numpy as np

    cls = ctx.dm_attr("BlockBitsetMask")
    torch = ctx.torch
    dense_t = _block_dense(torch, table_t, sq, sk)
    dense_np = _to_numpy(dense_t)
    tab_np = _to_numpy(table_t)
    bs = (SPARSE_BLOCK, SPARSE_BLOCK)
    attempts: list[tuple[str, Callable[[], Any]]] = []
    if hasattr(cls, "from_dense_mask"):
        attempts.append(("from_dense_mask(torch)",
                         lambda: cls.from_dense_mask(dense_t, block_size=bs)))
        attempts.append(("from_dense_mask(numpy)",
                         lambda: cls.from_dense_mask(dense_np, block_size=bs)))
    attempts.append(("BlockBitsetMask(table)", lambda: cls(tab_np, sq, sk, block_size=bs)))
    errors = []
    first = None
    for label, mk in attempts:
        try:
            m = mk()
        except (NotImplementedError, TypeError, ValueError, AttributeError) as e:
            errors.append(f"{label}: {type(e).__name__}: {e}")
            continue
        first = first or m
        try:
            got = np.asarray(_to_numpy(m.to_dense()), dtype=bool).reshape(sq, sk)
            if np.array_equal(got, dense_np):
                return m
            errors.append(f"{label}: to_dense() differs from the block table")
        except Exception as e:  # noqa: BLE001 - can't verify, accept
            info["note"] = f"{label}: to_dense() unavailable ({type(e).__name__})"
            return m
    if first is not None:
        info["note"] = "; ".join(errors)
        return first
    raise NotImplementedError("BlockBitsetMask: " + "; ".join(errors))


def _mask_visited(ctx: Ctx, mask: Any, batch: int, heads: int, headdim: int,
                  info: dict[str, Any]) -> None:
    """Visited-tile FLOPs from the mask's own ``block_map()`` and ``block_size`` (kept at the
    analytic count when the mask object cannot tell)."""
    import numpy as np

    try:
        bm = np.asarray(_to_numpy(mask.block_map()))
        bsz = tuple(mask.block_size)
    except Exception:  # noqa: BLE001
        return
    lead = int(np.prod(bm.shape[:-2])) if bm.ndim > 2 else 1
    n = int(np.count_nonzero(bm))
    # tiles per (batch, head), averaged over leading dims where the mask has them
    info["visited_flops"] = visited_tile_flops(1, bsz[0], bsz[1], batch, heads, headdim) * n / lead
    note = f"mask blocks {bsz[0]}x{bsz[1]}: {n} of {bm.size} visited"
    try:
        note += f", estimate_speedup={float(ctx.dm.estimate_speedup(mask)):.2f}"
    except Exception:  # noqa: BLE001
        pass
    info.setdefault("note", note)


def _setup_decode(ctx: Ctx, shape: dict[str, Any]) -> Setup:
    torch = ctx.torch
    dev = ctx.device
    B, H, Hk = shape["batch"], shape["heads"], shape["kv_heads"]
    Sq, Sk, D = shape["seqlen"], shape["seqlen_k"], shape["headdim"]
    if H % Hk:
        raise ValueError(f"heads {H} is not a multiple of kv_heads {Hk}")
    g = H // Hk
    dt = _dtype(torch, shape["dtype"])
    esz = 2
    tq, tk = B * Sq, B * Sk
    kv_bytes = 2 * tk * Hk * D * esz
    mb_bytes = tk * Hk * (1 + esz)
    nbytes = kv_bytes + mb_bytes
    flops = attn_fwd_flops(B, H, Sq, Sk, D)
    seed = ctx.args.seed
    info = [f"varlen: {B} sequences x {Sq} query x {Sk} keys; mask (total_k, Hk) bool "
            f"({MASK_KEEP:.0%} kept) + bias (total_k, Hk) {shape['dtype']}",
            f"GB/s counts K+V+mask+bias = {nbytes / 1e6:.1f} MB per call (Q/O ignored); "
            "SDPA peers: padded batch with a pre-combined additive (B,H,1,Sk) bias"]

    def make_inputs(i: int) -> dict[str, Any]:
        gen = torch.Generator(device=dev).manual_seed(seed * 1000 + i)

        def rn(*s: int) -> Any:
            return torch.randn(*s, generator=gen, device=dev, dtype=dt)

        mask = torch.rand(tk, Hk, generator=gen, device=dev) < MASK_KEEP
        mask.view(B, Sk, Hk)[:, -1, :] = True   # never an empty row
        return {"q": rn(tq, H, D), "k": rn(tk, Hk, D), "v": rn(tk, Hk, D), "mask": mask,
                "bias": rn(tk, Hk),
                "cu_q": torch.arange(0, B + 1, device=dev, dtype=torch.int32) * Sq,
                "cu_k": torch.arange(0, B + 1, device=dev, dtype=torch.int32) * Sk}

    def make_dm(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
        f = ctx.dm_attr("flash_dmattn_varlen_func")
        a = (inp["q"], inp["k"], inp["v"], inp["cu_q"], inp["cu_k"], Sq, Sk)
        kw = {"attn_mask": inp["mask"], "attn_bias": inp["bias"]}
        return lambda: f(*a, **kw)

    def padded(inp: dict[str, Any]) -> tuple[Any, Any, Any]:
        q = _t(inp["q"].view(B, Sq, H, D))
        k = _t(inp["k"].view(B, Sk, Hk, D))
        v = _t(inp["v"].view(B, Sk, Hk, D))
        return q, k, v

    def combined(inp: dict[str, Any], dtype: Any) -> Any:
        """(B,H,1,Sk) additive bias expanded from the per-kv-head mask/bias."""
        m = inp["mask"].view(B, Sk, Hk).permute(0, 2, 1)
        b = inp["bias"].view(B, Sk, Hk).permute(0, 2, 1)
        add = _additive(torch, m, b, dtype)                  # (B, Hk, Sk)
        return add.repeat_interleave(g, dim=1)[:, :, None, :].contiguous()

    def to_ours(out: Any) -> Any:        # (B,H,Sq,D) -> (total_q, H, D)
        return _t(out).reshape(tq, H, D)

    impls = [Impl("dmattn varlen", "dmattn", make_dm, flops=flops, bytes=nbytes)]
    for peer in ("flash", "cudnn", "efficient"):
        if peer not in ctx.peers:
            continue

        def make_sdpa(inp: dict[str, Any], info_: dict[str, Any], peer: str = peer
                      ) -> Callable[[], Any]:
            q, k, v = padded(inp)
            am = combined(inp, dt)
            return _sdpa_peer(ctx, peer, q, k, v, am, False, info_)

        impls.append(Impl(f"sdpa-{peer} padded", "peer", make_sdpa, flops=flops,
                          bytes=nbytes, to_ours=to_ours))
    if "flex" in ctx.peers:
        def flex_args(inp: dict[str, Any]) -> dict[str, Any]:
            q, k, v = padded(inp)
            m = inp["mask"].view(B, Sk, Hk)
            bb = inp["bias"].view(B, Sk, Hk)

            def dec_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                return torch.where(m[b, kv, h // g], score + bb[b, kv, h // g],
                                   -float("inf"))

            return {"q": q, "k": k, "v": v, "score_mod": dec_sm, "enable_gqa": Hk != H}

        impls.append(_flex_impl(ctx, "flex padded (score_mod)", flops, flex_args,
                                to_ours=to_ours))
        impls[-1].bytes = nbytes

    nseq = min(B, 8)

    def reference(inp: dict[str, Any]) -> list[Any]:
        q, k, v = padded(inp)
        am = combined(inp, torch.float32)[:nseq]
        out = _ref_dense(ctx, _t(q[:nseq]), _t(k[:nseq]), _t(v[:nseq]),
                         lambda r0, r1: am, nseq)
        return [out.reshape(nseq * Sq, H, D)]

    def select(out: Any) -> list[Any]:
        return [out[: nseq * Sq]]

    return Setup(CASES["decode"], shape, "gbps", make_inputs, impls, reference, select,
                 f"fp32 SDPA-math on the first {nseq} sequences", info)


def _setup_prefill(ctx: Ctx, shape: dict[str, Any]) -> Setup:
    torch = ctx.torch
    dev = ctx.device
    n, H, Hk = shape["batch"], shape["heads"], shape["kv_heads"]
    D, smax = shape["headdim"], shape["seqlen"]
    if H % Hk:
        raise ValueError(f"heads {H} is not a multiple of kv_heads {Hk}")
    dt = _dtype(torch, shape["dtype"])
    seed = ctx.args.seed
    lens = varlen_lengths(n, max(1, smax // 8), smax, seed)
    shape = dict(shape, lens=lens)
    total = sum(lens)
    maxlen = max(lens)
    cu = [0]
    for L in lens:
        cu.append(cu[-1] + L)
    flops = varlen_fwd_flops(lens, lens, H, D)
    s_eq = max(1, round(math.sqrt(sum(L * L for L in lens) / n)))
    dense_flops = attn_fwd_flops(n, H, s_eq, s_eq, D)
    info = [f"{n} sequences, lengths {lens} (seed {seed}), total {total}; non-causal; "
            f"key-based bias (total_k, H)",
            f"dmattn dense reference row: B={n} S={s_eq} (same FLOPs: sqrt(mean L^2)) with a "
            "(B,H,1,S) key bias; SDPA peers run the padded batch (S=max len, -inf on padding "
            "keys; TFLOP/s counts real work only); flex runs the packed batch with a document "
            "block mask"]

    def make_inputs(i: int) -> dict[str, Any]:
        gen = torch.Generator(device=dev).manual_seed(seed * 1000 + i)

        def rn(*s: int) -> Any:
            return torch.randn(*s, generator=gen, device=dev, dtype=dt)

        return {"q": rn(total, H, D), "k": rn(total, Hk, D), "v": rn(total, Hk, D),
                "bias": rn(total, H),
                "cu": torch.tensor(cu, device=dev, dtype=torch.int32)}

    def make_dm(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
        f = ctx.dm_attr("flash_dmattn_varlen_func")
        a = (inp["q"], inp["k"], inp["v"], inp["cu"], inp["cu"], maxlen, maxlen)
        kw = {"attn_bias": inp["bias"]}
        return lambda: f(*a, **kw)

    def make_dense(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
        f = ctx.dm_attr("flash_dmattn_func")
        gen = torch.Generator(device=dev).manual_seed(seed + 7)
        q = torch.randn(n, s_eq, H, D, generator=gen, device=dev, dtype=dt)
        k = torch.randn(n, s_eq, Hk, D, generator=gen, device=dev, dtype=dt)
        v = torch.randn(n, s_eq, Hk, D, generator=gen, device=dev, dtype=dt)
        b = torch.randn(n, H, 1, s_eq, generator=gen, device=dev, dtype=dt)
        return lambda: f(q, k, v, attn_bias=b)

    impls = [Impl("dmattn varlen", "dmattn", make_dm, flops=flops),
             Impl(f"dmattn dense B={n} S={s_eq} kbias", "variant", make_dense,
                  flops=dense_flops, check=False)]

    def padded(inp: dict[str, Any], dtype: Any) -> tuple[Any, Any, Any, Any]:
        q = torch.zeros(n, maxlen, H, D, device=dev, dtype=dt)
        k = torch.zeros(n, maxlen, Hk, D, device=dev, dtype=dt)
        v = torch.zeros(n, maxlen, Hk, D, device=dev, dtype=dt)
        am = torch.full((n, H, 1, maxlen), float("-inf"), device=dev, dtype=dtype)
        for i, L in enumerate(lens):
            s = slice(cu[i], cu[i + 1])
            q[i, :L], k[i, :L], v[i, :L] = inp["q"][s], inp["k"][s], inp["v"][s]
            am[i, :, 0, :L] = inp["bias"][s].t().to(dtype)
        return q, k, v, am

    def to_ours(out: Any) -> Any:   # (n,H,maxlen,D) -> (total,H,D)
        return torch.cat([_t(out)[i, :L] for i, L in enumerate(lens)], dim=0)

    for peer in ("flash", "cudnn", "efficient"):
        if peer not in ctx.peers:
            continue

        def make_sdpa(inp: dict[str, Any], info_: dict[str, Any], peer: str = peer
                      ) -> Callable[[], Any]:
            q, k, v, am = padded(inp, dt)
            return _sdpa_peer(ctx, peer, _t(q), _t(k), _t(v), am, False, info_)

        impls.append(Impl(f"sdpa-{peer} padded", "peer", make_sdpa, flops=flops,
                          visited_flops=attn_fwd_flops(n, H, maxlen, maxlen, D),
                          to_ours=to_ours))
    if "flex" in ctx.peers:
        def flex_args(inp: dict[str, Any]) -> dict[str, Any]:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = torch.repeat_interleave(torch.arange(n, device=dev),
                                          torch.tensor(lens, device=dev))
            kb = inp["bias"]

            def doc_mm(b: Any, h: Any, qi: Any, kv: Any) -> Any:
                return doc[qi] == doc[kv]

            def kb_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                return score + kb[kv, h]

            bm = create_block_mask(doc_mm, None, None, total, total, device=dev)
            return {"q": _t(inp["q"][None]), "k": _t(inp["k"][None]), "v": _t(inp["v"][None]),
                    "score_mod": kb_sm, "block_mask": bm, "enable_gqa": Hk != H}

        impls.append(_flex_impl(ctx, "flex packed (doc mask)", flops, flex_args,
                                to_ours=lambda o: _t(o)[0]))

    def reference(inp: dict[str, Any]) -> list[Any]:
        outs = []
        for i in range(n):
            s = slice(cu[i], cu[i + 1])
            am = inp["bias"][s].t().float()[None, :, None, :]
            outs.append(_ref_dense(ctx, inp["q"][s][None], inp["k"][s][None],
                                   inp["v"][s][None], lambda r0, r1, am=am: am, 1)[0])
        return [torch.cat(outs, dim=0)]

    def select(out: Any) -> list[Any]:
        return [out]

    return Setup(CASES["prefill_varlen"], shape, "tflops", make_inputs, impls, reference,
                 select, "fp32 SDPA-math per sequence", info)


def _setup_backward(ctx: Ctx, name: str, shape: dict[str, Any]) -> Setup:
    torch = ctx.torch
    dev = ctx.device
    B, H, Hk = shape["batch"], shape["heads"], shape["kv_heads"]
    Sq, Sk, D = shape["seqlen"], shape["seqlen_k"], shape["headdim"]
    if H % Hk:
        raise ValueError(f"heads {H} is not a multiple of kv_heads {Hk}")
    g = H // Hk
    gqa = Hk != H
    dt = _dtype(torch, shape["dtype"])
    with_bias = name == "backward_bias"
    sparse = name == "backward_sparse"
    seed = ctx.args.seed
    flops = fwd_bwd_flops(attn_fwd_flops(B, H, Sq, Sk, D))
    visited = None
    info = ["timed: forward + torch.autograd.grad(out, (q, k, v" +
            (", bias" if with_bias else "") + "), dout)"]
    table_t = None
    if sparse:
        nrb, ncb = math.ceil(Sq / SPARSE_BLOCK), math.ceil(Sk / SPARSE_BLOCK)
        table = random_block_table(nrb, ncb, SPARSE_DENSITY, seed)
        allowed = block_table_allowed(table, Sq, Sk, SPARSE_BLOCK, SPARSE_BLOCK)
        kept = sum(map(sum, table))
        flops = fwd_bwd_flops(elements_flops(allowed, B, H, D))
        visited = fwd_bwd_flops(visited_tile_flops(kept, SPARSE_BLOCK, SPARSE_BLOCK, B, H, D))
        table_t = torch.tensor(table, dtype=torch.bool, device=dev)
        info.append(f"random blocks: {kept} of {nrb * ncb} {SPARSE_BLOCK}x{SPARSE_BLOCK} blocks "
                    f"kept ({kept / (nrb * ncb):.1%}); TFLOP/s counts allowed elements only")

    def make_inputs(i: int) -> dict[str, Any]:
        gen = torch.Generator(device=dev).manual_seed(seed * 1000 + i)

        def rn(*s: int) -> Any:
            return torch.randn(*s, generator=gen, device=dev, dtype=dt)

        inp = {"q": rn(B, Sq, H, D).requires_grad_(), "k": rn(B, Sk, Hk, D).requires_grad_(),
               "v": rn(B, Sk, Hk, D).requires_grad_(), "dout": rn(B, Sq, H, D)}
        if with_bias:
            inp["bias"] = rn(B, H, Sq, Sk).requires_grad_()
        return inp

    def leaves(inp: dict[str, Any]) -> list[Any]:
        return [inp["q"], inp["k"], inp["v"]] + ([inp["bias"]] if with_bias else [])

    def fwd_bwd(fwd: Callable[[], Any], inp: dict[str, Any], ours: bool) -> Callable[[], Any]:
        lv = leaves(inp)
        dout = inp["dout"] if ours else _t(inp["dout"])

        def fn() -> Any:
            out = fwd()
            grads = torch.autograd.grad(out, lv, dout)
            return (out.detach() if ours else _t(out.detach()), *grads)

        return fn

    def make_dm(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
        f = ctx.dm_attr("flash_dmattn_func")
        q, k, v = inp["q"], inp["k"], inp["v"]
        kw: dict[str, Any] = {"attn_bias": inp["bias"]} if with_bias else {}
        if sparse:
            kw["sparse_mask"] = _make_bitset_mask(ctx, table_t, Sq, Sk, info_)
        return fwd_bwd(lambda: f(q, k, v, **kw), inp, True)

    impls = [Impl("dmattn fwd+bwd", "dmattn", make_dm, flops=flops, visited_flops=visited,
                  to_ours=None)]
    if sparse:
        def make_dm_dense(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
            f = ctx.dm_attr("flash_dmattn_func")
            q, k, v = inp["q"], inp["k"], inp["v"]
            mask = _block_dense(torch, table_t, Sq, Sk)[None, None]
            return fwd_bwd(lambda: f(q, k, v, attn_mask=mask), inp, True)

        impls.append(Impl("dmattn fwd+bwd, same pattern as a dense attn_mask", "variant",
                          make_dm_dense, flops=flops))
    for peer in ("flash", "cudnn", "efficient"):
        if peer not in ctx.peers:
            continue

        def make_sdpa(inp: dict[str, Any], info_: dict[str, Any], peer: str = peer
                      ) -> Callable[[], Any]:
            am = inp["bias"] if with_bias else None
            if sparse:
                am = _additive(torch, _block_dense(torch, table_t, Sq, Sk), None, dt)[None, None]
            fwd = _sdpa_peer(ctx, peer, _t(inp["q"]), _t(inp["k"]), _t(inp["v"]), am,
                             False, info_, grad=True)
            return fwd_bwd(fwd, inp, False)

        impls.append(Impl(f"sdpa-{peer} fwd+bwd", "peer", make_sdpa, flops=flops))
    if "flex" in ctx.peers:
        def make_flex(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
            flex = ctx.flex()
            q, k, v = _t(inp["q"]), _t(inp["k"]), _t(inp["v"])
            kw: dict[str, Any] = {"enable_gqa": True} if gqa else {}
            if with_bias:
                bias = inp["bias"]

                def bias_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                    return score + bias[b, h, qi, kv]

                kw["score_mod"] = bias_sm
            if sparse:
                from torch.nn.attention.flex_attention import create_block_mask

                tab = table_t

                def random_mm(b: Any, h: Any, qi: Any, kv: Any) -> Any:
                    return tab[qi // SPARSE_BLOCK, kv // SPARSE_BLOCK]

                kw["block_mask"] = create_block_mask(random_mm, None, None, Sq, Sk, device=dev)
            return fwd_bwd(lambda: flex(q, k, v, **kw), inp, False)

        impls.append(Impl("flex fwd+bwd", "peer", make_flex, flops=flops))

    def reference(inp: dict[str, Any]) -> list[Any]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        F = torch.nn.functional
        lv = [x.detach().float().requires_grad_() for x in leaves(inp)]
        q, k, v = _t(lv[0]), _t(lv[1]), _t(lv[2])
        if gqa:
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
        am = lv[3] if with_bias else None
        if sparse:
            am = _additive(torch, _block_dense(torch, table_t, Sq, Sk))[None, None]
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=am)
        out = _t(out)
        grads = torch.autograd.grad(out, lv, inp["dout"].float())
        return [out.detach(), *grads]

    def select(out: Any) -> list[Any]:
        return list(out)

    return Setup(CASES[name], shape, "tflops", make_inputs, impls, reference, select,
                 "fp32 SDPA-math autograd (out, dq, dk, dv" + (", dbias" if with_bias else "")
                 + ")", info)


def build_setup(ctx: Ctx, name: str, shape: dict[str, Any]) -> Setup:
    if name == "decode":
        return _setup_decode(ctx, shape)
    if name == "prefill_varlen":
        return _setup_prefill(ctx, shape)
    if name.startswith("backward"):
        return _setup_backward(ctx, name, shape)
    return _setup_dense_family(ctx, name, shape)


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------

_DM_NA = (NotImplementedError, TypeError, ValueError, AttributeError, ImportError)


def _reason(e: BaseException, caught: Sequence[warnings.WarningMessage] = ()) -> str:
    """One line: the exception, with SDPA's "kernel not used because" warnings (which hold
    the real reason when the exception only says that no kernel is available)."""
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    import re

    warn = [" ".join(re.sub(r"\(Triggered internally at [^)]*\)", "", str(w.message)).split())
            for w in caught]
    # drop the headers ("... not used because:") and the backends we switched off ourselves
    warn = [w for w in dict.fromkeys(warn) if w and not w.endswith("because:")
            and "runtime disabled" not in w]
    if warn and ("No available kernel" in first or "No viable backend" in first):
        text = f"{type(e).__name__}: " + "; ".join(warn) + f" ({first})"
    else:
        text = f"{type(e).__name__}: {first}"
        if warn:
            text += " [" + "; ".join(warn) + "]"
    return text[:600]


def _status_for(impl: Impl, e: BaseException) -> str:
    if impl.role == "peer":
        return "n/a"
    return "n/a" if isinstance(e, _DM_NA) else "error"


def _max_diff(torch: Any, got: list[Any], ref: list[Any]) -> tuple[float, float]:
    worst, rel = 0.0, 0.0
    for a, b in zip(got, ref, strict=True):
        if a is None or b is None:
            continue
        a = a.detach().float()
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"shape {tuple(a.shape)} != reference {tuple(b.shape)}")
        d = (a - b).abs()
        m = float(torch.nan_to_num(d, nan=float("inf")).max()) if d.numel() else 0.0
        scale = float(b.abs().max()) if b.numel() else 1.0
        worst = max(worst, m)
        rel = max(rel, m / scale if scale > 0 else m)
    return worst, rel


def run_case(ctx: Ctx, name: str) -> CaseResult:
    torch = ctx.torch
    t_case = time.perf_counter()
    shape = case_shape(name, ctx.args)
    res = CaseResult(name=name, title=CASES[name], params=dict(shape),
                     metric="gbps" if name == "decode" else "tflops")
    ctx.new_case()
    try:
        setup = build_setup(ctx, name, shape)
    except Exception as e:  # noqa: BLE001
        res.error = _reason(e)
        res.elapsed_s = time.perf_counter() - t_case
        return res
    res.title, res.params, res.metric, res.info = (setup.title, dict(setup.params),
                                                   setup.metric, list(setup.info))
    sets: list[dict[str, Any]] = []
    ref: list[Any] | None = None
    try:
        sets.append(setup.make_inputs(0))
        set_bytes = sum(int(x.numel() * x.element_size()) for x in sets[0].values()
                        if hasattr(x, "element_size"))
        nsets = rotation_sets(set_bytes, ctx.l2_bytes) if ctx.cuda else 1
        for i in range(1, nsets):
            sets.append(setup.make_inputs(i))
        if nsets > 1:
            res.info.append(f"rotating among {nsets} input sets ({set_bytes / 2**20:.1f} MiB "
                            "each) to defeat L2")
        if not ctx.args.no_smoke and setup.reference is not None:
            try:
                ref = [r.detach() for r in setup.reference(sets[0])]
                res.smoke_ref = setup.ref_note
            except Exception as e:  # noqa: BLE001
                res.smoke_ref = f"reference failed: {_reason(e)}"
                ref = None
            if ctx.cuda:
                torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        res.error = f"inputs: {_reason(e)}"
        res.elapsed_s = time.perf_counter() - t_case
        return res

    for impl in setup.impls:
        r = ImplResult(name=impl.name, role=impl.role, flops=impl.flops,
                       visited_flops=impl.visited_flops, bytes=impl.bytes)
        res.impls.append(r)
        fns: list[Callable[[], Any]] = []
        extra: dict[str, Any] = {}
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fns = [impl.make(s, extra) for s in sets]
                t0 = time.perf_counter()
                out = fns[0]()
                ctx.sync()
                r.first_call_s = time.perf_counter() - t0
            if "visited_flops" in extra:
                r.visited_flops = extra["visited_flops"]
            if ref is not None and impl.check and setup.select is not None:
                try:
                    got = out if impl.to_ours is None else (
                        impl.to_ours(out) if not isinstance(out, tuple)
                        else (impl.to_ours(out[0]), *out[1:]))
                    r.max_abs_diff, r.rel_diff = _max_diff(torch, setup.select(got), ref)
                except Exception as e:  # noqa: BLE001
                    extra["note"] = (extra.get("note", "") + f" smoke failed: {_reason(e)}"
                                     ).strip()
            del out
            tm = ctx.time_calls(fns)
            r.ms, r.ms_min, r.ms_p10, r.ms_p90 = tm["ms"], tm["ms_min"], tm["ms_p10"], tm["ms_p90"]
            r.reps, r.wall_ms = tm["reps"], tm["wall_ms"]
            notes = []
            if extra.get("note"):
                notes.append(str(extra["note"]))
            if r.first_call_s is not None and r.first_call_s > 2.0:
                notes.append(f"first call {r.first_call_s:.1f}s")
            if r.rel_diff is not None and r.rel_diff > 5e-2:
                notes.append(f"CHECK: rel diff {r.rel_diff:.1e}")
            r.note = "; ".join(notes)
        except Exception as e:  # noqa: BLE001 - a refusing peer / missing feature
            r.status = _status_for(impl, e)
            r.note = _reason(e, caught)
            if "illegal memory access" in str(e) or "CUDA error" in str(e):
                r.note += " (the CUDA context may be unusable now)"
        finally:
            fns = []
            extra = {}
            if ctx.cuda:
                torch.cuda.empty_cache()
    sets.clear()
    ref = None
    res.copy_bw_gbps = ctx.copy_bw if res.metric == "gbps" else None
    res.elapsed_s = time.perf_counter() - t_case
    return res


def collect_meta(ctx: Ctx | None, args: argparse.Namespace, argv: Sequence[str]) -> dict:
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python3 tools/bench.py " + " ".join(argv),
        "python": platform.python_version(),
        "host": platform.node(),
        "cases": args.cases,
        "peers": sorted(args.peer_set),
        "timing": {"warmup": args.warmup, "min_repeat": args.repeat,
                   "max_repeat": args.max_repeat, "min_time_s": args.min_time,
                   "quick": args.quick},
        "flop_convention": FLOP_CONVENTION,
    }
    if ctx is None:
        return meta
    torch = ctx.torch
    meta["torch"] = torch.__version__
    meta["torch_cuda"] = getattr(torch.version, "cuda", None)
    try:
        import cupy

        meta["cupy"] = cupy.__version__
    except Exception as e:  # noqa: BLE001
        meta["cupy"] = f"n/a ({type(e).__name__})"
    meta["dmattn_cupy"] = (getattr(ctx.dm, "__version__", "unknown") if ctx.dm is not None
                           else f"n/a ({ctx.dm_error})")
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        meta["device"] = p.name
        meta["capability"] = f"sm_{p.major}{p.minor}"
        meta["sms"] = p.multi_processor_count
        meta["memory_gib"] = round(p.total_memory / 2**30, 1)
        meta["l2_mib"] = round(ctx.l2_bytes / 2**20, 1)
        meta["gpu_sleep_calibrated"] = ctx.cycles_per_ms is not None
    else:
        meta["device"] = f"cpu ({platform.processor() or platform.machine()})"
    meta["copy_bw_gbps"] = ctx.copy_bw
    return meta


def print_header(meta: dict[str, Any]) -> None:
    print(f"dmattn_cupy benchmark  {meta['date']}")
    print(f"device: {meta.get('device')}  {meta.get('capability', '')}  "
          f"SMs={meta.get('sms', '-')}  mem={meta.get('memory_gib', '-')} GiB  "
          f"L2={meta.get('l2_mib', '-')} MiB")
    print(f"torch {meta.get('torch')} (CUDA {meta.get('torch_cuda')})  cupy {meta.get('cupy')}  "
          f"dmattn_cupy {meta.get('dmattn_cupy')}  python {meta['python']}")
    print(f"command: {meta['command']}")
    t = meta["timing"]
    print(f"timing: CUDA events, median after {t['warmup']} warm-up calls, >= {t['min_repeat']} "
          f"reps (or >= {t['min_time_s']} s, <= {t['max_repeat']}); GPU time with the CPU "
          "queued ahead; 'wall ms' = back-to-back calls timed on the host")
    bw = meta.get("copy_bw_gbps")
    print(f"copy bandwidth (device-to-device, read+write): "
          f"{bw:.0f} GB/s" if bw else "copy bandwidth: n/a")
    print(FLOP_CONVENTION)
    print(RATIO_CONVENTION)
    print("smoke check: max|diff| column = max abs difference to an fp32 SDPA-math reference "
          "(first batch elements); 'CHECK' marks rel diff > 5e-2 (not fatal)")
    print()


def main(argv: Sequence[str] | None = None, dm: Any = None) -> int:
    """Entry point; ``dm`` substitutes the dmattn_cupy module (tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list:
        print(list_text())
        return 0
    try:
        import torch  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(f"bench.py needs torch: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    ctx = Ctx(args, dm)
    if ctx.cuda and not ctx.torch.cuda.is_available():
        print("bench.py: no CUDA device (use --device cpu for a harness dry run)",
              file=sys.stderr)
        return 2
    t_all = time.perf_counter()
    ctx.copy_bw = ctx.copy_bandwidth()
    meta = collect_meta(ctx, args, argv)
    print_header(meta)
    if ctx.dm is None:
        print(f"NOTE: {ctx.dm_error}; dmattn rows will be n/a\n")
    results: list[CaseResult] = []
    for name in args.cases:
        res = run_case(ctx, name)
        results.append(res)
        print(format_case(res))
        print(f"   ({res.elapsed_s:.1f} s)\n", flush=True)
    print("== summary")
    for res in results:
        print(summary_line(res))
    meta["total_s"] = round(time.perf_counter() - t_all, 1)
    print(f"total {meta['total_s']} s")
    if args.json:
        write_json(args.json, meta, results)
        print(f"wrote {args.json}")
    if args.plot:
        try:
            plot_results(args.plot, results, f"{meta.get('device')}  {meta['date']}")
            print(f"wrote {args.plot}")
        except Exception as e:  # noqa: BLE001
            print(f"plot: n/a: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
