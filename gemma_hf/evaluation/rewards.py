"""Reward-model win rate: which answer, the model's or the baseline's, gets the higher reward.

A scorer is any callable ``scorer(conversations) -> list[float]`` (one reward per whole
conversation: prompt + answer), so tests and other reward sources plug in.
:class:`RewardModelScorer` is the one for a Bradley-Terry reward model trained by ``gemma-hf
reward`` (a GemmaHFForSequenceClassification with one output): each conversation is rendered in
the reward model's family chat format exactly as in reward training (the answer a completed final
model turn, one ``<bos>``; :func:`gemma_hf.tokenization.encode_conversation`'s format) and
its reward is ``logits[i, 0]``, read at the last token. Batches are padded on the right with an
attention mask (the head reads each row's last real token), so a batched reward equals the reward
of the conversation alone.

Answers reach the reward model as plain text (:func:`gemma_hf.evaluation.prompts.plain_text`):
control tokens a model wrote as text are removed, so they cannot act as real ones. A conversation
longer than ``max_length`` keeps its ``<bos>`` and its last ``max_length - 1`` tokens (the reward
is read at the end).

Per prompt the model's answer wins when its reward is higher than the baseline's by more than
``tie_tolerance`` (default 0: only equal rewards tie), loses when lower, and a tie counts 0.5; the
win rate and its bootstrap interval are :func:`gemma_hf.evaluation.winrate.win_rate`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from gemma_hf.progress import batch_starts

from .prompts import MODEL_ROLES, answer_text, held_out, plain_text
from .winrate import outcome_of_scores, win_rate

Scorer = Callable[[Sequence[list[dict]]], Sequence[float]]


class RewardModelScorer:
    """Rewards of whole conversations from a sequence-classification reward model (``logits[:, 0]``)."""

    def __init__(self, model, tokenizer, family: str, batch_size: int = 8, max_length: int | None = None):
        if getattr(model.config, "num_labels", 1) < 1:
            raise ValueError("the reward model needs at least one output")
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.batch_size = batch_size
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", None)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str = "float32", tokenizer_dir: str | Path | None = None,
                        batch_size: int = 8, device=None) -> RewardModelScorer:
        """A reward-model directory (a ``gemma-hf reward`` run, or any Gemma sequence-classification checkpoint)."""
        import torch
        from transformers import AutoTokenizer

        from gemma_hf import GemmaHFForSequenceClassification
        from gemma_hf.errors import InputError
        from gemma_hf.references import SEQUENCE_CLASSIFICATION, WrongHead, check_head
        from gemma_hf.sampling import model_family

        try:  # a causal LM loads as a sequence classifier with a random score head: refuse it
            check_head(str(model_dir), "reward model", SEQUENCE_CLASSIFICATION)
        except WrongHead as err:
            raise InputError(f"{err.message}; {err.fix}") from None
        family = model_family(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
        model = GemmaHFForSequenceClassification.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()
        if device is not None:
            model.to(device)
        return cls(model, tokenizer, family, batch_size=batch_size)

    def encode(self, conversation: list[dict]) -> list[int]:
        from gemma_hf.chat import encode_chat

        extra = getattr(self.tokenizer, "all_special_tokens", ())
        clean = [{**m, "content": plain_text(m["content"], extra)} if m.get("role") in MODEL_ROLES else m
                 for m in conversation]
        ids = encode_chat(self.tokenizer, clean, self.family)
        if self.max_length is not None and len(ids) > self.max_length:
            ids = ids[:1] + ids[len(ids) - (self.max_length - 1):]
        return ids

    def __call__(self, conversations: Sequence[list[dict]]) -> list[float]:
        import torch

        encoded = [self.encode(c) for c in conversations]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        rewards: list[float] = []
        was_training = self.model.training
        self.model.eval()
        device = self.model.device
        try:
            with torch.no_grad():
                for start in batch_starts(len(encoded), self.batch_size, "scoring with the reward model",
                                          unit="answers"):
                    rows = encoded[start:start + self.batch_size]
                    width = max(len(r) for r in rows)
                    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
                    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
                    logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                    rewards += logits[:, 0].float().tolist()
        finally:
            if was_training:
                self.model.train()
        return rewards


def reward_win_rate(scorer: Scorer, prompts: Sequence, model_answers: Sequence, baseline_answers: Sequence, *,
                    tie_tolerance: float = 0.0, num_resamples: int = 1000, confidence: float = 0.95,
                    seed: int = 0) -> dict:
    """Reward win rate of the model's answers over the baseline's, one pair per prompt.

    ``prompts``: held-out items (their prompt is used; see :mod:`~gemma_hf.evaluation.prompts`);
    answers: strings or :class:`~gemma_hf.evaluation.generation.Answer`. The scorer is called once
    with all 2N conversations (the model's, then the baseline's).

    Returns :func:`~gemma_hf.evaluation.winrate.win_rate`'s keys (``win_rate``, ``ci_low``,
    ``ci_high``, ``wins``, ``ties``, ``losses``, ``num_prompts``) plus ``mean_model``,
    ``mean_baseline`` (mean rewards) and ``per_prompt``: one ``{"reward_model", "reward_baseline",
    "outcome"}`` per prompt.
    """
    if not len(prompts) == len(model_answers) == len(baseline_answers):
        raise ValueError(f"{len(prompts)} prompts, {len(model_answers)} model answers and "
                         f"{len(baseline_answers)} baseline answers: one of each per prompt")
    items = [held_out(p).prompt for p in prompts]
    conversations = [[*p, {"role": "assistant", "content": answer_text(a)}]
                     for answers in (model_answers, baseline_answers) for p, a in zip(items, answers)]
    rewards = [float(r) for r in scorer(conversations)]
    if len(rewards) != len(conversations):
        raise ValueError(f"the scorer returned {len(rewards)} rewards for {len(conversations)} conversations")
    count = len(items)
    ours, theirs = rewards[:count], rewards[count:]
    outcomes = [outcome_of_scores(a, b, tie_tolerance) for a, b in zip(ours, theirs)]
    result = win_rate(outcomes, num_resamples, confidence, seed)
    result["mean_model"] = sum(ours) / count if count else None
    result["mean_baseline"] = sum(theirs) / count if count else None
    result["per_prompt"] = [{"reward_model": a, "reward_baseline": b, "outcome": o}
                            for a, b, o in zip(ours, theirs, outcomes)]
    return result


def mean_reward(scorer: Scorer, prompts: Sequence, answers: Sequence) -> dict:
    """Mean reward of one set of answers (no baseline): ``{"mean", "rewards"}``."""
    items = [held_out(p).prompt for p in prompts]
    rewards = [float(r) for r in scorer([[*p, {"role": "assistant", "content": answer_text(a)}]
                                         for p, a in zip(items, answers)])]
    return {"mean": sum(rewards) / len(rewards) if rewards else None, "rewards": rewards}


__all__ = ["Scorer", "RewardModelScorer", "reward_win_rate", "mean_reward"]
