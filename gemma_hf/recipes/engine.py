"""The run core every method shares: ``gemma-hf <method> --config R.yaml`` is :func:`run_recipe`.

The order is the contract of every method (the method's hooks, gemma_hf.recipes.methods, in bold):

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
- PEFT's ``merge_and_unload`` returns the base model with the adapters (and ``modules_to_save``
  copies, e.g. a reward model's score head) folded in.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma_hf.errors import GemmaHFError

from .config import Recipe
from .methods import Method, get_method
from .problems import Problem, RecipeError
from .rundir import CARRIED, RunDir, now_iso, read_metrics, write_json, write_metrics, write_text

log = logging.getLogger(__name__)
PUBLISH_READY = ".publish-ready"


@dataclass
class RunResult:
    output_dir: Path
    method: str
    results: dict  # eval.json
    wall_time_s: float = 0.0
    global_step: int = 0

    @property
    def samples(self) -> list[dict]:
        return self.results.get("samples", [])

    @property
    def eval_loss_before(self) -> float | None:
        return self.results.get("eval_loss_before")

    @property
    def eval_loss_after(self) -> float | None:
        return self.results.get("eval_loss_after")


@dataclass
class Run:
    """What the engine and a method's hooks share during one run."""

    recipe: Recipe
    method: Method
    rundir: RunDir
    state: Any  # accelerate.PartialState
    resume_from: Path | None = None
    tokenizer: Any = None
    started: str = ""
    start_time: float = 0.0
    new_parameters: list[str] = field(default_factory=list)  # created by this run (e.g. a new score head)
    train_set: Any = None  # the prepared training split (for a method's configure_model)
    stats: dict[str, dict] = field(default_factory=dict)  # per split, from the method's prepare()
    info: dict[str, Any] = field(default_factory=dict)  # run.json entries gathered along the way

    @property
    def family(self) -> str:
        return self.recipe.family

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    # -- helpers the methods share --------------------------------------------------------------
    def map(self, dataset, function, desc: str, remove_columns: bool = True):
        """``dataset.map(function)`` without datasets' fingerprinting of ``function``: it pickles the
        function's closure (a 256k-entry tokenizer: ~20 s per call) to name a cache file, and our
        datasets live in memory, so a fresh random fingerprint is both correct and instant."""
        import uuid

        return dataset.map(function, remove_columns=dataset.column_names if remove_columns else None, desc=desc,
                           new_fingerprint=uuid.uuid4().hex)

    def apply_long_examples(self, dataset, split: str, lengths: list[int], truncate):
        """Handle examples longer than max_length by the method's ``long_examples`` policy: drop
        (never in the "eval" split: held-out examples are kept, truncated) or ``truncate(ds)``."""
        max_length = getattr(self.recipe.training, "max_length", None)
        policy = getattr(self.recipe.method_args, "long_examples", "truncate")
        stats = {"examples": len(dataset), "long": 0, "dropped": 0, "handling": policy}
        if max_length is None:
            return dataset, stats
        long_rows = [i for i, length in enumerate(lengths) if length > max_length]
        stats["long"] = len(long_rows)
        if long_rows and policy == "drop" and split != "eval":
            keep = sorted(set(range(len(dataset))) - set(long_rows))
            dataset = dataset.select(keep)
            stats["dropped"] = len(long_rows)
        elif long_rows and truncate is not None:
            dataset = truncate(dataset, max_length)
            stats["handling"] = "truncate"
        if len(dataset) == 0:
            raise RecipeError(self.recipe.source, [Problem(
                "max_length", f"every {split} example is longer than max_length={max_length} and was dropped",
                "raise max_length, or set long_examples: truncate", self.recipe.origin("max_length"))])
        return dataset, stats

    def trainer_kwargs(self, model, train_set, eval_set) -> dict[str, Any]:
        """The arguments every method's TRL trainer gets from the engine."""
        from .callbacks import FiniteGuard, MetricsCallback, SaveAtEnd, SavedFaultPoint, TokenCount

        args = self.recipe.training
        if "eval_on_start" not in self.recipe.values:
            args.eval_on_start = bool(self.method.eval_on_start and eval_set is not None
                                      and self.recipe.gemma.eval_before_training and self.resume_from is None)
        if "logging_nan_inf_filter" not in self.recipe.values:
            args.logging_nan_inf_filter = False  # log a NaN loss as NaN (FiniteGuard stops the run anyway)
        callbacks = [MetricsCallback(self.rundir.metrics, fresh=self.resume_from is None),
                     FiniteGuard(lambda: self.rundir.latest_complete_checkpoint()[0]), SaveAtEnd(), TokenCount(), SavedFaultPoint()]
        return dict(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                    processing_class=self.tokenizer, peft_config=peft_config_for(self), callbacks=callbacks)


