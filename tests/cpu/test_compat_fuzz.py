"""Random arguments for the flash-dmattn compat layer (dmattn_cupy.compat.flash_dmattn) on the
CPU: topk_mask, create_mask, the varlen function with padded 4-D masks/biases and the packed
functions raise ValueError/TypeError/NotImplementedError for bad input (never IndexError,
RuntimeError, ZeroDivisionError, AttributeError), and give the documented shapes otherwise."""

from __future__ import annotations

import random
import traceback
import warnings

import numpy as np
import pytest

from dmattn_cupy.compat import flash_dmattn as fc

torch = pytest.importorskip("torch")

ACCEPTED = (ValueError, TypeError, NotImplementedError)
ODD = [None, 0, -1, 1, 3, 7, 1000, 1.5, "x", True, np.int64(4), (2, 2), (64, 64), [3]]


def _outcome(fn) -> str | None:
    """None, or the traceback's end of an exception outside ACCEPTED."""
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            fn()
    except ACCEPTED:
        pass
    except Exception as e:  # noqa: BLE001  (what this looks for)
        return "".join(traceback.format_exception(e)[-2:])
    return None


def _dynamic_mask_call(seed: int):
    r, g = random.Random(seed), torch.Generator().manual_seed(seed)
    b, h, sq, sk = r.choice([1, 2]), r.choice([1, 2]), r.choice([1, 5, 70]), r.choice([1, 9, 140])
    shape = [b, h, r.choice([sq, 1]), sk]
    if r.random() < 0.2:
        shape[r.randrange(4)] = r.choice([0, 1, 3])
    if r.random() < 0.1:
        shape = shape[:r.choice([2, 3])]
    bias = torch.randn(shape, generator=g)
    if r.random() < 0.3:
        bias = bias.numpy()
    mask = r.choice([None, torch.rand(b, 1, 1, sk, generator=g) > 0.3,
                     torch.rand(b, sk, generator=g) > 0.3,
                     (torch.rand(b, sq, generator=g) > 0.3).float(), torch.ones(3, 3), "m"])
    if r.random() < 0.5:
        kw = dict(keep_window_size=r.choice(ODD), attn_mask=mask,
                  is_causal=r.choice([False, True, None, 1]),
                  seqlen_q=r.choice([None, sq, 0, -2, 3]),
                  block_size=r.choice([None, 64, (64, 64), 0, (3,), "x", 16]),
                  num_heads=r.choice([None, h, 2 * h, 3, 0]))
        return lambda: fc.topk_mask(bias, **kw)
    kw = dict(attention_mask=mask, batch_size=r.choice([b, 1, 0, 3]),
              query_len=r.choice([sq, 1, 0]), key_len=r.choice([sk, 1, 0, sk + 1]),
              window_size=r.choice(ODD), block_size=r.choice([None, 2, 64, 0, -1, "x"]),
              type=r.choice(["topk", "relu", "bogus", None]))
    return lambda: fc.create_mask(bias, **kw)


