"""Block masks under torch.compile without a GPU: the torch form every mask carries
(flatten/unflatten round trips, the exact dense expansion), compiled calls on the CPU reference
against eager (forward and grads, one graph, no recompile after a DynamicMask update), and the
CUDA route traced over fake tensors (the lists are graph inputs of the fwd and bwd ops)."""

from __future__ import annotations

import numpy as np
import pytest

import dmattn_cupy as dm
from dmattn_cupy import autograd, reference
from dmattn_cupy.mask_tensors import (
    TRACED_ATTR,
    BlockMeta,
    flatten_block_mask,
    lists_to_dense,
    unflatten_block_mask,
)

torch = pytest.importorskip("torch")
from torch._dynamo.utils import counters  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

SQ, SK, BLK = 200, 328, (64, 64)   # ragged edges: 4 x 6 blocks, the last ones partial
GRID = (4, 6)


def _pattern(seed: int, lead: tuple[int, ...] = ()) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = rng.random((*lead, *GRID)) < 0.45
    bits[..., np.arange(4), np.arange(4)] = True  # no empty row
    return bits


def _dense_elems(seed: int, lead: tuple[int, ...] = ()) -> np.ndarray:
    """Element-exact: kept blocks with holes, so a MixedMask has full and partial blocks."""
    rng = np.random.default_rng(seed)
    blocks = np.repeat(np.repeat(_pattern(seed, lead), 64, -2), 64, -1)[..., :SQ, :SK]
    holes = rng.random(blocks.shape) < 0.3
    holes[..., :64, :] = False  # row block 0 keeps whole blocks: full ones exist
    return blocks & ~holes


def _bcsr(bits: np.ndarray) -> dm.BCSRMask:
    return dm.BCSRMask.from_dense_mask(np.repeat(np.repeat(bits, 64, -2), 64, -1)[..., :SQ, :SK],
                                       BLK)


MAKERS = {
    "bitset": lambda lead: dm.BlockBitsetMask(_pattern(1, lead), SQ, SK, BLK),
    "bcsr": lambda lead: _bcsr(_pattern(2, lead)),
    "mixed": lambda lead: dm.MixedMask.from_dense_mask(_dense_elems(3, lead), BLK),
    "dynamic": lambda lead: dm.DynamicMask(_pattern(4, lead), SQ, SK, BLK, max_blocks_per_row=5),
}
KINDS = {"bitset": "BlockBitsetMask", "bcsr": "BCSRMask", "mixed": "MixedMask",
         "dynamic": "DynamicMask"}


@pytest.mark.parametrize("lead", [(), (2, 1)], ids=["2d", "4d"])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_flatten_unflatten_round_trip(kind, lead):
    mask = MAKERS[kind](lead)
    tensors, meta = flatten_block_mask(mask)
    assert isinstance(meta, BlockMeta) and meta.kind == KINDS[kind]
    assert hash(meta) == hash(BlockMeta(**vars(meta)))  # hashable, by value
    assert len(tensors) == (6 if kind == "mixed" else 4)
    assert all(t.dtype == torch.int32 and t.device.type == "cpu" for t in tensors)
    assert [t.dim() for t in tensors[:4]] == [3, 4, 3, 4]  # (Bm, Hm, nrb[, width])
    expect = np.broadcast_to(mask.to_dense(), (*mask.batch_heads, SQ, SK))
    np.testing.assert_array_equal(lists_to_dense(tensors, meta).numpy(), expect)
    back = unflatten_block_mask(tensors, meta)
    assert type(back) is type(mask) and back.batch_heads == mask.batch_heads
    np.testing.assert_array_equal(back.to_dense(), mask.to_dense())
    again, meta2 = flatten_block_mask(back)
    assert meta2 == meta
    for a, b in zip(again, tensors, strict=True):
        assert torch.equal(a, b)
    if kind == "mixed":
        assert (mask.block_map() == 1).any() and (mask.block_map() == 2).any()


