"""The float64 CPU reference of the backward pass (analytic, NumPy), for every forward feature.

With logits x = softcap(scale * q.k) + bias (excluded positions -inf), P = softmax(x) and
O = P V: dV = P^T dO, dP = dO V^T, dx = P * (dP - rowsum(dO * O) + dlse), dbias = dx summed
over the bias's broadcast dims, d(q.k) = dx * scale * (1 - tanh^2) (softcap) or dx * scale,
dQ = d(q.k) K, dK = d(q.k)^T Q; dK/dV are summed over each kv head's query-head group.
"""

from __future__ import annotations

import numpy as np

from .reference import _heads_to, _varlen_slice, keep_logits, keep_positions


def reduce_to_shape(full: np.ndarray, shape: tuple[int, ...], heads: int) -> np.ndarray:
    """Sum a (B, H, Sq, Sk) gradient down to a broadcast (b|1, H|Hk|1, Sq|1, Sk|1) shape."""
    g = full
    nh = shape[1]
    if nh != heads:
        if nh == 1:
            g = g.sum(axis=1, keepdims=True)
        else:
            b, _, sq, sk = g.shape
            g = g.reshape(b, nh, heads // nh, sq, sk).sum(axis=2)
    for ax in (0, 2, 3):
        if shape[ax] == 1 and g.shape[ax] != 1:
            g = g.sum(axis=ax, keepdims=True)
    return g


def dense_backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None,
                   bias: np.ndarray | None, dout: np.ndarray, scale: float, softcap: float = 0.0,
                   window: tuple[int, int] = (-1, -1), sparse: np.ndarray | None = None,
                   dlse: np.ndarray | None = None):
    """Gradients (dq, dk, dv, dbias) in float64; dbias has the bias's shape (None without)."""
    q, k, v, dout = (np.asarray(a, dtype=np.float64) for a in (q, k, v, dout))
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    kk = _heads_to(k, 2, h)
    vv = _heads_to(v, 2, h)
    s0 = np.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap > 0:
        t = np.tanh(s0 / softcap)
        s = softcap * t
    else:
        t = None
        s = s0
    if bias is not None:
        s = s + _heads_to(np.asarray(bias, dtype=np.float64), 1, h)
    keep = keep_logits(s, keep_positions(b, h, sq, sk, window, mask, sparse))
    s = np.where(keep, s, -np.inf)
    m = s.max(axis=-1, keepdims=True) if sk > 0 else np.full((b, h, sq, 1), -np.inf)
    m_safe = np.where(np.isneginf(m), 0.0, m)  # a NaN logit propagates (see reference.py)
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.where(keep, np.exp(s - m_safe), 0.0)
    l_sum = p.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):   # excluded positions stay 0 beside a NaN row sum
        p = np.where(keep, p / np.where(l_sum == 0, 1.0, l_sum), 0.0)
    out = np.einsum("bhqk,bkhd->bqhd", p, vv)
    dv_full = np.einsum("bhqk,bqhd->bkhd", p, dout)
    dp = np.einsum("bqhd,bkhd->bhqk", dout, vv)
    dsum = np.einsum("bqhd,bqhd->bhq", dout, out)
    if dlse is not None:
        dsum = dsum - np.asarray(dlse, dtype=np.float64)
    dx = p * (dp - dsum[..., None])
    ds = dx * (1.0 - t * t) if t is not None else dx
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kk) * scale
    dk_full = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dk = dk_full.reshape(b, sk, hk, h // hk, d).sum(axis=3)
    dv = dv_full.reshape(b, sk, hk, h // hk, d).sum(axis=3)
    dbias = None if bias is None else reduce_to_shape(dx, np.shape(bias), h)
    return dq, dk, dv, dbias


def varlen_backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, cu_q: np.ndarray,
                    cu_k: np.ndarray, mask: np.ndarray | None, bias: np.ndarray | None,
                    dout: np.ndarray, scale: float, softcap: float = 0.0,
                    window: tuple[int, int] = (-1, -1), dlse: np.ndarray | None = None):
    """Packed q (total_q,H,D), k/v (total_k,Hk,D); dbias in the bias's (varlen) layout."""
    dq = np.zeros(q.shape, dtype=np.float64)
    dk = np.zeros(k.shape, dtype=np.float64)
    dv = np.zeros(v.shape, dtype=np.float64)
    dbias = None if bias is None else np.zeros(np.shape(bias), dtype=np.float64)
    cu_q = np.asarray(cu_q, dtype=np.int64)
    cu_k = np.asarray(cu_k, dtype=np.int64)
    for bi in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[bi]), int(cu_q[bi + 1]), int(cu_k[bi]), int(cu_k[bi + 1])
        if qe == qs:
            continue
        bslice = _varlen_slice(bias, qs, qe, ks, ke)
        g = dense_backward(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke],
                           _varlen_slice(mask, qs, qe, ks, ke), bslice, dout[None, qs:qe],
                           scale, softcap, window, None,
                           None if dlse is None else np.asarray(dlse)[None, :, qs:qe])
        dq[qs:qe] = g[0][0]
        dk[ks:ke] += g[1][0]
        dv[ks:ke] += g[2][0]
        if bias is not None:
            db = g[3][0]  # (h', len_q | 1, len_k)
            if np.ndim(bias) == 3:
                dbias[qs:qe, :, : ke - ks] += np.transpose(db, (1, 0, 2))
            else:
                dbias[ks:ke] += np.transpose(db[:, 0, :], (1, 0))
    return dq, dk, dv, dbias
