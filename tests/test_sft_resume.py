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

from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from gemma_hf.rundir import RunDir, checkpoint_is_complete
from tests.assets import require
from tests.clirun import cli

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
    require(gemma_tokenizer_tiny)
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
    # The uninterrupted run, the refusal and the resume need no process of their own: in-process.
    assert cli(sft(straight)[3:]) == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()

    # The killed run does not look finished, and sft refuses to start over it without --resume.
    assert RunDir(killed).state() == "unfinished" and not (killed / "run.json").exists()
    assert cli(sft(killed)[3:]) == 2
    err = capsys.readouterr().err
    assert "unfinished run" in err and "--resume" in err and "checkpoint-2" in err
    # A checkpoint the kill interrupted mid-write (no trainer_state.json) is skipped and removed.
    partial = killed / "checkpoints" / "checkpoint-3"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")

    # A resume continues the run its checkpoints belong to: a changed recipe is refused, naming the key.
    assert cli(sft(killed, "--resume", "--learning_rate", "1e-4", "--warmup_steps", "1")[3:]) == 2
    err = capsys.readouterr().err
    assert "- learning_rate" in err and "- warmup_steps" in err and "its checkpoints were trained" in err, err

    assert cli(sft(killed, "--resume")[3:]) == 0, capsys.readouterr().err[-3000:]
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
