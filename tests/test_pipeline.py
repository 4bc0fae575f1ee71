"""The pipeline on the tiny recipes: SFT -> reward -> RLHF -> evaluation in one directory.

Killed mid-stage and re-run: the finished stages are skipped, the killed one resumes, the result is
complete. Editing one stage's recipe re-runs exactly that stage and those after it; losing a stage's
output re-runs it and the stages reading from it. A typo in the last stage, a stage output_dir, a
model read from a stage that publishes none fail before the first stage starts; a stage that fails
at run time is named with its log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from tests.assets import require
from tests.clirun import run_captured, run_cli

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny" / "post-training.yaml"


def pipeline_file(tmp_path: Path, edit=None) -> Path:
    """The tiny pipeline, its stage recipes resolved from recipes/tiny (copied next to it)."""
    data = yaml.safe_load(TINY.read_text())
    for stage in data["stages"]:
        if isinstance(stage.get("recipe"), str):
            stage["recipe"] = str(REPO / "recipes" / "tiny" / stage["recipe"])
    if edit:
        edit(data)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(path: Path, out: Path, **env) -> subprocess.CompletedProcess:
    """The pipeline in a real process: for a kill (GEMMA_HF_KILL_AT)."""
    return subprocess.run([sys.executable, "-m", "gemma_hf.cli", "pipeline", "--config", str(path), "--output_dir",
                           str(out)], capture_output=True, text=True, timeout=1800, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def run_here(path: Path, out: Path) -> subprocess.CompletedProcess:
    """The pipeline in this process (tests.clirun), output captured: everything but the kill."""
    return run_captured(["pipeline", "--config", path, "--output_dir", out])


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["stages"]


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory):
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    root = tmp_path_factory.mktemp("pipeline")
    path, out = pipeline_file(root), root / "run"
    killed = run(path, out, GEMMA_HF_KILL_AT="reward:publish:files")
    rerun = run_here(path, out)
    return path, out, killed, rerun


def test_a_pipeline_killed_mid_stage_completes_on_rerun(killed_then_rerun):
    path, out, killed, rerun = killed_then_rerun
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    stages = manifest(out)
    assert list(stages) == ["sft", "reward", "rlhf", "eval"]
    assert all(s["status"] == "finished" for s in stages.values())
    assert stages["sft"]["attempts"] == 1  # finished before the kill: skipped, not redone
    assert stages["reward"]["attempts"] == 2  # killed, then resumed
    assert "stage sft (sft): finished earlier, skipped" in rerun.stdout
    reward = json.loads((out / "stages" / "reward" / "run.json").read_text())
    assert reward["resumed_from"] == "checkpoint-4" and reward["global_step"] == 4
    # The pipeline's model is the final stage's; its record and card cover every stage.
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["method"] == "pipeline" and [s["name"] for s in run_info["stages"]] == list(stages)
    final = (out / "model.safetensors").read_bytes()
    assert final == (out / "stages" / "rlhf" / "model.safetensors").read_bytes()
    results = json.loads((out / "eval.json").read_text())
    # (the judge's win rate is None when it did not discriminate: the tiny SFT model judges itself)
    assert "eval/judge_win_rate" in results and "eval/judge_discriminated" not in results  # numbers only
    assert "eval/reward_win_rate" in results and "reward/accuracy_after" in results
    card = (out / "README.md").read_text()
    assert "a multi-stage pipeline" in card and "reward_win_rate" in card
    assert (out / "logs" / "reward.log").read_text()
    assert not any(p.name.startswith(".") for p in out.iterdir())


def test_editing_one_stage_reruns_it_and_those_after(killed_then_rerun, tmp_path):
    path, out, _, _ = killed_then_rerun
    before = manifest(out)
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    nothing = run_here(path, copy)
    assert nothing.returncode == 0 and "nothing to do" in nothing.stdout

    def edit(data):
        data["stages"][2]["overrides"]["learning_rate"] = 1.0e-3  # the rlhf stage

    edited = pipeline_file(tmp_path, edit)
    again = run_here(edited, copy)
    assert again.returncode == 0, again.stderr[-3000:]
    after = manifest(copy)
    assert after["sft"]["hash"] == before["sft"]["hash"] and after["reward"]["hash"] == before["reward"]["hash"]
    assert after["rlhf"]["hash"] != before["rlhf"]["hash"]
    assert after["eval"]["hash"] != before["eval"]["hash"]  # it reads the rlhf stage
    assert "stage sft (sft): finished earlier, skipped" in again.stdout
    assert "stage reward (reward): finished earlier, skipped" in again.stdout
    assert "== stage rlhf (rlhf) ->" in again.stdout and "== stage eval (eval) ->" in again.stdout
    assert json.loads((copy / "run.json").read_text())["method"] == "pipeline"


def test_a_typo_in_the_last_stage_fails_before_the_first_starts(tmp_path, capsys):
    require(gemma_tokenizer_tiny)

    def edit(data):
        data["stages"][3]["overrides"]["max_new_tokenz"] = 8

    started = time.time()
    code, out, err = run_cli(["pipeline", "--config", str(pipeline_file(tmp_path, edit)), "--output_dir",
                              str(tmp_path / "run")], capsys)
    assert code == 2 and "stages[3] (eval).max_new_tokenz" in err and "Did you mean 'max_new_tokens'" in err
    assert not (tmp_path / "run").exists() and time.time() - started < 120


# (deleted stage, how, the stages that run again): issue 22 case 6a. A stage whose output is gone runs
# again, and so does every stage reading from it (directly or through another); the others are kept.
LOST = [
    ("rlhf", "directory deleted", ["rlhf", "eval"]),  # the evaluation reads the rlhf stage; sft and reward are kept
    ("eval", "run.json deleted", ["eval"]),  # nothing reads the evaluation
]


@pytest.mark.parametrize("stage,how,redone", LOST, ids=[f"{s}-{h.split()[0]}" for s, h, _ in LOST])
def test_a_lost_stage_output_runs_again_with_the_stages_reading_it(killed_then_rerun, tmp_path, stage, how, redone):
    path, out, _, _ = killed_then_rerun
    before = manifest(out)
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    lost = copy / "stages" / stage
    if how == "directory deleted":
        shutil.rmtree(lost)
    else:
        (lost / "run.json").unlink()
    again = run_here(path, copy)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" not in again.stdout
    after = manifest(copy)
    assert {n: e["hash"] for n, e in after.items()} == {n: e["hash"] for n, e in before.items()}
    assert all(e["status"] == "finished" for e in after.values())
    for name in before:
        if name in redone:
            assert f"== stage {name} ({before[name]['method']}) ->" in again.stdout, name
            assert after[name]["attempts"] == before[name]["attempts"] + 1
        else:
            assert f"stage {name} ({before[name]['method']}): finished earlier, skipped" in again.stdout, name
            assert after[name] == before[name]
    why = "is missing" if how == "directory deleted" else "holds no finished run"
    assert f"stage {stage} ({before[stage]['method']}): its output {lost} {why}: it runs again" in again.stdout
    # The published model was withdrawn and is published again: the final stage's, with a whole card.
    assert json.loads((copy / "run.json").read_text())["method"] == "pipeline"
    assert (copy / "model.safetensors").read_bytes() == (copy / "stages" / "rlhf" / "model.safetensors").read_bytes()
    assert "reward_win_rate" in (copy / "README.md").read_text()
    assert not any(p.name.startswith(".") for p in copy.iterdir())
    assert "nothing to do" in run_here(path, copy).stdout


def _edit_stage(index, **overrides):
    return lambda data: data["stages"][index]["overrides"].update(overrides)


def _more(method, **overrides):
    """A fifth stage (after the evaluation)."""
    recipe = {"sft": "sft.yaml", "rlhf": "rlhf.yaml"}[method]
    return lambda data: data["stages"].append({"name": "more", "method": method,
                                               "recipe": str(REPO / "recipes" / "tiny" / recipe),
                                               "overrides": overrides})


def _inline_output_dir(data):
    data["stages"][3]["recipe"]["output_dir"] = "runs/eval"


# (case, edit of the tiny pipeline, keys the message names, text): issue 22 case 6b (a stage's
# output_dir, which the pipeline ignored without a word) and 6c (a model read from a stage that
# publishes none, found only after every earlier stage had run).
REFUSED = [
    ("overrides-output-dir", _edit_stage(0, output_dir="runs/sft"), ["stages[0] (sft).overrides.output_dir"],
     "a stage runs in the pipeline's directory, stages/sft"),
    ("two-stages-one-output-dir",
     lambda d: (_edit_stage(0, output_dir="runs/x")(d), _edit_stage(1, output_dir="runs/x")(d)),
     ["stages[0] (sft).overrides.output_dir", "stages[1] (reward).overrides.output_dir"], "would be ignored"),
    ("inline-recipe-output-dir", _inline_output_dir, ["stages[3] (eval).recipe.output_dir"],
     "stages/eval: this output_dir would be ignored"),
    ("from-eval", _more("sft", model_name_or_path={"from": "eval"}, preset=None, preset_overrides=None),
     ["stages[4] (more).model_name_or_path"], "names a stage that publishes no model (method eval"),
    ("from-eval-as-reward", _more("rlhf", model_name_or_path={"from": "sft"}, rewards=[{"model": {"from": "eval"}}]),
     ["stages[4] (more).rewards[0].model"], "publishes no model"),
]


@pytest.mark.parametrize("case,edit,keys,text", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_stage_output_dir_or_a_model_from_a_modelless_stage_is_refused_before_anything_runs(
        tmp_path, capsys, case, edit, keys, text):
    require(gemma_tokenizer_tiny)
    path = pipeline_file(tmp_path, edit)
    for argv in (["pipeline", "--config", path, "--output_dir", tmp_path / "run"], ["validate", path]):
        code, out, err = run_cli(argv, capsys)
        assert code == 2, (argv, out, err)
        assert all(f"- {key}: " in err for key in keys) and text in err and "fix: " in err, err
        assert "Traceback" not in err and "== stage" not in out
        assert not (tmp_path / "run").exists()


def test_a_recipe_files_output_dir_is_replaced_and_said(tmp_path, capsys):
    """The shipped stage recipes are method recipes that also run on their own (each sets output_dir):
    in a pipeline each stage runs in stages/NAME, and validation says so."""
    require(gemma_tokenizer_tiny)
    code, out, err = run_cli(["pipeline", "--config", pipeline_file(tmp_path), "--output_dir", tmp_path / "run",
                              "--check"], capsys)
    assert code == 0, err
    assert (f"note: every stage runs in {tmp_path / 'run' / 'stages'}/NAME: the output_dir of the recipe files of "
            "sft, reward, rlhf is not used") in out


def test_a_failing_stage_is_named_with_its_log(tmp_path, capsys):
    require(gemma_tokenizer_tiny)

    def edit(data):
        data["stages"][1]["overrides"]["learning_rate"] = 1.0e30  # the reward stage diverges
        data["stages"][1]["overrides"]["max_grad_norm"] = 0.0

    path = pipeline_file(tmp_path, edit)
    result = run_here(path, tmp_path / "run")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "stage 'reward' (reward) failed" in result.stderr and "training diverged" in result.stderr
    assert str(tmp_path / "run" / "logs" / "reward.log") in result.stderr
    stages = manifest(tmp_path / "run")
    assert stages["sft"]["status"] == "finished" and stages["reward"]["status"] == "failed"
    assert (tmp_path / "run" / "stages" / "sft" / "run.json").is_file()  # earlier results intact


def test_nothing_pushed_holds_a_local_path(killed_then_rerun):
    """The card, recipe.yaml, run.json, eval.json, ... name models and data by identity (asset, Hub id,
    relative path, local:NAME), never by a local absolute path (the user's directories)."""
    from gemma_hf import hub
    from gemma_hf.assets import cache_root

    _, out, _, _ = killed_then_rerun
    plan = hub.upload_plan(out)
    texts = [f for f in plan.files if f.endswith((".md", ".yaml", ".json", ".jsonl", ".jinja"))]
    assert {"README.md", "recipe.yaml", "run.json", "eval.json"} <= set(texts)
    forbidden = {str(out.parent), str(Path.home()), str(cache_root()), str(REPO), os.getcwd()}
    for name in texts:
        text = (out / name).read_text()
        leaked = [p for p in forbidden if p and p in text]
        assert not leaked, (name, leaked)
    card = hub.validate_card(out / "README.md")
    assert card.data.base_model is None or "/" in card.data.base_model
    assert card.data.to_dict().get("model-index"), "the card's metadata carries the evaluation results"


def test_the_pipeline_card_summarises_each_stage_once(killed_then_rerun):
    """The pipeline's card: one title and one summary paragraph, each dataset once (no per-stage copies
    with split "train" or "–"), a start time, a row per stage (method, data, key hyper-parameters, before
    -> after), and model-index entries on each stage's own data (its id, split "held-out")."""
    from gemma_hf import hub
    from tests.test_cards import section

    _, out, _, _ = killed_then_rerun
    text = hub.render_card(out)
    body = text.split("\n---\n", 1)[1]
    headings = [line for line in body.splitlines() if line.startswith("# ")]
    assert headings == ["# run", "# Resolved pipeline (from pipeline.yaml); {from: NAME} is written stage:NAME"]
    assert body.count("after a pipeline of 4 stages (sft → reward → rlhf → eval)") == 1  # (the 2nd: recipe comment)
    assert "**run**" not in body
    datasets = section(text, "### Datasets")
    assert datasets.count("alpaca_en_demo.json") == 1 and datasets.count("dpo_en_demo.json") == 1
    assert "| train |" not in datasets and "| – |" not in datasets
    assert "sft (200), rlhf (100), eval (100)" in datasets
    run_row = section(text, "### Run").splitlines()[-1]
    assert not run_row.startswith("| – |") and run_row.startswith("| 20")
    stages = section(text, "### Hyperparameters")
    assert "sets no common training hyperparameters" not in stages
    for stage, method in (("sft", "sft"), ("reward", "reward"), ("rlhf", "rlhf"), ("eval", "eval")):
        assert sum(line.startswith(f"| `{stage}` | {method} |") for line in stages.splitlines()) == 1
    sft_row = next(line for line in stages.splitlines() if line.startswith("| `sft` |"))
    assert "learning_rate=0.003" in sft_row and "max_steps=4" in sft_row and "eval_loss " in sft_row and " → " in sft_row
    results = hub.validate_card(text).data.to_dict()["model-index"][0]["results"]
    types = {r["dataset"]["type"] for r in results}
    assert types <= {"alpaca_en_demo", "dpo_en_demo"} and all(r["dataset"]["split"] == "held-out" for r in results)
    reward = next(r for r in results if r["dataset"]["type"] == "dpo_en_demo")
    assert all(m["name"].startswith("reward/") for m in reward["metrics"])
