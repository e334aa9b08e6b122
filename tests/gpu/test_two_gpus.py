"""Arrays on a GPU other than the current one (a machine with two or more GPUs; skipped
otherwise, e.g. `run` kind nvidia-h100-x2): every call runs on the arrays' device and gives the
results the same call gives there as the current device, bit for bit (same kernels, same
GPU model), from the main thread, from a new thread and through torch's autograd thread of
that device. Arrays on two devices in one call are refused, naming the devices."""

from __future__ import annotations

from typing import Any

import pytest
from gpu_helpers import run_in_a_new_thread

from dmattn_cupy import flash_dmattn_func, flash_dmattn_with_kvcache

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs two CUDA GPUs"),
]


def _inputs(device: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(77)
    b, s, h, hk, d, cache = 2, 300, 4, 2, 128, 2048

    def rnd(*shape: int) -> Any:
        return torch.randn(*shape, generator=g).to(device, torch.bfloat16)

    return dict(q=rnd(b, s, h, d), k=rnd(b, s, hk, d), v=rnd(b, s, hk, d),
                mask=(torch.rand(b, 1, s, s, generator=g) < 0.8).to(device),
                bias=rnd(b, h, s, s), dout=rnd(b, s, h, d), q_dec=rnd(b, 1, h, d),
                k_cache=rnd(b, cache, hk, d), v_cache=rnd(b, cache, hk, d),
                cache_seqlens=torch.tensor([cache, 1000], dtype=torch.int32, device=device))


def _step(x: dict[str, Any]) -> list[Any]:
    """A deterministic training step with a mask and a bias, then a decode step; results
    copied to the host."""
    q, k, v, bias = (x[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "bias"))
    out, lse = flash_dmattn_func(q, k, v, attn_mask=x["mask"], attn_bias=bias,
                                 return_lse=True, deterministic=True)
    assert out.device == x["q"].device and lse.device == x["q"].device
    grads = torch.autograd.grad(out, (q, k, v, bias), x["dout"])
    dec = flash_dmattn_with_kvcache(x["q_dec"], x["k_cache"], x["v_cache"],
                                    cache_seqlens=x["cache_seqlens"])
    results = [out.detach(), lse.detach(), *grads, dec]
    torch.cuda.synchronize(x["q"].device)
    return [r.cpu() for r in results]


def test_calls_on_a_device_that_is_not_the_current_one() -> None:
    names = ("out", "lse", "dq", "dk", "dv", "dbias", "decode out")
    with torch.cuda.device(1):   # device 1 as the current device: the baseline
        want = _step(_inputs("cuda:1"))
    with torch.cuda.device(0):
        x1 = _inputs("cuda:1")
        got = {"main thread": _step(x1)}
        x0 = _inputs("cuda:0")    # the same values on device 0: the same kernels' results
        got["device 0's arrays"] = _step(x0)
    # a new thread's current device is 0, with no context bound until its first call
    got["new thread"] = run_in_a_new_thread(lambda: (torch.cuda.current_device(), _step(x1)))
    assert got["new thread"][0] == 0
    got["new thread"] = got["new thread"][1]
    for where, res in got.items():
        for name, a, b in zip(names, want, res, strict=True):
            assert torch.equal(a, b), f"{where}, current device 0: {name} differs"


def test_arrays_on_two_devices_are_refused() -> None:
    x0, x1 = _inputs("cuda:0"), _inputs("cuda:1")
    with pytest.raises(ValueError, match="one device"):
        flash_dmattn_func(x0["q"], x1["k"], x0["v"])
    with pytest.raises(ValueError, match="one device"):
        flash_dmattn_func(x0["q"], x0["k"], x0["v"], attn_bias=x1["bias"])
    with pytest.raises(ValueError, match="one device"):
        flash_dmattn_with_kvcache(x0["q_dec"], x1["k_cache"], x1["v_cache"],
                                  cache_seqlens=x1["cache_seqlens"])
