"""kill -9 during training after a checkpoint, then --resume: the final weights equal an
uninterrupted run's, bit for bit (deterministic CPU settings: seed, full_determinism, no workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from gemma_hf.assets import gemma_tokenizer, llamafactory_data
from gemma_hf.recipes.rundir import RunDir, checkpoint_is_complete
from tests.assets import require

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny" / "sft.yaml"
# Shorter than the recipe: 4 steps of 2 examples, a checkpoint every 2, no evaluation or sampling.
SHORT = ["--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--eval_strategy", "no",
         "--test_split_size", "null", "--sample_prompts", "null", "--per_device_train_batch_size", "2"]


def sft(output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gemma_hf.cli", "sft", "--config", str(TINY), "--output_dir", str(output_dir),
            *SHORT, *extra]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_kill_9_then_resume_equals_uninterrupted(tmp_path, capsys):
    require(gemma_tokenizer)
    require(llamafactory_data)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    victim = subprocess.Popen(sft(killed), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        target = killed / "checkpoints" / "checkpoint-2"
        while not checkpoint_is_complete(target):
            assert victim.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        os.killpg(victim.pid, signal.SIGKILL)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    assert victim.returncode == -signal.SIGKILL
    reference = subprocess.run(sft(straight), cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert victim.returncode == -signal.SIGKILL

    # The killed run does not look finished, and sft refuses to start over it without --resume.
    assert RunDir(killed).state() == "unfinished" and not (killed / "run.json").exists()
    from gemma_hf import cli

    argv = sft(killed)[3:]  # in-process: validation and the output_dir check load no model
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "unfinished run" in err and "--resume" in err and "checkpoint-2" in err
    # A checkpoint the kill interrupted mid-write (no trainer_state.json) is skipped and removed.
    partial = killed / "checkpoints" / "checkpoint-3"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")

    resumed = subprocess.run(sft(killed, "--resume"), cwd=tmp_path, env=env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = json.loads((killed / "run.json").read_text())
    assert run["resumed_from"] == "checkpoint-2" and run["global_step"] == 4
    assert not partial.exists()

    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
    # metrics.jsonl reads as one run: each training step logged once.
    def logged(run: Path) -> list[tuple]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return [(r["step"], r["loss"], r.get("num_tokens")) for r in rows if "loss" in r]

    assert [row[0] for row in logged(killed)] == [1, 2, 3, 4]
    # ... with TRL's running token count carried over the resume (TRL restarts it at 0; see TokenCount).
    assert logged(killed) == logged(straight)
