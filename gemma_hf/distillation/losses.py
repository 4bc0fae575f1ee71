"""Distillation losses from hidden states, chunked over positions: never [B, T, V] log-probs.

Two families, both computed from final hidden states [B, T, H] and lm_head weights [V, H], chunk
by chunk over the valid positions, with the model's final soft-cap (cap * tanh(logits / cap))
applied before the temperature:

* :func:`generalized_jsd` -- the on-policy (GKD, Agarwal et al. 2024) loss between a student and
  a teacher, both computed on the fly;
* :func:`sparse_cross_entropy` -- the offline loss against K stored teacher targets per position
  (Gemma 2 report, section 3.2: minimise -sum_x P_T(x|c) log P_S(x|c), the teacher run once and
  only a sampled subset of its probabilities stored), with :func:`target_weights` giving the
  estimator of each cache mode.

The generalised JSD, TRL's convention
-------------------------------------
Exactly TRL 1.16's ``GKDTrainer.generalized_jsd_loss`` (trl/experimental/gkd/gkd_trainer.py) and
``trl.kernels.chunked_divergence``: with p_S = softmax(softcap_S(z_S) / T), p_T likewise,

    beta == 0:      KL(p_T || p_S) = sum_x p_T (log p_T - log p_S)           forward KL
    beta == 1:      KL(p_S || p_T) = sum_x p_S (log p_S - log p_T)           reverse KL
    0 < beta < 1:   beta KL(p_T || m) + (1 - beta) KL(p_S || m),
                    m = beta p_T + (1 - beta) p_S                             JSD(beta)

(the paper's JSD(beta) with P = teacher, Q = student). Note the ends are special cases, not the
limits: JSD(beta) tends to 0 as beta -> 0 or 1, while beta = 0 and beta = 1 are the full KLs.
The result is the sum over valid positions divided by the number of valid positions (at least 1,
like TRL: a batch with no valid position gives 0, not nan) or by ``num_items`` when given
(gradient accumulation). Positions are not shifted here: position t compares the two models'
next-token distributions at t; :func:`next_token_mask` turns TRL-style labels into that mask.

Gradients (to the student's hidden states and head weight only; the teacher gets none), with
G = dL/d(z/T) per row:  forward KL  G = p_S - p_T;  reverse KL  G = p_S (log p_S - log p_T - KL);
JSD  G = (1 - beta) p_S (log p_S - log m - KL(p_S || m));  then times (1 - tanh^2) for the
soft-cap and 1/T, and through the head: dh = G' W, dW = G'^T h.

How the chunks run (and why not TRL's ChunkedDivergenceFunction)
----------------------------------------------------------------
TRL 1.16 ships ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction``, which also works
from hidden states. We do not reuse it, for these measured/read reasons:

1. Work. It tiles the vocabulary ([4096 tokens x 32768 vocab] tiles) with an online log-sum-exp,
   so it must project twice in the forward for the JSD (statistics pass, then divergence pass)
   and once more in the backward: 6 head projections + 2 gradient matmuls for JSD (4 + 2 for a
   KL). Here a chunk holds whole vocabulary rows ([chunk, V] per model), so the normalisers are
   known at once and the gradient is computed in the forward while the block is live (as in
   gemma_hf/model/loss.py): 2 projections + 2 gradient matmuls whatever beta. On CPU, where the
   head matmuls dominate, that is about half the time.
2. Memory. Its tile size is a module constant (two fp32 [4096, 32768] tiles = 1 GiB in forward
   and again in backward); ours is ``chunk_size`` rows ([chunk, V] fp32 per model, 256 MiB at
   the default) and the elementwise work runs a few rows at a time in small scratch buffers.
3. Masking and normalisation (mask, num_items) are ours to match TRL's GKD loss.
What we give up: its Triton kernels on CUDA and its DeepSpeed ZeRO-3 head gathering
(``maybe_gather_lm_head_ctx``); here the full head weights must be present on the device.

Because the gradient is computed during the forward (only when autograd will want it:
``torch.is_grad_enabled()`` and a student tensor requires grad), the backward only scales the
saved [N, H] and [V, H] gradients by the incoming gradient. Peak extra memory: one [chunk, V]
fp32 block per model, a few [rows, V] scratch rows, and the fp32 [V, H] student head gradient.

Precision: projections run in the head weight's dtype (a bf16 head gives a bf16 matmul with fp32
accumulation, then fp32 logits); the soft-caps, temperature, softmaxes, divergences and the
gradient accumulation over chunks are fp32. Student and teacher may have different hidden
widths and dtypes (each hidden chunk is cast to its own head's dtype). The soft-cap is computed
as in model/loss.py through r = sigmoid(-2y/cap) (tanh(y/cap) = 1 - 2r, derivative 4r(1 - r)):
one sigmoid pass costs a third of a tanh pass on CPU; the price is an absolute rounding of about
2 cap 2**-25 in a capped logit near 0, far below the tests' 1e-5 relative tolerance. With
cap/T <= 43 the softmax shift is the bound cap/T and the row-maximum pass is skipped. The
JSD's mixture is log(lerp(p_S, p_T, beta)) floored at the smallest normal float (one log pass
instead of a logaddexp pass, which costs three).

The offline estimators
----------------------
A cache stores, per position, K token ids and the teacher's probabilities q(id) of the
temperature-scaled teacher distribution q = softmax(softcap_T(z_T) / T_cache). The loss is

    sparse_cross_entropy = -sum_k w_k log p_S(id_k),   p_S = softmax(softcap_S(z_S) / T)

with weights from :func:`target_weights`:

* ``"sampled"``: the K ids were drawn with replacement from q, w_k = 1/K (duplicates counted).
  E[-(1/K) sum_k log p_S(id_k)] = -sum_x q(x) log p_S(x): an unbiased estimator of the dense
  cross-entropy (and of its gradient), variance Var_q[log p_S] / K.
* ``"topk"``: the K most likely ids, w_k = q_k / sum_j q_j: the cross-entropy to q truncated to
  its top K and renormalised. Biased: it ignores the tail mass 1 - sum_j q_j (the student gets
  no signal to keep probability there) and overweights the head by 1 / sum_j q_j; exact when
  the top K hold all the mass (K = V).

``temperature`` in :func:`sparse_cross_entropy` is the student's (usually 1.0); the teacher's is
baked into the cache. The next-token NLL on the data alone is the same loss with one target of
weight 1 (:func:`next_token_nll`). Mixing it in, loss = (1 - w) * distill + w * NLL,
needs no second pass over the head: the NLL is a sparse target with K = 1 (the next token, weight
1), so :func:`mix_with_next_token` appends it to the targets with weight w and scales the
teacher's weights by (1 - w); one :func:`sparse_cross_entropy` call then gives the mixture. (Or
call gemma_hf.model.loss.chunked_causal_lm_loss separately and add: same value, twice the head
cost.)
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

# Elements of one model's [chunk, vocab] fp32 block (2**26 floats = 256 MiB: 262 rows at V = 256000).
# The JSD holds two (student and teacher); model/loss.py's cross-entropy uses 3 * 2**25 for one.
CHUNK_ELEMENTS = 2**26
# Elements of each scratch buffer the elementwise passes work in, a few rows at a time (2 MiB: two
# rows at V = 256000, so the ~20 passes over a row block run in cache; at T = 256 on this 2-core
# machine 2**19 was 10-40% faster than 2**21, and 2**18 no faster than 2**19).
SUB_ELEMENTS = 2**19

MODES = ("sampled", "topk")


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk so that one model's [chunk, V] fp32 block holds CHUNK_ELEMENTS floats."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def next_token_mask(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """[B, T] bool: position t counts when labels[t + 1] is not ignored (the last position never).

    TRL's GKD compares logits[:, :-1] with labels[:, 1:]; the same positions, full length.
    """
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    mask[..., :-1] = labels[..., 1:] != ignore_index
    return mask


# ----------------------------------------------------------------------------- shared helpers
def project_scaled(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, scale: float | None = None) -> None:
    """out[c, V] (fp32) = (h @ weight^T) * scale, in the weight's dtype, result in fp32."""
    if h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    if weight.dtype == torch.float32:
        torch.matmul(h if scale is None else h * scale, weight.t(), out=out)  # scale rides on [c, H]
        return
    out.copy_(h @ weight.t())
    if scale is not None:
        out.mul_(scale)


