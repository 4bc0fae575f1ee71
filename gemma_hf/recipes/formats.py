"""Record formats: every record of a dataset becomes one canonical record of the method's data format.

A method declares the data format it trains on; a dataset's records may come in several source
formats, detected from the columns (or set with ``datasets[].format``):

=============  =================  ===================================  ======================================
data format    source format      columns                              canonical record
=============  =================  ===================================  ======================================
conversation   messages           messages                             ``{messages}``: alternating turns
(SFT)          sharegpt           conversations ({from, value})        ending with a model turn
               prompt_completion  prompt, completion
               alpaca             instruction, output (input)
preference     preference         chosen, rejected (prompt, margin)    ``{prompt, chosen, rejected[, margin]}``:
(reward)       sharegpt           conversations, chosen, rejected      prompt = turns ending with a user
                                  (LLaMA-Factory's dpo_en_demo.json)   turn; chosen/rejected = the model
               alpaca             instruction, chosen, rejected (input) turn(s) that answer it
prompt         messages           messages                             ``{prompt[, reference]}``: turns
(RL, on-policy sharegpt           conversations                        ending with a user turn; a final
distillation)  prompt_completion  prompt (completion)                  model turn becomes the reference
               alpaca             instruction (input, output)          answer
=============  =================  ===================================  ======================================

Preference pairs may give the prompt explicitly (a ``prompt`` column, or the ShareGPT/Alpaca
conversation) or implicitly: ``chosen`` and ``rejected`` are whole conversations (or texts) and the
prompt is their shared beginning, as in TRL's implicit-prompt preference format. Plain strings are
one-turn chats: the prompt is the user turn, chosen/rejected the model's answer.

Each converter raises :class:`RecordError` naming the column (``key``) at fault and the fix; the
callers add the record's index. Messages are ``{"role", "content"}`` with roles system, user,
assistant (``model`` is accepted and kept as assistant).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from gemma_hf.chat import CONTROL_TOKENS, MODEL_ROLES, render_chat

DATA_FORMATS = ("conversation", "preference", "prompt")

# data format -> (source format, columns it needs) in detection order
SOURCE_FORMATS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "conversation": (("messages", ("messages",)), ("sharegpt", ("conversations",)),
                     ("prompt_completion", ("prompt", "completion")), ("alpaca", ("instruction", "output"))),
    "preference": (("sharegpt", ("conversations", "chosen", "rejected")),
                   ("alpaca", ("instruction", "chosen", "rejected")),
                   ("preference", ("chosen", "rejected"))),
    "prompt": (("messages", ("messages",)), ("sharegpt", ("conversations",)),
               ("prompt_completion", ("prompt",)), ("alpaca", ("instruction",))),
}
FORMAT_NAMES = ("auto", "messages", "sharegpt", "prompt_completion", "alpaca", "preference")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}


class RecordError(ValueError):
    """One record does not fit its format: ``key`` is the column at fault."""

    def __init__(self, key: str, message: str, fix: str = "fix or drop that record"):
        super().__init__(message)
        self.key, self.message, self.fix = key, message, fix


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


def source_formats(data_format: str) -> list[str]:
    return [name for name, _ in SOURCE_FORMATS[data_format]]


def required_columns(data_format: str, source_format: str) -> tuple[str, ...]:
    return dict(SOURCE_FORMATS[data_format])[source_format]


def detect_format(columns: Iterable[str], data_format: str, declared: str = "auto") -> str | None:
    """The source format of a dataset with these columns, or None when none fits."""
    columns = set(columns)
    if declared != "auto":
        return declared if declared in dict(SOURCE_FORMATS[data_format]) else None
    for name, needed in SOURCE_FORMATS[data_format]:
        if all(c in columns for c in needed):
            return name
    return None


def describe_formats(data_format: str) -> str:
    return "; ".join(f"{name} ({' + '.join(cols)})" for name, cols in SOURCE_FORMATS[data_format])


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _text(value: Any, key: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RecordError(key, f"'{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(key, f"'{key}' is empty")
    return value


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    """A list of {role, content} messages (contents checked to be strings)."""
    if not isinstance(value, list) or not value:
        raise RecordError(key, f"'{key}' must be a non-empty list of {{role, content}} messages, got "
                               f"{type(value).__name__ if not isinstance(value, list) else 'an empty list'}")
    out = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise RecordError(key, f"'{key}'[{index}] must be a {{role, content}} mapping, got {_show(message)}")
        role = message["role"]
        if role not in ("system", "user", "assistant", "model"):
            raise RecordError(key, f"'{key}'[{index}] has unknown role {role!r}; expected system, user, assistant or "
                                   "model")
        out.append({"role": "assistant" if role == "model" else role,
                    "content": _text(message["content"], f"{key}[{index}].content", allow_empty=True)})
    return out


def _sharegpt_turns(value: Any, key: str) -> list[dict[str, str]]:
    turns = value if isinstance(value, list) else [value]
    if not turns or not all(isinstance(t, Mapping) for t in turns):
        raise RecordError(key, f"'{key}' must be a list of {{from, value}} mappings, got {_show(value)}")
    out = []
    for index, turn in enumerate(turns):
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise RecordError(key, f"'{key}'[{index}] has unknown ShareGPT speaker {speaker!r}; expected one of "
                                   f"{sorted(SHAREGPT_ROLES)}")
        out.append({"role": SHAREGPT_ROLES[speaker], "content": _text(turn.get("value"), f"{key}[{index}].value",
                                                                      allow_empty=True)})
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _alpaca_prompt(record: Mapping) -> list[dict[str, str]]:
    instruction = _text(record.get("instruction"), "instruction")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RecordError("input", f"'input' must be a string, got {type(extra).__name__}")
    user = instruction if not extra else f"{instruction}\n\n{extra}"
    messages = [{"role": "user", "content": user}]
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return messages


def check_conversation(messages: Sequence[Mapping[str, str]], family: str, key: str,
                       forbidden_tokens: Sequence[str] = CONTROL_TOKENS) -> None:
    """Raise RecordError unless ``messages`` renders as a Gemma conversation (roles alternate, one
    optional leading system message, string contents) whose texts hold no control token."""
    try:
        render_chat(messages, family)
    except (ValueError, TypeError) as err:
        raise RecordError(key, str(err)) from None
    for index, message in enumerate(messages):
        for token in forbidden_tokens:
            if token and token in message["content"]:
                raise RecordError(key, f"message {index} ({message['role']}) contains the control token {token!r} as "
                                       "text; it would be tokenized as a real control token",
                                  "remove or escape it in the data")


def _ends_with_user(messages: list[dict], key: str, what: str) -> None:
    if messages[-1]["role"] != "user":
        raise RecordError(key, f"{what} ends with a {messages[-1]['role']} turn; it must end with a user turn")


def _model_turns(messages: list[dict], key: str) -> None:
    if not messages or messages[0]["role"] not in MODEL_ROLES:
        raise RecordError(key, f"'{key}' must start with a model (assistant) turn")
    if not any(m["content"].strip() for m in messages if m["role"] in MODEL_ROLES):
        raise RecordError(key, f"'{key}' is empty")


# --------------------------------------------------------------------------------------------
# conversation
# --------------------------------------------------------------------------------------------


def to_conversation(record: Mapping, fmt: str) -> dict:
    if fmt == "messages":
        messages = _messages(record.get("messages"), "messages")
        key = "messages"
    elif fmt == "sharegpt":
        messages = _sharegpt_turns(record.get("conversations"), "conversations")
        key = "conversations"
    elif fmt == "prompt_completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        key = "completion"
        if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt-completion
            messages = _messages(prompt, "prompt") + _messages(completion, "completion")
        else:
            messages = [{"role": "user", "content": _text(prompt, "prompt")},
                        {"role": "assistant", "content": _text(completion, "completion")}]
    elif fmt == "alpaca":
        messages = _alpaca_prompt(record) + [{"role": "assistant", "content": _text(record.get("output"), "output")}]
        key = "output"
    else:
        raise RecordError("format", f"{fmt!r} is not a conversation format")
    if messages[-1]["role"] not in MODEL_ROLES:
        raise RecordError(key, "the conversation ends with a user turn: there is no model turn to train on")
    return {"messages": messages}


# --------------------------------------------------------------------------------------------
# preference
# --------------------------------------------------------------------------------------------


def _split_shared_prefix(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # The prompt ends with the last user turn of the shared part.
    while shared > 0 and chosen[shared - 1]["role"] != "user":
        shared -= 1
    if shared == 0:
        raise RecordError("chosen", "chosen and rejected share no prompt (no common leading turns ending with a user "
                                    "turn)", "add an explicit 'prompt' column")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _split_shared_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    # TRL's implicit prompt for plain text: the longest common prefix, not cutting a word's space.
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared and shared < len(chosen) and chosen[shared - 1] == " ":
        shared -= 1
    if not chosen[:shared].strip():
        raise RecordError("chosen", "chosen and rejected share no prompt text", "add an explicit 'prompt' column")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _answer(value: Any, key: str) -> list[dict]:
    """chosen/rejected after an explicit prompt: a string, or model turn(s) as messages / ShareGPT."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(value, key)}]
    if isinstance(value, Mapping) and "from" in value:
        turns = _sharegpt_turns(value, key)
    elif isinstance(value, list) and value and isinstance(value[0], Mapping) and "from" in value[0]:
        turns = _sharegpt_turns(value, key)
    else:
        turns = _messages(value, key)
    _model_turns(turns, key)
    return turns


