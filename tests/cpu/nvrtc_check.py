"""Compiling a translation unit of static_asserts with NVRTC for sm_90a (the CPU tests that
tie the kernels' constexpr layout helpers to their NumPy models)."""

import pytest


def compile_static_asserts(source: str, name: str, defines: tuple[str, ...] = ()) -> None:
    """Compile ``source`` (includes resolved under cuda_src/; ``defines``: NAME=VALUE macros,
    as DMATTN_NVRTC_DEFINES passes them); a failed assert fails the test with NVRTC's log.
    Skips without CuPy's NVRTC bindings."""
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc",
                                reason="needs CuPy's NVRTC bindings")
    from dmattn_cupy.compile import cuda_src_dir

    prog = nvrtc.createProgram(source, name, (), ())
    try:
        nvrtc.compileProgram(prog, ["-std=c++20", "-default-device",
                                    "--gpu-architecture=sm_90a", f"-I{cuda_src_dir()}",
                                    *(f"-D{d}" for d in defines)])
    except Exception:
        pytest.fail(nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)
