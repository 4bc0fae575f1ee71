"""Rewards for RLHF: reward-model run directories and Python functions, each with a weight, in the
form TRL's RLOO/GRPO trainers take (``reward_funcs``, ``reward_processing_classes``,
``reward_weights``), and scored the same way by the held-out evaluation.

A reward spec is a mapping, in a recipe's ``rewards:`` list:

- ``{model: RUN_DIR_OR_CHECKPOINT, weight: 1.0}``: a GemmaHFForSequenceClassification (one output);
  the conversation (prompt + completion) is rendered with the reward model's own chat template —
  the format it was trained on — and scored at its last token;
- ``{function: "module:function", weight: 0.5}``: a Python callable with TRL's reward signature
  ``f(prompts, completions, completion_ids, **columns) -> list[float]``, one finite number per
  completion (gemma_hf.rl.rules holds rule-based ones). What it returns is checked on every call
  (:func:`checked`): a wrong count, a value that is not a number, NaN, an infinity or None (TRL
  would train on it as a reward of 0) stops the run unpublished, naming the entry (exit 2); an
  exception raised inside it stops the run with its own message (exit 1).

Library behaviour relied on (TRL 1.16): for a model reward, the trainer renders ``prompt +
completion`` with ``reward_processing_class.apply_chat_template`` and tokenizes it with
``add_special_tokens=False`` (our template writes the one ``<bos>``), right-padded, and reads
``logits[:, 0]``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gemma_hf.errors import GemmaHFError, InputError


@dataclass
class RewardSpec:
    kind: str  # "model" or "function"
    target: str  # the reference (model) or "module:function"
    weight: float = 1.0

    @property
    def name(self) -> str:
        if self.kind == "function":
            return self.target.split(":")[-1]
        return "reward_model" if self.target.rstrip("/").split("/")[-1] in ("", ".") else \
            f"rm_{self.target.rstrip('/').split('/')[-1]}"


class RewardSpecError(InputError):
    def __init__(self, key: str, message: str, fix: str):
        super().__init__(message)
        self.key, self.message, self.fix = key, message, fix


def parse_specs(value: Any) -> list[RewardSpec]:
    """``rewards:`` entries -> RewardSpecs; RewardSpecError names the entry and the fix."""
    if not isinstance(value, list) or not value:
        raise RewardSpecError("rewards", "needs a non-empty list of {model: ..., weight: ...} or {function: ..., "
                              "weight: ...}", "add at least one reward")
    specs = []
    for index, entry in enumerate(value):
        key = f"rewards[{index}]"
        if isinstance(entry, str):
            entry = {"function": entry} if ":" in entry and not entry.startswith("asset:") else {"model": entry}
        if not isinstance(entry, dict):
            raise RewardSpecError(key, f"expected a mapping, got {entry!r}", "write {model: DIR} or {function: mod:fn}")
        unknown = set(entry) - {"model", "function", "weight"}
        if unknown:
            raise RewardSpecError(key, f"unknown key(s) {sorted(unknown)}", "use model or function, and weight")
        if ("model" in entry) == ("function" in entry):
            raise RewardSpecError(key, "needs exactly one of model or function", "give one per entry")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RewardSpecError(f"{key}.weight", f"{weight!r} is not a finite number", "use e.g. 1.0")
        kind = "model" if "model" in entry else "function"
        target = entry[kind]
        if not isinstance(target, str) or not target.strip():
            raise RewardSpecError(f"{key}.{kind}", f"{target!r} is not a reference", "give a path or module:function")
        if kind == "function" and target.count(":") != 1:
            raise RewardSpecError(f"{key}.function", f"{target!r} is not module:function",
                                  "write e.g. gemma_hf.rl.rules:ends_turn")
        specs.append(RewardSpec(kind, target, float(weight)))
    return specs


def load_function(target: str) -> Callable:
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardSpecError("rewards", f"cannot import {module_name!r} for reward {target!r}: {err}",
                              "make the module importable (installed, or on PYTHONPATH)") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise RewardSpecError("rewards", f"{module_name} has no callable {attribute!r}", "name an existing function")
    parameters = inspect.signature(function).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        raise RewardSpecError("rewards", f"reward {target} must accept **kwargs (TRL passes prompts, completions, "
                              "completion_ids and the dataset's columns by keyword)",
                              "define it as f(prompts, completions, **kwargs)")
    return function


class RewardValueError(InputError):
    """A reward function returned something other than one finite number per completion (exit 2)."""


class RewardFunctionFailed(GemmaHFError):
    """A reward function raised (exit 1, with its own message)."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_rewards(values: Any, count: int, key: str, target: str) -> list[float]:
    """``values`` as ``count`` finite floats, or RewardValueError naming the entry and what came back."""
    where = f"reward {key} ({target})"
    after = ("A reward function returns one finite number per completion; the run was not published. Fix the "
             "function, then rerun with --resume.")
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # a tensor or an array
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RewardValueError(f"{where} returned {_show(values)} for {count} completions, not a list of numbers. "
                               f"{after}")
    if len(values) != count:
        raise RewardValueError(f"{where} returned {len(values)} values for {count} completions. {after}")
    bad = [(i, v) for i, v in enumerate(values) if _as_finite(v) is None]
    if bad:
        kinds = sorted({"None" if v is None else "NaN" if isinstance(v, numbers.Real) and _is_nan(v)
                        else "an infinity" if isinstance(v, numbers.Real) else type(v).__name__ for _, v in bad})
        first = ", ".join(f"#{i}: {_show(v)}" for i, v in bad[:3])
        raise RewardValueError(f"{where} returned {' / '.join(kinds)} for {len(bad)} of {count} completions "
                               f"({first}{', ...' if len(bad) > 3 else ''}). {after}")
    return [_as_finite(v) for v in values]


