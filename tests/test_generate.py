"""`gemma-hf generate --config R.yaml`: a teacher's answers to a dataset's prompts as SFT data.

One uninterrupted tiny run (the shared tiny teacher, 6 prompts in shards of 2, 4 new tokens) is
inspected many times: its format and provenance, a run killed at a shard's fault point (a real
process) and resumed gives the same bytes, an SFT recipe reads it. The filters are checked on
records written for the purpose; the refusals at validation write nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from gemma_hf.assets import gemma3_tokenizer_tiny, gemma_tokenizer_tiny, llamafactory_data
from tests.assets import require
from tests.clirun import cli, run_cli
from tests.faults import REPO, env
from tests.tiny import shared_teacher

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["Name a colour.", "Say hello.", "Count to three.", "What is rain?", "Name a fruit.", "Say hello."]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    require(gemma3_tokenizer_tiny)
    base = tmp_path_factory.mktemp("generate")
    data = base / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    path = base / "generate.yaml"
    path.write_text(yaml.safe_dump({
        "model_name_or_path": str(shared_teacher()), "dtype": "float32", "attn_implementation": "eager",
        "datasets": [{"path": str(data)}], "temperature": 0.8, "top_k": 50, "max_new_tokens": 4, "num_answers": 1,
        "shard_size": 2, "seed": 3, "per_device_eval_batch_size": 2, "output_dir": str(base / "unused"),
    }), encoding="utf-8")
    return path


def generate(recipe: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--config", str(recipe), "--output_dir", str(out), *extra]


@pytest.fixture(scope="module")
def finished(recipe, tmp_path_factory) -> Path:
    """The uninterrupted run (in this process)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli(generate(recipe, out)) == 0
    return out


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_output_format_and_provenance(finished):
    from gemma_hf.distillation.fingerprints import teacher_fingerprint
    from gemma_hf.io import sha256_file
    from gemma_hf.recipes.generate import dataset_file, shard_seed

    assert sorted(p.name for p in finished.iterdir()) == ["README.md", "checkpoints", "conversations.jsonl",
                                                          "generation.json", "recipe.yaml", "run.json"]
    assert dataset_file(finished) == finished / "conversations.jsonl"
    rows = records(finished / "conversations.jsonl")
    manifest = json.loads((finished / "generation.json").read_text())
    assert manifest["counts"]["prompts"] == 6 and manifest["counts"]["answers"] == 6
    assert manifest["counts"]["kept"] == len(rows) == 6 - sum(manifest["counts"]["removed"].values())
    fingerprint = teacher_fingerprint(shared_teacher())
    assert manifest["teacher"] == {"model": "local:gemma_hf-tests-teacher-v2", "fingerprint": fingerprint}
    sources = set()
    for row in rows:
        user, answer = row["messages"]
        assert user == {"role": "user", "content": PROMPTS[row["provenance"]["source"]["index"]]}
        assert answer["role"] == "assistant" and answer["content"]
        p = row["provenance"]
        assert p["teacher"] == "local:gemma_hf-tests-teacher-v2" and p["teacher_fingerprint"] == fingerprint
        assert p["settings"] == {"temperature": 0.8, "top_p": 1.0, "top_k": 50, "max_new_tokens": 4,
                                 "num_answers": 1, "family": "gemma3"}
        assert p["seed"] == 3 and p["shard"] in (0, 1, 2) and p["stop"] in ("end_of_turn", "eos", "length")
        assert 1 <= p["answer_tokens"] <= 4
        sources.add(p["source"]["index"])
        assert not os.path.isabs(p["source"]["dataset"])
    assert sources == set(range(6))
    # Every shard is whole, carried into the finished run, and named by its sha256.
    assert [s["file"] for s in manifest["shards"]] == [f"checkpoints/shards/shard-0000{k}.jsonl" for k in range(3)]
    for shard in manifest["shards"]:
        assert sha256_file(finished / shard["file"]) == shard["sha256"] and shard["prompts"] == 2
    assert shard_seed(3, 0) != shard_seed(3, 1) != shard_seed(4, 1)
    run = json.loads((finished / "run.json").read_text())
    assert run["method"] == "generate" and run["dataset"] == "conversations.jsonl"
    assert run["teacher"] == "local:gemma_hf-tests-teacher-v2" and run["counts"] == manifest["counts"]
    card = (finished / "README.md").read_text()
    assert "Teacher-written SFT data" in card and "| `duplicate` | off | 0 |" in card
    assert str(finished) not in card and str(shared_teacher()) not in card


