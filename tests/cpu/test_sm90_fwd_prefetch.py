"""The Hopper forward's bias prefetch (sm90/fwd.cu, DM_SM90_BIAS_L2_AHEAD): the mask + bias spec
(mask tiles beside a bias tile) issues a TMA L2 prefetch of the next tile's bias; the bias-only
spec, where it measured no faster (BENCHMARKS.md, forty-fifth session), has none. Checked in
the PTX NVRTC emits for compute_90a, so it needs no disassembler."""

from __future__ import annotations

import re

import pytest

from dmattn_cupy import compile as dcompile
from dmattn_cupy.precompile import all_specs

PREFETCH = "cp.async.bulk.prefetch.tensor.4d.L2.global.tile"


def _ptx(spec_id: str, monkeypatch, defines: str = "") -> str:
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="needs CuPy's NVRTC bindings")
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", defines)
    return dcompile.ptx(next(s for s in all_specs("sm_90") if s.id == spec_id))


MASK_BIAS = "fwd_sm90_bf16_d128_m128n64w12_mask1_bias1_varlen0_st3"
BIAS = "fwd_sm90_bf16_d128_m128n128w12_mask0_bias1_varlen0_st2"


def test_the_mask_bias_spec_prefetches_one_bias_box_per_tile(monkeypatch):
    ptx = _ptx(MASK_BIAS, monkeypatch)
    assert len(re.findall(re.escape(PREFETCH), ptx)) == 1   # 64-key tiles: one 64-column box
    assert "cp.async.bulk.tensor.4d" in ptx                  # the loads it runs ahead of


def test_the_bias_spec_and_the_switch_off_have_no_prefetch(monkeypatch):
    assert PREFETCH not in _ptx(BIAS, monkeypatch)
    assert PREFETCH not in _ptx(MASK_BIAS, monkeypatch, "DM_SM90_BIAS_L2_AHEAD=0")
