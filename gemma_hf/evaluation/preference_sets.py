"""Preference pairs built from instruction data by a rule (deterministic: the same records, kinds, size
and seed give the same pairs), to train a reward model on more signal than the preference data there
is, and to judge one on pairs of another kind than it was trained on.

Each pair takes one instruction record (a conversation ending with its reference answer): the prompt
is the conversation up to that answer and ``chosen`` is the reference answer. ``rejected`` is, by
kind -- each one a way small policies fail:

* ``off_topic``: the reference answer of *another* instruction, the one of the closest length among 8
  drawn at random. Both answers are fluent, human-written and of about the same length, so neither
  fluency nor length decides: only a model that reads the prompt and judges whether the answer
  addresses it can tell them apart.
* ``truncated``: the answer cut off mid-sentence, after 25% to 60% of its words (never right after a
  sentence's end), so that it stops before it says what was asked: an unfinished answer.
* ``repeated``: the answer's first words (4 to 12 of them) said again and again up to the answer's
  length: the loop a greedy decoder falls into.
* ``echo``: the instruction itself given back as the answer (the last user turn's text): an answer
  that repeats the prompt.
* ``continued``: the whole answer, then -- instead of stopping -- the start of another instruction's
  answer (as many words as the answer has, at most): an answer that does not end when it is done.
  Its rejected side is the *longer* one, where ``truncated`` and ``echo`` make it the shorter: together
  they teach that an answer is good for being whole and to the point, not for its length.
* ``restated``: the whole answer, then its own first sentence said again, and again (up to as many
  words as the answer has, at most 40): an answer that keeps restating itself instead of ending -- what
  the demo's 270M policy did after RL ("It is a simple sentence, which is a simple sentence. It is..."),
  and what a reward model trained on the other kinds scored *above* the short, right answer.
* ``shuffled``: the same answer with its words in a random order. Same words, same length; a model can
  tell them apart from the answer alone (fluency), without reading the prompt -- a language model's
  features go a long way towards it before any reward training.

``continued`` and ``restated`` make the rejected side the longer one. They take only answers of at most
60 words (``MAX_WORDS``), so that the pair still differs after a reward model's ``max_length`` cut
(192 tokens in the demo, where 43 of 128 ``continued`` pairs built from longer answers were cut equal
and dropped), and so that the reward model also sees short reference answers on the chosen side:
without them, every short answer it saw in training was a rejected one. A record that cannot give the
kind due (too short or too long an answer) gives another: each kind gets an equal share of the pairs
(``size`` / the number of kinds, at most), a short answer the kinds that need one first, the others
the kind furthest below its share.

Every pair records its ``kind``. Pairs are labelled by the rule alone: the reference answer is taken
to be better than each corruption of it, which holds by construction, not by a judge.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence

BUILDS = ("off_topic", "truncated", "repeated", "echo", "continued", "restated", "shuffled")
CANDIDATES = 8  # answers drawn for each off-topic pair; the one closest in length is taken
MIN_WORDS = {"truncated": 12, "repeated": 8, "restated": 4}  # shorter answers give no pair of that kind
MAX_WORDS = {"continued": 60, "restated": 60}  # longer answers give no pair of that kind (see above)
RESTATED_WORDS = 40  # the most words a restated answer adds
_SENTENCE_END = re.compile(r"[.!?:;]$")


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


def _truncated(answer: str, rng: random.Random) -> str | None:
    words = answer.split(" ")
    if len(answer.split()) < MIN_WORDS["truncated"]:
        return None
    cut = rng.randint(max(3, len(words) // 4), max(3, (len(words) * 3) // 5))
    while cut > 3 and (_SENTENCE_END.search(words[cut - 1]) or words[cut - 1].endswith("\n")):
        cut -= 1
    text = " ".join(words[:cut]).rstrip()
    return text if text and text != answer else None


def _repeated(answer: str, rng: random.Random) -> str | None:
    words = answer.split()
    if len(words) < MIN_WORDS["repeated"]:
        return None
    head = words[:rng.randint(4, min(12, len(words) - 2))]
    length = max(len(words), 3 * len(head))
    loop = (head * (length // len(head) + 1))[:length]
    return " ".join(loop)


def _restated(answer: str) -> str | None:
    words = answer.split()
    if len(words) < MIN_WORDS["restated"]:
        return None
    first = re.split(r"(?<=[.!?])\s+", answer.strip(), maxsplit=1)[0].strip()
    budget = min(len(words), RESTATED_WORDS)
    said, added = [], 0
    while added < budget:
        said.append(first)
        added += len(first.split())
    return answer + " " + " ".join(said)


def _echo(prompt: list[dict], answer: str) -> str | None:
    users = [m for m in prompt if m.get("role") == "user"]
    text = str(users[-1].get("content") or "").strip() if users else ""
    return text if text and text != answer else None


def preference_pairs(records: Sequence[Mapping], build: str | Sequence[str], size: int | None = None,
                     seed: int = 0) -> list[dict]:
    """Canonical preference records ({prompt, chosen, rejected} as messages, and ``kind``) built from
    canonical conversation ``records``: one pair per record taken in a seeded random order, the kinds of
    ``build`` (one kind or a list; see the module docstring) in turn, until ``size`` pairs (default: one
    per usable record). A record that cannot give the kind due (too short an answer) gives none."""
    kinds = [build] if isinstance(build, str) else list(build)
    unknown = [k for k in kinds if k not in BUILDS]
    if unknown or not kinds:
        raise ValueError(f"unknown build {unknown or kinds!r}; expected some of {BUILDS}")
    usable = [split for split in map(_split, records) if split is not None]
    size = len(usable) if size is None else size
    rng = random.Random(seed)
    order = list(range(len(usable)))
    rng.shuffle(order)
    pairs = []
    share = -(-size // len(kinds))  # each kind's most pairs: an equal share of size
    made = dict.fromkeys(kinds, 0)
    for turn, index in enumerate(order):
        if len(pairs) >= size:
            break
        prompt, answer = usable[index]
        # A short answer goes to the kinds only short answers can give (continued, restated) while they are
        # below their share; else the kind furthest below its share first (ties: in turn from the kind due),
        # else the next one this record can give.
        words = len(answer.split())

        def order(k: int, words=words, turn=turn) -> tuple:
            short_only = kinds[k] in MAX_WORDS and words <= MAX_WORDS[kinds[k]]
            return (not short_only, made[kinds[k]] - share, (k - turn) % len(kinds))

        due = sorted(range(len(kinds)), key=order)
        rejected = None
        for k in due:
            if made[kinds[k]] >= share:
                continue
            kind = kinds[k]
            rejected = _corrupt(kind, prompt, answer, index, usable, rng)
            if rejected is not None:
                break
        if rejected is None:
            continue
        made[kind] += 1
        pairs.append({"prompt": [dict(m) for m in prompt],
                      "chosen": [{"role": "assistant", "content": answer}],
                      "rejected": [{"role": "assistant", "content": rejected}],
                      "kind": kind})
    return pairs


def _corrupt(kind: str, prompt: list[dict], answer: str, index: int, usable: list, rng: random.Random) -> str | None:
    """The rejected answer of ``kind`` for the record ``usable[index]`` (None: this record gives none)."""
    if len(answer.split()) > MAX_WORDS.get(kind, len(answer.split())):
        return None
    if kind == "off_topic":
        others = [j for j in rng.sample(range(len(usable)), min(len(usable), CANDIDATES + 1)) if j != index
                  and usable[j][1] != answer][:CANDIDATES]
        return usable[min(others, key=lambda j: (abs(len(usable[j][1]) - len(answer)), j))][1] if others else None
    if kind == "truncated":
        return _truncated(answer, rng)
    if kind == "repeated":
        return _repeated(answer, rng)
    if kind == "echo":
        return _echo(prompt, answer)
    if kind == "continued":
        others = [j for j in rng.sample(range(len(usable)), min(len(usable), 2)) if j != index
                  and usable[j][1] != answer]
        return (answer + "\n\n" + " ".join(usable[others[0]][1].split(" ")[:len(answer.split(" "))])) \
            if others else None
    if kind == "restated":
        return _restated(answer)
    return _shuffled(answer, rng)


__all__ = ["BUILDS", "MAX_WORDS", "preference_pairs"]
