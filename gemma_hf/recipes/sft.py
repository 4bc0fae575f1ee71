"""Supervised fine-tuning (``gemma-hf sft``): TRL's SFTTrainer on conversations in the family's chat
format, the loss on the model's turns only.

Library behaviours relied on (TRL 1.16 / transformers 5; easy to break on upgrades):
- SFTTrainer treats a dataset with an ``input_ids`` column as already tokenized: it skips its own
  chat templating, builds ``labels`` from an ``assistant_masks`` column (-100 where 0) and drops the
  column, truncates to ``max_length`` (keep_start), and packs (bfd) if asked
  (``SFTTrainer._prepare_dataset``). We therefore pass ``assistant_only_loss=False`` to TRL: its own
  option requires a conversational dataset and ``{% generation %}`` template markers.
- With ``packing`` (bfd), TRL's collator is padding-free: one row, ``position_ids`` restarting at 0
  per example and no ``attention_mask``. Our model builds its masks with transformers'
  ``create_causal_mask``/``create_sliding_window_causal_mask``, which detect packed sequences from
  such position_ids when the mask is None and there is no cache, so examples never attend across
  their boundaries with eager or sdpa (tests/test_sft_packing.py).
- SFTTrainer computes the loss with a fused LM head outside our forward (``add_fused_lm_head``,
  reading ``config.final_logit_softcapping``). On CPU its torch fallback scores every position
  and makes ~30 passes over the [tokens, 256k] logits: 3-5x slower than our model's own loss
  (gemma_hf.model.loss: chunked soft-capped cross-entropy over the labelled positions only,
  exact). :class:`GemmaSFTTrainer` therefore takes the loss from the model's forward
  (``return_logits=False``: never the [B, T, V] logits, in evaluation too), with TRL's
  normalisation (num_items_in_batch, x num_processes under average_tokens_across_devices); TRL's
  entropy and mean_token_accuracy metrics, which need the fused head's outputs, are not logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gemma_hf.chat import check_single_bos
from gemma_hf.tokenization import encode_with_assistant_mask

from .methods import Method
from .problems import Problem, RecipeError
from .schema import SampleArguments


@dataclass
class SFTArguments(SampleArguments):
    assistant_only_loss: bool = field(
        default=True,
        metadata={
            "help": "Loss on model-turn tokens only (their text, <end_of_turn>, and the final <eos> for Gemma 2/3). "
            "false: loss on every token."
        },
    )
    long_examples: str = field(
        default="truncate",
        metadata={
            "help": "Training examples longer than max_length: truncate (keep the start, as TRL does; the model "
            "never sees their end of turn) or drop them (so every trained example ends its turn). Held-out examples "
            "are always kept (truncated).",
            "choices": ["truncate", "drop"],
        },
    )


class SFT(Method):
    name = "sft"
    title = "supervised fine-tuning (SFT)"
    help = "supervised fine-tuning from a YAML recipe (TRL SFTTrainer)"
    about = ("Supervised fine-tuning of a Gemma model (TRL SFTTrainer) on conversations rendered in the family's "
             "chat format, the loss on the model's turns.")
    data_format = "conversation"
    head = "causal-lm"
    trainer_config = "trl:SFTConfig"
    arguments = SFTArguments
    refused_keys = {
        "completion_only_loss": "gemma_hf tokenizes the chat itself; which tokens carry the loss is `assistant_only_loss`.",
    }
    claimed_keys = frozenset({"assistant_only_loss"})
    streams = True

    def check(self, c) -> None:
        t = c.recipe.training
        if t.packing and t.max_length is None:
            c.error("packing", "packing needs max_length (the length of a packed row)", "set max_length, e.g. 2048")
        eval_packing = t.packing if t.eval_packing is None else t.eval_packing
        if (t.packing or eval_packing) and t.packing_strategy != "bfd":
            c.error("packing_strategy", f"{t.packing_strategy!r} splits examples across rows, so a row would start "
                    "without its <bos> (Gemma needs exactly one <bos> per example)",
                    "use packing_strategy: bfd (whole examples per row; longer ones are truncated)")
        if t.padding_free and not t.packing and t.max_length is not None:
            c.error("padding_free", "padding-free batches without packing are not truncated to max_length (TRL)",
                    "set packing: true (padding-free packing), or max_length: null")
        if t.truncation_mode != "keep_start":
            c.error("truncation_mode", f"{t.truncation_mode!r} cuts the start of long examples, dropping their <bos>",
                    "use truncation_mode: keep_start")

    def prepare(self, run, dataset, split: str):
        family, assistant_only = run.family, run.recipe.method_args.assistant_only_loss
        tokenizer = run.tokenizer

        def encode(record):
            input_ids, mask = encode_with_assistant_mask(tokenizer, record["messages"], family)
            return {"input_ids": input_ids, **({"assistant_masks": mask} if assistant_only else {})}

        columns = ["input_ids", *(["assistant_masks"] if assistant_only else [])]
        tokenized = run.map(dataset, encode, f"Tokenizing {split} ({family} chat format)", int_lists=columns)
        max_length = run.recipe.training.max_length
        if run.streamed(tokenized):  # streaming: the same policies, as lazy filters (nothing is counted ahead)
            tokenized, stats = run.stream_long_examples(tokenized, split, lambda example: len(example["input_ids"]))
            if assistant_only and max_length is not None:
                tokenized = tokenized.filter(lambda example: 1 in example["assistant_masks"][:max_length])
            return tokenized, stats
        lengths = [len(ids) for ids in tokenized["input_ids"]]
        # Truncation of long examples is TRL's (keep_start, in SFTTrainer._prepare_dataset).
        tokenized, stats = run.apply_long_examples(tokenized, split, lengths, truncate=None)
        if assistant_only and max_length is not None:
            # An example whose answer starts at or after max_length keeps no trained token once
            # truncated: it would add nothing (or a NaN loss, if a whole batch were such).
            empty = [i for i, mask in enumerate(tokenized["assistant_masks"]) if 1 not in mask[:max_length]]
            if empty:
                stats["no_answer_within_max_length"] = len(empty)
                if len(empty) == len(tokenized):
                    raise RecipeError(run.recipe.source, [Problem(
                        "max_length", f"max_length={max_length} is shorter than every {split} example's prompt: no "
                        "answer token would be trained or evaluated", "raise max_length",
                        run.recipe.origin("max_length"))])
                tokenized = tokenized.select(sorted(set(range(len(tokenized))) - set(empty)))
        return tokenized, stats

    def make_trainer(self, run, model, train_set, eval_set):
        trainer = _trainer_class()(**run.trainer_kwargs(model, train_set, eval_set))
        bos = run.tokenizer.bos_token_id
        if run.streamed(trainer.train_dataset):
            # Checked as the examples stream past: the Trainer builds its dataloader from train_dataset in train().
            trainer.train_dataset = trainer.train_dataset.map(_bos_checker(bos, "train"), with_indices=True)
        else:
            check_bos(trainer.train_dataset, bos, "train")
        if eval_set is not None:
            check_bos(trainer.eval_dataset, bos, "eval")
        return trainer

    def run_info(self, run) -> dict:
        return {"assistant_only_loss": run.recipe.method_args.assistant_only_loss}

    def summary(self, results: dict) -> list[str]:
        before, after = results.get("eval_loss_before"), results.get("eval_loss_after")
        if before is None and after is None:
            return []
        show = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        return [f"held-out loss: {show(before)} -> {show(after)}"]


def check_bos(dataset, bos_id: int, name: str) -> None:
    """Exactly one <bos> per example, first -- also inside packed rows (per seq_lengths segment)."""
    check = _bos_checker(bos_id, name)
    for row, record in enumerate(dataset):
        check(record, row)


def _bos_checker(bos_id: int, name: str):
    """check(record, row): raises unless each example of the row (a packed row: each seq_lengths
    segment) has exactly one <bos>, first; returns no new columns (a stream maps it lazily)."""
    def check(record, row) -> dict:
        ids = record["input_ids"]
        segments = [ids]
        if record.get("seq_lengths") is not None:
            segments, start = [], 0
            for length in record["seq_lengths"]:
                segments.append(ids[start:start + length])
                start += length
        for segment in segments:
            try:
                check_single_bos(segment, bos_id)
            except ValueError as err:
                raise RuntimeError(f"{name} example {row} after TRL's preparation: {err}") from None
        return {}
    return check


def _trainer_class():
    import torch
    from trl import SFTTrainer

    class GemmaSFTTrainer(SFTTrainer):
        """SFTTrainer taking the loss from the model's own forward (see the module docstring)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {**inputs, "use_cache": False}
            outputs = model(**inputs, num_items_in_batch=num_items_in_batch, return_logits=False)
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
            from gemma_hf.trainer_utils import loss_only_prediction_step

            return loss_only_prediction_step(self, model, inputs, prediction_loss_only, ignore_keys)

    return GemmaSFTTrainer


METHOD = SFT()
