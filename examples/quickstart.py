"""Quickstart: attention with a key-padding mask, a per-kv-head key bias and the causal rule.

With a GPU the call runs the CUDA kernel (NVRTC compiles it on first use, ~a minute, then it
is cached) through CuPy; without one it runs the float64 reference backend on NumPy arrays and
says so. Either way the result is checked against an independent few-line NumPy softmax
attention written below (not the library's reference), so the printed error means something.
"""

from __future__ import annotations

import numpy as np

import dmattn_cupy as dm


def naive_attention(q, k, v, mask, bias, causal):
    """softmax(q k^T / sqrt(D) + bias, excluded -> -inf) v in float64, GQA by repetition."""
    q, k, v, bias = (np.asarray(a, np.float64) for a in (q, k, v, bias))
    rep = q.shape[2] // k.shape[2]
    k, v, bias = np.repeat(k, rep, 2), np.repeat(v, rep, 2), np.repeat(bias, rep, 1)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + bias
    sq, sk = s.shape[-2:]
    keep = mask & (np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq if causal else True)
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def gpu_available() -> bool:
    """A GPU that the CUDA kernels support (compute capability 8.0+); says why not otherwise."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() == 0:
            return False
    except Exception:
        return False
    from dmattn_cupy.device_check import require_supported_device

    try:
        require_supported_device(0)
    except RuntimeError as e:
        print(e)
        return False
    return True


def main() -> None:
    rng = np.random.default_rng(0)
    b, s, h, hk, d = 2, 256, 8, 2, 64                 # GQA: 8 query heads share 2 kv heads
    q = rng.standard_normal((b, s, h, d)).astype(np.float16)
    k = rng.standard_normal((b, s, hk, d)).astype(np.float16)
    v = rng.standard_normal((b, s, hk, d)).astype(np.float16)
    mask = np.ones((b, 1, 1, s), dtype=bool)          # key padding, broadcast over heads/rows
    mask[1, ..., 200:] = False
    bias = (0.1 * rng.standard_normal((b, hk, 1, s))).astype(np.float16)  # per kv head, key

    if gpu_available():
        import cupy

        out = dm.flash_dmattn_func(*(cupy.asarray(a) for a in (q, k, v, mask, bias)),
                                   is_causal=True)
        out = cupy.asnumpy(out)
        where = "CUDA backend (NVRTC-compiled kernel, CuPy arrays)"
    else:
        print("no supported GPU: running the float64 reference backend on NumPy arrays")
        out = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)
        where = "reference backend (NumPy)"
    want = naive_attention(q, k, v, mask, bias, causal=True)
    err = float(np.abs(out.astype(np.float64) - want).max())
    print(f"{where}: out {out.shape} {out.dtype}, max |out - naive NumPy attention| = {err:.2e}")
    assert np.isfinite(out).all() and err < 2e-2, "result does not match the naive attention"
    print("quickstart OK")


if __name__ == "__main__":
    main()
