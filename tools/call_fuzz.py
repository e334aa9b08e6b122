"""Random calls of the public API: well-formed ones for a GPU, malformed ones for a stubbed one.

    PYTHONPATH=$PWD DMATTN_CHECK=1 python tools/call_fuzz.py [--cases N] [--seed S]

``good_case(seed, device)`` is a random valid call of ``flash_dmattn_func``,
``flash_dmattn_varlen_func`` or ``flash_dmattn_with_kvcache``: dtypes, head dims from 8 to 256,
GQA, lengths around the tile edges, mask/bias in every broadcast layout (expanded views
included), permuted or misaligned q/k/v, causal, window, softcap, scale, parametric and block
sparse masks, varlen layouts, paged caches with appends. tests/gpu/test_random_calls.py checks
each one against the float64 reference.

``bad_case(seed, device)`` bends such a call (small sizes; CPU tensors by default) by 0-3
random mutations: a size, a dimension, a dtype, strides, an option, an argument replaced; or
builds a mask object from random arguments. ``outcome`` runs it; run under
``host_profile.stub_gpu`` the kernels never launch, so what is checked is the host side: only a
result, ``ValueError``, ``TypeError`` or ``NotImplementedError`` may come out (API.md), and the
cuda and reference backends must agree on what they accept (``disagreement``), except where
API.md lets the cuda backend ask for more. Device-side values (cu_seqlens, cache_seqlens, block
tables) are checked by the cuda backend only under ``DMATTN_CHECK=1``, so run the malformed
cases under it. The command line runs N malformed cases and prints every finding;
``--show-good SEED`` describes ``good_case(SEED)``.
"""

from __future__ import annotations

import argparse
import random
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tools"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import dmattn_cupy as dm  # noqa: E402

ACCEPTED_ERRORS = (ValueError, TypeError, NotImplementedError)
# What the cuda backend may refuse where the reference accepts (API.md: dtypes, unit head-dim
# stride, written-in-place cache rows, mask blocks against the kernel tile, FA's block tables).
CUDA_ONLY_LIMITS = ("on the cuda backend", "stride 1 in its last", "16-byte aligned",
                    "must be a multiple of the kernel tile", "must share one dtype",
                    "must be the cache's", "stride 1 over pages",
                    "page stride that is a multiple of 4 bytes", "needs GPU arrays")
HALF = (torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32,
              torch.int64, torch.bool, torch.uint8)
ODD_VALUES = (None, 0, -1, 1.5, float("nan"), float("inf"), "x", (1, 2), [3], np.float32(0.5),
              np.bool_(True), 2 ** 40, 1e-50, True)


@dataclass(frozen=True)
class Sizes:
    seq: tuple[int, ...]        # dense Sq / Sk
    lens: tuple[int, ...]       # varlen sequence lengths
    dims: tuple[int, ...]       # head dims
    cache: tuple[int, ...]      # unpaged cache capacities


GPU_SIZES = Sizes(seq=(1, 2, 7, 33, 63, 64, 65, 127, 128, 129, 200, 257),
                  lens=(0, 1, 5, 63, 64, 65, 130, 200),
                  dims=(8, 16, 40, 64, 64, 72, 96, 128, 128, 136, 192, 200, 256),
                  cache=(16, 100, 256, 300))
CPU_SIZES = Sizes(seq=(1, 5, 17, 40), lens=(0, 1, 6, 20), dims=(8, 16, 64, 72),
                  cache=(16, 40, 64))


@dataclass
class Case:
    api: str                    # "dense", "varlen", "kv", "bwd", "vbwd", "grad", "masks"
    kwargs: dict[str, Any]
    steps: list[str] = field(default_factory=list)   # the mutations applied
    device: str = "cpu"


def _rand(g: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, dev: str,
          density: float = 0.7) -> torch.Tensor:
    if dtype == torch.bool:
        return (torch.rand(shape, generator=g) < density).to(dev)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dev, dtype)
    return torch.randint(0, 3, shape, generator=g).to(dev, dtype)


