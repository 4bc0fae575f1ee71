"""Gemma attention: projections, QK-norm, RoPE, KV cache, and the attention backends.

Backends:
- "eager": the reference path, exact for every variant (soft-cap, sliding window, GQA/MQA,
  query_pre_attn_scalar, QK-norm). Everything else is tested against it.
- "sdpa": torch's fused kernel through transformers' integration. It cannot soft-cap scores,
  so it is refused loudly for configs with `attn_logit_softcapping` (Gemma 2), naming the exact
  backends, and allowed where it is exact (Gemma 1, Gemma 3, a Gemma 2 config without the cap).
  Stock transformers 5.23 (the pinned release) refuses too, more bluntly: its Gemma 2 classes set
  `_supports_sdpa = False`, so asking for sdpa (from_pretrained, from_config,
  set_attn_implementation) raises its generic "does not support ... scaled_dot_product_attention
  yet" ValueError for every Gemma 2 config, capped or not, and a config switched to sdpa behind
  the model's back fails at the first forward ("`sdpa` attention does not support `softcap`").
  Neither drops the cap silently; tests/test_attention_backends.py pins stock's behaviour.
- Attention maps (`output_attentions=True`) exist only on "eager"; the other backends never
  materialise them, and modeling.py refuses the request there.
- "flex_attention", "flash_attention_2"/"_3": transformers' integrations, which apply the
  soft-cap (score_mod / softcap argument) and the sliding window. flex_attention is refused on
  CPU: with torch 2.13 its compiled CPU kernel returned NaN or wrong values once a process had
  run both padded and unpadded batches (stock transformers' Gemma 2 too; see
  tests/test_attention_backends.py). It is meant for CUDA training. Its semantics (the block
  mask built from our config, the soft-cap score_mod) are tested on CPU through torch's
  uncompiled flex_attention in tests/test_flex_semantics.py.

Masks come from transformers' masking utilities (one per layer type, built once per forward
in modeling.py) and the cache is a transformers `Cache`, whose sliding layers keep at most
`sliding_window` keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration import SLIDING, GemmaHFConfig
from .layers import GemmaLinear, GemmaRMSNorm, apply_rotary


class SoftcapUnsupportedError(ValueError):
    """Raised when an attention backend that cannot soft-cap is asked to run a soft-capped model."""


class BackendUnavailableError(RuntimeError):
    """Raised when an attention backend is known to give wrong results on this device."""


# Backends that apply `softcap=` exactly. sdpa is absent on purpose: it has no score modifier.
SOFTCAP_CAPABLE = ("eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def softcap_error(implementation: str, cap: float) -> SoftcapUnsupportedError:
    return SoftcapUnsupportedError(
        f"attn_implementation={implementation!r} cannot apply the attention logit soft-cap "
        f"(attn_logit_softcapping={cap}); running it would silently change the model. Use "
        f"attn_implementation='eager' (exact, any device), 'flex_attention' or 'flash_attention_2' "
        f"(GPU). Only if you really want an uncapped approximation, set "
        f"config.attn_logit_softcapping=None yourself."
    )


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, kv_heads, seq, dim] -> [batch, kv_heads * groups, seq, dim] (GQA/MQA)."""
    if groups == 1:
        return x
    batch, kv_heads, seq, dim = x.shape
    return x[:, :, None].expand(batch, kv_heads, groups, seq, dim).reshape(batch, kv_heads * groups, seq, dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention. Order matters: scale, soft-cap, add the mask, softmax in fp32."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        # The mask is additive (0 / dtype-min) and already covers causality, padding and the window.
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def attention_function(config: GemmaHFConfig, device: torch.device) -> Callable:
    """The attention callable for `config._attn_implementation`, refusing inexact combinations."""
    implementation = config._attn_implementation or "eager"
    if implementation == "eager":
        return eager_attention_forward
    if implementation == "flex_attention" and device.type == "cpu":
        raise BackendUnavailableError(
            "attn_implementation='flex_attention' is refused on CPU: with torch 2.13 the compiled CPU "
            "kernel returned NaN or wrong values after a process ran both padded and unpadded batches. "
            "Use attn_implementation='eager' on CPU (exact); flex_attention is for CUDA."
        )
    if config.attn_logit_softcapping is not None and not any(
        implementation.endswith(name) for name in SOFTCAP_CAPABLE
    ):
        raise softcap_error(implementation, config.attn_logit_softcapping)
    return ALL_ATTENTION_FUNCTIONS[implementation]


class GemmaAttention(nn.Module):
    """Multi-head / grouped-query / multi-query attention with Gemma's options."""

    def __init__(self, config: GemmaHFConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        # Attribute names below are read by transformers' attention integrations.
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = config.attention_scale
        self.is_causal = True
        self.attention_dropout = config.attention_dropout
        self.sliding_window = config.sliding_window if self.layer_type == SLIDING else None
        self.softcap = config.attn_logit_softcapping

        bias = config.attention_bias
        self.q_proj = GemmaLinear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = GemmaLinear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = GemmaLinear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = GemmaLinear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        if config.use_qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, seq = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if self.config.use_qk_norm:  # Gemma 3: normalise each head's q and k before RoPE
            query, key = self.q_norm(query), self.k_norm(key)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, key, cos, sin)

        if past_key_values is not None:
            # Sliding layers of a transformers Cache built from our config keep `sliding_window` keys.
            key, value = past_key_values.update(key, value, self.layer_idx)

        attend = attention_function(self.config, query.device)
        output, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
            **kwargs,
        )
        output = output.reshape(batch, seq, -1).contiguous()
        return self.o_proj(output), weights
