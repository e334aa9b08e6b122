"""Block masks under ``torch.compile(fullgraph=True)`` on the GPU: every block-mask kind (and
their ``&``), forward and q/k/v gradients of the compiled function against eager and against
float64 (FlashAttention's rules: 2x for the output, 3x for gradients, of the error of the same
formulation in bf16), one graph per kind, the lists reaching the kernels as graph inputs (the
dense fallback is refused), and a DynamicMask updated between compiled calls: seen at once,
with recompilation turned into an error."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import assert_fa_close, f64

import dmattn_cupy as dm
from dmattn_cupy import autograd

torch = pytest.importorskip("torch")
from torch._dynamo.utils import counters  # noqa: E402

pytestmark = pytest.mark.gpu

B, H, HK, D = 2, 4, 2, 128
SQ, SK, BLK = 320, 448, (128, 128)   # 3 x 4 blocks, ragged last row and column
GRID = (3, 4)


def _pattern(seed: int, lead: tuple[int, ...] = (B, 1)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = rng.random((*lead, *GRID)) < 0.5
    bits[..., np.arange(3), np.arange(3)] = True
    return bits


def _elements(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = np.repeat(np.repeat(_pattern(seed, (1, H)), 128, -2), 128, -1)[..., :SQ, :SK]
    holes = rng.random(keep.shape) < 0.25
    holes[..., :128, :] = False  # the first row block keeps whole blocks: full ones exist
    return keep & ~holes


def _cuda(x: np.ndarray):
    return torch.from_numpy(x).cuda()


def make_mask(kind: str, seed: int = 0) -> dm.SparseMask:
    if kind == "bitset":
        return dm.BlockBitsetMask(_cuda(_pattern(seed)), SQ, SK, BLK)
    if kind == "bitset_numpy":  # host data: the graph copies the lists to the GPU
        return dm.BlockBitsetMask(_pattern(seed), SQ, SK, BLK)
    if kind == "bcsr":
        dense = np.repeat(np.repeat(_pattern(seed), 128, -2), 128, -1)[..., :SQ, :SK]
        return dm.BCSRMask.from_dense_mask(_cuda(dense), BLK)
    if kind == "mixed":
        return dm.MixedMask.from_dense_mask(_cuda(_elements(seed)), BLK)
    if kind == "dynamic":
        return dm.DynamicMask(_cuda(_pattern(seed)), SQ, SK, BLK)
    if kind == "dynamic&causal":
        return make_mask("dynamic", seed) & dm.CausalMask(SQ, SK, BLK)
    if kind == "bitset&mixed":
        return make_mask("bitset", seed) & make_mask("mixed", seed + 1)
    if kind == "bcsr&window":
        return make_mask("bcsr", seed) & dm.WindowMask(150, SQ, SK, BLK)
    raise AssertionError(kind)


KINDS = ["bitset", "bitset_numpy", "bcsr", "mixed", "dynamic", "dynamic&causal",
         "bitset&mixed", "bcsr&window"]


@pytest.fixture
def lists_only(monkeypatch):
    """Fails a test whose compiled call would expand the mask to its dense form."""
    def refuse(*args, **kwargs):
        raise AssertionError("the block mask was expanded to a dense mask")

    monkeypatch.setattr(autograd, "lists_to_dense", refuse)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _qkv(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to("cuda", torch.bfloat16).requires_grad_(True)
            for s in ((B, SQ, H, D), (B, SK, HK, D), (B, SK, HK, D))]


def attend(q, k, v, mask):
    return dm.flash_dmattn_func(q, k, v, sparse_mask=mask)


def _run(fn, q, k, v, mask, dout):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v, mask)
    out.backward(dout)
    torch.cuda.synchronize()
    return out.detach(), [x.grad.detach().clone() for x in (q, k, v)]


def _keep(mask) -> torch.Tensor:
    return torch.from_numpy(np.broadcast_to(mask.to_dense(), (*mask.batch_heads, SQ, SK)).copy())


def _formulation(q, k, v, keep):
    """The dense formulation in q's dtype (softmax in fp32, probabilities rounded to q's dtype),
    rows with nothing kept give 0."""
    kk, vv = (x.repeat_interleave(H // HK, dim=2) for x in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * D ** -0.5
    s = s.float().masked_fill(~keep.to(q.device), float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    ell = p.sum(-1, keepdim=True)
    p = (p / torch.where(ell > 0, ell, torch.ones_like(ell))).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


def _grads(inputs, dout, keep):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    _formulation(*leaves, keep).backward(dout.to(leaves[0].dtype))
    return [x.grad for x in leaves]


def _check_against_float64(out, grads, q, k, v, mask, dout):
    assert_fa_close(out, None, dict(q=f64(q), k=f64(k), v=f64(v), mask=None, bias=None,
                                    scale=D ** -0.5, sparse=np.asarray(mask.to_dense())),
                    "bfloat16")
    keep = _keep(mask)
    ref = _grads([x.double() for x in (q, k, v)], dout.double(), keep)
    low = _grads([q, k, v], dout, keep)
    for name, g, r, lo in zip("qkv", grads, ref, low, strict=True):
        assert torch.isfinite(g).all(), f"d{name}: NaN/inf"
        err = (g.double() - r).abs().max().item()
        tol = 3 * (lo.double() - r).abs().max().item() + 1e-4
        assert err <= tol, f"d{name}: max err {err:.3e} > {tol:.3e}"


def _check_against_eager(got, want):
    (out, grads), (ref_out, ref_grads) = got, want
    # the same kernels on the same inputs (expected bitwise equal; a wrong mask moves O(0.1))
    torch.testing.assert_close(out, ref_out, rtol=1e-2, atol=1e-2)
    for g, r in zip(grads, ref_grads, strict=True):  # dQ sums in any order: rounding only
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_block_mask_matches_eager_and_float64(kind, lists_only, fresh_dynamo):
    mask = make_mask(kind)
    q, k, v = _qkv(1)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to("cuda",
                                                                               torch.bfloat16)
    compiled = torch.compile(attend, fullgraph=True)
    got = _run(compiled, q, k, v, mask, dout)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    _check_against_eager(got, _run(attend, q, k, v, mask, dout))
    _check_against_float64(*got, q, k, v, mask, dout)


def test_dynamic_mask_updates_reach_the_compiled_function(lists_only, fresh_dynamo):
    mask = make_mask("dynamic", seed=3)
    q, k, v = _qkv(4)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to("cuda",
                                                                               torch.bfloat16)
    compiled = torch.compile(attend, fullgraph=True)
    first = _run(compiled, q, k, v, mask, dout)
    _check_against_float64(*first, q, k, v, mask, dout)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (6, 7):
            mask.update(_cuda(_pattern(seed)))
            got = _run(compiled, q, k, v, mask, dout)
            assert not torch.equal(got[0], first[0]), "the update was not seen"
            _check_against_eager(got, _run(attend, q, k, v, mask, dout))
            _check_against_float64(*got, q, k, v, mask, dout)
    assert counters["stats"]["unique_graphs"] == graphs
    other = make_mask("dynamic", seed=8)  # another mask object of the same shapes
    got = _run(compiled, q, k, v, other, dout)
    _check_against_float64(*got, q, k, v, other, dout)


def test_dynamic_mask_update_before_backward_keeps_the_forward_pattern(lists_only,
                                                                        fresh_dynamo):
    """Issue 13: inductor erased the lists' clone and saved the live buffers for the backward
    (wrong gradients); the copy is now the ``dmattn_cupy::snapshot`` op."""
    mask = make_mask("dynamic", seed=9)
    q, k, v = _qkv(10)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(11)).to("cuda",
                                                                                torch.bfloat16)
    compiled = torch.compile(attend, fullgraph=True)
    want = _run(compiled, q, k, v, mask, dout)
    for x in (q, k, v):
        x.grad = None
    out = compiled(q, k, v, mask)
    mask.update(_cuda(_pattern(12)))
    out.backward(dout)
    for g, x in zip(want[1], (q, k, v), strict=True):
        torch.testing.assert_close(x.grad, g, rtol=2e-2, atol=2e-2)


def test_compiled_block_mask_with_bias_and_attn_mask(lists_only, fresh_dynamo):
    """Block lists beside a dense attn_mask and a learnable key-side bias (its gradient too)."""
    mask = make_mask("mixed", seed=13)
    q, k, v = _qkv(14)
    bias = torch.randn(1, H, 1, SK, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    keep = torch.rand(B, 1, SQ, SK, device="cuda") < 0.9

    def f(q, k, v, bias, keep, mask):
        return dm.flash_dmattn_func(q, k, v, attn_mask=keep, attn_bias=bias, sparse_mask=mask)

    compiled = torch.compile(f, fullgraph=True)
    results = []
    for fn in (compiled, f):
        for x in (q, k, v, bias):
            x.grad = None
        fn(q, k, v, bias, keep, mask).float().square().sum().backward()
        results.append([x.grad.clone() for x in (q, k, v, bias)])
    for g, r in zip(*results, strict=True):
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-2)
    assert counters["stats"]["unique_graphs"] == 1
