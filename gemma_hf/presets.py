"""Named presets: the architectures of the Gemma reports' Table 1, as data.

Each preset records where its numbers come from and the parameter counts its source states,
so a test can build it on the meta device and compare exactly.

Layer pattern: a preset stores no `layer_types`; GemmaHFConfig builds the family's pattern for
the depth it is given (Gemma 1 all global, Gemma 2 local/global 1:1 starting local, Gemma 3 five
local : one global; `GemmaFamily.layer_types` in gemma_hf.model.configuration), so
`preset_config("gemma2-2b", num_hidden_layers=2)` is a two-layer Gemma 2. An explicit
`layer_types=` override wins.

Vocabulary: the reports count 256128 embedding rows (the original, padded vocabulary) for
Gemma 1 and 2, while Hugging Face checkpoints ship 256000 rows. A preset defaults to the HF
checkpoint vocabulary (what you can load weights into); `vocab="report"` gives the reports'
256128, which is what Table 2's embedding counts are computed from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

from .model.configuration import GemmaHFConfig
from .model.safety import HF_GEMMA_VOCAB, REPORT_GEMMA_VOCAB  # Gemma 1/2: HF checkpoints / reports' Table 2

GEMMA3_VOCAB = 262144


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    source: str
    hf_vocab_size: int
    report_vocab_size: int | None
    # Parameter counts the source states (None where it states only a total).
    embedding_params: int | None
    non_embedding_params: int | None
    total_params: int | None
    config: MappingProxyType = field(repr=False)

    def build_config(self, vocab: str = "hf", **overrides) -> GemmaHFConfig:
        if vocab not in ("hf", "report"):
            raise ValueError(f"vocab must be 'hf' or 'report', got {vocab!r}.")
        if vocab == "report" and self.report_vocab_size is None:
            raise ValueError(f"preset {self.name!r} has no separate report vocabulary.")
        vocab_size = self.hf_vocab_size if vocab == "hf" else self.report_vocab_size
        kwargs = {**self.config, "vocab_size": vocab_size, **overrides}
        return GemmaHFConfig(family=self.family, **kwargs)


def _gemma1(d_model, layers, ffn_dim, heads, kv_heads, head_dim):
    return dict(
        hidden_size=d_model,
        num_hidden_layers=layers,
        # The report's "feedforward hidden dims" counts both GeGLU branches (gate and up).
        intermediate_size=ffn_dim // 2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=8192,
        sliding_window=None,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        use_post_norms=False,
        use_qk_norm=False,
        rope_theta=10000.0,
    )


def _gemma2(d_model, layers, ffn_dim, heads, kv_heads, head_dim, query_pre_attn_scalar):
    return dict(
        hidden_size=d_model,
        num_hidden_layers=layers,
        intermediate_size=ffn_dim // 2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=query_pre_attn_scalar,
        max_position_embeddings=8192,  # global attention span
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        use_post_norms=True,
        use_qk_norm=False,
        rope_theta=10000.0,
    )


# Gemma 2 27B quirk: queries are scaled by (d_model / num_heads) ** -0.5 = 144 ** -0.5,
# not by head_dim ** -0.5 = 128 ** -0.5 as in every other size.
GEMMA2_27B_QUERY_SCALAR = 4608 // 32

_PRESETS = [
    Preset(
        name="gemma-2b", family="gemma", source="Gemma 1 report, Tables 1-2",
        hf_vocab_size=HF_GEMMA_VOCAB, report_vocab_size=REPORT_GEMMA_VOCAB,
        embedding_params=524_550_144, non_embedding_params=1_981_884_416, total_params=None,
        config=MappingProxyType(_gemma1(2048, 18, 32768, 8, 1, 256)),  # multi-query attention
    ),
    Preset(
        name="gemma-7b", family="gemma", source="Gemma 1 report, Tables 1-2",
        hf_vocab_size=HF_GEMMA_VOCAB, report_vocab_size=REPORT_GEMMA_VOCAB,
        embedding_params=786_825_216, non_embedding_params=7_751_248_896, total_params=None,
        config=MappingProxyType(_gemma1(3072, 28, 49152, 16, 16, 256)),  # multi-head attention
    ),
    Preset(
        name="gemma2-2b", family="gemma2", source="Gemma 2 report, Tables 1-2 (the 2.6B model)",
        hf_vocab_size=HF_GEMMA_VOCAB, report_vocab_size=REPORT_GEMMA_VOCAB,
        embedding_params=590_118_912, non_embedding_params=2_024_517_888, total_params=None,
        config=MappingProxyType(_gemma2(2304, 26, 18432, 8, 4, 256, query_pre_attn_scalar=256)),
    ),
    Preset(
        name="gemma2-9b", family="gemma2", source="Gemma 2 report, Tables 1-2",
        hf_vocab_size=HF_GEMMA_VOCAB, report_vocab_size=REPORT_GEMMA_VOCAB,
        embedding_params=917_962_752, non_embedding_params=8_324_201_984, total_params=None,
        config=MappingProxyType(_gemma2(3584, 42, 28672, 16, 8, 256, query_pre_attn_scalar=256)),
    ),
    Preset(
        name="gemma2-27b", family="gemma2", source="Gemma 2 report, Tables 1-2",
        hf_vocab_size=HF_GEMMA_VOCAB, report_vocab_size=REPORT_GEMMA_VOCAB,
        embedding_params=1_180_237_824, non_embedding_params=26_047_480_320, total_params=None,
        config=MappingProxyType(
            _gemma2(4608, 46, 73728, 32, 16, 128, query_pre_attn_scalar=GEMMA2_27B_QUERY_SCALAR)
        ),
    ),
    Preset(
        name="gemma3-270m", family="gemma3", source="the released google/gemma-3-270m checkpoint's config",
        hf_vocab_size=GEMMA3_VOCAB, report_vocab_size=None,
        embedding_params=GEMMA3_VOCAB * 640, non_embedding_params=268_098_176 - GEMMA3_VOCAB * 640,
        total_params=268_098_176,
        config=MappingProxyType(dict(
            hidden_size=640,
            num_hidden_layers=18,
            intermediate_size=2048,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            max_position_embeddings=32768,
            sliding_window=512,
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            use_post_norms=True,
            use_qk_norm=True,
            rope_theta=1_000_000.0,  # global layers
            rope_local_base_freq=10_000.0,  # sliding layers
            eos_token_id=1,
        )),
    ),
]

PRESETS: MappingProxyType = MappingProxyType({p.name: p for p in _PRESETS})


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None


def preset_config(name: str, vocab: str = "hf", **overrides) -> GemmaHFConfig:
    """A GemmaHFConfig for a named preset; `overrides` replace any field (e.g. num_hidden_layers=2)."""
    return get_preset(name).build_config(vocab=vocab, **overrides)
