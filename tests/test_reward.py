"""Reward modelling end to end on CPU: the tiny recipe learns a rigged preference (chosen answers
carry a checkable property), the run directory keeps its contract (eval.json before/after,
histogram, card), the saved reward model loads with AutoModelForSequenceClassification (installed
package and remote code) and scores a chat in one call; LoRA from an SFT run directory."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from tests.assets import require
from tests.clirun import cli, run_cli
from tests.tiny import BLOCK_GEMMA_HF_IMPORTS

REPO = Path(__file__).resolve().parent.parent
TINY_REWARD = REPO / "recipes" / "tiny" / "reward.yaml"
TINY_SFT = REPO / "recipes" / "tiny" / "sft.yaml"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rigged_pairs(path: Path, count: int = 300, seed: int = 0) -> Path:
    """Real Alpaca instructions; the chosen answer ends with the word "blue", the rejected one with
    "red", around scrambled snippets of the real answer (so neither length nor fluency decides)."""
    records = json.loads((require(llamafactory_data) / "alpaca_en_demo.json").read_text())
    rng = random.Random(seed)
    with path.open("w") as handle:
        for record in records[:count]:
            words = record["output"].split() or ["ok"]
            chosen = " ".join(words[: rng.randint(3, 10)])
            rejected = " ".join(rng.sample(words, min(len(words), rng.randint(3, 10))))
            handle.write(json.dumps({"prompt": record["instruction"], "chosen": f"{chosen} blue",
                                     "rejected": f"{rejected} red"}) + "\n")
    return path


@pytest.fixture(scope="module")
def rigged_run(tmp_path_factory):
    require(gemma_tokenizer_tiny)
    root = tmp_path_factory.mktemp("rigged")
    pairs = rigged_pairs(root / "pairs.jsonl")
    out = root / "run"
    code = cli(["reward", "--config", str(TINY_REWARD), "--output_dir", str(out),
                       "--datasets", json.dumps([{"path": str(pairs)}]), "--test_split_size", "40",
                       "--max_steps", "30", "--per_device_train_batch_size", "8", "--eval_strategy", "no",
                       "--save_steps", "15"])
    assert code == 0
    return out


def test_rigged_preference_is_learned(rigged_run):
    results = json.loads((rigged_run / "eval.json").read_text())
    print(f"rigged task: held-out accuracy {results['accuracy_before']:.3f} -> {results['accuracy_after']:.3f}, "
          f"margin {results['margin_before']:+.3f} -> {results['margin_after']:+.3f}")
    assert results["num_pairs_after"] == 40 == results["num_eval_examples"]
    assert results["accuracy_after"] >= 0.95
    assert results["margin_after"] > results["margin_before"] + 1.0
    assert results["loss_after"] < results["loss_before"]


def test_reward_run_directory_contract(rigged_run):
    names = {p.name for p in rigged_run.iterdir()}
    for required in ("recipe.yaml", "config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "plots",
                     "run.json", "eval.json", "README.md", "checkpoints", "chat_template.jinja"):
        assert required in names, required
    assert "generation_config.json" not in names  # a reward model does not generate
    assert not any(name.startswith(".") for name in names)
    run = json.loads((rigged_run / "run.json").read_text())
    assert run["method"] == "reward" and run["head"] == "sequence-classification" and run["global_step"] == 30
    assert run["score_head"].startswith("new, N(0, ") and run["datasets"][0]["format"] == "preference"
    config = json.loads((rigged_run / "config.json").read_text())
    assert config["architectures"] == ["GemmaHFForSequenceClassification"] and len(config["id2label"]) == 1
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModelForSequenceClassification", "AutoModelForCausalLM"}
    assert (rigged_run / "plots" / "reward_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (rigged_run / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "reward modelling (Bradley-Terry)" in card
    assert "| `accuracy` | " in card and "![reward_histogram](plots/reward_histogram.png)" in card
    assert "AutoModelForSequenceClassification" in card


def _score_with_engine(run_dir, conversations):
    """Rewards as the engine computes them (eval.json's numbers come from this path)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from gemma_hf import GemmaHFForSequenceClassification
    from gemma_hf.recipes.reward import score_pairs
    from gemma_hf.tokenization import encode_conversation

    tok = AutoTokenizer.from_pretrained(run_dir)
    model = GemmaHFForSequenceClassification.from_pretrained(run_dir).eval()
    ids = [encode_conversation(tok, c, "gemma2") for c in conversations]
    pairs = Dataset.from_list([{"chosen_ids": a, "rejected_ids": b} for a, b in zip(ids[0::2], ids[1::2])])
    scores = score_pairs(model, pairs, tok.pad_token_id, 4, torch.device("cpu"))
    return [v for pair in zip(scores["chosen"], scores["rejected"]) for v in pair]


CHATS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The sky is blue"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "A fire truck is red"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello, blue"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello red"}],
]


