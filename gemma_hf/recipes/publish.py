"""Publishing a run, written once: every method's run directory (training runs, WARP, evaluations,
the pipeline's root) is assembled and swapped into place by this protocol.

1. :func:`open_staging`: the sibling staging directory ``.{name}.publish/`` is emptied and created;
2. the caller fills it (the final model, tokenizer, recipe.yaml, metrics, plots, eval.json; for a
   training run :func:`publish_training` does it), then :func:`finish`:
3. run.json (the run's record: :func:`record` writes its common block), the card, the ready marker
   ``.publish-ready``;
4. the swap: the working directory's carried directories (checkpoints/, stages/, the pipeline's
   logs/ and manifest) move into the staging directory, the working directory moves to
   ``.{name}.old``, the staging directory to ``output_dir``.

A kill at any instant leaves either the unfinished run (resumed with ``--resume``) or a complete
staging directory that :func:`recover` swaps in on the next start; a staging directory without
the ready marker is discarded. Each step has a fault point (gemma_hf.faults) for the kill-anywhere
tests: ``publish:model``, ``publish:files``, ``publish:card``, ``publish:ready``,
``publish:checkpoints-moved``, ``publish:old-moved``, ``publish:swapped``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gemma_hf
from gemma_hf.chat import install_chat_template, stop_token_ids
from gemma_hf.faults import fault_point
from gemma_hf.hub import CardError, write_card
from gemma_hf.io import atomic_directory
from gemma_hf.references import identity
from gemma_hf.sampling import answer_prompts
from gemma_hf.rundir import CARRIED, RunDir, now_iso, read_metrics, weight_files, write_json, write_metrics, write_text

from .callbacks import TrainingDiverged
from .plots import plot_losses
from .runtime import Run, load_model, merge_adapter
from .schema import shareable

log = logging.getLogger(__name__)
PUBLISH_READY = ".publish-ready"


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------


def open_staging(rundir: RunDir) -> RunDir:
    """The empty staging directory of ``rundir`` (a leftover of an earlier attempt is removed)."""
    staged = rundir.staging
    if staged.path.exists():
        shutil.rmtree(staged.path)
    staged.path.mkdir(parents=True)
    return staged


def record(method: str, title: str, started: str, start_time: float, **body: Any) -> dict[str, Any]:
    """run.json: ``method`` and its ``title`` (what the card says the run did), the method's own
    entries, then the common block (times, versions)."""
    import transformers
    import trl

    return {"method": method, "title": title, **body, "started": started, "finished": now_iso(),
            "wall_time_s": round(time.time() - start_time, 1), "gemma_hf_version": gemma_hf.__version__,
            "transformers_version": transformers.__version__, "trl_version": trl.__version__}


def model_card(staged: RunDir, name: str) -> None:
    """The model card, rendered from the staged run directory. A card that cannot be rendered never
    costs the run: the reason is logged and `gemma-hf card RUN_DIR` renders it later."""
    try:
        write_card(staged.path, name=name)
    except CardError as err:
        log.warning("the model card could not be rendered (%s); the run is published without README.md. "
                    "Render it with `gemma-hf card RUN_DIR` once fixed.", err)


def finish(rundir: RunDir, staged: RunDir, run_info: dict, *, card: Callable[[RunDir, str], None] = model_card,
           carried: tuple[str, ...] = CARRIED) -> None:
    """The last steps of every publish: run.json (the run's record, written last of its files), the
    card, the ready marker, then the swap. Each instant is recoverable (:func:`recover`)."""
    fault_point("publish:files")
    write_json(staged.run_json, run_info)
    card(staged, rundir.path.name)
    fault_point("publish:card")
    write_text(staged / PUBLISH_READY, now_iso())
    fault_point("publish:ready")
    _swap(rundir, staged, carried)


def _swap(rundir: RunDir, staged: RunDir, carried: tuple[str, ...]) -> None:
    for name in carried:
        if (rundir / name).exists() and not (staged / name).exists():
            os.rename(rundir / name, staged / name)
    fault_point("publish:checkpoints-moved")
    if rundir.old.exists():
        shutil.rmtree(rundir.old)
    if rundir.path.exists():
        os.rename(rundir.path, rundir.old)
    fault_point("publish:old-moved")
    os.rename(staged.path, rundir.path)
    fault_point("publish:swapped")
    (rundir / PUBLISH_READY).unlink(missing_ok=True)
    shutil.rmtree(rundir.old, ignore_errors=True)


def recover(rundir: RunDir, carried: tuple[str, ...] = CARRIED) -> bool:
    """Complete or undo a publish that a kill interrupted; True if it completed one.

    A staging directory holding the ready marker (and run.json) is complete: the swap is finished
    (carried directories still in the working directory move over first). One without the marker is
    discarded and the run stays unfinished. Leftovers of a finished swap (the old working directory,
    the ready marker) are removed."""
    staged = rundir.staging
    done = False
    if staged.path.exists():
        if (staged / PUBLISH_READY).is_file() and staged.is_finished() and not rundir.is_finished():
            _swap(rundir, staged, carried)
            done = True
        else:
            shutil.rmtree(staged.path)
    if rundir.is_finished():
        (rundir / PUBLISH_READY).unlink(missing_ok=True)
        if rundir.old.exists():
            shutil.rmtree(rundir.old)
    return done


def discard_unready(rundir: RunDir) -> None:
    """Remove a staging directory that never became ready: a publish refused or failed on the way
    (non-finite results, a full disk, an error in a method's hook) leaves nothing beside the run."""
    staged = rundir.staging
    if staged.path.exists() and not (staged / PUBLISH_READY).is_file():
        shutil.rmtree(staged.path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Pieces of a publish
# --------------------------------------------------------------------------------------------

MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "special_tokens_map.json", "chat_template.jinja")


def copy_model(src: Path, dst: Path, into_existing: bool = False) -> None:
    """The model files of a model or run directory (weights, config, code, tokenizer, generation config),
    written atomically unless ``into_existing`` (a staging directory)."""
    names = [*weight_files(src), *MODEL_FILES, *[p.name for p in src.glob("*.py")]]

    def copy(into: Path) -> None:
        for name in dict.fromkeys(names):
            if (src / name).is_file():
                shutil.copy2(src / name, into / name)

    if into_existing:
        copy(dst)
        return
    with atomic_directory(dst) as tmp:
        copy(tmp)


def link_model(src: Path, dst: Path) -> None:
    """The model files of ``src`` (and a merge's merge.json) in the existing directory ``dst``, as hard links
    when both are on one filesystem (no second copy of the weights while a run is published), else copied."""
    from gemma_hf.merging import MERGE_RECORD

    names = [*weight_files(src), *MODEL_FILES, MERGE_RECORD, *[p.name for p in src.glob("*.py")]]
    for name in dict.fromkeys(names):
        if (src / name).is_file():
            try:
                os.link(src / name, dst / name)
            except OSError:  # another filesystem, or links not allowed there
                shutil.copy2(src / name, dst / name)


def ensure_generation_stops(directory: Path, tokenizer) -> None:
    """generation_config.json must list <end_of_turn> among eos_token_id (also for adapter-only roots)."""
    from transformers import GenerationConfig

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



def check_finite_results(results: dict) -> None:
    bad = [k for k, v in results.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise TrainingDiverged(f"held-out results are not finite ({', '.join(bad)}); the run was not published. "
                               "Check the held-out data (every example needs answer tokens within max_length).")



# --------------------------------------------------------------------------------------------
# A training run's publish
# --------------------------------------------------------------------------------------------


def publish_training(run: Run, trainer, eval_set, before: dict, losses: dict, num_train: int) -> dict:
    """Publish a trained run: the final model (every process takes part in saving it), its held-out
    results after training, then the files and run.json on the main process, and the swap."""
    recipe, rundir, state = run.recipe, run.rundir, run.state
    if state.is_main_process:
        staged = open_staging(rundir)
    state.wait_for_everyone()
    staged = rundir.staging
    final_model, final_note = _save_final_model(run, trainer, staged)
    fault_point("publish:model")
    state.wait_for_everyone()
    if not state.is_main_process:
        state.wait_for_everyone()
        return {}

    final_model.eval()
    after = run.method.evaluate(run, final_model, eval_set, "after") \
        if eval_set is not None and recipe.gemma.eval_after_training else {}
    results: dict[str, Any] = dict(losses)
    for when, values in (("before", before), ("after", after)):
        results.update({f"{k}_{when}": v for k, v in values.items() if not k.startswith("_")})
    if eval_set is not None:
        results["num_eval_examples"] = len(eval_set)
    check_finite_results(results)
    prompts = getattr(recipe.method_args, "sample_prompts", None) or []
    if prompts:
        answers = answer_prompts(final_model, run.tokenizer, prompts, run.family, recipe.method_args.sample_max_new_tokens)
        results["samples"] = [{"prompt": p, "before": b, "after": a.to_dict()}
                              for p, b, a in zip(prompts, before.get("_samples", [{}] * len(prompts)), answers)]

    for leftover in ("training_args.bin", "README.md", "adapter/training_args.bin", "adapter/README.md"):
        (staged / leftover).unlink(missing_ok=True)  # Trainer artefacts, not part of the model
    install_chat_template(run.tokenizer, run.family)
    run.tokenizer.save_pretrained(str(staged.path))
    if run.method.head == "causal-lm":
        ensure_generation_stops(staged.path, run.tokenizer)
    write_text(staged.recipe, recipe.to_yaml())
    metrics = read_metrics(rundir.metrics)
    write_metrics(staged.metrics, metrics)
    base_name = recipe.model_path.rstrip("/").split("/")[-1] if recipe.model_path else recipe.gemma.preset
    plot_losses(metrics, staged.plots / "loss.png", f"{recipe.method} {base_name} ({run.family})")
    run.method.plots(run, {"before": before, "after": after}, staged.plots)
    if results:
        write_json(staged.eval_json, results)
    run_info = record(
        recipe.method, run.method.title, run.started, run.start_time,
        head=run.method.head,
        base_model=identity(recipe.model.model_name_or_path) or f"preset:{recipe.gemma.preset}",
        family=run.family,
        datasets=run.info["datasets"],
        num_train_examples=num_train,
        num_eval_examples=len(eval_set) if eval_set is not None else 0,
        examples_longer_than_max_length={split: stats for split, stats in run.stats.items()},
        lora=bool(recipe.model.use_peft),
        final_model=final_note,
        global_step=trainer.state.global_step,
        num_processes=state.num_processes,
        resumed_from=run.resume_from.name if run.resume_from else None,
        **shareable("run_info", run.method.run_info(run)),
    )
    finish(rundir, staged, run_info)
    state.wait_for_everyone()
    return results


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


