"""Held-out measurements of a policy for RLHF and WARP: mean reward, KL to the initial policy per
token (estimated on the policy's own samples), response length and the share of turns ended.

KL(π || π_init) per token is estimated as the mean over sampled completion tokens of
``log π(y_t | y_<t, x) - log π_init(y_t | y_<t, x)`` with y ~ π (temperature 1 unless told): an
unbiased Monte-Carlo estimate of the sequence KL divided by the number of tokens. Log-probs come
from the models' own chunked loss (never the [T, V] logits), exactly as they score any sequence.

The per-prompt values behind those means stay in the result (``_per_prompt``), so that
:func:`paired_intervals` can give several policies measured on the same prompts their 95% intervals
by one percentile bootstrap over prompts (gemma_hf.evaluation.winrate.bootstrap_interval): the
same resampled prompts for every policy, so that the difference of a policy's reward to a
reference's is paired, prompt by prompt.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def sample_completions(policy, tokenizer, prompts: list[list[dict]], family: str, *, max_new_tokens: int,
                       temperature: float, seed: int, batch_size: int = 8) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids incl. a final stop token when the turn ended) per prompt; sampled,
    seeded; left-padded batches."""
    from gemma_hf.chat import encode_chat, stop_token_ids

    stops = stop_token_ids(tokenizer)
    encoded = [encode_chat(tokenizer, p, family, add_generation_prompt=True) for p in prompts]
    completions: list[list[int]] = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    was_training = policy.training
    policy.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            rows = encoded[start:start + batch_size]
            width = max(map(len, rows))
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows], device=policy.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=policy.device)
            kwargs = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
                dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            with torch.no_grad():
                out = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, **kwargs)
            for row in out[:, width:].tolist():
                kept = []
                for token in row:
                    kept.append(token)
                    if token in stops:
                        break
                while kept and kept[-1] == tokenizer.pad_token_id and tokenizer.pad_token_id not in stops:
                    kept.pop()
                completions.append(kept)
    finally:
        torch.random.set_rng_state(generator_state)
        if was_training:
            policy.train()
    return encoded, completions


