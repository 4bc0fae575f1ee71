"""Auto* registration, save/load round trips, remote-code loading without gemma_hf, and loading
stock transformers checkpoints into our classes with no tensor renaming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from gemma_hf import GemmaHFConfig, GemmaHFForCausalLM, GemmaHFForSequenceClassification, GemmaHFModel
from tiny import BLOCK_GEMMA_HF_IMPORTS, TINY, make_ours, max_abs_diff, random_ids, stock_from, tiny_config


def test_auto_classes_resolve_our_types():
    config = tiny_config("gemma2")
    assert isinstance(AutoConfig.for_model("gemma_hf"), GemmaHFConfig)
    assert type(AutoModel.from_config(config)) is GemmaHFModel
    assert type(AutoModelForCausalLM.from_config(config)) is GemmaHFForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is GemmaHFForSequenceClassification


@pytest.mark.parametrize("variant", ["gemma1-mqa", "gemma2", "gemma3"])
def test_save_and_auto_load_round_trip(tmp_path, variant):
    ours = make_ours(variant)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "gemma_hf"
    assert saved["auto_map"]["AutoModelForCausalLM"].endswith("GemmaHFForCausalLM")
    assert (tmp_path / "modeling.py").exists() and (tmp_path / "configuration.py").exists()
    assert (tmp_path / "model.safetensors").exists()
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert type(loaded) is GemmaHFForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # Non-persistent buffers were re-created, not left as garbage from the meta device.
    assert loaded.model.embed_tokens.embed_scale.item() == pytest.approx(64 ** 0.5)
    ids = random_ids(2, 20)
    with torch.no_grad():
        assert max_abs_diff(loaded.eval()(ids).logits, ours(ids).logits) == 0.0


REMOTE_LOAD = BLOCK_GEMMA_HF_IMPORTS + textwrap.dedent(
    """
    import sys

    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert "gemma_hf" not in sys.modules
    ids = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        torch.save(model(ids).logits, sys.argv[3])
    print(type(model).__module__, type(model).__name__)
    """
)


def test_remote_code_load_in_fresh_process_without_gemma_hf(tmp_path):
    ours = make_ours("gemma2")
    ckpt = tmp_path / "ckpt"
    ours.save_pretrained(ckpt)
    ids = random_ids(1, 20)
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(ckpt), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GemmaHFForCausalLM" in result.stdout and "transformers_modules" in result.stdout
    remote_logits = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        assert max_abs_diff(remote_logits, ours(ids).logits) == 0.0


@pytest.mark.parametrize("variant", list(TINY))
def test_stock_checkpoint_loads_into_our_classes(tmp_path, variant):
    ours = make_ours(variant)
    stock = stock_from(ours)
    stock.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] in ("gemma", "gemma2", "gemma3_text")
    loaded, info = GemmaHFForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.model_type == "gemma_hf" and loaded.config.family == ours.config.family
    assert set(loaded.state_dict()) == set(stock.state_dict())  # tensor names equal stock ones
    ids = random_ids(2, 30)
    with torch.no_grad():
        assert max_abs_diff(loaded.eval()(ids).logits, stock(ids).logits) <= 1e-5


def test_sequence_classification_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GemmaHFForSequenceClassification(tiny_config("gemma2", num_labels=1)).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = random_ids(2, 10)
    with torch.no_grad():
        # Hidden states are bit-identical; the 1-wide score matmul may take another BLAS path.
        assert max_abs_diff(loaded(ids).logits, model(ids).logits) <= 1e-6
    assert loaded(ids).logits.shape == (2, 1)
