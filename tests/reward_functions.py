"""Reward functions that break TRL's reward contract, for the tests of gemma_hf.rl.rewards.checked
(test_rlhf.py): each is named in a recipe as ``tests.reward_functions:NAME``."""

from __future__ import annotations


def nan_for_all(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def one_nan(prompts, completions, **kwargs):
    return [float("nan")] + [1.0] * (len(completions) - 1)


def infinite(prompts, completions, **kwargs):
    return [float("inf")] * len(completions)


def returns_none(prompts, completions, **kwargs):
    return None


def none_per_sample(prompts, completions, **kwargs):
    return [None] * len(completions)


def strings(prompts, completions, **kwargs):
    return ["good"] * len(completions)


def too_few(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def too_many(prompts, completions, **kwargs):
    return [1.0] * (len(completions) + 1)


def raises(prompts, completions, **kwargs):
    raise ValueError("the grader lost its rubric")


def fine(prompts, completions, **kwargs):
    return [float(len(c[0]["content"]) % 3) for c in completions]
