"""FSDP with CPU processes (gloo): accelerate 1.15 ignores an FSDP config when its processes run on
CPUs -- they train as plain DDP, unsharded, without a word -- so gemma-hf refuses such a launch.

The first test pins that accelerate behaviour. When it fails, accelerate runs FSDP on CPUs: remove
the refusal (gemma_hf.recipes.config._cpu_launch_problems) and test the tiny SFT and reward recipes
under FSDP2 instead (see README, "Distributed training").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from tests.assets import require

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).parent / "accelerate"
FSDP = REPO / "recipes" / "accelerate" / "fsdp.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(), reason="about CPU processes; this machine has CUDA")]

# Each process writes its own file: two processes printing to one pipe interleave their lines.
PROBE = """
from pathlib import Path
from accelerate import Accelerator
import torch
accelerator = Accelerator(cpu=True)  # what the Trainer builds on a CPU launch (TrainingArguments.use_cpu)
model = accelerator.prepare(torch.nn.Linear(4, 4))
Path(f"probe-{accelerator.process_index}.txt").write_text(" ".join(map(str, (
    accelerator.process_index, accelerator.distributed_type,
    getattr(accelerator.state, "fsdp_plugin", None) is None, type(model).__name__))))
"""


def launch(tmp_path, port: str, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ACCELERATE), "launch", "--config_file", str(FSDP), "--num_processes", "2",
                           "--mixed_precision", "no", "--main_process_port", port, *command],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)


def test_accelerate_trains_an_fsdp_launch_on_cpus_as_ddp(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    result = launch(tmp_path, "29538", str(script))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [(tmp_path / f"probe-{rank}.txt").read_text() for rank in (0, 1)]
    assert lines == ["0 DistributedType.MULTI_CPU True DistributedDataParallel",
                     "1 DistributedType.MULTI_CPU True DistributedDataParallel"], result.stdout[-3000:]


def test_gemma_hf_refuses_fsdp_on_cpu_processes(tmp_path):
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    out = tmp_path / "run"
    result = launch(tmp_path, "29539", "-m", "gemma_hf.cli", "sft", "--config", str(REPO / "recipes/tiny/sft.yaml"),
                    "--output_dir", str(out))
    assert result.returncode != 0
    assert "FSDP on CPU processes" in result.stderr and "recipes/accelerate/ddp.yaml" in result.stderr
    assert not out.exists()
