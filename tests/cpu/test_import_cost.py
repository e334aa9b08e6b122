"""What ``import dmattn_cupy`` loads: nothing of torch.compile's machinery (torch._dynamo and
torch._inductor cost seconds of import; the bench's first-call row measured ~6 s on the H200
machine), no CuPy (imported where first needed), while the custom ops are still registered
and the one function dynamo must treat as a constant is still marked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch._dynamo", "torch._inductor", "cupy", "cupy_backends", "triton", "sympy")

_PROBE = r"""
import json, sys
import torch
before = set(sys.modules)
import dmattn_cupy
ops = [hasattr(torch.ops.dmattn_cupy, n) for n in ("fwd", "bwd")]
print(json.dumps({"mods": sorted(set(sys.modules) - before), "ops": ops}))
"""


def test_import_loads_no_compile_machinery_and_no_cupy() -> None:
    """What ``import dmattn_cupy`` adds to ``import torch`` (whatever torch itself loads on a
    given machine is not ours to judge)."""
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ops"] == [True, True]   # registered at import, as torch.compile needs
    added = [m for m in got["mods"] if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert added == []
    assert any(m.startswith("dmattn_cupy.") for m in got["mods"])


def test_constant_mark_is_what_torch_s_decorator_sets() -> None:
    """autograd marks ``_lists_fit_constant`` by hand; torch's public decorator must set the
    same attribute (and only it), else the hand-made mark means nothing to dynamo."""
    from dmattn_cupy import autograd

    def probe(x: int) -> int:
        return x

    before = dict(vars(probe))
    assert torch.compiler.assume_constant_result(probe) is probe
    added = {k: v for k, v in vars(probe).items() if k not in before}
    assert added == {autograd.DYNAMO_CONSTANT_ATTR: True}
    assert getattr(autograd._lists_fit_constant, autograd.DYNAMO_CONSTANT_ATTR) is True
