"""Tiny configs of every Gemma variant, and stock/ours model pairs with identical weights."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gemma_hf import GemmaHFConfig, GemmaHFForCausalLM
from gemma_hf.model.configuration import alternating_layer_types

WINDOW = 8  # small, so test sequences run well past it

_COMMON = dict(
    vocab_size=257,
    hidden_size=64,
    intermediate_size=96,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

TINY = {
    # Gemma 1 2B style: multi-query attention (one KV head)
    "gemma1-mqa": dict(family="gemma", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                       layer_types=["full_attention"] * 2, sliding_window=None, attn_logit_softcapping=None,
                       final_logit_softcapping=None, use_post_norms=False),
    # Gemma 1 7B style: multi-head attention
    "gemma1-mha": dict(family="gemma", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                       layer_types=["full_attention"] * 2, sliding_window=None, attn_logit_softcapping=None,
                       final_logit_softcapping=None, use_post_norms=False),
    # Gemma 2: GQA, local/global alternation, both soft-caps on
    "gemma2": dict(family="gemma2", num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   layer_types=alternating_layer_types(4, 1), sliding_window=WINDOW,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16),
    # Gemma 2 27B style: queries scaled by d_model/num_heads, not head_dim (64/4 = 16 vs head_dim 24)
    "gemma2-27b-style": dict(family="gemma2", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=24, query_pre_attn_scalar=16, layer_types=alternating_layer_types(2, 1),
                             sliding_window=WINDOW, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    # Gemma 3: QK-norm, 5 local : 1 global, two RoPE bases
    "gemma3": dict(family="gemma3", num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
                   layer_types=alternating_layer_types(6, 5), sliding_window=WINDOW, attn_logit_softcapping=None,
                   final_logit_softcapping=None, use_qk_norm=True, query_pre_attn_scalar=16,
                   rope_theta=1_000_000.0, rope_local_base_freq=10_000.0),
    # Gemma 3 4B+ style: linear RoPE scaling on global layers
    "gemma3-linear-rope": dict(family="gemma3", num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                               layer_types=alternating_layer_types(6, 5), sliding_window=WINDOW,
                               attn_logit_softcapping=None, final_logit_softcapping=None, use_qk_norm=True,
                               query_pre_attn_scalar=16, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                               rope_linear_factor=8.0),
}
# Variants without an attention soft-cap, where sdpa is exact.
NO_ATTN_SOFTCAP = [name for name, kw in TINY.items() if kw["attn_logit_softcapping"] is None]


def tiny_config(name: str, **overrides) -> GemmaHFConfig:
    return GemmaHFConfig(**{**_COMMON, **TINY[name], **overrides})


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Norm weights initialise to zero (identity); give them values so the tests see them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def make_ours(name: str, attn: str = "eager", seed: int = 0, **overrides) -> GemmaHFForCausalLM:
    torch.manual_seed(seed)
    model = GemmaHFForCausalLM._from_config(tiny_config(name, **overrides), attn_implementation=attn)
    randomize_norms(model, seed)
    return model.eval()


def stock_from(ours: torch.nn.Module, attn: str = "eager", head: str = "causal-lm"):
    """A stock transformers model holding exactly our weights (strict: every tensor name matches)."""
    stock_dict = ours.config.to_stock_dict()
    stock_config = AutoConfig.for_model(stock_dict.pop("model_type"), **stock_dict)
    if head == "causal-lm":
        stock = AutoModelForCausalLM.from_config(stock_config, attn_implementation=attn)
    else:
        from transformers import AutoModelForSequenceClassification

        stock = AutoModelForSequenceClassification.from_config(stock_config, attn_implementation=attn)
    stock.load_state_dict(ours.state_dict(), strict=True)
    return stock.eval()


def make_pair(name: str, attn: str = "eager", stock_attn: str = "eager", seed: int = 0, **overrides):
    ours = make_ours(name, attn=attn, seed=seed, **overrides)
    return ours, stock_from(ours, attn=stock_attn)


def random_ids(batch: int, seq: int, vocab: int = 257, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    ids[:, 0] = 2  # <bos>
    return ids


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def param_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> gradient of every parameter that received one."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a: dict, b: dict, rel: float) -> None:
    """Same parameters got gradients, each within `rel` of the other's largest entry."""
    assert a.keys() == b.keys() and a
    for name in a:
        scale = max(a[name].abs().max().item(), 1e-12)
        err = (a[name] - b[name]).abs().max().item() / scale
        assert err <= rel, f"{name}: relative gradient error {err:.2e}"


