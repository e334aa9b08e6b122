"""``python -m dmattn_cupy.precompile``: compile every kernel specialization with NVRTC.

Needs no GPU. ``--arch sm_XY`` builds what a device of compute capability X.Y runs: the
portable (sm_80-class) specs for ``sm_XY`` and every arch-specific family that runs there for
its own target (``--arch sm_90``: the sm_90a families too). Prints one line per kernel
(registers, spills, stack, static smem, ptxas advisories); with ``--check-spills`` exits 1 if
any kernel spills, uses a stack frame, or draws an advisory that means a slow Hopper kernel
(``compile.SLOW_ADVISORIES``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from . import backward_sm90, select
from .arrays import ArrayInfo
from .compile import CompiledKernel, compile_spec
from .decode import all_decode_specs
from .device import PRESETS, DeviceProps, parse_arch
from .device_check import cupy_problem
from .families import FAMILIES, sparse_supported
from .kvcache import all_kvcache_specs
from .mask_pack import all_mask_pack_specs
from .row_bias import all_row_bias_specs
from .row_pad import all_row_pad_specs
from .spec import DTYPES, HEAD_DIMS, KernelSpec
from .validate import Problem

DEFAULT_ARCHS = ("sm_80", "sm_90")


def stub_problem(dtype: str, hd: int, mask: bool, bias: bool, varlen: bool,
                 tiles: bool = False) -> Problem:
    """A problem of the given switches (for enumerating what select picks): a scalar mask and
    a key-row bias, or with ``tiles`` a (.., Sq, Sk) mask and bias (specs differ by them)."""
    dt = "float16" if dtype == "fp16" else "bfloat16"
    info = ArrayInfo("cupy", dt, (1, 1, 1, hd), (hd, hd, hd, 1), 0, 0)
    shape, strides = ((1, 1, 16, 16), (256, 256, 16, 1)) if tiles else ((1,) * 4, (1,) * 4)
    mb = ArrayInfo("cupy", "bool", shape, strides, 0, 0)
    bb = ArrayInfo("cupy", dt, shape, strides, 0, 0) if tiles else info
    return Problem(kind="cupy", backend="cuda", varlen=varlen, batch=1, seqlen_q=1,
                   seqlen_k=1, heads=1, kv_heads=1, head_dim=hd, dtype=dt, scale=1.0,
                   softcap=0.0, window=(-1, -1), q=info, k=info, v=info,
                   mask=mb if mask else None, bias=bb if bias else None)


def _device_classes(arch: str) -> list[DeviceProps]:
    """The device classes a build for ``arch`` serves: the presets of its major version
    (shared-memory limits differ within one: sm_80 163 KB, sm_86 / sm_89 99 KB); for a major
    without presets, every preset's limits at ``arch``'s compute capability."""
    cc, _ = parse_arch(arch)
    same_major = [p for p in PRESETS.values() if p.cc[0] == cc[0]]
    return same_major or [dataclasses.replace(p, cc=cc) for p in PRESETS.values()]


def _retarget(spec: KernelSpec, arch: str) -> KernelSpec:
    """Portable specs build for ``arch``; arch-specific ones keep their own target."""
    return spec if spec.row.arch_specific else dataclasses.replace(spec, arch=arch)


def all_specs(arch: str = "sm_80", debug: bool = False) -> list[KernelSpec]:
    """Every specialization a device of ``arch`` (e.g. ``sm_90``) can be given: per device
    class and problem class, each forward family that runs there, has the switches and lists
    a tile for it (the portable family too: it serves what a native one declines at run
    time), the backward and the decode kernels."""
    specs: dict[KernelSpec, None] = {}  # ordered, without repeats

    def add(spec: KernelSpec | None) -> None:
        if spec is not None:
            specs.setdefault(_retarget(spec, arch), None)

    forward_rows = [f for f in FAMILIES.values() if f.role == "forward"]
    for dtype, hd, mask, bias, varlen, tiles in itertools.product(
            DTYPES, HEAD_DIMS, (False, True), (False, True), (False, True), (False, True)):
        if tiles and not (bias or mask):
            continue
        pb = stub_problem(dtype, hd, mask, bias, varlen, tiles)
        sparse_opts = (False, True) if not varlen and sparse_supported(hd, mask, bias) else (
            False,)
        for dev, sparse in itertools.product(_device_classes(arch), sparse_opts):
            for fam in forward_rows:  # accepts() is about run-time layouts: not asked here
                if (fam.runs_on(dev.cc) and select.supports(fam, pb, sparse, debug)
                        and fam.tiles(pb, sparse)):
                    add(select.forward_spec(fam, pb, dev, sparse, debug))
            if not debug:  # backward kernels have no debug builds
                for det in (False, True):
                    for s in select.backward(dtype, hd, mask, bias, varlen, det, sparse, dev):
                        add(s)
    if not debug:  # nor have decode/combine
        for s in (all_decode_specs(arch) + all_kvcache_specs(arch) + all_row_pad_specs(arch)
                  + all_mask_pack_specs(arch) + all_row_bias_specs(arch)):
            add(s)
    # The Hopper backward: dtype x head dim x mask (none, a mask, a MixedMask's listed bits)
    # x bias (none, a tile, a key row; its other switches, the deterministic mode included, are
    # runtime fields).
    if not debug and any(FAMILIES["bwd_sm90"].runs_on(d.cc) for d in _device_classes(arch)):
        for dtype, hd, (mask, listed), (bias, key_row) in itertools.product(
                DTYPES, backward_sm90.HEAD_DIMS, ((False, False), (True, False), (False, True)),
                ((False, False), (True, False), (True, True))):
            add(select.backward_sm90_spec(dtype, hd, mask, bias, key_row, listed))
        add(select.backward_order_spec(arch))
    order = FAMILIES.get("fwd_order")  # the block lists' item order of the Hopper forward
    if not debug and order and any(order.runs_on(d.cc) for d in _device_classes(arch)):
        add(select.forward_order_spec())
    return list(specs)


def _compile(args: tuple[KernelSpec, bool]) -> CompiledKernel:
    spec, fill_cache = args
    return compile_spec(spec, use_disk_cache=fill_cache)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmattn_cupy.precompile", description=__doc__)
    ap.add_argument("--arch", action="append", help="e.g. sm_80, sm_90 (repeatable)")
    ap.add_argument("--check-spills", action="store_true",
                    help="exit 1 if any kernel spills registers, uses a stack frame, or draws a "
                         "ptxas advisory that means a slow kernel")
    ap.add_argument("--debug", action="store_true", help="also compile the debug-counter builds")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compiler processes")
    ap.add_argument("--fill-cache", action="store_true",
                    help="store the cubins in the kernel cache (DMATTN_CACHE_DIR) for later runs")
    ap.add_argument("--only", default="", metavar="SUBSTR",
                    help="only the specs whose id contains SUBSTR (e.g. fwd_sm90_bf16_d128)")
    a = ap.parse_args(argv)
    problem = cupy_problem()
    if problem is not None:
        print(f"precompile needs CuPy's NVRTC (no GPU needed): {problem}", file=sys.stderr)
        return 2
    archs = a.arch or list(DEFAULT_ARCHS)
    specs = dict.fromkeys(s for arch in archs
                          for s in all_specs(arch) + (all_specs(arch, debug=True) if a.debug
                                                      else []))
    work = [(s, a.fill_cache) for s in specs if a.only in s.id]
    t0 = time.perf_counter()
    bad = 0
    with ProcessPoolExecutor(max_workers=max(1, a.jobs)) as ex:
        for ck in ex.map(_compile, work):
            flag = "SPILL" if ck.spills else ("SLOW " + ",".join(ck.advisories) if ck.slow
                                              else "ok")
            bad += ck.spills or ck.slow
            print(f"{ck.spec.id:<48} {ck.arch}  regs={ck.registers:<4} "
                  f"spill_st={ck.spill_stores:<4} spill_ld={ck.spill_loads:<4} "
                  f"stack={ck.stack_frame:<4} smem={ck.static_smem:<6} {flag}", flush=True)
    print(f"compiled {len(work)} kernels for {','.join(archs)} in "
          f"{time.perf_counter() - t0:.1f} s; {bad} with spills/stack/slow advisories")
    return 1 if (a.check_spills and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
