"""``python -m dmattn_cupy info``: versions, GPU, and the kernel cache."""

from __future__ import annotations

import argparse
import platform
import sys

from . import __version__
from .compile import cache_dir, cached_kernel_count, cuda_src_dir, nvrtc_version


def info() -> list[str]:
    lines = [f"dmattn_cupy {__version__} (python {platform.python_version()})",
             f"cuda_src    {cuda_src_dir()}"]
    try:
        import cupy

        lines.append(f"cupy        {cupy.__version__}")
        lines.append("nvrtc       {}.{}".format(*nvrtc_version()))
    except Exception as e:  # report, never crash: info is what users run when things break
        lines.append(f"cupy/nvrtc  unavailable ({type(e).__name__}: {e})")
    try:
        import cupy

        drv = cupy.cuda.runtime.driverGetVersion()
        lines.append(f"driver      CUDA {drv // 1000}.{drv % 1000 // 10}")
        n = cupy.cuda.runtime.getDeviceCount()
        for d in range(n):
            props = cupy.cuda.runtime.getDeviceProperties(d)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            lines.append(f"gpu {d}       {name} (sm_{props['major']}{props['minor']})")
    except Exception as e:
        lines.append(f"gpu         none ({type(e).__name__})")
    try:
        import torch

        lines.append(f"torch       {torch.__version__} (cuda available: "
                     f"{torch.cuda.is_available()})")
    except Exception:
        lines.append("torch       not installed")
    lines.append(f"cache       {cache_dir()} ({cached_kernel_count()} kernels cached)")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmattn_cupy")
    ap.add_argument("command", choices=["info"], help="info: versions, GPU and kernel cache")
    ap.parse_args(argv)
    print("\n".join(info()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
