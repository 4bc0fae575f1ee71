"""Vocabulary resizing: trim or pad the embedding (and an untied head) to exactly n rows.

The usual case is the Gemma 1/2 padding: 256128 rows (the reports' Table 2) to 256000 (Hugging
Face tokenizers and checkpoints), or back. Kept rows are copied bit for bit; a trim first proves
that no token uses the dropped rows.
"""

from __future__ import annotations

import torch
from torch import nn


class VocabResizeError(ValueError):
    """A vocabulary trim would drop rows that may hold real tokens."""


def _special_token_ids(config) -> dict[str, int]:
    ids = {}
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        for i, v in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            if v is not None:
                ids[f"{name}[{i}]" if isinstance(value, (list, tuple)) else name] = int(v)
    return ids


def _resized(weight: torch.Tensor, rows: int) -> nn.Parameter:
    new = torch.zeros((rows, *weight.shape[1:]), dtype=weight.dtype, device=weight.device)
    keep = min(rows, weight.shape[0])
    with torch.no_grad():
        new[:keep].copy_(weight[:keep])
    return nn.Parameter(new, requires_grad=weight.requires_grad)


def resize_vocab(model, new_size: int, *, tokenizer=None, check_unused: bool = True):
    """Trim or pad the vocabulary of `model` (in place) to exactly `new_size` rows; returns the model.

    Rows `[0, min(old, new))` are copied bit for bit, so the logits of every kept token are
    unchanged. Padding adds zero rows (a zero embedding; with a tied head, a logit of exactly 0).
    Trimming drops rows `[new_size, old)`; with `check_unused` (the default) it first proves that
    no token uses them:

    - no special token id of the config (pad/bos/eos) may be >= new_size;
    - with a `tokenizer`, `len(tokenizer)` must be <= new_size;
    - without one, the dropped rows must be all zero (as padding rows are), in the embedding and
      in an untied output head.

    Note that a softmax over the trimmed vocabulary renormalises over fewer entries; raw logits of
    the kept ids are identical. The config's `vocab_size` (and the model's `vocab_size`
    attributes) follow. The usual case is the Gemma 1/2 padding: 256128 rows (the reports) to
    256000 (Hugging Face tokenizers and checkpoints), or back.
    """
    if not isinstance(new_size, int) or isinstance(new_size, bool) or new_size <= 0:
        raise ValueError(f"new_size must be a positive integer, got {new_size!r}.")
    embed = model.get_input_embeddings()
    old = embed.weight.shape[0]
    if new_size == old:
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is embed.weight
    if new_size < old and check_unused:
        too_big = {k: v for k, v in _special_token_ids(model.config).items() if v >= new_size}
        if too_big:
            raise VocabResizeError(
                f"cannot trim the vocabulary from {old} to {new_size} rows: the config's special tokens "
                f"{too_big} use ids >= {new_size}."
            )
        if tokenizer is not None:
            if len(tokenizer) > new_size:
                raise VocabResizeError(
                    f"cannot trim the vocabulary from {old} to {new_size} rows: the tokenizer has "
                    f"{len(tokenizer)} tokens, so ids up to {len(tokenizer) - 1} are in use."
                )
        else:
            matrices = [("embedding", embed.weight)] + ([] if tied or head is None else [("output head", head.weight)])
            for what, weight in matrices:
                dropped = weight[new_size:]
                if torch.count_nonzero(dropped).item():
                    nonzero = torch.nonzero(dropped.abs().sum(dim=tuple(range(1, dropped.dim()))))
                    first = new_size + int(nonzero[0, 0])
                    raise VocabResizeError(
                        f"cannot trim the vocabulary from {old} to {new_size} rows: {what} row {first} (of the "
                        f"{old - new_size} to be dropped) is not zero, so it may belong to a real token. Pass the "
                        f"tokenizer (resize_vocab(model, {new_size}, tokenizer=tok)) to prove no token id >= "
                        f"{new_size} exists, or check_unused=False to trim anyway."
                    )
    embed.weight = _resized(embed.weight, new_size)
    embed.num_embeddings = new_size
    if head is not None:
        if tied:
            head.weight = embed.weight
        else:
            head.weight = _resized(head.weight, new_size)
        head.out_features = new_size
    model.config.vocab_size = new_size
    for module in (model, getattr(model, "model", None)):
        if module is not None and hasattr(module, "vocab_size"):
            module.vocab_size = new_size
    return model