# --------------------------------------------------------------------------------------------
# Output directory
# --------------------------------------------------------------------------------------------


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
            marked = json.loads(rundir.marker.read_text(encoding="utf-8")).get("method")
        except (OSError, ValueError, AttributeError):
            marked = None
        if marked not in (None, recipe.method):
            raise RecipeError(recipe.source, [Problem(
                "output_dir", f"{rundir.path} holds an unfinished {marked} run, not a {recipe.method} run",
                f"resume it with gemma-hf {marked}, or choose another output_dir", origin)])
    return state


# --------------------------------------------------------------------------------------------
# Tokenizer, model, LoRA
# --------------------------------------------------------------------------------------------


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(recipe.tokenizer_path)


def model_class(head: str):
    from gemma_hf import GemmaHFForCausalLM, GemmaHFForSequenceClassification

    return GemmaHFForCausalLM if head == "causal-lm" else GemmaHFForSequenceClassification


def seed_everything(recipe: Recipe) -> None:
    """Seed before weights exist: a preset's random init, a new head and LoRA's init are reproducible."""
    from transformers import set_seed
    from transformers.trainer_utils import enable_full_determinism

    t = recipe.training
    if t.full_determinism:
        enable_full_determinism(t.seed)
    else:
        set_seed(t.seed)


def load_model(path: str, head: str, *, dtype: str | None = None, attn_implementation: str | None = None,
               revision: str | None = None, **kwargs):
    """(model, missing parameter names) of a checkpoint directory or Hub id, with ``head``."""
    import torch

    kwargs = {"dtype": getattr(torch, dtype) if dtype not in (None, "auto") else "auto", **kwargs}
    if head == "sequence-classification":
        kwargs.setdefault("num_labels", 1)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if revision and not Path(path).exists():
        kwargs["revision"] = revision
    model, info = model_class(head).from_pretrained(path, output_loading_info=True, **kwargs)
    return model, sorted(info.get("missing_keys") or ())


def build_model(recipe: Recipe, head: str):
    """(model, names of parameters the checkpoint did not have) for ``head``, seeded first."""
    import torch

    m = recipe.model
    seed_everything(recipe)
    cls = model_class(head)
    head_kwargs = {"num_labels": 1} if head == "sequence-classification" else {}
    dtype = None if m.dtype in (None, "auto") else getattr(torch, m.dtype)
    if recipe.model_path is None:  # random weights of a preset architecture
        config = copy.deepcopy(recipe.architecture)
        if head_kwargs:
            config.num_labels = head_kwargs["num_labels"]  # resets id2label/label2id to match
        model = cls._from_config(config, attn_implementation=m.attn_implementation or "eager")
        return (model.to(dtype) if dtype is not None else model), []
    kwargs = {}
    if m.load_in_4bit or m.load_in_8bit:
        from trl import get_kbit_device_map, get_quantization_config

        kwargs["quantization_config"] = get_quantization_config(m)
        kwargs["device_map"] = get_kbit_device_map()
    return load_model(recipe.model_path, head, dtype=m.dtype, attn_implementation=m.attn_implementation,
                      revision=m.model_revision, **kwargs)


def peft_config_for(run: Run):
    recipe = run.recipe
    if not recipe.model.use_peft:
        return None
    from trl import get_peft_config

    config = get_peft_config(recipe.model)
    if config.target_modules is None:
        config.target_modules = "all-linear"  # PEFT has no default target list for model_type gemma_hf
    if recipe.gemma.lora_trainable_tokens:
        # PEFT's TrainableTokens: a delta on these embedding rows; with tied embeddings the lm_head rows
        # follow (and gemma_hf's loss reads lm_head.weight, which includes the delta).
        ids = run.tokenizer.convert_tokens_to_ids(list(recipe.gemma.lora_trainable_tokens))
        config.trainable_token_indices = {"embed_tokens": sorted(set(ids))}
    return config


