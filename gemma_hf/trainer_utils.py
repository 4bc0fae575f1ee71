"""Pieces shared by gemma_hf's transformers.Trainer subclasses (the SFT trainer, the distillation
trainers). A base module: it imports torch (and peft, when asked to wrap a model), nothing of gemma_hf.
"""

from __future__ import annotations

import torch


def loss_only_prediction_step(trainer, model, inputs, prediction_loss_only, ignore_keys=None):
    """``Trainer.prediction_step`` of a trainer whose evaluation is its own loss: ``compute_loss``
    under no_grad and the trainer's compute-loss context (as its training step has it); no logits and
    no labels, (loss, None, None). A method body: ``prediction_step = loss_only_prediction_step``."""
    inputs = trainer._prepare_inputs(inputs)
    with torch.no_grad(), trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(model, inputs)
    return loss.detach(), None, None


def plain_trainer_kwargs(kwargs: dict) -> dict:
    """The engine's trainer arguments (made for TRL's trainers) for a plain ``transformers.Trainer``:
    the model wrapped with ``peft_config`` (Trainer takes none; TRL's trainers wrap it themselves) and
    ``remove_unused_columns`` off (the batches' columns are ours, not the model's forward arguments)."""
    kwargs = dict(kwargs)
    peft_config = kwargs.pop("peft_config", None)
    if peft_config is not None:
        from peft import get_peft_model

        kwargs["model"] = get_peft_model(kwargs["model"], peft_config)
    kwargs["args"].remove_unused_columns = False
    return kwargs


__all__ = ["loss_only_prediction_step", "plain_trainer_kwargs"]
