"""The Hopper backward (bwd_sm90) with block lists (the default; DMATTN_SM90_BWD_SPARSE=0 declines
them): its CTAs walk only the listed (query head, 64-row tile) items of their 128 keys. Against
float64 autograd with the factor-3 rule of test_backward.py: BlockBitsetMask patterns with empty
query rows and key columns (zero gradients, no NaN), sequence lengths that are not multiples of
the blocks, GQA, 64 x 128, 128 x 128 and 128 x 256 blocks, masks per (batch, head), per head and
broadcast, together with a dense attn_mask, biases with their gradients and causal/window; the
deterministic mode bitwise-stable over two runs and close to the portable kernels' result; NaN
keys in an unlisted block never reach the math. The autouse fixture asserts that every backward
of a test ran bwd_sm90 (backward.launches) and none the portable dK/dV kernel."""

from __future__ import annotations

import numpy as np
import pytest
from test_backward import _check_unlisted_blocks_never_reach_the_math, _qkv, _run_dense

import dmattn_cupy as dm
from dmattn_cupy import backward

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def hopper_sparse(monkeypatch):
    """Sets the switch; afterwards bwd_sm90 ran and bwd_dkdv ran only ``allowed`` times."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a backward runs on compute capability 9.0 only")
    monkeypatch.setenv("DMATTN_SM90_BWD_SPARSE", "1")
    monkeypatch.delenv("DMATTN_BWD_FAMILY", raising=False)
    state = {"allowed": 0}
    sm90, dkdv = backward.launches["bwd_sm90"], backward.launches["bwd_dkdv"]
    yield state
    assert backward.launches["bwd_sm90"] > sm90, "the sm_90a backward did not run"
    assert backward.launches["bwd_dkdv"] - dkdv == state["allowed"], \
        "a block-sparse backward ran the portable kernels"


def _bits(lead, sq, sk, block, seed, p_keep=0.3, empty_row=None, empty_col=None):
    """Random block pattern (lead dims + (row blocks, col blocks)) with the diagonal kept and
    optionally one block row / column no entry lists."""
    rng = np.random.default_rng(seed)
    nrb, ncb = -(-sq // block[0]), -(-sk // block[1])
    bits = rng.random((*lead, nrb, ncb)) < p_keep
    for r in range(nrb):
        bits[..., r, min(ncb - 1, r * block[0] // block[1])] = True
    if empty_row is not None:
        bits[..., empty_row, :] = False
    if empty_col is not None:
        bits[..., :, empty_col] = False
    return bits


LEADS = {"bh": (2, 4), "h": (1, 4), "shared": (1, 1)}


@pytest.mark.parametrize("lead", list(LEADS), ids=list(LEADS))
@pytest.mark.parametrize("block", [(64, 128), (128, 128), (128, 256)],
                         ids=["64x128", "128x128", "128x256"])
@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
def test_random_blocks_with_empty_rows_and_keys(d, block, lead):
    """Sq = 330, Sk = 600: ragged last blocks; a block row nobody lists (zero dQ) and a block
    column nobody lists (zero dK, dV); GQA 4 -> 2."""
    sq, sk = 330, 600
    q, k, v = _qkv(2, sq, sk, 4, 2, d, "bfloat16", seed=d + block[0])
    bits = _bits(LEADS[lead], sq, sk, block, seed=1, empty_row=1, empty_col=2)
    mask = dm.BlockBitsetMask(bits, sq, sk, block_size=block)
    dq, dk, dv, _ = _run_dense(q, k, v, seed=2, sparse_mask=mask)
    r0, r1 = block[0], min(sq, 2 * block[0])
    c0, c1 = 2 * block[1], min(sk, 3 * block[1])
    assert (dq[:, r0:r1] == 0).all()
    assert (dk[:, c0:c1] == 0).all() and (dv[:, c0:c1] == 0).all()


@pytest.mark.parametrize("h,hk", [(4, 4), (8, 1)], ids=["g1", "g8"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gqa_and_dtypes(dtype, h, hk):
    q, k, v = _qkv(1, 512, 768, h, hk, 128, dtype, seed=3 + h)
    mask = dm.BlockBitsetMask(_bits((1, h), 512, 768, (128, 128), seed=4), 512, 768,
                              block_size=(128, 128))
    _run_dense(q, k, v, seed=5, sparse_mask=mask)


MODES = {"none": {}, "causal": {"is_causal": True}, "window": {"window_size": (200, 100)}}
BIASES = {"none": None, "full": (2, 4, 300, 520), "key_row": (2, 4, 1, 520)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("bias", list(BIASES))
@pytest.mark.parametrize("with_mask", [False, True], ids=["lists", "lists+mask"])
@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
def test_with_attn_mask_bias_and_windows(d, with_mask, bias, mode):
    """The lists only filter the walk: a dense attn_mask (its words), a full or key-row bias
    with its gradient (zero outside the listed blocks) and causal/window still apply."""
    q, k, v = _qkv(2, 300, 520, 4, 2, d, "bfloat16", seed=6 + d)
    block = (64, 128)
    bits = _bits((1, 4), 300, 520, block, seed=7, p_keep=0.5)
    mask = dm.BlockBitsetMask(bits, 300, 520, block_size=block)
    g = torch.Generator().manual_seed(8)
    attn = (torch.rand(2, 1, 300, 520, generator=g) > 0.3).cuda() if with_mask else None
    b = None if BIASES[bias] is None else torch.randn(*BIASES[bias], generator=g).to(
        "cuda", torch.bfloat16)
    got = _run_dense(q, k, v, mask=attn, bias=b, seed=9, sparse_mask=mask, **MODES[mode])
    if bias == "full":
        keep = torch.from_numpy(np.array(mask.to_dense(), dtype=bool)).cuda()
        assert (got[3][~keep.expand_as(got[3])] == 0).all()


def test_nothing_listed():
    """No block listed at all: every CTA's walk is empty (the end marker alone)."""
    q, k, v = _qkv(1, 200, 300, 2, 2, 128, "bfloat16", seed=10)
    bits = np.zeros((1, 1, 4, 3), bool)
    mask = dm.BlockBitsetMask(bits, 200, 300, block_size=(64, 128))
    dq, dk, dv, _ = _run_dense(q, k, v, seed=11, sparse_mask=mask)
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


