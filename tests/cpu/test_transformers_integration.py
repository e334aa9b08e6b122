"""CPU test of ``dmattn_cupy.integrations.transformers`` on the reference backend (float32 CPU
torch tensors): a small randomly initialised Llama-style model matches transformers' SDPA
(logits of a left-padded batch, greedy ``generate()`` with the KV cache, gradients, a per-layer
bias). Skips, with the reason, when transformers is not installed (CI does not install it)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(optional: pip install 'transformers>=4.48')")

from dmattn_cupy.integrations import transformers as dmt  # noqa: E402


def tiny_llama(impl):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=128, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    set_impl(model, impl)
    return model


def set_impl(model, impl):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def batch():
    ids = torch.tensor([[0, 0, 0, 5, 17, 33, 2, 9, 41, 7],
                        [3, 8, 13, 21, 34, 55, 89, 1, 2, 3]])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                     # left padding
    return ids, mask


def test_register_returns_name():
    assert dmt.register() == "dmattn_cupy"
    from transformers import AttentionInterface

    assert "dmattn_cupy" in AttentionInterface._global_mapping


def test_llama_logits_match_sdpa_left_padded():
    name = dmt.register()
    model = tiny_llama("sdpa")
    ids, mask = batch()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        set_impl(model, name)
        out = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.allclose(out[valid], ref[valid], atol=1e-4, rtol=1e-4)
    with torch.no_grad():             # no padding: the mask may be skipped (causal rule)
        out1 = model(input_ids=ids[1:]).logits
    assert torch.allclose(out1[0], ref[1], atol=1e-4, rtol=1e-4)


def test_llama_generate_with_kv_cache_matches_sdpa():
    name = dmt.register()
    model = tiny_llama(name)
    ids, mask = batch()
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    set_impl(model, "sdpa")
    full = gen.sequences
    full_mask = torch.cat([mask, torch.ones(2, full.shape[1] - ids.shape[1], dtype=mask.dtype)],
                          1)
    with torch.no_grad():
        ref = model(input_ids=full, attention_mask=full_mask).logits
    for step, logits in enumerate(gen.logits):   # step t predicts token ids.shape[1] + t
        pos = ids.shape[1] + step - 1
        assert torch.allclose(logits, ref[:, pos], atol=1e-4, rtol=1e-4), step


def test_llama_gradients_match_sdpa():
    name = dmt.register()
    ids, mask = batch()
    grads = {}
    for impl in ("sdpa", name):
        model = tiny_llama(impl)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()
                       if "self_attn" in n}
    for n, g in grads["sdpa"].items():
        assert torch.allclose(grads[name][n], g, atol=1e-5, rtol=1e-4), n


def test_per_layer_bias_reaches_attention():
    name = dmt.register()
    model = tiny_llama(name)
    ids, _ = batch()
    zero = [torch.zeros(1, 1, 1, ids.shape[1]) for _ in range(2)]
    with torch.no_grad():
        base = model(input_ids=ids).logits
        same = model(input_ids=ids, attention_bias=zero).logits
        bias = [torch.zeros(1, 1, 1, ids.shape[1]), torch.zeros(1, 1, 1, ids.shape[1])]
        bias[1][..., 0] = -1e4                        # layer 1 never looks at token 0
        moved = model(input_ids=ids, attention_bias=bias).logits
    assert torch.allclose(same, base)
    assert not torch.allclose(moved[:, 1:], base[:, 1:])
    # the same effect through a mask on the reference: SDPA with token 0 hidden in layer 1
    b = torch.zeros(1, 1, 1, ids.shape[1], requires_grad=True)
    model(input_ids=ids, attention_bias=lambda m, q, k: b).logits.sum().backward()
    assert b.grad is not None and b.grad.shape == b.shape


def test_dropout_rejected():
    import types

    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match=r"no dropout"):
        dmt.attention_forward(types.SimpleNamespace(is_causal=True), q, q, q, None, dropout=0.1)


def test_register_without_transformers_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "transformers.modeling_utils", None)
    with pytest.raises(ImportError, match=r"needs transformers >= 4.48"):
        dmt.register()