# Prepended to scripts run in a subprocess that must prove they work WITHOUT gemma_hf: any
# import of gemma_hf in that process fails.
BLOCK_GEMMA_HF_IMPORTS = """
import importlib.abc, sys

class _BlockGemmaHF(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "gemma_hf" or name.startswith("gemma_hf."):
            raise ImportError("gemma_hf must not be imported in this process")

sys.meta_path.insert(0, _BlockGemmaHF())
"""


# -- distillation teachers -------------------------------------------------------------------------
TEACHER_SHAPE = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=32)


def make_teacher(path: Path, tokenizer_asset, family: str, seed: int) -> Path:
    """A random tiny Gemma 3 (or Gemma 2) checkpoint with the given tokenizer asset (a tiny cut of the
    real one, in tests that are not about the tokenizer) and its family's chat template."""
    from gemma_hf import GemmaHFForCausalLM, preset_config
    from gemma_hf.chat import install_chat_template
    from gemma_hf.recipes.runtime import set_generation_stops

    from tests.assets import tokenizer as load_tokenizer

    tok = load_tokenizer(tokenizer_asset)
    torch.manual_seed(seed)
    preset = "gemma3-270m" if family == "gemma3" else "gemma2-2b"
    shape = TEACHER_SHAPE if family == "gemma3" else {**TEACHER_SHAPE, "num_key_value_heads": 2}
    model = GemmaHFForCausalLM(preset_config(preset, **shape, vocab_size=len(tok)))  # tiny cut: 4096; npm Gemma 3: 262145
    with torch.no_grad():
        # Norms off their identity init. Then a teacher the student can learn to imitate from a few
        # batches: its layers 1 and 2 (which the student built from layers [0, 3] lacks) add one
        # constant vector along a direction u to the residual stream (attention output zeroed; the
        # MLP's single live unit gives gelu(a.x) (a.x) >= 0 times u, which the post-feedforward RMSNorm
        # turns into the same vector for every input), and the tied embedding gives token i the
        # component c_i u: the teacher's next-token distributions lean on a fixed, peaked "unigram"
        # softmax(c) the student can only match by learning the shift.
        gen = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        hidden, u = model.config.hidden_size, torch.randn(model.config.hidden_size, generator=gen)
        u /= u.norm()
        embed = model.model.embed_tokens.weight
        embed += torch.randn(embed.shape[0], 1, generator=gen) * 0.5 * u
        for index in (1, 2):
            layer = model.model.layers[index]
            layer.self_attn.o_proj.weight.zero_()
            a = torch.randn(hidden, generator=gen) / hidden**0.5
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight.zero_()
                proj.weight[0] = a
            layer.mlp.down_proj.weight.zero_()
            layer.mlp.down_proj.weight[:, 0] = u
            layer.post_feedforward_layernorm.weight.fill_(2.0)  # (1 + w) = 3: the shift dominates
    set_generation_stops(model, tok)
    model.save_pretrained(path)
    install_chat_template(tok, family).save_pretrained(path)
    return path


def shared_teacher(seed: int = 0) -> "Path":
    """One tiny Gemma 3 teacher (make_teacher, seed 0; another seed: another model of the same
    architecture, e.g. the second input of a merge) per machine, for the subprocess tests
    (tests/faults.py): built once into the temp directory, atomically."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from gemma_hf.assets import gemma3_tokenizer_tiny

    # v2: on the 4,096-entry tokenizer (v1 had the real 262k one)
    path = Path(tempfile.gettempdir()) / ("gemma_hf-tests-teacher-v2" + (f"-seed{seed}" if seed else ""))
    if not (path / "model.safetensors").is_file():
        scratch = Path(tempfile.mkdtemp(prefix="gemma_hf-tests-teacher-"))
        make_teacher(scratch / "teacher", gemma3_tokenizer_tiny, "gemma3", seed=seed)
        try:
            os.rename(scratch / "teacher", path)
        except OSError:  # another process built it first
            pass
        shutil.rmtree(scratch, ignore_errors=True)
    return path