def _twice(q, k, v, **kw):
    g1 = _run_dense(q, k, v, deterministic=True, **kw)
    g2 = _run_dense(q, k, v, deterministic=True, **kw)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), g1, g2, strict=True):
        if a is not None:
            assert torch.equal(a, b), f"{name} differs between two deterministic runs"
    return g1


@pytest.mark.parametrize("mode", ["none", "causal"])
@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
def test_deterministic_bitwise_and_close_to_the_portable_kernels(d, mode, hopper_sparse,
                                                                 monkeypatch):
    """Skipped key tiles are not counted in the turn targets: every wait ends, two runs agree
    bitwise, and the gradients agree with the portable kernels' (sm80-class, the switch off)
    within the reference tolerance. Sk = 1000: eight key tiles per query tile."""
    q, k, v = _qkv(2, 330, 1000, 8, 2, d, "bfloat16", seed=12 + d)
    bits = _bits((2, 8), 330, 1000, (64, 128), seed=13, p_keep=0.35, empty_row=2)
    mask = dm.BlockBitsetMask(bits, 330, 1000, block_size=(64, 128))
    kbias = torch.randn(2, 8, 1, 1000, device="cuda", dtype=torch.bfloat16)
    kw = dict(seed=14, sparse_mask=mask, **MODES[mode])
    fast = _twice(q, k, v, bias=kbias, **kw)
    monkeypatch.setenv("DMATTN_SM90_BWD_SPARSE", "0")
    portable = _run_dense(q, k, v, bias=kbias, deterministic=True, **kw)
    hopper_sparse["allowed"] = 1
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), fast, portable, strict=True):
        err = (a.double() - b.double()).abs().max().item()
        assert err <= 3e-2 * max(1.0, b.double().abs().max().item()), (name, err)


