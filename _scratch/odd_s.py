# HF-style (B,1,S,S) bool mask and a (B,H,S,S) bias tile at an odd and an even S: dmattn vs
# SDPA cuDNN (mask as an additive bf16 bias), CUDA events, B2 H16 d128 bf16.
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import dmattn_cupy as dm


def t(f, n=20):
    for _ in range(3):
        f()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        f()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


for what in ("mask", "bias", "kbias"):
    for S in (2527, 2528):
        q, k, v = (torch.randn(2, S, 16, 128, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
        m = b = None
        if what == "mask":
            m = torch.rand(2, 1, S, S, device="cuda") > 0.1
            add = torch.zeros(2, 1, S, S, device="cuda", dtype=torch.bfloat16).masked_fill(
                ~m, float("-inf"))
        elif what == "bias":
            b = add = torch.randn(2, 16, S, S, device="cuda", dtype=torch.bfloat16)
        else:
            b = add = torch.randn(2, 16, 1, S, device="cuda", dtype=torch.bfloat16)
        ours = t(lambda: dm.flash_dmattn_func(q, k, v, attn_mask=m, attn_bias=b))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            try:
                peer = t(lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=add))
            except RuntimeError:
                peer = float("nan")
        fl = 4 * 2 * 16 * S * S * 128 / 1e9
        print(f"{what:6s} S={S}: dmattn {ours:.3f} ms ({fl / ours:.1f} TFLOP/s)  "
              f"cudnn {peer:.3f} ms ({fl / peer:.1f})  ratio {peer / ours:.2f}x", flush=True)
