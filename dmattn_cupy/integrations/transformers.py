"""dmattn_cupy as a Hugging Face transformers attention implementation (transformers >= 4.48).

```python
from dmattn_cupy.integrations.transformers import register
register()                       # name "dmattn_cupy"; returns it
model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="dmattn_cupy")
# or, on a loaded model: model.set_attn_implementation("dmattn_cupy")  (transformers 5)
```

What it does, per attention layer:

- query/key/value arrive head-first ``(B, H, S, D)``; they are read as ``(B, S, H, D)`` views
  (no copy) and the output is returned as ``(B, Sq, H, D)``, what transformers expects. GQA
  key/value heads are used as they are (never repeated).
- transformers' attention mask passes through as a bool mask ``(B, 1, Sq, Sk)`` (padding,
  causal, sliding window, packed sequences: whatever the model built). On transformers >= 4.53
  the mask is built by ``sdpa_mask`` (registered for this name); a float (additive) mask from
  older versions is read as ``keep = mask > finfo.min / 2`` (transformers' masks hold 0 or the
  dtype's minimum). With no mask, causal layers use the kernel's causal rule, exactly as SDPA
  decides it (``is_causal`` kwarg, else ``module.is_causal``; never for one query).
- ``scaling``, ``softcap`` (Gemma 2) and ``sliding_window`` (window ``(sliding_window - 1,
  -1)``) are honoured; ``dropout > 0`` raises (not supported); attention weights are never
  returned (``None``).
- an optional bias: the ``attention_bias`` keyword of the model call (transformers forwards
  extra keywords to the attention functions) or the attribute ``module.dmattn_attention_bias``:
  a tensor broadcastable to ``(B, H|Hk|1, Sq|1, Sk)``, a list/tuple/dict indexed by
  ``module.layer_idx`` (one per layer), or a callable ``f(module, query, key) -> tensor``.
- gradients flow through torch autograd (dq, dk, dv and the bias's).

transformers is an optional dependency: this module imports it only in ``register()``.
"""

from __future__ import annotations

from typing import Any

from ..api import flash_dmattn_func

NAME = "dmattn_cupy"


def _layer_bias(module: Any, query: Any, key: Any, bias: Any) -> Any:
    if bias is None:
        bias = getattr(module, "dmattn_attention_bias", None)
    if bias is None:
        return None
    if callable(bias) and not hasattr(bias, "shape"):
        return bias(module, query, key)
    if isinstance(bias, (list, tuple, dict)):
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            raise ValueError("a per-layer attention_bias (list/tuple/dict) needs module.layer_idx")
        return bias[idx]
    return bias


def _bool_mask(mask: Any, sk: int) -> Any:
    import torch

    if mask is None:
        return None
    if mask.ndim == 4 and mask.shape[-1] != sk:
        mask = mask[..., :sk]   # as eager attention does with a static cache
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask


def attention_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                      dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, softcap: float | None = None,
                      sliding_window: int | None = None, attention_bias: Any = None,
                      **kwargs: Any) -> tuple[Any, None]:
    """The ``AttentionInterface`` function: returns ``(out (B, Sq, H, D), None)``."""
    if dropout and dropout > 0:
        raise ValueError(f"dmattn_cupy attention has no dropout (got dropout={dropout}); set the "
                         "model's attention_dropout to 0 or call model.eval()")
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = _bool_mask(attention_mask, kv_len)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_len > 1 and mask is None and causal)
    bias = _layer_bias(module, query, key, attention_bias)
    if causal and kv_len > q_len:
        # no mask and more keys than queries: SDPA's causal rule is top-left (an empty static
        # cache during prefill); keep its meaning by cropping the unused keys
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if bias is not None and bias.shape[-1] == kv_len:
            bias = bias[..., :q_len]
    window = (-1, -1)
    if sliding_window is not None and sliding_window > 0:
        window = (int(sliding_window) - 1, -1)
    out = flash_dmattn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                            attn_mask=mask, attn_bias=bias, softmax_scale=scaling,
                            is_causal=causal, window_size=window,
                            softcap=float(softcap) if softcap else 0.0)
    return out, None


def register(name: str = NAME) -> str:
    """Register ``attention_forward`` (and, where transformers has one, the SDPA-style bool
    mask builder) under ``name``; returns ``name`` for ``attn_implementation=``."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        try:  # releases between 4.48 and the AttentionInterface class: a plain mapping
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        except ImportError as e:  # transformers missing or older than 4.48
            raise ImportError("dmattn_cupy.integrations.transformers needs transformers >= "
                              "4.48 (pip install 'transformers>=4.48')") from e
        ALL_ATTENTION_FUNCTIONS[name] = attention_forward
    else:
        AttentionInterface.register(name, attention_forward)
    try:  # transformers >= 4.53 builds masks per implementation
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        pass
    else:
        AttentionMaskInterface.register(name, sdpa_mask)
    return name
