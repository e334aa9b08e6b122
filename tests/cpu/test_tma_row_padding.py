"""A mask/bias whose layout alone keeps a problem off the Hopper forward (rows of Sk bytes or
values that are not 16-byte multiples, a misaligned view) is copied into 16-byte aligned rows
first (forward.operands_to_pad, arrays.padded_rows / padded_copy). The layout model and the
selection are checked here; the GPU tests (test_forward_sm90.py) run the copies."""

from __future__ import annotations

import numpy as np
import pytest

from dmattn_cupy import arrays, forward, row_pad, runtime
from dmattn_cupy import forward_sm90 as f90
from dmattn_cupy.arrays import ArrayInfo
from dmattn_cupy.device import PRESETS
from dmattn_cupy.validate import Problem

H100, A100 = PRESETS["sm_90"], PRESETS["sm_80"]


def _info(shape, strides, dtype="bfloat16", ptr=1 << 20):
    return ArrayInfo("torch", dtype, tuple(shape), tuple(strides), 0, ptr)


def _contig(shape, dtype="bfloat16", ptr=1 << 20):
    return _info(shape, [int(np.prod(shape[i + 1:])) for i in range(len(shape))], dtype, ptr)


def _problem(sq, sk, mask=None, bias=None, b=2, h=4, hk=2, d=128):
    q, k = _contig((b, sq, h, d)), _contig((b, sk, hk, d))
    return Problem(kind="torch", backend="cuda", varlen=False, batch=b, seqlen_q=sq,
                   seqlen_k=sk, heads=h, kv_heads=hk, head_dim=d, dtype="bfloat16", scale=1.0,
                   softcap=0.0, window=(-1, -1), q=q, k=k, v=k, mask=mask, bias=bias)


@pytest.mark.parametrize("shape,strides,dtype,want", [
    ((2, 1, 300, 2527), None, "bool", (300 * 2528, 300 * 2528, 2528, 1)),
    ((2, 4, 300, 1001), None, "bfloat16", (4 * 300 * 1008, 300 * 1008, 1008, 1)),
    ((2, 4, 300, 1001), (300 * 1001, 0, 1001, 1), "bool", (300 * 1008, 300 * 1008, 1008, 1)),
    ((2, 4, 1, 2527), None, "bfloat16", (4 * 2528, 2528, 2528, 1)),                      # key row
    ((2, 1, 300, 40), (1, 0, 80, 2), "bool", (300 * 48, 300 * 48, 48, 1)),              # strided
])
def test_padded_rows_layout(shape, strides, dtype, want):
    info = _contig(shape, dtype) if strides is None else _info(shape, strides, dtype)
    out = arrays.padded_rows(info)
    # an expanded head dimension (stride 0) is stored once: described as size 1
    collapsed = tuple(1 if st == 0 else n for n, st in zip(info.shape, info.strides, strict=True))
    assert out.shape == collapsed and out.strides == want and out.dtype == dtype
    item = arrays.ITEM_BYTES[dtype]
    assert forward._tma_rows(ArrayInfo(**{**out.__dict__, "ptr": 1 << 20}))
    # every element of the copy has its own place (broadcast dims once), rows 16-byte apart
    assert (out.strides[-2] * item) % 16 == 0 and out.strides[-2] >= shape[-1]


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(runtime, "device_props", lambda device: H100)
    monkeypatch.delenv("DMATTN_FWD_FAMILY", raising=False)


def test_layouts_tma_cannot_read_are_padded(hopper):
    # an HF-style (B, 1, Sq, Sk) bool mask at an odd Sk: rows of 2527 bytes
    assert forward.operands_to_pad(_problem(300, 2527, mask=_contig((2, 1, 300, 2527), "bool"))
                                   ) == ("mask",)
    # a bf16 bias tile at Sk % 8 != 0; with a mask at the same Sk both; beside an aligned
    # mask a misaligned bias view alone
    assert forward.operands_to_pad(_problem(300, 1001, bias=_contig((2, 4, 300, 1001)))
                                   ) == ("bias",)
    assert forward.operands_to_pad(_problem(300, 1001, mask=_contig((2, 1, 300, 1001), "bool"),
                                            bias=_contig((2, 4, 300, 1001)))) == ("mask", "bias")
    assert forward.operands_to_pad(_problem(
        300, 1008, mask=_contig((2, 1, 300, 1008), "bool"),
        bias=_contig((2, 4, 300, 1008), ptr=(1 << 20) + 2))) == ("bias",)
    # a key-row mask at an odd Sk, a misaligned view of an aligned layout
    assert forward.operands_to_pad(_problem(300, 2527, mask=_contig((2, 1, 1, 2527), "bool"))
                                   ) == ("mask",)
    view = _contig((2, 1, 300, 2528), "bool", ptr=(1 << 20) + 3)
    assert forward.operands_to_pad(_problem(300, 2528, mask=view)) == ("mask",)