def to_preference(record: Mapping, fmt: str) -> dict:
    for key in ("chosen", "rejected"):
        if key not in record or record[key] is None:
            raise RecordError(key, f"the record has no '{key}'")
    if fmt == "sharegpt":
        prompt = _sharegpt_turns(record.get("conversations"), "conversations")
        system = record.get("system")
        if isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system})
        chosen, rejected = _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")
    elif fmt == "alpaca":
        prompt = _alpaca_prompt(record)
        chosen, rejected = _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")
    elif fmt == "preference":
        raw_prompt = record.get("prompt")
        if raw_prompt is not None:  # explicit prompt
            if isinstance(raw_prompt, str):
                prompt = [{"role": "user", "content": _text(raw_prompt, "prompt")}]
            else:
                prompt = _messages(raw_prompt, "prompt")
            chosen, rejected = _answer(record["chosen"], "chosen"), _answer(record["rejected"], "rejected")
        elif isinstance(record["chosen"], str) and isinstance(record["rejected"], str):  # implicit, plain text
            text, chosen_text, rejected_text = _split_shared_text(_text(record["chosen"], "chosen"),
                                                                  _text(record["rejected"], "rejected"))
            prompt = [{"role": "user", "content": text}]
            chosen = [{"role": "assistant", "content": _text(chosen_text, "chosen")}]
            rejected = [{"role": "assistant", "content": _text(rejected_text, "rejected")}]
        else:  # implicit, conversational
            prompt, chosen, rejected = _split_shared_prefix(_messages(record["chosen"], "chosen"),
                                                            _messages(record["rejected"], "rejected"))
            _model_turns(chosen, "chosen")
            _model_turns(rejected, "rejected")
    else:
        raise RecordError("format", f"{fmt!r} is not a preference format")
    _ends_with_user(prompt, "prompt" if fmt == "preference" else ("conversations" if fmt == "sharegpt" else "instruction"),
                    "the prompt")
    if _normalised(chosen) == _normalised(rejected):
        raise RecordError("rejected", "chosen and rejected are the same answer (they differ at most in whitespace): "
                          "the pair says nothing", "drop the record or fix one of the answers")
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if "margin" in record and record["margin"] is not None:
        margin = record["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise RecordError("margin", f"'margin' must be a finite number, got {_show(margin)}")
        out["margin"] = float(margin)
    return out


def _normalised(messages: list[dict]) -> list[tuple[str, str]]:
    """The answer as a reader sees it: model roles alike, whitespace runs (spaces, tabs, newlines,
    leading or trailing) as one space -- answers that differ only there are the same answer."""
    return [("model" if m["role"] in MODEL_ROLES else m["role"], " ".join(m["content"].split())) for m in messages]


# --------------------------------------------------------------------------------------------
# prompt
# --------------------------------------------------------------------------------------------


def to_prompt(record: Mapping, fmt: str) -> dict:
    reference = None
    if fmt in ("messages", "sharegpt"):
        key = "messages" if fmt == "messages" else "conversations"
        messages = (_messages(record.get(key), key) if fmt == "messages" else _sharegpt_turns(record.get(key), key))
        if messages[-1]["role"] in MODEL_ROLES:
            reference = messages[-1]["content"]
            messages = messages[:-1]
        if not messages:
            raise RecordError(key, "the conversation has no user turn to prompt with")
        _ends_with_user(messages, key, "the prompt")
    elif fmt == "prompt_completion":
        raw = record.get("prompt")
        messages = _messages(raw, "prompt") if isinstance(raw, list) else [{"role": "user",
                                                                           "content": _text(raw, "prompt")}]
        _ends_with_user(messages, "prompt", "the prompt")
        completion = record.get("completion")
        if isinstance(completion, str):
            reference = completion
    elif fmt == "alpaca":
        messages = _alpaca_prompt(record)
        output = record.get("output")
        if isinstance(output, str):
            reference = output
    else:
        raise RecordError("format", f"{fmt!r} is not a prompt format")
    out = {"prompt": messages}
    if reference is not None:
        out["reference"] = reference
    return out


CONVERTERS: dict[str, Callable[[Mapping, str], dict]] = {
    "conversation": to_conversation,
    "preference": to_preference,
    "prompt": to_prompt,
}


def canonical(record: Any, data_format: str, fmt: str, family: str,
              forbidden_tokens: Sequence[str] = CONTROL_TOKENS) -> dict:
    """``record`` (of source format ``fmt``) as a checked canonical record of ``data_format``."""
    if not isinstance(record, Mapping):
        raise RecordError("record", f"records must be JSON objects (mappings of column -> value), got {_show(record)}")
    out = CONVERTERS[data_format](record, fmt)
    if data_format == "conversation":
        check_conversation(out["messages"], family, _key_of(fmt, "messages"), forbidden_tokens)
    elif data_format == "preference":
        for side in ("chosen", "rejected"):
            check_conversation(out["prompt"] + out[side], family, side, forbidden_tokens)
    else:
        check_conversation(out["prompt"], family, _key_of(fmt, "prompt"), forbidden_tokens)
    return out


def _key_of(fmt: str, default: str) -> str:
    return {"sharegpt": "conversations", "alpaca": "instruction", "messages": "messages"}.get(fmt, default)


__all__ = ["DATA_FORMATS", "SOURCE_FORMATS", "FORMAT_NAMES", "RecordError", "canonical", "detect_format",
           "describe_formats", "required_columns", "source_formats", "check_conversation", "CONTROL_TOKENS"]
