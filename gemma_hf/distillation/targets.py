"""Teacher targets for the offline cache: K sampled (or top-K) token ids per position with their
probabilities, computed without building [B, T, V] logits.

Gemma 2 report, section 3.2: "we run inference on the teacher once and store the probabilities.
Since the vocabulary has 256k entries, we only store a sampled subset of the teacher
probabilities." :func:`teacher_targets` runs the teacher's backbone once and projects the
targeted positions chunk by chunk; :func:`sample_targets` draws from (or takes the top K of) the
temperature-scaled distribution of each row. The estimators that turn the targets into a loss
are in losses.py (:func:`~gemma_hf.distillation.losses.target_weights`).
"""

from __future__ import annotations

import torch

from .losses import MODES, project_scaled, default_chunk_size


def sample_targets(logits: torch.Tensor, K: int, temperature: float = 1.0, mode: str = "sampled",
                   generator: torch.Generator | None = None,
                   chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K targets per row of `logits` [N, V] (already soft-capped): (ids int32 [N, K], probs fp32 [N, K]).

    q = softmax(logits / temperature) in fp32, chunk by chunk over rows. "sampled": K ids drawn
    with replacement from q (torch.multinomial with `generator`), in draw order; "topk": the K
    most likely ids, most likely first. probs = q(id), exact in fp32.
    """
    if mode not in MODES:
        raise ValueError(f"unknown cache mode {mode!r}; expected one of {MODES}.")
    n, vocab = logits.shape
    if not 1 <= K <= (vocab if mode == "topk" else 2**24):
        raise ValueError(f"K={K} must be in [1, {vocab}] for topk, >= 1 for sampled.")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    chunk = chunk_size or default_chunk_size(vocab)
    ids = torch.empty(n, K, dtype=torch.int32, device=logits.device)
    probs = torch.empty(n, K, dtype=torch.float32, device=logits.device)
    for start in range(0, n, chunk):
        q = torch.softmax(logits[start:start + chunk].float() / temperature, dim=-1)
        if mode == "sampled":
            idx = torch.multinomial(q, K, replacement=True, generator=generator)
            p = q.gather(1, idx)
        else:
            p, idx = q.topk(K, dim=-1)
        ids[start:start + chunk] = idx.to(torch.int32)
        probs[start:start + chunk] = p
    return ids, probs


@torch.no_grad()
def teacher_targets(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    positions_mask: torch.Tensor, K: int, temperature: float = 1.0, mode: str = "sampled",
                    generator: torch.Generator | None = None,
                    chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of a causal LM's next-token distributions at the positions of `positions_mask` [B, T].

    The backbone runs once (``model.model``: hidden states [B, T, H]); the selected rows are
    projected through ``model.lm_head.weight`` chunk by chunk ([chunk, V] fp32 at a time, never
    [B, T, V]), soft-capped with ``model.config.final_logit_softcapping`` and sampled by
    :func:`sample_targets`. Returns (ids int32 [P, K], probs fp32 [P, K]), rows in the order of
    ``positions_mask.nonzero()`` (example by example, positions ascending). The model is used
    as it is (call ``.eval()`` first).
    """
    backbone = model.model
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    rows = hidden[positions_mask.to(device=hidden.device, dtype=torch.bool)]
    weight = model.lm_head.weight
    cap = model.config.final_logit_softcapping
    vocab = weight.shape[0]
    chunk = chunk_size or default_chunk_size(vocab)
    ids = torch.empty(rows.shape[0], K, dtype=torch.int32, device=hidden.device)
    probs = torch.empty(rows.shape[0], K, dtype=torch.float32, device=hidden.device)
    buf = torch.empty(max(1, min(chunk, rows.shape[0])), vocab, dtype=torch.float32, device=hidden.device)
    for start in range(0, rows.shape[0], chunk):
        h = rows[start:start + chunk]
        logits = buf[: h.shape[0]]
        project_scaled(h, weight, logits)
        if cap is not None:
            logits.div_(cap).tanh_().mul_(cap)
        ids[start:start + chunk], probs[start:start + chunk] = sample_targets(
            logits, K, temperature, mode, generator, chunk_size=h.shape[0])
    return ids, probs


__all__ = ["sample_targets", "teacher_targets"]
