"""Held-out loss / perplexity, and the chat-format health of a set of answers.

Held-out loss
    The token-weighted mean negative log-likelihood of the model-turn tokens of held-out
    conversations (prompt + reference answer): the tokens the SFT loss trains, chosen by
    :func:`gemma_hf.tokenization.encode_with_assistant_mask` (each model turn's text, its
    ``<end_of_turn>``, and for Gemma 2/3 the final ``<eos>``). Token-weighted: the sum of the NLL of
    every such token over all conversations, divided by their number (a long answer weighs more than
    a short one, as in training). Perplexity = exp(loss). Batches are padded on the right (exact for
    a causal model); the NLL is the model's own loss with ``num_items_in_batch=1`` (a sum), for
    GemmaHFForCausalLM its chunked cross-entropy (``return_logits=False``: no [B, T, V] logits).
    A conversation longer than ``max_length`` tokens is cut to its first ``max_length`` (counted
    in ``truncated``).

Chat-format health (:func:`chat_health`), each a share of the answers:
    ``ended_turn_rate``  the answer ended its turn (stopped at ``<end_of_turn>`` / ``<eos>``) rather
                         than running into the token limit; None for plain-text answers;
    ``empty_rate``       the answer is empty after stripping whitespace;
    ``repeat_prompt_rate`` the answer repeats the prompt (:func:`repeats_prompt`);
    ``control_token_rate`` the answer's text holds a Gemma control token (``<start_of_turn>`` ...);
    ``distinct_2``       unique bigrams / total bigrams, pooled over all answers: whitespace tokens
                         (``str.split()``, case kept), bigrams of adjacent tokens within one answer,
                         never across answers; None when no answer has two tokens;
    ``mean_new_tokens``  mean generated tokens (stop token included), ``mean_words`` mean whitespace
                         tokens of the text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from gemma_hf.progress import batch_starts

from .prompts import answer_text, has_control_token, held_out

REPEAT_WORDS = 8  # how many leading words of the prompt an answer must repeat to count as a repeat
_WORD = re.compile(r"\w+")


# --------------------------------------------------------------------------------------------
# held-out loss
# --------------------------------------------------------------------------------------------


def heldout_loss(model, tokenizer, conversations: Sequence, family: str, batch_size: int = 8,
                 max_length: int | None = None) -> dict:
    """Token-weighted mean NLL of the model-turn tokens, and its perplexity.

    ``conversations``: held-out items with a reference answer (a conversation ending with a model
    turn, or a prompt record with ``reference``); items without one are skipped (``skipped``).
    Returns ``{"loss", "perplexity", "tokens", "conversations", "skipped", "truncated"}``; loss and
    perplexity are None when no token was scored.
    """
    import inspect

    import torch

    from gemma_hf.tokenization import encode_with_assistant_mask

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None)
    encoded, skipped, truncated = [], 0, 0
    for index, item in enumerate(conversations):
        conversation = held_out(item).conversation
        if conversation is None:
            skipped += 1
            continue
        try:
            ids, mask = encode_with_assistant_mask(tokenizer, conversation, family)
        except (TypeError, ValueError) as err:
            raise ValueError(f"held-out item {index}: {err}") from None
        if max_length is not None and len(ids) > max_length:
            ids, mask = ids[:max_length], mask[:max_length]
            truncated += 1
        encoded.append((ids, mask))

    own_loss = "return_logits" in inspect.signature(model.forward).parameters
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in batch_starts(len(encoded), batch_size, "held-out loss", unit="conversations"):
                rows = encoded[start:start + batch_size]
                width = max(len(ids) for ids, _ in rows)
                input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows], device=model.device)
                attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows],
                                              device=model.device)
                labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)] + [-100] * (width - len(ids))
                                       for ids, mask in rows], device=model.device)
                count = int((labels[:, 1:] != -100).sum())  # the first token is never predicted
                if count == 0:
                    continue
                extra = {"return_logits": False} if own_loss else {}
                out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False,
                            num_items_in_batch=1, **extra)
                total += float(out.loss)
                tokens += count
    finally:
        if was_training:
            model.train()
    loss = total / tokens if tokens else None
    return {
        "loss": loss,
        "perplexity": _exp(loss),
        "tokens": tokens,
        "conversations": len(encoded),
        "skipped": skipped,
        "truncated": truncated,
    }


def _exp(loss: float | None) -> float | None:
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


# --------------------------------------------------------------------------------------------
# chat-format health
# --------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-cased word tokens (``\\w+`` runs): punctuation and spacing do not matter."""
    return _WORD.findall(text.lower())


