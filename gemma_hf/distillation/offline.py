"""The offline distillation trainer: the student learns the teacher's cached sparse targets (the
cache: cache.py and the modules it names), streamed shard by shard, so memory does not grow with
the dataset. The on-policy trainer is in trainer.py; the recipe picks one of the two by
``distill_mode``.

The loss at each targeted position is the cache mode's estimator of the cross-entropy against the
temperature-scaled teacher distribution (``sampled``: -(1/K) Σ_k log p_S(id_k), unbiased; ``topk``:
the renormalised top-K, biased), with the student at the same temperature; ``nll_weight`` w mixes
in the next-token loss: (1 - w) distillation + w NLL (one pass: the next token is an extra target).
Held-out evaluation is the next-token loss on the data's completions (no cached targets there).

Library behaviour relied on (transformers 5): a Trainer with an IterableDataset needs max_steps
and re-iterates the dataset when an epoch ends; on resume it skips the batches already seen by
re-iterating them (cheap here: shards are read, no model runs).
"""

from __future__ import annotations

import torch
from torch.utils.data import IterableDataset

from gemma_hf.trainer_utils import loss_only_prediction_step, plain_trainer_kwargs

from .batches import CacheCollator, backbone_of, completion_hidden, head_of
from .losses import mix_with_next_token, next_token_nll, sparse_cross_entropy
from .manifest import REBUILD
from .reader import CacheReader


class CacheDataset(IterableDataset):
    """The cache's examples, in order, one shard in memory at a time (a DataLoader with one worker);
    each shard verified as it is read (reader.py). `rebuild`: the fix named for a damaged cache."""

    def __init__(self, directory, rebuild: str = REBUILD):
        self.directory, self.rebuild = directory, rebuild
        self.reader = CacheReader(directory, rebuild=rebuild)

    def __iter__(self):
        yield from CacheReader(self.directory, rebuild=self.rebuild)

    def __len__(self):
        return len(self.reader)


def make_offline_trainer(run, rebuild: str = REBUILD, **kwargs):
    """A Trainer whose loss is the sparse cross-entropy against the cached teacher targets; `kwargs`:
    the engine's trainer arguments (its train_dataset is replaced by the cache); `rebuild`: the command
    a damaged shard's error names as the fix."""
    from transformers import Trainer

    kwargs = plain_trainer_kwargs(kwargs)
    distill = run.recipe.method_args
    reader = CacheReader(distill.cache_dir, rebuild=rebuild)
    mode, temperature = reader.mode, reader.temperature
    pad_id = run.tokenizer.pad_token_id
    kwargs.pop("train_dataset", None)
    kwargs["args"].dataloader_num_workers = 0  # one reader: each worker would read every shard
    run.info["cache"] = {"K": reader.K, "mode": mode, "temperature": temperature, "examples": len(reader),
                         "positions": reader.num_positions, "bytes_per_target": reader.bytes_per_target()}

    class OfflineDistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "prompt_ids" in inputs:  # held-out evaluation: the next-token loss on the data's completions
                weight, cap = head_of(model)
                loss = next_token_nll(completion_hidden(model, inputs), weight, inputs["completion_ids"],
                                      inputs["completion_mask"], softcap=cap)
                return (loss, None) if return_outputs else loss
            hidden = backbone_of(model)(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
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

        prediction_step = loss_only_prediction_step

    return OfflineDistillTrainer(train_dataset=CacheDataset(distill.cache_dir, rebuild),
                                 data_collator=CacheCollator(pad_id, mode), **kwargs)


__all__ = ["CacheDataset", "make_offline_trainer"]
