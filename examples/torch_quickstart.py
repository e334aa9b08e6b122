"""torch quickstart: dmattn_cupy on torch tensors, with autograd, checked against torch SDPA.

CUDA tensors run the CUDA kernels in place (no copy, torch's current stream). CPU tensors run
the float64 reference backend (exact, slow) with the same autograd support, so this example
runs anywhere torch does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dmattn_cupy as dm


def main() -> None:
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    b, s, h, d = 2, 128, 4, 64
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    bias = torch.zeros(1, h, 1, s, device=device, dtype=dtype, requires_grad=True)  # learnable
    keep = torch.rand(b, 1, s, s, device=device) > 0.2                            # a bool mask

    out = dm.flash_dmattn_func(q, k, v, attn_mask=keep, attn_bias=bias, is_causal=True)
    out.float().square().mean().backward()          # grads for q, k, v and the bias

    # the same thing with torch SDPA (layout (B, H, S, D), mask as an additive bias)
    causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
    allowed = keep & causal
    add = torch.where(allowed, bias.float(), float("-inf"))
    ref = F.scaled_dot_product_attention(*(x.detach().float().transpose(1, 2) for x in (q, k, v)),
                                         attn_mask=add.detach()).transpose(1, 2)
    rows = allowed.any(-1).transpose(1, 2).unsqueeze(-1)   # rows with at least one key
    err = (out.float() - ref).abs().masked_fill(~rows, 0).max().item()
    print(f"{'CUDA kernels' if cuda else 'reference backend (CPU)'}: out {tuple(out.shape)} "
          f"{out.dtype}; max |out - SDPA| = {err:.2e}; bias.grad {tuple(bias.grad.shape)}")
    assert err < (3e-2 if cuda else 1e-4) and torch.isfinite(q.grad).all()
    print("torch quickstart OK")


if __name__ == "__main__":
    main()
