"""Marks every test here `gpu` and skips it, with the reason, when no usable GPU is present."""

from __future__ import annotations

import pytest


def _gpu_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CuPy missing or its CUDA runtime unusable
        return f"CuPy cannot reach the GPU ({type(e).__name__})"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _gpu_reason()
    for item in items:
        if "tests/gpu" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=f"GPU test: {reason}"))