def test_a_run_killed_at_a_shard_and_resumed_writes_the_same_bytes(recipe, finished, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "gemma_hf.cli", *generate(recipe, out)]
    killed = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=env(GEMMA_HF_KILL_AT="generate:shard-1"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints" / "shards").iterdir()) == ["shard-00000.jsonl",
                                                                                 "shard-00001.jsonl"]
    assert not (out / "run.json").exists()
    code, stdout, err = run_cli(generate(recipe, out, "--resume"), capsys)
    assert code == 0, err[-2000:]
    assert "shard 3/3" in stdout and "shard 1/3" not in stdout  # the two whole shards were kept
    assert (out / "conversations.jsonl").read_bytes() == (finished / "conversations.jsonl").read_bytes()
    for k in range(3):
        name = f"checkpoints/shards/shard-0000{k}.jsonl"
        assert (out / name).read_bytes() == (finished / name).read_bytes()
    manifest = json.loads((out / "generation.json").read_text())
    assert manifest["throughput"]["shards_resumed"] == 2
    assert not [p for p in out.rglob(".*")] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_filters_count_what_they_remove(tmp_path):
    from gemma_hf.recipes.generate import FILTERS, METHOD, GenerateArguments

    def row(answer: str, tokens: int, stop: str = "end_of_turn", prompt: str = "Tell me about the sea today."):
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                "provenance": {"stop": stop, "answer_tokens": tokens}}

    rows = [row("The sea is calm.", 5),                                  # kept
            row("   ", 1),                                               # unusable: empty
            row("Hi <start_of_turn>user", 4),                            # unusable: a control token as text
            row("The sea is wide and", 6, stop="length"),               # ended_turn
            row("Sea.", 1),                                              # min_tokens
            row("The sea " * 10, 20),                                    # max_tokens
            row("Tell me about the sea today? Gladly.", 8),                   # prompt_echo
            row("The  sea is\ncalm.", 5),                                # duplicate of the first, whitespace aside
            row("The sea is calm.", 5, prompt="Tell me about the lake.")]  # kept: another prompt
    shard = tmp_path / "shard.jsonl"
    shard.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    args = GenerateArguments(require_ended_turn=True, min_answer_tokens=2, max_answer_tokens=12,
                             drop_prompt_echo=True, deduplicate=True)
    run = SimpleNamespace(recipe=SimpleNamespace(method_args=args), family="gemma3")
    kept, removed = METHOD.filter(run, None, [shard])
    assert [r["messages"][-1]["content"] for r in kept] == ["The sea is calm.", "The sea is calm."]
    assert removed == {"unusable": 2, "ended_turn": 1, "min_tokens": 1, "max_tokens": 1, "prompt_echo": 1,
                       "duplicate": 1}
    assert tuple(removed) == FILTERS
    off = GenerateArguments()  # only the always-on filter
    kept, removed = METHOD.filter(SimpleNamespace(recipe=SimpleNamespace(method_args=off), family="gemma3"), None,
                                  [shard])
    assert len(kept) == 7 and removed["unusable"] == 2 and sum(removed.values()) == 2


def test_an_sft_recipe_reads_the_generated_dataset(finished, tmp_path, capsys, monkeypatch):
    from gemma_hf.references import PENDING_STAGES, PendingStage

    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    sft = yaml.safe_load((REPO / "recipes" / "tiny" / "sft.yaml").read_text())
    sft.update(output_dir=str(tmp_path / "out"), test_split_size=None, eval_strategy="no")
    for path in (str(finished), str(finished / "conversations.jsonl")):
        (tmp_path / "sft.yaml").write_text(yaml.safe_dump({**sft, "datasets": [{"path": path}]}))
        code, out, err = run_cli(["validate", str(tmp_path / "sft.yaml")], capsys)
        assert code == 0 and f"({len(records(finished / 'conversations.jsonl'))} records checked)" in out, err
    # A pipeline's {from: STAGE} before the stage has run: accepted unread from a stage that publishes data.
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({**sft, "datasets": [{"path": "stage:teacher"}]}))
    monkeypatch.setitem(PENDING_STAGES, "teacher", PendingStage("teacher", head=None, publishes="data"))
    code, out, err = run_cli(["validate", str(tmp_path / "sft.yaml")], capsys)
    assert code == 0 and "{from: teacher} is read when the stage has run" in out, err
    monkeypatch.setitem(PENDING_STAGES, "teacher", PendingStage("teacher"))
    code, out, err = run_cli(["validate", str(tmp_path / "sft.yaml")], capsys)
    assert code == 2 and "- datasets[0].path" in err and "publishes a model, not a dataset" in err
    # A run directory that holds no dataset is named as such.
    run_json = json.loads((finished / "run.json").read_text())
    model_run = tmp_path / "model-run"
    model_run.mkdir()
    (model_run / "run.json").write_text(json.dumps({**run_json, "method": "sft", "dataset": None}))
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({**sft, "datasets": [{"path": str(model_run)}]}))
    code, out, err = run_cli(["validate", str(tmp_path / "sft.yaml")], capsys)
    assert code == 2 and "holds no dataset" in err


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rm") / "reward"
    shutil.copytree(shared_teacher(), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["GemmaHFForSequenceClassification"]}))
    return path


