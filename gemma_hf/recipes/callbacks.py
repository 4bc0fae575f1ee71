"""Trainer callbacks every method's trainer gets from the engine.

- :class:`MetricsCallback` appends every logging event to the run's metrics.jsonl (main process).
  A fresh start empties the file; a resumed run first drops what the killed run logged after its
  checkpoint's step (and the end-of-training summary, logged again at the end), so the file reads
  as one run.
- :class:`FiniteGuard` stops the run before the optimizer applies a non-finite gradient (a NaN or
  inf loss makes every gradient NaN), naming the step; the last checkpoint it allowed is the
  last good one, so the run stays resumable and is never published.
- :class:`SaveAtEnd` makes the Trainer checkpoint the final step whatever save_steps says (unless
  save_strategy is "no"), so a run killed after training (while publishing) resumes without
  retraining anything.

Library behaviours relied on (transformers 5): ``on_pre_optimizer_step`` runs after gradient
clipping and before ``optimizer.step()``; an exception raised in a callback propagates out of
``Trainer.train``; the Trainer's own ``logging_nan_inf_filter`` would hide a NaN loss in the logs,
which is why the guard looks at the gradients themselves.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from gemma_hf.errors import GemmaHFError
from gemma_hf.faults import fault_point

from gemma_hf.rundir import TENSORBOARD, read_metrics, write_metrics

SUMMARY_KEYS = ("train_runtime", "train_loss")


class TrackerLogs(TrainerCallback):
    """The trackers of ``report_to`` keep their local logs in the run directory's ``logs/`` (moved into
    the finished run by the publish, rundir.CARRIED): TensorBoard's event files in
    ``logs/tensorboard/`` (a push uploads them: the Hub's metrics tab reads them), W&B's files in
    ``logs/wandb/``. Without this, TensorBoard would write under ``checkpoints/runs/``, which the
    publish keeps but no push uploads.

    Library behaviour relied on (transformers 5.23, integrations/integration_utils.py): the
    TensorBoardCallback reads TENSORBOARD_LOGGING_DIR when the Trainer builds it (default:
    ``args.output_dir/runs``); the WandbCallback calls ``wandb.init`` in on_train_begin, and wandb
    reads WANDB_DIR then. The report_to callbacks come before the callbacks a Trainer is given, so
    this one's on_train_begin runs after theirs. The variables are set from the Trainer's arguments
    (Run.trainer_kwargs) to the start of training, then restored: the next run in this process (a
    pipeline's next stage, a WARP sub-run) sets its own."""

    def __init__(self, logs: Path, report_to):
        wanted = set(report_to or [])
        values = {}
        if "tensorboard" in wanted:
            values["TENSORBOARD_LOGGING_DIR"] = str(logs / TENSORBOARD)
        if "wandb" in wanted:
            values["WANDB_DIR"] = str(logs)
        self.saved = {name: os.environ.get(name) for name in values}
        if values:
            logs.mkdir(parents=True, exist_ok=True)
            os.environ.update(values)

    def restore(self) -> None:
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.saved = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.restore()


class TrainingDiverged(GemmaHFError):
    """A non-finite loss or gradient: the run stops, unfinished and resumable."""


class MetricsCallback(TrainerCallback):
    def __init__(self, path: Path, fresh: bool):
        self.path = Path(path)
        self.fresh = fresh
        self.start = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.fresh:
            write_metrics(self.path, [])
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path)
                    if r.get("step", 0) <= state.global_step and not any(k in r for k in SUMMARY_KEYS)]
            write_metrics(self.path, kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs, "time": round(time.time() - self.start, 3)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


class FiniteGuard(TrainerCallback):
    def __init__(self, latest_checkpoint=None):
        self.latest_checkpoint = latest_checkpoint  # a callable returning the newest complete checkpoint

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm(grads)
        total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms])).item()
        if math.isfinite(total):
            return
        checkpoint = self.latest_checkpoint() if self.latest_checkpoint else None
        where = (f"it stays unfinished and resumable from {checkpoint.name} (the last checkpoint, all finite)"
                 if checkpoint else "no checkpoint was written before it, so it restarts from the beginning")
        raise TrainingDiverged(
            f"training diverged at step {state.global_step + 1}: the gradient norm is {total} (a non-finite loss or "
            f"gradient). The optimizer step was not applied and the run was not published; {where}. Lower "
            "learning_rate, set max_grad_norm, check the data, or use float32; then rerun with --resume.")


class TokenCount(TrainerCallback, ExportableState):
    """Saves a trainer's running counts that its logs report cumulatively with every checkpoint.

    - TRL's SFT and reward trainers keep the token count (``num_tokens`` in the logs) in
      ``trainer._total_train_tokens``, start it at 0 and do not checkpoint it;
    - our distillation trainer counts whose completions it trained on in ``trainer.generations``
      (``generated_by_student`` / ``_teacher`` / ``_data`` in the logs).

    Without this a resumed run would log counts restarting from zero. transformers writes ``state()``
    of every ExportableState callback into the checkpoint's ``trainer_state.json``
    (``stateful_callbacks``); ``restore_token_count`` puts the counts back before a resume. Relies
    on the private ``_total_train_tokens`` attribute (TRL 0.2x-1.x); without it the token count is
    not kept. (The RL trainers' ``num_tokens`` lives in TrainerState and is checkpointed already.)"""

    def __init__(self, total: float = 0, generations: dict | None = None):
        self.total = total
        self.generations = generations
        self.trainer = None  # set by the engine once the trainer exists

    def state(self) -> dict:
        total = getattr(self.trainer, "_total_train_tokens", self.total) if self.trainer is not None else self.total
        generations = getattr(self.trainer, "generations", self.generations) if self.trainer is not None \
            else self.generations
        return {"args": {"total": total, "generations": dict(generations) if isinstance(generations, dict) else None},
                "attributes": {}}


def attach_token_count(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TokenCount):
            callback.trainer = trainer


def restore_token_count(trainer, state) -> None:
    """Before resuming from a checkpoint whose TrainerState is ``state``: the counts it saved."""
    saved = (state.stateful_callbacks or {}).get("TokenCount")
    if isinstance(saved, list):
        saved = saved[-1] if saved else None
    if not saved:
        return
    args = saved.get("args", {})
    if hasattr(trainer, "_total_train_tokens"):
        trainer._total_train_tokens = args.get("total", 0)
    generations = args.get("generations")
    if isinstance(generations, dict) and isinstance(getattr(trainer, "generations", None), dict):
        trainer.generations.update({k: int(v) for k, v in generations.items()})


class SavedFaultPoint(TrainerCallback):
    """Fault injection (tests): GEMMA_HF_KILL_AT=saved:checkpoint-N kills the run right after
    checkpoint N is complete (transformers calls on_save once the checkpoint is written)."""

    def on_save(self, args, state, control, **kwargs):
        fault_point(f"saved:checkpoint-{state.global_step}")
        return control


class SaveAtEnd(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        strategy = getattr(args.save_strategy, "value", args.save_strategy)
        if strategy != "no" and state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True
        return control


__all__ = ["MetricsCallback", "FiniteGuard", "SaveAtEnd", "SavedFaultPoint", "TokenCount", "TrainingDiverged", "attach_token_count",
           "restore_token_count"]