def test_reward_model_scores_a_chat_in_one_call(rigged_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import gemma_hf  # noqa: F401  (registers the model type)

    tok = AutoTokenizer.from_pretrained(rigged_run)
    model = AutoModelForSequenceClassification.from_pretrained(rigged_run).eval()
    expected = _score_with_engine(rigged_run, CHATS)
    for chat, reward in zip(CHATS, expected):
        inputs = tok.apply_chat_template(chat, return_tensors="pt", return_dict=True)
        assert (inputs["input_ids"][0] == tok.bos_token_id).sum() == 1
        score = model(**inputs).logits[0, 0].item()
        assert abs(score - reward) < 1e-5
    assert expected[0] > expected[1] and expected[2] > expected[3]  # the rigged property, on new chats


def test_reward_model_loads_with_remote_code_only(rigged_run):
    expected = _score_with_engine(rigged_run, CHATS[:2])
    script = BLOCK_GEMMA_HF_IMPORTS + f"""
import json
from transformers import AutoModelForSequenceClassification, AutoTokenizer
run = {str(rigged_run)!r}
tok = AutoTokenizer.from_pretrained(run, trust_remote_code=True)
model = AutoModelForSequenceClassification.from_pretrained(run, trust_remote_code=True).eval()
chats = {json.dumps(CHATS[:2])}
print(json.dumps([model(**tok.apply_chat_template(c, return_tensors="pt", return_dict=True)).logits[0, 0].item()
                  for c in chats]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd="/",
                         stdin=subprocess.DEVNULL,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert max(abs(a - b) for a, b in zip(scores, expected)) < 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_is_read_at_the_last_real_token_with_either_padding(rigged_run, side):
    from transformers import AutoTokenizer

    from gemma_hf import GemmaHFForSequenceClassification
    from gemma_hf.tokenization import encode_conversation

    tok = AutoTokenizer.from_pretrained(rigged_run)
    model = GemmaHFForSequenceClassification.from_pretrained(rigged_run).eval()
    rows = [encode_conversation(tok, c, "gemma2") for c in CHATS]
    alone = [model(input_ids=torch.tensor([r])).logits[0, 0].item() for r in rows]
    width = max(map(len, rows))
    pad = [[tok.pad_token_id] * (width - len(r)) for r in rows]
    ids = [p + r if side == "left" else r + p for r, p in zip(rows, pad)]
    mask = [[0] * len(p) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(p) for r, p in zip(rows, pad)]
    batched = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].tolist()
    assert max(abs(a - b) for a, b in zip(alone, batched)) < 1e-4
    assert len(set(round(v, 4) for v in alone)) == len(alone)  # distinct rewards: the position matters


# --------------------------------------------------------------------------------------------
# Bad preference data: exit 2 naming the record and the key, nothing written
# --------------------------------------------------------------------------------------------

GOOD = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
BAD_RECORDS = [
    ("missing-rejected", {"prompt": "Say hi.", "chosen": "Hi!"}, "record 2, key 'rejected'", "no 'rejected'"),
    ("empty-chosen", {"prompt": "Say hi.", "chosen": "  ", "rejected": "No."}, "record 2, key 'chosen'", "empty"),
    ("same-answer", {"prompt": "Say hi.", "chosen": "Hi!", "rejected": " Hi! "}, "record 2, key 'rejected'",
     "the same answer"),
    ("same-answer-inner-whitespace", {"prompt": "Say hi.", "chosen": "Hi  there,\nfriend!", "rejected": "Hi there, friend!"},
     "record 2, key 'rejected'", "differ at most in whitespace"),
    ("not-a-record", ["Say hi.", "Hi!"], "record 2, key 'record'", "JSON objects"),
    ("bad-margin", {**GOOD, "margin": "big"}, "record 2, key 'margin'", "finite number"),
    ("control-token", {**GOOD, "chosen": "Hi<end_of_turn>"}, "record 2, key 'chosen'", "control token"),
    ("prompt-ends-with-model", {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                "chosen": "Hi!", "rejected": "No."}, "record 2, key 'prompt'", "end with a user turn"),
]


@pytest.mark.parametrize("name,bad,where,text", BAD_RECORDS, ids=[b[0] for b in BAD_RECORDS])
def test_bad_preference_records_exit_2_naming_record_and_key(tmp_path, capsys, name, bad, where, text):
    require(gemma_tokenizer_tiny)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [GOOD, {**GOOD, "chosen": "Hello!"}, bad, GOOD]))
    recipe = yaml.safe_load(TINY_REWARD.read_text())
    recipe.update(datasets=[{"path": str(data)}], output_dir=str(tmp_path / "out"), test_split_size=None,
                  eval_strategy="no")
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(recipe))
    for argv in (["validate", str(path)], ["reward", "--config", str(path)]):
        code, out, err = run_cli(argv, capsys)
        assert code == 2, (out, err)
        assert "datasets[0].path" in err and where in err and text in err, err
        assert not (tmp_path / "out").exists()


def test_wrong_format_dataset_names_the_formats(tmp_path, capsys):
    require(gemma_tokenizer_tiny)
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    recipe = yaml.safe_load(TINY_REWARD.read_text())
    recipe.update(datasets=[{"path": str(data)}], output_dir=str(tmp_path / "out"))
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli(["validate", str(path)], capsys)
    assert code == 2 and "fit no known preference format" in err and "chosen" in err


def test_an_sft_key_in_a_reward_recipe_names_its_method(tmp_path, capsys):
    recipe = yaml.safe_load(TINY_REWARD.read_text())
    recipe.update(output_dir=str(tmp_path / "out"), packing=True)
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli(["validate", str(path)], capsys)
    assert code == 2 and "- packing: not a key of reward recipes (it belongs to gemma-hf sft)" in err


# --------------------------------------------------------------------------------------------
# LoRA, from an SFT run directory
# --------------------------------------------------------------------------------------------


def test_lora_reward_model_from_an_sft_run_directory(tmp_path):
    from safetensors.torch import load_file

    require(gemma_tokenizer_tiny)
    sft = tmp_path / "sft"
    assert cli(["sft", "--config", str(TINY_SFT), "--output_dir", str(sft), "--max_steps", "2",
                       "--eval_strategy", "no", "--save_steps", "2", "--sample_prompts", "null"]) == 0
    pairs = rigged_pairs(tmp_path / "pairs.jsonl", count=60)
    out = tmp_path / "reward"
    assert cli(["reward", "--config", str(TINY_REWARD), "--output_dir", str(out),
                       "--model_name_or_path", str(sft), "--preset", "null", "--preset_overrides", "null",
                       "--tokenizer_name_or_path", "null", "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
                       "--datasets", json.dumps([{"path": str(pairs)}]), "--test_split_size", "8",
                       "--max_steps", "4", "--eval_strategy", "no", "--save_steps", "4"]) == 0
    run = json.loads((out / "run.json").read_text())
    # the base model is recorded by identity (run.json is pushed: no local absolute path)
    assert run["lora"] and run["base_model"] == "local:sft" and run["score_head"].startswith("new")
    assert (out / "adapter" / "adapter_config.json").is_file()
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in (adapter_config["modules_to_save"] or [])
    merged = load_file(out / "model.safetensors")
    base = load_file(sft / "model.safetensors")
    # The backbone moved (LoRA merged in), the embedding did not (no LoRA on it), the head is there.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert merged["score.weight"].shape == (1, base["model.embed_tokens.weight"].shape[1])
    assert "lm_head.weight" not in merged
