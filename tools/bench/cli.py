"""Command line: parse and resolve the arguments, print the header, run the cases, print the
tables, the summary and the targets, write JSON / the plot."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from .cases import CASES, PEERS, SUITES, case_shape
from .flops import FLOP_CONVENTION, RATIO_CONVENTION
from .report import CaseResult, format_case, plot_results, summary_line, write_json
from .targets import target_status


def build_parser() -> argparse.ArgumentParser:
    case_help = "; ".join(f"{k}: {v}" for k, v in CASES.items())
    p = argparse.ArgumentParser(
        prog="python3 tools/bench",
        description="Benchmark dmattn_cupy against torch SDPA (flash/cuDNN/efficient), "
                    "compiled FlexAttention (Triton and FLASH backends) and FlashAttention-4 "
                    "(flash_attn.cute, where importable), in one process, timed with CUDA "
                    "events; --suite host measures host time per call.",
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


def collect_meta(ctx: Any, args: argparse.Namespace, argv: Sequence[str]) -> dict:
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python3 tools/bench " + " ".join(argv),
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
    meta["fa4"] = ctx.fa4_version if ctx.fa4_version else (ctx.fa4_error or None)
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
        print(f"bench needs torch: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    from .ctx import Ctx
    from .runner import run_case

    if args.device == "cuda" and not __import__("torch").cuda.is_available():
        print("bench: no CUDA device (use --device cpu for a harness dry run)",
              file=sys.stderr)
        return 2
    ctx = Ctx(args, dm)
    t_all = time.perf_counter()
    ctx.copy_bw = ctx.copy_bandwidth()
    meta = collect_meta(ctx, args, argv)
    print_header(meta)
    for line in ctx.peer_lines():
        print(line)
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
    print_targets(results)
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




def print_targets(results: Sequence[CaseResult]) -> None:
    """The target lines of the cases that have one, and how many are met."""
    lines, met, judged = [], 0, 0
    for res in results:
        best = res.best_peer()
        dm = res.dmattn()
        st = target_status(res.name, res.ratio(best) if best else None,
                           dm.host_us if dm is not None and res.metric == "us" else None)
        if st is None:
            continue
        lines.append(st[0])
        if st[1] is not None:
            judged += 1
            met += bool(st[1])
    if lines:
        print(f"== targets (tools/bench/targets.py): {met} of {judged} judged met")
        for line in lines:
            print(line)