class _LargestOutput(TorchDispatchMode):
    """The most elements any torch op's output had while active."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


@pytest.mark.parametrize("block", [(1 << 20, 16), (8, 1 << 16)], ids=["tall", "wide"])
def test_lists_to_dense_never_expands_a_blocks_padding(block):
    """A block far longer than the mask: no intermediate has more elements than the mask
    (the old expansion over whole blocks made outputs of the padded extent, 2**20 x 208
    bools and as many int32 bits for the tall block, 64 x 2**16 for the wide one)."""
    rng = np.random.default_rng(9)
    dense = rng.random((1, 1, 64, 200)) < 0.5
    mask = dm.MixedMask.from_dense_mask(dense, block)
    tensors, meta = flatten_block_mask(mask)
    with _LargestOutput() as seen:
        got = lists_to_dense(tensors, meta)
    np.testing.assert_array_equal(got.numpy(), dense)
    assert seen.most <= 64 * 200, seen.most


def test_flatten_rejects_what_is_not_a_block_mask():
    with pytest.raises(TypeError, match="mask must be one of"):
        flatten_block_mask(dm.CausalMask(8, 8))
    tensors, meta = flatten_block_mask(MAKERS["bitset"](()))
    with pytest.raises(ValueError, match="flattens to 4 tensors"):
        unflatten_block_mask(tensors[:3], meta)
    with pytest.raises(TypeError, match="meta must be a BlockMeta"):
        unflatten_block_mask(tensors, ("BlockBitsetMask",))


def test_every_mask_carries_its_traced_form():
    causal = dm.CausalMask(SQ, SK, BLK)
    assert getattr(causal, TRACED_ATTR) == ((-1, 0), None, None)
    bitset, dyn = MAKERS["bitset"](()), MAKERS["dynamic"](())
    win, flat, err = getattr(bitset & causal, TRACED_ATTR)
    assert (win, err) == ((-1, 0), None) and flat is flatten_block_mask(bitset)
    both = bitset & MAKERS["bcsr"](())
    win, (tensors, meta), err = getattr(both, TRACED_ATTR)
    assert (win, err, meta.kind) == ((-1, -1), None, "MixedMask")
    np.testing.assert_array_equal(lists_to_dense(tensors, meta).numpy()[0, 0], both.to_dense())
    nested = (bitset & causal) & MAKERS["mixed"](())
    win, (tensors, meta), err = getattr(nested, TRACED_ATTR)
    i, j = np.arange(SQ)[:, None], np.arange(SK)[None, :]
    got = lists_to_dense(tensors, meta).numpy()[0, 0] & (j <= i + SK - SQ)
    np.testing.assert_array_equal(got, nested.to_dense())
    # a DynamicMask's live lists cannot merge with another block mask: the error is kept
    win, flat, err = getattr(dyn & bitset, TRACED_ATTR)
    assert flat is None and "DynamicMask" in err


def _qkv(b=2, h=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, SQ, h, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, SK, 1, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, SK, 1, d, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


def _attend(q, k, v, mask):
    out = dm.flash_dmattn_func(q, k, v, sparse_mask=mask, softcap=3.0)
    return out


def _loss_and_grads(fn, q, k, v, mask, g):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v, mask)
    (out * g).sum().backward()
    return out.detach().clone(), [x.grad.clone() for x in (q, k, v)]


def _reference(q, k, v, mask):
    dense = np.broadcast_to(mask.to_dense(), (*mask.batch_heads, SQ, SK))
    out, _ = reference.dense_forward(*(x.detach().numpy() for x in (q, k, v)), None, None,
                                     q.shape[-1] ** -0.5, 3.0, (-1, -1), dense)
    return out


@pytest.mark.parametrize("kind", [*MAKERS, "and_causal", "and_block"])
def test_compiled_matches_eager_on_cpu(kind):
    torch._dynamo.reset()
    counters.clear()
    if kind == "and_causal":
        mask = MAKERS["dynamic"]((2, 1)) & dm.CausalMask(SQ, SK, BLK)
    elif kind == "and_block":
        mask = MAKERS["bitset"](()) & MAKERS["mixed"]((1, 2))
    else:
        mask = MAKERS[kind]((2, 1))
    q, k, v = _qkv()
    g = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    compiled = torch.compile(_attend, fullgraph=True, backend="aot_eager")
    got, got_grads = _loss_and_grads(compiled, q, k, v, mask, g)
    ref, ref_grads = _loss_and_grads(_attend, q, k, v, mask, g)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got.numpy(), _reference(q, k, v, mask), rtol=1e-10, atol=1e-10)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    explained = torch._dynamo.explain(_attend)(q, k, v, mask)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_dynamic_mask_update_is_seen_without_recompiling_on_cpu():
    torch._dynamo.reset()
    mask = dm.DynamicMask(_pattern(5, (2, 1)), SQ, SK, BLK, max_blocks_per_row=6)
    q, k, v = _qkv(seed=1)
    g = torch.ones(q.shape, dtype=torch.float64)
    compiled = torch.compile(_attend, fullgraph=True, backend="aot_eager")
    first, _ = _loss_and_grads(compiled, q, k, v, mask, g)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (6, 7):
            mask.update(_pattern(seed, (2, 1)))
            got, got_grads = _loss_and_grads(compiled, q, k, v, mask, g)
            ref, ref_grads = _loss_and_grads(_attend, q, k, v, mask, g)
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
            for a, b in zip(got_grads, ref_grads, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
            assert not torch.allclose(got, first)
        # another mask of the same kind and shapes reuses the graph as well
        other = dm.DynamicMask(_pattern(8, (2, 1)), SQ, SK, BLK, max_blocks_per_row=6)
        got, _ = _loss_and_grads(compiled, q, k, v, other, g)
        torch.testing.assert_close(got, _attend(q, k, v, other).detach())


def test_dynamic_update_between_forward_and_backward_keeps_the_gradient():
    mask = dm.DynamicMask(_pattern(5, (2, 1)), SQ, SK, BLK, max_blocks_per_row=6)
    q, k, v = _qkv(seed=2)
    compiled = torch.compile(_attend, fullgraph=True, backend="aot_eager")
    want = _loss_and_grads(compiled, q, k, v, mask, torch.ones(q.shape, dtype=torch.float64))[1]
    for x in (q, k, v):
        x.grad = None
    out = compiled(q, k, v, mask)
    mask.update(_pattern(6, (2, 1)))
    out.sum().backward()
    for a, x in zip(want, (q, k, v), strict=True):
        torch.testing.assert_close(x.grad, a)


def test_compiled_mask_errors_name_the_problem():
    q, k, v = _qkv()
    compiled = torch.compile(_attend, fullgraph=True, backend="aot_eager")
    wrong = dm.BlockBitsetMask(np.ones((4, 5), dtype=bool), SQ, 300, BLK)
    with pytest.raises(Exception, match=r"sparse_mask is for \(seqlen_q, seqlen_k\)"):
        compiled(q, k, v, wrong)
    mixed_dyn = MAKERS["dynamic"](()) & MAKERS["bitset"](())
    with pytest.raises(Exception, match="DynamicMask"):
        compiled(q, k, v, mixed_dyn)


# --- the CUDA route, traced over fake tensors -------------------------------------------------

def _sparse_args(gm, op):
    nodes = [n for n in gm.graph.nodes
             if n.op == "call_function" and n.target in (op, op.default)]
    assert len(nodes) == 1, gm.code
    return nodes[0].args


def _capturing_backend(mode, graphs):
    """A torch.compile backend that keeps each graph in ``graphs`` and runs it under the fake
    tensor ``mode``."""
    def backend(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            with mode:
                return gm(*args)
        return run
    return backend


@pytest.mark.parametrize("kind", list(MAKERS))
def test_fake_cuda_forward_graph_takes_the_lists_as_inputs(kind):
    torch._dynamo.reset()
    mask = MAKERS[kind]((1, 2))
    graphs = []
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    backend = _capturing_backend(mode, graphs)

    with mode:
        q = torch.empty(1, SQ, 2, 64, device="cuda", dtype=torch.bfloat16)
        kv = torch.empty(1, SK, 1, 64, device="cuda", dtype=torch.bfloat16)
    out = torch.compile(_attend, fullgraph=True, backend=backend)(q, kv, kv, mask)
    assert out.shape == q.shape and out.device.type == "cuda"
    (gm,) = graphs
    args = _sparse_args(gm, torch.ops.dmattn_cupy.fwd)
    lists, sp_block = args[15], args[16:18]
    assert tuple(sp_block) == BLK and args[3] is None  # no dense mask: the lists travel
    assert len(lists) == (6 if kind == "mixed" else 4)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 2 + len(lists)  # q, kv (k is v) and the mask's tensors
    # each list is (a clone of) a copy of a graph input: nothing is baked into the graph
    for node in lists:
        while node.op != "placeholder":
            node = node.args[0]
        assert TRACED_ATTR.strip("_") in node.name


def test_head_dim_256_with_attn_mask_falls_back_to_the_dense_form(monkeypatch):
    """Where the lists do not fit the kernels (head dim 256 with attn_mask), the CUDA route
    takes the exact dense form, built in the graph from the same tensor inputs (fake CPU
    tensors stand in for CUDA ones: the CPU build cannot slice fake CUDA tensors)."""
    torch._dynamo.reset()
    monkeypatch.setattr(autograd, "_kernel_device", lambda query, backend: True)
    mask = MAKERS["mixed"](())
    graphs = []
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    backend = _capturing_backend(mode, graphs)

    def f(q, k, v, keep, mask):
        return dm.flash_dmattn_func(q, k, v, attn_mask=keep, sparse_mask=mask)

    with mode:
        q = torch.empty(1, SQ, 2, 256, dtype=torch.bfloat16)
        kv = torch.empty(1, SK, 1, 256, dtype=torch.bfloat16)
        keep = torch.empty(1, 1, 1, SK, dtype=torch.bool)
    torch.compile(f, fullgraph=True, backend=backend)(q, kv, kv, keep, mask)
    args = _sparse_args(graphs[0], torch.ops.dmattn_cupy.fwd)
    assert list(args[15]) == [] and args[3].op == "call_function"  # keep & dense, in graph
    placeholders = [n for n in graphs[0].graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 3 + 6  # q, kv, keep and the mask's tensors


def test_lists_route_traces_forward_and_backward(monkeypatch):
    """The route CUDA tensors take, on fake CPU tensors (the ops' fake implementations run):
    the forward graph hands the lists to ``fwd``, the backward graph the same lists to
    ``bwd``."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    torch._dynamo.reset()
    monkeypatch.setattr(autograd, "_kernel_device", lambda query, backend: True)
    mask = MAKERS["mixed"]((1, 2))
    graphs = {}
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm)
        return compiler

    backend = aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))
    with mode:
        q = torch.empty(1, SQ, 2, 64, dtype=torch.bfloat16, requires_grad=True)
        kv = torch.empty(1, SK, 1, 64, dtype=torch.bfloat16, requires_grad=True)
        out = torch.compile(_attend, fullgraph=True, backend=backend)(q, kv, kv, mask)
        out.sum().backward()
        assert q.grad.shape == q.shape and kv.grad.shape == kv.shape
    fwd = _sparse_args(graphs["fw"], torch.ops.dmattn_cupy.fwd)
    bwd = _sparse_args(graphs["bw"], torch.ops.dmattn_cupy.bwd)
    assert len(fwd[15]) == 6 and tuple(fwd[16:18]) == BLK
    assert len(bwd[20]) == 6 and tuple(bwd[21:23]) == BLK
    assert all(n.op == "placeholder" for n in bwd[20])  # saved by the forward graph


def test_a_mask_whose_torch_form_fails_still_builds(monkeypatch):
    from dmattn_cupy import mask_tensors

    def broken(mask):
        raise RuntimeError("no DLPack here")

    monkeypatch.setattr(mask_tensors, "flatten_block_mask", broken)
    mask = dm.BlockBitsetMask(_pattern(1), SQ, SK, BLK)  # construction is unaffected
    win, flat, err = getattr(mask, TRACED_ATTR)
    assert flat is None and "no DLPack here" in err
    q, k, v = _qkv()
    torch.testing.assert_close(_attend(q, k, v, mask), _attend(q, k, v, dm.MixedMask.from_mask(
        mask)))  # eager calls never read it
    with pytest.raises(Exception, match="no torch form for torch.compile"):
        torch.compile(_attend, fullgraph=True, backend="aot_eager")(q, k, v, mask)
