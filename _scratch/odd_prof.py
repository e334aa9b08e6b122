import time

import torch
from torch.profiler import ProfilerActivity, profile

import dmattn_cupy as dm

S = 2527
q, k, v = (torch.randn(2, S, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
m = torch.rand(2, 1, S, S, device="cuda") > 0.1
b = torch.randn(2, 16, S, S, device="cuda", dtype=torch.bfloat16)
for name, kw in (("mask", {"attn_mask": m}), ("bias", {"attn_bias": b})):
    for _ in range(3):
        dm.flash_dmattn_func(q, k, v, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dm.flash_dmattn_func(q, k, v, **kw)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"{name}: host {1e3 * (t1 - t0) / 10:.3f} ms/call, wall {1e3 * (t2 - t0) / 10:.3f}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            dm.flash_dmattn_func(q, k, v, **kw)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=8, max_name_column_width=60))
