"""GPU time of small-batch decode steps, ours against cuDNN, without host time.

    PYTHONPATH=$PWD python3 tools/decode_latency.py [--shapes 1x8192,1x32768,4x16384,8x32768]

The decode case of tools/bench (H32/Hk8, d128 bf16, key-based (total_k, Hk) bool mask with 90%
kept + bf16 bias, one query per sequence) at batch x keys given per shape. Each call is
captured 50 times in a CUDA graph and replayed (best of 5 replays), so a step's launch and
host costs are not counted: at batch 1 a step is ~10-50 us of GPU time, less than its host
time. cuDNN runs the padded batch with the mask folded into an additive (B, H, 1, Sk) bias.
Split counts follow the library's rule unless DMATTN_NUM_SPLITS forces one.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

H, HK, D, KEEP, CALLS = 32, 8, 128, 0.9, 50


def graph_us(torch: Any, fn: Callable[[], Any]) -> float:
    """Microseconds per call of ``fn`` replayed from a CUDA graph of CALLS calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(5):   # compile, load and cache plans outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / CALLS)
    return best


def measure(batch: int, seqlen_k: int) -> str:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import dmattn_cupy as dm

    dt, dev = torch.bfloat16, "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    tk = batch * seqlen_k
    q = torch.randn(batch, H, D, generator=gen, device=dev, dtype=dt)
    k = torch.randn(tk, HK, D, generator=gen, device=dev, dtype=dt)
    v = torch.randn(tk, HK, D, generator=gen, device=dev, dtype=dt)
    mask = torch.rand(tk, HK, generator=gen, device=dev) < KEEP
    mask.view(batch, seqlen_k, HK)[:, -1] = True   # never an empty row
    bias = torch.randn(tk, HK, generator=gen, device=dev, dtype=dt)
    cu_q = torch.arange(0, batch + 1, device=dev, dtype=torch.int32)
    cu_k = cu_q * seqlen_k
    qp = q.view(batch, 1, H, D).transpose(1, 2)
    kp, vp = (x.view(batch, seqlen_k, HK, D).transpose(1, 2) for x in (k, v))
    add = torch.where(mask, bias, torch.tensor(float("-inf"), dtype=dt, device=dev))
    am = add.view(batch, seqlen_k, HK).permute(0, 2, 1).repeat_interleave(H // HK, 1)
    am = am[:, :, None].contiguous()

    def ours() -> Any:
        return dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, 1, seqlen_k, attn_mask=mask,
                                           attn_bias=bias)

    def cudnn() -> Any:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=am,
                                                                    enable_gqa=True)

    t_ours, t_cudnn = graph_us(torch, ours), graph_us(torch, cudnn)
    nbytes = 2 * tk * HK * D * 2 + tk * HK * 3
    return (f"B{batch} Sk{seqlen_k}: dmattn {t_ours:.1f} us ({nbytes / t_ours / 1e3:.0f} GB/s), "
            f"cuDNN {t_cudnn:.1f} us, dmattn / cuDNN speed {t_cudnn / t_ours:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x8192,1x32768,4x16384,8x32768",
                    help="comma list of BATCHxKEYS")
    args = ap.parse_args(argv)
    for item in args.shapes.split(","):
        b, _, s = item.partition("x")
        if not (b.isdigit() and s.isdigit()):
            raise SystemExit(f"--shapes: {item!r} is not BATCHxKEYS (e.g. 1x8192)")
        print(measure(int(b), int(s)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
