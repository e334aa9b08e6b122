"""The float64 CPU reference of the whole forward contract (API.md), in NumPy.

It is the oracle of every GPU test and the ``backend="reference"`` implementation. Optionally
it rounds its intermediates to a low precision (``lowprec="bfloat16"``/``"float16"``), which
gives the ``out_lowprec_ref`` of FlashAttention's tolerance rule.
"""

from __future__ import annotations

import numpy as np


def quantize(x: np.ndarray, dtype: str | None) -> np.ndarray:
    """Round float64 values to ``dtype`` (float16 / bfloat16 / float32) and back to float64."""
    if dtype is None or dtype == "float64":
        return x
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float64)
    f32 = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float32":
        return f32.astype(np.float64)
    if dtype == "bfloat16":  # round to nearest even on the upper 16 bits
        u = f32.view(np.uint32).astype(np.uint64)
        finite = np.isfinite(f32)
        u = np.where(finite, (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000, u & 0xFFFF0000)
        return u.astype(np.uint32).view(np.float32).astype(np.float64)
    raise ValueError(f"unknown precision {dtype!r}")


def _heads_to(x: np.ndarray, axis: int, heads: int) -> np.ndarray:
    """Repeat a head axis of size {1, Hk, H} up to H (kv head h // (H // Hk) serves h)."""
    n = x.shape[axis]
    if n in (1, heads):
        return x
    return np.repeat(x, heads // n, axis=axis)


def allowed_positions(sq: int, sk: int, window: tuple[int, int]) -> np.ndarray:
    """(Sq, Sk) bool: the causal/window rule, bottom-right aligned (window has causal folded)."""
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    off = sk - sq
    keep = np.ones((sq, sk), dtype=bool)
    left, right = window
    if left >= 0:
        keep &= j >= i + off - left
    if right >= 0:
        keep &= j <= i + off + right
    return keep


# Logits below this count as excluded, as -inf does (docs/api.md, "Excluded positions"): the
# kernels work in log2 units (logit * log2 e), where such a logit is past float32's range; and
# at that magnitude no float holds a row's log(n), which the backward's P = exp(s - lse) needs.
LOWEST_LOGIT = -float(np.finfo(np.float32).max) / float(np.log2(np.e))


def keep_logits(s: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """keep AND s >= LOWEST_LOGIT (a NaN logit stays kept: it propagates)."""
    return keep & ~(s < LOWEST_LOGIT)


def keep_positions(b: int, h: int, sq: int, sk: int, window: tuple[int, int],
                   mask: np.ndarray | None, sparse: np.ndarray | None) -> np.ndarray:
    """(b, h, sq, sk) bool: the window rule AND the mask AND the sparse mask's elements."""
    keep = np.broadcast_to(allowed_positions(sq, sk, window), (b, h, sq, sk))
    if mask is not None:
        keep = keep & _heads_to(np.asarray(mask, dtype=bool), 1, h)
    if sparse is not None:
        sp = np.asarray(sparse, dtype=bool)
        keep = keep & (sp if sp.ndim == 2 else _heads_to(sp, 1, h))
    return keep


def rounded_p(s: np.ndarray, m_safe: np.ndarray, p: np.ndarray, lowprec: str | None,
              key_block: int | None) -> np.ndarray:
    """P = exp(s - m_safe) (``p``) as the P @ V product takes it, rounded to ``lowprec``.
    With ``key_block``: each block of that many keys is exponentiated against its own max,
    rounded, then rescaled to the row's max (exactly) -- a partial's order, as a split-KV CTA
    or one of the decode kernel's warps (16 keys each) forms it. Both orders are the same
    algorithm in the same precision; their rounding errors are independent draws."""
    if lowprec is None or not key_block:
        return quantize(p, lowprec)
    sk = s.shape[-1]
    nb = -(-sk // key_block)
    pad = np.full(s.shape[:-1] + (nb * key_block - sk,), -np.inf)
    blocks = np.concatenate([s, pad], axis=-1).reshape(s.shape[:-1] + (nb, key_block))
    row_max = m_safe[..., None]
    mb = blocks.max(axis=-1, keepdims=True)
    mb = np.where(np.isneginf(mb), row_max, mb)   # a block with no allowed key: all zero
    with np.errstate(invalid="ignore", over="ignore"):
        pb = quantize(np.exp(blocks - mb), lowprec) * np.exp(mb - row_max)
    return pb.reshape(s.shape[:-1] + (nb * key_block,))[..., :sk]


def dense_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None,
                  bias: np.ndarray | None, scale: float, softcap: float = 0.0,
                  window: tuple[int, int] = (-1, -1), sparse: np.ndarray | None = None,
                  lowprec: str | None = None,
                  key_block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """q (B,Sq,H,D), k/v (B,Sk,Hk,D); mask/bias/sparse broadcastable to (B,H,Sq,Sk).

    Returns out (B,Sq,H,D) float64 and lse (B,H,Sq) float64. A row with no allowed key gives
    out = 0 and lse = -inf. ``key_block`` (with ``lowprec``): P is rounded against the max of
    each block of that many keys instead of the row's (``rounded_p``).
    """
    b, sq, h, d = q.shape
    sk = k.shape[1]
    q, k, v = (quantize(np.asarray(a, dtype=np.float64), lowprec) for a in (q, k, v))
    kk = _heads_to(k, 2, h)
    vv = _heads_to(v, 2, h)
    s = np.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    if bias is not None:
        s = s + _heads_to(np.asarray(bias, dtype=np.float64), 1, h)
    s = quantize(s, None if lowprec is None else "float32")
    keep = keep_logits(s, keep_positions(b, h, sq, sk, window, mask, sparse))
    s = np.where(keep, s, -np.inf)
    m = s.max(axis=-1, keepdims=True) if sk > 0 else np.full((b, h, sq, 1), -np.inf)
    # Only a row with no allowed key (max -inf) is shifted by 0; a NaN logit at an allowed
    # position makes the max NaN, and the NaN flows into out and lse as in SDPA/FlashAttention.
    m_safe = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(s - m_safe)
    l_sum = p.sum(axis=-1, keepdims=True)
    p = rounded_p(s, m_safe, p, lowprec, key_block)
    with np.errstate(invalid="ignore"):
        num = np.einsum("bhqk,bkhd->bqhd", p, vv)
    l_t = np.transpose(l_sum[..., 0], (0, 2, 1))[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(l_t == 0, 0.0, num / np.where(l_t == 0, 1.0, l_t))
        lse = np.where(l_sum[..., 0] == 0, -np.inf, m_safe[..., 0] + np.log(l_sum[..., 0]))
    return quantize(out, lowprec), lse


def _varlen_slice(x: np.ndarray | None, qs: int, qe: int, ks: int, ke: int) -> np.ndarray | None:
    """A sequence's mask/bias as a 4-D (1, h', len_q|1, len_k) array, from either layout."""
    if x is None:
        return None
    if x.ndim == 3:   # query-based (total_q, h', max_seqlen_k)
        return np.transpose(x[qs:qe, :, : ke - ks], (1, 0, 2))[None]
    return np.transpose(x[ks:ke], (1, 0))[None, :, None, :]  # key-based (total_k, h')


def varlen_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, cu_q: np.ndarray,
                   cu_k: np.ndarray, mask: np.ndarray | None, bias: np.ndarray | None,
                   scale: float, softcap: float = 0.0, window: tuple[int, int] = (-1, -1),
                   lowprec: str | None = None,
                   key_block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Packed q (total_q,H,D), k/v (total_k,Hk,D). Returns out (total_q,H,D), lse (H,total_q).
    ``lowprec``, ``key_block``: as ``dense_forward``'s."""
    total_q, h, d = q.shape
    out = np.zeros((total_q, h, d), dtype=np.float64)
    lse = np.full((h, total_q), -np.inf, dtype=np.float64)
    cu_q = np.asarray(cu_q, dtype=np.int64)
    cu_k = np.asarray(cu_k, dtype=np.int64)
    for bi in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[bi]), int(cu_q[bi + 1]), int(cu_k[bi]), int(cu_k[bi + 1])
        if qe == qs:
            continue
        o, ls = dense_forward(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke],
                              _varlen_slice(mask, qs, qe, ks, ke),
                              _varlen_slice(bias, qs, qe, ks, ke), scale, softcap, window,
                              None, lowprec, key_block)
        out[qs:qe] = o[0]
        lse[:, qs:qe] = ls[0]
    return out, lse
