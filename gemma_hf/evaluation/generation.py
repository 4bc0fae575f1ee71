"""Answers to held-out prompts, batched: greedy by default, stopping at <end_of_turn> / <eos>.

Each prompt is formatted exactly as :func:`gemma_hf.sampling.chat_reply` formats it
(:func:`gemma_hf.chat.encode_chat` with the generation prompt: one ``<bos>``, checked), and answers
end at the same stop tokens (:func:`gemma_hf.chat.stop_token_ids`). Batches are padded on the
*left*, with an attention mask, so every row's new tokens start at the same column; transformers'
``generate`` derives each row's positions from the mask (``cumsum - 1``), so a padded row sees the
same positions, keys and values as when it runs alone, and greedy answers equal one-by-one greedy
decoding (tests/test_evaluation.py checks it token for token). Prompts are sorted by length before
batching (less padding) and the answers come back in the input order.

Sampling (``temperature > 0``) is supported, seeded with ``seed``; sampled answers depend on the
batch composition (one random stream per batch), so only greedy answers are batch-independent.

Library behaviours relied on (transformers 5): ``GenerationMixin`` builds ``position_ids`` from the
2-D ``attention_mask`` when the model's forward takes ``position_ids``; rows that finish early are
filled with ``pad_token_id`` until the whole batch stops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gemma_hf.chat import END_OF_TURN, encode_chat, stop_token_ids
from gemma_hf.errors import InputError
from gemma_hf.progress import batch_starts

from .prompts import held_out

log = logging.getLogger(__name__)

STOPS = ("end_of_turn", "eos", "length")


@dataclass(frozen=True)
class Answer:
    """One generated model turn."""

    text: str  # decoded without the stop token, special tokens shown as text, stripped
    new_tokens: int  # generated tokens, including the stop token when there is one
    stop: str  # "end_of_turn", "eos", or "length" (ran out of max_new_tokens: the turn did not end)

    @property
    def ended_turn(self) -> bool:
        return self.stop != "length"

    def to_dict(self) -> dict:
        return {"text": self.text, "new_tokens": self.new_tokens, "stop": self.stop, "ended_turn": self.ended_turn}


def prompt_ids(tokenizer, conversations: Sequence, family: str) -> list[list[int]]:
    """Token ids of each held-out item's prompt with the generation prompt (one <bos>, checked)."""
    out = []
    for index, item in enumerate(conversations):
        try:
            prompt = held_out(item).prompt
            out.append(encode_chat(tokenizer, prompt, family, add_generation_prompt=True))
        except (TypeError, ValueError) as err:
            raise InputError(f"held-out item {index}: cannot format it as a {family} prompt: {err}") from None
    return out


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    conversations: Sequence,
    family: str,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    description: str = "generating answers",
) -> list[Answer]:
    """The model's next turn for each conversation, in order.

    ``conversations``: held-out items (see :mod:`gemma_hf.evaluation.prompts`): a conversation that
    ends with a model turn is answered anew from the user turn before it (the final model turn, the
    reference, is dropped). Greedy unless ``temperature > 0``; ``top_k`` (0: off) when sampling, else the
    model's generation config decides (transformers' default: 50). ``progress(done, total)`` is called
    after each batch; ``description`` names the step in the progress report (gemma_hf.progress).
    """
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    all_ids = prompt_ids(tokenizer, conversations, family)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None:
        for index, ids in enumerate(all_ids):
            if len(ids) >= context:
                raise InputError(f"held-out item {index}: the prompt is {len(ids)} tokens and the model's context "
                                 f"holds {context}: no room to answer")
    stops = stop_token_ids(tokenizer)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = temperature > 0
    options = (dict(do_sample=True, temperature=temperature, top_p=top_p) if sampling
               else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
    if sampling and top_k is not None:
        options["top_k"] = top_k
    if sampling and seed is not None:
        torch.manual_seed(seed)

    order = sorted(range(len(all_ids)), key=lambda i: -len(all_ids[i]))
    answers: list[Answer | None] = [None] * len(all_ids)
    was_training = model.training
    model.eval()
    device = model.device
    try:
        for start in batch_starts(len(order), batch_size, description, unit="prompts"):
            rows = order[start:start + batch_size]
            width = max(len(all_ids[i]) for i in rows)
            budget = max_new_tokens
            if context is not None and width + budget > context:
                budget = context - width
                log.warning("at most %d new tokens fit in the model's context of %d after a %d-token prompt",
                            budget, context, width)
            input_ids = torch.tensor([[pad] * (width - len(all_ids[i])) + all_ids[i] for i in rows], device=device)
            attention_mask = torch.tensor([[0] * (width - len(all_ids[i])) + [1] * len(all_ids[i]) for i in rows],
                                          device=device)
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=budget,
                                    eos_token_id=stops, pad_token_id=pad, num_beams=1, **options)
            for row, index in enumerate(rows):
                answers[index] = _answer(tokenizer, output[row, width:].tolist(), stops, end_of_turn)
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    finally:
        if was_training:
            model.train()
    return answers  # type: ignore[return-value]


def _answer(tokenizer, new: list[int], stops: list[int], end_of_turn: int) -> Answer:
    """Cut a row's new tokens at its first stop token (later columns are padding)."""
    for position, token in enumerate(new):
        if token in stops:
            stop = "end_of_turn" if token == end_of_turn else "eos"
            return Answer(_decode(tokenizer, new[:position]), position + 1, stop)
    return Answer(_decode(tokenizer, new), len(new), "length")


def _decode(tokenizer, ids: list[int]) -> str:
    # Special tokens inside an answer (a base model's stray <start_of_turn>, ...) stay visible, as in chat_reply.
    return tokenizer.decode(ids, skip_special_tokens=False).strip()


__all__ = ["Answer", "STOPS", "generate_answers", "prompt_ids"]
