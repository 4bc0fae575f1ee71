"""Chunked, soft-capped cross-entropy for the LM head: never materialises [batch, seq, vocab] logits.

With Gemma's 256k vocabulary the logits are the largest tensor of a training step: stock
transformers builds [B, T, V] logits, soft-caps them, upcasts them to fp32 and keeps them for
backward. Here the head projection, the final soft-cap, the log-sum-exp and the gradients are
computed chunk by chunk over tokens:

    for each chunk of c valid tokens (ignored labels are dropped before any matmul):
        r      = sigmoid(-2 h W^T / cap)            [c, V]  one matmul, one sigmoid pass
                 (tanh(x / cap) = 1 - 2r, so the capped logit is u = cap - 2 cap r)
        e      = exp(u - cap) = exp(-2 cap r)       [c, V]  one exp pass; e is in [exp(-2 cap), 1],
                                                            so no max pass for caps up to 43
        loss  += log(sum e) + cap - u[target]
        G      = e r (1 - r) - sum(e) onehot r_t (1 - r_t)   (du/dx = 1 - tanh^2 = 4 r (1 - r))
        dh     = (G W) * 4 / sum(e)                 [c, H]  second matmul
        dW    += G^T (h * 4 / sum(e))               [V, H]  third matmul

A sigmoid pass costs about what an exp pass does on CPU and a third of a tanh pass, so the soft-
cap adds less than the "one tanh pass" of the floor bench/ measures. The price is absolute
rounding near t = 0 (1 - 2r cancels): about 2 cap * 2**-25 ~ 2e-6 in a capped logit at cap 30,
two orders below the 1e-5 relative tolerance the tests hold the loss and gradients to.

Gradients are computed during the forward pass (the step needs them anyway) and only scaled by
the incoming gradient in backward, so the three matmuls and one sigmoid / one exp pass (plus a
few cheap multiply passes) are the whole cost. Peak extra memory is two [c, V] fp32 buffers
plus [V, H] for dW, whatever the sequence length. Without a soft-cap it is the usual shifted
log-sum-exp.

Semantics follow transformers' ForCausalLMLoss: labels are shifted inside (or `shift_labels`
is taken as given), `ignore_index` positions contribute nothing, the sum is divided by
`num_items_in_batch` when given (gradient accumulation), else by the number of valid tokens.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# With a soft-cap up to this value, exp(capped logit - cap) lies in [exp(-2 cap), 1] and
# exp(-2 cap) stays a normal fp32 number (exp(-86) > 1.2e-38), so the sum over the vocabulary
# can neither overflow nor vanish and the usual max pass is skipped.
MAX_CAP_WITHOUT_SHIFT = 43.0

# Elements of the [chunk, vocab] fp32 buffer (3 * 2**25 floats = 384 MiB: 393 rows at V = 256000).
# On CPU the [chunk, H] x [H, V] products run faster per row with more rows (at 262 rows the
# step at seq 2048 was ~5-10% slower; at 524 no faster than 393 within this machine's noise).
CHUNK_ELEMENTS = 3 * 2**25
# Elements of the scratch the elementwise passes work in, a few rows at a time (8 MiB).
SUB_ELEMENTS = 2**21


def default_chunk_size(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def _project(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, post_scale: float | None = None) -> None:
    """out[c, V] (fp32) = h @ weight^T, optionally times post_scale (applied in fp32)."""
    if h.dtype == torch.float32 and weight.dtype == torch.float32:
        torch.matmul(h, weight.t(), out=out)
    else:
        out.copy_(h @ weight.t())  # low-precision matmul, then fp32 for the cap and the softmax
    if post_scale is not None:
        out.mul_(post_scale)


class ChunkedSoftcappedCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross-entropy(softcap(hidden @ weight^T), targets), divided by `denominator`."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_size, denominator):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_dh else None
        # Accumulate dW in fp32 whatever the weight dtype (bf16 accumulation over chunks drifts).
        grad_weight = None  # fp32 accumulator, created by the first chunk's product (no zero-fill pass)

        # One [chunk, vocab] fp32 buffer reused by every chunk (fresh 100+ MiB allocations per chunk
        # cost page faults and zero-filling that showed up in profiles), plus a small [sub, vocab]
        # scratch: the elementwise work runs a few rows at a time, so the scratch stays in cache
        # and the big buffer is touched a minimum number of times.
        rows_max = min(chunk_size, n)
        vocab = weight.shape[0]
        sub = max(1, min(rows_max, SUB_ELEMENTS // vocab))
        z_buf = torch.empty(rows_max, vocab, dtype=torch.float32, device=hidden.device)
        scratch = torch.empty(sub, vocab, dtype=torch.float32, device=hidden.device)
        need_grad = need_dh or need_dw
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]
            t_idx = targets[start:start + chunk_size].unsqueeze(1)
            z = z_buf[: h.shape[0]]
            row_scale = torch.empty(h.shape[0], 1, dtype=torch.float32, device=hidden.device)
            if softcap is not None:
                # z = -2x / cap; the factor rides on the [c, H] operand (fp32) or is applied after a
                # low-precision matmul.
                fp32 = h.dtype == torch.float32
                _project(h * (-2.0 / softcap) if fp32 else h, weight, z, post_scale=None if fp32 else -2.0 / softcap)
            else:
                _project(h, weight, z)
            for s0 in range(0, h.shape[0], sub):
                zb, tb = z[s0:s0 + sub], t_idx[s0:s0 + sub]
                if softcap is not None:
                    eb = scratch[: zb.shape[0]]
                    zb.sigmoid_()  # r; tanh(x / cap) = 1 - 2r, capped logit u = cap - 2 cap r
                    r_t = zb.gather(1, tb)
                    if softcap <= MAX_CAP_WITHOUT_SHIFT:
                        # e = exp(u - cap) = exp(-2 cap r) lies in [exp(-2 cap), 1]: no max pass.
                        shift = softcap
                        torch.mul(zb, -2.0 * softcap, out=eb).exp_()
                    else:
                        r_min = zb.amin(dim=1, keepdim=True)  # the largest capped logit
                        shift = softcap - 2.0 * softcap * r_min
                        torch.sub(zb, r_min, out=eb).mul_(-2.0 * softcap).exp_()
                    sums = eb.sum(dim=1, keepdim=True)
                    total += (sums.log() + shift - (softcap - 2.0 * softcap * r_t)).sum()
                    if need_grad:
                        # du/dx = 1 - tanh^2 = 4 r (1 - r). G = e r (1 - r) - sums onehot r_t (1 - r_t)
                        # goes into z; d(loss)/dx = 4 G / sums, the 4 / sums factor applied on [c, H].
                        zb.addcmul_(zb, zb, value=-1.0)
                        zb.mul_(eb)
                        zb.scatter_add_(1, tb, -sums * r_t * (1.0 - r_t))
                        torch.div(4.0, sums, out=row_scale[s0:s0 + sub])
                else:
                    shift = zb.amax(dim=1, keepdim=True)
                    z_t = zb.gather(1, tb)
                    zb.sub_(shift).exp_()
                    sums = zb.sum(dim=1, keepdim=True)
                    total += (sums.log() + shift - z_t).sum()
                    if need_grad:
                        zb.scatter_add_(1, tb, -sums)  # G = e - sums onehot; d(loss)/dx = G / sums
                        torch.reciprocal(sums, out=row_scale[s0:s0 + sub])

            if need_grad:
                g = z if z.dtype == weight.dtype else z.to(weight.dtype)
                if need_dh:
                    rows = grad_hidden[start:start + chunk_size]
                    torch.matmul(g, weight, out=rows)
                    rows.mul_(row_scale.to(rows.dtype))
                if need_dw:
                    h_scaled = h * row_scale.to(h.dtype)
                    if grad_weight is None:
                        grad_weight = (g.t() @ h_scaled).float()
                    elif g.dtype == torch.float32 and h.dtype == torch.float32:
                        grad_weight.addmm_(g.t(), h_scaled)
                    else:
                        grad_weight.add_((g.t() @ h_scaled).float())

        del z_buf, scratch
        if need_dw and grad_weight is None:  # no valid token at all
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        # Scale by 1/denominator now, in place, so backward can hand the tensors over untouched
        # when the upstream gradient is 1 (the usual `loss.backward()`): no [V, H] copy.
        inv_denominator = 1.0 / denominator
        if grad_hidden is not None:
            grad_hidden.mul_(inv_denominator)
        if grad_weight is not None:
            grad_weight.mul_(inv_denominator)
            if grad_weight.dtype != weight.dtype:
                grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total * inv_denominator

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        # A host-side check is free on CPU; elsewhere always multiply (avoids a device sync).
        if not (grad_output.device.type == "cpu" and grad_output.item() == 1.0):
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
            grad_weight = grad_weight * grad_output.to(grad_weight.dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    softcap: float | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
    **unused,
) -> torch.Tensor:
    """Causal-LM loss from final hidden states [B, T, H] and the head weight [V, H]."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("chunked_causal_lm_loss needs labels or shift_labels.")
        # Like transformers: pad then shift, so position i predicts label i + 1.
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"labels cover {targets.shape[0]} positions but hidden states have {hidden.shape[0]} "
            "(logits_to_keep and labels cannot be combined)."
        )
    valid = targets != ignore_index
    hidden, targets = hidden[valid], targets[valid]
    if num_items_in_batch is None:
        denominator = valid.sum()  # zero valid tokens gives nan, as transformers' mean reduction does
    else:
        denominator = num_items_in_batch
    if torch.is_tensor(denominator):
        denominator = denominator.to(device=hidden.device, dtype=torch.float32)
    chunk = chunk_size or default_chunk_size(lm_head_weight.shape[0])
    return ChunkedSoftcappedCrossEntropy.apply(hidden, lm_head_weight, targets, softcap, chunk, denominator)


__all__ = ["chunked_causal_lm_loss", "ChunkedSoftcappedCrossEntropy", "default_chunk_size"]
