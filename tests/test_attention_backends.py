"""Attention backends other than eager and sdpa (sdpa parity is in test_model_parity.py), and what
stock transformers does with sdpa on Gemma 2 (what gemma_hf/model/attention.py says about it).

flex_attention is refused on CPU: with torch 2.13, transformers' compiled flex path returned NaN or
wrong values in one process once it had run both padded and unpadded batches (stock Gemma 2 as
well as ours; measured by the lead while building this test). flash_attention_2 needs CUDA and
the flash-attn package. The compiled kernels cannot run on this CPU-only machine; flex's mask and
score_mod are parity-tested uncompiled in test_flex_semantics.py, and what our attention hands to
flash-attn (window size, soft-cap, scale) is pinned below.
"""

from __future__ import annotations

import pytest

from gemma_hf import BackendUnavailableError
from tiny import make_ours, random_ids


def test_flex_attention_is_refused_on_cpu_with_a_clear_error():
    model = make_ours("gemma2", attn="flex_attention")
    with pytest.raises(BackendUnavailableError, match="Use attn_implementation='eager' on CPU"):
        model(random_ids(1, 8))


def test_flash_attention_receives_a_window_of_w_keys_and_the_soft_cap():
    """flash-attn's window_size=(left, right) is inclusive: (W - 1, W - 1) with causal=True is the
    current key plus W - 1 before it, i.e. W keys, which is Gemma's (and our eager mask's) window.
    transformers derives it from the `sliding_window` our attention passes; pin that contract."""
    from transformers.modeling_flash_attention_utils import _process_flash_attention_kwargs

    model = make_ours("gemma2")
    sliding = next(l.self_attn for l in model.model.layers if l.self_attn.sliding_window is not None)
    full = next(l.self_attn for l in model.model.layers if l.self_attn.sliding_window is None)
    supports = dict.fromkeys(["dropout_p", "window_size", "deterministic", "softcap", "s_aux",
                              "learnable_sink", "block_table", "page_table", "cache_seqlens", "max_seqlen_q",
                              "max_seqlen_k"], True)
    window = sliding.sliding_window
    assert window == model.config.sliding_window
    kwargs = _process_flash_attention_kwargs(
        query_length=3 * window, key_length=3 * window, is_causal=sliding.is_causal,
        softmax_scale=sliding.scaling, sliding_window=sliding.sliding_window, softcap=sliding.softcap,
        supports_mapping=supports)
    assert kwargs["causal"] is True
    assert kwargs["window_size"] == (window - 1, window - 1)
    assert kwargs["softcap"] == model.config.attn_logit_softcapping == 50.0
    assert kwargs["softmax_scale"] == model.config.query_pre_attn_scalar ** -0.5
    kwargs = _process_flash_attention_kwargs(
        query_length=3 * window, key_length=3 * window, is_causal=full.is_causal, softmax_scale=full.scaling,
        sliding_window=full.sliding_window, softcap=full.softcap, supports_mapping=supports)
    assert "window_size" not in kwargs  # global layers: no window


def test_stock_gemma2_refuses_sdpa_in_pinned_transformers():
    """attention.py and the README describe stock Gemma 2 under sdpa; pin that description. With
    transformers 5.23 stock refuses sdpa for every Gemma 2 config (even one without the attention
    soft-cap), and a config switched to sdpa behind the model's back fails in forward instead of
    dropping the cap. If an upgrade changes this, update attention.py's docstring and the README."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    def config(**overrides):
        return Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8, **overrides)

    assert Gemma2ForCausalLM._supports_sdpa is False
    for overrides in ({}, {"attn_logit_softcapping": None}):
        with pytest.raises(ValueError, match="does not support an attention implementation through torch.nn.functional.scaled_dot_product_attention"):
            Gemma2ForCausalLM._from_config(config(**overrides), attn_implementation="sdpa")
    model = Gemma2ForCausalLM(config())
    assert model.config._attn_implementation == "eager"  # unspecified: eager, the cap kept
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        model.set_attn_implementation("sdpa")
    model.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="`sdpa` attention does not support `softcap`"):
        model(random_ids(1, 4, vocab=64))
