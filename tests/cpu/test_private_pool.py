"""Buffers kept past a call stay out of torch's private pools (``arrays.in_private_pool``): the
segment lookup in torch's memory snapshot, and the keepers that ask it (``scratch`` and the
block-mask uploads of ``sparse_plan``). The GPU side is tests/gpu/test_scratch.py."""

from __future__ import annotations

import numpy as np
import pytest

from dmattn_cupy import arrays, scratch, sparse_plan

torch = pytest.importorskip("torch")


class _Device:
    def __init__(self, index: int) -> None:
        self.index = index


class _CudaTensor:
    """What in_private_pool reads of a CUDA tensor: its module, is_cuda, pointer, device."""
    __module__ = "torch"
    is_cuda = True

    def __init__(self, ptr: int, device: int = 0) -> None:
        self._ptr, self.device = ptr, _Device(device)

    def data_ptr(self) -> int:
        return self._ptr


_SEGMENTS = [  # a default-pool segment, a private one, one on device 1
    {"device": 0, "address": 0x1000, "total_size": 0x1000, "segment_pool_id": (0, 0)},
    {"device": 0, "address": 0x8000, "total_size": 0x2000, "segment_pool_id": (1, 3)},
    {"device": 1, "address": 0x1000, "total_size": 0x1000, "segment_pool_id": (2, 0)},
]


@pytest.fixture
def snapshot(monkeypatch):
    calls = []

    def fake(include_traces=True):
        calls.append(include_traces)
        return _SEGMENTS
    monkeypatch.setattr(torch.cuda, "memory_snapshot", fake)
    return calls


def test_a_buffer_is_private_only_inside_a_private_segment_of_its_device(snapshot):
    assert not arrays.in_private_pool(_CudaTensor(0x1800))          # default pool
    assert arrays.in_private_pool(_CudaTensor(0x8000))               # first byte
    assert arrays.in_private_pool(_CudaTensor(0x9fff))               # last byte
    assert not arrays.in_private_pool(_CudaTensor(0xa000))           # just past it
    assert not arrays.in_private_pool(_CudaTensor(0x1800, device=2))  # no segment there
    assert arrays.in_private_pool(_CudaTensor(0x1800, device=1))     # device 1's is private
    assert arrays.in_private_pool(None, _CudaTensor(0x1800), _CudaTensor(0x8800))  # any of
    assert snapshot == [False] * len(snapshot), "the snapshot was asked for with traces"


def test_arrays_of_other_kinds_never_ask_torch(snapshot):
    assert not arrays.in_private_pool(np.zeros(3), None, torch.zeros(3))   # CPU tensor
    assert snapshot == []


def test_an_older_torch_without_include_traces_and_a_backend_without_snapshots(monkeypatch):
    def old(mempool_id=None):
        return _SEGMENTS
    monkeypatch.setattr(torch.cuda, "memory_snapshot", old)
    assert arrays.in_private_pool(_CudaTensor(0x8800))

    def unsupported(*args, **kwargs):
        raise RuntimeError("snapshots are not supported by this allocator backend")
    monkeypatch.setattr(torch.cuda, "memory_snapshot", unsupported)
    assert not arrays.in_private_pool(_CudaTensor(0x8800))   # kept as before the rule


@pytest.mark.parametrize("pooled", [False, True])
def test_scratch_keeps_only_buffers_outside_private_pools(monkeypatch, pooled):
    monkeypatch.setattr(scratch, "in_private_pool", lambda *xs: pooled)
    scratch.clear()
    try:
        made = []

        def make(n=4):
            made.append(np.zeros(n, dtype=np.float32))
            return made[-1]
        owner = ("torch", 0)
        first = scratch.get(owner, 7, 64, make, capturing=False)
        again = scratch.get(owner, 7, 64, make, capturing=False)
        assert (again is first) is not pooled and len(made) == 1 + pooled
        c1 = scratch.counter(owner + (1,), 7, make, capturing=False)
        c2 = scratch.counter(owner + (1,), 7, make, capturing=False)
        assert (c2 is c1) is not pooled
        assert bool(scratch._bufs) is not pooled and bool(scratch._counters) is not pooled
    finally:
        scratch.clear()


@pytest.mark.parametrize("pooled", [False, True])
def test_an_immutable_masks_upload_is_kept_only_outside_private_pools(monkeypatch, pooled):
    monkeypatch.setattr(sparse_plan, "upload_in_private_pool", lambda value: pooled)
    import dmattn_cupy as dm

    mask = dm.BlockBitsetMask(np.ones((1, 1), dtype=bool), 128, 128, block_size=(128, 128))
    like = np.zeros((1, 128, 1, 64), dtype=np.float32)
    first = sparse_plan._kept_on_mask(mask, "_probe", like, lambda: object())
    again = sparse_plan._kept_on_mask(mask, "_probe", like, lambda: object())
    assert (again is first) is not pooled
    assert bool(mask.__dict__["_probe"]) is not pooled
