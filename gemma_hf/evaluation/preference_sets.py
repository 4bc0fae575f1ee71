"""Preference pairs built from instruction data, for judging a reward model on pairs of another kind
than the ones it was trained on (deterministic: the same records, size and seed give the same pairs).

Each pair takes one instruction record (a conversation ending with its reference answer): the prompt
is the conversation up to that answer and ``chosen`` is the reference answer. ``rejected`` is

* ``off_topic``: the reference answer of *another* instruction, the one of the closest length among 8
  drawn at random. Both answers are fluent, human-written and of about the same length, so neither
  fluency nor length decides: only a model that reads the prompt and judges whether the answer
  addresses it can tell them apart. This is the stronger test of the two.
* ``shuffled``: the same answer with its words in a random order. Same words, same length; a model
  can tell them apart from the answer alone (fluency), without reading the prompt, so it is the
  weaker test -- a language model's features go a long way towards it before any reward training.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

BUILDS = ("off_topic", "shuffled")
CANDIDATES = 8  # answers drawn for each off-topic pair; the one closest in length is taken


def _split(record: Mapping) -> tuple[list[dict], str] | None:
    """(prompt turns, reference answer) of a canonical conversation record ({messages}), or None."""
    messages = list(record.get("messages") or ())
    if len(messages) < 2 or messages[-1].get("role") not in ("assistant", "model"):
        return None
    answer = str(messages[-1].get("content") or "").strip()
    return (messages[:-1], answer) if answer else None


def _shuffled(answer: str, rng: random.Random) -> str | None:
    words = answer.split()
    if len(set(words)) < 3:
        return None
    for _ in range(10):
        order = words[:]
        rng.shuffle(order)
        if order != words:
            return " ".join(order)
    return None


def preference_pairs(records: Sequence[Mapping], build: str, size: int, seed: int = 0) -> list[dict]:
    """Up to ``size`` canonical preference records ({prompt, chosen, rejected}, messages) built from
    canonical conversation ``records`` by ``build`` (see the module docstring), seeded by ``seed``."""
    if build not in BUILDS:
        raise ValueError(f"unknown build {build!r}; expected one of {BUILDS}")
    usable = [split for split in map(_split, records) if split is not None]
    rng = random.Random(seed)
    order = list(range(len(usable)))
    rng.shuffle(order)
    pairs = []
    for index in order:
        if len(pairs) >= size:
            break
        prompt, answer = usable[index]
        if build == "off_topic":
            others = [j for j in rng.sample(range(len(usable)), min(len(usable), CANDIDATES + 1)) if j != index
                      and usable[j][1] != answer][:CANDIDATES]
            if not others:
                continue
            rejected = usable[min(others, key=lambda j: (abs(len(usable[j][1]) - len(answer)), j))][1]
        else:
            rejected = _shuffled(answer, rng)
            if rejected is None:
                continue
        pairs.append({"prompt": [dict(m) for m in prompt],
                      "chosen": [{"role": "assistant", "content": answer}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
    return pairs


__all__ = ["BUILDS", "preference_pairs"]
