"""The Hopper backward's A/B builds, built side by side with the default in one process
(kernels and plans are cached per DMATTN_NVRTC_DEFINES): one ring slot everywhere
(DM_SM90_BWD_DQ_SLOTS=1), a full bias tile moved by per-element loads and stores
(DM_SM90_BWD_BIAS_LDSM=0; the default uses ldmatrix/stmatrix.trans), deterministic mode in grid
order (DM_SM90_BWD_DET_KEY_MAJOR=0; the default orders CTAs key tile first: the adds keep their
key-tile order either way), one dQ writer warp where the default has two taking alternate
items (two slots, no mask; DM_SM90_BWD_DQ_WRITERS=1), and one writer on the one-slot ring where
the default has two taking the slot in turn (d128 with a full bias tile and no mask;
DM_SM90_BWD_DQ_SHARED_SLOT=0), and the mask warps split by keys instead of rows
(DM_SM90_BWD_MASK_HALVES=1: the same words by another transpose). Every build forms each dQ
tile from the same fp32 products, so in deterministic mode (adds in key-tile order) the
gradients are bitwise equal to the default build's; each build is also checked against float64
autograd in the default mode. The cases
of test_backward_sm90_dq_writer: two ring slots (d64, d128), one (d128 with a bias tile, with
and without a mask), masks that drop whole tiles (no dS^T stored), causal and window, GQA, Sq
past the last 64-row tile, a head dim padded inside its box (72 of 128: the tensor reduce's
columns past 72 are out of bounds). The mask build also runs the mask layouts its producer reads
differently (a key row, bytes one by one, a transposed mask, fp16 at d64) and a MixedMask's
partial blocks (the listed-bits specs)."""

from __future__ import annotations

import numpy as np
import pytest
from test_backward import _qkv
from test_backward_sm90_dq_writer import CASES, _build, _case, check_builds_bitwise_equal

import dmattn_cupy as dm

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("bwd_sm90_only")]

MASK_HALVES = "DM_SM90_BWD_MASK_HALVES=1"
BUILDS = ("", "DM_SM90_BWD_DQ_SLOTS=1", "DM_SM90_BWD_BIAS_LDSM=0", "DM_SM90_BWD_DET_KEY_MAJOR=0",
          "DM_SM90_BWD_DQ_WRITERS=1", "DM_SM90_BWD_DQ_SHARED_SLOT=0", MASK_HALVES)
IDS = ["one_slot", "bias_lds_u16", "det_grid_order", "one_writer", "one_slot_one_writer",
       "mask_key_halves"]


@pytest.mark.parametrize("case", CASES)
def test_deterministic_gradients_are_bitwise_equal_across_builds(monkeypatch, case):
    check_builds_bitwise_equal(monkeypatch, case, BUILDS)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("defines", BUILDS[1:], ids=IDS)
def test_default_mode_matches_the_reference(monkeypatch, case, defines):
    q, k, v, kw = _case(case)
    _build(monkeypatch, defines, q, k, v, **kw)


def _mask(shape, seed, p_keep=0.7):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < p_keep).to("cuda")


def _mixed(sq, sk, block, seed):
    """A MixedMask with partial blocks (90% kept at random), one block kept whole, one dropped
    whole and a fully masked row."""
    rng = np.random.default_rng(seed)
    dense = rng.random((2, 4, sq, sk)) < 0.9
    dense[0, 1, :block[0], :block[1]] = True
    dense[1, 2, :block[0], block[1]:2 * block[1]] = False
    dense[0, 0, 5] = False
    return dm.MixedMask.from_dense_mask(dense, block)


def _mask_case(name):
    """Mask layouts whose producer reads differ (16-byte rows, a broadcast key row, bytes one by
    one, a transposed mask) and a MixedMask's partial blocks (listed bits)."""
    if name == "key_row":  # row stride 0: every row the same 16-byte vectors
        q, k, v = _qkv(2, 200, 272, 4, 2, 128, "bfloat16", seed=61)
        return q, k, v, {"seed": 62, "mask": _mask((2, 4, 1, 272), 63)}
    if name == "bytes_causal":  # Sk = 250: rows read byte by byte, keys past the end in a half
        q, k, v = _qkv(2, 130, 250, 4, 2, 64, "bfloat16", seed=64)
        return q, k, v, {"seed": 65, "mask": _mask((2, 4, 130, 250), 66), "is_causal": True}
    if name == "transposed_fp16":  # keys not contiguous
        q, k, v = _qkv(2, 130, 264, 4, 2, 128, "float16", seed=67)
        mask = _mask((2, 4, 264, 130), 68).transpose(2, 3)
        return q, k, v, {"seed": 69, "mask": mask, "window_size": (40, 40)}
    if name == "full_d64_fp16_bias":
        q, k, v = _qkv(2, 200, 400, 4, 2, 64, "float16", seed=70)
        bias = torch.randn(2, 4, 200, 400, generator=torch.Generator().manual_seed(71)).to(
            "cuda", torch.float16)
        return q, k, v, {"seed": 72, "mask": _mask((2, 4, 200, 400), 73), "bias": bias}
    if name.startswith("mixed"):  # the listed-bits specs: Sk = 700 ends inside a 16-key chunk
        block = (64, 128) if name == "mixed_64x128" else (128, 256)
        q, k, v = _qkv(2, 333, 700, 4, 2, 128, "bfloat16", seed=74)
        bias = torch.randn(2, 4, 333, 700, generator=torch.Generator().manual_seed(75)).to(
            "cuda", torch.bfloat16)
        return q, k, v, {"seed": 76, "bias": bias, "sparse_mask": _mixed(333, 700, block, 77)}
    raise ValueError(name)


MASK_CASES = ("key_row", "bytes_causal", "transposed_fp16", "full_d64_fp16_bias", "mixed_64x128",
              "mixed_128x256")


@pytest.mark.parametrize("case", MASK_CASES)
def test_mask_key_halves_equal_the_row_split_bit_for_bit(monkeypatch, case):
    """DM_SM90_BWD_MASK_HALVES forms the same mask words and flags by another transpose, so
    deterministic gradients equal the default build's bit for bit (each checked against the
    float64 reference by _build)."""
    q, k, v, kw = _mask_case(case)
    ref = _build(monkeypatch, "", q, k, v, deterministic=True, **kw)
    got = _build(monkeypatch, MASK_HALVES, q, k, v, deterministic=True, **kw)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), ref, got, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), f"{name} of the key-halves build differs"
