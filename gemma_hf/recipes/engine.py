"""The run every method shares: ``gemma-hf <method> --config R.yaml`` is :func:`run_recipe`.

Control flows one way: the command loads the recipe (config.py: YAML -> typed Recipe, validated
by validation.py), then :func:`run_recipe` opens the run once (:func:`open_run`: lock, recovery of
an interrupted publish, claim of output_dir), and either trains (below) or hands the open run to
the method's ``orchestrate`` (WARP's stages, an evaluation); every publish goes through
publish.py. Methods never call back into this module, except orchestrators running sub-runs.

The order of a training run is the contract of every method (the method's hooks, in bold):

1. the recipe is loaded and checked, every dataset record included (config.py, validation.py) --
   nothing is written before;
2. the output directory is claimed: a finished run is never overwritten, an unfinished one needs
   ``--resume``; every process agrees before the main process marks the directory as a run;
3. data: the checked canonical records form the mixture and its held-out split (data.py), and the
   method **prepares** them (tokenizes in the family's chat format, one ``<bos>``);
4. the model is built with the method's head (causal-lm or sequence-classification) from a preset,
   a checkpoint, an asset or a previous run directory, seeded, and the method **configures** it;
5. the held-out set is **evaluated** before training (kept in ``.before.json`` for a resumed run),
   with sample answers for causal-LM methods;
6. the method **makes its trainer** (a TRL trainer, given the engine's common arguments: the
   recipe's TRL config, tokenizer, LoRA config, the metrics callback) and it trains, checkpointing
   into ``output_dir/checkpoints`` and resuming from the latest complete checkpoint;
7. the final model is saved (LoRA merged, adapter kept), **evaluated** again, and the run directory
   is published atomically: model, tokenizer with the chat template of the format it was trained
   on, recipe.yaml, metrics.jsonl, plots (loss + the method's **plots**), eval.json, run.json (+ the
   method's **run_info**), README.md (the model card), checkpoints/ (rundir.py).

Library behaviours relied on (easy to break on upgrades):
- The Trainer writes ``trainer_state.json`` last in a checkpoint (completeness test in rundir.py)
  and on resume restores RNG states and skips the batches already seen.
- ``Trainer(eval_on_start=True)`` logs the held-out evaluation at step 0 through ``on_log``, which
  the metrics callback records; a resumed run reads it back instead of evaluating again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from gemma_hf.errors import GemmaHFError
from gemma_hf.faults import fault_point
from gemma_hf.io import exclusive_lock
from gemma_hf.references import identity
from gemma_hf.rundir import RunDir, now_iso, read_metrics, write_json
from gemma_hf.sampling import answer_prompts

from .callbacks import TrainingDiverged, attach_token_count, restore_token_count
from .methods import get_method
from .problems import Problem, RecipeError
from .publish import discard_unready, publish_training, recover
from .runtime import (Run, RunResult, build_model, freeze_below_top_layers, load_tokenizer, prepare_splits, read_mixture,
                      set_generation_stops)
from .schema import Recipe, plain, shareable

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Opening a run: lock, recover, claim -- once, for every method and the pipeline
# --------------------------------------------------------------------------------------------


@contextmanager
def open_run(rundir: RunDir, state, claim: Callable[[], str], what: str = "output_dir") -> Iterator[str]:
    """Hold ``rundir`` for this run: one live run per directory (the main process holds an exclusive
    lock; the kernel drops it if we die), an interrupted publish completed or undone, then
    ``claim()`` (every process) says what state the directory is in or raises. Yields that state.
    If the work inside fails, a staging directory it left unready is removed."""
    with ExitStack() as stack:
        if state.is_main_process:
            stack.enter_context(exclusive_lock(rundir.path, what))
            recover(rundir)
        state.wait_for_everyone()
        status = claim()
        state.wait_for_everyone()  # every process has looked before the main process writes
        try:
            yield status
        except BaseException:
            if state.is_main_process:  # a publish that failed on the way leaves no staging directory behind
                discard_unready(rundir)
            raise


def run_recipe(recipe: Recipe, resume: bool = False) -> RunResult:
    """Run a checked recipe with its method: open the run, then train it or let the method orchestrate it."""
    from accelerate import PartialState

    method = get_method(recipe.method)
    state = PartialState()
    rundir = RunDir(recipe.output_dir.resolve())
    recipe.output_dir = rundir.path
    with open_run(rundir, state, lambda: claim_output_dir(recipe, rundir, resume)) as status:
        if status == "finished":
            log.warning("%s already holds the finished run: nothing left to resume", rundir.path)
            info = rundir.read_run()
            return RunResult(rundir.path, recipe.method, rundir.read_eval() or {}, 0.0, info.get("global_step", 0))
        run = Run(recipe, method, rundir, state, started=now_iso(), start_time=time.time())
        if method.orchestrates:
            return method.orchestrate(run)
        return _train(run, resume)


def claim_output_dir(recipe: Recipe, rundir: RunDir, resume: bool) -> str:
    """The state of output_dir this run starts from; raise RecipeError (exit 2) if it may not use it.

    With ``resume``, a finished run of the same method is not an error: a run killed after its
    publish (or resumed twice) is complete, and resuming it has nothing left to do."""
    state = rundir.state()
    origin = recipe.origin("output_dir")
    if state == "finished" and resume:
        method = rundir.read_run().get("method")
        if method != recipe.method:
            raise RecipeError(recipe.source, [Problem(
                "output_dir", f"{rundir.path} holds a finished {method} run, not a {recipe.method} run",
                "choose another output_dir", origin)])
        return state
    if state == "finished":
        raise RecipeError(recipe.source, [Problem(
            "output_dir", f"{rundir.path} already holds a finished run", "choose a new output_dir (or remove it)", origin)])
    if state == "foreign":
        raise RecipeError(recipe.source, [Problem(
            "output_dir", f"{rundir.path} exists and is not a gemma-hf run directory",
            "choose a new output_dir (or empty it)", origin)])
    if state == "unfinished" and not resume:
        checkpoint, _ = rundir.latest_complete_checkpoint()
        where = f" (latest complete checkpoint: {checkpoint.name})" if checkpoint else " (no complete checkpoint yet)"
        raise RecipeError(recipe.source, [Problem(
            "output_dir", f"{rundir.path} holds an unfinished run{where}",
            "pass --resume to continue it, or remove the directory to start again", origin)])
    if state == "unfinished":
        try:
            marker = json.loads(rundir.marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            marker = {}
        marker = marker if isinstance(marker, dict) else {}
        marked = marker.get("method")
        if marked not in (None, recipe.method):
            raise RecipeError(recipe.source, [Problem(
                "output_dir", f"{rundir.path} holds an unfinished {marked} run, not a {recipe.method} run",
                f"resume it with gemma-hf {marked}, or choose another output_dir", origin)])
        if isinstance(marker.get("values"), dict):
            _refuse_changed_recipe(recipe, rundir, marker["values"])
    return state


# Keys that change how a run reports or keeps its files, not what it trains: a resume may change them.
RESUMABLE_CHANGES = frozenset({"output_dir", "logging_steps", "report_to", "dataloader_num_workers",
                               "disable_tqdm", "save_total_limit", "run_name"})


def recorded_values(recipe: Recipe) -> dict[str, Any]:
    """The recipe's values as the run marker keeps them (JSON, references by identity)."""
    values = {k: shareable(k, plain(v)) for k, v in recipe.values.items()}
    if recipe.env:
        values["env"] = dict(recipe.env)
    return json.loads(json.dumps(values, default=str))