@torch.no_grad()
def sequence_logprob(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Sum of log p(completion token | prefix) under ``model`` (its chunked loss; no [T, V] logits)."""
    if not completion_ids:
        return 0.0
    ids = torch.tensor([prompt_ids + completion_ids], device=model.device)
    labels = torch.full_like(ids, -100)
    labels[0, len(prompt_ids):] = ids[0, len(prompt_ids):]
    loss = model(input_ids=ids, labels=labels, use_cache=False, return_logits=False).loss
    return -loss.item() * len(completion_ids)


def policy_metrics(policy, init_model, tokenizer, prompts: list[list[dict]], family: str, rewards=None, *,
                   max_new_tokens: int = 64, temperature: float = 1.0, seed: int = 0, batch_size: int = 8,
                   columns: dict[str, list] | None = None, keep_samples: int = 3) -> dict[str, Any]:
    """Mean reward (total and per reward), KL to ``init_model`` per token, mean length and ended share,
    on completions sampled from ``policy`` for held-out ``prompts`` (``init_model`` the very ``policy``
    object: KL 0, not computed; the two log-prob passes cost about as much as the sampling)."""
    from gemma_hf.chat import stop_token_ids

    from .rewards import score

    stops = set(stop_token_ids(tokenizer))
    encoded, completions = sample_completions(policy, tokenizer, prompts, family, max_new_tokens=max_new_tokens,
                                              temperature=temperature, seed=seed, batch_size=batch_size)
    kl_per_prompt = []  # (sum over the completion's tokens, tokens) per prompt
    for prompt_ids, completion in zip(encoded, completions):
        if init_model is policy:  # KL of a policy to itself: exactly 0, without the two log-prob passes
            kl_per_prompt.append((0.0, len(completion)))
        elif init_model is not None and completion:
            kl_per_prompt.append((sequence_logprob(policy, prompt_ids, completion)
                                  - sequence_logprob(init_model, prompt_ids, completion), len(completion)))
        else:
            kl_per_prompt.append((0.0, 0))
    kl_sum, kl_tokens = sum(k for k, _ in kl_per_prompt), sum(n for _, n in kl_per_prompt)
    ended = [bool(c) and c[-1] in stops for c in completions]
    texts = [tokenizer.decode([t for t in c if t not in stops], skip_special_tokens=True).strip() for c in completions]
    out: dict[str, Any] = {
        "num_prompts": len(prompts),
        "length": sum(map(len, completions)) / max(1, len(completions)),
        "ended_turn": sum(ended) / max(1, len(ended)),
    }
    per_prompt: dict[str, list] = {}
    if init_model is not None:
        out["kl_to_init"] = kl_sum / kl_tokens if kl_tokens else 0.0
        per_prompt["kl_sum"] = [k for k, _ in kl_per_prompt]
        per_prompt["kl_tokens"] = [n for _, n in kl_per_prompt]
    if rewards is not None:
        funcs, classes, weights, names = rewards
        scored = score(funcs, classes, weights, prompts, texts, completions, columns)
        out["reward"] = _mean(scored["total"])
        per_prompt["reward"] = [float(v) for v in scored["total"]]
        for name, values in zip(names, scored["per_function"]):
            out[f"reward_{name}"] = _mean(values)
    out["_per_prompt"] = per_prompt
    out["_samples"] = [{"prompt": p[-1]["content"], "completion": t, "ended_turn": e}
                       for p, t, e in list(zip(prompts, texts, ended))[:keep_samples]]
    return out


def paired_intervals(per_prompt: dict[str, dict[str, list]], reference: str, *, num_resamples: int = 1000,
                     confidence: float = 0.95, seed: int = 0) -> dict[str, dict[str, float | None]]:
    """Intervals of policies measured on the same prompts (``policy_metrics``' ``_per_prompt``, by name),
    by one percentile bootstrap over prompts: every interval comes from the same resampled prompts.

    Per name: ``reward_ci_low``/``_ci_high`` (the mean reward's interval; a prompt whose reward is NaN
    is left out, as the mean leaves it out), ``kl_to_init_ci_low``/``_ci_high`` (the per-token KL, a
    ratio: the prompts' KL sums over their token counts) and, against the policy ``reference``,
    ``reward_gain`` (its reward minus the reference's) with ``reward_gain_ci_low``/``_ci_high``: the
    interval of the per-prompt differences, so paired -- it excludes 0 when the prompts separate the
    two policies. A value that cannot be computed (no reward, no token sampled) is None."""
    from gemma_hf.evaluation.winrate import bootstrap_interval

    sizes = {len(values) for numbers in per_prompt.values() for values in numbers.values()}
    if len(sizes) > 1:
        raise ValueError(f"paired intervals need every policy measured on the same prompts; got sizes {sorted(sizes)}")
    if reference not in per_prompt:
        raise ValueError(f"the reference {reference!r} is not among the policies {sorted(per_prompt)}")

    def interval(values, weights=None) -> tuple[float | None, float | None]:
        if values is None or not values or (weights is not None and not sum(weights) > 0):
            return None, None
        return bootstrap_interval(values, num_resamples, confidence, seed, weights=weights)

    def finite(values) -> list[float]:
        return [0.0 if math.isnan(v) else 1.0 for v in values]

    base = per_prompt[reference].get("reward")
    out: dict[str, dict[str, float | None]] = {}
    for name, numbers in per_prompt.items():
        row: dict[str, float | None] = {}
        reward = numbers.get("reward")
        if reward is not None:
            row["reward_ci_low"], row["reward_ci_high"] = interval(reward, finite(reward))
        if "kl_sum" in numbers:
            kl = [s / n if n else 0.0 for s, n in zip(numbers["kl_sum"], numbers["kl_tokens"])]
            row["kl_to_init_ci_low"], row["kl_to_init_ci_high"] = interval(kl, [float(n) for n in numbers["kl_tokens"]])
        if reward is not None and base is not None:
            both = [a * b for a, b in zip(finite(reward), finite(base))]
            gains = [r - b for r, b in zip(reward, base)]
            kept = [g for g, w in zip(gains, both) if w]
            row["reward_gain"] = sum(kept) / len(kept) if kept else None
            row["reward_gain_ci_low"], row["reward_gain_ci_high"] = interval(gains, both)
        out[name] = row
    return out


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


__all__ = ["policy_metrics", "paired_intervals", "sample_completions", "sequence_logprob"]
