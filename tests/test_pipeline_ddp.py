"""Stages under `accelerate launch --num_processes 2` on CPU (gloo).

The tiny pipeline: every stage runs in the same two processes (SFT, reward, RLHF train as one
2-process job each; the evaluation runs on the main process while the other waits), and everything
is written once, by rank 0: the manifest, each stage's run directory, its metrics, the evaluation,
the published model and its card. WARP: both processes train each RL run; the initial model, the
merges, the Pareto view and the publish are rank 0's.

Each takes minutes on 2 shared cores (two processes, one thread each): `faults` (long-suite) tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from gemma_hf.rundir import RunDir
from tests.assets import require
from tests.test_pipeline import pipeline_file

REPO = Path(__file__).resolve().parent.parent
STAGES = ["sft", "reward", "rlhf", "eval"]


def launch(tmp_path: Path, port: str, *command: str) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(accelerate), "launch", "--config_file", str(REPO / "recipes/accelerate/ddp.yaml"),
                           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", port,
                           "-m", "gemma_hf.cli", *command], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1200)


def no_leftovers(*directories: Path) -> None:
    """Nothing left over from either process (staging, old, locks, markers)."""
    for directory in directories:
        assert not [p.name for p in directory.iterdir() if p.name.startswith(".")], directory


def one_step_per_stage(data: dict) -> None:
    for stage in data["stages"]:
        overrides = stage.setdefault("overrides", {})
        if stage["method"] == "eval":
            stage["recipe"].update(test_split_size=4, bootstrap_resamples=100)
        else:
            overrides.update(max_steps=1, save_steps=1, logging_steps=1)
            if "eval_steps" in overrides:
                overrides["eval_steps"] = 1


@pytest.mark.faults
def test_the_tiny_pipeline_under_two_ddp_processes(tmp_path):
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    path, out = pipeline_file(tmp_path, one_step_per_stage), tmp_path / "run"
    result = launch(tmp_path, "29537", "pipeline", "--config", str(path), "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-4000:]

    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    assert list(manifest) == STAGES
    assert all(entry["status"] == "finished" and entry["attempts"] == 1 for entry in manifest.values())
    for name in STAGES:  # the main process reports each stage once
        assert result.stdout.count(f"== stage {name} ({manifest[name]['method']}) ->") == 1
    assert result.stdout.count("pipeline finished") == 1
    for name in ["sft", "reward", "rlhf"]:
        stage = out / "stages" / name
        assert RunDir(stage).is_finished()
        run = json.loads((stage / "run.json").read_text())
        assert run["num_processes"] == 2 and run["global_step"] == 1
        rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
        # One row per (step, kind of record): rank 1 wrote none.
        kinds = Counter((r.get("step"), "eval_loss" in r, "loss" in r, "train_runtime" in r) for r in rows)
        assert max(kinds.values()) == 1, rows
        assert any("loss" in r for r in rows)
    evaluation = out / "stages" / "eval"
    assert RunDir(evaluation).is_finished() and json.loads((evaluation / "run.json").read_text())["num_prompts"] == 4
    # Published once, complete, nothing left over from either process (staging, old, locks).
    assert json.loads((out / "run.json").read_text())["method"] == "pipeline"
    assert (out / "README.md").is_file() and (out / "evaluation.md").is_file()
    assert (out / "model.safetensors").read_bytes() == (out / "stages/rlhf/model.safetensors").read_bytes()
    no_leftovers(out, out / "stages", *(out / "stages").iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline.yaml", "run"]


@pytest.mark.faults
def test_warp_under_two_ddp_processes(tmp_path):
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    out = tmp_path / "warp"
    result = launch(tmp_path, "29536", "warp", "--config", str(REPO / "recipes/tiny/warp.yaml"), "--output_dir",
                    str(out), "--max_steps", "1", "--save_steps", "1", "--logging_steps", "1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("run finished") == 1
    runs = sorted((out / "stages" / "iter-0").glob("run-*"))
    assert [p.name for p in runs] == ["run-0", "run-1"]
    for run in runs:
        assert result.stdout.count(f"== WARP stage iter-0/{run.name}:") == 1
        info = json.loads((run / "run.json").read_text())
        assert info["num_processes"] == 2 and info["global_step"] == 1
    info = json.loads((out / "run.json").read_text())
    assert info["method"] == "warp" and info["warp"]["final_model"] == "stages/iter-0/liti-0.5"
    assert [row["point"] for row in json.loads((out / "eval.json").read_text())["pareto"]][:3] == \
        ["init", "run-0", "run-1"]
    assert (out / "model.safetensors").read_bytes() == (out / "stages/iter-0/liti-0.5/model.safetensors").read_bytes()
    no_leftovers(out, out / "stages", out / "stages" / "iter-0")
    assert [p.name for p in tmp_path.iterdir()] == ["warp"]
