"""Averaging in the pipeline (issue 20): `merge` as a method, sweeps, phase averaging, WARM.

One tiny pipeline (recipes/tiny/averaging.yaml) is run once for the module: an SFT stage swept over two
learning rates -> the linear average of its runs -> a reward stage swept over two seeds -> their average
(WARM) -> RLHF from the SFT average against the averaged reward model -> the phase average of the SFT
average and the RLHF policy. The merge stages' weights equal `gemma-hf merge`'s bytes for the same inputs;
killed mid-sweep and mid-merge (test-faults), the pipeline resumes to the same result. Bad input is refused
before anything runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from tests.assets import require
from tests.clirun import run_captured, run_cli
from tests.test_corrupt_inputs import expect_refusal

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny"
SFT_POINTS = ["p0-learning_rate-0.001", "p1-learning_rate-0.003"]


def pipeline_file(tmp_path: Path, edit=None) -> Path:
    data = yaml.safe_load((TINY / "averaging.yaml").read_text())
    for stage in data["stages"]:
        if isinstance(stage.get("recipe"), str):
            stage["recipe"] = str(TINY / stage["recipe"])
    if edit:
        edit(data)
    path = tmp_path / "averaging.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def averaged(tmp_path_factory):
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    root = tmp_path_factory.mktemp("averaging")
    out = root / "run"
    done = run_captured(["pipeline", "--config", pipeline_file(root), "--output_dir", out])
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _bytes(directory: Path) -> bytes:
    return (directory / "model.safetensors").read_bytes()


def test_a_sweep_runs_every_point_and_lists_them(averaged):
    sweep = averaged / "stages" / "sft"
    info = json.loads((sweep / "run.json").read_text())
    assert info["method"] == "sweep" and [p["name"] for p in info["points"]] == SFT_POINTS
    assert [p["values"] for p in info["points"]] == [{"learning_rate": 0.001}, {"learning_rate": 0.003}]
    for point in info["points"]:  # each point is a finished run of its own, with its held-out numbers
        run = json.loads((sweep / point["output"] / "run.json").read_text())
        assert run["method"] == "sft" and point["summary"]["eval_loss_after"] > 0
        recipe = yaml.safe_load((sweep / point["output"] / "recipe.yaml").read_text())
        assert recipe["learning_rate"] == point["values"]["learning_rate"]
    card = (sweep / "README.md").read_text()
    assert all(name in card for name in SFT_POINTS) and "eval_loss_after" in card
    manifest = json.loads((averaged / "manifest.json").read_text())["stages"]
    assert [p["name"] for p in manifest["sft"]["points"]] == SFT_POINTS
    assert all(p["summary"]["eval_loss_after"] > 0 for p in manifest["sft"]["points"])
    root = json.loads((averaged / "eval.json").read_text())  # the pipeline's card/eval.json: every point too
    assert all(f"sft/{name}/eval_loss_after" in root for name in SFT_POINTS)


def test_a_merge_stage_equals_the_merge_command_byte_for_byte(averaged, tmp_path, capsys):
    points = [averaged / "stages" / "sft" / "stages" / name for name in SFT_POINTS]
    code, _, err = run_cli(["merge", "--method", "linear", "--models", *points, "--output", tmp_path / "cli"], capsys)
    assert code == 0, err
    assert _bytes(tmp_path / "cli") == _bytes(averaged / "stages" / "sft-average")
    merge = json.loads((averaged / "stages" / "sft-average" / "merge.json").read_text())
    assert merge["method"] == "linear" and merge["weights"] == [0.5, 0.5]


def test_the_merge_is_evaluated_beside_each_input(averaged):
    evaluation = json.loads((averaged / "stages" / "sft-average" / "eval.json").read_text())
    rows = evaluation["models"]
    assert [r["name"] for r in rows] == ["merged", "model_0", "model_1"]
    for row in rows:  # the same held-out records for each: loss and chat health
        assert row["heldout_loss"] > 0 and row["heldout_tokens"] == rows[0]["heldout_tokens"]
        assert 0 <= row["ended_turn_low"] <= row["ended_turn_rate"] <= row["ended_turn_high"] <= 1
    assert evaluation["merged_heldout_loss"] == rows[0]["heldout_loss"]
    run = json.loads((averaged / "stages" / "sft-average" / "run.json").read_text())
    assert run["method"] == "merge" and len(run["merge"]["models"]) == 2
    assert not any(str(averaged) in json.dumps(m) for m in run["merge"]["models"])  # identities, not paths
    card = (averaged / "stages" / "sft-average" / "README.md").read_text()
    assert "weight averaging (merge)" in card


def test_warm_averages_reward_models_and_scores_each(averaged, tmp_path, capsys):
    warm = averaged / "stages" / "warm"
    config = json.loads((warm / "config.json").read_text())
    assert config["architectures"] == ["GemmaHFForSequenceClassification"]
    evaluation = json.loads((warm / "eval.json").read_text())
    for row in evaluation["models"]:
        assert 0 <= row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"] <= 1 and row["num_pairs"] == 8
    assert json.loads((warm / "run.json").read_text())["head"] == "sequence-classification"
    points = [averaged / "stages" / "reward" / "stages" / name for name in ("p0-seed-0", "p1-seed-1")]
    code, _, err = run_cli(["merge", "--method", "linear", "--models", *points, "--output", tmp_path / "cli"], capsys)
    assert code == 0, err
    assert _bytes(tmp_path / "cli") == _bytes(warm)
    rlhf = yaml.safe_load((averaged / "stages" / "rlhf" / "recipe.yaml").read_text())
    assert rlhf["rewards"][0]["model"] == "local:warm"  # RL against the averaged reward model


def test_the_phase_average_is_the_pipelines_model(averaged):
    run = json.loads((averaged / "stages" / "average" / "run.json").read_text())
    assert [m["model"].rsplit("/", 1)[-1].split(":")[-1] for m in run["merge"]["models"]] == ["sft-average", "rlhf"]
    assert _bytes(averaged) == _bytes(averaged / "stages" / "average")
    assert json.loads((averaged / "run.json").read_text())["final_stage"] == "average"


@pytest.mark.faults
def test_killed_mid_sweep_and_mid_merge_the_pipeline_resumes_to_the_same_result(averaged, tmp_path):
    path, out = pipeline_file(tmp_path), tmp_path / "run"

    def run(**env):
        return subprocess.run([sys.executable, "-m", "gemma_hf.cli", "pipeline", "--config", str(path),
                               "--output_dir", str(out)], capture_output=True, text=True, timeout=1800, cwd=REPO,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", **env})

    killed = run(GEMMA_HF_KILL_AT=f"sft:sweep:{SFT_POINTS[0]}")  # the first point finished, the second not begun
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / "stages" / "sft" / "stages" / SFT_POINTS[0] / "run.json").is_file()
    assert not (out / "stages" / "sft" / "run.json").exists()
    killed = run(GEMMA_HF_KILL_AT="sft-average:merge:merged")  # the merge written, not yet published
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert f"point 1/2 {SFT_POINTS[0]} finished earlier, skipped" in killed.stdout
    assert not (out / "stages" / "sft-average" / "run.json").exists()
    done = run()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "was finished before: kept" in done.stdout
    for stage in ("sft-average", "warm"):
        assert _bytes(out / "stages" / stage) == _bytes(averaged / "stages" / stage), stage
    for name in SFT_POINTS:
        assert _bytes(out / "stages" / "sft" / "stages" / name) == _bytes(averaged / "stages" / "sft" / "stages" / name)


# --------------------------------------------------------------------------------------------
# Bad input: exit 2, one message naming the key and the fix, nothing written
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_architecture(tmp_path_factory):
    """A tiny Gemma 2 with the Gemma 1/2 tokenizer: not mergeable with the tiny Gemma 3 teachers."""
    from tests.tiny import make_teacher

    return make_teacher(tmp_path_factory.mktemp("gemma2") / "model", gemma_tokenizer_tiny, "gemma2", seed=0)


def _merge_recipe(tmp_path: Path, **values) -> Path:
    from tests.faults import tiny_recipe

    recipe = {**tiny_recipe("merge"), "output_dir": str(tmp_path / "out"), **values}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _teachers():
    from tests.faults import shared_teacher

    return str(shared_teacher(0)), str(shared_teacher(1))


@pytest.mark.parametrize("values,key,message", [
    (lambda a, b: {"models": [{"model": a, "weight": 0.5}, b]}, "models[1]", "some models have a weight"),
    (lambda a, b: {"models": [{"model": a, "weight": 1.5}, {"model": b, "weight": -0.5}]}, "models",
     "is negative"),
    (lambda a, b: {"models": [{"model": a, "weight": float("nan")}, {"model": b, "weight": 0.5}]}, "models",
     "must be finite"),
    (lambda a, b: {"models": [{"model": a, "weight": 1.0}, {"model": b, "weight": -1.0}], "normalize": True},
     "models", "sum to 0"),
    (lambda a, b: {"models": [{"model": a, "weight": 0.7}, {"model": b, "weight": 0.7}]}, "models", "not 1"),
    (lambda a, b: {"merge_method": "slerp", "base": a, "models": [a, b]}, "models[0]", "the base itself"),
    (lambda a, b: {"merge_method": "liti", "base": a, "models": [b], "eta": 1.5}, "eta", "eta"),
    (lambda a, b: {"merge_method": "liti", "base": a, "models": [b], "eta": -0.1}, "eta", "eta"),
    (lambda a, b: {"models": [a, a]}, "models[1]", "the same model as models[0]"),
    (lambda a, b: {"merge_method": "slerp", "models": [a, b]}, "base", "needs the initialisation"),
    (lambda a, b: {"eta": 0.5}, "eta", "applies to merge_method liti"),
    (lambda a, b: {"models": [a]}, "models", "needs two or more models"),
    (lambda a, b: {"output_dir": str(Path(a) / "merged")}, "output_dir", "inside the input"),
])
def test_bad_merge_recipes_are_refused(tmp_path, capsys, values, key, message):
    path = _merge_recipe(tmp_path, **values(*_teachers()))
    for argv in (["validate", path], ["merge", "--config", path]):
        expect_refusal(argv, capsys, f"- {key}", message, tmp_path=tmp_path)


def test_models_of_another_architecture_are_refused(tmp_path, capsys, other_architecture):
    path = _merge_recipe(tmp_path, models=[_teachers()[0], str(other_architecture)])
    expect_refusal(["merge", "--config", path], capsys, "- models[1]", "cannot be averaged", tmp_path=tmp_path)


def test_the_flag_form_keeps_working_and_its_flags_override_a_recipe(tmp_path, capsys):
    a, b = _teachers()
    code, out, err = run_cli(["merge", "--method", "linear", "--models", a, b, "--output", tmp_path / "flags"], capsys)
    assert code == 0 and "merged 2 checkpoints" in out, err
    path = _merge_recipe(tmp_path, datasets=[])
    code, out, err = run_cli(["merge", "--config", path, "--models", a, b, "--weights", "0.25", "0.75",
                              "--output", tmp_path / "recipe"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "recipe" / "merge.json").read_text())["weights"] == [0.25, 0.75]
    code, _, err = run_cli(["merge", "--method", "linear", "--models", a, b, "--output", tmp_path / "x",
                            "--learning_rate", "1"], capsys)
    assert code == 2 and "unrecognized arguments: --learning_rate 1" in err


@pytest.mark.parametrize("edit,key,message", [
    (lambda d: d["stages"][0].update(sweep={"learnin_rate": [1e-3, 2e-3]}), "sweep.learnin_rate",
     "Did you mean"),
    (lambda d: d["stages"][0].update(sweep={"learning_rate": []}), "sweep.learning_rate", "non-empty list"),
    (lambda d: d["stages"][0].update(sweep={"push_to_hub": [True, False]}), "sweep.push_to_hub", "not used by"),
    (lambda d: d["stages"][0].update(sweep={"learning_rate": [1e-3 * i for i in range(1, 7)],
                                            "seed": list(range(6))}), "sweep", "at most 32"),
    (lambda d: d["stages"][0].update(sweep={"learning_rate": [-1.0, 1e-3]}), "sweep (p0-learning_rate--1.0)",
     "learning_rate"),
    (lambda d: d["stages"][4]["overrides"].update(model_name_or_path={"from": "sft"}), "model_name_or_path",
     "names a sweep"),
    (lambda d: d["stages"][1]["overrides"].update(models=[{"from": "rlhf"}]), "models[0]",
     "names no earlier stage"),
    (lambda d: d["stages"][1]["overrides"].update(models=[{"from": "nowhere"}, {"from": "sft"}]), "models[0]",
     "names no earlier stage"),
    (lambda d: d.update(final="sft"), "final", "not a stage that publishes one model"),
])
def test_bad_sweeps_and_references_fail_before_anything_runs(tmp_path, capsys, edit, key, message):
    require(gemma_tokenizer_tiny)
    path = pipeline_file(tmp_path, edit)
    code, out, err = run_cli(["pipeline", "--config", path, "--output_dir", tmp_path / "out"], capsys)
    assert code == 2, (out[-2000:], err[-3000:])
    assert key in err and message in err and "Traceback" not in err, err[-3000:]
    assert not (tmp_path / "out").exists()
