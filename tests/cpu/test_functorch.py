"""torch.func transforms over the API (grad, vjp) through the eager autograd Function
(autograd._EagerAttention), on the CPU with the float64 reference backend: the gradients equal
torch.autograd's of the same calls exactly; vmap is not supported and says so (TypeError)."""

from __future__ import annotations

import pytest

import dmattn_cupy as dm
from dmattn_cupy import arrays

torch = pytest.importorskip("torch")


def _inputs(seed=0, b=2, sq=7, sk=9, h=4, hk=2, d=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sk, hk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, sk, hk, d, generator=g, dtype=torch.float64)
    bias = torch.randn(b, h, sq, sk, generator=g, dtype=torch.float64)
    return q, k, v, bias


def _autograd(f, *xs):
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    return torch.autograd.grad(f(*leaves), leaves)


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(window_size=(3, 1), softcap=5.0),
                                dict()])
def test_grad_over_every_input_equals_autograd(kw):
    q, k, v, bias = _inputs()
    mask = torch.rand(2, 1, 7, 9, generator=torch.Generator().manual_seed(1)) > 0.3

    def f(q_, k_, v_, b_):
        out = dm.flash_dmattn_func(q_, k_, v_, attn_mask=mask, attn_bias=b_,
                                   backend="reference", **kw)
        return (out * out).sum()

    got = torch.func.grad(f, argnums=(0, 1, 2, 3))(q, k, v, bias)
    for a, b in zip(got, _autograd(f, q, k, v, bias), strict=True):
        assert a.shape == b.shape and torch.equal(a, b)
        assert not torch._C._functorch.is_functorch_wrapped_tensor(a)


def test_vjp_with_lse_output():
    q, k, v, _ = _inputs(seed=2)

    def f(q_, k_):
        return dm.flash_dmattn_func(q_, k_, v, return_lse=True, backend="reference")

    (out, lse), vjp = torch.func.vjp(f, q, k)
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(out.shape, generator=g, dtype=out.dtype)
    dlse = torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    got = vjp((dout, dlse))
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k)]
    o2, l2 = f(*leaves)
    want = torch.autograd.grad((o2, l2), leaves, (dout, dlse))
    assert torch.equal(out, o2.detach()) and torch.equal(lse, l2.detach())
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_grad_through_the_varlen_api_and_a_block_mask():
    q, k, v, _ = _inputs(seed=4, b=1, sq=12, sk=12)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    qp, kp, vp = q[0], k[0], v[0]

    def f_varlen(q_):
        out = dm.flash_dmattn_varlen_func(q_, kp, vp, cu, cu, 7, 7, is_causal=True,
                                          backend="reference")
        return out.square().sum()

    got = torch.func.grad(f_varlen)(qp)
    assert torch.equal(got, _autograd(f_varlen, qp)[0])

    bits = torch.tensor([[[[True, False], [True, True]]]])
    mask = dm.BlockBitsetMask(bits, 12, 12, block_size=(8, 8))

    def f_block(q_, v_):
        return dm.flash_dmattn_func(q_, k, v_, sparse_mask=mask, backend="reference").sum()

    got = torch.func.grad(f_block, argnums=(0, 1))(q, v)
    for a, b in zip(got, _autograd(f_block, q, v), strict=True):
        assert torch.equal(a, b)


def test_the_wrapped_tensor_is_described_by_the_memory_it_wraps():
    q, *_ = _inputs(seed=5)
    seen = {}

    def f(q_):
        inner = arrays._unwrapped(q_)
        seen["wrapped"] = torch._C._functorch.is_functorch_wrapped_tensor(q_)
        seen["inner"] = torch._C._functorch.is_functorch_wrapped_tensor(inner)
        seen["ptr"] = inner.data_ptr()
        return q_.sum()

    torch.func.grad(f)(q)
    assert seen == {"wrapped": True, "inner": False, "ptr": q.data_ptr()}


def test_vmap_is_not_supported():
    q, k, v, _ = _inputs(seed=6)
    stacked = torch.stack([q, q + 1])   # vmap over a leading dim: each sample is 4-D
    with pytest.raises(TypeError, match="vmap over dmattn_cupy's attention is not supported"):
        torch.func.vmap(lambda q_: dm.flash_dmattn_func(q_, k, v, backend="reference"))(stacked)