def _laid_out(r: random.Random, g: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype,
              dev: str, misalign: bool = True) -> torch.Tensor:
    """A random array of ``shape`` in a random layout with a unit last stride: contiguous,
    non-last axes permuted in memory, rows padded, or (``misalign``) one element off."""
    how = r.choice(["c", "c", "perm", "pad"] + (["offset"] if misalign else []))
    if how == "perm" and len(shape) >= 3:
        perm = list(range(len(shape) - 1))
        r.shuffle(perm)
        y = _rand(g, tuple(shape[p] for p in perm) + shape[-1:], dtype, dev)
        return y.permute(*np.argsort(perm).tolist(), len(shape) - 1)
    if how == "pad":
        return _rand(g, shape[:-1] + (shape[-1] + 8,), dtype, dev)[..., :shape[-1]]
    if how == "offset":
        n = int(np.prod(shape))
        return _rand(g, (n + 1,), dtype, dev)[1:].view(shape)
    return _rand(g, shape, dtype, dev)


def _broadcast(r: random.Random, g: torch.Generator, full: tuple[int, ...],
               choices: list[tuple[int, ...]], dtype: torch.dtype, dev: str) -> torch.Tensor:
    """A mask/bias of one of the shapes each dim allows (``choices[i]``), sometimes as an
    expanded (stride-0) view of the full shape; a bias sometimes with -inf entries."""
    shape = tuple(r.choice(c) for c in choices)
    density = r.choice([0.05, 0.5, 0.9, 1.0])
    x = _rand(g, shape, dtype, dev, density)
    if dtype.is_floating_point and r.random() < 0.15:   # -inf entries exclude their keys
        x = x.masked_fill((torch.rand(shape, generator=g) < 0.25).to(dev), float("-inf"))
    if r.random() < 0.25 and shape != full:
        return x.expand(tuple(f if s == 1 else s for s, f in zip(shape, full, strict=True)))
    return x


def _flags(r: random.Random, kw: dict[str, Any], grad_ok: bool) -> None:
    if r.random() < 0.3:
        kw["is_causal"] = True
    if r.random() < 0.2:
        kw["window_size"] = (r.choice([-1, 0, 3, 17, 64]), r.choice([-1, 0, 5, 40]))
    if r.random() < 0.2:
        kw["softcap"] = r.choice([5.0, 30.0])
    if r.random() < 0.2:
        kw["softmax_scale"] = r.choice([0.05, 0.1, 0.3])
    if r.random() < 0.5:
        kw["return_lse"] = True
    if grad_ok and r.random() < 0.2:
        kw["deterministic"] = True