def _varlen_call(seed: int):
    r, g = random.Random(seed), torch.Generator().manual_seed(seed)
    nb = r.choice([1, 2, 3])
    lq, lk = [r.choice([0, 1, 5]) for _ in range(nb)], [r.choice([0, 1, 7]) for _ in range(nb)]
    q, k = torch.randn(sum(lq), 2, 16, generator=g), torch.randn(sum(lk), 2, 16, generator=g)
    cq = torch.tensor(np.cumsum([0] + lq), dtype=torch.int32)
    ck = torch.tensor(np.cumsum([0] + lk), dtype=torch.int32)
    shape = [r.choice([nb, 1]), r.choice([2, 1]), r.choice([max(lq), 1]),
             max(lk) + r.choice([0, 0, 2])]
    if r.random() < 0.3:
        shape[r.randrange(4)] = r.choice([0, 1, 3, 9])
    kw = dict(attn_mask=torch.rand(shape, generator=g) > 0.3 if r.random() < 0.5 else None,
              attn_bias=torch.randn(shape, generator=g) if r.random() < 0.5 else None,
              cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=r.choice([max(lq), None]),
              max_seqlen_k=r.choice([max(lk), None]))
    which = r.choice(["none", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"])
    if which.startswith("cu"):
        cu = kw[which]
        kw[which] = r.choice([cu.flip(0), cu * 2, cu[:-1], cu - 1, "x", cu.reshape(1, -1)])
    elif which.startswith("max"):
        kw[which] = r.choice([0, -1, 1.5, "x"])
    return lambda: fc.flash_dmattn_varlen_func(q, k, k, **kw)


@pytest.mark.parametrize("chunk", range(4))
def test_dynamic_mask_helpers_raise_named_errors_only(chunk):
    found = [(s, e) for s in range(chunk * 500, (chunk + 1) * 500)
             if (e := _outcome(_dynamic_mask_call(s))) is not None]
    assert not found, found[:3]


@pytest.mark.parametrize("chunk", range(2))
def test_padded_varlen_raises_named_errors_only(chunk):
    found = [(s, e) for s in range(chunk * 500, (chunk + 1) * 500)
             if (e := _outcome(_varlen_call(s))) is not None]
    assert not found, found[:3]


@pytest.mark.parametrize("call, error", [
    (lambda: fc.topk_mask(torch.zeros(1, 1, 4, 8), 2, block_size=0), "block_size must be"),
    (lambda: fc.topk_mask(torch.zeros(1, 1, 4, 8), 2, seqlen_q=-2), "seqlen_q must be"),
    (lambda: fc.topk_mask(torch.zeros(1, 1, 4, 8), 2, seqlen_q=3), "seqlen_q=3 needs"),
    (lambda: fc.topk_mask(torch.zeros(1, 2, 4, 8), 2, num_heads=3), "num_heads"),
    (lambda: fc.topk_mask(torch.zeros(1, 1, 4, 8), 2, attn_mask=torch.ones(3, 3)), "attn_mask"),
    (lambda: fc.topk_mask("bias", 2), "attn_bias must be"),
    (lambda: fc.create_mask(torch.zeros(1, 1, 4, 8), torch.ones(1, 8), 3, 4, 8, 2),
     "batch_size"),
    (lambda: fc.create_mask(torch.zeros(1, 1, 4, 8), "m", 1, 4, 8, 2), "attention_mask"),
    (lambda: fc.create_mask(torch.zeros(1, 1, 4, 8), None, 1, 4, 8, 2, block_size=0),
     "block_size"),
    (lambda: fc.flash_dmattn_varlen_func(
        torch.zeros(5, 2, 16), torch.zeros(7, 2, 16), torch.zeros(7, 2, 16),
        attn_bias=torch.zeros(1, 2, 5, 7), cu_seqlens_q=torch.tensor([0, 5, 0]),
        cu_seqlens_k=torch.tensor([0, 7, 7])), "cu_seqlens_q must be"),
    (lambda: fc.flash_dmattn_varlen_func(
        torch.zeros(5, 2, 16), torch.zeros(7, 2, 16), torch.zeros(7, 2, 16),
        attn_mask=torch.ones(1, 2, 3, 7, dtype=torch.bool), cu_seqlens_q=torch.tensor([0, 5]),
        cu_seqlens_k=torch.tensor([0, 7])), "Sq >= the longest"),
    (lambda: fc.flash_dmattn_qkvpacked_func(torch.zeros(1, 4, 2, 2, 16)), "qkv must be"),
    (lambda: fc.flash_dmattn_kvpacked_func(torch.zeros(1, 4, 2, 16), "kv"), "kv must be"),
])
def test_bad_compat_arguments_are_named(call, error):
    with pytest.raises((ValueError, TypeError), match=error):
        call()


def test_valid_helper_calls_keep_their_shapes():
    bias = torch.randn(2, 2, 1, 140)
    assert fc.topk_mask(bias, 16, is_causal=True, seqlen_q=70).shape == (2, 2, 70, 140)
    blocks = fc.topk_mask(bias, 16, seqlen_q=70, block_size=64, num_heads=4)
    assert blocks.to_dense().shape == (2, 4, 70, 140)
    assert fc.create_mask(torch.randn(2, 2, 5, 9), torch.rand(2, 5) > 0.3, 2, 5, 9, 3).shape \
        == (2, 2, 5, 9)
