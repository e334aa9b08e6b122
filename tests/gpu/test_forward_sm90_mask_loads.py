"""DM_SM90_MB_LOADS=1, an A/B build of the Hopper forward: a bool mask beside a full bias runs on
the bias spec's 128-key tiles, each consumer thread loading its two rows' mask bytes (fwd.cu:
Sm90FwdSmem::kMaskLoads). Against the float64 reference with FlashAttention's rule: every
dense mask layout the loads read (full, broadcast over batch or heads or both, GQA's kv heads,
one key row, per query row, an expanded view, rows padded past Sk), causal/window/softcap,
d64/d128 (and d96 padded), fp16/bf16, partial last query and key tiles, fully masked rows; the
non-finite cases of test_forward_sm90_mask_bias_values (NaN/inf at masked positions dropped,
NaN rows where the reference has them); the spec asserted per case (128-key tile, mask and
bias). A mask the loads cannot read as it is (rows of Sk % 16 != 0 bytes, keys not contiguous)
is copied into 16-byte rows first (forward.operands_to_pad), and still matches."""

from __future__ import annotations

import pytest
from test_forward_sm90 import _check, _qkv
from test_forward_sm90_mask_bias_values import (
    test_non_finite_values_follow_the_reference as _non_finite,
)

from dmattn_cupy.forward import (
    collapsed_broadcasts,
    operands_to_pad,
    padded_problem,
    select_fwd_spec,
)
from dmattn_cupy.validate import check_dense

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("hopper_only")]

LOADS = "DM_SM90_MB_LOADS=1"


@pytest.fixture(autouse=True)
def loads_build(monkeypatch):
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", LOADS)


def _spec(q, k, v, mask, bias, **kw):
    """The spec forward_call launches: on the problem with its broadcasts collapsed and the
    rows it pads (a mask row of Sk % 16 != 0 bytes) described as padded."""
    pb = check_dense(q, k, v, mask, bias, kw.get("softmax_scale"), kw.get("is_causal", False),
                     kw.get("window_size", (-1, -1)), kw.get("softcap", 0.0), "cuda")
    pb = collapsed_broadcasts(pb)
    return select_fwd_spec(padded_problem(pb, operands_to_pad(pb)))


def _assert_loads_spec(q, k, v, mask, bias, **kw):
    spec = _spec(q, k, v, mask, bias, **kw)
    assert spec.family == "fwd_sm90" and spec.block_n == 128, spec.id
    assert spec.has_mask and spec.has_bias, spec.id


B, H, HK, SQ, SK = 2, 4, 2, 300, 400   # 3 query tiles (the last partial), 4 key tiles (partial)
MASKS = {"full": (B, H, SQ, SK), "b1": (1, H, SQ, SK), "h1": (B, 1, SQ, SK),
         "hk": (B, HK, SQ, SK), "key_row": (B, H, 1, SK), "kside_111": (1, 1, 1, SK),
         "query_row": (B, H, SQ, 1)}


def _mask(shape, seed, p_keep=0.7):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < p_keep).cuda()


def _bias(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to("cuda", getattr(torch, dtype))


@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("pattern", list(MASKS), ids=list(MASKS))
def test_every_mask_layout(pattern, d):
    q, k, v = _qkv(B, SQ, SK, H, HK, d, seed=d + len(pattern))
    mask, bias = _mask(MASKS[pattern], 1), _bias((B, H, SQ, SK), "bfloat16", 2)
    if MASKS[pattern][2] > 1:
        mask[0, 0, 7] = False                                # a fully masked row
    _assert_loads_spec(q, k, v, mask, bias)
    _check(q, k, v, mask, bias)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kw", [{"is_causal": True}, {"window_size": (100, 30)},
                                {"softcap": 20.0}, {"softmax_scale": 0.3}],
                         ids=["causal", "window", "softcap", "scale"])
def test_modes(dtype, kw):
    q, k, v = _qkv(B, SQ, SK, H, HK, 128, dtype, seed=11)
    mask, bias = _mask((B, H, SQ, SK), 3), _bias((B, H, SQ, SK), dtype, 4)
    mask[1, 2, 40] = False                                   # a fully masked row
    _assert_loads_spec(q, k, v, mask, bias, **kw)
    _check(q, k, v, mask, bias, **kw)


@pytest.mark.parametrize("sq,sk", [(2, 16), (128, 128), (129, 272), (333, 1000), (64, 2048)])
def test_tile_edges(sq, sk):
    """Query and key counts on and off the 128-row / 128-key tiles (Sk % 32 != 0: a thread's
    second 16-byte load lies past the last key)."""
    q, k, v = _qkv(1, sq, sk, 2, 2, 128, seed=sq + sk)
    mask, bias = _mask((1, 2, sq, sk), 5, 0.5), _bias((1, 2, sq, sk), "bfloat16", 6)
    _assert_loads_spec(q, k, v, mask, bias)
    _check(q, k, v, mask, bias, family=None)   # (Sk 1000: the spec of the padded rows)


@pytest.mark.parametrize("mask_shape", [(B, H, SQ, SK), (B, H, 1, SK)], ids=["full", "key_row"])
@pytest.mark.parametrize("bias_shape", [(B, H, 1, SK), (1, HK, 1, SK)], ids=["bh1k", "hk_kside"])
def test_key_based_bias_beside_the_mask(mask_shape, bias_shape):
    """A key row bias (TMA'd into the spec's bias stage as one row) beside a loaded mask."""
    q, k, v = _qkv(B, SQ, SK, H, HK, 128, seed=41)
    mask, bias = _mask(mask_shape, 42), _bias(bias_shape, "bfloat16", 43)
    _assert_loads_spec(q, k, v, mask, bias)
    _check(q, k, v, mask, bias)


def test_expanded_and_padded_masks():
    """An expanded view (stride 0 over batch and heads) and a slice of a wider mask (rows
    padded past Sk: the last load of a row reads the padding)."""
    q, k, v = _qkv(B, SQ, 264, H, HK, 128, seed=21)
    bias = _bias((B, H, SQ, 264), "bfloat16", 22)
    expanded = _mask((1, 1, SQ, 264), 23).expand(B, H, SQ, 264)
    _assert_loads_spec(q, k, v, expanded, bias)
    _check(q, k, v, expanded, bias, family=None)   # (rows of 264 bytes: padded first)
    wide = _mask((B, H, SQ, 320), 24)[..., :264]
    _assert_loads_spec(q, k, v, wide, bias)
    _check(q, k, v, wide, bias)


def test_masks_the_loads_cannot_read_still_match():
    """Rows of 250 bytes are padded into 256-byte rows first (then the loads read them); so is
    a transposed mask (keys not contiguous: copied element by element, arrays.padded_copy)."""
    q, k, v = _qkv(B, 130, 250, H, HK, 128, seed=31)
    mask, bias = _mask((B, H, 130, 250), 32), _bias((B, H, 130, 250), "bfloat16", 33)
    _assert_loads_spec(q, k, v, mask, bias)
    _check(q, k, v, mask, bias, family=None)
    tr = _mask((B, H, 250, 130), 34).transpose(2, 3)
    _assert_loads_spec(q, k, v, tr, bias)
    _check(q, k, v, tr, bias, family=None)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("softcap", [0.0, 15.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("full_tiles", [False, True], ids=["partial", "full_tiles"])
def test_non_finite_values_under_the_loads(dtype, d, softcap, full_tiles):
    """NaN/inf handling equals the mask path's (the mask applied after the bias: a NaN at a
    masked key is dropped, at a kept one it propagates)."""
    _non_finite(dtype, d, softcap, full_tiles)