def repeats_prompt(answer: str, prompt: str, repeat_words: int = REPEAT_WORDS) -> bool:
    """Whether ``answer`` repeats ``prompt``.

    Both are reduced to lower-cased word tokens (:func:`words`). A prompt of at least 3 words is
    repeated when its first ``repeat_words`` words (all of them if it has fewer) appear in the answer
    as a contiguous run (an echo of the question, or a model that continues the user turn). A prompt
    of 1-2 words ("Hi", "Thanks!") is repeated only when the answer's words equal it exactly, so a
    greeting that answers a greeting does not count. An empty prompt is never repeated.
    """
    prompt_words = words(prompt)
    answer_words = words(answer)
    if not prompt_words:
        return False
    if len(prompt_words) < 3:
        return answer_words == prompt_words
    head = prompt_words[:repeat_words]
    size = len(head)
    return any(answer_words[i:i + size] == head for i in range(len(answer_words) - size + 1))


def distinct_n(texts: Sequence[str], n: int = 2) -> float | None:
    """Unique n-grams / total n-grams over ``texts`` (whitespace tokens, n-grams within one text)."""
    seen, total = set(), 0
    for text in texts:
        tokens = text.split()
        for i in range(len(tokens) - n + 1):
            seen.add(tuple(tokens[i:i + n]))
            total += 1
    return len(seen) / total if total else None


def chat_health(answers: Sequence, prompts: Sequence | None = None, repeat_words: int = REPEAT_WORDS) -> dict:
    """Chat-format health of ``answers`` (see the module docstring for each definition).

    ``answers``: :class:`~gemma_hf.evaluation.generation.Answer` objects (or anything with ``text``,
    ``stop``/``ended_turn`` and ``new_tokens``), or plain strings (then ``ended_turn_rate`` and
    ``mean_new_tokens`` are None). ``prompts``: what each answer answers, for ``repeat_prompt_rate``:
    held-out items (the last user turn's text is used) or strings; None leaves the rate None.
    Returns ``{"num_answers", "ended_turn_rate", "empty_rate", "repeat_prompt_rate",
    "control_token_rate", "distinct_2", "mean_new_tokens", "mean_words"}``.
    """
    count = len(answers)
    if prompts is not None and len(prompts) != count:
        raise ValueError(f"{count} answers but {len(prompts)} prompts")
    texts = [answer_text(a) for a in answers]
    ended = [_ended(a) for a in answers]
    new_tokens = [getattr(a, "new_tokens", None) for a in answers]

    def share(flags) -> float | None:
        return sum(flags) / count if count else None

    repeat = None
    if prompts is not None:
        prompt_texts = [p if isinstance(p, str) else held_out(p).last_user_text for p in prompts]
        repeat = share(repeats_prompt(t, p, repeat_words) for t, p in zip(texts, prompt_texts))
    return {
        "num_answers": count,
        "ended_turn_rate": share(ended) if count and all(e is not None for e in ended) else None,
        "empty_rate": share(not t.strip() for t in texts),
        "repeat_prompt_rate": repeat,
        "control_token_rate": share(has_control_token(t) for t in texts),
        "distinct_2": distinct_n(texts, 2),
        "mean_new_tokens": (sum(new_tokens) / count if count and all(n is not None for n in new_tokens) else None),
        "mean_words": share(len(t.split()) for t in texts),
    }


def _ended(answer) -> bool | None:
    if isinstance(answer, str):
        return None
    ended = getattr(answer, "ended_turn", None)
    if ended is None and getattr(answer, "stop", None) is not None:
        ended = answer.stop != "length"  # gemma_hf.sampling.Reply
    return ended


__all__ = ["REPEAT_WORDS", "heldout_loss", "words", "repeats_prompt", "distinct_n", "chat_health"]
