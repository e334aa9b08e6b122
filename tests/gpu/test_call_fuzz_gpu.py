"""Malformed calls (tools/call_fuzz.bad_case) on CUDA tensors, kernels running: only a result,
ValueError, TypeError or NotImplementedError may come out, the two backends agree on what they
accept, and nothing launched fails on the device (DMATTN_CHECK=1: device-side values are read
and checked, so no bad cu_seqlens or cache length reaches a kernel). Exploratory runs take
other calls: seeds from DMATTN_MALFORMED_CALLS_SEED (default 0)."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

import call_fuzz  # noqa: E402  (tools/, on the path by tests/conftest.py)

CHUNK = 250
FIRST_SEED = int(os.environ.get("DMATTN_MALFORMED_CALLS_SEED", "0"))


@pytest.mark.parametrize("chunk", range(4))
def test_malformed_cuda_calls_raise_named_errors_only(chunk, monkeypatch):
    monkeypatch.setenv("DMATTN_CHECK", "1")
    found = []
    for seed in range(FIRST_SEED + chunk * CHUNK, FIRST_SEED + (chunk + 1) * CHUNK):
        case = call_fuzz.bad_case(seed, "cuda")
        got = call_fuzz.outcome(case)
        msg = got[1] if got[0] == "BAD" else call_fuzz.disagreement(case, got)
        try:
            torch.cuda.synchronize()   # a launch of this case that failed on the device
        except RuntimeError as e:      # (the context is lost: later cases would fail too)
            found.append(f"case {seed} ({case.api}; {'; '.join(case.steps)}): device: {e}")
            break
        if msg is not None:
            found.append(f"case {seed} ({case.api}; {'; '.join(case.steps)}):\n{msg}")
    assert not found, "\n".join(found[:5])
