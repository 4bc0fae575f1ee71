"""``train_top_layers``: only the top N decoder layers (and the final norm and head) train; the embeddings
and the layers below keep their weights, in a full fine-tune and with LoRA (adapters on those layers only, on every linear module of them)."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from tests.assets import require
from tests.clirun import run_cli
from tests.test_reward import TINY_REWARD

TINY_SFT = TINY_REWARD.parent / "sft.yaml"


def _recipe(tmp_path, source, **changes):
    recipe = yaml.safe_load(source.read_text())
    recipe.update(output_dir=str(tmp_path / "out"), **changes)
    path = tmp_path / source.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def assets():
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)


def test_a_full_fine_tune_of_the_top_layer_leaves_the_rest_untouched(tmp_path, capsys, assets):
    frozen = _recipe(tmp_path / "a", TINY_SFT, learning_rate=1e-3, train_top_layers=1, max_steps=2, save_steps=2)
    code, _, err = run_cli(["sft", "--config", str(frozen)], capsys)
    assert code == 0, err
    still = _recipe(tmp_path / "b", TINY_SFT, learning_rate=1e-30, max_steps=2, save_steps=2)  # the start, kept
    code, _, err = run_cli(["sft", "--config", str(still)], capsys)
    assert code == 0, err
    trained, start = load_file(tmp_path / "a" / "out" / "model.safetensors"), load_file(tmp_path / "b" / "out" / "model.safetensors")
    # (the run of learning rate 1e-30 moves weights that start at 0, Gemma's norm gains, by ~1e-30)
    changed = {name for name in trained if (trained[name] - start[name]).abs().max() > 1e-20}
    assert changed and all(".layers.1." in name or name.endswith("model.norm.weight") for name in changed), changed
    assert any(".layers.1." in name for name in changed)
    assert not any(".layers.0." in name or "embed_tokens" in name for name in changed)


def test_lora_on_the_top_layer_only(tmp_path, capsys, assets):
    path = _recipe(tmp_path, TINY_REWARD, use_peft=True, lora_r=4, lora_alpha=8, train_top_layers=1, max_steps=2,
                   save_steps=2)
    code, _, err = run_cli(["reward", "--config", str(path)], capsys)
    assert code == 0, err
    adapter = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    lora = [name for name in adapter if "lora_" in name]
    assert lora and all(".layers.1." in name for name in lora), lora
    assert {name.split(".layers.1.")[1].split(".lora_")[0] for name in lora} == {
        f"{block}.{name}" for block, names in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
        for name in (f"{n}_proj" for n in names)}
    assert json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["target_modules"].startswith(
        r".*\.layers\.(1)")


@pytest.mark.parametrize("value,text", [(3, "from 1 to the model's 2"), (0, "from 1 to the model's 2")])
def test_more_layers_than_the_model_has_is_refused(tmp_path, capsys, assets, value, text):
    path = _recipe(tmp_path, TINY_SFT, train_top_layers=value)
    code, _, err = run_cli(["validate", "--method", "sft", str(path)], capsys)
    assert code == 2 and "train_top_layers" in err and text in err, err
