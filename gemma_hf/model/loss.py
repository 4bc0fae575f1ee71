"""Chunked, soft-capped cross-entropy for the LM head: never materialises [batch, seq, vocab] logits.

With Gemma's 256k vocabulary the logits are the largest tensor of a training step: stock
transformers builds [B, T, V] logits, soft-caps them, upcasts them to fp32 and keeps them for
backward. Here the head projection, the final soft-cap, the log-sum-exp and the gradients are
computed chunk by chunk over tokens:

    for each chunk of c valid tokens (ignored labels are dropped before any matmul):
        t      = tanh(h W^T / cap)                  [c, V]  one matmul, one tanh pass
        e      = exp(cap * t)                       [c, V]  one exp pass (no max pass needed:
                                                            capped logits cannot overflow)
        loss  += log(sum e) - cap * t[target]
        G      = e (1 - t^2) - sum(e) onehot (1 - t_target^2)   = sum(e) * d(loss)/d(raw logits)
        dh     = (G W) / sum(e)                     [c, H]  second matmul
        dW    += G^T (h / sum(e))                   [V, H]  third matmul

Gradients are computed during the forward pass (the step needs them anyway) and only scaled by
the incoming gradient in backward, so the three matmuls and the one tanh / one exp pass are the
whole cost: the floor of an exact head. Peak extra memory is two [c, V] fp32 buffers plus
[V, H] for dW, whatever the sequence length.

Semantics follow transformers' ForCausalLMLoss: labels are shifted inside (or `shift_labels`
is taken as given), `ignore_index` positions contribute nothing, the sum is divided by
`num_items_in_batch` when given (gradient accumulation), else by the number of valid tokens.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# With a soft-cap up to this value, exp(capped logit) summed over a 262k vocabulary stays far
# below fp32's maximum (exp(60) * 2**18 ~ 3e31 < 3e38), so the usual max-subtraction is skipped.
MAX_CAP_WITHOUT_SHIFT = 60.0

# Elements of one [chunk, vocab] fp32 buffer (2**26 floats = 256 MiB; two live at once). On CPU
# the [chunk, H] x [H, V] product runs ~2.5x faster per row at 256 rows than at 64, so chunks
# should not be small: 2**26 gives 262 rows at V = 256000.
CHUNK_ELEMENTS = 2**26


def default_chunk_size(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


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

        # Two [chunk, vocab] fp32 buffers reused by every chunk: fresh 100+ MiB allocations per chunk
        # cost page faults and zero-filling that showed up as a large share of the step in profiles.
        rows_max = min(chunk_size, n)
        z_buf = torch.empty(rows_max, weight.shape[0], dtype=torch.float32, device=hidden.device)
        e_buf = torch.empty_like(z_buf)
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]
            t_idx = targets[start:start + chunk_size].unsqueeze(1)
            z, e = z_buf[: h.shape[0]], e_buf[: h.shape[0]]
            if h.dtype == torch.float32 and weight.dtype == torch.float32:
                torch.matmul(h, weight.t(), out=z)
            else:
                z.copy_(h @ weight.t())  # low-precision matmul, then fp32 for the cap and softmax
            if softcap is not None:
                z.mul_(1.0 / softcap).tanh_()  # z holds t = tanh(logits / cap)
                scale = softcap
            else:
                scale = 1.0
            if softcap is not None and softcap <= MAX_CAP_WITHOUT_SHIFT:
                # Capped logits lie in (-cap, cap): exp cannot overflow fp32, so skip the max pass.
                shift = None
                torch.mul(z, scale, out=e).exp_()
            else:
                shift = z.amax(dim=1, keepdim=True) * scale
                torch.add(-shift, z, alpha=scale, out=e).exp_()
            sums = e.sum(dim=1, keepdim=True)
            target_z = z.gather(1, t_idx)
            lse = sums.log() if shift is None else sums.log() + shift
            total += (lse - scale * target_z).sum()

            if need_dh or need_dw:
                # G = sums * d(loss)/d(raw logits) = e * (1 - t^2) - sums * onehot * (1 - t_target^2);
                # the 1/sums factor is applied to the [c, H] operands below instead of to [c, V].
                if softcap is not None:
                    e.addcmul_(e, z.square_(), value=-1.0)  # d/dx [cap * tanh(x / cap)] = 1 - t^2
                    e.scatter_add_(1, t_idx, -sums * (1.0 - target_z.square()))
                else:
                    e.scatter_add_(1, t_idx, -sums)
                inv_sums = sums.reciprocal()
                g = e if e.dtype == weight.dtype else e.to(weight.dtype)
                if need_dh:
                    rows = grad_hidden[start:start + chunk_size]
                    torch.matmul(g, weight, out=rows)
                    rows.mul_(inv_sums.to(rows.dtype))
                if need_dw:
                    h_scaled = h * inv_sums.to(h.dtype)
                    if grad_weight is None:
                        grad_weight = (g.t() @ h_scaled).float()
                    elif g.dtype == torch.float32 and h.dtype == torch.float32:
                        grad_weight.addmm_(g.t(), h_scaled)
                    else:
                        grad_weight.add_((g.t() @ h_scaled).float())

        del z_buf, e_buf
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
