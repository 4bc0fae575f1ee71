"""The tiny recipe under `accelerate launch --num_processes 2` on CPU (gloo): it trains as one
2-process job and the run directory is written once, by rank 0."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from tests.assets import require

REPO = Path(__file__).resolve().parent.parent


def test_two_process_ddp_on_cpu(tmp_path):
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    out = tmp_path / "ddp"
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--config_file", str(REPO / "recipes/accelerate/ddp.yaml"),
               "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29533",
               "-m", "gemma_hf.cli", "sft", "--config", str(REPO / "recipes/tiny/sft.yaml"),
               "--output_dir", str(out), "--max_steps", "4", "--save_steps", "2", "--eval_strategy", "no",
               "--test_split_size", "null", "--logging_steps", "1", "--sample_prompts", "null"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    run = json.loads((out / "run.json").read_text())
    assert run["num_processes"] == 2 and run["global_step"] == 4
    assert result.stdout.count("run finished") == 1  # rank 0 reports (and publishes) once
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]  # one line per step: only rank 0 logs
    # Each step consumed 2 processes x 4 examples: an epoch is ceil(examples / 8) steps.
    assert abs(losses[-1]["epoch"] - 4 / math.ceil(run["num_train_examples"] / 8)) < 1e-6
    assert losses[-1]["loss"] < losses[0]["loss"]
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "model.safetensors").is_file() and not any(p.name.startswith(".") for p in out.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
