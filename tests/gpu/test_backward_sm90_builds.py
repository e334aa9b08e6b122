"""The Hopper backward's A/B builds, built side by side with the default in one process
(kernels and plans are cached per DMATTN_NVRTC_DEFINES): one ring slot everywhere
(DM_SM90_BWD_DQ_SLOTS=1), a full bias tile moved by per-element loads and stores
(DM_SM90_BWD_BIAS_LDSM=0; the default uses ldmatrix/stmatrix.trans), deterministic mode in grid
order (DM_SM90_BWD_DET_KEY_MAJOR=0; the default orders CTAs key tile first: the adds keep their
key-tile order either way), one dQ writer warp where the default has two taking alternate
items (two slots, no mask; DM_SM90_BWD_DQ_WRITERS=1), and one writer on the one-slot ring where
the default has two taking the slot in turn (d128 with a full bias tile and no mask;
DM_SM90_BWD_DQ_SHARED_SLOT=0). Every build forms each dQ tile from the same fp32 products, so
in deterministic mode (adds in key-tile order) the gradients are bitwise equal to the default
build's; each build is also checked against float64 autograd in the default mode. The cases of
test_backward_sm90_dq_writer: two ring slots (d64, d128), one (d128 with a bias tile, with
and without a mask), masks that drop whole tiles (no dS^T stored), causal and window, GQA, Sq
past the last 64-row tile, a head dim padded inside its box (72 of 128: the tensor reduce's
columns past 72 are out of bounds)."""

from __future__ import annotations

import pytest
from test_backward_sm90_dq_writer import CASES, _build, _case, check_builds_bitwise_equal

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("bwd_sm90_only")]

BUILDS = ("", "DM_SM90_BWD_DQ_SLOTS=1", "DM_SM90_BWD_BIAS_LDSM=0", "DM_SM90_BWD_DET_KEY_MAJOR=0",
          "DM_SM90_BWD_DQ_WRITERS=1", "DM_SM90_BWD_DQ_SHARED_SLOT=0")
IDS = ["one_slot", "bias_lds_u16", "det_grid_order", "one_writer", "one_slot_one_writer"]


@pytest.mark.parametrize("case", CASES)
def test_deterministic_gradients_are_bitwise_equal_across_builds(monkeypatch, case):
    check_builds_bitwise_equal(monkeypatch, case, BUILDS)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("defines", BUILDS[1:], ids=IDS)
def test_default_mode_matches_the_reference(monkeypatch, case, defines):
    q, k, v, kw = _case(case)
    _build(monkeypatch, defines, q, k, v, **kw)
