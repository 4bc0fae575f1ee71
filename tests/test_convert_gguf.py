"""GGUF import into our classes: tiny Gemma 2/3 GGUF files written here with the `gguf` package
(F32 tensors, llama.cpp's names and norm convention), and the real Gemma 3 270M Q4_K_M file."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from gemma_hf import GemmaHFForCausalLM, GemmaHFForSequenceClassification, convert
from gemma_hf.convert import ConversionError
from tiny import make_ours, max_abs_diff, random_ids


def write_gguf(model, path, arch: str, *, softcaps: bool = True, rope_scaling: float | None = None,
               vocab_tokens: int | None = None, with_mask_token: bool = True) -> None:
    """Write `model` as an F32 GGUF the way llama.cpp's converter lays Gemma out: tensors under
    GGUF names, RMSNorm weights stored as 1 + w, the tied output not stored."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_sliding_window(cfg.sliding_window)
    if softcaps and cfg.attn_logit_softcapping is not None:
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_scaling)
    writer.add_tokenizer_model("llama")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] + (["<mask>"] if with_mask_token else [])  # as in Gemma
    writer.add_token_list(specials + [f"<t{i}>" for i in range(len(specials), vocab_tokens or cfg.vocab_size)])
    writer.add_token_scores([0.0] * (vocab_tokens or cfg.vocab_size))
    writer.add_unk_token_id(3)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    arch_enum = {"gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3}[arch]
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        values = tensor.detach().float().numpy()
        if "norm" in name:
            values = values + 1.0
        writer.add_tensor(names.get_name(name.removesuffix(".weight")) + ".weight", values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        if "norm" in name:  # stored as 1 + w in float32 and read back as (1 + w) - 1
            assert max_abs_diff(sa[name], sb[name]) <= 2.0**-22, name
        else:
            assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("variant,arch", [("gemma2", "gemma2"), ("gemma3", "gemma3")])
def test_tiny_gguf_imports_into_our_causal_lm(tmp_path, variant, arch):
    source = make_ours(variant)
    write_gguf(source, tmp_path / "tiny.gguf", arch)
    model = convert.load_gguf(tmp_path / "tiny.gguf")
    assert isinstance(model, GemmaHFForCausalLM) and model.config.family == source.config.family
    assert not hasattr(model, "hf_quantizer") and not hasattr(model.config, "quantization_config")
    for field in ("layer_types", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping",
                  "use_qk_norm", "use_post_norms", "attention_scale", "rope_theta", "local_rope_theta"):
        assert getattr(model.config, field) == getattr(source.config, field), field
    assert_same_weights(model, source)
    ids = random_ids(2, 24)
    with torch.no_grad():
        assert max_abs_diff(model.eval()(ids).logits, source(ids).logits) <= 1e-5


def test_gguf_query_scale_follows_llama_cpp_not_transformers_default(tmp_path, caplog):
    # GGUF stores no query scale. transformers' Gemma 2 config would default to 256; llama.cpp
    # uses head_dim (here 16). A wrong scale changes every attention score.
    source = make_ours("gemma2")
    write_gguf(source, tmp_path / "tiny.gguf", "gemma2")
    with caplog.at_level("WARNING", logger="gemma_hf.convert"):
        model = convert.load_gguf(tmp_path)  # a directory holding exactly one .gguf
    assert model.config.query_pre_attn_scalar == 16
    assert "query_pre_attn_scalar: 256 -> 16" in caplog.text


def test_gguf_config_fixups_rules():
    base = {"num_hidden_layers": 46, "num_attention_heads": 32, "hidden_size": 4608, "head_dim": 128, "vocab_size": 10}
    fixed, changes = convert.gguf_config_fixups("gemma2", {"gemma2.attention.key_length": 128}, base, 10)
    assert fixed["query_pre_attn_scalar"] == 144  # Gemma 2 27B: d_model / num_heads, as llama.cpp
    base3 = {**base, "num_hidden_layers": 62, "hidden_size": 5376, "vocab_size": 10}
    fixed, _ = convert.gguf_config_fixups("gemma3", {"gemma3.attention.key_length": 128}, base3, 10)
    assert fixed["query_pre_attn_scalar"] == 168  # Gemma 3 27B
    fixed, _ = convert.gguf_config_fixups("gemma2", {"gemma2.attn_logit_softcapping": 40.0},
                                          {**base, "num_hidden_layers": 26}, 10)
    assert fixed["query_pre_attn_scalar"] == 128 and fixed["attn_logit_softcapping"] == 40.0
    with pytest.raises(ConversionError, match="RoPE scaling 'yarn'"):
        convert.gguf_config_fixups("gemma3", {"gemma3.rope.scaling.type": "yarn"}, base3, 10)
    with pytest.raises(ConversionError, match="256128 rows is the original padded Gemma vocabulary"):
        convert.gguf_config_fixups("gemma2", {}, {**base, "vocab_size": 256000}, 256128)


def test_gguf_linear_rope_scaling_is_read(tmp_path):
    source = make_ours("gemma3-linear-rope")  # factor 8 on global layers
    write_gguf(source, tmp_path / "tiny.gguf", "gemma3", rope_scaling=8.0)
    model = convert.load_gguf(tmp_path / "tiny.gguf")
    assert model.config.rope_linear_factor == 8.0
    ids = random_ids(1, 40)
    with torch.no_grad():
        assert max_abs_diff(model.eval()(ids).logits, source(ids).logits) <= 1e-5


def test_gguf_into_sequence_classifier(tmp_path):
    source = make_ours("gemma2")
    write_gguf(source, tmp_path / "tiny.gguf", "gemma2")
    clf = convert.load_gguf(tmp_path / "tiny.gguf", model_class=GemmaHFForSequenceClassification)
    assert isinstance(clf, GemmaHFForSequenceClassification)
    for name, tensor in source.model.state_dict().items():
        assert max_abs_diff(clf.model.state_dict()[name], tensor) <= 2.0**-22, name


def test_gguf_refusals(tmp_path):
    source = make_ours("gemma2")
    write_gguf(source, tmp_path / "bad-vocab.gguf", "gemma2", vocab_tokens=300)
    with pytest.raises(ConversionError, match="token_embd has 257 rows but its tokenizer lists 300 tokens"):
        convert.load_gguf(tmp_path / "bad-vocab.gguf")
    write_gguf(source, tmp_path / "second.gguf", "gemma2")
    with pytest.raises(ConversionError, match="holds 2 .gguf files"):
        convert.load_gguf(tmp_path)
    with pytest.raises(FileNotFoundError):
        convert.load_gguf(tmp_path / "nope.gguf")
    # transformers' Gemma GGUF tokenizer adds "<mask>" when the vocabulary lacks it: one id past
    # the embedding. Refused, instead of a tokenizer that can emit an id the model cannot embed.
    (tmp_path / "no-mask").mkdir()
    write_gguf(source, tmp_path / "no-mask" / "tiny.gguf", "gemma2", with_mask_token=False)
    with pytest.raises(ConversionError, match=r"258 tokens \(ids up to 257\) but the embedding has 257 rows"):
        convert.load_gguf(tmp_path / "no-mask", return_tokenizer=True)


def test_cli_import_gguf_writes_a_gemma_hf_checkpoint(tmp_path):
    import json

    from test_convert import run_cli

    source = make_ours("gemma3")
    write_gguf(source, tmp_path / "tiny.gguf", "gemma3")
    assert run_cli("export", "--to", "gemma_hf", str(tmp_path / "tiny.gguf"), str(tmp_path / "out")) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "gemma_hf" and "quantization_config" not in config
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    loaded = GemmaHFForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    assert_same_weights(loaded, source)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tokenizer) == 257 and tokenizer.convert_tokens_to_ids("<t7>") == 7


@pytest.mark.slow
def test_real_gemma3_270m_gguf_matches_stock(tmp_path):
    """The real Q4_K_M Gemma 3 270M: our import vs stock Gemma3ForCausalLM from the same file."""
    from transformers import Gemma3ForCausalLM

    from assets import require
    from gemma_hf import assets

    gguf_dir = require(assets.gemma3_270m_gguf)
    start = time.monotonic()
    # One parse of the file's metadata serves both loads (the parse is the slow part).
    with convert.parse_gguf_once():
        ours, tokenizer = convert.load_gguf(gguf_dir, return_tokenizer=True)
        stock = Gemma3ForCausalLM.from_pretrained(
            str(gguf_dir), gguf_file=assets.GEMMA3_270M_GGUF_FILE, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    print(f"GGUF loads: {time.monotonic() - start:.1f}s")
    assert ours.num_parameters() == assets.GEMMA3_270M_NUM_PARAMETERS
    assert ours.config.family == "gemma3" and ours.config.sliding_window == 512
    assert ours.config.layer_types.count("full_attention") == 3
    stock_state = stock.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, stock_state[name]), name
    prompts = ["The capital of France is", "def add(a, b):\n    return"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        a, b = ours.eval()(**batch).logits, stock(**batch).logits
    valid = batch["attention_mask"].bool()
    assert (a[valid] - b[valid]).abs().max().item() <= 1e-4
    convert.save_pretrained_atomic(ours, tmp_path / "ckpt", tokenizer=tokenizer)
    assert "quantization_config" not in (tmp_path / "ckpt" / "config.json").read_text()