def set_generation_stops(model, tokenizer) -> list[int]:
    """generation_config.eos_token_id = [<eos>, <end_of_turn>, ...]: chats stop at the end of a turn."""
    from gemma_hf.chat import stop_token_ids

    config = model.generation_config
    current = config.eos_token_id
    current = [] if current is None else [current] if isinstance(current, int) else list(current)
    config.eos_token_id = list(dict.fromkeys([*stop_token_ids(tokenizer), *current]))
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return config.eos_token_id


def merge_adapter(recipe: Recipe, head: str, model, adapter_dir: Path, reload: bool = False):
    """The base model with the LoRA weights merged in.

    In memory when the base is a plain (unquantized) model held whole by this process; otherwise
    (QLoRA, or ``reload``: a model sharded across processes) the base is reloaded unquantized in
    the recipe's dtype and the saved adapter merged into it.
    """
    m = recipe.model
    if not (m.load_in_4bit or m.load_in_8bit or reload):
        return model.merge_and_unload()
    import torch
    from peft import PeftModel

    if recipe.model_path is None:
        raise RuntimeError("cannot merge a QLoRA adapter into a preset's random weights: there is no base checkpoint")
    dtype = torch.float32 if m.dtype in (None, "auto") else getattr(torch, m.dtype)
    kwargs = {"num_labels": 1} if head == "sequence-classification" else {}
    base = model_class(head).from_pretrained(recipe.model_path, dtype=dtype, **kwargs)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run_recipe(recipe: Recipe, resume: bool = False) -> RunResult:
    from contextlib import ExitStack

    from accelerate import PartialState

    from gemma_hf.io import exclusive_lock

    state = PartialState()
    rundir = RunDir(recipe.output_dir.resolve())
    recipe.output_dir = rundir.path
    with ExitStack() as stack:
        if state.is_main_process:  # one live run per output_dir; the kernel drops the lock if we die
            stack.enter_context(exclusive_lock(rundir.path, "output_dir"))
        return _run_locked(recipe, rundir, state, resume)


