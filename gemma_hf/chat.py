"""Gemma chat formatting: one explicit renderer for every family, with the differences named.

All Gemma instruction-tuned models share one turn format (Gemma report, Table 3/4)::

    <bos><start_of_turn>user
    {user text}<end_of_turn>
    <start_of_turn>model
    {model text}<end_of_turn>
    ...

The families differ only in how a *completed final* model turn ends (:class:`ChatFormat`):

* Gemma 1 ends every model turn with ``<end_of_turn>`` (report 1, Table 4); the final turn is
  rendered like any other, ``<end_of_turn>\\n``, exactly as the shipped chat template does.
* Gemma 2 (report 2, Table 5) and Gemma 3, which keeps its conventions, end a completed final
  model turn with ``<end_of_turn><eos>``; to continue a conversation the ``<eos>`` is removed, so
  earlier model turns end ``<end_of_turn>\\n``. The chat templates shipped with the tokenizers
  render ``<end_of_turn>\\n`` for the final turn too; we follow the report so that SFT teaches the
  model to emit ``<eos>``.

Gemma has no system role: a leading system message is folded into the first user turn as
``system + "\\n\\n" + user``, as the Gemma 3 template does (the Gemma 1/2 template rejects a system
message instead). Like the templates, message text is stripped of surrounding whitespace (the
system text is kept verbatim). The rendered string begins with exactly one ``<bos>``; encode it
with ``add_special_tokens=False`` (see :func:`encode_chat`).

The same format as a Jinja chat template: :func:`chat_template` returns, per family, a template
that renders exactly what :func:`render_chat` renders and refuses the same conversations (through
``raise_exception``, with the same messages); :func:`install_chat_template` sets it on a
tokenizer. A run directory saved with it works with ``tokenizer.apply_chat_template``,
``pipeline("text-generation")`` called with messages, and the chat endpoints of vLLM and TGI, also
when the base tokenizer had no chat template (e.g. the Gemma 3 270M base imported from GGUF).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral

from .model.configuration import FAMILIES

__all__ = [
    "BOS",
    "EOS",
    "START_OF_TURN",
    "END_OF_TURN",
    "FAMILIES",
    "ChatFormat",
    "CHAT_FORMATS",
    "chat_format",
    "render_chat",
    "chat_template",
    "install_chat_template",
    "stop_token_ids",
    "check_single_bos",
    "encode_chat",
]

BOS = "<bos>"
EOS = "<eos>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
CONTROL_TOKENS = (BOS, EOS, START_OF_TURN, END_OF_TURN)  # never inside a message's text
MODEL_ROLES = ("assistant", "model")  # the roles of a model turn in a record

# Message roles we accept, mapped to the role names Gemma's turn headers use.
_ROLE_NAMES = {"user": "user", "assistant": "model", "model": "model"}

# Why a conversation cannot be rendered; one text for render_chat and the Jinja template.
# Fields: {index} of the message, {role} as Python's repr, {expected} "user" or "model".
_ERRORS = {
    "empty": "cannot render an empty conversation",
    "lone_system": "message 0 is a system message with no user turn after it to fold it into",
    "second_system": "message {index} has role 'system'; Gemma allows one system message, and only first",
    "unknown_role": "message {index} has unknown role {role}; expected system, user, assistant or model",
    "alternation": (
        "message {index} has role {role} where a {expected} turn was expected: roles must alternate "
        "user/model (assistant) after an optional leading system message"
    ),
    "content": "message {index}: content must be a string",
    "generation_prompt": "add_generation_prompt=True needs a conversation that ends with a user turn",
}


@dataclass(frozen=True)
class ChatFormat:
    """How one Gemma family formats a conversation.

    ``final_turn_suffix`` follows the ``<end_of_turn>`` of a completed final model turn: ``"\\n"``
    (the same as every other turn) for Gemma 1, ``"<eos>"`` for Gemma 2 and 3, whose instruction-
    tuned models emit ``<end_of_turn><eos>`` when they finish (report 2, Table 5).
    """

    family: str
    final_turn_suffix: str
    turn_separator: str = "\n"  # after <end_of_turn> of every other turn

    @property
    def final_turn_has_eos(self) -> bool:
        return self.final_turn_suffix == EOS


CHAT_FORMATS: dict[str, ChatFormat] = {
    "gemma": ChatFormat("gemma", final_turn_suffix="\n"),
    "gemma2": ChatFormat("gemma2", final_turn_suffix=EOS),
    "gemma3": ChatFormat("gemma3", final_turn_suffix=EOS),
}


def chat_format(family: str) -> ChatFormat:
    try:
        return CHAT_FORMATS[family]
    except KeyError:
        raise ValueError(f"unknown Gemma family {family!r}; expected one of {FAMILIES}") from None


def _turns(messages: Sequence[Mapping[str, str]]) -> tuple[str | None, list[tuple[str, str]]]:
    """Validate the conversation; return the system text (or None) and (role, text) turns.

    Roles must alternate user, model, user, ... after an optional leading system message.
    """
    if not messages:
        raise ValueError(_ERRORS["empty"])
    system = None
    start = 0
    if messages[0].get("role") == "system":
        system = _content(messages[0], 0)
        start = 1
        if len(messages) == 1:
            raise ValueError(_ERRORS["lone_system"])
    turns = []
    for index in range(start, len(messages)):
        message = messages[index]
        role = message.get("role")
        if role == "system":
            raise ValueError(_ERRORS["second_system"].format(index=index))
        if role not in _ROLE_NAMES:
            raise ValueError(_ERRORS["unknown_role"].format(index=index, role=repr(role)))
        expected = "user" if (index - start) % 2 == 0 else "model"
        if _ROLE_NAMES[role] != expected:
            raise ValueError(_ERRORS["alternation"].format(index=index, role=repr(role), expected=expected))
        turns.append((_ROLE_NAMES[role], _content(message, index)))
    return system, turns


def _content(message: Mapping[str, str], index: int) -> str:
    content = message.get("content")
    if not isinstance(content, str):
        raise TypeError(_ERRORS["content"].format(index=index) + f", got {type(content).__name__}")
    return content


def render_chat(messages: Sequence[Mapping[str, str]], family: str, add_generation_prompt: bool = False) -> str:
    """Render a conversation as the text a Gemma model of ``family`` was trained on.

    ``messages`` are ``{"role": ..., "content": str}`` dicts, roles in system/user/assistant
    (``model`` is accepted for assistant). If the conversation ends with a model turn, that turn
    is a completed final turn and ends with the family's ``final_turn_suffix``. With
    ``add_generation_prompt=True`` the conversation must end with a user turn, and the result ends
    with ``<start_of_turn>model\\n`` for the model to continue.
    """
    fmt = chat_format(family)
    system, turns = _turns(messages)
    if add_generation_prompt and turns[-1][0] != "user":
        raise ValueError(_ERRORS["generation_prompt"])

    parts = [BOS]
    for position, (role, text) in enumerate(turns):
        text = text.strip()
        if position == 0 and system is not None:
            text = system + "\n\n" + text
        is_final_model_turn = role == "model" and position == len(turns) - 1
        suffix = fmt.final_turn_suffix if is_final_model_turn else fmt.turn_separator
        parts.append(f"{START_OF_TURN}{role}\n{text}{END_OF_TURN}{suffix}")
    if add_generation_prompt:
        parts.append(f"{START_OF_TURN}model\n")
    return "".join(parts)


# ---------------------------------------------------------------- the same format as a Jinja template


def _jinja_literal(text: str) -> str:
    """`text` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _jinja_error(key: str, **fields: str) -> str:
    """`raise_exception(...)` with the message of _ERRORS[key]; each field is a Jinja expression."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(_ERRORS[key]):
        if literal:
            parts.append(_jinja_literal(literal))
        if field is not None:
            parts.append(f"({fields[field]})")
    return "{{- raise_exception(" + " ~ ".join(parts) + ") -}}"


# Python's repr of a role (a string, or None when the key is missing), as a Jinja expression.
_JINJA_ROLE_REPR = "\"'\" ~ role ~ \"'\" if role is string else 'None'"


def chat_template(family: str) -> str:
    """A Jinja chat template that renders exactly what :func:`render_chat` renders for ``family``.

    For ``tokenizer.chat_template`` (see :func:`install_chat_template`): one leading ``<bos>``, a
    system message folded into the first user turn, texts stripped (the system text verbatim),
    roles user / assistant / model, the family's ending of a completed final model turn, and
    ``<start_of_turn>model\\n`` for ``add_generation_prompt``. Conversations :func:`render_chat`
    refuses are refused through ``raise_exception`` with the same messages.
    """
    fmt = chat_format(family)
    lines = [
        "{#- Gemma chat format (family " + family + "): exactly gemma_hf.chat.render_chat(messages, '" + family
        + "', add_generation_prompt). -#}",
        "{%- set role_names = {'user': 'user', 'assistant': 'model', 'model': 'model'} -%}",
        "{%- if messages | length == 0 -%}" + _jinja_error("empty") + "{%- endif -%}",
        "{%- set ns = namespace(system=none, start=0) -%}",
        "{%- if messages[0]['role'] == 'system' -%}",
        "  {%- if messages[0]['content'] is not string -%}" + _jinja_error("content", index="0") + "{%- endif -%}",
        "  {%- set ns.system = messages[0]['content'] -%}",
        "  {%- set ns.start = 1 -%}",
        "  {%- if messages | length == 1 -%}" + _jinja_error("lone_system") + "{%- endif -%}",
        "{%- endif -%}",
        "{#- Check every turn first, as render_chat does. -#}",
        "{%- for message in messages[ns.start:] -%}",
        "  {%- set index = loop.index0 + ns.start -%}",
        "  {%- set role = message['role'] -%}",
        "  {%- set expected = 'user' if loop.index0 % 2 == 0 else 'model' -%}",
        "  {%- if role == 'system' -%}" + _jinja_error("second_system", index="index"),
        "  {%- elif role not in role_names -%}" + _jinja_error("unknown_role", index="index", role=_JINJA_ROLE_REPR),
        "  {%- elif role_names[role] != expected -%}"
        + _jinja_error("alternation", index="index", role=_JINJA_ROLE_REPR, expected="expected"),
        "  {%- elif message['content'] is not string -%}" + _jinja_error("content", index="index"),
        "  {%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt and role_names[messages[-1]['role']] != 'user' -%}"
        + _jinja_error("generation_prompt") + "{%- endif -%}",
        "{{- " + _jinja_literal(BOS) + " -}}",
        "{%- for message in messages[ns.start:] -%}",
        "  {%- set role = role_names[message['role']] -%}",
        "  {%- set text = message['content'] | trim -%}",
        "  {%- if loop.first and ns.system is not none -%}{%- set text = ns.system ~ '\\n\\n' ~ text -%}{%- endif -%}",
        "  {{- " + _jinja_literal(START_OF_TURN) + " ~ role ~ '\\n' ~ text ~ " + _jinja_literal(END_OF_TURN) + " -}}",
        "  {%- if role == 'model' and loop.last -%}{{- " + _jinja_literal(fmt.final_turn_suffix) + " -}}",
        "  {%- else -%}{{- " + _jinja_literal(fmt.turn_separator) + " -}}",
        "  {%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- " + _jinja_literal(START_OF_TURN + "model\n") + " -}}{%- endif -%}",
    ]
    return "\n".join(lines) + "\n"


def install_chat_template(tokenizer, family: str):
    """Set ``tokenizer.chat_template`` to :func:`chat_template` of ``family``; returns the tokenizer.

    Refuses a tokenizer that lacks one of Gemma's control tokens (``<bos>``, ``<eos>``,
    ``<start_of_turn>``, ``<end_of_turn>``): the template's text would not encode as the model
    expects. ``save_pretrained`` then writes the template with the tokenizer.
    """
    for token in (BOS, EOS, START_OF_TURN, END_OF_TURN):
        _token_id(tokenizer, token)
    tokenizer.chat_template = chat_template(family)
    return tokenizer


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no {token} token; is it a Gemma tokenizer?")
    return token_id


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a model turn, ``[<eos>, <end_of_turn>]``: pass as ``eos_token_id`` to generate."""
    return [_token_id(tokenizer, EOS), _token_id(tokenizer, END_OF_TURN)]


