"""One evaluation of a model against a baseline on held-out prompts: one JSON-able dict.

:func:`evaluate` runs what is asked — held-out loss, chat-format health, reward-model win rate,
LM-judge side-by-side — and returns::

    {"summary":  {flat numbers, for eval.json and a model card's table},
     "settings": {names, decoding, bootstrap, judge, definitions},
     "samples":  [{"index", "prompt", "reference", "model", "baseline", ...}, ...]}

Summary keys (a key is present only when its part ran; a side's keys only when that side has what
the part needs; values are floats, ints or None):

    num_prompts
    {side}_heldout_loss, {side}_heldout_perplexity, {side}_heldout_tokens          side: model / baseline
    {side}_ended_turn_rate, {side}_empty_rate, {side}_repeat_prompt_rate,
    {side}_control_token_rate, {side}_distinct_2, {side}_mean_new_tokens, {side}_mean_words
    reward_mean_model, reward_mean_baseline,
    reward_win_rate, reward_win_rate_ci_low, reward_win_rate_ci_high, reward_wins, reward_ties, reward_losses
    judge_win_rate, judge_win_rate_ci_low, judge_win_rate_ci_high, judge_wins, judge_ties, judge_losses,
    judge_position_consistency, judge_first_position_rate

Win rates are the model's (ties 0.5); wins / ties / losses are shares of prompts; intervals are the
seeded percentile bootstrap over prompts (:mod:`gemma_hf.evaluation.winrate`). A sample holds the
prompt (as the judge reads it), the reference answer, each side's answer with ``{side}_stop`` and
``{side}_new_tokens``, and, when those parts ran, ``reward_model``, ``reward_baseline``,
``reward_outcome``, ``judge_model_first``, ``judge_model_second``, ``judge_outcome`` (+ the judge's
probabilities).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .generation import generate_answers
from .judge import Judge, side_by_side
from .metrics import REPEAT_WORDS, chat_health, heldout_loss
from .prompts import answer_text, held_out_items
from .rewards import Scorer, mean_reward, reward_win_rate

log = logging.getLogger(__name__)

SIDES = ("model", "baseline")
# An LM judge whose verdicts flip with the answers' order on more than half the prompts, or that ties more
# than 80% of them, says nothing about the two models: its win rate is not reported (judge_discriminated
# false, "judge did not discriminate"); its position consistency and shares stay in eval.json.
JUDGE_MIN_POSITION_CONSISTENCY = 0.5
JUDGE_MAX_TIES = 0.8

DEFINITIONS = {
    "heldout_loss": "token-weighted mean NLL of the reference answers' model-turn tokens (the SFT loss mask); "
                    "perplexity = exp(loss)",
    "win_rate": "share of prompts won by the model against the baseline, ties counted 0.5; interval: percentile "
                "bootstrap over prompts (seeded)",
    "judge": "the judge compares both answers twice (model as A, then as B); two agreeing verdicts decide, a verdict "
             "and a tie lean to the verdict, opposite verdicts are a tie; a judge with position consistency below "
             f"{JUDGE_MIN_POSITION_CONSISTENCY} or more than {JUDGE_MAX_TIES:.0%} ties did not discriminate: no win "
             "rate is reported",
    "ended_turn_rate": "share of answers that stopped at <end_of_turn>/<eos> rather than the token limit",
    "empty_rate": "share of answers that are empty after stripping whitespace",
    "repeat_prompt_rate": f"share of answers containing the prompt's first {REPEAT_WORDS} words (lower-cased \\w+ "
                          "words, contiguous); prompts of 1-2 words only when the answer equals them",
    "control_token_rate": "share of answers whose text holds a Gemma control token",
    "distinct_2": "unique / total whitespace-token bigrams over all answers (bigrams within an answer)",
}


@dataclass
class Contestant:
    """One side of the comparison: a model to answer (and score the held-out loss), or given answers.

    ``answers``: precomputed answers (strings or Answer objects, one per held-out item), used
    instead of generating; the held-out loss still needs ``model``, ``tokenizer`` and ``family``.
    """

    name: str
    model: Any = None
    tokenizer: Any = None
    family: str | None = None
    answers: Sequence | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, name: str | None = None, dtype: str = "float32",
                        device=None, tokenizer_dir: str | Path | None = None) -> Contestant:
        from gemma_hf.sampling import load_chat_model

        model, tokenizer, family = load_chat_model(model_dir, dtype=dtype, tokenizer_dir=tokenizer_dir,
                                                   role="evaluated model")
        if device is not None:
            model.to(device)
        return cls(name or str(model_dir), model, tokenizer, family)

    @property
    def has_model(self) -> bool:
        return self.model is not None and self.tokenizer is not None and self.family is not None


def evaluate(
    model: Contestant,
    heldout: Sequence,
    baseline: Contestant | None = None,
    *,
    reward: Scorer | None = None,
    judge: Judge | None = None,
    loss: bool = True,
    health: bool = True,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    reward_tie_tolerance: float = 0.0,
    reward_name: str | None = None,
    judge_name: str | None = None,
) -> dict:
    """Evaluate ``model`` (against ``baseline``) on held-out items; see the module docstring.

    ``heldout``: held-out items (:mod:`gemma_hf.evaluation.prompts`). ``reward``: a scorer (e.g.
    :class:`~gemma_hf.evaluation.rewards.RewardModelScorer`): win rate with a baseline, else the
    model's mean reward. ``judge``: a judge callable (e.g. :class:`~gemma_hf.evaluation.judge.LMJudge`),
    needs a baseline. ``loss``: held-out loss of each side that has a model (items with a
    reference). ``health``: chat-format health of each side's answers. Answers are generated
    (greedy, ``max_new_tokens``, ``batch_size``) only when health, reward or judge needs them.
    """
    items = held_out_items(heldout)
    if not items:
        raise ValueError("no held-out items to evaluate")
    if judge is not None and baseline is None:
        raise ValueError("a side-by-side judgement needs a baseline")
    sides = {"model": model, **({"baseline": baseline} if baseline is not None else {})}
    summary: dict[str, Any] = {"num_prompts": len(items)}
    samples = [{"index": i, "prompt": item.instruction, "reference": item.reference} for i, item in enumerate(items)]

    # Answers
    answers: dict[str, list] = {}
    if health or reward is not None or judge is not None:
        for side, who in sides.items():
            answers[side] = _answers(who, items, max_new_tokens, batch_size)
            for sample, answer in zip(samples, answers[side]):
                sample[side] = answer_text(answer)
                sample[f"{side}_stop"] = getattr(answer, "stop", None)
                sample[f"{side}_new_tokens"] = getattr(answer, "new_tokens", None)

    # Held-out loss
    if loss:
        if not any(item.reference is not None for item in items):
            log.info("held-out loss skipped: no held-out item has a reference answer")
        else:
            for side, who in sides.items():
                if not who.has_model:
                    continue
                log.info("held-out loss of %s", who.name)
                result = heldout_loss(who.model, who.tokenizer, items, who.family, batch_size=batch_size)
                summary[f"{side}_heldout_loss"] = result["loss"]
                summary[f"{side}_heldout_perplexity"] = result["perplexity"]
                summary[f"{side}_heldout_tokens"] = result["tokens"]

    # Chat-format health
    if health:
        for side in answers:
            result = chat_health(answers[side], items)
            summary.update({f"{side}_{key}": value for key, value in result.items() if key != "num_answers"})

    # Reward model
    if reward is not None:
        log.info("scoring answers with the reward model")
        if baseline is None:
            result = mean_reward(reward, items, answers["model"])
            summary["reward_mean_model"] = result["mean"]
            for sample, value in zip(samples, result["rewards"]):
                sample["reward_model"] = value
        else:
            result = reward_win_rate(reward, items, answers["model"], answers["baseline"],
                                     tie_tolerance=reward_tie_tolerance, num_resamples=num_resamples,
                                     confidence=confidence, seed=seed)
            summary["reward_mean_model"] = result["mean_model"]
            summary["reward_mean_baseline"] = result["mean_baseline"]
            summary.update(_rate_keys("reward", result))
            for sample, row in zip(samples, result["per_prompt"]):
                sample.update(reward_model=row["reward_model"], reward_baseline=row["reward_baseline"],
                              reward_outcome=row["outcome"])

    # LM judge, both orders
    if judge is not None:
        log.info("side-by-side judgement (both orders)")
        result = side_by_side(judge, items, answers["model"], answers["baseline"], num_resamples=num_resamples,
                              confidence=confidence, seed=seed)
        summary.update(_rate_keys("judge", result))
        summary["judge_position_consistency"] = result["position_consistency"]
        summary["judge_first_position_rate"] = result["first_position_rate"]
        consistency = result["position_consistency"] or 0.0
        summary["judge_discriminated"] = bool(consistency >= JUDGE_MIN_POSITION_CONSISTENCY
                                              and result["ties"] <= JUDGE_MAX_TIES)
        if not summary["judge_discriminated"]:
            log.warning("the judge did not discriminate (position consistency %.2f, ties %.0f%%): no win rate "
                        "is reported", consistency, 100 * result["ties"])
            for key in ("judge_win_rate", "judge_win_rate_ci_low", "judge_win_rate_ci_high"):
                summary[key] = None
        for sample, row in zip(samples, result["per_prompt"]):
            sample.update({f"judge_{key}": value for key, value in row.items()})

    settings = {
        "model": model.name,
        "baseline": baseline.name if baseline is not None else None,
        "num_prompts": len(items),
        "decoding": "greedy",
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "num_resamples": num_resamples,
        "confidence": confidence,
        "seed": seed,
        "reward": (reward_name or _name_of(reward)) if reward is not None else None,
        "reward_tie_tolerance": reward_tie_tolerance if reward is not None else None,
        "judge": (judge_name or _name_of(judge)) if judge is not None else None,
        "judge_template": getattr(judge, "template", None) if judge is not None else None,
        "definitions": DEFINITIONS,
    }
    return {"summary": summary, "settings": settings, "samples": samples}


def _answers(who: Contestant, items, max_new_tokens: int, batch_size: int) -> list:
    if who.answers is not None:
        if len(who.answers) != len(items):
            raise ValueError(f"{who.name}: {len(who.answers)} answers given for {len(items)} held-out items")
        return list(who.answers)
    if not who.has_model:
        raise ValueError(f"{who.name}: neither answers nor a model (with tokenizer and family) to answer with")
    log.info("generating answers of %s (%d prompts)", who.name, len(items))
    return generate_answers(who.model, who.tokenizer, items, who.family, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, description=f"answers of {who.name}")


def _rate_keys(prefix: str, result: dict) -> dict:
    return {
        f"{prefix}_win_rate": result["win_rate"],
        f"{prefix}_win_rate_ci_low": result["ci_low"],
        f"{prefix}_win_rate_ci_high": result["ci_high"],
        f"{prefix}_wins": result["wins"],
        f"{prefix}_ties": result["ties"],
        f"{prefix}_losses": result["losses"],
    }


def _name_of(thing) -> str:
    name = getattr(thing, "name", None)
    if isinstance(name, str):
        return name
    return getattr(thing, "__qualname__", None) or getattr(thing, "__name__", None) or type(thing).__name__


# --------------------------------------------------------------------------------------------
# a table for the model card
# --------------------------------------------------------------------------------------------

_SIDE_ROWS = (
    ("heldout_loss", "held-out loss", "{:.4f}"),
    ("heldout_perplexity", "held-out perplexity", "{:.2f}"),
    ("ended_turn_rate", "answers that end their turn", "{:.1%}"),
    ("empty_rate", "empty answers", "{:.1%}"),
    ("repeat_prompt_rate", "answers repeating the prompt", "{:.1%}"),
    ("control_token_rate", "answers with control tokens as text", "{:.1%}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("mean_new_tokens", "mean answer length (tokens)", "{:.1f}"),
)


def markdown_table(result: dict) -> str:
    """The result of :func:`evaluate` as Markdown: one table per side, one of win rates (report 1, Table 5)."""
    summary, settings = result["summary"], result["settings"]
    names = {"model": settings.get("model") or "model", "baseline": settings.get("baseline") or "baseline"}
    sides = [s for s in SIDES if any(k.startswith(f"{s}_") for k in summary)]

    def show(value, fmt):
        return "-" if value is None else fmt.format(value)

    lines = []
    rows = [(label, [summary.get(f"{s}_{key}") for s in sides], fmt) for key, label, fmt in _SIDE_ROWS]
    means = [summary.get(f"reward_mean_{s}") for s in sides]
    if any(v is not None for v in means):
        rows.append(("mean reward", means, "{:+.3f}"))
    rows = [r for r in rows if any(v is not None for v in r[1])]
    if rows:
        lines.append("| | " + " | ".join(f"`{names[s]}`" for s in sides) + " |")
        lines.append("|---|" + "---|" * len(sides))
        lines += [f"| {label} | " + " | ".join(show(v, fmt) for v in values) + " |" for label, values, fmt in rows]
    silent_judge = summary.get("judge_discriminated") is False
    comparisons = [(prefix, label) for prefix, label in (("judge", f"LM judge ({settings.get('judge')})"),
                                                          ("reward", f"reward model ({settings.get('reward')})"))
                   if summary.get(f"{prefix}_win_rate") is not None]
    if comparisons or silent_judge:
        if lines:
            lines.append("")
        confidence = settings.get("confidence", 0.95)
        lines.append(f"| `{names['model']}` vs `{names['baseline']}` | win rate | {confidence:.0%} interval "
                     "| win / tie / loss |")
        lines.append("|---|---|---|---|")
        for prefix, label in comparisons:
            rate = summary[f"{prefix}_win_rate"]
            low, high = summary[f"{prefix}_win_rate_ci_low"], summary[f"{prefix}_win_rate_ci_high"]
            interval = f"[{low:.1%}, {high:.1%}]"
            shares = " / ".join(f"{summary[f'{prefix}_{k}']:.1%}" for k in ("wins", "ties", "losses"))
            lines.append(f"| {label} | {rate:.1%} | {interval} | {shares} |")
        if silent_judge:
            shares = " / ".join(f"{summary[f'judge_{k}']:.1%}" for k in ("wins", "ties", "losses"))
            lines.append(f"| LM judge ({settings.get('judge')}) | judge did not discriminate (position consistency "
                         f"{summary.get('judge_position_consistency') or 0:.0%}; needs "
                         f"{JUDGE_MIN_POSITION_CONSISTENCY:.0%} and at most {JUDGE_MAX_TIES:.0%} ties) | – | {shares} |")
        lines.append("")
        lines.append(f"Ties count 0.5; intervals: percentile bootstrap over the {summary['num_prompts']} prompts "
                     f"({settings.get('num_resamples')} resamples, seed {settings.get('seed')}).")
    return "\n".join(lines) + "\n"


__all__ = ["Contestant", "evaluate", "markdown_table", "DEFINITIONS", "SIDES", "JUDGE_MIN_POSITION_CONSISTENCY",
           "JUDGE_MAX_TIES"]