# With a soft-cap and temperature T, the logits z = cap tanh(y / cap) / T lie in (-cap/T, cap/T):
# exp(z - cap/T) lies in [exp(-2 cap/T), 1], a normal fp32 number while cap/T <= 43 (exp(-86) >
# 1.2e-38), so the row maximum pass is skipped and cap/T is the shift (as in model/loss.py).
MAX_CAP_OVER_T_WITHOUT_SHIFT = 43.0


def _project_for_softmax(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, cap: float | None,
                         inv_t: float) -> None:
    """out <- what _log_softmax_ reads: r = sigmoid(-2 y / cap) with a cap, else y / T (y = h W^T)."""
    if cap is None:
        project_scaled(h, weight, out, inv_t)
    else:
        project_scaled(h, weight, out, -2.0 / cap)
        out.sigmoid_()


def _log_softmax_(src: torch.Tensor, log_p: torch.Tensor, p: torch.Tensor, cap: float | None, inv_t: float,
                  normalize: bool = True) -> None:
    """Row-wise log_p <- log softmax(z), p <- softmax(z) (unnormalised exp(z - shift) if not normalize).

    src holds r = sigmoid(-2y/cap) (capped: tanh(y/cap) = 1 - 2r, so z = cap/T - (2 cap/T) r, one
    sigmoid pass instead of a tanh pass, a third of its cost on CPU) or z = y/T (no cap). `log_p`
    may be `src` itself (in place) when src is not needed afterwards.
    """
    if cap is not None:
        slope = -2.0 * cap * inv_t
        if cap * inv_t <= MAX_CAP_OVER_T_WITHOUT_SHIFT:
            torch.mul(src, slope, out=log_p)  # z - cap/T
        else:
            torch.add(src.amin(dim=1, keepdim=True) * -slope, src, alpha=slope, out=log_p)  # z - max z
    else:
        torch.sub(src, src.amax(dim=1, keepdim=True), out=log_p)
    torch.exp(log_p, out=p)
    sums = p.sum(dim=1, keepdim=True)
    log_p.sub_(sums.log())
    if normalize:
        p.div_(sums)