def _as_finite(value: Any) -> float | None:
    """``value`` as a finite float, or None (not a real number, NaN, infinite, or beyond a float's range)."""
    if not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return number if math.isfinite(number) else None


def _is_nan(value: Any) -> bool:
    try:
        return math.isnan(float(value))
    except (OverflowError, ValueError, TypeError):
        return False


def checked(function: Callable, key: str, target: str) -> Callable:
    """``function`` with its results checked on every call (TRL's trainers and our held-out scoring
    call the same wrapper). functools.wraps keeps ``__name__``: TRL logs each reward under it."""

    @functools.wraps(function)
    def reward(*args, **kwargs):
        completions = kwargs.get("completions", args[1] if len(args) > 1 else None)
        count = len(completions) if completions is not None else 0
        try:
            values = function(*args, **kwargs)
        except GemmaHFError:
            raise
        except Exception as err:  # noqa: BLE001 - the user's function failed: say so, with its message
            raise RewardFunctionFailed(
                f"reward {key} ({target}) raised {type(err).__name__}: {str(err).strip()[:500]}. The run was not "
                "published; fix the function, then rerun with --resume.") from err
        return check_rewards(values, count, key, target)

    return reward


def _finite_scores_hook(key: str, target: str):
    def hook(module, inputs, output):
        import torch

        logits = output.logits if hasattr(output, "logits") else output[0]
        bad = (~torch.isfinite(logits.detach())).reshape(logits.shape[0], -1).any(dim=1)
        if bad.any():
            raise RewardValueError(
                f"reward {key} (the reward model {target}) scored {int(bad.sum())} of {logits.shape[0]} completions "
                "NaN or infinite: its weights or these inputs are broken. The run was not published; retrain or "
                "replace the reward model, then rerun with --resume.")
    return hook


def check_specs(specs: list[RewardSpec]) -> list[tuple[str, str, str]]:
    """(key, message, fix) for every spec that cannot be used here (validation: no weights loaded)."""
    import json

    from gemma_hf.references import SEQUENCE_CLASSIFICATION, BadReference, check_head, resolve

    problems = []
    for index, spec in enumerate(specs):
        key = f"rewards[{index}].{spec.kind}"
        if spec.kind == "function":
            try:
                load_function(spec.target)
            except RewardSpecError as err:
                problems.append((key, err.message, err.fix))
            continue
        try:
            ref = resolve(spec.target, "reward model")
            check_head(spec.target, "reward model", SEQUENCE_CLASSIFICATION)  # also a pipeline stage's output
        except BadReference as err:
            problems.append((key, err.message, err.fix))
            continue
        if not ref.is_local:
            continue
        try:
            config = json.loads((ref.path / "config.json").read_text())
        except (OSError, ValueError) as err:
            problems.append((key, f"{ref.path} is not a model directory: {err}", "point it at a reward run directory"))
            continue
        if len(config.get("id2label") or {0: 0}) != 1:
            problems.append((key, f"{ref.path} has {len(config['id2label'])} outputs; a reward model has one",
                             "use a gemma-hf reward run"))
    return problems


def load_rewards(specs: list[RewardSpec], device=None) -> tuple[list, list, list[float], list[str]]:
    """(reward_funcs, reward_processing_classes, weights, names) for TRL's RLOO/GRPO trainers."""
    from transformers import AutoTokenizer

    from gemma_hf import GemmaHFForSequenceClassification
    from gemma_hf.references import resolve

    funcs, classes, weights, names = [], [], [], []
    for index, spec in enumerate(specs):
        if spec.kind == "function":
            funcs.append(checked(load_function(spec.target), f"rewards[{index}]", spec.target))
            classes.append(None)
        else:
            path = resolve(spec.target, "reward model").location
            model = GemmaHFForSequenceClassification.from_pretrained(path).eval().requires_grad_(False)
            if device is not None:
                model.to(device)
            # TRL sums the rewards with nansum: a reward model's NaN would be dropped without a word. Every
            # forward (TRL's and our held-out scoring alike) is checked instead.
            model.register_forward_hook(_finite_scores_hook(f"rewards[{index}]", spec.target))
            funcs.append(model)
            tokenizer = AutoTokenizer.from_pretrained(path)
            tokenizer.padding_side = "right"
            classes.append(tokenizer)
        weights.append(spec.weight)
        names.append(spec.name)
    return funcs, classes, weights, names


def score(funcs, classes, weights, prompts: list[list[dict]], completions: list[str],
          completion_ids: list[list[int]], columns: dict[str, list] | None = None) -> dict[str, list[float]]:
    """Each reward and the weighted total for (prompt, completion) pairs, computed as TRL does."""
    import torch

    columns = columns or {}
    conversational = [[{"role": "assistant", "content": c}] for c in completions]
    per_function = []
    for func, tokenizer in zip(funcs, classes):
        if tokenizer is None:
            per_function.append(func(prompts=prompts, completions=conversational, completion_ids=completion_ids,
                                     **columns))
            continue
        texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, conversational)]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        inputs = {k: v.to(func.device) for k, v in inputs.items()}
        with torch.no_grad():
            per_function.append(func(**inputs).logits[:, 0].float().tolist())
    # Functions' values are checked finite (checked()); a reward model's NaN stays NaN here, so that the
    # held-out results refuse to publish (publish.check_finite_results) instead of averaging it away.
    total = [sum(w * v for w, v in zip(weights, values)) for values in zip(*per_function)] if per_function else []
    return {"per_function": per_function, "total": total}


__all__ = ["RewardSpec", "RewardSpecError", "RewardValueError", "RewardFunctionFailed", "checked", "check_rewards",
           "parse_specs", "check_specs", "load_rewards", "load_function", "score"]
