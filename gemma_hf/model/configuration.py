"""GemmaHFConfig: one configuration for every Gemma text variant (Gemma 1, 2 and 3), and the one
table of Gemma families.

Variant differences are fields, not subclasses:

=========================  ==========  ==============  =====================
field                      Gemma 1     Gemma 2         Gemma 3 (text)
=========================  ==========  ==============  =====================
layer_types                all full    local, global   5 local : 1 global
attn_logit_softcapping     None        50.0            None
final_logit_softcapping    None        30.0            None
use_post_norms             False       True            True
use_qk_norm                False       False           True
rope_local_base_freq       (= theta)   (= theta)       10_000 (theta 1e6)
=========================  ==========  ==============  =====================

The facts that name a family -- its display name, its stock transformers model type and classes,
its local/global layer pattern -- live in one table here, :data:`GEMMA_FAMILIES` (one frozen
:class:`GemmaFamily` per family); every other module reads them from it.

Loading configs: our own (`model_type` "gemma_hf") and stock `gemma`, `gemma2` and
`gemma3_text` configs, which are converted on purpose (so transformers' "You are using a model
of type ... to instantiate a model of type gemma_hf" warning is not issued for them); any other
model type is refused with a ValueError naming it.

This file is part of the remote-code bundle written next to saved checkpoints:
it imports nothing from gemma_hf (see DESIGN.md, "Remote code").
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from transformers import PreTrainedConfig

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)


def alternating_layer_types(num_layers: int, local_per_global: int) -> list[str]:
    """Layer pattern of `local_per_global` sliding layers followed by one global layer, repeated.

    Gemma 2 is 1:1 (local first), Gemma 3 is 5:1; a trailing partial group stays local.
    """
    period = local_per_global + 1
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(num_layers)]


@dataclass(frozen=True)
class GemmaFamily:
    """One Gemma generation: how we, users and stock transformers name it, and its layer pattern."""

    name: str  # GemmaHFConfig.family
    display_name: str  # for people (model cards, messages)
    stock_model_type: str  # transformers' model_type of the equivalent stock config
    stock_causal_lm: str  # transformers' causal-LM class
    stock_sequence_classification: str  # transformers' sequence-classification class
    local_per_global: int | None  # sliding layers per global layer; None: every layer is global

    def layer_types(self, num_layers: int) -> list[str]:
        """The family's layer pattern for a model of `num_layers` layers (Gemma 2 starts local)."""
        if self.local_per_global is None:
            return [FULL] * num_layers
        return alternating_layer_types(num_layers, self.local_per_global)


GEMMA_FAMILIES: MappingProxyType[str, GemmaFamily] = MappingProxyType({
    family.name: family
    for family in (
        GemmaFamily("gemma", "Gemma 1", "gemma", "GemmaForCausalLM", "GemmaForSequenceClassification",
                    local_per_global=None),
        GemmaFamily("gemma2", "Gemma 2", "gemma2", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification",
                    local_per_global=1),
        GemmaFamily("gemma3", "Gemma 3 (text)", "gemma3_text", "Gemma3ForCausalLM",
                    "Gemma3TextForSequenceClassification", local_per_global=5),
    )
})
FAMILIES = tuple(GEMMA_FAMILIES)
# Stock transformers model types we read (converted) and write (export) -> our family name; a view
# of the table above.
STOCK_MODEL_TYPES: MappingProxyType[str, str] = MappingProxyType(
    {family.stock_model_type: family.name for family in GEMMA_FAMILIES.values()}
)


def gemma_family(name: str) -> GemmaFamily:
    """The :class:`GemmaFamily` called `name` ("gemma", "gemma2" or "gemma3")."""
    try:
        return GEMMA_FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown Gemma family {name!r}; expected one of {FAMILIES}.") from None


def family_of_stock_model_type(model_type: str) -> GemmaFamily:
    """The :class:`GemmaFamily` whose stock transformers model type is `model_type`."""
    if model_type in STOCK_MODEL_TYPES:
        return GEMMA_FAMILIES[STOCK_MODEL_TYPES[model_type]]
    raise ValueError(
        f"model_type={model_type!r} is not a stock Gemma text model type; expected one of {list(STOCK_MODEL_TYPES)}."
    )


