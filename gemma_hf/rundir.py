"""The run directory: one object for its layout, used by the code that writes a run (the run
core) and by the code that reads one (model cards, push, merge, the pipeline).

Layout of a finished run (``output_dir/``)::

    recipe.yaml          the resolved recipe (file + command-line overrides), loadable as a recipe
    config.json, model.safetensors, generation_config.json, tokenizer files (with a chat template)
                         the final model (merged weights for LoRA runs; the adapter is in adapter/)
    metrics.jsonl        one JSON object per logging event: step, epoch, loss / eval_loss / ...
    plots/*.png          loss.png, plus what the method adds (e.g. reward_histogram.png)
    run.json             method, base model, family, datasets, times, versions (written last)
    eval.json            held-out results before/after and sample answers
    README.md            the model card
    checkpoints/checkpoint-N/   Trainer checkpoints (resume with --resume)
    logs/                the trackers' local logs (report_to): tensorboard/ (event files), wandb/

A run that publishes data instead of a model (``gemma-hf generate``) holds its dataset
(``conversations.jsonl``, named by run.json's ``dataset``), its manifest, recipe.yaml, run.json and
README.md.

While training, ``output_dir`` holds only ``checkpoints/``, ``metrics.jsonl``, ``logs/`` and working files
whose names start with a dot (the marker ``.gemma-hf-run.json``, ``.before.json``): it never looks
finished. The finished files are written into the sibling ``.{name}.publish/``; the checkpoints are
moved into it; then two renames swap it into place (``output_dir`` -> ``.{name}.old``,
``.{name}.publish`` -> ``output_dir``). A run killed between those renames is completed on the
next start (the protocol is gemma_hf.recipes.publish). ``run.json`` is written last before the
swap and marks a finished run.

Only the standard library is imported here.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
import zipfile
from pathlib import Path
from typing import Any

from gemma_hf.errors import InputError

RECIPE = "recipe.yaml"
RUN_JSON = "run.json"
EVAL_JSON = "eval.json"
METRICS = "metrics.jsonl"
PLOTS = "plots"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
CARD = "README.md"
MARKER = ".gemma-hf-run.json"
BEFORE = ".before.json"  # results computed before training, kept for a resumed run
STAGES = "stages"  # the sub-runs and merges of a multi-stage method (WARP, a pipeline)
LOGS = "logs"  # a pipeline's per-stage logs (NAME.log); a training run's tracker logs (report_to)
TENSORBOARD = "tensorboard"  # logs/tensorboard/: TensorBoard's event files of a training run
TENSORBOARD_EVENTS = "events.out.tfevents.*"  # the names TensorBoard gives its event files
MANIFEST = "manifest.json"  # a pipeline's record of its stages
# The dataset a run that publishes data holds (a generate run: the teacher's answers as conversations);
# run.json names it under "dataset", and readers (a later recipe's datasets) find it through RunDir.dataset_file.
DATASET = "conversations.jsonl"
# What the publish moves from the working directory into the finished run (gemma_hf.recipes.publish).
CARRIED = (CHECKPOINTS, STAGES, LOGS, MANIFEST)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_PLOT_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg")


def run_name_of(output_dir: str | os.PathLike) -> str:
    """The name trackers show for a run (TrainingArguments.run_name when the recipe sets none): the
    directory's name, prefixed by the runs it is a stage of -- ``demo/sft`` for a pipeline's stage
    ``demo/stages/sft``, ``warp/iter-0/run-1`` for a WARP sub-run ``warp/stages/iter-0/run-1``."""
    path = Path(os.path.abspath(output_dir))
    names = [path.name]
    while True:
        up = path.parents
        if len(up) > 1 and up[0].name == STAGES and up[1].name:  # OWNER/stages/NAME
            names[:0] = [up[1].name]
            path = up[1]
        elif len(up) > 2 and up[1].name == STAGES and up[2].name:  # OWNER/stages/GROUP/NAME
            names[:0] = [up[2].name, up[0].name]
            path = up[2]
        else:
            return "/".join(names)


class RunDirError(InputError):
    """A run directory whose files are missing or malformed."""


# --------------------------------------------------------------------------------------------
# Files that are complete only when their own structure says so
# --------------------------------------------------------------------------------------------


def safetensors_complete(path: Path) -> bool:
    """True if ``path`` is a whole safetensors file: its header parses and the file is exactly as
    long as the header says (a file cut by a kill or a full disk is not)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                return False
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return False
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return size == 8 + length + max(ends, default=0)


def _torch_save_complete(path: Path) -> bool:
    # torch.save writes a zip archive; a cut one lacks its end-of-central-directory record.
    return zipfile.is_zipfile(path)


