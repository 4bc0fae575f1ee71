"""Offline distillation: the student learns the teacher's cached sparse targets (gemma_hf.distillation
.cache), streamed shard by shard, so memory does not grow with the dataset.

The loss at each targeted position is the cache mode's estimator of the cross-entropy against the
temperature-scaled teacher distribution (``sampled``: -(1/K) Σ_k log p_S(id_k), unbiased; ``topk``:
the renormalised top-K, biased), with the student at the same temperature; ``nll_weight`` w mixes
in the next-token loss: (1 - w) distillation + w NLL (one pass: the next token is an extra target).

Library behaviour relied on (transformers 5): a Trainer with an IterableDataset needs max_steps
and re-iterates the dataset when an epoch ends; on resume it skips the batches already seen by
re-iterating them (cheap here: shards are read, no model runs).
"""

from __future__ import annotations

import torch
from torch.utils.data import IterableDataset

from .cache import CacheReader, collate


class CacheDataset(IterableDataset):
    """The cache's examples, in order, one shard in memory at a time (a DataLoader with one worker)."""

    def __init__(self, directory):
        self.directory = directory
        self.reader = CacheReader(directory)

    def __iter__(self):
        yield from CacheReader(self.directory)

    def __len__(self):
        return len(self.reader)


def make_offline_trainer(run, Trainer, *, model, args, **kwargs):
    """A Trainer whose loss is the sparse cross-entropy against the cached teacher targets."""
    from .losses import mix_with_next_token, sparse_cross_entropy

    distill = run.recipe.method_args
    reader = CacheReader(distill.cache_dir)
    mode, temperature = reader.mode, reader.temperature
    pad_id = run.tokenizer.pad_token_id
    kwargs.pop("train_dataset", None)
    args.remove_unused_columns = False
    args.dataloader_num_workers = 0  # one reader: each worker would read every shard
    run.info["cache"] = {"K": reader.K, "mode": mode, "temperature": temperature, "examples": len(reader),
                         "positions": reader.num_positions, "bytes_per_target": reader.bytes_per_target()}

    def collator(examples):
        if isinstance(examples[0], dict):  # the held-out split (data completions): no cached targets
            from .trainer import PromptCompletionCollator

            return PromptCompletionCollator(pad_id)(examples)
        return collate(examples, pad_id, mode)

    class OfflineDistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "prompt_ids" in inputs:  # held-out evaluation: the next-token loss on the data's completions
                from .trainer import completion_hidden, head_of

                hidden = completion_hidden(model, inputs)
                weight, cap = head_of(model)
                ids = inputs["completion_ids"]
                loss = sparse_cross_entropy(hidden, weight, ids.unsqueeze(-1),
                                            torch.ones_like(ids, dtype=torch.float32).unsqueeze(-1),
                                            inputs["completion_mask"], temperature=1.0, softcap=cap)
                return (loss, None) if return_outputs else loss
            from .trainer import head_of

            backbone = model.base_model.model.model if hasattr(model, "peft_config") else model.model
            hidden = backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                              use_cache=False).last_hidden_state
            weight, cap = head_of(model)
            target_ids, target_weights = inputs["target_ids"], inputs["target_weights"]
            if distill.nll_weight:
                next_ids = torch.roll(inputs["input_ids"], shifts=-1, dims=1)
                target_ids, target_weights = mix_with_next_token(target_ids, target_weights, next_ids,
                                                                 distill.nll_weight)
            loss = sparse_cross_entropy(hidden, weight, target_ids, target_weights, inputs["target_mask"],
                                        temperature=temperature, softcap=cap)
            return (loss, None) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

    return OfflineDistillTrainer(model=model, args=args, train_dataset=CacheDataset(distill.cache_dir),
                                 data_collator=collator, **kwargs)


__all__ = ["CacheDataset", "make_offline_trainer"]
