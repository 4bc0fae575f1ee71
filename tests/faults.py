"""Shared helpers of the fault-injection suite (tests/test_faults*.py): run a method's tiny recipe in
a real subprocess (so that SIGKILL is a real kill), and compare two run directories."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from gemma_hf.recipes.methods import get_method, method_names
from tests.clirun import run_captured
from tests.tiny import shared_teacher

REPO = Path(__file__).resolve().parent.parent
ALL_METHODS = method_names()
# Methods whose run is the engine's one-trainer run (WARP orchestrates stages of rlhf runs: its own
# stage-kill test is in tests/test_rlhf.py; an evaluation's publish is killed in test_faults.py).
METHODS = [m for m in ALL_METHODS if not get_method(m).orchestrates]

# Each method's tiny recipe, made quick: 4 steps, a checkpoint every 2, held-out evaluation at 2 and 4.
FAST = ["--max_steps", "4", "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "1"]
EXTRA = {"sft": ["--sample_max_new_tokens", "4"], "reward": []}


def extra_args(method: str) -> list[str]:
    """EXTRA, and for distill a tiny teacher instead of the recipe's real 270M (tests/tiny.py)."""
    if method == "distill":
        return ["--teacher_name_or_path", str(shared_teacher()), "--student_init", "{keep_layers: [0, 3]}",
                "--max_new_tokens", "4"]
    return EXTRA.get(method, [])

# Logged numbers that depend on the clock or on one Trainer process's own accumulators (the
# end-of-training summary is recomputed by a resumed run from its own steps only).
VOLATILE = ("time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
            "total_flos", "step_time", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


def recipe_of(method: str) -> Path:
    return REPO / "recipes" / "tiny" / f"{method}.yaml"


def tiny_recipe(method: str) -> dict:
    """The method's tiny recipe as a dict, with the tiny teacher (tests/tiny.py: shared_teacher) in place
    of the real 270M that the distill, eval and generate recipes name: validating those loads the teacher's
    262k-entry tokenizer, seconds per call, in tests about something else (bad values, bad records)."""
    recipe = yaml.safe_load(recipe_of(method).read_text())
    if method in ("distill", "eval", "generate"):
        teacher = str(shared_teacher())
        for key in ("teacher_name_or_path", "model_name_or_path", "baseline_name_or_path", "judge_name_or_path"):
            if recipe.get(key) == "asset:gemma3-270m":
                recipe[key] = teacher
        if method == "distill":
            recipe["student_init"] = {"keep_layers": [0, 3]}
    if method == "merge":  # two tiny models of one architecture in place of the recipe's two SFT runs
        recipe["models"] = [str(shared_teacher(0)), str(shared_teacher(1))]
        recipe.pop("chat_family", None)  # the teachers' family is read from them
    return recipe


def command(method: str, output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gemma_hf.cli", method, "--config", str(recipe_of(method)),
            "--output_dir", str(output_dir), *FAST, *extra_args(method), *extra]


def env(**more: str) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **more}


def run(method: str, output_dir: Path, *extra: str, timeout: int = 600, **environment: str):
    """The run in a real process: for kills (GEMMA_HF_KILL_AT) and whatever must be another process."""
    return subprocess.run(command(method, output_dir, *extra), capture_output=True, text=True, timeout=timeout,
                          env=env(**environment), cwd=REPO)


def run_here(method: str, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """The same run as `run`, in this process (tests.clirun: same argv, exit code and messages), for
    what needs no process of its own: a resume, a refusal, a divergence, a full disk."""
    return run_captured(command(method, output_dir, *extra)[3:])  # without `python -m gemma_hf.cli`


def start(method: str, output_dir: Path, *extra: str, **environment: str) -> subprocess.Popen:
    return subprocess.Popen(command(method, output_dir, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(**environment), cwd=REPO, start_new_session=True)


def kill_after(process: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL the process (and its children) after ``seconds``; False if it had finished already."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    if process.poll() is not None:
        return False
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return True


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model.safetensors")


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows]


def without_clock(value):
    """eval.json without the seconds each sample answer took."""
    if isinstance(value, dict):
        return {k: without_clock(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_clock(v) for v in value]
    return value


def assert_same_run(resumed: Path, reference: Path) -> None:
    """The resumed run is the uninterrupted one: weights bit for bit, eval.json, metrics.jsonl (but
    for clock fields), and a clean directory."""
    a, b = weights(resumed), weights(reference)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
    assert without_clock(json.loads((resumed / "eval.json").read_text())) == without_clock(
        json.loads((reference / "eval.json").read_text()))
    rows, expected = metric_rows(resumed), metric_rows(reference)
    assert rows == expected, f"metrics.jsonl does not read as the uninterrupted run:\n{rows}\n!=\n{expected}"
    names = {p.name for p in resumed.iterdir()}
    assert not any(n.startswith(".") for n in names), names
    assert not [p.name for p in resumed.parent.iterdir() if p.name.startswith(f".{resumed.name}.")]
    assert json.loads((resumed / "run.json").read_text())["global_step"] == 4
    assert sorted(p.name for p in (resumed / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
