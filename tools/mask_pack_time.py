"""Time of ``MixedMask.from_dense_mask`` on the GPU for the bench's two mask shapes (a full
random (2, 16, 4096, 4096) mask, a (2, 1, 4096, 4096) document mask), under the current
``DMATTN_MASK_PACK`` (0: CuPy array operations, 1: the mask packing kernel).

    DMATTN_MASK_PACK=1 PYTHONPATH=$PWD python3 tools/mask_pack_time.py [--reps N]

Two warm calls, then the mean of N calls between device synchronizations (the call syncs
itself once, to size the partial blocks' bits)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    import cupy

    import dmattn_cupy as dm

    g = cupy.random.default_rng(0)
    full = g.random((2, 16, 4096, 4096), dtype=cupy.float32) < 0.9
    ids = cupy.repeat(cupy.arange(8), 512)            # 8 documents of 512 keys
    doc = cupy.ascontiguousarray(cupy.broadcast_to(
        (ids[:, None] == ids[None, :])[None, None], (2, 1, 4096, 4096)))
    switch = os.environ.get("DMATTN_MASK_PACK", "0")
    for name, mask in (("full (2, 16, 4096, 4096)", full), ("document (2, 1, 4096, 4096)", doc)):
        for _ in range(2):
            dm.MixedMask.from_dense_mask(mask)
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(args.reps):
            dm.MixedMask.from_dense_mask(mask)
        cupy.cuda.Device().synchronize()
        ms = (time.perf_counter() - t0) / args.reps * 1e3
        print(f"DMATTN_MASK_PACK={switch} from_dense_mask {name}: {ms:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
