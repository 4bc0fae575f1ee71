"""`lm_eval_tasks` of `gemma-hf eval` through EleutherAI's lm-evaluation-harness (the [eval] extra), end to
end and offline: a task of our own (a YAML file in a temporary include path, its 6 four-way multiple-choice
questions in a local JSON-lines file) on a tiny Gemma 3, run by the eval method in this process. The
accuracy lm-eval reports must equal the one computed here from the model's own log-likelihoods, and land in
eval.json and evaluation.md."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from tests.clirun import cli

TASK = "gemma_hf_tiny_mc"
QUESTIONS = [
    {"question": "Which colour is the sky on a clear day?", "choices": ["blue", "green", "red", "black"], "answer": 0},
    {"question": "How many legs has a cat?", "choices": ["two", "four", "six", "eight"], "answer": 1},
    {"question": "What do bees make?", "choices": ["milk", "silk", "honey", "wool"], "answer": 2},
    {"question": "Which one is a fruit?", "choices": ["carrot", "potato", "onion", "apple"], "answer": 3},
    {"question": "What is frozen water called?", "choices": ["ice", "steam", "sand", "smoke"], "answer": 0},
    {"question": "Which animal barks?", "choices": ["cow", "dog", "fish", "bird"], "answer": 1},
]


def _require_lm_eval():
    if importlib.util.find_spec("lm_eval") is None:
        reason = "lm-evaluation-harness is not installed (pip install 'gemma_hf[eval]'; make install installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " -- CI=true: a missing extra fails instead of skipping", pytrace=False)
        pytest.skip(reason)


def _write_task(root: Path) -> Path:
    """The task directory: lm-eval's YAML task format, data in a local file (no Hub)."""
    tasks = root / "tasks"
    tasks.mkdir()
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tasks / f"{TASK}.yaml").write_text(yaml.safe_dump({
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }))
    return tasks


def _accuracy_here(model_dir: Path) -> float:
    """The task's accuracy from the model's log-likelihoods, computed without lm-eval: each choice scored as
    the sum of log-probabilities of the tokens of " CHOICE" after "Question: ...\\nAnswer:" (context and
    continuation tokenised together, exactly one <bos>), the most likely choice taken."""
    from gemma_hf.sampling import load_chat_model

    model, tok, _ = load_chat_model(model_dir, dtype="float32")
    correct = 0
    for q in QUESTIONS:
        context = f"Question: {q['question']}\nAnswer:"
        context_ids = tok.encode(context)
        assert context_ids[0] == tok.bos_token_id and tok.bos_token_id not in context_ids[1:]
        scores = []
        for choice in q["choices"]:
            whole = tok.encode(context + " " + choice)
            assert whole[:len(context_ids)] == context_ids
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole))))
        correct += max(range(len(scores)), key=scores.__getitem__) == q["answer"]
    return correct / len(QUESTIONS)


def test_a_local_lm_eval_task_runs_end_to_end_and_lands_in_eval_json(tmp_path, monkeypatch):
    _require_lm_eval()
    from tests.faults import tiny_recipe
    from tests.tiny import shared_teacher

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no Hub: the task's data is a local file
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir = shared_teacher()
    recipe = {**tiny_recipe("eval"), "bootstrap_resamples": 100, "max_new_tokens": 4, "heldout_loss": False,
              "lm_eval_tasks": [TASK], "lm_eval_include_path": str(_write_task(tmp_path))}
    for key in ("baseline_name_or_path", "judge_name_or_path"):
        recipe.pop(key, None)
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "eval"
    assert cli(["eval", "--config", str(config), "--output_dir", str(out)]) == 0

    results = json.loads((out / "eval.json").read_text())
    accuracy = results[f"lm_eval/{TASK}/acc,none"]
    assert accuracy == pytest.approx(_accuracy_here(model_dir))
    assert isinstance(results[f"lm_eval/{TASK}/acc_stderr,none"], float)
    harness = results["lm_eval"]
    assert harness["results"][TASK]["acc,none"] == accuracy
    assert harness["settings"]["tasks"] == [TASK] and harness["settings"]["lm_eval_version"]
    assert not str(harness["settings"]["model"]).startswith("/")  # recorded by identity: eval.json may be pushed
    table = (out / "evaluation.md").read_text()
    assert f"| `{TASK}` | {len(QUESTIONS)} | acc | {accuracy:.4f} |" in table


@pytest.mark.parametrize("change, key, message", [
    ({"lm_eval_include_path": "."}, "lm_eval_include_path", "set without lm_eval_tasks"),
    ({"lm_eval_tasks": [TASK], "lm_eval_include_path": "no/such/dir"}, "lm_eval_include_path", "is not a directory"),
    ({"lm_eval_tasks": [TASK], "lm_eval_limit": 0}, "lm_eval_limit", "a fraction in (0, 1) or a whole count"),
    ({"lm_eval_tasks": [TASK], "lm_eval_limit": 2.5}, "lm_eval_limit", "a fraction in (0, 1) or a whole count"),
    ({"lm_eval_tasks": [TASK], "lm_eval_num_fewshot": -1}, "lm_eval_num_fewshot", "0 or more"),
], ids=["include-without-tasks", "include-not-a-dir", "limit-0", "limit-2.5", "fewshot-negative"])
def test_bad_lm_eval_keys_are_refused_before_anything_loads(tmp_path, capsys, change, key, message):
    from tests.faults import tiny_recipe

    recipe = {**tiny_recipe("eval"), "output_dir": str(tmp_path / "out"), **change}
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump(recipe))
    assert cli(["validate", str(config), "--method", "eval"]) == 2
    err = capsys.readouterr().err
    assert f"- {key}" in err and message in err, err
