"""GemmaHFModel, GemmaHFForCausalLM and GemmaHFForSequenceClassification.

One model class per head for every Gemma generation; variants differ only by config fields.
Tensor names equal stock transformers' (`model.layers.N.self_attn.q_proj.weight`, ...), so
official checkpoints load without renaming and our checkpoints export without renaming.

Loss and logits of `GemmaHFForCausalLM` with `labels` (`return_logits`):
- training (gradients recorded, the default for `return_logits=None`): the loss comes from the
  chunked, soft-capped cross-entropy (loss.py) and `logits` is None -- the [batch, seq, vocab]
  logits, the largest tensor of a step, are never built;
- no gradient recorded (`torch.no_grad()` / `inference_mode`, which is how transformers'
  `Trainer.evaluate` / `predict` and `generate` run): the full soft-capped logits are returned and
  the loss is computed from them exactly as stock transformers does, so `compute_metrics` and
  `preprocess_logits_for_metrics` receive logits as with any causal LM;
- `return_logits=True` / `False` forces the one or the other.

Attention maps: `output_attentions=True` returns one [batch, heads, query, key] map per layer in
`outputs.attentions` (all three heads) on the eager backend; sdpa, flash and flex attention never
materialise the maps, so asking for them there raises a ValueError naming the fix.

Checkpoints: every head's `save_pretrained` writes an `auto_map` naming all heads (AutoConfig,
AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification) next to the code of all of
them (this folder), so an SFT checkpoint loads as a reward model with `trust_remote_code=True`
where gemma_hf is not installed, and back.

Library behaviours relied on here (easy to break on a transformers upgrade; the parity tests
catch it):
- `create_causal_mask` / `create_sliding_window_causal_mask` read `config._attn_implementation`,
  `config.sliding_window` and the cache; the sliding mask lets a query see `sliding_window`
  keys including itself.
- `DynamicCache(config=...)` reads `config.layer_types` / `config.sliding_window` to give sliding
  layers a cache bounded by the window.
- `PreTrainedModel._sdpa_can_dispatch` raising ValueError makes an unrequested sdpa fall back to
  eager and a requested one fail (we raise for soft-capped configs).
- `save_pretrained` calls `custom_object_save`, which writes one `auto_map` entry (the saved
  class's `_auto_class`) and copies the class's file plus its `from .x import y` files; the
  config's save adds "AutoConfig". `GemmaHFPreTrainedModel.save_pretrained` adds the other heads.
- transformers' Trainer.evaluate / predict call the model under `torch.no_grad()` and hand
  `outputs` minus `loss` and `config.keys_to_ignore_at_inference` to the metrics functions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel

from .attention import GemmaAttention, softcap_error
from .configuration import FULL, SLIDING, GemmaHFConfig
from .loss import chunked_causal_lm_loss
from .safety import guarded_from_pretrained
from .layers import GemmaLinear, GemmaMLP, GemmaRMSNorm, GemmaRotaryEmbedding, GemmaScaledEmbedding


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): keeps values in (-cap, cap); identity when cap is None."""
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap


class GemmaDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block (Gemma 1) or pre+post-norm block (Gemma 2/3).

    Naming quirk kept for checkpoint compatibility: in Gemma 1 checkpoints the norm *before the
    MLP* is called `post_attention_layernorm`; in Gemma 2/3 that name is the norm applied to the
    attention *output*, and the pre-MLP norm is `pre_feedforward_layernorm`.
    """

    def __init__(self, config: GemmaHFConfig, layer_idx: int):
        super().__init__()
        self.use_post_norms = config.use_post_norms
        self.attention_type = config.layer_types[layer_idx]
        self.self_attn = GemmaAttention(config, layer_idx)
        self.mlp = GemmaMLP(config)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.use_post_norms:
            self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, hidden_states, position_embeddings, attention_mask, past_key_values=None, output_attentions=False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's output, and its attention weights when `output_attentions` (else None)."""
        residual = hidden_states
        hidden_states, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            **kwargs,
        )
        if self.use_post_norms:
            hidden_states = self.post_attention_layernorm(hidden_states)
            pre_mlp_norm = self.pre_feedforward_layernorm
        else:
            pre_mlp_norm = self.post_attention_layernorm  # Gemma 1's name for its pre-MLP norm
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.mlp(pre_mlp_norm(hidden_states))
        if self.use_post_norms:
            hidden_states = self.post_feedforward_layernorm(hidden_states)
        return residual + hidden_states, (attn_weights if output_attentions else None)