def weight_files(directory: Path) -> list[str]:
    """The safetensors weight files of a model directory (an index and its shards, or one file)."""
    for index_name in ("model.safetensors.index.json", "adapter_model.safetensors.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as err:
                raise RunDirError(f"{index} is not a valid shard index: {err}") from None
            return [index_name, *shards]
    return [name for name in ("model.safetensors", "adapter_model.safetensors") if (directory / name).is_file()]


def model_files_complete(directory: Path) -> bool:
    """Every weight file of ``directory`` exists and is a whole safetensors file."""
    names = weight_files(directory) if directory.is_dir() else []
    tensors = [n for n in names if n.endswith(".safetensors")]
    return bool(tensors) and all(safetensors_complete(directory / n) for n in tensors)


# --------------------------------------------------------------------------------------------


class RunDir:
    """A run directory (finished or not) at ``path``; every name of its layout lives here."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- layout ---------------------------------------------------------------------------------
    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def recipe(self) -> Path:
        return self.path / RECIPE

    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def eval_json(self) -> Path:
        return self.path / EVAL_JSON

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def plots(self) -> Path:
        return self.path / PLOTS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER

    @property
    def card(self) -> Path:
        return self.path / CARD

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def before(self) -> Path:
        return self.path / BEFORE

    @property
    def staging(self) -> "RunDir":
        """Where the finished run is assembled before it is swapped into place."""
        return RunDir(self.path.parent / f".{self.path.name}.publish")

    @property
    def old(self) -> Path:
        return self.path.parent / f".{self.path.name}.old"

    # -- state ----------------------------------------------------------------------------------
    def is_finished(self) -> bool:
        return self.run_json.is_file()

    def state(self) -> str:
        """'absent', 'finished', 'unfinished' (a run of ours in progress or killed), or 'foreign'."""
        if not self.path.exists():
            return "absent"
        if not self.path.is_dir():
            return "foreign"
        if self.is_finished():
            return "finished"
        if self.marker.is_file():
            return "unfinished"
        entries = list(self.path.iterdir())
        if not entries:
            return "absent"  # an empty directory is as good as none
        if all(e.name.startswith(f".{MARKER}.tmp-") for e in entries):
            return "unfinished"  # killed while writing the marker itself (write_json's temporary sibling)
        return "foreign"

    # -- checkpoints ----------------------------------------------------------------------------
    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if _CHECKPOINT_RE.match(p.name) and p.is_dir()]
        return sorted(found, key=lambda p: int(_CHECKPOINT_RE.match(p.name).group(1)))

    def latest_complete_checkpoint(self) -> tuple[Path | None, list[Path]]:
        """(the newest complete checkpoint or None, the incomplete ones newer than it)."""
        incomplete = []
        for path in reversed(self.list_checkpoints()):
            if checkpoint_is_complete(path):
                return path, incomplete
            incomplete.append(path)
        return None, incomplete

    # -- reading --------------------------------------------------------------------------------
    def read_json(self, path: Path, what: str, required: bool = True) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            if not required:
                return None
            raise RunDirError(f"{path} is missing ({what}).") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise RunDirError(f"{path} is not valid JSON ({what}): {err}") from None

    def read_run(self) -> dict:
        run = self.read_json(self.run_json, "the run record")
        if not isinstance(run, dict):
            raise RunDirError(f"{self.run_json} must hold a JSON object.")
        return run

    def read_eval(self) -> dict | None:
        evaluation = self.read_json(self.eval_json, "evaluation results", required=False)
        if evaluation is not None and not isinstance(evaluation, dict):
            raise RunDirError(f"{self.eval_json} must be a JSON object (name -> result).")
        return evaluation

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics)

    def dataset_file(self) -> Path | None:
        """The dataset a finished run that publishes data holds (run.json's "dataset", a file name inside
        the run directory), or None when the run publishes none (or is not a finished run)."""
        try:
            name = self.read_run().get("dataset")
        except RunDirError:
            return None
        if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
            return None
        return self.path / name

    def plot_files(self) -> list[str]:
        """Plots, relative to the run directory, loss.png first."""
        if not self.plots.is_dir():
            return []
        found = (p.relative_to(self.path).as_posix() for p in self.plots.rglob("*")
                 if p.is_file() and p.suffix.lower() in _PLOT_SUFFIXES
                 and not any(part.startswith(".") for part in p.relative_to(self.path).parts))
        return sorted(found, key=lambda p: (p != f"{PLOTS}/loss.png", p))

    def weight_files(self) -> list[str]:
        return weight_files(self.path)


def checkpoint_is_complete(path: Path) -> bool:
    """A Trainer checkpoint is complete when trainer_state.json (written last) parses and names the
    directory's step, its weights are whole safetensors files, and the optimizer, scheduler and RNG
    states it saved are whole files too (a kill or a full disk can cut any of them)."""
    match = _CHECKPOINT_RE.match(path.name)
    if not match or not path.is_dir():
        return False
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("global_step") != int(match.group(1)):
        return False
    if not model_files_complete(path):
        return False
    pickled = [p for p in path.iterdir() if p.name in ("optimizer.pt", "scheduler.pt") or p.name.startswith("rng_state")]
    return all(_torch_save_complete(p) for p in pickled)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. The one rule, for writer and reader alike: a final line
    without its newline that does not parse was cut by a kill and is dropped; any other line that
    is not a JSON object with a "step" is corruption and raises RunDirError naming the line."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            if number == len(lines):  # the last line has no newline after it: cut while being written
                continue
            raise RunDirError(f"{path}:{number} is not valid JSON: {err}") from None
        if not isinstance(record, dict) or "step" not in record:
            raise RunDirError(f"{path}:{number}: each line must be a JSON object with a 'step'.")
        records.append(record)
    return records


def write_metrics(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def write_text(path: Path, text: str) -> None:
    """Write ``path`` atomically: a temporary sibling, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


__all__ = ["RunDir", "RunDirError", "checkpoint_is_complete", "read_metrics", "write_metrics", "write_json",
           "write_text", "now_iso", "safetensors_complete", "CARRIED", "STAGES", "LOGS", "TENSORBOARD", "TENSORBOARD_EVENTS",
           "run_name_of", "MANIFEST", "weight_files", "model_files_complete", "DATASET", "RECIPE", "RUN_JSON", "EVAL_JSON",
           "METRICS", "PLOTS", "CHECKPOINTS", "ADAPTER", "CARD", "MARKER"]
