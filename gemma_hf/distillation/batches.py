"""The batches the distillation trainers train and evaluate on, and how a student reads them.

Two layouts:

* prompt | completion (on-policy training, and both trainers' held-out evaluation):
  :class:`PromptCompletionCollator` pads prompts on the left and completions on the right; the
  sequence fed to a model is ``prompt | completion`` with explicit position ids (:func:`joined`:
  left padding never shifts positions), and :func:`completion_hidden` gives the hidden states at
  the positions that predict the completion tokens. :func:`stop_mask` pads a generated completion
  after its first stop token (the loss covers the completion up to and including it).
* cached teacher targets (offline training): :func:`collate` pads cache examples on the right,
  with their targets' estimator weights; :class:`CacheCollator` is the offline trainer's collator
  (cache examples, or the held-out split's prompt/completion records).

The losses take a model's hidden states and head, not its logits. A student may be wrapped by
PEFT: :func:`causal_lm_of` unwraps it, :func:`backbone_of` and :func:`head_of` give its decoder
stack and its head (weight, final soft-cap).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .losses import target_weights
from .shards import CacheExample


# ----------------------------------------------------------------------------- prompt | completion
@dataclass
class PromptCompletionCollator:
    """prompt_ids / completion_ids lists -> left-padded prompts and right-padded completions."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [list(e["prompt_ids"]) for e in examples]
        completions = [list(e["completion_ids"]) for e in examples]
        width_p, width_c = max(map(len, prompts)), max(1, max(map(len, completions)))
        batch = {
            "prompt_ids": torch.tensor([[self.pad_token_id] * (width_p - len(p)) + p for p in prompts]),
            "prompt_mask": torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p in prompts]),
            "completion_ids": torch.tensor([c + [self.pad_token_id] * (width_c - len(c)) for c in completions]),
            "completion_mask": torch.tensor([[1] * len(c) + [0] * (width_c - len(c)) for c in completions]),
        }
        return batch


def joined(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of prompt | completion."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions


def completion_hidden(model, batch) -> torch.Tensor:
    """The backbone's hidden states at the positions that predict each completion token [B, C, H]."""
    ids, mask, positions = joined(batch)
    hidden = backbone_of(model)(input_ids=ids, attention_mask=mask, position_ids=positions,
                                use_cache=False).last_hidden_state
    width_p, width_c = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    return hidden[:, width_p - 1: width_p - 1 + width_c]


def stop_mask(completion_ids: torch.Tensor, stops: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(completion_ids with everything after the first stop token padded, its mask incl. the stop)."""
    is_stop = torch.isin(completion_ids, torch.tensor(stops, device=completion_ids.device))
    after = (is_stop.cumsum(dim=1) - is_stop.int()) > 0  # strictly after the first stop
    mask = (~after).int()
    return completion_ids.masked_fill(after, pad_id), mask


# ----------------------------------------------------------------------------- cached targets
def collate(examples: Sequence[CacheExample], pad_token_id: int, mode: str) -> dict[str, torch.Tensor]:
    """Right-padded batch for :func:`~gemma_hf.distillation.losses.sparse_cross_entropy`:

    input_ids [B, L] int64, attention_mask [B, L], target_ids [B, L, K] int64 and target_weights
    [B, L, K] fp32 (the mode's estimator weights; zeros where no target), target_mask [B, L] bool
    (position t holds a target for token t + 1).
    """
    width = max(int(ex.input_ids.shape[0]) for ex in examples)
    k = examples[0].target_ids.shape[-1]
    b = len(examples)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros(b, width, dtype=torch.int64)
    ids = torch.zeros(b, width, k, dtype=torch.int64)
    weights = torch.zeros(b, width, k, dtype=torch.float32)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for row, ex in enumerate(examples):
        length, pos = int(ex.input_ids.shape[0]), ex.positions.long()
        input_ids[row, :length] = ex.input_ids.long()
        attention_mask[row, :length] = 1
        ids[row, pos] = ex.target_ids.long()
        weights[row, pos] = target_weights(mode, ex.target_probs)
        mask[row, pos] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_ids": ids, "target_weights": weights,
            "target_mask": mask}


@dataclass
class CacheCollator:
    """The offline trainer's collator: cache examples -> :func:`collate`; the held-out split's records
    (prompt_ids / completion_ids dicts: no cached targets) -> :class:`PromptCompletionCollator`."""

    pad_token_id: int
    mode: str

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        if isinstance(examples[0], dict):
            return PromptCompletionCollator(self.pad_token_id)(examples)
        return collate(examples, self.pad_token_id, self.mode)


# ----------------------------------------------------------------------------- the model's parts
def causal_lm_of(model):
    """The causal LM itself: a PEFT-wrapped model's ``base_model.model``, else the model."""
    return model.base_model.model if hasattr(model, "peft_config") else model


def backbone_of(model):
    """The decoder stack (the causal LM's ``.model``): hidden states, no head."""
    return causal_lm_of(model).model


def head_of(model):
    """(output embedding weight [V, H], final_logit_softcapping) of the causal LM."""
    model = causal_lm_of(model)
    return model.get_output_embeddings().weight, model.config.final_logit_softcapping


__all__ = ["PromptCompletionCollator", "joined", "completion_hidden", "stop_mask", "collate", "CacheCollator",
           "causal_lm_of", "backbone_of", "head_of"]