class GemmaHFPreTrainedModel(PreTrainedModel):
    config_class = GemmaHFConfig
    config: GemmaHFConfig
    base_model_prefix = "model"  # TRL and PEFT find the backbone through this name
    supports_gradient_checkpointing = True
    _no_split_modules = ["GemmaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_sdpa = True  # only where exact: see _sdpa_can_dispatch
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' from_pretrained behind gemma_hf's loading guards (safety.py): safetensors only
        unless allow_pickle=True (unpickling can run arbitrary code); mismatched, missing or unexpected
        tensors raise, naming each tensor and both shapes (strict=False relaxes missing/unexpected)."""
        return guarded_from_pretrained(
            super().from_pretrained, pretrained_model_name_or_path, *model_args, model_class=cls.__name__, **kwargs
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, with `auto_map` naming every head we ship.

        transformers 5.23 writes one `auto_map` entry per saved object (`custom_object_save`: the
        model's own `_auto_class`, then the config's "AutoConfig") and copies the defining file
        with its relative imports -- here modeling.py, which defines all heads, and the files it
        imports. The other heads' entries are set here, so a checkpoint of any head loads as any
        other with `trust_remote_code=True` (e.g. a reward model started from an SFT checkpoint).
        """
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **remote_code_auto_map()}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _sdpa_can_dispatch(self, is_init_check: bool = False) -> bool:
        # sdpa cannot soft-cap attention scores. Raising here makes transformers fall back to eager
        # when nobody asked for sdpa, and fail when somebody did: never a silently dropped cap.
        if self.config.attn_logit_softcapping is not None:
            raise softcap_error("sdpa", self.config.attn_logit_softcapping)
        return super()._sdpa_can_dispatch(is_init_check)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, GemmaRMSNorm):
            init.zeros_(module.weight)  # (1 + w): zero is the identity scale
        elif isinstance(module, GemmaScaledEmbedding):
            # Non-persistent buffers are not in checkpoints: re-create them, or from_pretrained
            # (which builds the model on the meta device) leaves garbage in them.
            init.constant_(module.embed_scale, module.scale_value)
        elif isinstance(module, GemmaRotaryEmbedding):
            for layer_type in module.layer_types:
                init.copy_(getattr(module, f"{layer_type}_inv_freq"), module._inv_freq(layer_type))


