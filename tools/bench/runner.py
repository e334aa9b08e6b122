"""Running one case: build its setup, inputs (rotated to defeat L2), the fp32 smoke
reference, then every row: first call, smoke diff, timing; a refusing peer or a missing
dmattn feature becomes an n/a row, never a crash."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

from .case_backward import setup_backward
from .case_decode import setup_decode, setup_decode_paged
from .case_forward import KINDS, setup_forward
from .case_prefill import setup_prefill
from .case_sparse import SPARSE_KINDS, setup_sparse
from .cases import CASES, HOST_CASES, case_shape
from .common import Impl, Setup, reason
from .ctx import Ctx
from .host import run_host_case
from .report import CaseResult, ImplResult
from .timing import rotation_sets


def build_setup(ctx: Ctx, name: str, shape: dict[str, Any]) -> Setup:
    if name in ("decode", "decode_b1", "decode_b16"):
        return setup_decode(ctx, shape, name)
    if name == "decode_paged":
        return setup_decode_paged(ctx, shape)
    if name == "prefill_varlen":
        return setup_prefill(ctx, shape)
    if name.startswith("backward"):
        return setup_backward(ctx, name, shape)
    if name in SPARSE_KINDS:
        return setup_sparse(ctx, name, shape)
    if name in KINDS:
        return setup_forward(ctx, name, shape)
    raise KeyError(f"no setup for case {name!r}")


_DM_NA = (NotImplementedError, TypeError, ValueError, AttributeError, ImportError)


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
    if name in HOST_CASES:
        return run_host_case(ctx, name)
    torch = ctx.torch
    t_case = time.perf_counter()
    shape = case_shape(name, ctx.args)
    res = CaseResult(name=name, title=CASES[name], params=dict(shape),
                     metric="gbps" if name == "decode" else "tflops")
    ctx.new_case()
    try:
        setup = build_setup(ctx, name, shape)
    except Exception as e:  # noqa: BLE001
        res.error = reason(e)
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
                res.smoke_ref = f"reference failed: {reason(e)}"
                ref = None
            if ctx.cuda:
                torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        res.error = f"inputs: {reason(e)}"
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
                    extra["note"] = (extra.get("note", "") + f" smoke failed: {reason(e)}"
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
            r.note = reason(e, caught)
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


