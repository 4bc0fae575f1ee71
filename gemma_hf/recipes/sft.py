"""Supervised fine-tuning of a Gemma model with TRL's SFTTrainer, from a checked recipe.

The order matters and is the contract of ``gemma-hf sft``:

1. the recipe is loaded and checked (gemma_hf.recipes.config) -- nothing is written before;
2. the output directory is checked (a finished run is never overwritten; an unfinished one needs
   ``--resume``), every process agrees, then the main process marks the directory as a run;
3. data: the mixture is read, each record rendered in the family's chat format and tokenized by us
   into ``input_ids`` + ``assistant_masks`` (see tokenization.py);
4. the model (our GemmaHFForCausalLM, from a checkpoint or a preset), LoRA/QLoRA via PEFT;
5. TRL's SFTTrainer trains, checkpointing into ``output_dir/checkpoints``;
6. the run directory is published atomically (rundir.py).

Library behaviours relied on (TRL 1.16 / transformers 5; easy to break on upgrades):
- SFTTrainer treats a dataset with an ``input_ids`` column as already tokenized: it skips its own
  chat templating, builds ``labels`` from an ``assistant_masks`` column (-100 where 0) and drops the
  column, truncates to ``max_length`` (keep_start), and packs (bfd) if asked
  (``SFTTrainer._prepare_dataset``). We therefore pass ``assistant_only_loss=False`` to TRL: its own
  option requires a conversational dataset and ``{% generation %}`` template markers.
- With ``packing`` (bfd), TRL's collator is padding-free: one row, ``position_ids`` restarting at 0
  per example and no ``attention_mask``. Our model builds its masks with transformers'
  ``create_causal_mask``/``create_sliding_window_causal_mask``, which detect packed sequences from
  such position_ids (``find_packed_sequence_indices``) when the mask is None and there is no cache,
  so examples never attend across their boundaries with eager or sdpa (tests/test_sft_packing.py).
- SFTTrainer computes the loss with a fused LM head outside our forward (``add_fused_lm_head``,
  reading ``config.final_logit_softcapping``). On CPU its torch fallback scores every position
  and makes ~30 passes over the [tokens, 256k] logits: 3-5x slower than our model's own loss
  (gemma_hf.model.loss: chunked soft-capped cross-entropy over the labelled positions only,
  exact). :class:`GemmaSFTTrainer` therefore takes the loss from the model's forward, with TRL's
  normalisation (num_items_in_batch, x num_processes under average_tokens_across_devices); TRL's
  entropy and mean_token_accuracy metrics, which need the fused head's outputs, are not logged.
- The Trainer writes ``trainer_state.json`` last in a checkpoint (completeness test in rundir.py) and
  on resume restores RNG states and skips the batches already seen.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import Problem, Recipe, RecipeError
from . import rundir

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    eval_loss_before: float | None
    eval_loss_after: float | None
    samples: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    global_step: int = 0


# --------------------------------------------------------------------------------------------
# Output directory checks (before anything is loaded or written)
# --------------------------------------------------------------------------------------------


def check_output_dir(recipe: Recipe, resume: bool) -> None:
    """Raise RecipeError (exit 2) if this run may not use output_dir."""
    output_dir = recipe.output_dir
    state = rundir.describe_output_dir(output_dir)
    if state == "finished":
        raise RecipeError(recipe.source, [Problem(
            "output_dir", f"{output_dir} already holds a finished run", "choose a new output_dir (or remove it)",
            recipe.origins.get("output_dir", ""))])
    if state == "foreign":
        raise RecipeError(recipe.source, [Problem(
            "output_dir", f"{output_dir} exists and is not a gemma-hf run directory",
            "choose a new output_dir (or empty it)", recipe.origins.get("output_dir", ""))])
    if state == "unfinished" and not resume:
        checkpoint, _ = rundir.latest_complete_checkpoint(output_dir / rundir.CHECKPOINTS)
        where = f" (latest complete checkpoint: {checkpoint.name})" if checkpoint else " (no complete checkpoint yet)"
        raise RecipeError(recipe.source, [Problem(
            "output_dir", f"{output_dir} holds an unfinished run{where}",
            "pass --resume to continue it, or remove the directory to start again", recipe.origins.get("output_dir", ""))])


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def tokenize_split(dataset, tokenizer, recipe: Recipe, name: str):
    """messages -> input_ids (+ assistant_masks); applies long_examples. Returns (dataset, stats)."""
    from .tokenization import encode_with_assistant_mask

    family, assistant_only = recipe.family, recipe.gemma.assistant_only_loss

    def encode(record):
        input_ids, mask = encode_with_assistant_mask(tokenizer, record["messages"], family)
        out = {"input_ids": input_ids}
        if assistant_only:
            out["assistant_masks"] = mask
        return out

    tokenized = dataset.map(encode, remove_columns=dataset.column_names,
                            desc=f"Tokenizing {name} ({family} chat format)")
    max_length = recipe.training.max_length
    stats = {"examples": len(tokenized), "long": 0, "dropped": 0}
    if max_length is not None:
        lengths = [len(ids) for ids in tokenized["input_ids"]]
        stats["long"] = sum(length > max_length for length in lengths)
        if recipe.gemma.long_examples == "drop" and stats["long"] and name == "train":
            keep = [i for i, length in enumerate(lengths) if length <= max_length]
            tokenized = tokenized.select(keep)
            stats["dropped"] = stats["long"]
    if len(tokenized) == 0:
        raise RecipeError(recipe.source, [Problem(
            "max_length", f"every {name} example is longer than max_length={max_length} and was dropped",
            "raise max_length, or set long_examples: truncate")])
    return tokenized, stats


def check_bos(dataset, bos_id: int, name: str) -> None:
    """Exactly one <bos> per example, first -- also inside packed rows (per seq_lengths segment)."""
    from gemma_hf.chat import check_single_bos

    has_lengths = "seq_lengths" in dataset.column_names
    for row, record in enumerate(dataset):
        ids = record["input_ids"]
        segments = [ids]
        if has_lengths:
            segments, start = [], 0
            for length in record["seq_lengths"]:
                segments.append(ids[start:start + length])
                start += length
        for segment in segments:
            try:
                check_single_bos(segment, bos_id)
            except ValueError as err:
                raise RuntimeError(f"{name} example {row} after TRL's preparation: {err}") from None


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def build_model(recipe: Recipe):
    import torch
    from transformers import set_seed
    from transformers.trainer_utils import enable_full_determinism

    from gemma_hf import GemmaHFForCausalLM

    m, t = recipe.model, recipe.training
    # Seed before the weights exist: a preset's random init and LoRA's init must be reproducible.
    if t.full_determinism:
        enable_full_determinism(t.seed)
    else:
        set_seed(t.seed)
    dtype = None if m.dtype in (None, "auto") else getattr(torch, m.dtype)
    if recipe.model_path is None:  # random weights of a preset architecture
        model = GemmaHFForCausalLM._from_config(recipe.architecture, attn_implementation=m.attn_implementation or "eager")
        return model.to(dtype) if dtype is not None else model
    kwargs = {"dtype": dtype if dtype is not None else "auto"}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if not Path(recipe.model_path).exists():
        kwargs["revision"] = m.model_revision
    if m.load_in_4bit or m.load_in_8bit:
        from trl import get_kbit_device_map, get_quantization_config

        kwargs["quantization_config"] = get_quantization_config(m)
        kwargs["device_map"] = get_kbit_device_map()
    return GemmaHFForCausalLM.from_pretrained(recipe.model_path, **kwargs)


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


def peft_config_for(recipe: Recipe, tokenizer):
    if not recipe.model.use_peft:
        return None
    from trl import get_peft_config

    config = get_peft_config(recipe.model)
    if config.target_modules is None:
        config.target_modules = "all-linear"  # PEFT has no default target list for model_type gemma_hf
    if recipe.gemma.lora_trainable_tokens:
        # PEFT's TrainableTokens: a delta on these embedding rows; with tied embeddings the lm_head rows
        # follow (and gemma_hf's loss reads lm_head.weight, which includes the delta).
        ids = tokenizer.convert_tokens_to_ids(list(recipe.gemma.lora_trainable_tokens))
        config.trainable_token_indices = {"embed_tokens": sorted(set(ids))}
    return config


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run_sft(recipe: Recipe, resume: bool = False) -> RunResult:
    from accelerate import PartialState
    from transformers import AutoTokenizer

    import gemma_hf
    from .data import load_mixture

    started, start = rundir.now_iso(), time.time()
    state = PartialState()
    output_dir = recipe.output_dir.resolve()
    recipe.output_dir = output_dir
    checkpoints = output_dir / rundir.CHECKPOINTS
    if state.is_main_process:
        rundir.recover_publish(output_dir)
    state.wait_for_everyone()
    check_output_dir(recipe, resume)
    state.wait_for_everyone()  # every process has looked before the main process writes

    resume_from, incomplete = rundir.latest_complete_checkpoint(checkpoints) if resume else (None, [])
    created_dir = not output_dir.exists()

    tokenizer = AutoTokenizer.from_pretrained(recipe.tokenizer_path)
    with state.main_process_first():
        train_raw, eval_raw, loaded = load_mixture(recipe.data, recipe.family, recipe.training.seed)
        train_set, train_stats = tokenize_split(train_raw, tokenizer, recipe, "train")
        eval_set, eval_stats = (tokenize_split(eval_raw, tokenizer, recipe, "eval") if eval_raw is not None
                                else (None, None))
    model = build_model(recipe)
    set_generation_stops(model, tokenizer)

    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_json(output_dir / rundir.MARKER, {
            "started": started, "pid": os.getpid(), "recipe": str(recipe.source), "resume_from": str(resume_from)})
        for path in incomplete:  # a checkpoint the previous run was killed while writing
            log.warning("removing incomplete checkpoint %s", path)
            shutil.rmtree(path, ignore_errors=True)
    state.wait_for_everyone()

    try:
        before = _samples_before(recipe, state, model, tokenizer, resume_from)
        trainer = _make_trainer(recipe, model, tokenizer, train_set, eval_set, resume_from)
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        eval_before, eval_after = _eval_losses(recipe, state, trainer, eval_set)
    except BaseException:
        if state.is_main_process and created_dir and not rundir.list_checkpoints(checkpoints):
            shutil.rmtree(output_dir, ignore_errors=True)  # nothing worth keeping: leave no half run behind
        raise

    run_info = {
        "method": "sft",
        "base_model": recipe.model_path or f"preset:{recipe.gemma.preset}",
        "family": recipe.family,
        "datasets": [
            {"path": item.source.location, "split": item.spec.split, "fraction": item.spec.fraction,
             "num_examples": item.num_examples}
            for item in loaded
        ],
        "num_train_examples": len(train_set),
        "num_eval_examples": len(eval_set) if eval_set is not None else 0,
        "examples_longer_than_max_length": {"train": train_stats["long"], "eval": (eval_stats or {}).get("long", 0),
                                            "train_handling": recipe.gemma.long_examples, "eval_handling": "truncate"},
        "assistant_only_loss": recipe.gemma.assistant_only_loss,
        "lora": bool(recipe.model.use_peft),
        "global_step": trainer.state.global_step,
        "num_processes": state.num_processes,
        "resumed_from": resume_from.name if resume_from else None,
        "started": started,
        "gemma_hf_version": gemma_hf.__version__,
    }
    samples = _publish(recipe, state, trainer, tokenizer, run_info, eval_before, eval_after, before, start)
    return RunResult(output_dir, eval_before, eval_after, samples, time.time() - start, trainer.state.global_step)


def make_trainer_class():
    import torch
    from trl import SFTTrainer

    class GemmaSFTTrainer(SFTTrainer):
        """SFTTrainer taking the loss from the model's own forward (see the module docstring)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {**inputs, "use_cache": False}
            outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
            loss = outputs.loss
            # Like TRL/Trainer: num_items_in_batch counts every rank's tokens and DDP averages gradients.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            if self.model.training:  # TRL's token counter (num_tokens in the logs)
                if "attention_mask" in inputs:
                    local = inputs["attention_mask"].sum()
                else:  # padding-free rows: every position is a token
                    local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
                self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item()
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return (loss, outputs) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

    return GemmaSFTTrainer


