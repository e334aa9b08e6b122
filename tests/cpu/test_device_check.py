"""CPU tests of the machine checks: the compute-capability gate, the `info`/`precompile` messages
without CuPy or a driver, and the GPU suite's rule (skip without a GPU, fail when the machine has
one that torch/CuPy cannot use)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from dmattn_cupy import device_check

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("cc", [(7, 5), (7, 0), (6, 1), (5, 2)])
def test_old_gpu_one_clear_error(cc):
    with pytest.raises(RuntimeError) as ei:
        device_check.check_capability(0, "Tesla T4", *cc)
    msg = str(ei.value)
    assert f"compute capability {cc[0]}.{cc[1]}" in msg and "Tesla T4" in msg
    assert "8.0 or newer" in msg and 'backend="reference"' in msg
    assert len(msg) < 600


@pytest.mark.parametrize("cc", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_supported_gpus_pass(cc):
    assert device_check.check_capability(0, "gpu", *cc) == cc


def test_require_supported_device_queries_once(monkeypatch):
    calls = []

    def fake_query(dev):
        calls.append(dev)
        return ("Tesla V100", 7, 0) if dev == 1 else ("NVIDIA H100", 9, 0)

    monkeypatch.setattr(device_check, "_query", fake_query)
    device_check.require_supported_device.cache_clear()
    try:
        assert device_check.require_supported_device(0) == (9, 0)
        assert device_check.require_supported_device(0) == (9, 0)
        with pytest.raises(RuntimeError, match=r"GPU 1 \(Tesla V100\) has compute capability 7.0"):
            device_check.require_supported_device(1)
        assert calls.count(0) == 1
    finally:
        device_check.require_supported_device.cache_clear()


def _block_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)


def test_cupy_problem_says_what_to_install(monkeypatch):
    _block_cupy(monkeypatch)
    msg = device_check.cupy_problem()
    assert msg is not None and "cuda12" in msg and "cuda13" in msg and "nvidia-smi" in msg


def test_info_without_cupy_no_traceback(monkeypatch):
    _block_cupy(monkeypatch)
    from dmattn_cupy.__main__ import info

    text = "\n".join(info())
    assert "cupy/nvrtc  unavailable" in text and "cuda12" in text
    assert "driver      CUDA 0.0" not in text


def test_info_without_driver(monkeypatch):
    pytest.importorskip("cupy")
    monkeypatch.setattr(device_check, "driver_problem", lambda: "no NVIDIA driver found")
    from dmattn_cupy.__main__ import info

    text = "\n".join(info())
    if device_check.cupy_problem() is None:
        assert "no NVIDIA driver found" in text and "backend='reference'" in text
    assert "CUDA 0.0" not in text


def test_precompile_without_cupy_exit_2(monkeypatch, capsys):
    _block_cupy(monkeypatch)
    from dmattn_cupy import precompile

    assert precompile.main(["--arch", "sm_80"]) == 2
    err = capsys.readouterr().err
    assert "no GPU needed" in err and "cuda12" in err


def _gpu_conftest():
    spec = importlib.util.spec_from_file_location("gpu_conftest_under_test",
                                                  ROOT / "tests" / "gpu" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_suite_skip_or_fail_rule(monkeypatch, tmp_path):
    mod = _gpu_conftest()
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "GPU 0: NVIDIA Fake (UUID: GPU-0)"\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert "NVIDIA Fake" in (mod.machine_gpu() or "") or "/dev/nvidia" in (mod.machine_gpu() or "")
    mod._STATE.update(problem="no CUDA GPU visible to torch", gpu=mod.machine_gpu())
    msg = mod._broken()
    assert msg is not None and "cannot use it" in msg and "no CUDA GPU visible" in msg
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert mod.machine_gpu() is None  # hidden on purpose: skip
    mod._STATE.update(problem=None, gpu="x")
    assert mod._broken() is None       # a usable GPU: run