def _refuse_changed_recipe(recipe: Recipe, rundir: RunDir, started_with: dict) -> None:
    """A resume continues the run its checkpoints belong to: a recipe whose values changed since it
    started would mix two trainings in one run (WARP: runs of one value merged with runs of another)."""
    now = recorded_values(recipe)
    changed = sorted(k for k in set(now) | set(started_with)
                     if k not in RESUMABLE_CHANGES and now.get(k, "(not set)") != started_with.get(k, "(not set)"))
    if not changed:
        return
    def show(value):
        text = json.dumps(value, ensure_ascii=False) if value != "(not set)" else value
        return text if len(text) <= 80 else text[:77] + "..."

    raise RecipeError(recipe.source, [Problem(
        key, f"was {show(started_with.get(key, '(not set)'))} when the run in {rundir.path} started, now "
        f"{show(now.get(key, '(not set)'))}: its checkpoints were trained with the first value",
        f"resume with the recipe it started with (its values are in {rundir.marker}), or start again in a new "
        "output_dir", recipe.origin(key)) for key in changed])


def write_marker(run: Run) -> None:
    """output_dir's run marker: what state() recognises as an unfinished run of ours, and the recipe's
    values, which a resume must match (claim_output_dir)."""
    recipe = run.recipe
    run.rundir.path.mkdir(parents=True, exist_ok=True)
    write_json(run.rundir.marker, {"method": recipe.method, "started": run.started, "pid": os.getpid(),
                                   "recipe": recipe.source.name if recipe.source else None,
                                   "resume_from": run.resume_from.name if run.resume_from else None,
                                   "values": recorded_values(recipe)})