def _samples_before(recipe: Recipe, state, model, tokenizer, resume_from) -> list[dict]:
    """The sample prompts answered by the base model (main process; kept for a resumed run)."""
    from .sampling import answer_prompts

    prompts = recipe.gemma.sample_prompts or []
    path = recipe.output_dir / ".samples_before.json"
    if not prompts or not state.is_main_process:
        return []
    if resume_from is not None and path.is_file():
        return json.loads(path.read_text())
    if not getattr(model, "hf_device_map", None):  # quantized models are placed already
        model.to(state.device)
    before = [r.to_dict() for r in answer_prompts(model, tokenizer, prompts, recipe.family,
                                                   recipe.gemma.sample_max_new_tokens)]
    path.write_text(json.dumps(before))
    return before


def _make_trainer(recipe: Recipe, model, tokenizer, train_set, eval_set, resume_from):
    args = recipe.training
    # Held-out loss before training: the Trainer's eval_on_start (logged at step 0 in metrics.jsonl);
    # a resumed run reads it back from there instead of evaluating again.
    if "eval_on_start" not in recipe.values:
        args.eval_on_start = bool(eval_set is not None and recipe.gemma.eval_before_training and resume_from is None)
    trainer = make_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=peft_config_for(recipe, tokenizer),
        callbacks=[rundir.MetricsCallback(recipe.output_dir / rundir.METRICS)],
    )
    check_bos(trainer.train_dataset, tokenizer.bos_token_id, "train")
    if eval_set is not None:
        check_bos(trainer.eval_dataset, tokenizer.bos_token_id, "eval")
    return trainer


