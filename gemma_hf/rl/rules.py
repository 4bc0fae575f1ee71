"""Rule-based rewards (TRL's reward-function signature: ``f(prompts, completions, completion_ids,
**columns) -> list[float]``, completions as ``[{"role": "assistant", "content": text}]``).

Use them in a recipe as ``{function: "gemma_hf.rl.rules:NAME", weight: w}``. They reward what the
chat-format health checks measure (gemma_hf.evaluation): ending the turn, not looping, not
repeating the prompt; plus toy rewards with a dense signal for tests on tiny random models.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+", re.UNICODE)

# The ids that end a turn (<eos>, <end_of_turn>) of the policy's tokenizer: set by the RLHF run
# (configure(tokenizer)) before training; the defaults are the Gemma 1/2 ones.
STOP_IDS: set[int] = {1, 107}
# The most tokens a sampled completion may have (the run's max_completion_length), for ``overlong``:
# set by the RLHF run (configure(tokenizer, max_completion_length)).
LIMIT: dict[str, int | None] = {"max_completion_length": None}
OVERLONG_WINDOW = 0.25  # ``overlong``'s soft window: the last quarter of max_completion_length


def configure(tokenizer, max_completion_length: int | None = None) -> None:
    """Use ``tokenizer``'s stop ids (Gemma 3's <end_of_turn> is 106, Gemma 1/2's is 107) and the run's
    completion limit."""
    from gemma_hf.chat import stop_token_ids

    STOP_IDS.clear()
    STOP_IDS.update(stop_token_ids(tokenizer))
    LIMIT["max_completion_length"] = max_completion_length


def _text(completion) -> str:
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return str(prompt)


def distinct_2(text: str) -> float:
    """Unique word bigrams / word bigrams (1.0 for fewer than two words)."""
    words = _WORD.findall(text.lower())
    bigrams = list(zip(words, words[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0


def ends_turn(prompts, completions, completion_ids=None, trainer_state=None, **kwargs) -> list[float]:
    """1.0 if the completion ended its turn (its last token is a STOP_IDS token: TRL keeps the stop token
    in completion_ids), else 0.0."""
    return [1.0 if ids and ids[-1] in STOP_IDS else 0.0 for ids in (completion_ids or [[] for _ in completions])]


def _empty(text: str) -> bool:
    return not _WORD.search(text)


def token_distinct_2(ids) -> float:
    """Unique token bigrams / token bigrams of a completion (stop tokens left out; 1.0 for fewer than
    two tokens). Catches the loops words miss: "0000..." or "```" repeated is one word, or few."""
    ids = [int(i) for i in ids if int(i) not in STOP_IDS]
    bigrams = list(zip(ids, ids[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0


def no_repetition(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """The smaller of the completion's word distinct-2 and (given completion_ids) token distinct-2:
    1.0 without a repeated bigram, low for loops; 0.0 for an answer without a word (else an empty
    answer would be the surest way to "not repeat")."""
    ids = completion_ids if completion_ids is not None else [None] * len(completions)
    out = []
    for completion, tokens in zip(completions, ids):
        text = _text(completion)
        if _empty(text):
            out.append(0.0)
            continue
        score = distinct_2(text)
        if tokens is not None:
            score = min(score, token_distinct_2(tokens))
        out.append(score)
    return out


def not_echoing(prompts, completions, **kwargs) -> list[float]:
    """1.0 unless the completion repeats the prompt's user message (its first 8 words) verbatim."""
    out = []
    for prompt, completion in zip(prompts, completions):
        words = _WORD.findall(_prompt_text(prompt).lower())[:8]
        text = " ".join(_WORD.findall(_text(completion).lower()))
        out.append(0.0 if len(words) >= 3 and " ".join(words) in text else 1.0)
    return out


def chat_health(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """ends_turn + no_repetition + not_echoing, each in [0, 1] (so in [0, 3]); 0.0 for an answer without
    a word. (Measured: with an empty answer worth the full 3, RLOO on the real 270M learnt within 10
    steps to end its turn at once on half the held-out prompts.)"""
    a = ends_turn(prompts, completions, completion_ids)
    b = no_repetition(prompts, completions, completion_ids)
    c = not_echoing(prompts, completions)
    return [0.0 if _empty(_text(t)) else x + y + z for t, x, y, z in zip(completions, a, b, c)]


def overlong(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, section 3.4), in [-1, 0]: 0 for a completion of at most
    L - W tokens, falling linearly to -1 at L (L = the run's max_completion_length, W = its last quarter), so a
    completion the limit cut (never ending its turn) scores -1 and one that ends just before the limit
    nearly as badly. It is meant against a reward model that prefers longer answers (the demo's WARP runs saw
    answers grow towards the limit); on the demo's tuning split it made no difference beyond noise."""
    limit = LIMIT["max_completion_length"]
    if not limit:
        raise RuntimeError("overlong needs the run's max_completion_length: gemma_hf.rl.rules.configure(tokenizer, "
                           "max_completion_length) was not called")
    if completion_ids is None:
        raise RuntimeError("overlong needs completion_ids (TRL passes them to every reward function)")
    window = max(1, round(limit * OVERLONG_WINDOW))
    return [-min(1.0, max(0, len(ids) - (limit - window)) / window) for ids in completion_ids]


def ascii_letters(prompts, completions, **kwargs) -> list[float]:
    """Toy reward with a dense signal for tiny random models: the share of ASCII letters among the
    completion's characters (a random policy over a 256k vocabulary scores well below 1)."""
    out = []
    for completion in completions:
        text = _text(completion)
        out.append(sum(ch.isascii() and ch.isalpha() for ch in text) / len(text) if text else 0.0)
    return out


def short(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """Toy reward: 1 / (1 + number of completion tokens)."""
    return [1.0 / (1 + len(ids)) for ids in (completion_ids or [[]] * len(completions))]


__all__ = ["ends_turn", "no_repetition", "not_echoing", "chat_health", "overlong", "ascii_letters", "short", "distinct_2",
           "token_distinct_2"]
