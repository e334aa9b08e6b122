"""A DynamicMask updated between a compiled forward and its backward, on the CUDA route (lists
as graph inputs of the custom ops), traced on the CPU: the backward must read the lists the
forward used. Under inductor a plain ``clone`` of the lists is not enough: its joint-graph
passes erase a clone with its input's metadata, so the partitioner saved the live buffers
(the H200 bug of issue 13). Checked on inductor's own partitioning (graphs and the lists the
ops receive) and with the full inductor compiler; without a gradient no copy is made."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import dmattn_cupy as dm
from dmattn_cupy import autograd
from dmattn_cupy.sparse_plan import arrays_to_list

torch = pytest.importorskip("torch")
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._functorch.aot_autograd import make_boxed_func  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

compile_fx = pytest.importorskip("torch._inductor.compile_fx")

SQ, SK, BLK = 200, 328, (64, 64)   # 4 x 6 blocks, ragged edges
LEAD = (1, 2)


def _pattern(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = rng.random((*LEAD, 4, 6)) < 0.45
    bits[..., np.arange(4), np.arange(4)] = True
    return bits


def _attend(q, k, v, mask):
    return dm.flash_dmattn_func(q, k, v, sparse_mask=mask)


@pytest.fixture
def cuda_route(monkeypatch):
    """CPU tensors take the route of CUDA ones (lists handed to the ops)."""
    torch._dynamo.reset()
    monkeypatch.setattr(autograd, "_kernel_device", lambda query, backend: True)
    yield
    torch._dynamo.reset()


def _inductor_partitioning(graphs: dict):
    """aot_autograd with inductor's partition function (its joint-graph passes, then the
    min-cut partitioner) and compilers that keep the graphs and run them as they are."""
    part = getattr(compile_fx, "partition_fn", None)
    if part is None:
        pytest.skip("this torch has no module-level torch._inductor.compile_fx.partition_fn")

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm)
        return compiler

    return aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"), partition_fn=part)


def _op_node(gm, op):
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == op]
    assert len(nodes) == 1, gm.code
    return nodes[0]


def test_the_backward_graph_reads_the_forwards_snapshot_not_the_mask_inputs(cuda_route):
    graphs = {}
    mask = dm.DynamicMask(_pattern(0), SQ, SK, BLK, max_blocks_per_row=6)
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(1, SQ, 2, 64, dtype=torch.bfloat16, requires_grad=True)
        kv = torch.empty(1, SK, 1, 64, dtype=torch.bfloat16, requires_grad=True)
        out = torch.compile(_attend, fullgraph=True,
                            backend=_inductor_partitioning(graphs))(q, kv, kv, mask)
        out.sum().backward()
    fw, bw = graphs["fw"], graphs["bw"]
    fw_nodes = {n.name: n for n in fw.graph.nodes}
    fwd_lists = _op_node(fw, torch.ops.dmattn_cupy.fwd.default).args[15]
    bwd_lists = _op_node(bw, torch.ops.dmattn_cupy.bwd.default).args[20]
    assert len(fwd_lists) == len(bwd_lists) == 4
    # a backward input is the forward output of the same name: a copy the forward made, not
    # the forward's primal (the live buffer), as it was with a clone
    for f_node, b_node in zip(fwd_lists, bwd_lists, strict=True):
        assert b_node.op == "placeholder" and b_node.name == f_node.name, bw.code
        assert fw_nodes[b_node.name].op != "placeholder", fw.code
    snap = _op_node(fw, torch.ops.dmattn_cupy.snapshot.default)
    assert all(n.op == "placeholder" for n in snap.args[0])  # copies of the mask's inputs
    assert all(n.args[0] is snap for n in fwd_lists)

@pytest.mark.parametrize("grad", ["no_grad", "no_requires_grad"])
def test_no_snapshot_when_no_backward_can_run(cuda_route, grad):
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    mask = dm.DynamicMask(_pattern(0), SQ, SK, BLK, max_blocks_per_row=6)
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(1, SQ, 2, 64, dtype=torch.bfloat16, requires_grad=grad == "no_grad")
        kv = torch.empty(1, SK, 1, 64, dtype=torch.bfloat16)
    with torch.set_grad_enabled(grad != "no_grad"):
        torch.compile(_attend, fullgraph=True, backend=capture)(q, kv, kv, mask)
    (gm,) = graphs
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.dmattn_cupy.snapshot not in targets, gm.code
    assert torch.ops.dmattn_cupy.fwd in targets, gm.code
    # and with a gradient wanted, the same call does copy (the check above can fail)
    torch._dynamo.reset()
    q.requires_grad_(True)
    torch.compile(_attend, fullgraph=True, backend=capture)(q, kv, kv, mask)
    assert torch.ops.dmattn_cupy.snapshot in {n.target for n in graphs[-1].graph.nodes}


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def _live_lists(mask: dm.DynamicMask) -> list:
    """The mask's live lists in the ops' order, as torch tensors sharing its NumPy buffers."""
    lists = mask.device_lists()
    return [torch.from_numpy(np.asarray(a)) for a in
            (lists.full_count, lists.full_idx, lists.partial_count, lists.partial_idx)]


@pytest.mark.parametrize("backend", ["partitioning", "inductor"])
def test_update_before_backward_leaves_the_lists_the_backward_reads(cuda_route, monkeypatch,
                                                                     backend):
    """The ops' kernels are stood in by recorders of the lists they receive (real CPU
    tensors): the backward must get the lists the forward got, not the updated ones."""
    if backend == "inductor" and not _has_cxx():
        pytest.skip("inductor's CPU code generation needs a C++ compiler")
    seen = {}

    def forward(pb, q, return_lse, sparse):
        seen["fwd"] = [t.clone() for t in arrays_to_list(sparse)]
        lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
        return torch.zeros_like(q), lse

    def backward(pb, dout, q, k, v, out, lse, *, sparse, **kwargs):
        seen["bwd"] = [t.clone() for t in arrays_to_list(sparse)]
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None

    monkeypatch.setattr(autograd, "run_forward", forward)
    monkeypatch.setattr(autograd, "run_backward", backward)
    mask = dm.DynamicMask(_pattern(0), SQ, SK, BLK, max_blocks_per_row=6)
    before = [t.clone() for t in _live_lists(mask)]
    compiler = _inductor_partitioning({}) if backend == "partitioning" else "inductor"
    q = torch.randn(1, SQ, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(1, SK, 1, 64, dtype=torch.bfloat16, requires_grad=True)
    out = torch.compile(_attend, fullgraph=True, backend=compiler)(q, kv, kv, mask)
    mask.update(_pattern(1))
    assert not all(torch.equal(a, b) for a, b in zip(before, _live_lists(mask), strict=True))
    out.float().sum().backward()
    for got, fwd, want in zip(seen["bwd"], seen["fwd"], before, strict=True):
        assert torch.equal(fwd, want)
        assert torch.equal(got, want), "the backward read the lists of the updated pattern"
