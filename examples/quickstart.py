"""Quickstart: attention with a key-padding mask and a key-side bias, checked against the
float64 reference. Runs on a GPU (CUDA backend) or, without one, on the reference backend."""

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
    b, s, h, hk, d = 2, 256, 8, 2, 64
    q = rng.standard_normal((b, s, h, d)).astype(np.float16)
    k = rng.standard_normal((b, s, hk, d)).astype(np.float16)
    v = rng.standard_normal((b, s, hk, d)).astype(np.float16)
    mask = np.ones((b, 1, 1, s), dtype=bool)       # key padding: broadcast over heads/queries
    mask[1, ..., 200:] = False
    bias = (0.1 * rng.standard_normal((b, hk, 1, s))).astype(np.float16)  # per kv head, key

    ref = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True,
                               backend="reference")
    if gpu_available():
        import cupy

        out = dm.flash_dmattn_func(*(cupy.asarray(a) for a in (q, k, v, mask, bias)),
                                   is_causal=True)
        out = cupy.asnumpy(out)
        where = "CUDA backend (NVRTC-compiled kernel)"
    else:
        print("no GPU found: running on the float64 reference backend")
        out = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)
        where = "reference backend"
    err = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max())
    print(f"{where}: out {out.shape} {out.dtype}, max |out - reference| = {err:.2e}")
    assert np.isfinite(out).all() and err < 2e-2, "result does not match the reference"
    print("quickstart OK")


if __name__ == "__main__":
    main()
