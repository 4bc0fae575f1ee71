"""transformers' Trainer on our causal LM: evaluation gets logits (as with stock), training never builds them.

`GemmaHFForCausalLM.forward(labels=...)` computes the training loss chunk by chunk and returns
`logits=None`. Trainer.evaluate / predict run without gradients, and then the model must behave
as any causal LM: return the full soft-capped logits and the loss computed from them, so that
`preprocess_logits_for_metrics` and `compute_metrics` get what they get from stock Gemma 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from tiny import make_pair, random_ids

SEQ = 12


class Examples(Dataset):
    """Five equal-length examples; labels ignore the first positions (a "prompt")."""

    def __init__(self):
        self.ids = random_ids(5, SEQ, seed=21)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[:3] = -100
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels}


def _evaluate(model, tmp_path, with_preprocess: bool):
    """Run Trainer.evaluate; return (metrics, logits seen by preprocess, predictions seen by compute_metrics)."""
    seen_logits, seen_predictions = [], []

    def preprocess_logits_for_metrics(logits, labels):
        assert isinstance(logits, torch.Tensor), f"expected the logits tensor, got {type(logits).__name__}: {logits!r}"
        seen_logits.append(logits.detach().clone())
        return logits.argmax(-1)

    def compute_metrics(eval_pred):
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        seen_predictions.append(np.array(predictions))
        token_predictions = predictions if with_preprocess else predictions.argmax(-1)
        valid = labels[:, 1:] != -100
        return {"accuracy": float((token_predictions[:, :-1] == labels[:, 1:])[valid].mean())}

    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none",
                             use_cpu=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, eval_dataset=Examples(), compute_metrics=compute_metrics,
                      preprocess_logits_for_metrics=preprocess_logits_for_metrics if with_preprocess else None)
    metrics = trainer.evaluate()
    return metrics, seen_logits, seen_predictions


@pytest.mark.parametrize("with_preprocess", [True, False])
def test_evaluate_hands_metrics_the_logits_stock_gemma2_does(tmp_path, with_preprocess):
    ours, stock = make_pair("gemma2")
    vocab = ours.config.vocab_size
    ours_metrics, ours_logits, ours_predictions = _evaluate(ours, tmp_path / "ours", with_preprocess)
    stock_metrics, stock_logits, stock_predictions = _evaluate(stock, tmp_path / "stock", with_preprocess)

    if with_preprocess:
        assert [t.shape for t in ours_logits] == [(2, SEQ, vocab), (2, SEQ, vocab), (1, SEQ, vocab)]
        assert [t.shape for t in ours_logits] == [t.shape for t in stock_logits]
        for a, b in zip(ours_logits, stock_logits):
            assert (a - b).abs().max().item() <= 1e-5
        assert ours_predictions[0].shape == (5, SEQ)
        assert np.array_equal(ours_predictions[0], stock_predictions[0])
    else:  # compute_metrics gets the full logits themselves
        assert ours_predictions[0].shape == stock_predictions[0].shape == (5, SEQ, vocab)
        assert np.abs(ours_predictions[0] - stock_predictions[0]).max() <= 1e-5
    assert ours_metrics["eval_accuracy"] == stock_metrics["eval_accuracy"]
    assert ours_metrics["eval_loss"] == pytest.approx(stock_metrics["eval_loss"], rel=1e-6)


def test_training_never_builds_the_logits(tmp_path):
    ours, _ = make_pair("gemma2")
    projections = []
    ours.lm_head.register_forward_hook(lambda module, args, output: projections.append(tuple(output.shape)))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                             report_to="none", use_cpu=True, dataloader_num_workers=0, save_strategy="no",
                             logging_steps=1, seed=0)
    Trainer(model=ours, args=args, train_dataset=Examples()).train()
    assert projections == [], f"training projected full logits {projections}"
    # The same forward under no_grad does project: the hook above is live.
    with torch.no_grad():
        batch = Examples()[0]
        ours(input_ids=batch["input_ids"][None], labels=batch["labels"][None])
    assert projections == [(1, SEQ, ours.config.vocab_size)]


def test_return_logits_semantics():
    ours, stock = make_pair("gemma2")
    ids = random_ids(2, SEQ)
    labels = ids.clone()
    labels[:, :4] = -100
    reference = stock(ids, labels=labels)
    ours.train()
    trained = ours(ids, labels=labels)  # gradients recorded: chunked loss, no logits
    assert trained.logits is None and trained.loss.requires_grad
    assert trained.loss.item() == pytest.approx(reference.loss.item(), rel=1e-5)
    with torch.no_grad():
        evaluated = ours(ids, labels=labels)  # no gradients: stock's contract
        forced_off = ours(ids, labels=labels, return_logits=False)
    assert evaluated.logits is not None and evaluated.logits.shape == (2, SEQ, ours.config.vocab_size)
    assert (evaluated.logits - reference.logits).abs().max().item() <= 1e-5
    assert evaluated.loss.item() == pytest.approx(reference.loss.item(), rel=1e-6)
    assert forced_off.logits is None
    assert forced_off.loss.item() == pytest.approx(reference.loss.item(), rel=1e-5)
    forced_on = ours(ids, labels=labels, return_logits=True)  # under grad, logits on request
    assert forced_on.logits is not None and forced_on.loss.requires_grad
