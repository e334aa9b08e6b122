"""``python -m dmattn_cupy info``: versions, GPU, and the kernel cache."""

from __future__ import annotations

import argparse
import platform
import sys

from . import __version__
from .compile import cache_dir, cached_kernel_count, cuda_src_dir, nvrtc_version
from .device_check import MIN_CAPABILITY, SUPPORTED, cupy_problem, driver_problem


def info() -> list[str]:
    lines = [f"dmattn_cupy {__version__} (python {platform.python_version()})",
             f"cuda_src    {cuda_src_dir()}"]
    problem = cupy_problem()
    if problem is not None:  # report, never crash: info is what users run when things break
        lines.append(f"cupy/nvrtc  unavailable: {problem}")
    else:
        import cupy

        lines.append(f"cupy        {cupy.__version__}")
        lines.append("nvrtc       {}.{}".format(*nvrtc_version()))
        drv = driver_problem()
        if drv is not None:
            lines.append(f"driver      {drv}: the CUDA backend cannot run here; "
                         "backend='reference' (CPU, float64) works")
        else:
            lines += _gpu_lines(cupy)
    try:
        import torch

        lines.append(f"torch       {torch.__version__} (cuda available: "
                     f"{torch.cuda.is_available()})")
    except Exception:
        lines.append("torch       not installed")
    lines.append(f"cache       {cache_dir()} ({cached_kernel_count()} kernels cached)")
    return lines


def _gpu_lines(cupy) -> list[str]:
    v = cupy.cuda.runtime.driverGetVersion()
    lines = [f"driver      CUDA {v // 1000}.{v % 1000 // 10}"]
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return lines + [f"gpu         none ({type(e).__name__}: {e})"]
    if n == 0:
        lines.append("gpu         none")
    for d in range(n):
        props = cupy.cuda.runtime.getDeviceProperties(d)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        ok = (props["major"], props["minor"]) >= MIN_CAPABILITY
        note = "" if ok else f"  UNSUPPORTED (needs {SUPPORTED}; backend='reference' works)"
        if ok:   # what the attn_mask route's rule reads (mask_pack.ROUTE_OWN_MASK_DRAM)
            from .runtime import device_props

            try:
                note = f", DRAM {device_props(d).dram_bytes_per_s / 1e12:.2f} TB/s"
            except Exception as e:  # noqa: BLE001  (report, never crash)
                note = f", DRAM bandwidth unknown ({type(e).__name__}: {e})"
        lines.append(f"gpu {d}       {name} (sm_{props['major']}{props['minor']}){note}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmattn_cupy")
    ap.add_argument("command", choices=["info"], help="info: versions, GPU and kernel cache")
    ap.parse_args(argv)
    print("\n".join(info()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
