"""Conversations -> token ids + the mask of tokens that carry the loss (model turns only).

We tokenize ourselves instead of TRL's ``assistant_only_loss``: TRL needs ``{% generation %}``
markers in a Jinja template, Gemma's templates have none, and TRL's substitute template is not
Gemma's. Here the text is exactly :func:`gemma_hf.chat.render_chat`'s (the format the model sees
at inference), tokenized in one piece (so ids equal :func:`gemma_hf.chat.encode_chat`'s), and the
mask comes from character spans mapped through the tokenizer's offsets:

* a model turn's trained span is its text, its ``<end_of_turn>``, and for a *final* turn of
  Gemma 2/3 the ``<eos>`` after it (report 2, Table 5): the model learns to stop;
* the ``<start_of_turn>model\\n`` header, user turns, ``<bos>`` and the ``\\n`` after each
  ``<end_of_turn>`` are context only.

A token that straddles a span boundary cannot be attributed and raises, as do control tokens
written literally inside message text (they would tokenize as real control tokens).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .chat import BOS, CONTROL_TOKENS, END_OF_TURN, EOS, MODEL_ROLES, chat_format, check_single_bos, encode_chat, render_chat


def check_no_control_tokens(messages: Sequence[Mapping[str, str]], extra_tokens: Sequence[str] = ()) -> None:
    forbidden = tuple(dict.fromkeys((*CONTROL_TOKENS, *extra_tokens)))
    for index, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, str):
            continue  # render_chat reports the type
        for token in forbidden:
            if token and token in content:
                raise ValueError(
                    f"message {index} ({message.get('role')}) contains the control token {token!r} as text; it would "
                    "be tokenized as a real control token. Remove or escape it in the data."
                )


def encode_conversation(tokenizer, messages: Sequence[Mapping[str, str]], family: str) -> list[int]:
    """Token ids of a whole conversation as a reward model scores it: rendered exactly as for
    training (a completed final model turn ends with the family's suffix), one <bos>."""
    check_no_control_tokens(messages, getattr(tokenizer, "all_special_tokens", ()))
    return encode_chat(tokenizer, messages, family)


def model_turn_spans(messages: Sequence[Mapping[str, str]], family: str, text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of ``text`` (= render_chat(messages)) that are model output."""
    has_eos = chat_format(family).final_turn_has_eos
    spans = []
    for index, message in enumerate(messages):
        if message.get("role") not in MODEL_ROLES:
            continue
        prefix = render_chat(messages[:index], family, add_generation_prompt=True)
        if not text.startswith(prefix):  # would mean render_chat is not prefix-stable
            raise RuntimeError(f"render_chat is not prefix-stable at message {index}")
        start = len(prefix)
        end = text.index(END_OF_TURN, start) + len(END_OF_TURN)
        if index == len(messages) - 1 and has_eos:
            if not text.startswith(EOS, end):
                raise RuntimeError(f"the final model turn of a {family} conversation does not end with {EOS}")
            end += len(EOS)
        spans.append((start, end))
    return spans


def encode_with_assistant_mask(tokenizer, messages: Sequence[Mapping[str, str]], family: str) -> tuple[list[int], list[int]]:
    """(input_ids, assistant_mask) of a conversation; mask 1 on model-output tokens, 0 elsewhere.

    ``input_ids`` hold exactly one ``<bos>``, first (checked).
    """
    check_no_control_tokens(messages, getattr(tokenizer, "all_special_tokens", ()))
    text = render_chat(messages, family)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    check_single_bos(input_ids, tokenizer.convert_tokens_to_ids(BOS))
    spans = model_turn_spans(messages, family, text)
    mask = []
    for position, (start, end) in enumerate(encoded["offset_mapping"]):
        inside = 0
        for span_start, span_end in spans:
            if span_start <= start and (end <= span_end if end > start else start < span_end):
                inside = 1
                break
            if start < span_start < end or start < span_end < end:
                raise ValueError(
                    f"token {position} ({tokenizer.convert_ids_to_tokens(input_ids[position])!r}, characters "
                    f"{start}-{end}) straddles the boundary of a model turn at characters {span_start}-{span_end}; "
                    "the loss mask cannot attribute it"
                )
        mask.append(inside)
    for span_start, span_end in spans:
        if not any(m and span_start <= s < span_end for m, (s, _) in zip(mask, encoded["offset_mapping"])):
            raise RuntimeError(f"model turn at characters {span_start}-{span_end} got no tokens")
    return input_ids, mask
