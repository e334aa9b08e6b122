"""flash-dmattn 1.x call patterns on dmattn_cupy: ``from dmattn_cupy.compat.flash_dmattn import
flash_dmattn_func`` in place of ``from flash_dmattn import flash_dmattn_func``.

What differs from the native functions (``dmattn_cupy.flash_dmattn_func``):

- positional order of flash-dmattn 1.x: ``(query, key, value, attn_mask, attn_bias,
  softmax_scale, is_causal, softcap, deterministic, return_attn_probs)`` (the native order has
  ``window_size`` before ``softcap``); ``scale=`` is accepted for ``softmax_scale=``;
- ``attn_mask`` may be a float/int 0/1 tensor (nonzero = keep), as flash-dmattn's examples build
  it; it is turned into a bool mask (one extra elementwise pass);
- ``flash_dmattn_varlen_func`` takes ``attn_mask``/``attn_bias`` before ``cu_seqlens_q`` and
  also accepts them padded per sequence, 4-D ``(B|1, h', max_seqlen_q|1, max_seqlen_k)``; they
  are gathered into the native query-based layout (this reads ``cu_seqlens_q`` on the host,
  a sync); the native 3-D query-based and 2-D key-based layouts pass through unchanged;
- ``return_attn_probs=True`` returns ``(out, lse, None)``: the probabilities are never
  materialized (flash-dmattn documents its third value as "for testing only");
- ``flash_dmattn_func_auto(backend)`` maps flash-dmattn's backend names: ``"cuda"`` -> the CUDA
  kernels, ``"triton"``/``"flex"``/None -> automatic (CUDA for GPU arrays, the float64
  reference for CPU arrays).

The dynamic-mask helpers (``topk_mask``, ``create_mask``) select, per query, the
``keep_window_size`` keys with the largest bias; they run where the bias lives (torch, CuPy or
NumPy; no host copy) and return a bool mask, or with ``block_size`` a ``BlockBitsetMask`` whose
unselected blocks the kernels never load.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import api
from ..arrays import array_kind, module_of
from ..device_check import cupy_problem, driver_problem
from ..masks import BlockBitsetMask
from ..validate import check_flag

__all__ = [
    "flash_dmattn_func", "flash_dmattn_varlen_func", "flash_dmattn_qkvpacked_func",
    "flash_dmattn_kvpacked_func", "flash_dmattn_func_auto", "get_available_backends",
    "topk_mask", "create_mask", "CUDA_AVAILABLE", "TRITON_AVAILABLE", "FLEX_AVAILABLE",
]


# ----------------------------------------------------------------------------- array helpers


def _as_bool_mask(mask: Any) -> Any:
    """flash-dmattn masks may be float 0/1: nonzero keeps."""
    if mask is None:
        return None
    kind = array_kind(mask)
    if kind == "torch":
        return mask if mask.dtype == module_of(mask).bool else mask != 0
    if kind in ("cupy", "numpy"):
        return mask if mask.dtype == np.bool_ else mask != 0
    return mask  # let validation name the bad type


def _index_array(idx: np.ndarray, like: Any) -> Any:
    kind = array_kind(like)
    if kind == "torch":
        import torch

        return torch.as_tensor(idx, device=like.device)
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            return cupy.asarray(idx)
    return idx


def _host_ints(x: Any) -> np.ndarray:
    kind = array_kind(x)
    if kind == "torch":
        return x.detach().cpu().numpy().astype(np.int64)
    if kind == "cupy":
        import cupy

        return cupy.asnumpy(x).astype(np.int64)
    return np.asarray(x, dtype=np.int64)


def _padded_to_query_based(name: str, x: Any, cu_q: np.ndarray, max_k: int) -> Any:
    """(B|1, h', Sq|1, Sk) per-sequence padded -> (total_q, h', max_k) query-based."""
    if x is None or getattr(x, "ndim", None) != 4:
        return x
    lens = np.diff(cu_q)
    if cu_q.ndim != 1 or cu_q.size == 0 or cu_q[0] != 0 or (lens < 0).any():
        raise ValueError(f"cu_seqlens_q must be 1-D, start at 0 and never decrease (a padded "
                         f"4-D {name} is gathered by it), got {cu_q.tolist()}")
    longest = int(lens.max(initial=0))
    if x.shape[0] not in (1, len(lens)) or (x.shape[2] != 1 and x.shape[2] < longest):
        raise ValueError(f"a padded 4-D {name} needs dims (B|1, h', Sq|1, Sk) with B = "
                         f"{len(lens)} sequences and Sq >= the longest ({longest}), got shape "
                         f"{tuple(x.shape)}")
    total = int(cu_q[-1])
    seq = np.repeat(np.arange(len(cu_q) - 1), np.diff(cu_q))          # sequence of each token
    row = np.arange(total) - cu_q[:-1][seq]                           # its row in the sequence
    b_idx = _index_array(seq if x.shape[0] != 1 else np.zeros(total, np.int64), x)
    r_idx = _index_array(row if x.shape[2] != 1 else np.zeros(total, np.int64), x)
    out = x[b_idx, :, r_idx, :]                                        # (total, h', Sk)
    sk = out.shape[-1]
    if sk >= max_k:
        return out[..., :max_k]
    raise ValueError(f"a padded 4-D varlen mask/bias needs its last dim >= max_seqlen_k "
                     f"({max_k}), got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------- attention


def flash_dmattn_func(query: Any, key: Any, value: Any, attn_mask: Any = None,
                      attn_bias: Any = None, softmax_scale: float | None = None,
                      is_causal: bool | None = None, softcap: float | None = None,
                      deterministic: bool | None = None, return_attn_probs: bool | None = None,
                      *, scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                      backend: str = "auto") -> Any:
    """flash-dmattn 1.x ``flash_dmattn_func``: ``(B, Sq, H, D)`` q, ``(B, Sk, Hk, D)`` k/v,
    mask/bias ``(B|1, H|Hk|1, Sq|1, Sk)``. Returns ``out``, or ``(out, lse, None)`` with
    ``return_attn_probs=True``."""
    return api.flash_dmattn_func(query, key, value, _as_bool_mask(attn_mask), attn_bias,
                                 softmax_scale, is_causal, window_size, softcap,
                                 deterministic=deterministic, backend=backend, scale=scale,
                                 return_attn_probs=return_attn_probs)


def flash_dmattn_varlen_func(query: Any, key: Any, value: Any, attn_mask: Any = None,
                             attn_bias: Any = None, cu_seqlens_q: Any = None,
                             cu_seqlens_k: Any = None, max_seqlen_q: int | None = None,
                             max_seqlen_k: int | None = None, softmax_scale: float | None = None,
                             is_causal: bool | None = None, softcap: float | None = None,
                             deterministic: bool | None = None,
                             return_attn_probs: bool | None = None, block_table: Any = None,
                             *, scale: float | None = None,
                             window_size: tuple[int, int] = (-1, -1),
                             backend: str = "auto") -> Any:
    """flash-dmattn 1.x ``flash_dmattn_varlen_func`` (mask/bias before the cu_seqlens)."""
    if block_table is not None:
        raise NotImplementedError("flash_dmattn_varlen_func(block_table=...) (paged KV) is not "
                                  "supported by the compat layer; use "
                                  "dmattn_cupy.flash_dmattn_with_kvcache")
    for name, x in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if x is None:
            raise TypeError(f"{name} is required, got None")
    cu_q = cu_k = None
    if max_seqlen_q is None or max_seqlen_k is None or any(
            x is not None and getattr(x, "ndim", 0) == 4 for x in (attn_mask, attn_bias)):
        cu_q, cu_k = _host_ints(cu_seqlens_q), _host_ints(cu_seqlens_k)
    if max_seqlen_q is None:
        max_seqlen_q = int(np.diff(cu_q).max(initial=0))
    if max_seqlen_k is None:
        max_seqlen_k = int(np.diff(cu_k).max(initial=0))
    mask = _as_bool_mask(attn_mask)
    if cu_q is not None:
        mask = _padded_to_query_based("attn_mask", mask, cu_q, max_seqlen_k)
        attn_bias = _padded_to_query_based("attn_bias", attn_bias, cu_q, max_seqlen_k)
    return api.flash_dmattn_varlen_func(
        query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask,
        attn_bias, softmax_scale, is_causal, window_size, softcap, deterministic=deterministic,
        backend=backend, scale=scale, return_attn_probs=return_attn_probs)


def _packed(name: str, x: Any, parts: int) -> None:
    """``x`` must be a 5-D array with ``parts`` tensors stacked on dim 2."""
    _array_arg(name, x, 5)
    if x.shape[2] != parts:
        raise ValueError(f"{name} must be (B, S, {parts}, heads, head_dim), got shape "
                         f"{tuple(x.shape)}")


def flash_dmattn_qkvpacked_func(qkv: Any, attn_mask: Any = None, attn_bias: Any = None,
                                softmax_scale: float | None = None,
                                is_causal: bool | None = None, softcap: float | None = None,
                                deterministic: bool | None = None,
                                return_attn_probs: bool | None = None, *,
                                scale: float | None = None, backend: str = "auto") -> Any:
    """``qkv (B, S, 3, H, D)``: views of q, k and v (no copy)."""
    _packed("qkv", qkv, 3)
    return flash_dmattn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], attn_mask, attn_bias,
                             softmax_scale, is_causal, softcap, deterministic, return_attn_probs,
                             scale=scale, backend=backend)


def flash_dmattn_kvpacked_func(q: Any, kv: Any, attn_mask: Any = None, attn_bias: Any = None,
                               softmax_scale: float | None = None, is_causal: bool | None = None,
                               softcap: float | None = None, deterministic: bool | None = None,
                               return_attn_probs: bool | None = None, *,
                               scale: float | None = None, backend: str = "auto") -> Any:
    """``kv (B, Sk, 2, Hk, D)``: views of k and v (no copy)."""
    _packed("kv", kv, 2)
    return flash_dmattn_func(q, kv[:, :, 0], kv[:, :, 1], attn_mask, attn_bias, softmax_scale,
                             is_causal, softcap, deterministic, return_attn_probs, scale=scale,
                             backend=backend)


_BACKENDS = {None: "auto", "auto": "auto", "cuda": "cuda", "triton": "auto", "flex": "auto",
             "reference": "reference"}


def flash_dmattn_func_auto(backend: str | None = None) -> Any:
    """A callable with ``flash_dmattn_func``'s (flash-dmattn 1.x) signature."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(k for k in _BACKENDS if k)} or None, "
                         f"got {backend!r}")
    be = _BACKENDS[backend]

    def attn(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("backend", be)
        return flash_dmattn_func(*args, **kwargs)

    attn.__name__ = f"flash_dmattn_func[{be}]"
    return attn


def _cuda_available() -> bool:
    if cupy_problem() is not None or driver_problem() is not None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


CUDA_AVAILABLE = _cuda_available()
TRITON_AVAILABLE = False
FLEX_AVAILABLE = False


def get_available_backends() -> list[str]:
    """``["cuda", "reference"]`` with a usable GPU, else ``["reference"]``."""
    return (["cuda"] if CUDA_AVAILABLE else []) + ["reference"]


# ----------------------------------------------------------------------------- dynamic masks


def _int_arg(name: str, value: Any, low: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _block_arg(block_size: Any) -> tuple[int, int]:
    """``block_size`` as (block_m, block_n): an int n is (n, n)."""
    if isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        return _int_arg("block_size[0]", block_size[0]), _int_arg("block_size[1]", block_size[1])
    if isinstance(block_size, (int, np.integer)) and not isinstance(block_size, (bool, np.bool_)):
        n = _int_arg("block_size", block_size)
        return n, n
    raise TypeError(f"block_size must be None, an int >= 1 or a pair of them, got {block_size!r}")


def _array_arg(name: str, x: Any, ndim: int | None = None) -> Any:
    """``x`` if it is a torch / CuPy / NumPy array (of ``ndim`` dims when given)."""
    if array_kind(x) is None:
        raise TypeError(f"{name} must be a torch.Tensor, cupy.ndarray or numpy.ndarray, got "
                        f"{type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def _check_broadcast(name: str, x: Any, shape: tuple[int, ...], mutual: int = 0) -> None:
    """Each dim of ``x`` (aligned right) is 1 or ``shape``'s; in the first ``mutual`` dims of
    ``shape`` it may also be anything where ``shape`` has 1 (the result takes ``x``'s)."""
    dims = tuple(x.shape)
    first = len(shape) - len(dims)
    if first < 0 or any(d not in (1, t) and not (first + i < mutual and t == 1)
                        for i, (d, t) in enumerate(zip(dims, shape[first:], strict=True))):
        raise ValueError(f"{name} of shape {dims} does not broadcast with {shape}")


def _allowed(xp: Any, like: Any, sq: int, sk: int, is_causal: bool) -> Any:
    """(Sq, Sk) bool: bottom-right causal, or None when every position is allowed."""
    if not is_causal:
        return None
    if xp is np:
        i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
    elif array_kind(like) == "torch":
        i = xp.arange(sq, device=like.device)[:, None]
        j = xp.arange(sk, device=like.device)[None, :]
    else:
        i, j = xp.arange(sq)[:, None], xp.arange(sk)[None, :]
    return j <= i + (sk - sq)


def _kth_largest(xp: Any, s: Any, k: int) -> Any:
    """The k-th largest value of each row (last axis), keepdims."""
    n = s.shape[-1]
    if xp is np or array_kind(s) == "cupy":
        return xp.partition(s, n - k, axis=-1)[..., n - k: n - k + 1]
    return xp.topk(s, k, dim=-1).values[..., k - 1: k]


def _float32(xp: Any, x: Any) -> Any:
    if array_kind(x) == "torch":
        return x.detach().to(xp.float32)
    return x.astype(np.float32)


def topk_mask(attn_bias: Any, keep_window_size: int, attn_mask: Any = None,
              is_causal: bool = False, seqlen_q: int | None = None,
              block_size: int | tuple[int, int] | None = None,
              num_heads: int | None = None) -> Any:
    """Per query, keep the ``keep_window_size`` allowed keys with the largest bias.

    ``attn_bias``: ``(B|1, h, Sq|1, Sk)`` (torch / CuPy / NumPy; the work runs where it lives);
    ``attn_mask``: optional bool (or 0/1) mask broadcastable to it: excluded keys are never
    selected; ``is_causal``: keys after the query (bottom-right aligned) are excluded too, and
    then the result has ``Sq = seqlen_q`` rows (default: the bias's). Keys tied with the k-th
    largest value are all kept. A query with fewer allowed keys keeps all of them.

    Returns a bool mask ``(B|1, h, Sq, Sk)`` for ``attn_mask=``. With ``block_size`` (an int
    ``n`` = ``(n, n)`` or ``(block_m, block_n)``) the selection is blockwise: each block of
    ``block_m`` queries keeps the ``ceil(keep_window_size / block_n)`` key blocks whose largest
    allowed bias is highest, and the result is a ``BlockBitsetMask`` for ``sparse_mask=`` (its
    blocks are multiples of the kernel tile: use 64 or 128), with the bias's batch dim and
    ``h`` heads, repeated to ``num_heads`` when given (GQA: a bias per kv head).
    """
    keep_window_size = _int_arg("keep_window_size", keep_window_size)
    xp = module_of(_array_arg("attn_bias", attn_bias))
    if attn_bias.ndim != 4:
        raise ValueError(f"attn_bias must be 4-D (B|1, h, Sq|1, Sk), got shape "
                         f"{tuple(attn_bias.shape)}")
    b, h, sqb, sk = attn_bias.shape
    sq = sqb if seqlen_q is None else _int_arg("seqlen_q", seqlen_q)
    if sqb not in (1, sq):
        raise ValueError(f"seqlen_q={sq} needs an attn_bias of 1 or {sq} rows, got shape "
                         f"{tuple(attn_bias.shape)}")
    is_causal = check_flag("is_causal", is_causal)
    blocks = None if block_size is None else _block_arg(block_size)
    if num_heads is not None and (_int_arg("num_heads", num_heads) % h if h else True):
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of attn_bias's heads ({h})")
    s = _float32(xp, attn_bias)
    neg = -math.inf
    allowed = _allowed(xp, s, sq, sk, is_causal)
    if attn_mask is not None:
        m = _as_bool_mask(_array_arg("attn_mask", attn_mask))
        _check_broadcast("attn_mask", m, (b, h, sq, sk), mutual=2)
        allowed = m if allowed is None else (allowed & m)
    if allowed is not None:
        s = xp.where(allowed, s, neg)
    if s.shape[-2] != sq:  # a bias shared by every query, with a causal rule of Sq rows
        shape = (*s.shape[:-2], sq, sk)
        s = s.expand(*shape) if array_kind(s) == "torch" else xp.broadcast_to(s, shape)
    if block_size is None:
        if keep_window_size >= sk:
            return s > neg
        thr = _kth_largest(xp, s, keep_window_size)
        return (s >= thr) & (s > neg)
    bm, bn = blocks
    nrb, ncb = -(-sq // bm), -(-sk // bn)
    pad = [(0, 0), (0, 0), (0, nrb * bm - sq), (0, ncb * bn - sk)]
    if array_kind(s) == "torch":
        import torch.nn.functional as F

        sp = F.pad(s, (0, pad[3][1], 0, pad[2][1]), value=neg)
    else:
        sp = xp.pad(s, pad, constant_values=neg)
    sp = sp.reshape(*sp.shape[:2], nrb, bm, ncb, bn)
    if array_kind(s) == "torch":
        score = sp.amax(dim=(3, 5))
    else:
        score = sp.max(axis=(3, 5))
    kb = -(-keep_window_size // bn)
    bits = score > neg if kb >= ncb else (score >= _kth_largest(xp, score, kb)) & (score > neg)
    if num_heads is not None and bits.shape[1] not in (1, num_heads):
        rep = num_heads // bits.shape[1]
        bits = bits.repeat_interleave(rep, dim=1) if array_kind(bits) == "torch" else \
            xp.repeat(bits, rep, axis=1)
    return BlockBitsetMask(bits, sq, sk, block_size=(bm, bn))


def create_mask(attention_bias: Any, attention_mask: Any, batch_size: int, query_len: int,
                key_len: int, window_size: int, min_dtype: float | None = None,
                block_size: int | None = None, type: str = "topk") -> Any:
    """flash-dmattn's ``create_mask``: a bool mask ``(B|1, h, Sq|1, Sk)`` for a bias.

    ``attention_mask``: None, a ``(batch_size, key_len)`` padding mask, a ``(batch_size,
    query_len)`` one (then the first ``key_len - query_len`` keys, the cache, are kept), or a
    mask broadcastable to the bias. ``type="topk"`` keeps the ``window_size`` largest allowed
    biases per query; ``"relu"`` keeps the allowed positive ones. ``block_size``: afterwards each
    run of ``block_size`` keys is kept whole if more than half of it was kept, else dropped.
    ``min_dtype`` is accepted for compatibility and unused (excluded keys are never kept).
    """
    del min_dtype
    _array_arg("attention_bias", attention_bias, 4)
    batch_size = _int_arg("batch_size", batch_size, 0)
    query_len, key_len = _int_arg("query_len", query_len, 0), _int_arg("key_len", key_len, 0)
    if block_size is not None:
        block_size = _int_arg("block_size", block_size)
    if type not in ("topk", "relu"):
        raise ValueError(f"type must be 'topk' or 'relu', got {type!r}")
    m = None if attention_mask is None else _as_bool_mask(
        _array_arg("attention_mask", attention_mask))
    if m is not None and m.ndim == 2:
        if m.shape[0] != batch_size:
            raise ValueError(f"a 2-D attention_mask must have batch_size ({batch_size}) rows, "
                             f"got shape {tuple(m.shape)}")
        if m.shape[-1] == key_len:
            m = m.reshape(batch_size, 1, 1, key_len)
        elif m.shape[-1] == query_len:
            m = m.reshape(batch_size, 1, 1, query_len)
            if key_len > query_len:
                xp = module_of(m)
                ones = (xp.ones((batch_size, 1, 1, key_len - query_len), dtype=xp.bool,
                                device=m.device) if array_kind(m) == "torch"
                        else xp.ones((batch_size, 1, 1, key_len - query_len), dtype=bool))
                m = (xp.cat if array_kind(m) == "torch" else xp.concatenate)((ones, m), -1)
        else:
            raise ValueError(f"attention_mask shape {tuple(m.shape)} fits neither key_len "
                             f"{key_len} nor query_len {query_len}")
    if type == "topk":
        keep = topk_mask(attention_bias, window_size, m)
    else:
        if m is not None:
            _check_broadcast("attention_mask", m, tuple(attention_bias.shape), mutual=4)
        keep = attention_bias > 0
        if m is not None:
            keep = keep & m
    if block_size is not None and block_size > 1:
        keep = _block_smooth(keep, int(block_size))
    return keep


def _block_smooth(keep: Any, bs: int) -> Any:
    """Each run of ``bs`` keys (and the shorter tail) is kept whole iff most of it is kept."""
    xp = module_of(keep)
    sk = keep.shape[-1]
    starts = np.arange(0, sk, bs)
    ends = np.minimum(starts + bs, sk)
    lead = (*keep.shape[:-1], 1)
    if array_kind(keep) == "torch":
        c = xp.cat([xp.zeros(lead, dtype=xp.int64, device=keep.device),
                    keep.to(xp.int64).cumsum(-1)], -1)
    else:
        c = xp.concatenate([xp.zeros(lead, dtype=np.int64),
                            xp.cumsum(keep, axis=-1, dtype=np.int64)], -1)
    counts = c[..., _index_array(ends, keep)] - c[..., _index_array(starts, keep)]
    block_keep = counts * 2 > _index_array(ends - starts, keep)
    return block_keep[..., _index_array(np.arange(sk) // bs, keep)]
