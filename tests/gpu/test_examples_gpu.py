"""The examples on the GPU: ``examples/train_step.py`` trains its learned key-side bias
through dmattn_cupy's backward, on the Hopper backward (bwd_sm90) on compute capability 9.0
(issue 14: the example runs on it); the decoding examples run the append and decode kernels."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from dmattn_cupy import fastpath, runtime

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_train_step_example_trains_on_the_gpu(monkeypatch, capsys):
    families: list[str] = []
    get_kernel = runtime.get_kernel
    monkeypatch.setattr(runtime, "get_kernel",
                        lambda spec, dev: families.append(spec.family) or get_kernel(spec, dev))
    runpy.run_path(str(EXAMPLES / "train_step.py"))["main"]()   # asserts that the loss falls
    out = capsys.readouterr().out
    assert "ok: loss" in out and "on cuda" in out
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert ("bwd_sm90" in families) == hopper, families


@pytest.mark.parametrize("name,families_run", [
    ("kvcache_decode.py", {"kv_append", "fwd_decode"}),
    ("varlen_decode_kbased.py", {"fwd_decode"}),
])
def test_decode_examples_run_their_kernels(name, families_run, monkeypatch, capsys):
    """The decoding examples on the CUDA backend: their own checks against float64 NumPy / the
    reference backend pass, and the kernels they are about ran (cached plans dropped first: a
    hit would not ask for its kernels again)."""
    fastpath.clear()
    families: list[str] = []
    get_kernel = runtime.get_kernel
    monkeypatch.setattr(runtime, "get_kernel",
                        lambda spec, dev: families.append(spec.family) or get_kernel(spec, dev))
    runpy.run_path(str(EXAMPLES / name))["main"]()
    out = capsys.readouterr().out
    assert f"{name[:-3]} OK" in out and "CUDA backend" in out
    assert families_run <= set(families), families
