"""The transformers integration on the GPU: a small randomly initialised Llama-style model
(GQA, fp16/bf16) with ``attn_implementation="dmattn_cupy"`` matches transformers' SDPA: logits
of a left-padded batch, greedy ``generate()`` with the KV cache (each step's logits), and
gradients. The yardstick is a float32 SDPA run of the same weights: dmattn's error must be
within 2x SDPA's own low-precision error plus a small eps (FlashAttention's rule). Skips, with
the reason, when transformers is not installed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers", reason="transformers is not installed (optional: "
                    "pip install 'transformers>=4.48')")

from dmattn_cupy.integrations import transformers as dmt  # noqa: E402

pytestmark = pytest.mark.gpu


def set_impl(model, impl):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def models(dtype):
    """(dmattn model in dtype, SDPA model in dtype, SDPA model in float32), same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    name = dmt.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=32, max_position_embeddings=512, pad_token_id=0)
    base = LlamaForCausalLM(cfg).eval()
    out = []
    for impl, dt in ((name, dtype), ("sdpa", dtype), ("sdpa", torch.float32)):
        m = LlamaForCausalLM(cfg).eval()
        m.load_state_dict(base.state_dict())
        m = m.to(device="cuda", dtype=dt)
        set_impl(m, impl)
        out.append(m)
    return out


def batch(n=70):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (3, n), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :17] = 0
    mask[2, :41] = 0
    ids[mask == 0] = 0
    return ids.cuda(), mask.cuda()


def fa_rule(got, low, ref, what, eps=1e-3):
    err = (got.float() - ref).abs().max().item()
    tol = 2 * (low.float() - ref).abs().max().item() + eps
    assert err <= tol, f"{what}: max|dmattn - fp32| = {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_llama_logits_left_padded(dtype):
    dm_model, sdpa_low, sdpa32 = models(dtype)
    ids, mask = batch()
    with torch.no_grad():
        got = dm_model(input_ids=ids, attention_mask=mask).logits
        low = sdpa_low(input_ids=ids, attention_mask=mask).logits
        ref = sdpa32(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    fa_rule(got[valid], low[valid], ref[valid], "logits")


def test_llama_generate_kv_cache():
    dm_model, sdpa_low, sdpa32 = models(torch.float16)
    ids, mask = batch(40)
    gen = dm_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                            do_sample=False, output_logits=True, return_dict_in_generate=True,
                            pad_token_id=0)
    seq = gen.sequences
    full_mask = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - ids.shape[1],
                                            dtype=mask.dtype, device="cuda")], 1)
    with torch.no_grad():
        ref = sdpa32(input_ids=seq, attention_mask=full_mask).logits
        low = sdpa_low(input_ids=seq, attention_mask=full_mask).logits
    for step, logits in enumerate(gen.logits):
        pos = ids.shape[1] + step - 1
        fa_rule(logits, low[:, pos], ref[:, pos], f"generate step {step}", eps=2e-3)


def test_llama_gradients():
    dm_model, sdpa_low, sdpa32 = models(torch.bfloat16)
    ids, mask = batch()
    grads = []
    for m in (dm_model, sdpa_low, sdpa32):
        m.train()
        labels = ids.masked_fill(mask == 0, -100)
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.float() for n, p in m.named_parameters()
                      if "self_attn" in n or "embed" in n})
    for n in grads[2]:
        scale = grads[2][n].abs().max().item()
        fa_rule(grads[0][n], grads[1][n], grads[2][n], f"grad {n}", eps=1e-2 * scale + 1e-6)
