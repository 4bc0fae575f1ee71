"""Config validation errors and preset parameter counts (reports' Table 2, exactly, on meta)."""

from __future__ import annotations

import pytest
import torch

from gemma_hf import PRESETS, GemmaHFConfig, GemmaHFForCausalLM, preset_config
from gemma_hf.model.configuration import FAMILIES, GEMMA_FAMILIES, STOCK_MODEL_TYPES, GemmaFamily, gemma_family
from gemma_hf.presets import GEMMA2_27B_QUERY_SCALAR, REPORT_GEMMA_VOCAB

S, F = "sliding_attention", "full_attention"


def count(config: GemmaHFConfig) -> tuple[int, int]:
    """(embedding, non-embedding) parameters, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = GemmaHFForCausalLM(config)
    embedding = model.model.embed_tokens.weight.numel()
    total = sum(p.numel() for p in model.parameters())  # the tied lm_head is counted once
    return embedding, total - embedding


@pytest.mark.parametrize("name", ["gemma-2b", "gemma-7b", "gemma2-2b", "gemma2-9b", "gemma2-27b"])
def test_report_table2_counts_exact(name):
    preset = PRESETS[name]
    embedding, non_embedding = count(preset.build_config(vocab="report"))
    assert embedding == preset.embedding_params
    assert non_embedding == preset.non_embedding_params
    assert preset.build_config(vocab="report").vocab_size == REPORT_GEMMA_VOCAB


def test_hf_vocab_is_the_default_and_differs_only_in_embedding_rows():
    report = count(preset_config("gemma2-2b", vocab="report"))
    hf = count(preset_config("gemma2-2b"))
    assert hf[1] == report[1]
    assert report[0] - hf[0] == (256128 - 256000) * 2304


def test_gemma3_270m_total():
    embedding, non_embedding = count(preset_config("gemma3-270m"))
    assert embedding + non_embedding == 268_098_176
    with pytest.raises(ValueError, match="no separate report vocabulary"):
        preset_config("gemma3-270m", vocab="report")


def test_named_quirks():
    c27 = preset_config("gemma2-27b")
    assert GEMMA2_27B_QUERY_SCALAR == 144 and c27.head_dim == 128
    assert c27.attention_scale == pytest.approx(144 ** -0.5)
    assert preset_config("gemma2-9b").attention_scale == pytest.approx(256 ** -0.5)
    g2 = preset_config("gemma2-2b")
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (50.0, 30.0)  # not swapped
    assert g2.layer_types[:2] == ["sliding_attention", "full_attention"]
    g3 = preset_config("gemma3-270m")
    assert g3.layer_types.count("full_attention") == 3 and g3.layer_types[5] == "full_attention"
    assert (g3.rope_theta, g3.local_rope_theta) == (1e6, 1e4)
    assert preset_config("gemma-2b").num_key_value_heads == 1  # MQA
    assert preset_config("gemma-7b").num_key_value_heads == 16  # MHA


def test_unknown_preset():
    with pytest.raises(KeyError, match="available: gemma-2b"):
        preset_config("gemma-4b")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_hidden_layers=3, layer_types=["full_attention"] * 2), "layer_types has 2 entries but num_hidden_layers=3"),
        (dict(num_attention_heads=8, num_key_value_heads=3), "num_key_value_heads=3 must divide num_attention_heads=8"),
        (dict(num_hidden_layers=2, layer_types=["full_attention", "local"]), r"unknown layer type\(s\) \['local'\]"),
        (dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=0), "sliding_window must be a positive integer"),
        (dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], sliding_window=None), "sliding_window must be a positive integer"),
        (dict(family="gemma4"), "family='gemma4'"),
        (dict(hidden_size=-1), "hidden_size must be a positive integer"),
        (dict(attn_logit_softcapping=0.0), "attn_logit_softcapping must be positive"),
        (dict(hidden_activation="relu"), "hidden_activation='relu'"),
        (dict(rope_linear_factor=-2.0), "rope_linear_factor must be positive"),
    ],
)
def test_config_errors_are_clear(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GemmaHFConfig(**kwargs)


@pytest.mark.parametrize("name", list(PRESETS))
def test_stock_config_round_trip(name):
    from transformers import AutoConfig

    ours = preset_config(name)
    stock_dict = ours.to_stock_dict()
    stock = AutoConfig.for_model(stock_dict.pop("model_type"), **stock_dict)
    back = GemmaHFConfig.from_dict(stock.to_dict())
    for field in ("family", "layer_types", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping",
                  "use_post_norms", "use_qk_norm", "rope_theta", "local_rope_theta", "attention_scale",
                  "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size"):
        assert getattr(back, field) == getattr(ours, field), field


def test_export_refuses_inexpressible_config():
    config = preset_config("gemma-2b", attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="attn_logit_softcapping is set, but Gemma 1 has none"):
        config.to_stock_dict()
    config = preset_config("gemma2-2b", use_qk_norm=True)
    with pytest.raises(ValueError, match="use_qk_norm is True, but Gemma 2 has no QK-norm"):
        config.to_stock_dict()


def test_unsupported_stock_rope_is_refused():
    stock = preset_config("gemma3-270m").to_stock_dict()
    stock["rope_parameters"]["full_attention"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        GemmaHFConfig.from_dict(stock)


# --------------------------------------------------------------------------------------------
# Overriding the depth rebuilds the family's layer pattern

# Written out by hand (not computed by the code under test): Gemma 1 all global, Gemma 2 local/global
# 1:1 starting local, Gemma 3 five local : one global, a trailing partial group local.
PATTERNS = {
    "gemma": {1: [F], 2: [F, F], 7: [F] * 7},
    "gemma2": {1: [S], 2: [S, F], 7: [S, F, S, F, S, F, S]},
    "gemma3": {1: [S], 2: [S, S], 7: [S, S, S, S, S, F, S], 12: [S, S, S, S, S, F] * 2},
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_depth_override_rebuilds_the_family_pattern(name):
    preset = PRESETS[name]
    for layers, expected in PATTERNS[preset.family].items():
        config = preset_config(name, num_hidden_layers=layers)
        assert config.num_hidden_layers == layers and config.layer_types == expected, (name, layers)
        with torch.device("meta"):
            model = GemmaHFForCausalLM(config)  # builds: one layer object per type
        assert [layer.attention_type for layer in model.model.layers] == expected


def test_explicit_layer_types_win_over_the_family_pattern():
    config = preset_config("gemma2-2b", num_hidden_layers=3, layer_types=[F, F, S])
    assert config.layer_types == [F, F, S]
    with pytest.raises(ValueError, match="layer_types has 2 entries but num_hidden_layers=3"):
        preset_config("gemma3-270m", num_hidden_layers=3, layer_types=[S, F])


def test_full_depth_presets_keep_their_published_patterns():
    assert preset_config("gemma2-2b").layer_types == [S, F] * 13
    assert preset_config("gemma3-270m").layer_types == [S, S, S, S, S, F] * 3
    assert preset_config("gemma-7b").layer_types == [F] * 28


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_config_without_layer_types_uses_the_family_pattern(family):
    assert GemmaHFConfig(family=family, num_hidden_layers=7).layer_types == PATTERNS[family][7]
    assert GemmaHFConfig(family=family, num_hidden_layers=2, sliding_window=None).layer_types == [F, F]


# --------------------------------------------------------------------------------------------
# The family table: one source, and true of the pinned transformers


def test_family_table_names_real_stock_classes():
    import transformers
    from transformers import AutoConfig

    assert FAMILIES == tuple(GEMMA_FAMILIES) == ("gemma", "gemma2", "gemma3")
    assert {f.display_name for f in GEMMA_FAMILIES.values()} == {"Gemma 1", "Gemma 2", "Gemma 3 (text)"}
    assert dict(STOCK_MODEL_TYPES) == {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}
    for name, family in GEMMA_FAMILIES.items():
        assert isinstance(family, GemmaFamily) and family.name == name and gemma_family(name) is family
        stock_config = AutoConfig.for_model(family.stock_model_type)
        for class_name in (family.stock_causal_lm, family.stock_sequence_classification):
            stock_class = getattr(transformers, class_name)
            assert isinstance(stock_config, stock_class.config_class), (name, class_name)
    with pytest.raises(AttributeError):  # frozen
        GEMMA_FAMILIES["gemma2"].local_per_global = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"unknown Gemma family 'gemma4'; expected one of \('gemma', 'gemma2', 'gemma3'\)"):
        gemma_family("gemma4")