def _chain_cap_(src: torch.Tensor, g: torch.Tensor, cap: float | None) -> None:
    """src <- dL/dy up to the constant factor (4 with a cap) / T: g (1 - tanh^2) = g 4 r (1 - r)."""
    if cap is not None:
        src.addcmul_(src, src, value=-1.0).mul_(g)  # r (1 - r) g
    else:
        src.copy_(g)


def _cap_factor(cap: float | None) -> float:
    return 4.0 if cap is not None else 1.0


def _flatten_valid(hidden: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    flat = hidden.reshape(-1, hidden.shape[-1])
    if mask is None:
        return flat
    if mask.shape != hidden.shape[:-1]:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but {name} has positions {tuple(hidden.shape[:-1])}.")
    return flat[mask.reshape(-1).to(device=flat.device, dtype=torch.bool)]


def _denominator(count: int | torch.Tensor, num_items, device) -> torch.Tensor | float:
    if num_items is not None:
        if torch.is_tensor(num_items):
            return num_items.to(device=device, dtype=torch.float32)
        return float(num_items)
    return float(max(int(count), 1))  # like TRL's GKD loss: no valid position gives 0, not nan


def _needs_grads(*tensors: torch.Tensor) -> tuple[bool, ...]:
    """Whether autograd will ask for each gradient (Function.forward cannot tell: under no_grad its
    ctx.needs_input_grad still reports requires_grad)."""
    enabled = torch.is_grad_enabled()
    return tuple(enabled and t.requires_grad for t in tensors)


def _finish_grads(ctx, grad_hidden, grad_weight, weight, scale):
    """Scale the forward-computed gradients once, cast dW to the weight's dtype, save for backward."""
    if grad_hidden is not None:
        grad_hidden.mul_(scale)
    if grad_weight is not None:
        grad_weight.mul_(scale)
        if grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
    ctx.save_for_backward(grad_hidden, grad_weight)


def _accumulate(g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None,
                grad_weight: torch.Tensor | None, need_dw: bool) -> torch.Tensor | None:
    """rows <- g @ W (dh of the chunk); returns grad_weight + g^T h (fp32 accumulator)."""
    g = g if g.dtype == weight.dtype else g.to(weight.dtype)
    if rows is not None:
        if rows.dtype == weight.dtype:
            torch.matmul(g, weight, out=rows)
        else:
            rows.copy_(g @ weight)
    if need_dw:
        hw = h if h.dtype == weight.dtype else h.to(weight.dtype)
        if grad_weight is None:
            grad_weight = (g.t() @ hw).float()
        elif g.dtype == torch.float32:
            grad_weight.addmm_(g.t(), hw)
        else:
            grad_weight.add_((g.t() @ hw).float())
    return grad_weight


def _scaled_backward(ctx, grad_output):
    grad_hidden, grad_weight = ctx.saved_tensors
    # A host-side check is free on CPU; elsewhere always multiply (avoids a device sync).
    if not (grad_output.device.type == "cpu" and grad_output.item() == 1.0):
        grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        grad_weight = grad_weight * grad_output.to(grad_weight.dtype) if grad_weight is not None else None
    return grad_hidden, grad_weight


# ----------------------------------------------------------------------------- generalised JSD
class ChunkedGeneralizedJSD(torch.autograd.Function):
    """Sum over rows of JSD(beta) (TRL's convention) between student and teacher, / denominator."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, beta, temperature, s_cap, t_cap, chunk_size,
                denominator, need_dh, need_dw):
        n, vocab = s_hidden.shape[0], s_weight.shape[0]
        if t_weight.shape[0] != vocab:
            raise ValueError(f"student head has {vocab} rows, teacher head {t_weight.shape[0]}: the two models must "
                             "share one vocabulary.")
        device = s_hidden.device
        mode = "forward_kl" if beta == 0.0 else "reverse_kl" if beta == 1.0 else "jsd"
        inv_t = 1.0 / temperature
        total = torch.zeros((), dtype=torch.float32, device=device)
        grad_hidden = torch.empty(s_hidden.shape, dtype=s_hidden.dtype, device=device) if need_dh else None
        grad_weight = None  # fp32 [V, H_s], created by the first chunk's product
        need_grad = need_dh or need_dw

        rows_max = max(1, min(chunk_size, n))
        sub = max(1, min(rows_max, SUB_ELEMENTS // vocab))
        s_buf = torch.empty(rows_max, vocab, dtype=torch.float32, device=device)  # projection -> dL/dy_S
        t_buf = torch.empty(rows_max, vocab, dtype=torch.float32, device=device)  # projection -> log p_T
        log_ps, ps, pt, work = (torch.empty(sub, vocab, dtype=torch.float32, device=device) for _ in range(4))
        tiny = torch.finfo(torch.float32).tiny

        for start in range(0, n, chunk_size):
            h_s, h_t = s_hidden[start:start + chunk_size], t_hidden[start:start + chunk_size]
            c = h_s.shape[0]
            ys, yt = s_buf[:c], t_buf[:c]
            _project_for_softmax(h_s, s_weight, ys, s_cap, inv_t)
            _project_for_softmax(h_t, t_weight, yt, t_cap, inv_t)
            for r0 in range(0, c, sub):
                sb, tb = ys[r0:r0 + sub], yt[r0:r0 + sub]
                r = sb.shape[0]
                a, p_s, p_t, x = log_ps[:r], ps[:r], pt[:r], work[:r]
                _log_softmax_(sb, a, p_s, s_cap, inv_t)  # sb keeps r (or z) for the cap's derivative
                _log_softmax_(tb, tb, p_t, t_cap, inv_t, normalize=mode != "reverse_kl")
                if mode == "forward_kl":
                    total += torch.sub(tb, a, out=x).mul_(p_t).sum()
                    g = p_s.sub_(p_t)  # G = p_S - p_T
                elif mode == "reverse_kl":
                    torch.sub(a, tb, out=x)  # log p_S - log p_T
                    kl = torch.mul(p_s, x, out=p_t).sum(dim=1, keepdim=True)
                    total += kl.sum()
                    g = x.sub_(kl).mul_(p_s)  # G = p_S (log p_S - log p_T - KL)
                else:
                    # log m = log((1 - beta) p_S + beta p_T), floored at the smallest normal float so that
                    # rows where both underflow give p (log p - log m) = 0 * finite = 0, not nan.
                    torch.lerp(p_s, p_t, beta, out=x).clamp_min_(tiny).log_()
                    tb.sub_(x)  # log p_T - log m
                    a.sub_(x)  # log p_S - log m
                    kl_s = torch.mul(p_s, a, out=x).sum(dim=1, keepdim=True)
                    kl_t = torch.mul(p_t, tb, out=x).sum(dim=1, keepdim=True)
                    total += beta * kl_t.sum() + (1.0 - beta) * kl_s.sum()
                    g = a.sub_(kl_s).mul_(p_s)  # G / (1 - beta) = p_S (log p_S - log m - KL(p_S || m))
                if need_grad:
                    _chain_cap_(sb, g, s_cap)
            if need_grad:
                rows = grad_hidden[start:start + c] if need_dh else None
                grad_weight = _accumulate(ys, h_s, s_weight, rows, grad_weight, need_dw)

        del s_buf, t_buf, log_ps, ps, pt, work
        if need_dw and grad_weight is None:  # no valid position
            grad_weight = torch.zeros(s_weight.shape, dtype=torch.float32, device=device)
        # The cap's derivative factor (4 r (1 - r) = 1 - tanh^2), 1/T from z = softcap(y) / T, (1 - beta)
        # from the JSD's G and 1/denominator: one scale, applied once on [N, H] and [V, H].
        scale = _cap_factor(s_cap) * inv_t * ((1.0 - beta) if mode == "jsd" else 1.0) / denominator
        _finish_grads(ctx, grad_hidden, grad_weight, s_weight, scale)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = _scaled_backward(ctx, grad_output)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None, None


def generalized_jsd(
    student_hidden: torch.Tensor,
    student_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head_weight: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    beta: float,
    temperature: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    num_items: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """GKD's generalised JSD (TRL's convention, see the module docstring) from hidden states.

    student_hidden [B, T, H_s], student_head_weight [V, H_s], teacher_hidden [B, T, H_t],
    teacher_head_weight [V, H_t]; mask [B, T] (bool or 0/1; None: every position) marks the
    positions that count. Returns the mean over valid positions (sum / num_items when given).
    Gradients flow to the student's hidden states and head weight only.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student hidden states have positions {tuple(student_hidden.shape[:-1])}, teacher "
                         f"{tuple(teacher_hidden.shape[:-1])}: both models must see the same sequences.")
    s = _flatten_valid(student_hidden, mask, "student_hidden")
    t = _flatten_valid(teacher_hidden, mask, "teacher_hidden").to(s.device).detach()
    denominator = _denominator(s.shape[0], num_items, s.device)
    need_dh, need_dw = _needs_grads(student_hidden, student_head_weight)
    chunk = chunk_size or default_chunk_size(student_head_weight.shape[0])
    return ChunkedGeneralizedJSD.apply(s, student_head_weight, t, teacher_head_weight.detach(), float(beta),
                                       float(temperature), student_softcap, teacher_softcap, chunk, denominator,
                                       need_dh, need_dw)


