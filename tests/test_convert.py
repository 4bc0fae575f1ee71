"""Stock checkpoints in (sharded too), export to stock transformers (loaded where gemma_hf cannot be
imported), the stock -> ours -> stock round trip, vocabulary resizing, atomic saves, `gemma-hf export`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gemma_hf import GemmaHFConfig, GemmaHFForCausalLM, GemmaHFForSequenceClassification, convert
from gemma_hf.convert import ConversionError, VocabResizeError
from tiny import BLOCK_GEMMA_HF_IMPORTS, make_ours, max_abs_diff, random_ids, stock_from, tiny_config

VARIANTS = ["gemma1-mqa", "gemma2", "gemma3-linear-rope"]


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def run_cli(*argv: str) -> int:
    """The real `gemma-hf` entry point (its one error handler included), in this process."""
    from tests.clirun import cli

    return cli(argv)


# --------------------------------------------------------------------------------------------
# Import: stock checkpoints (sharded) into our classes


@pytest.mark.parametrize("variant", ["gemma1-mha", "gemma2", "gemma3"])
def test_sharded_stock_checkpoint_loads_into_causal_lm(tmp_path, variant):
    ours = make_ours(variant)
    stock = stock_from(ours)
    stock.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the test needs a sharded checkpoint"
    loaded = GemmaHFForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.config.family == ours.config.family
    ids = random_ids(2, 24)
    with torch.no_grad():
        assert max_abs_diff(loaded(ids).logits, stock(ids).logits) == 0.0


def test_stock_causal_checkpoint_loads_into_sequence_classifier(tmp_path):
    ours = make_ours("gemma2")
    stock_from(ours).save_pretrained(tmp_path, max_shard_size="40KB")
    clf = GemmaHFForSequenceClassification.from_pretrained(tmp_path, num_labels=1, attn_implementation="eager").eval()
    # The backbone is the checkpoint's, bit for bit; only the new score head is fresh.
    for name, tensor in ours.model.state_dict().items():
        assert torch.equal(clf.model.state_dict()[name], tensor), name
    ids = random_ids(2, 12)
    with torch.no_grad():
        assert clf(ids).logits.shape == (2, 1)


def test_stock_sequence_classifier_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    ours = GemmaHFForSequenceClassification(tiny_config("gemma3", num_labels=1)).eval()
    stock = stock_from(ours, head="sequence-classification")
    stock.save_pretrained(tmp_path / "stock")
    loaded = GemmaHFForSequenceClassification.from_pretrained(tmp_path / "stock", attn_implementation="eager").eval()
    for name, tensor in stock.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    convert.export_to_transformers(_save(loaded, tmp_path / "ours"), tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3TextForSequenceClassification"]
    back = read_tensors(tmp_path / "back")
    assert set(back) == set(stock.state_dict())
    assert all(torch.equal(back[k], v) for k, v in stock.state_dict().items())


def _save(model, path: Path) -> Path:
    convert.save_pretrained_atomic(model, path)
    return path


# --------------------------------------------------------------------------------------------
# Export: loads in stock transformers with gemma_hf blocked from importing

BLOCKED_LOAD = BLOCK_GEMMA_HF_IMPORTS + textwrap.dedent(
    """
    import json, sys

    import torch
    from transformers import AutoModelForCausalLM

    results = {}
    for ckpt, ids_path, out_path in json.loads(sys.argv[1]):
        config = json.load(open(ckpt + "/config.json"))
        assert "auto_map" not in config, "an export must not need remote code"
        model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
        with torch.no_grad():
            torch.save(model(torch.load(ids_path, weights_only=True)).logits, out_path)
        results[ckpt] = type(model).__module__ + "." + type(model).__name__
    assert not any(m == "gemma_hf" or m.startswith("gemma_hf.") for m in sys.modules)
    print(json.dumps(results))
    """
)


def test_export_loads_in_stock_transformers_without_gemma_hf(tmp_path):
    jobs, models = [], {}
    for variant in VARIANTS:
        ours = make_ours(variant)
        _save(ours, tmp_path / f"{variant}-ours")
        assert run_cli("export", "--to", "transformers", str(tmp_path / f"{variant}-ours"), str(tmp_path / variant)) == 0
        ids = random_ids(2, 24)
        torch.save(ids, tmp_path / f"{variant}-ids.pt")
        jobs.append([str(tmp_path / variant), str(tmp_path / f"{variant}-ids.pt"), str(tmp_path / f"{variant}-out.pt")])
        models[variant] = (ours, ids)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", BLOCKED_LOAD, json.dumps(jobs)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    classes = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {"gemma1-mqa": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3-linear-rope": "Gemma3ForCausalLM"}
    for variant, (ours, ids) in models.items():
        assert classes[str(tmp_path / variant)].startswith("transformers.models.")
        assert classes[str(tmp_path / variant)].endswith(expected[variant])
        stock_logits = torch.load(tmp_path / f"{variant}-out.pt", weights_only=True)
        with torch.no_grad():
            assert max_abs_diff(stock_logits, ours(ids).logits) == 0.0, variant


def test_export_copies_tokenizer_and_generation_config(tmp_path):
    ours = make_ours("gemma2")
    ours.generation_config.max_new_tokens = 17
    _save(ours, tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (tmp_path / "src" / "tokenizer_config.json").write_text('{"model_max_length": 8192}')
    convert.export_to_transformers(tmp_path / "src", tmp_path / "dst")
    files = sorted(p.name for p in (tmp_path / "dst").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert json.loads((tmp_path / "dst" / "generation_config.json").read_text())["max_new_tokens"] == 17
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'


@pytest.mark.parametrize("variant", ["gemma1-mqa", "gemma2-27b-style", "gemma3-linear-rope"])
def test_stock_to_ours_to_stock_round_trip_is_exact(tmp_path, variant):
    from transformers import AutoConfig

    stock = stock_from(make_ours(variant))
    stock.save_pretrained(tmp_path / "stock", max_shard_size="60KB")
    ours = GemmaHFForCausalLM.from_pretrained(tmp_path / "stock", attn_implementation="eager")
    _save(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "gemma_hf"
    convert.export_to_transformers(tmp_path / "ours", tmp_path / "back")

    before, after = read_tensors(tmp_path / "stock"), read_tensors(tmp_path / "back")
    assert set(before) == set(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name
    ignore = {"transformers_version", "_name_or_path", "dtype"}
    a = {k: v for k, v in AutoConfig.from_pretrained(tmp_path / "stock").to_dict().items() if k not in ignore}
    b = {k: v for k, v in AutoConfig.from_pretrained(tmp_path / "back").to_dict().items() if k not in ignore}
    assert a == b


def test_export_keeps_bfloat16(tmp_path):
    ours = make_ours("gemma3").to(torch.bfloat16)
    _save(ours, tmp_path / "src")
    convert.export_to_transformers(tmp_path / "src", tmp_path / "dst")
    tensors = read_tensors(tmp_path / "dst")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert all(torch.equal(tensors[k], v) for k, v in ours.state_dict().items() if k in tensors)


def test_export_refusals(tmp_path):
    stock_from(make_ours("gemma2")).save_pretrained(tmp_path / "stock")
    with pytest.raises(ConversionError, match="already a stock 'gemma2' checkpoint"):
        convert.export_to_transformers(tmp_path / "stock", tmp_path / "x")
    # A Gemma 1 family config with a soft-cap has no stock equivalent: the field is named.
    odd = GemmaHFForCausalLM(tiny_config("gemma1-mqa", final_logit_softcapping=30.0))
    _save(odd, tmp_path / "odd")
    with pytest.raises(ConversionError, match="final_logit_softcapping"):
        convert.export_to_transformers(tmp_path / "odd", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    _save(make_ours("gemma2"), tmp_path / "ok")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        convert.export_to_transformers(tmp_path / "ok", tmp_path / "taken")
    with pytest.raises(ConversionError, match="no config.json"):
        convert.export_to_transformers(tmp_path / "taken", tmp_path / "y")


def test_failed_export_leaves_no_destination(tmp_path, monkeypatch):
    _save(make_ours("gemma2"), tmp_path / "src")

    def broken(directory, model):
        raise ConversionError("simulated verification failure")

    monkeypatch.setattr(convert.checkpoints, "verify_saved_tensors", broken)  # where export looks it up
    with pytest.raises(ConversionError, match="simulated"):
        convert.export_to_transformers(tmp_path / "src", tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no dst, no .dst.tmp-*


def test_verify_saved_tensors_catches_a_changed_value(tmp_path):
    ours = make_ours("gemma3")
    _save(ours, tmp_path / "ckpt")
    assert convert.verify_saved_tensors(tmp_path / "ckpt", ours) == len(read_tensors(tmp_path / "ckpt"))
    with torch.no_grad():
        ours.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.up_proj\.weight: values differ"):
        convert.verify_saved_tensors(tmp_path / "ckpt", ours)


def test_cli_export_reports_errors_without_traceback(tmp_path, capsys):
    assert run_cli("export", "--to", "transformers", str(tmp_path / "missing"), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_import_stock_directory_to_gemma_hf(tmp_path):
    ours = make_ours("gemma3")
    stock_from(ours).save_pretrained(tmp_path / "stock")
    (tmp_path / "stock" / "tokenizer.json").write_text("{}")
    assert run_cli("export", "--to", "gemma_hf", str(tmp_path / "stock"), str(tmp_path / "ours")) == 0
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "gemma_hf" and "auto_map" in config
    assert (tmp_path / "ours" / "tokenizer.json").is_file()
    loaded = GemmaHFForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids = random_ids(1, 16)
    with torch.no_grad():
        assert max_abs_diff(loaded(ids).logits, ours(ids).logits) == 0.0


# --------------------------------------------------------------------------------------------
# Vocabulary padding, both ways


def test_resize_vocab_pads_and_trims_exactly():
    model = make_ours("gemma2")  # vocab 257, tied head
    ids = random_ids(2, 20)
    with torch.no_grad():
        before = model(ids).logits
    convert.resize_vocab(model, 300)
    assert model.config.vocab_size == 300 and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.num_embeddings == 300 and model.lm_head.out_features == 300
    assert torch.count_nonzero(model.model.embed_tokens.weight[257:]) == 0
    with torch.no_grad():
        padded = model(ids).logits
    assert padded.shape[-1] == 300
    assert max_abs_diff(padded[..., :257], before) == 0.0
    assert torch.count_nonzero(padded[..., 257:]) == 0  # zero rows: logit exactly 0, soft-capped or not
    convert.resize_vocab(model, 257)  # the dropped rows are zero: provably padding
    with torch.no_grad():
        assert max_abs_diff(model(ids).logits, before) == 0.0


def test_resize_vocab_refuses_to_drop_rows_that_may_be_tokens():
    model = make_ours("gemma3")
    with pytest.raises(VocabResizeError, match=r"row 250 .* is not zero.*tokenizer=tok"):
        convert.resize_vocab(model, 250)
    assert model.config.vocab_size == 257  # untouched

    class Tok:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    with pytest.raises(VocabResizeError, match="tokenizer has 256 tokens"):
        convert.resize_vocab(model, 250, tokenizer=Tok(256))
    convert.resize_vocab(model, 250, tokenizer=Tok(250))
    assert model.model.embed_tokens.weight.shape == (250, 64)
    eos_high = make_ours("gemma3", eos_token_id=255)
    with pytest.raises(VocabResizeError, match=r"special tokens \{'eos_token_id': 255\}"):
        convert.resize_vocab(eos_high, 250, tokenizer=Tok(10))


def test_resize_vocab_untied_head_and_save_load(tmp_path):
    model = make_ours("gemma1-mha", tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.normal_()
    ids = random_ids(1, 12)
    with torch.no_grad():
        before = model(ids).logits
    convert.resize_vocab(model, 384)
    assert model.lm_head.weight is not model.model.embed_tokens.weight and model.lm_head.weight.shape == (384, 64)
    _save(model, tmp_path / "padded")
    loaded = GemmaHFForCausalLM.from_pretrained(tmp_path / "padded", attn_implementation="eager").eval()
    assert loaded.config.vocab_size == 384
    with torch.no_grad():
        assert max_abs_diff(loaded(ids).logits[..., :257], before) == 0.0
    convert.resize_vocab(loaded, 257)  # zero rows in both matrices
    with torch.no_grad():
        assert max_abs_diff(loaded(ids).logits, before) == 0.0


def test_padded_vocabulary_checkpoint_gets_the_padding_explanation(tmp_path):
    # A 256128-row (reports' padded vocabulary) checkpoint into a 256000-row config, and back.
    small = dict(hidden_size=8, head_dim=8, intermediate_size=16, num_attention_heads=1, num_key_value_heads=1,
                 layer_types=["sliding_attention", "full_attention"])
    model = GemmaHFForCausalLM(tiny_config("gemma2", vocab_size=256128, num_hidden_layers=2, **small))
    _save(model, tmp_path / "padded")
    with pytest.raises(convert.CheckpointMismatchError) as err:
        GemmaHFForCausalLM.from_pretrained(tmp_path / "padded", vocab_size=256000)
    message = str(err.value)
    assert "model.embed_tokens.weight: checkpoint shape (256128, 8), model shape (256000, 8)" in message
    assert "original, padded Gemma vocabulary" in message
    assert "from_pretrained(path, vocab_size=256128)" in message and "resize_vocab(model, 256000)" in message
    # The way out the message names works: rows 256000.. are zero (never used), so trimming is allowed.
    with torch.no_grad():
        model.model.embed_tokens.weight[256000:].zero_()
    _save(model, tmp_path / "padded-zero")
    loaded = GemmaHFForCausalLM.from_pretrained(tmp_path / "padded-zero", vocab_size=256128)
    convert.resize_vocab(loaded, 256000)
    assert loaded.config.vocab_size == 256000
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight[:256000])


# --------------------------------------------------------------------------------------------
# Atomic saves


def test_save_pretrained_atomic(tmp_path):
    model = make_ours("gemma2")
    out = convert.save_pretrained_atomic(model, tmp_path / "ckpt", max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    with pytest.raises(FileExistsError):
        convert.save_pretrained_atomic(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="safetensors only"):
        convert.save_pretrained_atomic(model, tmp_path / "other", safe_serialization=False)
    convert.save_pretrained_atomic(model, tmp_path / "ckpt", overwrite=True)  # replaced whole
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert not (tmp_path / "ckpt" / "model.safetensors.index.json").exists()


def test_interrupted_save_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    model = make_ours("gemma2")
    real_save = type(model).save_pretrained

    def dies_midway(self, directory, **kwargs):
        real_save(self, directory, **kwargs)  # the files are written...
        raise KeyboardInterrupt  # ...and then the process is interrupted before the rename

    monkeypatch.setattr(type(model), "save_pretrained", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        convert.save_pretrained_atomic(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_to_stock_and_back_share_tensors():
    ours = make_ours("gemma3")
    stock = convert.to_stock_model(ours)
    assert type(stock).__name__ == "Gemma3ForCausalLM"
    assert stock.model.embed_tokens.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    again = convert.from_stock_model(stock)
    assert isinstance(again, GemmaHFForCausalLM) and isinstance(again.config, GemmaHFConfig)
    ids = random_ids(1, 16)
    with torch.no_grad():
        assert max_abs_diff(stock(ids).logits, ours(ids).logits) == 0.0
        assert max_abs_diff(again(ids).logits, ours(ids).logits) == 0.0
