"""Results of a run: rows and cases, the text tables, the summary lines, JSON and the PNG
plot (no torch; matplotlib only inside plot_results)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .cases import SHAPE_KEYS
from .flops import FLOP_CONVENTION, RATIO_CONVENTION, gbps, tflops
from .targets import target_line


@dataclass
class ImplResult:
    """One row of a case table."""

    name: str
    role: str = "peer"              # "dmattn" | "variant" (another dmattn call) | "peer" |
    #                                 "peer-variant" (a peer run another way: not the summary's
    #                                 peer, whose way matches dmattn's row) |
    #                                 "floor" (torch doing no attention work: a lower bound)
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

    @property
    def host_us(self) -> float | None:
        """Host time per call in microseconds (host cases: the wall ms of the row)."""
        if self.status != "ok" or self.wall_ms is None or not math.isfinite(self.wall_ms):
            return None
        return self.wall_ms * 1e3

    def metric(self, kind: str) -> float | None:
        """Higher is better: TFLOP/s, GB/s, or for host cases calls per second."""
        if kind == "us":
            us = self.host_us
            return 1e6 / us if us else None
        return self.gbps if kind == "gbps" else self.tflops

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(tflops=self.tflops, visited_tflops=self.visited_tflops, gbps=self.gbps,
                 host_us=self.host_us)
        return d


@dataclass
class CaseResult:
    name: str
    title: str = ""
    metric: str = "tflops"          # "tflops" | "gbps" | "us" (host time per call)
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
        d["target"] = self.target()
        return d

    def target(self) -> str | None:
        """The target line of this case (targets.py), or None."""
        best = self.best_peer()
        dm = self.dmattn()
        return target_line(self.name, self.ratio(best) if best else None,
                           dm.host_us if dm is not None and self.metric == "us" else None)


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
    host = case.metric == "us"
    show_tile = not host and any(r.visited_flops for r in case.impls)
    show_gb = not host and (case.metric == "gbps" or any(r.bytes for r in case.impls))
    show_copy = show_gb and bool(case.copy_bw_gbps)
    cols: list[tuple[str, int]] = [("impl", 34)]
    if host:
        cols += [("host us", 9), ("min us", 9), ("max us", 9)]
    else:
        cols += [("ms", 9), ("wall ms", 9), ("TFLOP/s", 8)]
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
        if r.status == "ok" and host:
            cells += [_fmt(r.host_us, ".1f").rjust(9),
                      _fmt(None if r.ms_min is None else r.ms_min * 1e3, ".1f").rjust(9),
                      _fmt(None if r.ms_p90 is None else r.ms_p90 * 1e3, ".1f").rjust(9)]
        if r.status == "ok":
            if not host:
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
    unit = {"gbps": "GB/s", "us": "us/call"}.get(case.metric, "TFLOP/s")

    def val(r: ImplResult) -> float | None:
        return r.host_us if case.metric == "us" else r.metric(case.metric)

    dm = case.dmattn()
    best = case.best_peer()
    if dm is None or val(dm) is None:
        why = f" ({_short(dm.note, 80)})" if dm is not None and dm.note else ""
        peer = (f"; best peer {best.name} {val(best):.1f} {unit}"
                if best is not None else "")
        return f"summary {case.name}: dmattn n/a{why}{peer}"
    dmv = val(dm)
    if best is None:
        return f"summary {case.name}: dmattn {dmv:.1f} {unit}; no peer ran"
    ratio = case.ratio(best)
    return (f"summary {case.name}: dmattn {dmv:.1f} {unit} vs best peer {best.name} "
            f"{val(best):.1f} {unit} -> dmattn/peer = {_fmt_ratio(ratio or 0.0)}")


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
    tgt = case.target()
    if tgt:
        out.append(tgt)
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
        unit = {"gbps": "GB/s", "us": "host us/call"}.get(case.metric, "TFLOP/s")
        names, vals, colors = [], [], []
        for r in case.impls:
            names.append(r.name)
            v = r.host_us if case.metric == "us" else r.metric(case.metric)
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

