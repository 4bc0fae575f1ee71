"""Auto* registration, save/load round trips, remote-code loading without gemma_hf (every head from
every head's checkpoint), and loading stock transformers checkpoints into our classes with no tensor
renaming and no "model of type ..." warning (foreign model types are refused)."""

from __future__ import annotations

import contextlib
import json
import logging
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
    expected_type = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}[ours.config.family]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == expected_type
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


# --------------------------------------------------------------------------------------------
# Every checkpoint maps every head we ship, and carries their code

ALL_HEADS = {
    "AutoConfig": "configuration.GemmaHFConfig",
    "AutoModel": "modeling.GemmaHFModel",
    "AutoModelForCausalLM": "modeling.GemmaHFForCausalLM",
    "AutoModelForSequenceClassification": "modeling.GemmaHFForSequenceClassification",
}


@pytest.mark.parametrize("head", ["causal-lm", "sequence-classification", "backbone"])
def test_every_head_saves_an_auto_map_of_all_heads(tmp_path, head):
    config = tiny_config("gemma3", num_labels=1)
    torch.manual_seed(0)
    model = {"causal-lm": GemmaHFForCausalLM, "sequence-classification": GemmaHFForSequenceClassification,
             "backbone": GemmaHFModel}[head](config)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == ALL_HEADS
    for file in ("configuration.py", "modeling.py", "layers.py", "attention.py", "loss.py", "safety.py"):
        assert (tmp_path / file).is_file(), file


REMOTE_ALL_HEADS = BLOCK_GEMMA_HF_IMPORTS + textwrap.dedent(
    """
    import json, sys

    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    lm_dir, rm_dir, ids_path, out_path = sys.argv[1:]
    ids = torch.load(ids_path, weights_only=True)
    loads = {
        "lm as AutoModel": (AutoModel, lm_dir, {}),
        "lm as AutoModelForCausalLM": (AutoModelForCausalLM, lm_dir, {}),
        "lm as AutoModelForSequenceClassification": (AutoModelForSequenceClassification, lm_dir, {"num_labels": 1}),
        "rm as AutoModelForCausalLM": (AutoModelForCausalLM, rm_dir, {}),
    }
    outputs, classes = {}, {}
    for name, (auto, directory, kwargs) in loads.items():
        model = auto.from_pretrained(directory, trust_remote_code=True, attn_implementation="eager", **kwargs).eval()
        with torch.no_grad():
            out = model(ids)
        outputs[name] = out.last_hidden_state if auto is AutoModel else out.logits
        classes[name] = type(model).__module__ + "." + type(model).__name__
    assert not any(m == "gemma_hf" or m.startswith("gemma_hf.") for m in sys.modules)
    torch.save(outputs, out_path)
    print(json.dumps(classes))
    """
)


def test_remote_code_loads_every_head_from_every_head_without_gemma_hf(tmp_path):
    """An SFT (causal-LM) checkpoint starts a reward model elsewhere, and a reward model's backbone
    reads as a causal LM: all through trust_remote_code, with gemma_hf unimportable."""
    lm = make_ours("gemma2")
    lm.save_pretrained(tmp_path / "lm")
    torch.manual_seed(1)
    rm = GemmaHFForSequenceClassification(tiny_config("gemma2", num_labels=1)).eval()
    rm.save_pretrained(tmp_path / "rm")
    ids = random_ids(2, 12)
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_ALL_HEADS, str(tmp_path / "lm"), str(tmp_path / "rm"),
         str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    classes = json.loads(result.stdout.strip().splitlines()[-1])
    assert {name: cls.rsplit(".", 1)[-1] for name, cls in classes.items()} == {
        "lm as AutoModel": "GemmaHFModel",
        "lm as AutoModelForCausalLM": "GemmaHFForCausalLM",
        "lm as AutoModelForSequenceClassification": "GemmaHFForSequenceClassification",
        "rm as AutoModelForCausalLM": "GemmaHFForCausalLM",
    }
    assert all(cls.startswith("transformers_modules.") for cls in classes.values()), classes
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        assert max_abs_diff(out["lm as AutoModel"], lm.model(ids).last_hidden_state) == 0.0
        assert max_abs_diff(out["lm as AutoModelForCausalLM"], lm(ids).logits) == 0.0
        # The reward model's backbone under the (tied) LM head: what our own class computes from it.
        rm_as_lm = GemmaHFForCausalLM.from_pretrained(tmp_path / "rm", attn_implementation="eager").eval()
        assert max_abs_diff(out["rm as AutoModelForCausalLM"], rm_as_lm(ids).logits) == 0.0
    assert out["lm as AutoModelForSequenceClassification"].shape == (2, 1)  # a fresh score head on lm's backbone


# --------------------------------------------------------------------------------------------
# Stock configs convert without transformers' "model of type" warning; foreign ones are refused

MODEL_TYPE_WARNING = "You are using a model of type"


@contextlib.contextmanager
def transformers_log():
    """Capture transformers' log records at WARNING and above (its logger does not propagate)."""
    from transformers.utils import logging as hf_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)


@pytest.mark.parametrize("variant", ["gemma1-mqa", "gemma2", "gemma3"])
def test_stock_checkpoint_loads_without_the_model_type_warning(tmp_path, variant):
    from transformers import PreTrainedConfig

    stock_from(make_ours(variant)).save_pretrained(tmp_path)
    with transformers_log() as records:
        # Positive control: transformers' own from_pretrained warns for exactly this directory...
        PreTrainedConfig.from_pretrained.__func__(GemmaHFConfig, tmp_path)
    assert any(MODEL_TYPE_WARNING in r.getMessage() for r in records), "the capture must see the warning"
    with transformers_log() as records:
        # ...ours converts on purpose, silently, through every entry point.
        GemmaHFConfig.from_pretrained(tmp_path)
        GemmaHFForCausalLM.from_pretrained(tmp_path)
        GemmaHFForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    assert not [r.getMessage() for r in records if MODEL_TYPE_WARNING in r.getMessage()]


def test_foreign_model_type_is_refused_naming_type_and_accepted_ones(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path)
    expected = (r"cannot read a config of model_type='llama'\. gemma_hf reads its own configs \('gemma_hf'\) "
                r"and stock Gemma text configs \('gemma', 'gemma2', 'gemma3_text'\)")
    with pytest.raises(ValueError, match=expected):
        GemmaHFConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=expected):
        GemmaHFForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=expected):
        GemmaHFConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    # The multimodal Gemma 3 config shares our family's name: say what it is.
    with pytest.raises(ValueError, match="multimodal Gemma 3 config"):
        GemmaHFConfig.from_dict({"model_type": "gemma3"})