def _run_locked(recipe: Recipe, rundir: RunDir, state, resume: bool) -> RunResult:
    method = get_method(recipe.method)
    run = Run(recipe, method, rundir, state, started=now_iso(), start_time=time.time())
    if state.is_main_process:
        recover_publish(rundir)
    state.wait_for_everyone()
    if claim_output_dir(recipe, rundir, resume) == "finished":
        log.warning("%s already holds the finished run: nothing left to resume", rundir.path)
        info = rundir.read_run()
        return RunResult(rundir.path, recipe.method, rundir.read_eval() or {}, 0.0, info.get("global_step", 0))
    state.wait_for_everyone()  # every process has looked before the main process writes

    run.resume_from, incomplete = rundir.latest_complete_checkpoint() if resume else (None, [])
    created_dir = not rundir.path.exists()

    run.tokenizer = load_tokenizer(recipe)
    with state.main_process_first():
        mixture = read_mixture(recipe, method)
        train_set, eval_set = _prepare_splits(run, mixture)
    from gemma_hf.references import identity

    run.info["datasets"] = [
        {"path": identity(part.source.reference), "format": part.format, "split": part.spec.split,
         "fraction": part.spec.fraction, "num_examples": taken}
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
        rundir.path.mkdir(parents=True, exist_ok=True)
        write_json(rundir.marker, {"method": recipe.method, "started": run.started, "pid": os.getpid(),
                                   "recipe": recipe.source.name if recipe.source else None,
                                   "resume_from": run.resume_from.name if run.resume_from else None})
        for path in incomplete:  # a checkpoint the previous run was killed while writing
            log.warning("removing incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)
        if run.resume_from is None:
            for path in rundir.list_checkpoints():  # none complete: start over cleanly
                shutil.rmtree(path, ignore_errors=True)
    state.wait_for_everyone()

    try:
        method.configure_model(run, model)
        before = _before(run, model, eval_set)
        trainer = method.make_trainer(run, model, train_set, eval_set)
        fault_point("train")
        train(trainer, run.resume_from)
        check_finite_weights(trainer)
        losses = _trainer_eval_losses(run, trainer, eval_set)
        results = _publish(run, trainer, eval_set, before, losses, len(train_set))
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

    from .callbacks import attach_token_count, restore_token_count

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
    from .callbacks import TrainingDiverged

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

    from .callbacks import TrainingDiverged

    bad = _non_finite_parameters(trainer.model)
    flag = torch.tensor([float(len(bad))], device=trainer.accelerator.device)
    if trainer.accelerator.gather(flag).sum().item() > 0:
        listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise TrainingDiverged(f"the trained weights are not all finite ({listed or 'on another process'}); the run "
                               "was not published. Lower learning_rate or check the data, then rerun.")


def _check_finite_results(results: dict) -> None:
    import math

    from .callbacks import TrainingDiverged

    bad = [k for k, v in results.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise TrainingDiverged(f"held-out results are not finite ({', '.join(bad)}); the run was not published. "
                               "Check the held-out data (every example needs answer tokens within max_length).")


def fault_point(name: str) -> None:
    """Fault injection for the kill-anywhere tests: GEMMA_HF_KILL_AT=NAME kills this process with
    SIGKILL (no cleanup, like a power cut or the OOM killer) when the run reaches point NAME; inside
    a pipeline, GEMMA_HF_KILL_AT=STAGE:NAME only in that stage."""
    target = os.environ.get("GEMMA_HF_KILL_AT")
    stage = os.environ.get("GEMMA_HF_STAGE")
    if target is not None and (target == name if stage is None else target in (name, f"{stage}:{name}")):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def recover_publish(rundir: RunDir) -> bool:
    """Complete or undo a publish that a kill interrupted; True if it completed one.

    The staging directory is complete only once it holds PUBLISH_READY: then it is swapped in
    (RunDir.recover_publish); before that it is discarded and the run stays unfinished. Leftovers
    of a swap cut short (the old working directory, the ready marker) are removed."""
    staged = rundir.staging
    done = False
    if staged.path.exists() and not (staged / PUBLISH_READY).is_file():
        shutil.rmtree(staged.path)
    else:
        done = rundir.recover_publish()
    if rundir.is_finished():
        (rundir / PUBLISH_READY).unlink(missing_ok=True)
        if rundir.old.exists():
            shutil.rmtree(rundir.old)
    return done


def read_mixture(recipe: Recipe, method: Method):
    """The mixture from the records validation read (Hub datasets are read here, and checked alike)."""
    from gemma_hf.chat import FAMILIES

    from .data import load_mixture, read_dataset
    from .formats import CONTROL_TOKENS

    parts = []
    for index, spec in enumerate(recipe.data.datasets):
        part = recipe.data_parts.get(index)
        if part is None:
            family = recipe.family if recipe.family in FAMILIES else "gemma2"
            part = read_dataset(spec, index, method.data_format, family, CONTROL_TOKENS)
            if part.problems:
                raise RecipeError(recipe.source, [Problem(p.key, p.message, p.fix, recipe.origin(p.key))
                                                  for p in part.problems])
        parts.append(part)
    return load_mixture(parts, method.data_format, recipe.training.seed)


def _prepare_splits(run: Run, mixture):
    """(train, held-out or None), prepared by the method. A method that drops long held-out
    examples too (drop_long_eval) prepares the whole mixture first, so that test_split_size counts
    the examples that are evaluated; otherwise the split comes first and each part is prepared."""
    from .data import split_held_out

    recipe, method = run.recipe, run.method
    def split(dataset):
        try:
            return split_held_out(dataset, recipe.data, recipe.training.seed)
        except ValueError as err:  # datasets refuses a split that leaves either side empty
            raise RecipeError(recipe.source, [Problem(
                "test_split_size", f"cannot hold out {recipe.data.test_split_size} of the {len(dataset)} usable "
                f"examples: {err}", "hold out fewer examples (or raise max_length to keep more)",
                recipe.origin("test_split_size"))]) from None

    if method.drop_long_eval:
        prepared, run.stats["all"] = method.prepare(run, mixture.records, "all")
        return split(prepared)
    train, held_out = split(mixture.records)
    train, run.stats["train"] = method.prepare(run, train, "train")
    if held_out is not None:
        held_out, run.stats["eval"] = method.prepare(run, held_out, "eval")
    return train, held_out


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
        from .sampling import answer_prompts

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


def _save_final_model(run: Run, trainer, staged: RunDir):
    """Save the final model into ``staged`` (every process takes part); returns (model, note) on the
    main process: the merged model for LoRA runs (adapter in adapter/), else the trained one."""
    recipe = run.recipe
    # The Trainer sets config.use_cache = args.use_cache (False) for training; a published causal LM
    # caches its keys and values by default, as every Gemma checkpoint does.
    trainer.model.config.use_cache = run.method.head == "causal-lm"
    if not recipe.model.use_peft and not _sharded(trainer):
        trainer.save_model(str(staged.path))
        return trainer.model, "full fine-tune"
    if not recipe.model.use_peft:
        # The trained model is sharded across the processes (FSDP, DeepSpeed). A forward pass on the main
        # process alone (the held-out evaluation, the sample answers) would wait forever for the others'
        # shards, and the sharded model's save_pretrained writes the wrapper's class into the checkpoint:
        # FSDP2 swaps the model's class for a generated FSDP<Class> subclass, so the remote code copied
        # and auto_map name torch's FSDP files instead of modeling.py, and tied weights are saved twice.
        # So the gathered weights go to a scratch folder; the main process loads them into a plain
        # model, which it evaluates and saves.
        gathered = staged / "gathered"
        trainer.save_model(str(gathered))  # every process: the shards are gathered here
        run.state.wait_for_everyone()
        if not run.is_main:
            return None, ""
        final, _ = load_model(str(gathered), run.method.head, dtype=recipe.model.dtype,
                              attn_implementation=recipe.model.attn_implementation)
        shutil.rmtree(gathered)
        final.save_pretrained(str(staged.path))
        return final.to(run.state.device), "full fine-tune"
    trainer.save_model(str(staged.adapter))  # every process: FSDP/DeepSpeed gather here
    run.state.wait_for_everyone()
    if not run.is_main:
        return None, ""
    sharded = _sharded(trainer)  # then merged from the saved adapter (see the full fine-tune's note above)
    if recipe.gemma.merge_lora:
        final = merge_adapter(recipe, run.method.head, trainer.model, staged.adapter, reload=sharded)
        final.save_pretrained(str(staged.path))
        return final.to(run.state.device) if sharded else final, "LoRA merged into the base weights (the adapter is in adapter/)"
    for item in staged.adapter.iterdir():
        shutil.copy2(item, staged / item.name)
    evaluated = merge_adapter(recipe, run.method.head, None, staged.adapter, reload=True).to(run.state.device) \
        if sharded else trainer.model
    return evaluated, "LoRA adapter only (merge_lora: false); the base model is run.json's base_model"


def _sharded(trainer) -> bool:
    """The Trainer's model is split across processes (FSDP, DeepSpeed): usable only by all of them at once.

    Library behaviour relied on: accelerate sets ``distributed_type`` to FSDP / DEEPSPEED only when it
    really wraps the model so (never on CPU processes in accelerate 1.15, see config._cpu_launch_problems).
    """
    from accelerate.utils import DistributedType

    return trainer.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _publish(run: Run, trainer, eval_set, before: dict, losses: dict, num_train: int) -> dict:
    """Write the finished run into the staging directory, move the checkpoints in, swap it into place."""
    import transformers
    import trl

    import gemma_hf
    from gemma_hf.chat import install_chat_template
    from gemma_hf.references import identity

    from .config import shareable

    recipe, rundir, state = run.recipe, run.rundir, run.state
    staged = rundir.staging
    if state.is_main_process:
        if staged.path.exists():
            shutil.rmtree(staged.path)
        staged.path.mkdir(parents=True)
    state.wait_for_everyone()
    final_model, final_note = _save_final_model(run, trainer, staged)
    fault_point("publish:model")
    state.wait_for_everyone()
    if not state.is_main_process:
        state.wait_for_everyone()
        return {}

    final_model.eval()
    after = run.method.evaluate(run, final_model, eval_set, "after") if eval_set is not None else {}
    results: dict[str, Any] = dict(losses)
    for when, values in (("before", before), ("after", after)):
        results.update({f"{k}_{when}": v for k, v in values.items() if not k.startswith("_")})
    if eval_set is not None:
        results["num_eval_examples"] = len(eval_set)
    _check_finite_results(results)
    prompts = getattr(recipe.method_args, "sample_prompts", None) or []
    if prompts:
        from .sampling import answer_prompts

        answers = answer_prompts(final_model, run.tokenizer, prompts, run.family, recipe.method_args.sample_max_new_tokens)
        results["samples"] = [{"prompt": p, "before": b, "after": a.to_dict()}
                              for p, b, a in zip(prompts, before.get("_samples", [{}] * len(prompts)), answers)]

    for leftover in ("training_args.bin", "README.md", "adapter/training_args.bin", "adapter/README.md"):
        (staged / leftover).unlink(missing_ok=True)  # Trainer artefacts, not part of the model
    install_chat_template(run.tokenizer, run.family)
    run.tokenizer.save_pretrained(str(staged.path))
    if run.method.head == "causal-lm":
        _ensure_generation_stops(staged.path, run.tokenizer)
    write_text(staged.recipe, recipe.to_yaml())
    metrics = read_metrics(rundir.metrics)
    write_metrics(staged.metrics, metrics)
    from .plots import plot_losses

    base_name = recipe.model_path.rstrip("/").split("/")[-1] if recipe.model_path else recipe.gemma.preset
    plot_losses(metrics, staged.plots / "loss.png", f"{recipe.method} {base_name} ({run.family})")
    run.method.plots(run, {"before": before, "after": after}, staged.plots)
    if results:
        write_json(staged.eval_json, results)
    run_info = {
        "method": recipe.method,
        "head": run.method.head,
        "base_model": identity(recipe.model.model_name_or_path) or f"preset:{recipe.gemma.preset}",
        "family": run.family,
        "datasets": run.info["datasets"],
        "num_train_examples": num_train,
        "num_eval_examples": len(eval_set) if eval_set is not None else 0,
        "examples_longer_than_max_length": {split: stats for split, stats in run.stats.items()},
        "lora": bool(recipe.model.use_peft),
        "final_model": final_note,
        "global_step": trainer.state.global_step,
        "num_processes": state.num_processes,
        "resumed_from": run.resume_from.name if run.resume_from else None,
        **shareable("run_info", run.method.run_info(run)),
        "started": run.started,
        "finished": now_iso(),
        "wall_time_s": round(time.time() - run.start_time, 1),
        "gemma_hf_version": gemma_hf.__version__,
        "transformers_version": transformers.__version__,
        "trl_version": trl.__version__,
    }
    finish_publish(rundir, staged, run_info)
    state.wait_for_everyone()
    return results


def finish_publish(rundir: RunDir, staged: RunDir, run_info: dict) -> None:
    """The last steps of every publish: run.json (the run's record, written last of its files), the
    card, the ready marker, then the swap: the working directory's carried directories
    (checkpoints/, stages/) move in, the working directory out, the finished one in. Each instant
    is recoverable (recover_publish) and has a fault point for the kill-anywhere tests."""
    fault_point("publish:files")
    write_json(staged.run_json, run_info)
    _write_card(staged, rundir.path.name)
    fault_point("publish:card")
    write_text(staged / PUBLISH_READY, now_iso())
    fault_point("publish:ready")
    for name in CARRIED:
        if (rundir / name).exists():
            os.rename(rundir / name, staged / name)
    fault_point("publish:checkpoints-moved")
    if rundir.old.exists():
        shutil.rmtree(rundir.old)
    os.rename(rundir.path, rundir.old)
    fault_point("publish:old-moved")
    os.rename(staged.path, rundir.path)
    fault_point("publish:swapped")
    (rundir / PUBLISH_READY).unlink(missing_ok=True)
    shutil.rmtree(rundir.old, ignore_errors=True)


def _write_card(staged: RunDir, name: str) -> None:
    """The model card, rendered from the staged run directory. A card that cannot be rendered never
    costs the run: the reason is logged and `gemma-hf card RUN_DIR` renders it later."""
    from gemma_hf.hub import CardError, write_card

    try:
        write_card(staged.path, name=name)
    except CardError as err:
        log.warning("the model card could not be rendered (%s); the run is published without README.md. "
                    "Render it with `gemma-hf card RUN_DIR` once fixed.", err)


def _ensure_generation_stops(directory: Path, tokenizer) -> None:
    """generation_config.json must list <end_of_turn> among eos_token_id (also for adapter-only roots)."""
    from transformers import GenerationConfig

    from gemma_hf.chat import stop_token_ids

    path = directory / "generation_config.json"
    config = GenerationConfig.from_pretrained(str(directory)) if path.exists() else GenerationConfig()
    current = config.eos_token_id
    current = [] if current is None else [current] if isinstance(current, int) else list(current)
    wanted = list(dict.fromkeys([*stop_token_ids(tokenizer), *current]))
    if wanted != current or not path.exists():
        config.eos_token_id = wanted
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.save_pretrained(str(directory))


__all__ = ["Run", "RunResult", "run_recipe", "claim_output_dir", "build_model", "load_tokenizer", "peft_config_for",
           "set_generation_stops", "recover_publish", "read_mixture", "PUBLISH_READY"]
