"""``python -m dmattn_cupy.precompile``: compile every kernel specialization with NVRTC.

Needs no GPU. Prints one line per kernel (registers, spills, stack, static smem); with
``--check-spills`` exits 1 if any kernel spills or uses a stack frame.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from .compile import CompiledKernel, compile_spec
from .spec import DTYPES, HEAD_DIMS, KernelSpec

DEFAULT_ARCHS = ("sm_80", "sm_90")
# Opt-in shared memory per block: sm_80 / sm_87 (163 KB; sm_90: 227 KB), sm_86 / sm_89 (99 KB).
SMEM_PER_BLOCK = (163 * 1024, 99 * 1024)


def all_specs(debug: bool = False) -> list[KernelSpec]:
    """Every forward specialization the launcher can select."""
    from .launch import select_fwd_spec, sparse_supported  # the launcher's choice
    from .validate import Problem

    specs = []
    for dtype, hd, mask, bias, varlen in itertools.product(
            DTYPES, HEAD_DIMS, (False, True), (False, True), (False, True)):
        pb = _stub_problem(Problem, dtype, hd, mask, bias, varlen)
        for limit in SMEM_PER_BLOCK:  # each device class's choice (block-sparse: dense only)
            for sparse in (False, True) if not varlen and sparse_supported(hd, mask, bias) else (
                    False,):
                spec = select_fwd_spec(pb, debug_counters=debug, sparse=sparse, smem_limit=limit)
                if spec not in specs:
                    specs.append(spec)
    if not debug:  # decode/combine and backward kernels have no debug builds
        from .backward import all_bwd_specs
        from .decode import all_decode_specs

        specs += all_decode_specs() + all_bwd_specs()
    return specs


def _stub_problem(problem_cls: type, dtype: str, hd: int, mask: bool, bias: bool, varlen: bool):
    from .arrays import ArrayInfo

    dt = "float16" if dtype == "fp16" else "bfloat16"
    info = ArrayInfo("cupy", dt, (1, 1, 1, hd), (hd, hd, hd, 1), 0, 0)
    mb = ArrayInfo("cupy", "bool", (1, 1, 1, 1), (1, 1, 1, 1), 0, 0)
    return problem_cls(kind="cupy", backend="cuda", varlen=varlen, batch=1, seqlen_q=1,
                       seqlen_k=1, heads=1, kv_heads=1, head_dim=hd, dtype=dt, scale=1.0,
                       softcap=0.0, window=(-1, -1), q=info, k=info, v=info,
                       mask=mb if mask else None, bias=info if bias else None)


def _compile(args: tuple[KernelSpec, str, bool]) -> CompiledKernel:
    spec, arch, fill_cache = args
    return compile_spec(spec, arch, use_disk_cache=fill_cache)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmattn_cupy.precompile", description=__doc__)
    ap.add_argument("--arch", action="append", help="e.g. sm_80, sm_90 (repeatable)")
    ap.add_argument("--check-spills", action="store_true",
                    help="exit 1 if any kernel spills registers or uses a stack frame")
    ap.add_argument("--debug", action="store_true", help="also compile the debug-counter builds")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compiler processes")
    ap.add_argument("--fill-cache", action="store_true",
                    help="store the cubins in the kernel cache (DMATTN_CACHE_DIR) for later runs")
    a = ap.parse_args(argv)
    from .device_check import cupy_problem

    problem = cupy_problem()
    if problem is not None:
        print(f"precompile needs CuPy's NVRTC (no GPU needed): {problem}", file=sys.stderr)
        return 2
    archs = a.arch or list(DEFAULT_ARCHS)
    specs = all_specs() + (all_specs(debug=True) if a.debug else [])
    work = [(s, arch, a.fill_cache) for arch in archs for s in specs]
    t0 = time.perf_counter()
    bad = 0
    with ProcessPoolExecutor(max_workers=max(1, a.jobs)) as ex:
        for ck in ex.map(_compile, work):
            flag = "SPILL" if ck.spills else "ok"
            bad += ck.spills
            print(f"{ck.spec.id:<48} {ck.arch}  regs={ck.registers:<4} "
                  f"spill_st={ck.spill_stores:<4} spill_ld={ck.spill_loads:<4} "
                  f"stack={ck.stack_frame:<4} smem={ck.static_smem:<6} {flag}", flush=True)
    print(f"compiled {len(work)} kernels for {','.join(archs)} in "
          f"{time.perf_counter() - t0:.1f} s; {bad} with spills/stack")
    return 1 if (a.check_spills and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
