"""The Hopper backward (bwd_sm90) with bool masks and in deterministic mode, against float64
autograd with the factor-3 rule of test_backward.py: every mask broadcast it takes (its
producer reads the mask through its strides: 16-byte row loads, or bytes for odd lengths,
strided and transposed masks), mask + bias with the bias gradient, causal/window + mask, GQA
groups 1/4, fully masked rows and keys (zero gradients, no NaN), tiles the mask drops entirely
(skipped without products), and the deterministic mode: bitwise-equal gradients over two runs,
each checked against the reference, with causal and sliding windows over several key tiles.
The autouse fixture asserts that the sm_90a family ran."""

from __future__ import annotations

import numpy as np
import pytest
from test_backward import _qkv, _run_dense
from test_backward_sm90 import _hopper_backward  # noqa: F401  (autouse: bwd_sm90 must run)

import dmattn_cupy as dm

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


MODES = {"none": {}, "causal": {"is_causal": True}, "window": {"window_size": (70, 30)}}
B, H, HK, SQ, SK = 2, 4, 2, 200, 272  # Sk: 16-byte mask rows (the vector path), 3 key tiles


def _mask(shape, seed, p_keep=0.7):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) < p_keep).to("cuda")


MASKS = {"full": (B, H, SQ, SK), "key_row": (B, H, 1, SK), "batch1": (1, H, SQ, SK),
         "head1": (B, 1, SQ, SK), "kv_heads": (B, HK, SQ, SK), "query_row": (B, H, SQ, 1),
         "keys_only": (1, 1, 1, SK)}


@pytest.mark.parametrize("shape", list(MASKS), ids=list(MASKS))
@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
def test_mask_layouts(d, shape):
    q, k, v = _qkv(B, SQ, SK, H, HK, d, "bfloat16", seed=d + len(shape))
    _run_dense(q, k, v, mask=_mask(MASKS[shape], seed=1), seed=2)


def test_mask_read_byte_by_byte():
    """Layouts the producer cannot read by 16-byte vectors: Sk = 250 (rows not 16-byte
    multiples), a slice of a wider mask (Sk = 264 of 320-byte rows: a row's last vector would
    pass len_k) and a transposed one (keys not contiguous)."""
    q, k, v = _qkv(B, 130, 250, H, HK, 64, "bfloat16", seed=3)
    _run_dense(q, k, v, mask=_mask((B, H, 130, 250), seed=4), seed=5, is_causal=True)
    q, k, v = _qkv(B, 130, 264, H, HK, 128, "float16", seed=6)
    wide = _mask((B, H, 130, 320), seed=7)
    _run_dense(q, k, v, mask=wide[..., :264], seed=8)
    tr = _mask((B, H, 264, 130), seed=9).transpose(2, 3)
    _run_dense(q, k, v, mask=tr, seed=10, window_size=(40, 40))


def test_mostly_true_mask_takes_the_unmasked_path_where_it_may():
    """A mask false in one corner only: most tiles have all-true words (the consumers' fast
    path) next to partial ones; a key-row mask false on one key of the last tile."""
    q, k, v = _qkv(B, SQ, SK, H, HK, 128, "bfloat16", seed=11)
    mask = torch.ones(B, H, SQ, SK, dtype=torch.bool, device="cuda")
    mask[:, :, 70:90, 140:150] = False
    _run_dense(q, k, v, mask=mask, seed=12)
    row = torch.ones(B, H, 1, SK, dtype=torch.bool, device="cuda")
    row[..., 260] = False
    _run_dense(q, k, v, mask=row, seed=13, is_causal=True)


BIASES = {"full": (B, H, SQ, SK), "key_row": (B, H, 1, SK)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("h,hk", [(4, 4), (4, 1)], ids=["g1", "g4"])
@pytest.mark.parametrize("bias_shape", list(BIASES), ids=list(BIASES))
@pytest.mark.parametrize("mask_shape", ["full", "key_row"])
@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
def test_mask_and_bias_grad(d, mask_shape, bias_shape, h, hk, mode):
    """dbias is dx = P (dP - dsum): zero where the mask drops an element."""
    q, k, v = _qkv(B, SQ, SK, h, hk, d, "bfloat16", seed=14 + d + h + hk)
    mshape = (B, h) + MASKS[mask_shape][2:]
    bshape = (B, h) + BIASES[bias_shape][2:]
    bias = torch.randn(*bshape, generator=torch.Generator().manual_seed(15)).to(
        "cuda", torch.bfloat16)
    mask = _mask(mshape, seed=16)
    got = _run_dense(q, k, v, mask=mask, bias=bias, seed=17, **MODES[mode])
    if bias_shape == "full" and mask_shape == "full":
        assert (got[3][~mask] == 0).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
def test_fully_masked_rows_and_keys(d, dtype):
    """Rows the mask drops entirely (lse -inf) get zero dQ and zero dbias, keys it drops for
    every row zero dK/dV; no NaN anywhere (_run_dense checks finiteness)."""
    q, k, v = _qkv(B, SQ, SK, H, HK, d, dtype, seed=18)
    mask = _mask((B, H, SQ, SK), seed=19)
    mask[:, :, ::7] = False          # whole rows
    mask[:, :, :, 100:140] = False   # whole keys (across a tile boundary)
    mask[1] = False                  # a whole batch
    bias = torch.randn(B, H, SQ, SK, device="cuda", dtype=getattr(torch, dtype))
    dq, dk, dv, db = _run_dense(q, k, v, mask=mask, bias=bias, seed=20, is_causal=True)
    assert (dq[:, ::7] == 0).all() and (db[:, :, ::7] == 0).all()
    assert (dk[:, 100:140] == 0).all() and (dv[:, 100:140] == 0).all()
    assert (dq[1] == 0).all() and (dk[1] == 0).all() and (db[1] == 0).all()


def _twice(q, k, v, **kw):
    """Two deterministic runs, each against the reference; their gradients bitwise equal."""
    g1 = _run_dense(q, k, v, deterministic=True, **kw)
    g2 = _run_dense(q, k, v, deterministic=True, **kw)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), g1, g2, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), f"{name} differs between two deterministic runs"
    return g1


