"""Marks every test here `gpu`. Without a GPU on the machine they skip, with the reason. When the
machine has an NVIDIA GPU (``/dev/nvidia0`` or ``nvidia-smi -L``) but torch or CuPy cannot use
it (a driver/toolkit mismatch, a CPU-only torch, CuPy missing), every GPU test FAILS with the
reason: a green run that skipped the GPU suite on a GPU machine would be a false pass.
``CUDA_VISIBLE_DEVICES=""`` (or ``-1``) hides the GPUs on purpose: the tests then skip."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest


def machine_gpu() -> str | None:
    """Evidence of an NVIDIA GPU that does not depend on torch or CuPy, or None."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return None
    devs = sorted(p for p in glob.glob("/dev/nvidia[0-9]*") if p[len("/dev/nvidia"):].isdigit())
    if devs:
        return f"{devs[0]} exists"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            res = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
            gpus = [ln for ln in res.stdout.splitlines() if ln.startswith("GPU ")]
            if gpus:
                return f"nvidia-smi lists {gpus[0].strip()}"
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def usable_gpu_problem() -> str | None:
    """None when torch and CuPy both reach a GPU; else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return (f"no CUDA GPU visible to torch {torch.__version__} (built for CUDA "
                f"{torch.version.cuda or 'none: a CPU-only build'})")
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no GPU"
        int(cupy.arange(4).sum())  # a kernel launch: catches a driver too old for this CuPy
    except Exception as e:  # CuPy missing or its CUDA runtime unusable
        return f"CuPy cannot reach the GPU ({type(e).__name__}: {e})"
    return None


_STATE: dict[str, str | None] = {}


def pytest_configure(config):
    _STATE["problem"] = usable_gpu_problem()
    _STATE["gpu"] = machine_gpu() if _STATE["problem"] is not None else None


def _broken() -> str | None:
    if _STATE.get("problem") is None or _STATE.get("gpu") is None:
        return None
    return (f"this machine has a GPU ({_STATE['gpu']}) but the GPU tests cannot use it: "
            f"{_STATE['problem']}. Install the torch/CuPy builds that match the driver "
            "(`nvidia-smi` shows its CUDA version; use the cuda12 or cuda13 extra to match), or "
            "set CUDA_VISIBLE_DEVICES='' to skip the GPU tests on purpose")


def pytest_collection_modifyitems(config, items):
    problem = _STATE.get("problem")
    for item in items:
        if "tests/gpu" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if problem is not None and _broken() is None:
                item.add_marker(pytest.mark.skip(reason=f"GPU test: {problem}"))


def pytest_runtest_setup(item):
    msg = _broken()
    if msg is not None and "tests/gpu" in str(item.fspath).replace("\\", "/"):
        pytest.fail(msg, pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the item (``rep_call``) for fixtures' teardown checks."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    msg = _broken()
    if msg is not None:
        terminalreporter.write_line(f"GPU TESTS FAILED: {msg}", red=True, bold=True)


@pytest.fixture
def hopper_only():
    """Skips the test off compute capability 9.0, where the sm_90a families do not run
    (`pytestmark = pytest.mark.usefixtures("hopper_only")`)."""
    import torch

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a family runs on compute capability 9.0 only")


@pytest.fixture
def bwd_sm90_only(monkeypatch):
    """Skips the test off compute capability 9.0 and routes every backward to the sm_90a family
    (`pytestmark = pytest.mark.usefixtures("bwd_sm90_only")`)."""
    import torch

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a backward runs on compute capability 9.0 only")
    monkeypatch.setenv("DMATTN_BWD_FAMILY", "bwd_sm90")


@pytest.fixture(params=["auto", "fwd_mma"], ids=["fam-auto", "fam-mma"])
def both_forward_families(request, monkeypatch):
    """Runs a test on each forward family of a Hopper GPU (auto: fwd_sm90 wherever it takes
    the problem; fwd_mma: the portable kernel). Elsewhere the second run would repeat the
    first, so it is skipped."""
    if request.param != "auto":
        import torch

        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("one forward family on this GPU")
    monkeypatch.setenv("DMATTN_FWD_FAMILY", request.param)
    return request.param


@pytest.fixture(params=["1", "0", "warps"], ids=["mask-lists", "mask-bytes", "mask-warps"])
def each_mask_route(request, monkeypatch):
    """Runs a test with the Hopper forward's attn_mask route on for every mask (the mask packed
    into block lists per call), off (the mask's bytes read tile by tile) and beside a tile
    bias packed by the bias spec's own warps; the default, auto, takes lists or bytes by the
    mask's layout."""
    monkeypatch.setenv("DMATTN_MASK_ROUTE", request.param)
    return request.param


@pytest.fixture(autouse=True)
def fresh_plans():
    """Every test starts with no cached launch plans: tests that monkeypatch the planning
    functions (split counts, families) must see them called, as in a new process."""
    from dmattn_cupy import fastpath

    fastpath.clear()
    yield
    fastpath.clear()


@pytest.fixture(params=["bwd_sm90", "bwd_dkdv"], ids=["bwd-sm90", "bwd-dkdv"])
def both_backward_families(request, monkeypatch):
    """Runs a test on each backward family of a Hopper GPU and asserts that the asked one ran
    (``dmattn_cupy.backward.launches``). ``bwd_sm90`` runs with ``DMATTN_BWD_FAMILY=auto``, so it
    also checks that the default picks the Hopper kernel: a test using this fixture gives it
    problems phase 1 takes, or skips its bwd_sm90 run (``pytest.skip``) for those it declines.
    ``bwd_dkdv`` forces the portable kernels. Off compute capability 9.0 only bwd_dkdv runs."""
    import torch

    from dmattn_cupy import backward

    fam = request.param
    if fam == "bwd_sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a backward runs on compute capability 9.0 only")
    monkeypatch.setenv("DMATTN_BWD_FAMILY", "auto" if fam == "bwd_sm90" else "bwd_dkdv")
    before = dict(backward.launches)
    yield fam
    call = getattr(request.node, "rep_call", None)
    if call is None or not call.passed:
        return  # skipped or failed: nothing to add
    ran = {f: backward.launches[f] - before.get(f, 0) for f in ("bwd_sm90", "bwd_dkdv")}
    other = "bwd_dkdv" if fam == "bwd_sm90" else "bwd_sm90"
    assert ran[fam] > 0 and ran[other] == 0, f"asked for {fam}, launches {ran}"
