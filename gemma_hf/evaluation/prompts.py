"""Held-out items -> the prompt a model answers, its reference answer, and the plain texts that judges
and reward models read.

A held-out item is any of (the recipe engine's canonical records, or a bare conversation):

* a string: one user turn;
* a list of messages, ``[{"role": ..., "content": ...}, ...]``;
* a conversation record ``{"messages": [...]}``;
* a prompt record ``{"prompt": [...], "reference": "..."}`` (``reference`` optional);
* a preference record ``{"prompt": [...], "chosen": [...], ...}`` (the chosen answer is the reference).

:class:`HeldOut` splits it: the *prompt* is the conversation up to and including its last user turn
(the turn the model answers), the *reference* is the model turn after it when there is one. The
held-out loss is taken on the whole conversation (prompt + reference, every model turn of it).

Answers are shown to reward models and judges as *plain text* (:func:`plain_text`): a generated
answer is decoded with its special tokens visible (a base model's stray ``<start_of_turn>`` ...), and
re-encoding that text would turn them back into real control tokens inside a model turn; so they are
removed (and counted by the health metrics, ``control_token_rate``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gemma_hf.chat import CONTROL_TOKENS, MODEL_ROLES


Messages = list[dict]


@dataclass(frozen=True)
class HeldOut:
    """One held-out item: the prompt (ends with a user turn) and the reference answer (or None)."""

    prompt: Messages
    reference: str | None = None

    @property
    def conversation(self) -> Messages | None:
        """prompt + reference as one conversation (for the held-out loss), or None without a reference."""
        if self.reference is None:
            return None
        return [*self.prompt, {"role": "assistant", "content": self.reference}]

    @property
    def instruction(self) -> str:
        """The prompt as one text for a judge: see :func:`prompt_text`."""
        return prompt_text(self.prompt)

    @property
    def last_user_text(self) -> str:
        return self.prompt[-1]["content"]


def held_out(item) -> HeldOut:
    """A :class:`HeldOut` from one item of any accepted shape (see the module docstring)."""
    if isinstance(item, HeldOut):
        return item
    if isinstance(item, str):
        return HeldOut([{"role": "user", "content": item}])
    if isinstance(item, Mapping):
        if "messages" in item:
            return _split(list(item["messages"]))
        if "prompt" in item:
            prompt = item["prompt"]
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            reference = item.get("reference", item.get("completion"))
            chosen = item.get("chosen")
            if reference is None and chosen is not None:
                reference = chosen if isinstance(chosen, str) else _single_model_text(chosen)
            if reference is not None and not isinstance(reference, str):
                reference = _single_model_text(reference)
            split = _split(prompt)
            if split.reference is not None:
                raise ValueError("a prompt record's 'prompt' must end with a user turn")
            return HeldOut(split.prompt, reference)
        raise ValueError(f"a held-out record needs 'messages' or 'prompt', got keys {sorted(item)}")
    if isinstance(item, Sequence) and not isinstance(item, str):
        return _split(list(item))
    raise TypeError(f"a held-out item must be a list of messages or a record, got {type(item).__name__}")


def held_out_items(items: Iterable) -> list[HeldOut]:
    out = []
    for index, item in enumerate(items):
        try:
            out.append(held_out(item))
        except (TypeError, ValueError) as err:
            raise type(err)(f"held-out item {index}: {err}") from None
    return out


def _split(messages: Messages) -> HeldOut:
    if not messages:
        raise ValueError("empty conversation")
    for message in messages:
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError("messages must be {'role': ..., 'content': ...} mappings")
    if messages[-1]["role"] in MODEL_ROLES:
        prompt, reference = messages[:-1], messages[-1]["content"]
    else:
        prompt, reference = messages, None
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the conversation has no user turn to answer before its last model turn")
    return HeldOut([dict(m) for m in prompt], reference)


def _single_model_text(messages) -> str:
    texts = [m["content"] for m in messages if m.get("role") in MODEL_ROLES]
    if len(texts) != 1:
        raise ValueError("the reference must be one model turn")
    return texts[0]


def prompt_text(messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt of a conversation as one plain text, for a judge's template.

    One user turn (with an optional system message): its text, the system text folded in before it
    as Gemma's chat format does (``system + "\\n\\n" + user``). Several turns: a transcript, one
    ``User: ...`` / ``Assistant: ...`` paragraph per turn (the system text first, as ``System: ...``).
    Control tokens are removed (:func:`plain_text`).
    """
    system = None
    turns = list(messages)
    if turns and turns[0].get("role") == "system":
        system, turns = turns[0]["content"], turns[1:]
    if len(turns) == 1:
        text = turns[0]["content"].strip()
        return plain_text(text if system is None else system + "\n\n" + text)
    lines = [] if system is None else [f"System: {system.strip()}"]
    for message in turns:
        who = "User" if message["role"] == "user" else "Assistant"
        lines.append(f"{who}: {message['content'].strip()}")
    return plain_text("\n\n".join(lines))


def plain_text(text: str, extra_tokens: Iterable[str] = ()) -> str:
    """``text`` without Gemma's control tokens (and ``extra_tokens``), stripped: safe to re-encode."""
    for token in (*CONTROL_TOKENS, *extra_tokens):
        if token:
            text = text.replace(token, "")
    return text.strip()


def has_control_token(text: str) -> bool:
    return any(token in text for token in CONTROL_TOKENS)


def answer_text(answer) -> str:
    """The text of an answer given as a string or an object with ``.text`` (Answer, Reply)."""
    return answer if isinstance(answer, str) else answer.text


__all__ = ["HeldOut", "held_out", "held_out_items", "prompt_text", "plain_text", "has_control_token",
           "answer_text", "CONTROL_TOKENS"]