class GemmaHFModel(GemmaHFPreTrainedModel):
    """The decoder stack: scaled embedding, N decoder layers, final RMSNorm."""

    _auto_class = "AutoModel"  # see GemmaHFPreTrainedModel.save_pretrained

    def __init__(self, config: GemmaHFConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = GemmaScaledEmbedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = GemmaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def build_masks(self, inputs_embeds, attention_mask, past_key_values, position_ids) -> dict:
        """One mask per layer type (format chosen by the attention backend)."""
        if isinstance(attention_mask, dict):  # already prepared, e.g. by generate()
            return attention_mask
        kwargs = dict(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        masks = {FULL: create_causal_mask(**kwargs)}
        if self.config.has_sliding_layers:
            masks[SLIDING] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,  # TRL passes logits_to_keep and other keys down; attention backends read some
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        implementation = self.config._attn_implementation or "eager"
        if output_attentions and implementation != "eager":
            raise ValueError(
                f"output_attentions=True needs attn_implementation='eager': {implementation!r} never "
                "materialises the attention weights. Load the model with attn_implementation='eager' "
                "(or call model.set_attn_implementation('eager')) to get them."
            )
        kwargs.pop("logits_to_keep", None)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        masks = self.build_masks(inputs_embeds, attention_mask, past_key_values, position_ids)
        hidden_states = inputs_embeds
        rotary = {t: self.rotary_emb(hidden_states, position_ids, t) for t in set(self.config.layer_types)}

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, attn_weights = layer(
                hidden_states,
                position_embeddings=rotary[layer.attention_type],
                attention_mask=masks[layer.attention_type],
                past_key_values=past_key_values if use_cache else None,
                output_attentions=output_attentions,
                **kwargs,
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (attn_weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            # Match transformers: the last entry is the normed final state.
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


class GemmaHFForCausalLM(GemmaHFPreTrainedModel, GenerationMixin):
    # transformers 5: a dict from tied key to source key.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _auto_class = "AutoModelForCausalLM"  # see save_pretrained: the auto_map lists every head

    def __init__(self, config: GemmaHFConfig):
        super().__init__(config)
        self.model = GemmaHFModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = GemmaLinear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        return_logits: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (soft-capped) and, with `labels`, the shifted cross-entropy loss.

        `return_logits` decides how a loss is computed when `labels` are given:
          None (default): as `torch.is_grad_enabled()` says. While gradients are recorded
            (training), the loss comes from the chunked, soft-capped cross-entropy
            (gemma_hf.model.loss) and `logits` is None: the [B, T, V] logits are never built.
            Without gradients (`torch.no_grad()`, as transformers' Trainer.evaluate / predict and
            generate run), the full soft-capped logits are returned and the loss is computed from
            them exactly as stock transformers does, so metrics code gets its logits.
          False: always the chunked loss, `logits=None` (e.g. an evaluation loss at training memory).
          True: always the full logits, and the loss from them.
        Without `labels` the logits are always returned (`logits_to_keep` selects positions).
        `output_attentions=True` adds one attention map per layer (eager attention only).
        """
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("labels with logits_to_keep: the loss needs every position; drop one of them.")
        if return_logits is None:
            return_logits = not torch.is_grad_enabled()
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if labels is not None and not return_logits:
            loss = chunked_causal_lm_loss(
                hidden_states, self.lm_head.weight, labels, self.config.final_logit_softcapping, **kwargs
            )
            return CausalLMOutputWithPast(
                loss=loss,
                logits=None,
                past_key_values=outputs.past_key_values,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
            )
        # logits_to_keep: an int keeps the last N positions (0 = all), a tensor selects indices.
        if isinstance(logits_to_keep, int):
            kept = hidden_states[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden_states
        else:
            kept = hidden_states[:, logits_to_keep, :]
        # The final soft-cap applies to the logits, never to the hidden states.
        logits = soft_cap(self.lm_head(kept), self.config.final_logit_softcapping)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class GemmaHFForSequenceClassification(GemmaHFPreTrainedModel):
    """A scalar (or num_labels) head on the last non-padding token: Bradley-Terry reward models.

    It builds its own backbone (the generic transformers class calls AutoModel.from_config, which
    fails under trust_remote_code). The score is read at the last non-pad token of each row,
    found from the attention mask when given (correct for left and right padding), else from
    pad_token_id.
    """

    _auto_class = "AutoModelForSequenceClassification"  # see save_pretrained

    def __init__(self, config: GemmaHFConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = GemmaHFModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def _last_token_index(self, input_ids, attention_mask, batch: int, seq: int, device) -> torch.Tensor:
        positions = torch.arange(seq, device=device)
        if attention_mask is not None and not isinstance(attention_mask, dict):
            return (positions * attention_mask.to(device).bool()).amax(dim=-1)
        if input_ids is not None and self.config.pad_token_id is not None:
            non_pad = (input_ids != self.config.pad_token_id).to(device)
            return (positions * non_pad).amax(dim=-1)
        if batch > 1:
            raise ValueError(
                "Cannot find the last token of each row: pass attention_mask, or set pad_token_id."
            )
        return torch.full((batch,), seq - 1, device=device)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        batch, seq = hidden.shape[:2]
        last = self._last_token_index(input_ids, attention_mask, batch, seq, hidden.device)
        logits = self.score(hidden[torch.arange(batch, device=hidden.device), last])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


def remote_code_auto_map() -> dict[str, str]:
    """`auto_map` of a saved checkpoint: every Auto class we ship -> "file.Class" in this folder.

    The file names come from the classes' modules, so the map is the same whether the classes were
    imported from gemma_hf or loaded as remote code (transformers_modules.<hash>.modeling).
    """
    def ref(cls: type) -> str:
        return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"

    return {
        "AutoConfig": ref(GemmaHFConfig),
        "AutoModel": ref(GemmaHFModel),
        "AutoModelForCausalLM": ref(GemmaHFForCausalLM),
        "AutoModelForSequenceClassification": ref(GemmaHFForSequenceClassification),
    }


__all__ = [
    "remote_code_auto_map",
    "GemmaHFPreTrainedModel",
    "GemmaHFModel",
    "GemmaHFForCausalLM",
    "GemmaHFForSequenceClassification",
]
