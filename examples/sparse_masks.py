"""Block-sparse masks: one of each class, its memory against a dense bool mask, its estimated
speedup and, on a GPU, its measured speedup (CUDA events) and a check against the float64
reference backend. Without a GPU it runs the reference backend on small shapes and says so.

    python examples/sparse_masks.py                  # the tour
    python examples/sparse_masks.py --nbytes-table   # nbytes of each class at S=32768 (markdown)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np

import dmattn_cupy as dm

BLOCK = (128, 128)


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def random_blocks(s: int, density: float = 0.1, seed: int = 0) -> np.ndarray:
    """(S/128, S/128) bool: each 128x128 block kept with probability ``density``, and the
    diagonal blocks (every query keeps some keys)."""
    n = -(-s // BLOCK[0])
    bits = np.random.default_rng(seed).random((n, n)) < density
    np.fill_diagonal(bits, True)
    return bits


def gallery(s: int, to_device: Callable = lambda a: a) -> dict[str, tuple[dm.SparseMask, str]]:
    """One mask of each class over (S, S): name -> (mask, what it keeps). ``to_device`` puts the
    DynamicMask's buffers where the kernel reads them in place (``cupy.asarray`` on a GPU)."""
    bits = random_blocks(s)
    row_ptr = np.concatenate([[0], np.cumsum(bits.sum(axis=1))]).astype(np.int32)
    col_idx = np.nonzero(bits)[1].astype(np.int32)
    bitset = dm.BlockBitsetMask(bits, s, s, BLOCK)
    capacity = max(int(bits.sum(axis=1).max()), bits.shape[1] // 4)  # room for 25% density
    return {
        "CausalMask": (dm.CausalMask(s, s), "causal"),
        "WindowMask": (dm.WindowMask(1024, s, s), "abs(i - j) < 1024"),
        "CausalWindowMask": (dm.CausalWindowMask(1024, s, s), "causal, 1024 keys back"),
        "BlockBitsetMask": (bitset, "random 10% of 128x128 blocks + diagonal"),
        "BCSRMask": (dm.BCSRMask(row_ptr, col_idx, s, s, BLOCK), "the same blocks"),
        "DynamicMask": (dm.DynamicMask(to_device(bits), s, s, BLOCK, max_blocks_per_row=capacity),
                        f"the same blocks, rewritable (<= {capacity} per row)"),
        "MixedMask": (dm.MixedMask.from_mask(dm.CausalMask(s, s) & bitset),
                      "the same blocks & causal, exact"),
        "Causal & BlockBitset": (dm.CausalMask(s, s) & bitset, "the same, as an `&`"),
    }


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def kernel_list_bytes(mask: dm.SparseMask) -> int:
    """Bytes of what the CUDA kernel reads for ``mask`` (per-row block lists, plus a MixedMask's
    slots and element bits), built once per mask and device; 0 for parametric masks."""
    from dmattn_cupy.sparse_plan import host_arrays, split_sparse

    _, block = split_sparse(mask)
    if block is None:
        return 0
    arrays = host_arrays(block)
    return sum(a.nbytes for a in (arrays.full_count, arrays.full_idx, arrays.partial_count,
                                  arrays.partial_idx, arrays.partial_slot, arrays.partial_bits)
               if a is not None)


def nbytes_table(s: int = 32768) -> str:
    """Markdown: nbytes of each class at (S, S) against a dense bool mask of S*S bytes."""
    rows = [f"S = {s}, one head, 128x128 blocks. `nbytes`: what the mask holds; kernel reads: "
            "the block lists (and element bits) the CUDA kernel reads, built once per device.",
            "", "| class | pattern | blocks kept | nbytes | of dense bool | kernel reads |",
            "|---|---|---:|---:|---:|---:|",
            f"| dense bool `attn_mask` | any | - | {size(s * s)} | 100% | {size(s * s)} |"]
    for name, (mask, what) in gallery(s).items():
        rows.append(f"| {name} | {what} | {mask.density:.1%} | {size(mask.nbytes)} | "
                    f"{mask.nbytes / (s * s):.4%} | {size(kernel_list_bytes(mask))} |")
    return "\n".join(rows)


def time_ms(fn: Callable, reps: int = 20) -> float:
    """Median CUDA-event time of ``fn`` on the current CuPy stream, after two warm-up calls."""
    import cupy

    fn()
    fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def max_error_vs_reference(s: int, to_device: Callable, on_gpu: bool) -> dict[str, float]:
    """Each class on a small (1, S, 2, 64) problem: max |out - reference backend|. On a CPU the
    'out' is the reference backend given ``attn_mask=mask.to_dense()`` instead."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, s, 2, 64)).astype(np.float16) for _ in range(3))
    errors = {}
    for name, (mask, _) in gallery(s, to_device).items():
        ref = dm.flash_dmattn_func(q, k, v, sparse_mask=mask, backend="reference")
        if on_gpu:
            import cupy

            out = dm.flash_dmattn_func(*map(cupy.asarray, (q, k, v)), sparse_mask=mask)
            out = cupy.asnumpy(out)
        else:  # the same keep-pattern given as a dense (1, 1, S, S) bool attn_mask
            out = dm.flash_dmattn_func(q, k, v, attn_mask=mask.to_dense()[None, None],
                                       backend="reference")
        errors[name] = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max())
    return errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nbytes-table", action="store_true", help="print the nbytes table only")
    ap.add_argument("--seqlen", type=int, default=None, help="S (table: 32768; GPU tour: 8192)")
    a = ap.parse_args()
    if a.nbytes_table:
        print(nbytes_table(a.seqlen or 32768))
        return
    on_gpu = gpu_available()
    if on_gpu:
        import cupy

        to_device, s_check = cupy.asarray, 600
        s = a.seqlen or 8192
        print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}; timing "
              f"(1, {s}, 16, 128) fp16 against the same call with no mask")
    else:
        to_device, s_check, s = (lambda x: x), 300, a.seqlen or 4096
        print("no GPU found: reference backend only, small shapes, no timings")

    errors = max_error_vs_reference(s_check, to_device, on_gpu)
    masks = gallery(s, to_device)
    if on_gpu:
        q, k, v = (cupy.random.standard_normal((1, s, 16, 128)).astype(cupy.float16)
                   for _ in range(3))
        dense_ms = time_ms(lambda: dm.flash_dmattn_func(q, k, v))
        print(f"dense (no mask): {dense_ms:.3f} ms")
    print(f"\nS = {s}: a dense bool mask takes {size(s * s)}; check on S = {s_check} "
          f"against backend='reference'")
    print(f"{'class':<22}{'nbytes':>11}{'est. speedup':>14}{'measured':>10}{'max|err|':>10}")
    for name, (mask, _) in masks.items():
        measured = "-"
        if on_gpu:
            ms = time_ms(lambda m=mask: dm.flash_dmattn_func(q, k, v, sparse_mask=m))
            measured = f"{dense_ms / ms:.2f}x"
        print(f"{name:<22}{size(mask.nbytes):>11}{dm.estimate_speedup(mask):>13.2f}x"
              f"{measured:>10}{errors[name]:>10.1e}")
    assert max(errors.values()) < 2e-2, "a sparse result does not match the reference"
    print("sparse_masks OK")


if __name__ == "__main__":
    main()