# ----------------------------------------------------------------------------- sparse cross-entropy
class ChunkedSparseCrossEntropy(torch.autograd.Function):
    """Sum over rows of -sum_k w_k log softmax(softcap(h W^T) / T)[id_k], / denominator."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, weights, temperature, cap, chunk_size, denominator, need_dh, need_dw):
        n, vocab = hidden.shape[0], weight.shape[0]
        device = hidden.device
        inv_t = 1.0 / temperature
        total = torch.zeros((), dtype=torch.float32, device=device)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if need_dh else None
        grad_weight = None
        need_grad = need_dh or need_dw

        rows_max = max(1, min(chunk_size, n))
        sub = max(1, min(rows_max, SUB_ELEMENTS // vocab))
        buf = torch.empty(rows_max, vocab, dtype=torch.float32, device=device)  # projection -> dL/dy
        log_p_buf, p_buf = (torch.empty(sub, vocab, dtype=torch.float32, device=device) for _ in range(2))
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]
            c = h.shape[0]
            y = buf[:c]
            _project_for_softmax(h, weight, y, cap, inv_t)
            for r0 in range(0, c, sub):
                yb = y[r0:r0 + sub]
                r = yb.shape[0]
                idx, w = ids[start + r0:start + r0 + r], weights[start + r0:start + r0 + r]
                log_p, p = log_p_buf[:r], p_buf[:r]
                _log_softmax_(yb, log_p, p, cap, inv_t)
                total -= (w * log_p.gather(1, idx)).sum()  # sum_k w_k (-log p[id_k])
                if need_grad:
                    g = p.mul_(w.sum(dim=1, keepdim=True))  # G = (sum_k w_k) p - scatter(w)
                    g.scatter_add_(1, idx, -w)
                    _chain_cap_(yb, g, cap)
            if need_grad:
                rows = grad_hidden[start:start + c] if need_dh else None
                grad_weight = _accumulate(y, h, weight, rows, grad_weight, need_dw)

        del buf, log_p_buf, p_buf
        if need_dw and grad_weight is None:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device)
        _finish_grads(ctx, grad_hidden, grad_weight, weight, _cap_factor(cap) * inv_t / denominator)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = _scaled_backward(ctx, grad_output)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def sparse_cross_entropy(
    student_hidden: torch.Tensor,
    head_weight: torch.Tensor,
    target_ids: torch.Tensor,
    target_weights: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    num_items: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """-sum_k w_k log softmax(softcap(h W^T) / T)[id_k] per position, mean over valid positions.

    student_hidden [B, T, H], head_weight [V, H], target_ids [B, T, K] (any integer dtype),
    target_weights [B, T, K] (see :func:`target_weights`), mask [B, T] (None: all). Chunked over
    positions: one [chunk, V] fp32 block at a time, one log-sum-exp per position, K gathers.
    Divides by the number of valid positions (at least 1) or by `num_items` when given.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    lead = student_hidden.shape[:-1]
    if target_ids.shape[:-1] != lead or target_weights.shape != target_ids.shape:
        raise ValueError(f"target_ids {tuple(target_ids.shape)} and target_weights {tuple(target_weights.shape)} "
                         f"must both be {tuple(lead)} + (K,).")
    hidden = _flatten_valid(student_hidden, mask, "student_hidden")
    k = target_ids.shape[-1]
    ids = target_ids.reshape(-1, k)
    weights = target_weights.reshape(-1, k)
    if mask is not None:
        valid = mask.reshape(-1).to(dtype=torch.bool, device=ids.device)
        ids, weights = ids[valid], weights[valid]
    ids = ids.to(device=hidden.device, dtype=torch.int64)
    weights = weights.to(device=hidden.device, dtype=torch.float32)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= head_weight.shape[0]):
        raise ValueError(f"target_ids must lie in [0, {head_weight.shape[0]}) at valid positions.")
    denominator = _denominator(hidden.shape[0], num_items, hidden.device)
    need_dh, need_dw = _needs_grads(student_hidden, head_weight)
    chunk = chunk_size or default_chunk_size(head_weight.shape[0])
    return ChunkedSparseCrossEntropy.apply(hidden, head_weight, ids, weights, float(temperature), softcap, chunk,
                                           denominator, need_dh, need_dw)


