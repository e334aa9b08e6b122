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


_EAGER_PROBE = r"""
import json, sys
import torch
import dmattn_cupy as dm
q, k, v = (torch.randn(1, 40, 2, 32, requires_grad=True) for _ in range(3))
bias = torch.randn(1, 2, 40, 40, requires_grad=True)
out = dm.flash_dmattn_func(q, k, v, attn_bias=bias, scale=0.3)   # the validated route
dq, dbias = torch.autograd.grad(out.sum(), (q, bias))
print(json.dumps({"dynamo": "torch._dynamo" in sys.modules,
                  "finite": bool(dq.isfinite().all() and dbias.isfinite().all())}))
"""


def test_an_eager_gradient_call_imports_no_dynamo() -> None:
    """A gradient call on the validated route (here ``scale=`` on CPU tensors) runs the ops'
    implementations through an autograd Function: a custom op's first call would import
    torch._dynamo (its kernel is wrapped in ``_disable_dynamo``), ~1.3 s of a first call."""
    out = subprocess.run([sys.executable, "-c", _EAGER_PROBE], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"dynamo": False, "finite": True}
