"""Safe loading: pickle weights refused unless opted in (and never unpickled before that), and
shape / missing / unexpected tensor mismatches raised with the tensor names and both shapes.

These tests go through `GemmaHFForCausalLM.from_pretrained`, so they need the hook in
`GemmaHFPreTrainedModel.from_pretrained` that calls `gemma_hf.model.safety.guarded_from_pretrained`.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from gemma_hf import GemmaHFForCausalLM, GemmaHFForSequenceClassification
from gemma_hf.model.safety import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    check_loading_info,
    check_safe_checkpoint,
)
from tiny import BLOCK_GEMMA_HF_IMPORTS, make_ours, max_abs_diff, random_ids, tiny_config


def pickle_checkpoint(model, directory, index: bool = False):
    """A checkpoint the way old tooling wrote it: config.json + torch.save'd (pickled) weights."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    name = "pytorch_model-00001-of-00001.bin" if index else "pytorch_model.bin"
    torch.save(model.state_dict(), directory / name)
    if index:
        weight_map = {k: name for k in model.state_dict()}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


class Payload:
    """Unpickling this creates a file: stands in for arbitrary code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --------------------------------------------------------------------------------------------
# Pickle refusal


@pytest.mark.parametrize("loader", [GemmaHFForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained])
def test_pickle_checkpoint_is_refused_with_reason_and_opt_in(tmp_path, loader):
    ckpt = pickle_checkpoint(make_ours("gemma2"), tmp_path / "ckpt")
    with pytest.raises(UnsafeCheckpointError) as err:
        loader(ckpt)
    message = str(err.value)
    assert "pytorch_model.bin" in message
    assert "arbitrary code" in message
    assert "allow_pickle=True" in message


def test_sharded_pickle_checkpoint_is_refused(tmp_path):
    ckpt = pickle_checkpoint(make_ours("gemma3"), tmp_path / "ckpt", index=True)
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model-00001-of-00001\.bin, pytorch_model\.bin\.index\.json"):
        GemmaHFForCausalLM.from_pretrained(ckpt)


def test_allow_pickle_opts_in_and_loads_exactly(tmp_path):
    ours = make_ours("gemma2")
    ckpt = pickle_checkpoint(ours, tmp_path / "ckpt")
    loaded = GemmaHFForCausalLM.from_pretrained(ckpt, allow_pickle=True, attn_implementation="eager").eval()
    ids = random_ids(2, 16)
    with torch.no_grad():
        assert max_abs_diff(loaded(ids).logits, ours(ids).logits) == 0.0
    again = AutoModelForCausalLM.from_pretrained(ckpt, allow_pickle=True)  # the Auto path passes it through
    assert isinstance(again, GemmaHFForCausalLM)


def test_use_safetensors_false_needs_the_opt_in_too(tmp_path):
    ckpt = pickle_checkpoint(make_ours("gemma2"), tmp_path / "ckpt")
    with pytest.raises(UnsafeCheckpointError, match="use_safetensors=False"):
        GemmaHFForCausalLM.from_pretrained(ckpt, use_safetensors=False)


def test_malicious_pickle_is_never_unpickled(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    make_ours("gemma2").config.save_pretrained(ckpt)
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": Payload(marker)}, ckpt / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError):
        GemmaHFForCausalLM.from_pretrained(ckpt)
    assert not marker.exists()
    # Even with the opt-in, transformers unpickles with torch.load(weights_only=True), which
    # rejects the payload: defence in depth, not a reason to drop the refusal above.
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        GemmaHFForCausalLM.from_pretrained(ckpt, allow_pickle=True)
    assert not marker.exists()


def test_safetensors_are_used_when_both_formats_are_present(tmp_path):
    ours = make_ours("gemma3")
    ckpt = tmp_path / "ckpt"
    ours.save_pretrained(ckpt)
    decoy = make_ours("gemma3", seed=7)  # different weights in the pickle
    torch.save(decoy.state_dict(), ckpt / "pytorch_model.bin")
    loaded = GemmaHFForCausalLM.from_pretrained(ckpt, attn_implementation="eager")
    assert torch.equal(loaded.model.embed_tokens.weight, ours.model.embed_tokens.weight)


def test_check_safe_checkpoint_decisions(tmp_path):
    # A Hub id cannot be inspected before download: force safetensors, so no pickle is fetched.
    assert check_safe_checkpoint("google/gemma-2-2b") is True
    assert check_safe_checkpoint("google/gemma-2-2b", allow_pickle=True) is None
    assert check_safe_checkpoint("google/gemma-2-2b", use_safetensors=False, allow_pickle=True) is False
    ckpt = pickle_checkpoint(make_ours("gemma2"), tmp_path / "repo" / "sub")
    assert check_safe_checkpoint(tmp_path / "repo") is True  # nothing at the top level
    with pytest.raises(UnsafeCheckpointError, match="sub"):
        check_safe_checkpoint(tmp_path / "repo", subfolder="sub")
    with pytest.raises(UnsafeCheckpointError):
        check_safe_checkpoint(ckpt / "pytorch_model.bin")
    # Trainer side files are not weights and do not trigger the refusal.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "training_args.bin").write_bytes(b"x")
    (tmp_path / "run" / "model.safetensors").write_bytes(b"x")
    assert check_safe_checkpoint(tmp_path / "run") is True


def test_gguf_through_our_from_pretrained_points_to_load_gguf(tmp_path):
    # transformers keys its GGUF tensor map by stock model types; our classes refuse clearly instead
    # of failing inside transformers with "Unknown gguf model_type: gemma_hf".
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"gemma_hf\.convert\.load_gguf"):
        GemmaHFForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")


def test_saved_checkpoints_carry_the_guard_as_remote_code(tmp_path):
    make_ours("gemma2").save_pretrained(tmp_path)
    assert (tmp_path / "safety.py").is_file(), "modeling.py must import .safety so the guard travels with the code"


REMOTE_PICKLE_LOAD = BLOCK_GEMMA_HF_IMPORTS + textwrap.dedent(
    """
    import sys

    from transformers import AutoModelForCausalLM
    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    except Exception as err:
        print(type(err).__name__, "|", err)
    else:
        print("LOADED")
    """
)


def test_remote_code_checkpoint_refuses_pickle_without_gemma_hf(tmp_path):
    ckpt = tmp_path / "ckpt"
    make_ours("gemma2").save_pretrained(ckpt)  # config with auto_map + the model code
    (ckpt / "model.safetensors").unlink()
    torch.save(make_ours("gemma2").state_dict(), ckpt / "pytorch_model.bin")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", REMOTE_PICKLE_LOAD, str(ckpt)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("UnsafeCheckpointError | refusing to load pickle weights"), last
    assert "arbitrary code" in last


# --------------------------------------------------------------------------------------------
# Mismatches name the tensor and both shapes


def test_config_mismatch_names_every_tensor_with_both_shapes(tmp_path):
    make_ours("gemma2").save_pretrained(tmp_path)
    with pytest.raises(CheckpointMismatchError) as err:
        GemmaHFForCausalLM.from_pretrained(tmp_path, config=tiny_config("gemma2", num_key_value_heads=1))
    message = str(err.value)
    for layer in range(4):
        for proj in ("k_proj", "v_proj"):
            assert (
                f"model.layers.{layer}.self_attn.{proj}.weight: checkpoint shape (32, 64), model shape (16, 64)"
                "  [rows = num_key_value_heads * head_dim, columns = hidden_size]"
            ) in message
    assert "q_proj" not in message


def test_missing_and_unexpected_tensors_are_errors_unless_not_strict(tmp_path):
    ours = make_ours("gemma3")
    ours.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    weights["model.layers.0.self_attn.rogue.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as err:
        GemmaHFForCausalLM.from_pretrained(tmp_path)
    message = str(err.value)
    assert "model.layers.1.mlp.down_proj.weight: missing from the checkpoint (it would be randomly initialised)" in message
    assert "model.layers.0.self_attn.rogue.weight: in the checkpoint but not in the model" in message
    assert "strict=False" in message
    model, info = GemmaHFForCausalLM.from_pretrained(tmp_path, strict=False, output_loading_info=True)
    assert info["missing_keys"] == {"model.layers.1.mlp.down_proj.weight"}


def test_new_and_dropped_heads_are_not_mismatches(tmp_path):
    make_ours("gemma2", tie_word_embeddings=False).save_pretrained(tmp_path / "lm")
    clf, info = GemmaHFForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=1, output_loading_info=True)
    assert "score.weight" in info["missing_keys"] and "lm_head.weight" in info["unexpected_keys"]
    torch.manual_seed(0)
    GemmaHFForSequenceClassification(tiny_config("gemma2", num_labels=1)).save_pretrained(tmp_path / "rm")
    lm, info = GemmaHFForCausalLM.from_pretrained(tmp_path / "rm", output_loading_info=True)
    assert info["unexpected_keys"] == {"score.weight"}


def test_ignore_mismatched_sizes_is_the_callers_explicit_choice(tmp_path):
    make_ours("gemma2").save_pretrained(tmp_path)
    model = GemmaHFForCausalLM.from_pretrained(tmp_path, vocab_size=300, ignore_mismatched_sizes=True)
    assert model.model.embed_tokens.weight.shape == (300, 64)


def test_check_loading_info_message_is_exact():
    info = {
        "missing_keys": {"score.weight"},
        "unexpected_keys": set(),
        "mismatched_keys": {("model.embed_tokens.weight", torch.Size([256128, 2304]), torch.Size([256000, 2304]))},
    }
    with pytest.raises(CheckpointMismatchError) as err:
        check_loading_info(info, where="ckpt", model_class="GemmaHFForCausalLM")
    lines = str(err.value).splitlines()
    assert lines[0] == "checkpoint ckpt does not fit GemmaHFForCausalLM built from its config:"
    assert lines[1] == (
        "  - model.embed_tokens.weight: checkpoint shape (256128, 2304), model shape (256000, 2304)"
        "  [rows = vocab_size, columns = hidden_size]"
    )
    assert "128 rows hold no token" in lines[2] and "resize_vocab(model, 256000)" in lines[2]
    check_loading_info({"missing_keys": {"score.weight"}}, where="ckpt", model_class="X")  # a new head: fine
