"""The Hopper forward's key-row bias specs (cuda_src/sm90/fwd.cu: kBiasKeyRow, ``_krow``): a
key-based bias without a mask, read by the producer's plain loads, gets bias stages of one row
(1 KB) instead of a 128 x 128 tile, so Q gets two buffers at d128 as in the dense spec. Checked
on the CPU: which problems take it, its shared memory against the kernel's kAlloc, that the
selector names it and precompile lists it."""

from __future__ import annotations

import math

import pytest
from nvrtc_check import compile_static_asserts

from dmattn_cupy import forward_sm90 as f90
from dmattn_cupy import precompile, select
from dmattn_cupy.arrays import ArrayInfo
from dmattn_cupy.device import PRESETS


def _info(shape, dtype="bfloat16"):
    strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return ArrayInfo("cupy", dtype, tuple(shape), strides, 0, 1024)


def test_which_problems_take_the_key_row_spec(monkeypatch):
    row, tile = _info((2, 8, 1, 4096)), _info((2, 8, 512, 4096))
    mask = _info((2, 8, 512, 4096), "bool")
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "")
    assert f90.key_row_spec(None, row)
    assert f90.key_row_spec(None, _info((4096, 2)), varlen=True)          # a key chunk
    assert not f90.key_row_spec(None, tile)                                # a tile bias
    assert not f90.key_row_spec(mask, row)                                 # with a mask
    assert not f90.key_row_spec(None, _info((2, 8, 1, 4096), "float32"))   # sm80 family
    assert not f90.key_row_spec(None, None)
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_KROW_SPEC=0")
    assert not f90.key_row_spec(None, row)
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_KBIAS_F32=0")  # TMA rows: tile stages
    assert not f90.key_row_spec(None, row)


@pytest.mark.parametrize("defines", ["", "DM_SM90_KBIAS_F32=2"])
@pytest.mark.parametrize("hd", [64, 128, 256])
def test_key_row_shared_memory_agrees_with_the_kernel(hd, defines, monkeypatch):
    """With the default DM_SM90_KBIAS_F32=4's aux tiles (block_n x 32 bytes after each K stage)
    and without them (2)."""
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", defines)
    bn, st = f90.tile(hd, False, True)
    smem = f90.smem_bytes(hd, bn, st, False, True, key_row=True)
    qb = f90.q_buffers(hd, bn, st, False, True, key_row=True)
    assert smem <= f90.SMEM_LIMIT and smem < f90.smem_bytes(hd, bn, st, False, True)
    if hd == 128:  # what the spec is for: Q's second buffer (the tile-bias spec has one)
        assert qb == 2 and f90.q_buffers(hd, bn, st, False, True) == 1
    spec = f"dm::Sm90FwdSmem<{hd}, {bn}, {st}, false, true, true>"
    compile_static_asserts(
        f'#include "sm90/fwd.cu"\nstatic_assert({spec}::kAlloc == {smem} && '
        f'{spec}::kQBufs == {qb} && {spec}::kBias == {f90.KEY_ROW_STAGE} && '
        f'{spec}::kAux == {f90.aux_tile_bytes(bn, True)});\n',
        "sm90_krow_smem.cu", tuple(d for d in [defines] if d))


def test_selector_names_the_key_row_spec(monkeypatch):
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "")
    h100 = PRESETS["sm_90"]
    pb = precompile.stub_problem("bf16", 128, False, True, False)           # a key-row bias
    spec = select.forward(pb, h100)
    assert spec.family == "fwd_sm90" and spec.bias_key_row and spec.id.endswith("_krow")
    assert "true, true, false>" in spec.name_expression  # has_bias, bias_key_row, debug
    tile = select.forward(precompile.stub_problem("bf16", 128, False, True, False, tiles=True),
                          h100)
    assert tile.family == "fwd_sm90" and not tile.bias_key_row
    assert spec.dynamic_smem < tile.dynamic_smem
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_KROW_SPEC=0")
    assert not select.forward(pb, h100).bias_key_row


def test_precompile_lists_both_bias_specs():
    ids = {s.id for s in precompile.all_specs("sm_90") if s.family == "fwd_sm90"}
    for dt in ("bf16", "fp16"):
        for hd, bn in ((64, 128), (128, 128), (256, 64)):
            base = f"fwd_sm90_{dt}_d{hd}_m128n{bn}w12_mask0_bias1_varlen0_st2"
            assert base in ids and base + "_krow" in ids
