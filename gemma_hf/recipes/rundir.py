"""The run directory: its states, checkpoints, metrics, plots, and the atomic publish at the end.

Layout of a finished run (``output_dir/``)::

    recipe.yaml          the resolved recipe (file + command-line overrides), loadable as a recipe
    config.json, model.safetensors, generation_config.json, tokenizer files
                         the final model (merged weights for LoRA runs; the adapter is in adapter/)
    metrics.jsonl        one JSON object per logging event: step, epoch, loss / eval_loss / ...
    plots/loss.png       training (and eval) loss against step
    run.json             method, base model, family, datasets, times, versions
    eval.json            held-out loss before/after and sample answers (when the recipe has them)
    checkpoints/checkpoint-N/   Trainer checkpoints (resume with --resume)

While training, ``output_dir`` holds only ``checkpoints/``, ``metrics.jsonl`` and the marker
``.gemma-hf-run.json``: it never looks finished. The finished files are written into the sibling
``.{name}.publish/``; the checkpoints are moved into it; then two renames swap it into place
(``output_dir`` -> ``.{name}.old``, ``.{name}.publish`` -> ``output_dir``). A run killed between
those renames is completed by :func:`recover_publish` on the next start. ``run.json`` is written
last before the swap and marks a finished run.

(gemma_hf.io.atomic_directory is not used here: the checkpoints must move into the new directory
and a half-done swap must be recoverable by --resume, which that helper does not do.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

MARKER = ".gemma-hf-run.json"
RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "pytorch_model_fsdp_0")


def publish_dir(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.publish"


def old_dir(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.old"


def is_finished(output_dir: Path) -> bool:
    return (output_dir / RUN_JSON).is_file()


def recover_publish(output_dir: Path) -> bool:
    """Finish a publish that was killed between its renames. Returns True if it did something."""
    staged, old = publish_dir(output_dir), old_dir(output_dir)
    if not (staged / RUN_JSON).is_file():
        return False
    if output_dir.exists():
        if is_finished(output_dir):
            return False
        if (output_dir / CHECKPOINTS).exists() and not (staged / CHECKPOINTS).exists():
            os.rename(output_dir / CHECKPOINTS, staged / CHECKPOINTS)
        if old.exists():
            shutil.rmtree(old)
        os.rename(output_dir, old)
    os.rename(staged, output_dir)
    shutil.rmtree(old, ignore_errors=True)
    return True


def describe_output_dir(output_dir: Path) -> str:
    """'absent', 'finished', 'unfinished' (a run of ours in progress or killed), or 'foreign'."""
    if not output_dir.exists():
        return "absent"
    if not output_dir.is_dir():
        return "foreign"
    if is_finished(output_dir):
        return "finished"
    if (output_dir / MARKER).is_file():
        return "unfinished"
    if not any(output_dir.iterdir()):
        return "absent"  # an empty directory is as good as none
    return "foreign"


def checkpoint_is_complete(path: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint is complete when it parses and its
    global_step matches the directory name, and the weights are there."""
    match = _CHECKPOINT_RE.match(path.name)
    if not match or not path.is_dir():
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    if state.get("global_step") != int(match.group(1)):
        return False
    return any((path / name).exists() for name in WEIGHT_FILES)


def list_checkpoints(checkpoints: Path) -> list[Path]:
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if _CHECKPOINT_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(_CHECKPOINT_RE.match(p.name).group(1)))


def latest_complete_checkpoint(checkpoints: Path) -> tuple[Path | None, list[Path]]:
    """(the newest complete checkpoint or None, the incomplete ones newer than it)."""
    incomplete = []
    for path in reversed(list_checkpoints(checkpoints)):
        if checkpoint_is_complete(path):
            return path, incomplete
        incomplete.append(path)
    return None, incomplete


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


class MetricsCallback(TrainerCallback):
    """Appends every logging event to metrics.jsonl (main process only).

    On resume, lines logged after the checkpoint's step (the killed run's tail) are dropped first,
    so the file reads as one run.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.start = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.path.exists():
            kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= state.global_step]
            self._rewrite(kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs, "time": round(time.time() - self.start, 3)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        os.replace(tmp, self.path)


def read_metrics(path: Path) -> list[dict]:
    records = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut by a kill: ignore it
            continue
    return records


def plot_losses(records: list[dict], path: Path, title: str) -> None:
    """Training loss (and eval loss) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="training loss", color="tab:blue", linewidth=1.6)
    if evals:
        ax.plot(*zip(*evals), label="held-out loss", color="tab:orange", marker="o", linewidth=1.6)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
