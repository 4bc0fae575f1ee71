"""The real Gemma 3 270M weights through GemmaHFForCausalLM vs stock Gemma3ForCausalLM."""

from __future__ import annotations

import pytest
import torch

from assets import require

PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which plants",
    "def add(a, b):\n    return",
]


@pytest.fixture(scope="module")
def models():
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    from gemma_hf import GemmaHFForCausalLM, assets

    checkpoint = require(assets.gemma3_270m)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ours, info = GemmaHFForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    stock = Gemma3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    return tokenizer, ours.eval(), stock.eval()


def test_config_matches_preset(models):
    from gemma_hf import preset_config

    _, ours, _ = models
    preset = preset_config("gemma3-270m")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "layer_types", "sliding_window", "rope_theta",
                  "local_rope_theta", "attention_scale", "use_qk_norm", "use_post_norms",
                  "attn_logit_softcapping", "final_logit_softcapping"):
        assert getattr(ours.config, field) == getattr(preset, field), field
    assert ours.num_parameters() == 268_098_176


def test_logits_match_stock(models):
    tokenizer, ours, stock = models
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        a = ours(**batch).logits
        b = stock(**batch).logits
    valid = batch["attention_mask"].bool()
    diff = (a[valid] - b[valid]).abs().max().item()
    assert diff <= 1e-4, f"max |dlogit| = {diff:.3g}"


def test_greedy_continuations_identical(models):
    tokenizer, ours, stock = models
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        kwargs = dict(max_new_tokens=24, do_sample=False)
        with torch.no_grad():
            a = ours.generate(**inputs, **kwargs)
            b = stock.generate(**inputs, **kwargs)
        assert torch.equal(a, b), (tokenizer.decode(a[0]), tokenizer.decode(b[0]))
