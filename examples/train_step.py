"""Train a tiny attention layer with a learned key-side bias for a few steps on the GPU.

The bias (1, heads, 1, seqlen) is a parameter; dmattn_cupy's backward returns its gradient in
that broadcast shape (summed over batch and queries in the kernel). The task: copy the value
at one fixed key position, which a learned key-side bias can solve alone. Checks that the loss
falls. Without a GPU it runs the float64 reference backend (slower, same semantics).
"""

from __future__ import annotations

import torch

import dmattn_cupy as dm


def main() -> None:
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float64)
    batch, seqlen, heads, head_dim, target = 4, 128 if cuda else 32, 2, 32, 5
    proj = torch.nn.Linear(head_dim, 2 * head_dim, device=device, dtype=dtype)
    bias = torch.nn.Parameter(torch.zeros(1, heads, 1, seqlen, device=device, dtype=dtype))
    opt = torch.optim.Adam([{"params": proj.parameters(), "lr": 1e-2},
                            {"params": [bias], "lr": 0.3}])
    losses = []
    for step in range(30):
        x = torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype)
        q, k = proj(x).view(batch, seqlen, heads, 2, head_dim).unbind(3)
        out = dm.flash_dmattn_func(q, k, x, attn_bias=bias)
        want = x[:, target:target + 1].expand_as(out)  # copy the value at key `target`
        loss = (out.float() - want.float()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == 29:
            print(f"step {step:2d}  loss {loss.item():.4f}  bias[target] "
                  f"{bias[0, 0, 0, target].item():+.3f}")
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.5 * first, f"loss did not fall enough: {first:.4f} -> {last:.4f}"
    print(f"ok: loss {first:.4f} -> {last:.4f} on {device}")


if __name__ == "__main__":
    main()