def _train(run: Run, resume: bool) -> RunResult:
    """The training run (module docstring, steps 3-7) in an opened output_dir."""
    recipe, method, rundir, state = run.recipe, run.method, run.rundir, run.state
    run.resume_from, incomplete = rundir.latest_complete_checkpoint() if resume else (None, [])
    created_dir = not rundir.path.exists()

    run.tokenizer = load_tokenizer(recipe)
    with state.main_process_first():
        mixture = read_mixture(recipe, method)
        train_set, eval_set = prepare_splits(run, mixture)
    run.info["datasets"] = [
        {"path": identity(part.source.reference), "format": part.format, "split": part.spec.split,
         "fraction": part.spec.fraction, "num_examples": taken,
         # pairs built by rule from instruction records: how (the records' count is the source's)
         **({"build": list(part.spec.build), "build_size": part.spec.build_size, "build_seed": part.spec.build_seed}
            if part.spec.build else {})}
        for part, taken in zip(mixture.parts, mixture.taken)
    ]
    run.train_set = train_set
    model, run.new_parameters = method.build_model(run) or build_model(recipe, method.head)
    if method.head == "causal-lm":
        set_generation_stops(model, run.tokenizer)
    else:
        model.config.pad_token_id = run.tokenizer.pad_token_id

    if state.is_main_process:
        # The marker comes first, before any method hook may write into output_dir (rlhf's
        # configure_model saves .init/ there): a kill at any later instant leaves a directory that
        # state() recognises as an unfinished run of ours, which --resume continues.
        write_marker(run)
        for path in incomplete:  # a checkpoint the previous run was killed while writing
            log.warning("removing incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)
        if run.resume_from is None:
            for path in rundir.list_checkpoints():  # none complete: start over cleanly
                shutil.rmtree(path, ignore_errors=True)
    state.wait_for_everyone()

    try:
        method.configure_model(run, model)
        freeze_below_top_layers(run, model)
        before = _before(run, model, eval_set)
        trainer = method.make_trainer(run, model, train_set, eval_set)
        fault_point("train")
        train(trainer, run.resume_from)
        check_finite_weights(trainer)
        losses = _trainer_eval_losses(run, trainer, eval_set)
        # A stream has no length: its training records as counted (before any the method drops).
        num_train = mixture.train_records if run.streamed(train_set) else len(train_set)
        results = publish_training(run, trainer, eval_set, before, losses, num_train)
    except BaseException as err:
        full = isinstance(err, Exception) and disk_full(rundir.path)
        if state.is_main_process and created_dir and not rundir.list_checkpoints():
            shutil.rmtree(rundir.path, ignore_errors=True)  # nothing worth keeping: leave no half run behind
        if full:
            raise DiskFull(f"no space left on the device of {rundir.path} ({type(err).__name__}: "
                           f"{str(err).strip()[:200]}). The run is unfinished: what was being written does not count "
                           "as complete. Free space, then rerun with --resume (it continues from the last complete "
                           "checkpoint).") from err
        raise
    return RunResult(rundir.path, recipe.method, results, time.time() - run.start_time, trainer.state.global_step)


class DiskFull(GemmaHFError):
    """A write failed because the output directory's device is full."""


def disk_full(path: Path, margin: int = 64 * 2**20) -> bool:
    """The device holding ``path`` (or its nearest existing parent) is (nearly) full. torch.save on
    a full disk raises a RuntimeError that does not say so, hence this look at the device itself."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return False
    return usage.free < min(margin, usage.total // 100) or usage.free < 4 * 2**20


def train(trainer, resume_from: Path | None) -> None:
    """trainer.train, resuming from ``resume_from``. A checkpoint of the final step means training is
    over: its weights and state are restored and nothing is trained. (transformers 5's Trainer,
    resumed at global_step == max_steps, trains one step more: the killed-while-publishing run
    would end past max_steps with other weights. We rely on ``Trainer._load_from_checkpoint`` and
    ``TrainerState.load_from_json`` here, both long-standing.)"""
    from transformers.trainer_callback import TrainerState

    attach_token_count(trainer)
    if resume_from is not None:
        state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
        restore_token_count(trainer, state)
        if state.max_steps and state.global_step >= state.max_steps:
            log.warning("%s is the final step (%d): training is complete, nothing to train", resume_from.name,
                        state.global_step)
            trainer._load_from_checkpoint(str(resume_from))
            trainer.state = state
            return
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except RuntimeError as err:
        _raise_if_sampling_diverged(trainer, err)
        raise


def _non_finite_parameters(model) -> list[str]:
    """Names of this process's parameters holding a NaN or an infinity."""
    import torch

    return [name for name, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]


def _raise_if_sampling_diverged(trainer, err: RuntimeError) -> None:
    """A policy or student whose weights went non-finite in its last update (finite gradients, an
    absurd learning rate) fails in the next rollout, inside torch.multinomial ("probability tensor
    contains either `inf`, `nan` or element < 0"), before FiniteGuard sees a gradient. That is a
    diverged run, not a bug: say so. (The check is this process's own weights: no collective call
    on an error path.)"""
    if "probability tensor contains" not in str(err):
        return
    bad = _non_finite_parameters(trainer.model)
    if not bad:
        return
    listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise TrainingDiverged(
        f"training diverged at step {trainer.state.global_step + 1}: the weights are not all finite ({listed}), so "
        "sampling the next completions failed. The run was not published. Lower learning_rate (or set "
        "max_grad_norm), then rerun in a new output_dir, or with --resume if its last checkpoint predates the "
        "divergence.") from None


def check_finite_weights(trainer) -> None:
    """Refuse to publish non-finite weights (every process checks its own tensors; all agree)."""
    import torch

    bad = _non_finite_parameters(trainer.model)
    flag = torch.tensor([float(len(bad))], device=trainer.accelerator.device)
    if trainer.accelerator.gather(flag).sum().item() > 0:
        listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise TrainingDiverged(f"the trained weights are not all finite ({listed or 'on another process'}); the run "
                               "was not published. Lower learning_rate or check the data, then rerun.")


def _before(run: Run, model, eval_set) -> dict[str, Any]:
    """Held-out results and sample answers of the model before training (main process; a resumed run
    reads them back from .before.json instead of recomputing them from trained weights)."""
    if not run.is_main:
        return {}
    path = run.rundir.before
    if run.resume_from is not None and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    if not getattr(model, "hf_device_map", None):  # quantized models are placed already
        model.to(run.state.device)
    before: dict[str, Any] = {}
    if eval_set is not None and run.recipe.gemma.eval_before_training:
        before.update(run.method.evaluate(run, model, eval_set, "before"))
    prompts = getattr(run.recipe.method_args, "sample_prompts", None) or []
    if prompts:
        before["_samples"] = [r.to_dict() for r in answer_prompts(
            model, run.tokenizer, prompts, run.family, run.recipe.method_args.sample_max_new_tokens)]
    write_json(path, before)
    return before


def _trainer_eval_losses(run: Run, trainer, eval_set) -> dict[str, float | None]:
    """eval_loss before (the Trainer's step-0 evaluation in metrics.jsonl) and after training."""
    if eval_set is None or not run.method.eval_on_start:
        return {}
    history = read_metrics(run.rundir.metrics) if run.is_main else []
    first = next((r for r in history if "eval_loss" in r), None)
    before = first["eval_loss"] if first is not None and first.get("step") == 0 else None
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    if evals and evals[-1].get("step") == trainer.state.global_step:
        after = evals[-1]["eval_loss"]
    else:
        after = trainer.evaluate()["eval_loss"]
    return {"eval_loss_before": before, "eval_loss_after": after}



__all__ = ["run_recipe", "open_run", "claim_output_dir", "write_marker", "recorded_values", "DiskFull", "disk_full", "train", "check_finite_weights"]
