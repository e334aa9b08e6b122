"""Key-gated decoding: one new query per sequence against each sequence's KV cache, with a
key-based mask and bias (one value per cached key and kv head, shared by every query head of
the group), checked against the float64 reference backend.

A key-based (total_k, Hk) mask/bias costs O(total_k * Hk) bytes; the query-based layout
(total_q, H, max_seqlen_k) would repeat it per query head and pad every sequence to the
longest one. On a GPU the CUDA backend runs the decode kernel (GQA packing, split-KV chosen from
the shapes); without one the example runs on the reference backend and says so.
"""

from __future__ import annotations

import numpy as np

import dmattn_cupy as dm


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def main() -> None:
    rng = np.random.default_rng(0)
    h, hk, d = 16, 4, 128                     # 4 query heads share each kv head
    lens_k = np.array([1500, 37, 0, 4096, 800])  # cached keys per sequence (one is empty)
    lens_q = np.ones_like(lens_k)              # one new token per sequence
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q = rng.standard_normal((tq, h, d)).astype(np.float16)
    k = rng.standard_normal((tk, hk, d)).astype(np.float16)
    v = rng.standard_normal((tk, hk, d)).astype(np.float16)
    # Key gate: e.g. evicted / filtered cache entries per kv head, plus a per-key score bias.
    gate = rng.random((tk, hk)) < 0.8
    bias = (0.5 * rng.standard_normal((tk, hk))).astype(np.float16)
    args = (cu_q, cu_k, int(lens_q.max()), int(lens_k.max()))

    ref, ref_lse = dm.flash_dmattn_varlen_func(q, k, v, *args, attn_mask=gate, attn_bias=bias,
                                               return_lse=True, backend="reference")
    if gpu_available():
        import cupy

        dev = [cupy.asarray(a) for a in (q, k, v, cu_q, cu_k)]
        out, lse = dm.flash_dmattn_varlen_func(*dev[:3], dev[3], dev[4], *args[2:],
                                               attn_mask=cupy.asarray(gate),
                                               attn_bias=cupy.asarray(bias), return_lse=True)
        out, lse = cupy.asnumpy(out), cupy.asnumpy(lse)
        where = "CUDA backend (decode kernel)"
    else:
        print("no GPU found: running on the float64 reference backend")
        out, lse = dm.flash_dmattn_varlen_func(q, k, v, *args, attn_mask=gate, attn_bias=bias,
                                               return_lse=True)
        where = "reference backend"
    err = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max())
    fin = np.isfinite(ref_lse)
    lse_err = float(np.abs(lse[fin] - ref_lse[fin]).max())
    kbased = gate.nbytes + bias.nbytes
    qbased = tq * h * int(lens_k.max()) * (1 + bias.itemsize)
    print(f"{where}: out {out.shape} {out.dtype}, max |out - reference| = {err:.2e}, "
          f"max |lse - reference| = {lse_err:.2e}")
    print(f"key-based mask+bias: {kbased / 1e3:.1f} kB; the query-based layout would need "
          f"{qbased / 1e3:.1f} kB ({qbased / kbased:.1f}x)")
    empty = int(np.flatnonzero(lens_k == 0)[0])  # a sequence with no keys: out 0, lse -inf
    assert (out[empty] == 0).all() and np.isneginf(lse[:, empty]).all()
    assert np.isfinite(out).all() and err < 2e-2 and lse_err < 1e-2, "result differs"
    print("varlen_decode_kbased OK")


if __name__ == "__main__":
    main()