def target_weights(mode: str, probs: torch.Tensor) -> torch.Tensor:
    """Per-target weights of the cache's estimator, fp32 [..., K] (see the module docstring).

    "sampled": 1/K each (ids drawn with replacement from q; unbiased for -sum_x q log p_S).
    "topk": q_k / sum_j q_j (the truncated, renormalised teacher distribution; biased).
    Rows whose probabilities are all zero (padding) get zero weights in topk mode.
    """
    probs = probs.float()
    if mode == "sampled":
        return torch.full_like(probs, 1.0 / probs.shape[-1])
    if mode == "topk":
        return probs / probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    raise ValueError(f"unknown cache mode {mode!r}; expected one of {MODES}.")


def next_token_nll(hidden: torch.Tensor, head_weight: torch.Tensor, token_ids: torch.Tensor, mask: torch.Tensor | None,
                   *, softcap: float | None = None) -> torch.Tensor:
    """Mean NLL of token_ids [B, T] where hidden[b, t] predicts token_ids[b, t] (the data's next
    tokens, e.g. a completion's): :func:`sparse_cross_entropy` with one target of weight 1, T = 1."""
    return sparse_cross_entropy(hidden, head_weight, token_ids.unsqueeze(-1),
                                torch.ones_like(token_ids, dtype=torch.float32).unsqueeze(-1), mask, temperature=1.0,
                                softcap=softcap)