def test_nothing_to_pad(hopper, monkeypatch):
    aligned = _problem(300, 2528, mask=_contig((2, 1, 300, 2528), "bool"))
    assert forward.operands_to_pad(aligned) == ()                      # TMA reads it as it is
    # a key-row bias without a mask: read by plain loads, no map
    assert forward.operands_to_pad(_problem(300, 2527, bias=_contig((2, 4, 1, 2527)))) == ()
    # a float32 bias tile: no Hopper path for it, padding would not help
    assert forward.operands_to_pad(_problem(300, 1001,
                                            bias=_contig((2, 4, 300, 1001), "float32"))) == ()
    odd = _problem(300, 2527, mask=_contig((2, 1, 300, 2527), "bool"))
    monkeypatch.setenv("DMATTN_FWD_FAMILY", "fwd_mma")                # the portable family forced
    assert forward.operands_to_pad(odd) == ()
    monkeypatch.delenv("DMATTN_FWD_FAMILY")
    monkeypatch.setattr(runtime, "device_props", lambda device: A100)  # no Hopper family
    assert forward.operands_to_pad(odd) == ()
    assert f90.tile_for(128, odd.q, odd.k, odd.v, odd.mask, None, 300, 2527) is None


def test_expanded_broadcasts_are_described_as_size_1(hopper):
    """A mask expanded over heads (stride 0, e.g. torch's expand) is the same problem as its
    size-1 form, which a tensor map reads: aligned rows need no copy, odd ones one copy of
    the (B, 1, Sq, Sk) elements."""
    expanded = _info((2, 4, 300, 1008), (300 * 1008, 0, 1008, 1), "bool")
    pb = forward.collapsed_broadcasts(_problem(300, 1008, mask=expanded))
    assert pb.mask.shape == (2, 1, 300, 1008) and pb.mask.strides == expanded.strides
    assert forward.operands_to_pad(pb) == ()
    assert f90.tile_for(128, pb.q, pb.k, pb.v, pb.mask, None, 300, 1008) is not None
    assert f90.tile_for(128, pb.q, pb.k, pb.v, expanded, None, 300, 1008) is None
    odd = forward.collapsed_broadcasts(_problem(
        300, 1001, mask=_info((2, 4, 300, 1001), (300 * 1001, 0, 1001, 1), "bool")))
    assert forward.operands_to_pad(odd) == ("mask",)
    assert arrays.padded_rows(odd.mask).shape == (2, 1, 300, 1001)


@pytest.mark.parametrize("shape,strides,want", [
    ((2, 1, 300, 2527), None, 2527),                              # HF mask, contiguous
    ((2, 1, 300, 1001), (300 * 1027, 300 * 1027, 1027, 1), 1027),  # a view into wider rows
    ((2, 1, 300, 1001), (300 * 1001, 0, 1001, 1), 1001),          # an expanded head dim
    ((2, 4, 1, 2527), None, 2527),                                 # key rows
    ((2, 1, 300, 500), (300 * 1000, 0, 1000, 2), None),           # keys 2 apart
    ((2, 1, 300, 500), (500, 0, 1, 300), None),                   # transposed
    ((2, 1, 300, 500), (1000, 0, 2 * 300 * 1000, 1), None),       # rows not in C order
])
def test_row_pitch_of_one_pitched_copy(shape, strides, want):
    """The padding is one row_pad launch when the source's rows are equally spaced (collapsed
    broadcasts dropped), else padded_copy's element-by-element copy."""
    info = _contig(shape, "bool") if strides is None else _info(shape, strides, "bool")
    assert arrays._row_pitch(arrays.collapse_broadcast(info)) == want


def test_row_pad_launch_shape_and_refusals():
    """The padding copy's grid covers every 16-byte chunk of a destination row in x and the
    rows in y (at most 65535: the kernel's stride loop takes the rest); a destination it
    cannot store 16-byte words into is refused before anything launches."""
    assert row_pad.grid(5056, 80864) == (-(-5056 // (16 * 32 * row_pad.PAD_WARPS)), 65535, 1)
    assert row_pad.grid(16, 3) == (1, 3, 1)
    with pytest.raises(ValueError, match="16-byte aligned destination"):
        row_pad.copy_rows(0, 8, 32, 0, 32, 32, 1, 0)
    with pytest.raises(ValueError, match="pitch >= width"):
        row_pad.copy_rows(0, 0, 16, 0, 32, 32, 1, 0)
