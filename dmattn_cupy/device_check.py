"""What the machine offers the CUDA backend, and clear errors where it falls short.

- ``require_supported_device(device_id)``: the CUDA kernels need compute capability 8.0+
  (mma.sync bf16, cp.async, ldmatrix). Call it before compiling or launching anything for a
  device: an older GPU (T4 = 7.5, V100 = 7.0, ...) gets one ``RuntimeError`` that names the GPU
  and its capability and points to ``backend="reference"``, instead of pages of NVRTC errors.
  The answer is cached per device; the query costs no sync.
- ``cupy_problem()``: None when CuPy and NVRTC load, else one sentence saying what to install
  (used by ``python -m dmattn_cupy info`` and ``precompile``).
- ``driver_problem()``: None when a CUDA driver answers, else what was found.
"""

from __future__ import annotations

from functools import cache

MIN_CAPABILITY = (8, 0)
SUPPORTED = ("compute capability 8.0 or newer: Ampere (A100, A10, A30, RTX 30xx), Ada (L4, L40, "
             "RTX 40xx), Hopper (H100, H200), Blackwell")
INSTALL_HINT = ('install CuPy with NVRTC through this package\'s extra: pip install '
                '"dmattn-cupy[cuda12]" for an NVIDIA driver of CUDA 12.x, or "dmattn-cupy[cuda13]" '
                'for a driver of CUDA 13 (from a checkout: pip install ".[cuda12]"); '
                '`nvidia-smi` shows the driver\'s CUDA version')


def unsupported_message(device_id: int, name: str, major: int, minor: int) -> str:
    return (f"dmattn_cupy: GPU {device_id} ({name}) has compute capability {major}.{minor}; the "
            f"CUDA kernels need {SUPPORTED}. Use backend=\"reference\" (float64 on the CPU: exact "
            f"but slow) or run on a supported GPU.")


def check_capability(device_id: int, name: str, major: int, minor: int) -> tuple[int, int]:
    """Raise ``RuntimeError`` for a compute capability below 8.0; return (major, minor)."""
    if (major, minor) < MIN_CAPABILITY:
        raise RuntimeError(unsupported_message(device_id, name, major, minor))
    return major, minor


def _query(device_id: int) -> tuple[str, int, int]:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return name, int(props["major"]), int(props["minor"])


@cache
def require_supported_device(device_id: int) -> tuple[int, int]:
    """(major, minor) of ``device_id``; ``RuntimeError`` if the kernels cannot run on it."""
    name, major, minor = _query(device_id)
    return check_capability(device_id, name, major, minor)


def cupy_problem() -> str | None:
    """None if CuPy imports and NVRTC answers; else what is missing and what to install."""
    try:
        import cupy  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"CuPy is not installed or does not load ({type(e).__name__}: {e}); {INSTALL_HINT}"
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as e:
        return f"CuPy loads but NVRTC does not ({type(e).__name__}: {e}); {INSTALL_HINT}"
    return None


def driver_problem() -> str | None:
    """None if a CUDA driver answers; else a sentence saying none was found."""
    try:
        import cupy

        drv = cupy.cuda.runtime.driverGetVersion()
    except Exception as e:
        return f"no NVIDIA driver found ({type(e).__name__})"
    if drv <= 0:
        return "no NVIDIA driver found"
    return None