DET_MODES = {"none": {}, "causal": {"is_causal": True}, "window": {"window_size": (150, 100)},
             "left_window": {"window_size": (200, -1)}}


@pytest.mark.parametrize("mode", list(DET_MODES))
@pytest.mark.parametrize("h,hk", [(4, 4), (8, 2)], ids=["g1", "g4"])
@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
def test_deterministic_bitwise_and_correct(d, h, hk, mode):
    """Sk = 600: five key tiles add into every query tile's dQ in turn (a left window starts
    the turns of later query tiles at later key tiles); Sq = 330, six query tiles."""
    q, k, v = _qkv(2, 330, 600, h, hk, d, "bfloat16", seed=21 + d + h)
    _twice(q, k, v, seed=22, **DET_MODES[mode])


@pytest.mark.parametrize("mode", ["none", "causal"])
@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
def test_deterministic_with_mask_and_bias(d, mode):
    q, k, v = _qkv(2, 330, 608, 8, 2, d, "float16", seed=23 + d)
    bias = torch.randn(2, 8, 330, 608, device="cuda", dtype=torch.float16)
    mask = _mask((2, 8, 330, 608), seed=24)
    mask[:, :, 5::9] = False
    _twice(q, k, v, mask=mask, bias=bias, seed=25, **DET_MODES[mode])
    kbias = torch.randn(2, 8, 1, 608, device="cuda", dtype=torch.float16)
    _twice(q, k, v, mask=_mask((2, 1, 1, 608), seed=26), bias=kbias, seed=27,
           **DET_MODES[mode])


def test_deterministic_causal_rows_that_see_nothing():
    """Causal with Sq > Sk: key tiles skip the first query tiles entirely (their turns start
    at key tile 0 of the tiles they do see) and the first Sq - Sk rows get zero dQ."""
    q, k, v = _qkv(1, 700, 300, 4, 1, 128, "bfloat16", seed=28)
    dq = _twice(q, k, v, seed=29, is_causal=True)[0]
    assert (dq[:, :400] == 0).all()


def test_deterministic_many_ctas():
    """More CTAs than SMs hold (B=4, 16 kv heads, 8 key tiles: 512) under causal remapping:
    the tickets keep every wait finite; repeatable bitwise."""
    q, k, v = _qkv(4, 1024, 1024, 16, 16, 64, "bfloat16", seed=30)
    _twice(q, k, v, seed=31, is_causal=True)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "det"])
@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
def test_tiles_the_mask_drops_entirely(d, deterministic):
    """Whole 64-row x 128-key tiles false (the consumers release them without products) next
    to kept ones: a full bias (its dbias stays zero there), a key-row bias whose heads' last
    items are all skipped (their column sums are still written), and the deterministic mode
    (skipped items still take their turns, or later key tiles would wait forever)."""
    q, k, v = _qkv(2, 256, 512, 4, 2, d, "bfloat16", seed=32 + d)
    mask = _mask((2, 4, 256, 512), seed=33)
    mask[:, :, 0:64, 128:256] = False   # one tile of every head
    mask[:, :, 192:256] = False         # the last query tile: every head's last item
    mask[:, 1, :, 384:512] = False      # head 1's whole last key tile (head 0 keeps it)
    bias = torch.randn(2, 4, 256, 512, device="cuda", dtype=torch.bfloat16)
    run = _twice if deterministic else _run_dense
    got = run(q, k, v, mask=mask, bias=bias, seed=34)
    assert (got[3][:, :, 192:256] == 0).all() and (got[3][:, 1, :, 384:512] == 0).all()
    assert (got[0][:, 192:256] == 0).all()
    kbias = torch.randn(2, 4, 1, 512, device="cuda", dtype=torch.bfloat16)
    run(q, k, v, mask=mask, bias=kbias, seed=35, is_causal=True)


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
def test_every_mask_read_in_deterministic_mode(case):
    """The mask warps' reads of each layout (16-byte rows, a broadcast key row, bytes one by
    one with keys past the end in a 16-key chunk, a transposed mask, fp16 at d64 beside a bias,
    a MixedMask's partial blocks): two deterministic runs bitwise equal, each against the
    reference."""
    q, k, v, kw = _mask_case(case)
    _twice(q, k, v, **kw)
