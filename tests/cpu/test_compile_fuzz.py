"""torch.compile against eager over random calls (tools/call_fuzz.good_case, dense and varlen):
on the reference backend the compiled function's outputs and gradients equal eager's; on the
stubbed CUDA backend it launches what the eager call launched (test_thin_path_fuzz's
comparison by role), forward alone and with the backward through autograd."""

from __future__ import annotations

import warnings

import pytest
from test_thin_path_fuzz import _as_on_a_gpu, _comparable, _pointers, _run, cap  # noqa: F401

torch = pytest.importorskip("torch")

import call_fuzz  # noqa: E402  (tools/, on the path by tests/conftest.py)

import dmattn_cupy as dm  # noqa: E402
from dmattn_cupy import fastpath  # noqa: E402

SEEDS = range(3_000_000, 3_000_012)
LEAVES = ("query", "key", "value", "attn_bias")


def _case(seed: int):
    case = call_fuzz.good_case(seed, "cpu", call_fuzz.CPU_SIZES, apis=("dense", "varlen"))
    fn = dm.flash_dmattn_varlen_func if case.api == "varlen" else dm.flash_dmattn_func
    return case, fn


def _outputs_and_grads(fn, kw: dict) -> tuple[tuple, tuple]:
    names = [n for n in LEAVES if kw.get(n) is not None]
    leaves = {n: kw[n].detach().clone().requires_grad_(True) for n in names}
    res = fn(**{**kw, **leaves})
    res = res if isinstance(res, tuple) else (res,)
    grads = torch.autograd.grad(res[0].float().sum(), [leaves[n] for n in names])
    return res, grads


@pytest.mark.parametrize("seed", SEEDS)
def test_compiled_equals_eager_on_the_reference_backend(seed):
    case, fn = _case(seed)
    kw = dict(case.kwargs, backend="reference")
    want = _outputs_and_grads(fn, kw)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _outputs_and_grads(torch.compile(lambda **k: fn(**k), fullgraph=True,
                                               backend="aot_eager"), kw)
    for a, b in zip((*want[0], *want[1]), (*got[0], *got[1]), strict=True):
        torch.testing.assert_close(b, a, equal_nan=True)


@pytest.fixture
def stubbed(request):
    capture = request.getfixturevalue("cap")
    with _as_on_a_gpu(capture):
        yield capture


@pytest.mark.parametrize("seed", SEEDS)
def test_compiled_launches_what_eager_launches(stubbed, seed):
    case, fn = _case(seed)
    mode = "grad" if seed % 2 else "fwd"
    if mode == "fwd":
        case.kwargs["return_lse"] = True   # the op always writes lse; eager without it does not
    fastpath.clear()
    _, inputs = _run(case, mode)
    want = _comparable(stubbed.take(), inputs)   # (empty for a call with nothing to do)
    torch._dynamo.reset()
    kw = dict(case.kwargs)
    inputs = [v.data_ptr() for v in kw.values() if isinstance(v, torch.Tensor)]
    names = [n for n in LEAVES if kw.get(n) is not None]
    if mode == "grad":
        kw.update({n: kw[n].detach().requires_grad_(True) for n in names})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = torch.compile(lambda **k: fn(**k), fullgraph=True, backend="aot_eager")(**kw)
        if mode == "grad":
            out = res[0] if isinstance(res, tuple) else res
            torch.autograd.grad(out.float().sum(), [kw[n] for n in names])
    assert _comparable(stubbed.take(), inputs + _pointers(res)) == want