def mix_with_next_token(target_ids: torch.Tensor, target_weights: torch.Tensor, next_ids: torch.Tensor,
                        nll_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for loss = (1 - nll_weight) * distillation + nll_weight * NLL(next token), in one pass.

    next_ids [B, T]: the token each position predicts (input_ids shifted left). Returns
    target_ids [B, T, K + 1] and target_weights [B, T, K + 1] for :func:`sparse_cross_entropy`.
    """
    if not 0.0 <= nll_weight <= 1.0:
        raise ValueError(f"nll_weight must be in [0, 1], got {nll_weight}.")
    ids = torch.cat([target_ids, next_ids.unsqueeze(-1).to(target_ids.dtype)], dim=-1)
    weights = torch.cat([target_weights.float() * (1.0 - nll_weight),
                         torch.full_like(next_ids, nll_weight, dtype=torch.float32).unsqueeze(-1)], dim=-1)
    return ids, weights


# ----------------------------------------------------------------------------- dense references
def _dense_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Full soft-capped logits in fp32 (fp64 when the inputs are fp64: the tests' exact reference)."""
    dtype = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _dense_reduce(per_position: torch.Tensor, mask: torch.Tensor | None, num_items) -> torch.Tensor:
    if mask is not None:
        per_position = per_position[mask.to(dtype=torch.bool, device=per_position.device)]
    return per_position.sum() / _denominator(per_position.numel(), num_items, per_position.device)


def dense_generalized_jsd(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, mask, *, beta,
                          temperature=1.0, student_softcap=None, teacher_softcap=None, num_items=None):
    """Reference: :func:`generalized_jsd` from full [B, T, V] fp32 logits (tests only: memory!)."""
    log_ps = F.log_softmax(_dense_logits(student_hidden, student_head_weight, student_softcap) / temperature, -1)
    with torch.no_grad():
        log_pt = F.log_softmax(_dense_logits(teacher_hidden, teacher_head_weight, teacher_softcap) / temperature, -1)
    if beta == 0:
        per = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    elif beta == 1:
        per = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    else:
        log_m = torch.logaddexp(log_ps + math.log1p(-beta), log_pt + math.log(beta))
        per = (beta * (log_pt.exp() * (log_pt - log_m)).sum(-1)
               + (1 - beta) * (log_ps.exp() * (log_ps - log_m)).sum(-1))
    return _dense_reduce(per, mask, num_items)


def dense_cross_entropy(student_hidden, head_weight, target_probs, mask, *, temperature=1.0, softcap=None,
                        num_items=None):
    """Reference: -sum_x q(x) log p_S(x) per position with a dense target distribution q [B, T, V]."""
    log_ps = F.log_softmax(_dense_logits(student_hidden, head_weight, softcap) / temperature, -1)
    return _dense_reduce(-(target_probs.to(log_ps.dtype) * log_ps).sum(-1), mask, num_items)


def dense_sparse_cross_entropy(student_hidden, head_weight, target_ids, target_weights, mask, *, temperature=1.0,
                               softcap=None, num_items=None):
    """Reference: :func:`sparse_cross_entropy` from full logits."""
    log_ps = F.log_softmax(_dense_logits(student_hidden, head_weight, softcap) / temperature, -1)
    per = -(target_weights.to(log_ps.dtype) * log_ps.gather(-1, target_ids.long())).sum(-1)
    return _dense_reduce(per, mask, num_items)


def teacher_distribution(teacher_hidden, teacher_head_weight, *, temperature=1.0, softcap=None) -> torch.Tensor:
    """Reference: q = softmax(softcap(h W^T) / T) as a dense [..., V] fp32 tensor (tests only)."""
    return F.softmax(_dense_logits(teacher_hidden, teacher_head_weight, softcap) / temperature, -1)


__all__ = [
    "generalized_jsd",
    "sparse_cross_entropy",
    "target_weights",
    "mix_with_next_token",
    "next_token_nll",
    "next_token_mask",
    "default_chunk_size",
    "ChunkedGeneralizedJSD",
    "ChunkedSparseCrossEntropy",
    "dense_generalized_jsd",
    "dense_cross_entropy",
    "dense_sparse_cross_entropy",
    "teacher_distribution",
    "MODES",
]