def _eval_losses(recipe: Recipe, state, trainer, eval_set) -> tuple[float | None, float | None]:
    if eval_set is None:
        return None, None
    history = rundir.read_metrics(recipe.output_dir / rundir.METRICS) if state.is_main_process else []
    first = next((r for r in history if "eval_loss" in r), None)
    before = first["eval_loss"] if first is not None and first.get("step") == 0 else None
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    if evals and evals[-1].get("step") == trainer.state.global_step:
        after = evals[-1]["eval_loss"]
    else:
        after = trainer.evaluate()["eval_loss"]
    return before, after


def _publish(recipe, state, trainer, tokenizer, run_info, eval_before, eval_after, before, start) -> list[dict]:
    """Write the finished run into .{name}.publish, move the checkpoints in, swap it into place.

    Returns the sample answers (before/after) written to eval.json.
    """
    from .sampling import answer_prompts

    output_dir = recipe.output_dir
    staged = rundir.publish_dir(output_dir)
    if state.is_main_process:
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
    state.wait_for_everyone()

    final_model = trainer.model
    final_model_note = "full fine-tune"
    if recipe.model.use_peft:
        trainer.save_model(str(staged / "adapter"))  # every process: FSDP/DeepSpeed gather here
        state.wait_for_everyone()
        if state.is_main_process:
            if recipe.gemma.merge_lora:
                final_model = merge_adapter(recipe, trainer.model, staged / "adapter")
                final_model.save_pretrained(str(staged))
                final_model_note = "LoRA merged into the base weights (the adapter is in adapter/)"
            else:
                for item in (staged / "adapter").iterdir():
                    shutil.copy2(item, staged / item.name)
                final_model_note = "LoRA adapter only (merge_lora: false); the base model is run.json's base_model"
    else:
        trainer.save_model(str(staged))
    state.wait_for_everyone()
    if not state.is_main_process:
        state.wait_for_everyone()
        return []

    import transformers
    import trl

    samples = []
    prompts = recipe.gemma.sample_prompts or []
    if prompts:
        after = answer_prompts(final_model, tokenizer, prompts, recipe.family, recipe.gemma.sample_max_new_tokens)
        samples = [{"prompt": p, "before": b, "after": a.to_dict()} for p, b, a in zip(prompts, before, after)]

    for leftover in ("training_args.bin", "README.md", "adapter/training_args.bin", "adapter/README.md"):
        (staged / leftover).unlink(missing_ok=True)  # Trainer artefacts, not part of the model
    tokenizer.save_pretrained(str(staged))
    _ensure_generation_stops(staged, tokenizer)
    (staged / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    metrics = rundir.read_metrics(output_dir / rundir.METRICS)
    (staged / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in metrics), encoding="utf-8")
    rundir.plot_losses(metrics, staged / "plots" / "loss.png",
                       f"SFT {run_info['base_model'].split('/')[-1]} ({recipe.family})")
    if eval_before is not None or eval_after is not None or samples:
        rundir.write_json(staged / "eval.json", {
            "eval_loss_before": eval_before,
            "eval_loss_after": eval_after,
            "num_eval_examples": run_info["num_eval_examples"],
            "samples": samples,
        })
    run_info.update({
        "final_model": final_model_note,
        "finished": rundir.now_iso(),
        "wall_time_s": round(time.time() - start, 1),
        "transformers_version": transformers.__version__,
        "trl_version": trl.__version__,
    })
    rundir.write_json(staged / rundir.RUN_JSON, run_info)  # last: marks the run finished
    # The swap: checkpoints in, working directory out, finished directory in.
    checkpoints = output_dir / rundir.CHECKPOINTS
    if checkpoints.exists():
        os.rename(checkpoints, staged / rundir.CHECKPOINTS)
    old = rundir.old_dir(output_dir)
    if old.exists():
        shutil.rmtree(old)
    os.rename(output_dir, old)
    os.rename(staged, output_dir)
    shutil.rmtree(old, ignore_errors=True)
    state.wait_for_everyone()
    return samples


def merge_adapter(recipe: Recipe, model, adapter_dir: Path):
    """The base model with the LoRA weights merged in.

    In memory when the base is a plain (unquantized, unsharded) model; otherwise the base is
    reloaded unquantized in the recipe's dtype and the saved adapter merged into it (QLoRA).
    """
    m = recipe.model
    quantized = m.load_in_4bit or m.load_in_8bit
    if not quantized:
        return model.merge_and_unload()
    import torch
    from peft import PeftModel

    from gemma_hf import GemmaHFForCausalLM

    if recipe.model_path is None:
        raise RuntimeError("cannot merge a QLoRA adapter into a preset's random weights: there is no base checkpoint")
    dtype = torch.float32 if m.dtype in (None, "auto") else getattr(torch, m.dtype)
    base = GemmaHFForCausalLM.from_pretrained(recipe.model_path, dtype=dtype)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


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