def test_deterministic_many_ctas_sparse():
    """More CTAs than SMs (16 kv heads, 16 key tiles: 256) with ~10% of 128-blocks listed
    plus the diagonal, causal: repeatable bitwise."""
    q, k, v = _qkv(1, 2048, 2048, 16, 16, 64, "bfloat16", seed=15)
    bits = _bits((1, 16), 2048, 2048, (128, 128), seed=16, p_keep=0.1)
    mask = dm.BlockBitsetMask(bits, 2048, 2048, block_size=(128, 128))
    _twice(q, k, v, seed=17, sparse_mask=mask, is_causal=True)


def test_unlisted_blocks_never_reach_the_math():
    """NaN keys/values in a key block no row lists change nothing (test_backward's check at
    d128, here with the fixture's assertion that bwd_sm90 walked the lists)."""
    _check_unlisted_blocks_never_reach_the_math(128, seed=18)


def test_one_functional_backward_is_one_bwd_sm90_launch():
    """flash_dmattn_backward with block lists: exactly one bwd_sm90 launch, no bwd_dkdv."""
    q, k, v = _qkv(1, 256, 512, 4, 4, 128, "bfloat16", seed=19)
    mask = dm.BlockBitsetMask(_bits((1, 1), 256, 512, (128, 128), seed=20), 256, 512,
                              block_size=(128, 128))
    out, lse = dm.flash_dmattn_func(q, k, v, sparse_mask=mask, return_lse=True)
    before = dict(backward.launches)
    dq, dk, dv, _ = dm.flash_dmattn_backward(torch.randn_like(out), q, k, v, out, lse,
                                             sparse_mask=mask)
    torch.cuda.synchronize()
    assert backward.launches["bwd_sm90"] == before.get("bwd_sm90", 0) + 1
    assert backward.launches["bwd_dkdv"] == before.get("bwd_dkdv", 0)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


@pytest.mark.parametrize("h,hk", [(8, 8), (8, 2)], ids=["g1", "g4"])
def test_longest_first_order_changes_no_dk_dv_bit(monkeypatch, h, hk):
    """The default mode runs a block mask's CTAs longest first within groups of 128 (the
    bwd_order kernel's permutation; backward.order_items): against float64 (a CTA run twice
    would add its dQ twice, one never run would leave its dK/dV unwritten), and dK/dV (each
    written by one CTA, no atomics) bitwise equal to the grid order's
    (DMATTN_SM90_BWD_ORDER=0); only dQ's adds, unordered in this mode anyway, may differ. g1:
    9 key tiles x 8 kv heads x batch 2 = 144 CTAs, a whole group and a partial one."""
    from dmattn_cupy import runtime

    families: list[str] = []
    get_kernel = runtime.get_kernel
    monkeypatch.setattr(runtime, "get_kernel",
                        lambda spec, dev: families.append(spec.family) or get_kernel(spec, dev))
    sq = sk = 1101   # 9 key tiles per (kv head, batch): uneven listed counts per column
    q, k, v = _qkv(2, sq, sk, h, hk, 128, "bfloat16", seed=11 + h)
    mask = dm.BlockBitsetMask(_bits((2, h), sq, sk, (128, 128), seed=12, p_keep=0.25), sq, sk,
                              block_size=(128, 128))
    ordered = _run_dense(q, k, v, seed=13, sparse_mask=mask)
    assert "bwd_order" in families
    monkeypatch.setenv("DMATTN_SM90_BWD_ORDER", "0")
    families.clear()
    grid_order = _run_dense(q, k, v, seed=13, sparse_mask=mask)
    assert "bwd_sm90" in families and "bwd_order" not in families
    assert torch.equal(ordered[1], grid_order[1]) and torch.equal(ordered[2], grid_order[2])