@pytest.mark.parametrize("key,value,message", [
    ("temperature", -1.0, "out of range"),
    ("top_p", 0.0, "out of range"),
    ("top_k", -1, "out of range"),
    ("max_new_tokens", 10**9, "max_position_embeddings"),
    ("shard_size", 0, "out of range"),
    ("min_answer_tokens", 9, "above max_answer_tokens"),
    ("num_answers", 2, "would all be the same answer"),
    ("model_name_or_path", "REWARD", "a teacher must be a causal LM"),
])
def test_bad_settings_are_refused_naming_the_key(recipe, reward_model, tmp_path, capsys, key, value, message):
    values = yaml.safe_load(recipe.read_text())
    values.update(output_dir=str(tmp_path / "out"), max_answer_tokens=3)
    if key == "num_answers":
        values.update(temperature=0.0)
        values.pop("top_k")
    values[key] = str(reward_model) if value == "REWARD" else value
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump(values))
    for argv in (["validate", str(path), "--method", "generate"], ["generate", "--config", str(path)]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and f"- {key}" in err and message in err, err[-2000:]
    assert not (tmp_path / "out").exists()


def test_the_two_forms_of_the_command_keep_apart(recipe, tmp_path, capsys):
    code, _, err = run_cli(["generate", "--config", str(recipe), "--prompt", "Hi", "--output_dir", str(tmp_path / "o")],
                           capsys)
    assert code == 2 and "--prompt belongs to the one-shot form" in err
    code, _, err = run_cli(["generate", str(shared_teacher()), "--prompt", "Hi", "--output_dir", "x"], capsys)
    assert code == 2 and "unrecognized arguments: --output_dir x" in err
    code, _, err = run_cli(["generate", str(shared_teacher())], capsys)
    assert code == 2 and "needs --prompt" in err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# In a pipeline: {from: STAGE} of a generate stage is a dataset, read once the stage has run
# --------------------------------------------------------------------------------------------


def _pipeline(tmp_path: Path, recipe: Path, sft_overrides: dict) -> Path:
    generate_values = yaml.safe_load(recipe.read_text())
    generate_values.pop("output_dir")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "unused"), "stages": [
        {"name": "teacher-data", "method": "generate", "recipe": generate_values},
        {"name": "sft", "method": "sft", "recipe": str(REPO / "recipes" / "tiny" / "sft.yaml"),
         "overrides": {"test_split_size": None, "max_steps": 2, "save_steps": 2, "eval_strategy": "no",
                       "sample_prompts": None, "per_device_train_batch_size": 2, **sft_overrides}},
    ]}), encoding="utf-8")
    return path


def test_a_pipeline_stage_trains_on_a_generate_stage(recipe, tmp_path, capsys):
    require(gemma_tokenizer_tiny)
    path = _pipeline(tmp_path, recipe, {"datasets": [{"path": {"from": "teacher-data"}}]})
    code, out, err = run_cli(["validate", path], capsys)
    assert code == 0, err
    code, out, err = run_cli(["pipeline", "--config", path, "--output_dir", tmp_path / "run"], capsys)
    assert code == 0, err[-3000:]
    sft = json.loads((tmp_path / "run" / "stages" / "sft" / "run.json").read_text())
    assert sft["datasets"][0]["path"].endswith("teacher-data") and sft["datasets"][0]["num_examples"] >= 1


@pytest.mark.parametrize("overrides,message", [
    ({"model_name_or_path": {"from": "teacher-data"}, "preset": None, "preset_overrides": None},
     "publishes a dataset (method generate), not a model"),
    ({"datasets": [{"path": {"from": "nowhere"}}]}, "names no earlier stage"),
])
def test_a_generate_stage_is_read_as_data_only(recipe, tmp_path, capsys, overrides, message):
    require(gemma_tokenizer_tiny)
    path = _pipeline(tmp_path, recipe, overrides)
    code, _, err = run_cli(["validate", path], capsys)
    assert code == 2 and message in err, err[-3000:]


def test_a_later_stage_that_needs_the_teachers_tokenizer_checks_it(recipe, tmp_path, capsys):
    # Generated text trains a student of any tokenizer; on-policy distillation from that teacher compares
    # distributions token by token: the distill stage refuses a teacher whose tokenizer differs from its
    # student's (here the SFT stage's, still to run), before the first stage starts.
    require(gemma_tokenizer_tiny)
    path = _pipeline(tmp_path, recipe, {"datasets": [{"path": {"from": "teacher-data"}}]})
    data = yaml.safe_load(path.read_text())
    data["stages"].append({"name": "distill", "method": "distill", "recipe": str(REPO / "recipes/tiny/distill.yaml"),
                           "overrides": {"model_name_or_path": {"from": "sft"}, "student_init": None,
                                         "teacher_name_or_path": str(shared_teacher()), "attn_implementation": "eager",
                                         "datasets": [{"path": {"from": "teacher-data"}}], "test_split_size": None,
                                         "eval_strategy": "no"}})
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    code, _, err = run_cli(["validate", path], capsys)
    assert code == 2 and "stages[2] (distill).teacher_name_or_path" in err and "differs from the student's" in err, \
        err[-3000:]