class GemmaHFConfig(PreTrainedConfig):
    r"""Configuration of a Gemma text model (any generation).

    Args:
        family: "gemma", "gemma2" or "gemma3". Names the generation for chat formatting and export
            to stock transformers; the numerics are set by the fields below, never by this label.
        vocab_size: Embedding rows. HF checkpoints have 256000 (Gemma 1/2) or 262144 (Gemma 3);
            the reports' Table 2 counts 256128 rows (the padded original vocabulary).
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
        num_key_value_heads, head_dim: the transformer shape. `intermediate_size` is the width of
            one GeGLU branch: the reports' "feedforward dim" is twice this (gate + up).
        hidden_activation: GeGLU nonlinearity; Gemma uses the tanh approximation of GELU.
        query_pre_attn_scalar: queries are scaled by `query_pre_attn_scalar ** -0.5`. None means
            head_dim. Gemma 2 27B uses d_model / num_heads = 144 rather than head_dim = 128.
        layer_types: per-layer "sliding_attention" or "full_attention". None: the family's pattern
            for `num_hidden_layers` layers (Gemma 1 all global, Gemma 2 local/global 1:1 starting
            local, Gemma 3 5 local : 1 global); all global when `sliding_window` is None.
        sliding_window: keys visible to a sliding layer, the current token included.
        attn_logit_softcapping / final_logit_softcapping: cap * tanh(x / cap) on attention scores /
            output logits, or None.
        use_post_norms: RMSNorm on the output of attention and MLP too (Gemma 2/3), not only input.
        use_qk_norm: RMSNorm over head_dim on queries and keys (Gemma 3).
        rope_theta: RoPE base of full-attention layers.
        rope_local_base_freq: RoPE base of sliding layers (None: same as rope_theta).
        rope_linear_factor: None or f > 0: linear RoPE scaling (positions divided by f) on
            full-attention layers only (the Gemma 3 4B+ convention; stock calls it rope_parameters
            {"rope_type": "linear", "factor": f}). Named apart from transformers' `rope_scaling`,
            which the base config class rewrites.
    """

    model_type = "gemma_hf"
    keys_to_ignore_at_inference = ["past_key_values"]
    # save_pretrained copies this file next to config.json and writes auto_map["AutoConfig"], so a
    # checkpoint loads with trust_remote_code=True where gemma_hf is not installed.
    _auto_class = "AutoConfig"

    def __init__(
        self,
        family: str = "gemma2",
        vocab_size: int = 256000,
        hidden_size: int = 2304,
        intermediate_size: int = 9216,
        num_hidden_layers: int = 26,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 4,
        head_dim: int = 256,
        hidden_activation: str = "gelu_pytorch_tanh",
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 1,
        bos_token_id: int | None = 2,
        tie_word_embeddings: bool = True,
        rope_theta: float = 10000.0,
        rope_local_base_freq: float | None = None,
        rope_linear_factor: float | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        query_pre_attn_scalar: float | None = None,
        layer_types: list[str] | None = None,
        sliding_window: int | None = 4096,
        attn_logit_softcapping: float | None = 50.0,
        final_logit_softcapping: float | None = 30.0,
        use_post_norms: bool = True,
        use_qk_norm: bool = False,
        **kwargs,
    ):
        self.family = family
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_activation = hidden_activation
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_local_base_freq = rope_local_base_freq
        self.rope_linear_factor = rope_linear_factor
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.query_pre_attn_scalar = query_pre_attn_scalar
        if layer_types is None:
            # The family's pattern at this depth; without a window every layer is global.
            known = GEMMA_FAMILIES.get(family) if isinstance(family, str) else None
            layer_types = known.layer_types(num_hidden_layers) if known and sliding_window else [FULL] * num_hidden_layers
        self.layer_types = list(layer_types)
        self.sliding_window = sliding_window
        self.attn_logit_softcapping = attn_logit_softcapping
        # TRL reads exactly this attribute name to soft-cap logits it computes outside forward().
        self.final_logit_softcapping = final_logit_softcapping
        self.use_post_norms = use_post_norms
        self.use_qk_norm = use_qk_norm
        # Ours first: transformers' own validators (run inside super().__init__) give vaguer messages.
        self.validate_gemma()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    # -- conversion to and from stock transformers configs ----------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        cache_dir=None,
        force_download: bool = False,
        local_files_only: bool = False,
        token=None,
        revision: str = "main",
        **kwargs,
    ):
        """transformers' `PreTrainedConfig.from_pretrained` minus its warning "You are using a model of
        type `gemma2` to instantiate a model of type `gemma_hf` ... can yield errors": reading a stock
        gemma / gemma2 / gemma3_text config is a deliberate, tested conversion (`from_dict`), and any
        other model type is refused there with an error, not a warning."""
        kwargs.update(cache_dir=cache_dir, force_download=force_download, local_files_only=local_files_only,
                      token=token, revision=revision)
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        return cls.from_dict(config_dict, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Also accepts stock `gemma`, `gemma2` and `gemma3_text` config dicts (converted first), so
        `GemmaHFForCausalLM.from_pretrained(stock_checkpoint_dir)` works with no renaming. Any other
        model type raises ValueError naming it and what is accepted."""
        model_type = config_dict.get("model_type")
        if model_type in STOCK_MODEL_TYPES:
            config_dict = stock_to_gemma_hf_dict(config_dict)
        elif model_type not in (None, cls.model_type):
            hint = (
                " 'gemma3' is the multimodal Gemma 3 config; its text model is the 'gemma3_text' config it holds."
                if model_type == "gemma3" else ""
            )
            raise ValueError(
                f"GemmaHFConfig: cannot read a config of model_type={model_type!r}. gemma_hf reads its own "
                f"configs ({cls.model_type!r}) and stock Gemma text configs ({', '.join(map(repr, STOCK_MODEL_TYPES))}), "
                f"converting the latter.{hint}"
            )
        return super().from_dict(config_dict, **kwargs)

    def to_stock_dict(self) -> dict:
        """The equivalent stock transformers config dict (model_type gemma, gemma2 or gemma3_text).

        Raises ValueError naming the field when this config uses a feature the stock class of its
        family cannot express (e.g. a Gemma 1 config with soft-caps).
        """
        return gemma_hf_to_stock_dict(self)

    # -- derived quantities, named so a reader sees the quirk rather than a number ---------------
    @property
    def attention_scale(self) -> float:
        """Multiplier on q.k: query_pre_attn_scalar ** -0.5 (head_dim ** -0.5 when unset)."""
        scalar = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return float(scalar) ** -0.5

    @property
    def local_rope_theta(self) -> float:
        return self.rope_local_base_freq if self.rope_local_base_freq is not None else self.rope_theta

    @property
    def has_sliding_layers(self) -> bool:
        return SLIDING in self.layer_types

    def validate_gemma(self) -> None:
        """Raise ValueError with a precise message for any inconsistent field."""

        def fail(msg: str) -> None:
            raise ValueError(f"GemmaHFConfig: {msg}")

        if self.family not in FAMILIES:
            fail(f"family={self.family!r} is not one of {FAMILIES}.")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"{name} must be a positive integer, got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            fail(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
                f"{self.num_attention_heads} (each KV head serves a whole group of query heads)."
            )
        if len(self.layer_types) != self.num_hidden_layers:
            fail(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers="
                f"{self.num_hidden_layers}; give one type per layer."
            )
        unknown = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        if unknown:
            fail(f"unknown layer type(s) {unknown} in layer_types; allowed: {list(LAYER_TYPES)}.")
        if self.has_sliding_layers:
            if not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool) or self.sliding_window <= 0:
                fail(
                    f"sliding_window must be a positive integer when layer_types has sliding layers, "
                    f"got {self.sliding_window!r}."
                )
        elif self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            fail(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}.")
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            cap = getattr(self, name)
            if cap is not None and not cap > 0:
                fail(f"{name} must be positive or None (no cap), got {cap!r}.")
        if self.query_pre_attn_scalar is not None and not self.query_pre_attn_scalar > 0:
            fail(f"query_pre_attn_scalar must be positive or None, got {self.query_pre_attn_scalar!r}.")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu"):
            fail(
                f"hidden_activation={self.hidden_activation!r}: Gemma uses 'gelu_pytorch_tanh' "
                "(the tanh approximation); exact 'gelu' is accepted for old Gemma 1 configs."
            )
        if self.rope_linear_factor is not None and not self.rope_linear_factor > 0:
            fail(f"rope_linear_factor must be positive or None, got {self.rope_linear_factor!r}.")


# ---------------------------------------------------------------------------------------------
# Stock transformers <-> gemma_hf configs. Both directions live here (not in gemma_hf.convert) so
# that a checkpoint loaded with trust_remote_code, without gemma_hf installed, can convert too.

# Fields copied unchanged in both directions.
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "pad_token_id", "eos_token_id", "bos_token_id", "tie_word_embeddings",
    "attention_bias", "attention_dropout", "dtype", "torch_dtype", "id2label", "label2id",
    "problem_type", "num_labels",
)


def _rope_entry(rope: dict | None, where: str) -> tuple[float, float | None]:
    """(theta, linear factor) of one stock rope_parameters entry; refuses types we do not model."""
    rope = rope or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ValueError(
            f"GemmaHFConfig: {where} uses rope_type={rope_type!r}; only 'default' and 'linear' RoPE "
            "are supported (the types the Gemma checkpoints use)."
        )
    factor = float(rope["factor"]) if rope_type == "linear" else None
    return float(rope.get("rope_theta", 10000.0)), factor


def stock_to_gemma_hf_dict(stock: dict) -> dict:
    """Convert a stock gemma / gemma2 / gemma3_text config dict to GemmaHFConfig kwargs."""
    try:
        family_info = family_of_stock_model_type(stock.get("model_type"))
    except ValueError as err:
        raise ValueError(f"GemmaHFConfig: cannot convert: {err}") from None
    family = family_info.name
    out = {k: stock[k] for k in _SHARED_FIELDS if k in stock}
    out["family"] = family
    out["hidden_activation"] = stock.get("hidden_activation") or stock.get("hidden_act") or "gelu_pytorch_tanh"
    rope = stock.get("rope_parameters") or stock.get("rope_scaling")
    num_layers = stock["num_hidden_layers"]

    if family == "gemma":
        theta, factor = _rope_entry(rope or {"rope_theta": stock.get("rope_theta", 10000.0)}, "rope_parameters")
        if factor is not None:
            raise ValueError("GemmaHFConfig: linear RoPE scaling in a Gemma 1 config is not supported.")
        out.update(
            rope_theta=theta, layer_types=[FULL] * num_layers, sliding_window=None,
            attn_logit_softcapping=None, final_logit_softcapping=None,
            use_post_norms=False, use_qk_norm=False, query_pre_attn_scalar=None,
        )
    else:
        if stock.get("use_bidirectional_attention"):
            raise ValueError("GemmaHFConfig: use_bidirectional_attention=True (embedding models) is not a causal LM; not supported.")
        layer_types = stock.get("layer_types")
        if layer_types is None:  # old stock configs give a period instead of per-layer types
            pattern = stock.get("sliding_window_pattern", stock.get("_sliding_window_pattern"))
            if pattern is None:
                layer_types = family_info.layer_types(num_layers)
            else:
                layer_types = alternating_layer_types(num_layers, pattern - 1)
        out.update(
            layer_types=list(layer_types),
            sliding_window=stock.get("sliding_window"),
            attn_logit_softcapping=stock.get("attn_logit_softcapping"),
            final_logit_softcapping=stock.get("final_logit_softcapping"),
            query_pre_attn_scalar=stock.get("query_pre_attn_scalar"),
            use_post_norms=True,
            use_qk_norm=family == "gemma3",
        )
        if family == "gemma2":
            theta, factor = _rope_entry(rope or {"rope_theta": stock.get("rope_theta", 10000.0)}, "rope_parameters")
            if factor is not None:
                raise ValueError("GemmaHFConfig: linear RoPE scaling in a Gemma 2 config is not supported.")
            out.update(rope_theta=theta)
        else:
            if rope and SLIDING in rope or rope and FULL in rope:
                local_theta, local_factor = _rope_entry(rope.get(SLIDING), "rope_parameters['sliding_attention']")
                theta, factor = _rope_entry(rope.get(FULL), "rope_parameters['full_attention']")
                if local_factor is not None:
                    raise ValueError("GemmaHFConfig: RoPE scaling on sliding layers is not supported (Gemma 3 scales global layers only).")
            else:  # legacy Gemma 3 format: rope_theta, rope_local_base_freq, rope_scaling
                theta, factor = _rope_entry({**(rope or {}), "rope_theta": stock.get("rope_theta", 1_000_000.0)}, "rope_scaling")
                local_theta = stock.get("rope_local_base_freq", 10_000.0)
            out.update(rope_theta=theta, rope_local_base_freq=local_theta, rope_linear_factor=factor)
    return out


def gemma_hf_to_stock_dict(config: "GemmaHFConfig") -> dict:
    """Inverse of stock_to_gemma_hf_dict; refuses what the family's stock class cannot express."""
    family = gemma_family(config.family)
    model_type = family.stock_model_type

    def refuse(field: str, why: str) -> None:
        raise ValueError(
            f"cannot express this config as stock model_type={model_type!r}: {field} {why}. Change the "
            f"config's family or the field."
        )

    # torch_dtype is read only from stock dicts (old configs); reading it from a config object warns.
    out = {k: getattr(config, k) for k in _SHARED_FIELDS
           if k != "torch_dtype" and hasattr(config, k) and getattr(config, k) is not None}
    out["model_type"] = model_type
    out["architectures"] = [family.stock_causal_lm]
    out["hidden_activation"] = config.hidden_activation
    if config.family == "gemma":
        for field in ("attn_logit_softcapping", "final_logit_softcapping", "rope_linear_factor"):
            if getattr(config, field) is not None:
                refuse(field, "is set, but Gemma 1 has none")
        if config.has_sliding_layers:
            refuse("layer_types", "has sliding layers, but Gemma 1 attends globally everywhere")
        if config.use_post_norms or config.use_qk_norm:
            refuse("use_post_norms/use_qk_norm", "is True, but Gemma 1 has neither")
        if config.query_pre_attn_scalar not in (None, config.head_dim):
            refuse("query_pre_attn_scalar", "differs from head_dim, but Gemma 1 scales by head_dim")
        if config.rope_local_base_freq not in (None, config.rope_theta):
            refuse("rope_local_base_freq", "is set, but Gemma 1 has one RoPE base")
        out["hidden_act"] = config.hidden_activation
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
        return out

    if not config.use_post_norms:
        refuse("use_post_norms", "is False, but Gemma 2/3 always have post-norms")
    out.update(
        layer_types=list(config.layer_types),
        sliding_window=config.sliding_window,
        attn_logit_softcapping=config.attn_logit_softcapping,
        final_logit_softcapping=config.final_logit_softcapping,
        query_pre_attn_scalar=config.query_pre_attn_scalar if config.query_pre_attn_scalar is not None else config.head_dim,
    )
    if config.family == "gemma2":
        if config.use_qk_norm:
            refuse("use_qk_norm", "is True, but Gemma 2 has no QK-norm")
        if config.rope_local_base_freq not in (None, config.rope_theta) or config.rope_linear_factor is not None:
            refuse("rope_local_base_freq/rope_linear_factor", "is set, but Gemma 2 has one unscaled RoPE base")
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
        return out

    if not config.use_qk_norm:
        refuse("use_qk_norm", "is False, but Gemma 3 always has QK-norm")
    full = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_linear_factor is not None:
        full = {"rope_type": "linear", "rope_theta": config.rope_theta, "factor": config.rope_linear_factor}
    out["rope_parameters"] = {
        FULL: full,
        SLIDING: {"rope_type": "default", "rope_theta": config.local_rope_theta},
    }
    out["use_bidirectional_attention"] = False
    return out


__all__ = [
    "GemmaHFConfig",
    "GemmaFamily",
    "GEMMA_FAMILIES",
    "FAMILIES",
    "STOCK_MODEL_TYPES",
    "gemma_family",
    "family_of_stock_model_type",
    "alternating_layer_types",
    "stock_to_gemma_hf_dict",
    "gemma_hf_to_stock_dict",
    "SLIDING",
    "FULL",
    "LAYER_TYPES",
]