def check_single_bos(input_ids, bos_id: int, pad_id: int | None = None) -> None:
    """Raise ValueError unless each sequence holds exactly one ``bos_id``, at its first position.

    ``input_ids``: one sequence or a batch (lists or tensors). With ``pad_id``, leading padding
    (left-padded batches) is skipped before looking for the ``<bos>``. Gemma degrades quietly with
    zero or two ``<bos>`` (e.g. a template's ``<bos>`` plus the tokenizer's own), hence the check.
    """
    def as_list(ids):
        return ids.tolist() if hasattr(ids, "tolist") else list(ids)

    input_ids = as_list(input_ids)
    is_batch = bool(input_ids) and not isinstance(input_ids[0], Integral)
    rows = [as_list(row) for row in input_ids] if is_batch else [input_ids]
    for row_index, row in enumerate(rows):
        where = f"sequence {row_index}" if len(rows) > 1 else "sequence"
        start = 0
        if pad_id is not None:
            while start < len(row) and row[start] == pad_id:
                start += 1
        positions = [i for i, token in enumerate(row) if token == bos_id]
        if not positions:
            raise ValueError(f"{where} has no <bos> (id {bos_id}); Gemma needs exactly one, first")
        if len(positions) > 1:
            raise ValueError(f"{where} has {len(positions)} <bos> tokens (id {bos_id}) at positions {positions}; Gemma needs exactly one")
        if positions[0] != start:
            raise ValueError(f"{where} has its <bos> at position {positions[0]}, expected {start} (first token after padding)")


def encode_chat(tokenizer, messages: Sequence[Mapping[str, str]], family: str, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of :func:`render_chat`'s text, checked to hold exactly one leading ``<bos>``.

    The text already carries ``<bos>``, so the tokenizer must not add its own
    (``add_special_tokens=False``); control tokens encode as single ids.
    """
    text = render_chat(messages, family, add_generation_prompt=add_generation_prompt)
    input_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    check_single_bos(input_ids, _token_id(tokenizer, BOS))
    return input_ids