def _block_dense(r: random.Random, g: torch.Generator, sq: int, sk: int, dev: str
                 ) -> torch.Tensor:
    """A (sq, sk) pattern of empty, full and partial 128 x 128 blocks."""
    nb = (-(-sq // 128), -(-sk // 128))
    cls = torch.randint(0, 3, nb, generator=g)
    fine = torch.rand(sq, sk, generator=g) < 0.5
    up = cls.repeat_interleave(128, 0).repeat_interleave(128, 1)[:sq, :sk]
    return ((up == 2) | ((up == 1) & fine)).to(dev)


def _sparse(r: random.Random, g: torch.Generator, sq: int, sk: int, dev: str) -> Any:
    kind = r.choice(["causal", "window", "causal_window", "bitset", "mixed", "and"])
    if kind == "causal":
        return dm.CausalMask(sq, sk)
    if kind == "window":
        return dm.WindowMask(r.choice([1, 16, (30, 2), (0, 70)]), sq, sk)
    if kind == "causal_window":
        return dm.CausalWindowMask(r.choice([1, 33, 200]), sq, sk)
    dense = _block_dense(r, g, sq, sk, dev)
    if kind == "bitset":
        return dm.BlockBitsetMask.from_dense_mask(dense, block_size=(128, 128))
    mixed = dm.MixedMask.from_dense_mask(dense, block_size=(128, 128))
    return mixed if kind == "mixed" else dm.CausalMask(sq, sk) & mixed


def _peaky(r: random.Random, kw: dict[str, Any]) -> None:
    """Sometimes a query 8x larger (in place, keeping its layout): logits far apart, so the
    online softmax rescales often and most probabilities round to 0."""
    if r.random() < 0.1:
        kw["query"].mul_(8)


def _dense(r: random.Random, g: torch.Generator, dev: str, sz: Sizes) -> dict[str, Any]:
    b, hk = r.choice([1, 2]), r.choice([1, 2])
    h = hk * r.choice([1, 2, 3])
    sq = r.choice((1, 2, 4)) if r.random() < 0.25 else r.choice(sz.seq)
    sk, d, dt = r.choice(sz.seq), r.choice(sz.dims), r.choice(HALF)
    kw: dict[str, Any] = {"query": _laid_out(r, g, (b, sq, h, d), dt, dev),
                          "key": _laid_out(r, g, (b, sk, hk, d), dt, dev),
                          "value": _laid_out(r, g, (b, sk, hk, d), dt, dev)}
    dims = [[b, 1], [h, hk, 1], [sq, 1], [sk, 1]]
    if r.random() < 0.4:
        kw["attn_mask"] = _broadcast(r, g, (b, h, sq, sk), dims, torch.bool, dev)
    if r.random() < 0.5:
        kw["attn_bias"] = _broadcast(r, g, (b, h, sq, sk), dims, r.choice([dt, torch.float32]),
                                     dev)
    _flags(r, kw, True)
    if r.random() < 0.2:   # (past d192 a block mask beside attn_mask is ANDed into it)
        kw["sparse_mask"] = _sparse(r, g, sq, sk, dev)
    _peaky(r, kw)
    return kw


def _varlen(r: random.Random, g: torch.Generator, dev: str, sz: Sizes) -> dict[str, Any]:
    nb = r.choice([1, 2, 3, 4])
    lq = [r.choice(sz.lens) for _ in range(nb)]
    lk = [r.choice(sz.lens) for _ in range(nb)]
    if r.random() < 0.25:
        lq = [r.choice([0, 1, 1, 2]) for _ in range(nb)]   # decode-shaped
    hk = r.choice([1, 2])
    h = hk * r.choice([1, 2, 3])
    d, dt = r.choice(sz.dims), r.choice(HALF)
    tq, tk = sum(lq), sum(lk)
    mq, mk = max(lq), max(lk) + r.choice([0, 0, 3])   # max_seqlen may exceed the longest
    kw: dict[str, Any] = {
        "query": _laid_out(r, g, (tq, h, d), dt, dev), "key": _laid_out(r, g, (tk, hk, d), dt, dev),
        "value": _laid_out(r, g, (tk, hk, d), dt, dev),
        "cu_seqlens_q": torch.tensor(np.cumsum([0] + lq), dtype=torch.int32, device=dev),
        "cu_seqlens_k": torch.tensor(np.cumsum([0] + lk), dtype=torch.int32, device=dev),
        "max_seqlen_q": mq, "max_seqlen_k": mk}
    for name, dtn in (("attn_mask", torch.bool), ("attn_bias", r.choice([dt, torch.float32]))):
        if r.random() < 0.5:
            if r.random() < 0.5:   # key-based
                kw[name] = _broadcast(r, g, (tk, h), [[tk], [h, hk, 1]], dtn, dev)
            else:                  # query-based
                kw[name] = _broadcast(r, g, (tq, h, mk), [[tq], [h, hk, 1], [mk]], dtn, dev)
    _flags(r, kw, True)
    _peaky(r, kw)
    return kw


def _kv(r: random.Random, g: torch.Generator, dev: str, sz: Sizes) -> dict[str, Any]:
    b, hk = r.choice([1, 2, 3]), r.choice([1, 2])
    h = hk * r.choice([1, 2, 4])
    d, dt, sq = r.choice(sz.dims), r.choice(HALF), r.choice([1, 1, 2, 5])
    kw: dict[str, Any] = {"query": _laid_out(r, g, (b, sq, h, d), dt, dev)}
    paged = r.random() < 0.5
    if paged:
        ps, maxp = r.choice([16, 32, 64]), r.choice([1, 2, 3])
        npages = b * maxp + r.choice([0, 2])
        kw["k_cache"] = _rand(g, (npages, ps, hk, d), dt, dev)
        kw["v_cache"] = _rand(g, (npages, ps, hk, d), dt, dev)
        perm = torch.randperm(npages, generator=g)[:b * maxp]
        kw["block_table"] = perm.reshape(b, maxp).to(dev, torch.int32)
        smax = ps * maxp
    else:
        smax = r.choice(sz.cache)
        kw["k_cache"] = _laid_out(r, g, (b, smax, hk, d), dt, dev, misalign=False)
        kw["v_cache"] = _laid_out(r, g, (b, smax, hk, d), dt, dev, misalign=False)
    s_new = r.choice([0, 0, 1, 3])
    if s_new:
        kw["k"] = _laid_out(r, g, (b, s_new, hk, d), dt, dev)
        kw["v"] = _laid_out(r, g, (b, s_new, hk, d), dt, dev)
    lens = [r.randint(0, smax - s_new) for _ in range(b)]
    kw["cache_seqlens"] = r.choice([torch.tensor(lens, dtype=torch.int32, device=dev),
                                    min(lens)])
    first = tuple(kw["k_cache"].shape[:2])
    for name, dtn in (("attn_mask", torch.bool), ("attn_bias", r.choice([dt, torch.float32]))):
        if r.random() < 0.4:
            dims = [[first[0]] if paged else [b, 1], [first[1]], [h, hk, 1]]
            kw[name] = _broadcast(r, g, first + (h,), dims, dtn, dev)
    _flags(r, kw, False)
    if r.random() < 0.3:
        kw["num_splits"] = r.choice([0, 1, 2, 5])
    _peaky(r, kw)
    return kw


GOOD = {"dense": _dense, "varlen": _varlen, "kv": _kv}


def good_case(seed: int, device: str = "cuda", sizes: Sizes = GPU_SIZES,
              apis: tuple[str, ...] = ("dense", "dense", "varlen", "kv")) -> Case:
    """A random valid call (see the module docstring); the same seed gives the same call."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    api = r.choice(apis)
    return Case(api, GOOD[api](r, g, device, sizes))


# ----------------------------------------------------------------------------- malformed calls


def _mutate(r: random.Random, g: torch.Generator, case: Case) -> str:
    c = case.kwargs
    tensors = [k for k, v in c.items() if isinstance(v, torch.Tensor)]
    kind = r.choice(["size", "ndim", "dtype", "stride", "option", "option", "replace", "none"])
    if kind in ("size", "ndim", "dtype", "stride", "replace") and not tensors:
        kind = "option"
    if kind == "none":
        return "none"
    if kind == "option":
        return _mutate_option(r, g, case)
    n = r.choice(tensors)
    x = c[n]
    if kind == "size" and x.dim():
        ax = r.randrange(x.dim())
        shape = list(x.shape)
        shape[ax] = r.choice([0, 1, 2, 3, 5, 7, 8, 9, 12, 16, 33, 264])
        c[n] = _rand(g, tuple(shape), x.dtype, case.device)
        return f"{n}.shape[{ax}] = {shape[ax]}"
    if kind == "ndim":
        if r.random() < 0.5 or x.dim() == 0:
            c[n] = x.unsqueeze(r.randrange(x.dim() + 1))
            return f"{n} unsqueezed"
        ax = r.randrange(x.dim())
        c[n] = _rand(g, tuple(x.shape[:ax]) + tuple(x.shape[ax + 1:]), x.dtype, case.device)
        return f"{n} without dim {ax}"
    if kind == "dtype":
        dt = r.choice(ALL_DTYPES)
        c[n] = x != 0 if dt == torch.bool else x.to(dt)
        return f"{n}.dtype = {dt}"
    if kind == "stride" and x.dim():
        how = r.choice(["last2", "offset", "expand", "perm"])
        if how == "last2":
            wide = tuple(x.shape[:-1]) + (2 * x.shape[-1],)
            c[n] = _rand(g, wide, x.dtype, case.device)[..., ::2]
        elif how == "offset":
            c[n] = _rand(g, (x.numel() + 1,), x.dtype, case.device)[1:].view(x.shape)
        elif how == "expand":
            ax = r.randrange(x.dim())
            c[n] = x.narrow(ax, 0, min(1, x.shape[ax])).expand(x.shape) if x.shape[ax] else x
        else:
            c[n] = _laid_out(r, g, tuple(x.shape), x.dtype, case.device)
        return f"{n} strides: {how}"
    c[n] = r.choice([None, [1, 2], 3, "s", object(),
                     x.float().cpu().numpy() if x.is_floating_point() else x.cpu().numpy()])
    return f"{n} replaced by {type(c[n]).__name__}"


def _mutate_option(r: random.Random, g: torch.Generator, case: Case) -> str:
    c, api = case.kwargs, case.api
    names = ["softmax_scale", "is_causal", "window_size", "softcap", "return_lse", "backend"]
    names += {"dense": ["deterministic", "sparse_mask", "scale", "return_attn_probs"],
              "grad": ["deterministic", "sparse_mask"],
              "varlen": ["deterministic", "max_seqlen_q", "max_seqlen_k", "cu_seqlens_q",
                         "cu_seqlens_k", "scale", "return_attn_probs"],
              "kv": ["num_splits", "cache_seqlens", "block_table"],
              "bwd": ["deterministic", "sparse_mask", "bias_grad", "dlse"],
              "vbwd": ["deterministic", "max_seqlen_q", "max_seqlen_k", "cu_seqlens_q",
                       "cu_seqlens_k", "bias_grad", "dlse"]}[api]
    o = r.choice(names)
    x = c.get(o)
    if o == "window_size":
        v: Any = r.choice([(3, 0), (-5, 2), (2 ** 31, 0), (1.5, 2), None, 3, (1, 2, 3),
                           (np.int64(2), -1), (True, False), ("a", 1), (-1, 2 ** 40)])
    elif o == "backend":
        v = r.choice(["auto", "cuda", "reference", "bogus", None, 3])
    elif o == "num_splits":
        v = r.choice([1, 7, 1000, -1, 1.5, None, "x", np.int32(2)])
    elif o in ("max_seqlen_q", "max_seqlen_k"):
        v = r.choice([0, 1, 3, 100, -1, 2 ** 40, 1.5, None, np.int64(9), torch.tensor(9)])
    elif isinstance(x, torch.Tensor) and x.dim() >= 1 and not x.is_floating_point():
        xi = x.to(torch.int64)
        v = r.choice([xi, x.float(), x.flip(0), x[:-1], x.unsqueeze(0), torch.zeros_like(x),
                      (xi + 1).to(x.dtype), (xi - 1).to(x.dtype), (xi * 1000).to(x.dtype),
                      x.cpu().numpy(), x.tolist()])
    elif o in ("cu_seqlens_q", "cu_seqlens_k", "cache_seqlens", "block_table"):
        v = r.choice([-1, 10 ** 6, 1.5, None, np.int64(1)])
    elif o == "dlse":
        lse = c.get("lse")
        v = r.choice([None, _rand(g, (2, 3), torch.float32, case.device),
                      _rand(g, tuple(lse.shape), r.choice([torch.float32, torch.bfloat16]),
                            case.device) if isinstance(lse, torch.Tensor) else None])
    elif o == "sparse_mask":
        q, k = c.get("query"), c.get("key")
        sq = q.shape[1] if isinstance(q, torch.Tensor) and q.dim() > 1 else 5
        sk = k.shape[1] if isinstance(k, torch.Tensor) and k.dim() > 1 else 7
        sq, sk = max(1, sq + r.choice([0, 0, 1])), max(1, sk - r.choice([0, 0, 1]))
        v = r.choice([lambda: _sparse(r, g, sq, sk, case.device), lambda: "not a mask",
                      lambda: dm.BlockBitsetMask.from_dense_mask(
                          (torch.rand(sq, sk, generator=g) < 0.5).to(case.device),
                          block_size=(16, 16))])()
    else:
        v = r.choice(ODD_VALUES)
    c[o] = v
    return f"{o} = {v!r}"[:80]


def _bwd(r: random.Random, g: torch.Generator, dev: str, sz: Sizes) -> dict[str, Any]:
    kw = _dense(r, g, dev, sz)
    kw.pop("return_lse", None)
    q = kw["query"]
    b, sq, h, _ = q.shape
    kw["dout"], kw["out"] = _rand(g, q.shape, q.dtype, dev), _rand(g, q.shape, q.dtype, dev)
    kw["lse"] = _rand(g, (b, h, sq), torch.float32, dev)
    return kw


def _vbwd(r: random.Random, g: torch.Generator, dev: str, sz: Sizes) -> dict[str, Any]:
    kw = _varlen(r, g, dev, sz)
    kw.pop("return_lse", None)
    q = kw["query"]
    kw["dout"], kw["out"] = _rand(g, q.shape, q.dtype, dev), _rand(g, q.shape, q.dtype, dev)
    kw["lse"] = _rand(g, (q.shape[1], q.shape[0]), torch.float32, dev)
    return kw


def _masks(r: random.Random, g: torch.Generator, dev: str, sz: Sizes) -> dict[str, Any]:
    return {"kind": r.choice(["bitset", "bcsr", "mixed", "mixed_dense", "dynamic", "window",
                              "and"]),
            "seqlen_q": r.choice([1, 7, 64, 130]), "seqlen_k": r.choice([1, 9, 128, 200]),
            "block_size": r.choice([(128, 128), (64, 128), (16, 16), (128, 64)]),
            "lead": r.choice([(), (1, 1), (2, 1), (1, 3), (2, 3)]), "window": 3}


def _mutate_mask_args(r: random.Random, g: torch.Generator, case: Case) -> str:
    o = r.choice(["seqlen_q", "seqlen_k", "block_size", "lead", "window"])
    case.kwargs[o] = r.choice({
        "seqlen_q": [0, -1, 1.5, None, "x", 2 ** 40, np.int64(5), True, 300],
        "seqlen_k": [0, -1, 1.5, None, "x", 2 ** 40, np.int64(5), True, 300],
        "block_size": [(0, 16), (16,), 16, (3, 5), (17, 32), (-16, 16), (16.0, 16), None,
                       (2 ** 20, 16), (8, 4), (32, 1), "x"],
        "lead": [(0, 1), (1,), (1, 1, 1), (4, 4)],
        "window": [0, -2, (1,), (1, -3), 1.5, None, (2 ** 40, 0), "x"]}[o])
    return f"{o} = {case.kwargs[o]!r}"


def _small(x: Any) -> int:
    """A usable small length for the arrays a mask case builds (3 for odd arguments)."""
    try:
        n = x if isinstance(x, float) else int(x)
    except (TypeError, ValueError):
        return 3
    return n if isinstance(n, int) and 0 <= n < 300 else 3


def bad_case(seed: int, device: str = "cpu") -> Case:
    """A random malformed (or by chance valid) call on tensors of ``device``; see the module
    docstring."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    api = r.choice(["dense", "varlen", "kv", "bwd", "vbwd", "grad", "masks"])
    if api == "grad":
        case = Case(api, _dense(r, g, device, CPU_SIZES) if r.random() < 0.7 else
                    _varlen(r, g, device, CPU_SIZES), device=device)
    else:
        make = {"bwd": _bwd, "vbwd": _vbwd, "masks": _masks, **GOOD}[api]
        case = Case(api, make(r, g, device, CPU_SIZES), device=device)
    mutate = _mutate_mask_args if api == "masks" else _mutate
    case.steps = [mutate(r, g, case) for _ in range(r.choice([1, 1, 2, 3]))]
    if api not in ("grad", "masks") and r.random() < 0.15:   # NumPy arrays: the reference path
        case.kwargs = {k: v.cpu().numpy() if isinstance(v, torch.Tensor) and
                       v.dtype != torch.bfloat16 else v for k, v in case.kwargs.items()}
        case.steps.append("as NumPy")
    return case


# ----------------------------------------------------------------------------- running a case


def _call_grad(kw: dict[str, Any]) -> None:
    leaves = []
    for n in ("query", "key", "value", "attn_bias"):
        x = kw.get(n)
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            kw[n] = x.detach().requires_grad_(True)
            leaves.append(kw[n])
    fn = dm.flash_dmattn_varlen_func if "cu_seqlens_q" in kw else dm.flash_dmattn_func
    out = fn(**kw)
    o = out[0] if isinstance(out, tuple) else out
    if leaves and o.requires_grad:
        grads = torch.autograd.grad(o.float().sum(), leaves, allow_unused=True)
        for x, gx in zip(leaves, grads, strict=True):
            assert gx is None or gx.shape == x.shape, (gx.shape, x.shape)


_BWD_LEAD = ("dout", "query", "key", "value", "out", "lse")   # positional, in order
_VARLEN_LEAD = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def _call_backward(kw: dict[str, Any], fn: Any, lead: tuple[str, ...]) -> None:
    """A functional backward: ``lead`` positionally, the rest by keyword; the gradients must
    have their inputs' shapes (dbias the bias's)."""
    args = [kw.pop(n, None) for n in lead]
    res = fn(*args, **kw)
    for x, y in zip(res[:3], args[1:4], strict=True):
        assert tuple(x.shape) == tuple(y.shape), (x.shape, y.shape)
    bias = kw.get("attn_bias")
    if bias is not None and res[3] is not None:
        assert tuple(res[3].shape) == tuple(bias.shape), (res[3].shape, bias.shape)


def _call_masks(kw: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(7)
    sq, sk, bs, lead = kw["seqlen_q"], kw["seqlen_k"], kw["block_size"], kw["lead"]
    ok_bs = isinstance(bs, tuple) and len(bs) == 2 and all(
        isinstance(x, int) and x > 0 for x in bs)
    nrb, ncb = ((max(1, -(-_small(sq) // bs[0])), max(1, -(-_small(sk) // bs[1]))) if ok_bs
                else (2, 2))
    dense = torch.rand(lead + (_small(sq), _small(sk)), generator=g) < 0.4
    kind = kw["kind"]
    if kind == "bitset":
        m = dm.BlockBitsetMask(torch.rand(lead + (nrb, ncb), generator=g) < 0.5, sq, sk, bs)
    elif kind == "bcsr":
        bits = (torch.rand((nrb, ncb), generator=g) < 0.5).numpy()
        rp = np.concatenate([[0], np.cumsum(bits.sum(1))]).astype(np.int32)
        m = dm.BCSRMask(torch.from_numpy(rp), torch.from_numpy(np.nonzero(bits)[1].astype(
            np.int32)), sq, sk, block_size=bs)
    elif kind in ("mixed", "mixed_dense"):
        m = dm.MixedMask.from_dense_mask(dense, block_size=bs)
        if kind == "mixed":
            m = dm.MixedMask(m.block_class, m.partial_slot, m.partial_bits, sq, sk, bs)
    elif kind == "dynamic":
        m = dm.DynamicMask(torch.rand(lead + (nrb, ncb), generator=g) < 0.5, sq, sk, bs)
        m.update(torch.rand(lead + (nrb, ncb), generator=g) < 0.5)
    elif kind == "window":
        m = dm.WindowMask(kw["window"], sq, sk)
    else:
        m = dm.CausalMask(sq, sk) & dm.BlockBitsetMask.from_dense_mask(dense, block_size=bs)
    d, bm = m.to_dense(), m.block_map()
    _ = m.density, m.nbytes, dm.estimate_speedup(m), dm.calculate_memory_savings(m)
    assert d.shape[-2:] == (m.seqlen_q, m.seqlen_k), (d.shape, m)
    assert bm.shape[-2:] == (-(-m.seqlen_q // m.block_size[0]),
                             -(-m.seqlen_k // m.block_size[1])), (bm.shape, m)


CALLS = {"dense": lambda kw: dm.flash_dmattn_func(**kw),
         "varlen": lambda kw: dm.flash_dmattn_varlen_func(**kw),
         "kv": lambda kw: dm.flash_dmattn_with_kvcache(**kw),
         "bwd": lambda kw: _call_backward(kw, dm.flash_dmattn_backward, _BWD_LEAD),
         "vbwd": lambda kw: _call_backward(kw, dm.flash_dmattn_varlen_backward,
                                           _BWD_LEAD + _VARLEN_LEAD),
         "grad": _call_grad, "masks": _call_masks}


def outcome(case: Case, **override: Any) -> tuple[str, str]:
    """("ok", ""), (the accepted error's name, its message), or ("BAD", the traceback's end)
    of running ``case`` (with ``override`` merged into its arguments)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            CALLS[case.api](dict(case.kwargs, **override))
        return "ok", ""
    except ACCEPTED_ERRORS as e:
        return type(e).__name__, str(e)
    except Exception as e:  # noqa: BLE001  (what this looks for)
        return "BAD", "".join(traceback.format_exception(e)[-4:])


def disagreement(case: Case, got: tuple[str, str]) -> str | None:
    """Where ``case`` ran on the cuda backend (``got``), the reference backend's differing
    verdict on the same arguments, unless a limit of the cuda backend explains it."""
    if case.api not in ("dense", "varlen", "kv", "bwd", "vbwd") or \
            got[0] == "NotImplementedError" or \
            case.kwargs.get("backend", "auto") not in ("auto", "cuda"):
        return None
    ref = outcome(case, backend="reference")
    if ref[0] == "BAD":
        return f"reference: {ref[1]}"
    if (got[0] == "ok") == (ref[0] == "ok"):
        return None
    if ref[0] == "ok" and any(t in got[1] for t in CUDA_ONLY_LIMITS):
        return None
    return f"cuda: {got[0]} {got[1]}\nreference: {ref[0]} {ref[1]}"


def findings(first: int, count: int) -> list[str]:
    """Every defect among malformed cases ``first .. first + count - 1`` (stubbed GPU)."""
    import host_profile

    found = []
    with host_profile.stub_gpu():
        for seed in range(first, first + count):
            case = bad_case(seed)
            got = outcome(case)
            msg = got[1] if got[0] == "BAD" else disagreement(case, got)
            if msg is not None:
                found.append(f"case {seed} ({case.api}; {'; '.join(case.steps)}):\n{msg}")
    return found


def describe(case: Case) -> str:
    """``case`` in one line per argument: arrays by shape, strides, dtype and alignment."""
    lines = [f"{case.api} on {case.device}" + (f" ({'; '.join(case.steps)})" if case.steps
                                               else "")]
    for k, v in case.kwargs.items():
        if isinstance(v, torch.Tensor):
            v = (f"{tuple(v.shape)} strides {v.stride()} {str(v.dtype).removeprefix('torch.')}"
                 f" ptr%16={v.data_ptr() % 16}")
        lines.append(f"  {k}: {v!r}" if not isinstance(v, str) else f"  {k}: {v}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0, help="the first case's seed")
    ap.add_argument("--max-memory-gb", type=float, default=12.0,
                    help="address-space limit (0: none): past it an allocation raises "
                         "MemoryError, a finding, instead of the OOM killer ending the run "
                         "with its findings unprinted (the cases are small)")
    ap.add_argument("--show-good", type=int, metavar="SEED",
                    help="print good_case(SEED) (tests/gpu/test_random_calls.py: seed "
                         "1000000 + its index) and exit")
    args = ap.parse_args()
    if args.show_good is not None:
        print(describe(good_case(args.show_good, "cpu")))
        return 0
    if args.max_memory_gb > 0:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        limit = int(args.max_memory_gb * 2 ** 30)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    found = findings(args.seed, args.cases)
    for f in found:
        print(f"--- {f}")
    print(f"{len(found)} findings in {args.cases} cases")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
