"""The chunked distillation losses equal the dense computation (values and student gradients).

Chunked losses run in fp32; the references run in fp64 on the same inputs, so the 1e-5 relative
tolerance measures only the chunked implementation's rounding.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from gemma_hf.distillation.losses import (
    dense_cross_entropy,
    dense_generalized_jsd,
    dense_sparse_cross_entropy,
    generalized_jsd,
    mix_with_next_token,
    next_token_mask,
    next_token_nll,
    sparse_cross_entropy,
    target_weights,
    teacher_distribution,
)
from gemma_hf.distillation.targets import sample_targets
from gemma_hf.model.loss import chunked_causal_lm_loss

RTOL = 1e-5
B, T, H_S, H_T, V = 2, 9, 8, 12, 37


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest error relative to the reference's largest entry."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def problem(seed=0, scale=3.0):
    """Student and teacher of different widths; logits large enough that caps 3 / 5 bite."""
    gen = torch.Generator().manual_seed(seed)
    s_h = (torch.randn(B, T, H_S, generator=gen) * scale).requires_grad_()
    s_w = torch.randn(V, H_S, generator=gen).requires_grad_()
    t_h = (torch.randn(B, T, H_T, generator=gen) * scale).requires_grad_()  # must get no gradient
    t_w = torch.randn(V, H_T, generator=gen).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, -2:] = False  # 13 valid positions: chunk 4 leaves a remainder
    return s_h, s_w, t_h, t_w, mask


def as_double(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


CAPS = [pytest.param(None, None, id="no-caps"), pytest.param(3.0, 5.0, id="caps-3-5")]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("s_cap,t_cap", CAPS)
def test_generalized_jsd_matches_dense(beta, temperature, s_cap, t_cap):
    s_h, s_w, t_h, t_w, mask = problem()
    kw = dict(beta=beta, temperature=temperature, student_softcap=s_cap, teacher_softcap=t_cap)
    loss = generalized_jsd(s_h, s_w, t_h, t_w, mask, chunk_size=4, **kw)
    loss.backward()
    assert t_h.grad is None and t_w.grad is None  # the teacher gets no gradient

    d_s_h, d_s_w, d_t_h, d_t_w = as_double(s_h, s_w, t_h, t_w)
    ref = dense_generalized_jsd(d_s_h, d_s_w, d_t_h, d_t_w, mask, **kw)
    ref.backward()
    assert ref.item() > 1e-3  # a real divergence, not a trivial zero
    assert abs(loss.item() - ref.item()) <= RTOL * abs(ref.item())
    assert rel(s_h.grad, d_s_h.grad) <= RTOL
    assert rel(s_w.grad, d_s_w.grad) <= RTOL


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_large_cap_over_temperature_takes_the_max_shift(beta):
    """cap / T > 43: the softmax needs the row maximum (exp(-2 cap / T) would underflow)."""
    s_h, s_w, t_h, t_w, mask = problem(seed=9, scale=20.0)
    kw = dict(beta=beta, temperature=0.5, student_softcap=30.0, teacher_softcap=50.0)
    loss = generalized_jsd(s_h, s_w, t_h, t_w, mask, chunk_size=4, **kw)
    loss.backward()
    d_s_h, d_s_w, d_t_h, d_t_w = as_double(s_h, s_w, t_h, t_w)
    ref = dense_generalized_jsd(d_s_h, d_s_w, d_t_h, d_t_w, mask, **kw)
    ref.backward()
    assert math.isfinite(loss.item()) and abs(loss.item() - ref.item()) <= RTOL * abs(ref.item())
    assert rel(s_h.grad, d_s_h.grad) <= RTOL and rel(s_w.grad, d_s_w.grad) <= RTOL
    ids = torch.randint(0, V, (B, T, 3), generator=torch.Generator().manual_seed(10))
    s_h.grad = s_w.grad = d_s_h.grad = d_s_w.grad = None
    sparse = sparse_cross_entropy(s_h, s_w, ids, torch.ones(B, T, 3), mask, temperature=0.5, softcap=30.0)
    sparse.backward()
    ref = dense_sparse_cross_entropy(d_s_h, d_s_w, ids, torch.ones(B, T, 3), mask, temperature=0.5, softcap=30.0)
    ref.backward()
    assert abs(sparse.item() - ref.item()) <= RTOL * abs(ref.item())
    assert rel(s_h.grad, d_s_h.grad) <= RTOL and rel(s_w.grad, d_s_w.grad) <= RTOL


def test_dense_reference_is_trls_generalized_jsd():
    """Our convention is TRL 1.16's GKDTrainer.generalized_jsd_loss, on the same (capped) logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRLExperimentalWarning: importing from trl.experimental
        from trl.experimental.gkd import GKDTrainer

    s_h, s_w, t_h, t_w, mask = problem()
    s_logits = torch.tanh(s_h @ s_w.t() / 3.0) * 3.0
    t_logits = torch.tanh(t_h @ t_w.t() / 5.0) * 5.0
    labels = torch.where(mask, torch.zeros(B, T, dtype=torch.long), torch.full((B, T), -100))
    for beta in (0.0, 0.3, 1.0):
        for temperature in (1.0, 0.7):
            ours = dense_generalized_jsd(s_h, s_w, t_h, t_w, mask, beta=beta, temperature=temperature,
                                         student_softcap=3.0, teacher_softcap=5.0)
            trl = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=labels, beta=beta,
                                                  temperature=temperature)
            assert abs(ours.item() - trl.item()) <= 1e-5 * abs(trl.item()), (beta, temperature)


def test_generalized_jsd_num_items_no_grad_and_upstream_scale():
    s_h, s_w, t_h, t_w, mask = problem(seed=1)
    kw = dict(beta=0.3, temperature=0.9, student_softcap=3.0, teacher_softcap=5.0, chunk_size=5)
    mean = generalized_jsd(s_h, s_w, t_h, t_w, mask, **kw)
    total = generalized_jsd(s_h, s_w, t_h, t_w, mask, num_items=1, **kw)
    assert abs(total.item() - mean.item() * mask.sum().item()) <= 1e-5 * total.item()
    with torch.no_grad():  # evaluation: same value, no gradient work
        assert generalized_jsd(s_h, s_w, t_h, t_w, mask, **kw).item() == mean.item()
    (2.5 * mean).backward()
    g_h, g_w = s_h.grad.clone(), s_w.grad.clone()
    s_h.grad = s_w.grad = None
    generalized_jsd(s_h, s_w, t_h, t_w, mask, **kw).backward()
    assert rel(g_h, 2.5 * s_h.grad) <= 1e-6 and rel(g_w, 2.5 * s_w.grad) <= 1e-6


def test_no_valid_position_gives_zero_loss_and_zero_gradient():
    s_h, s_w, t_h, t_w, mask = problem()
    loss = generalized_jsd(s_h, s_w, t_h, t_w, torch.zeros_like(mask), beta=0.5)
    loss.backward()
    assert loss.item() == 0.0 and s_h.grad.abs().max() == 0 and s_w.grad.abs().max() == 0


def test_mixed_dtypes_bf16_student_fp32_teacher():
    s_h, s_w, t_h, t_w, mask = problem(scale=1.0)
    s_h16 = s_h.detach().bfloat16().requires_grad_()
    s_w16 = s_w.detach().bfloat16().requires_grad_()
    loss = generalized_jsd(s_h16, s_w16, t_h, t_w, mask, beta=0.5, student_softcap=3.0, teacher_softcap=5.0,
                           chunk_size=4)
    loss.backward()
    assert loss.dtype == torch.float32 and s_h16.grad.dtype == torch.bfloat16 and s_w16.grad.dtype == torch.bfloat16
    ref = dense_generalized_jsd(s_h16.detach(), s_w16.detach(), t_h, t_w, mask, beta=0.5, student_softcap=3.0,
                                teacher_softcap=5.0)
    assert abs(loss.item() - ref.item()) <= 2e-2 * ref.item()  # bf16 products vs the fp32 reference


@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sparse_cross_entropy_matches_dense(cap, temperature):
    s_h, s_w, _, _, mask = problem(seed=2)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (B, T, 6), generator=gen)
    ids[..., 1] = ids[..., 0]  # duplicates count twice
    weights = torch.rand(B, T, 6, generator=gen)
    loss = sparse_cross_entropy(s_h, s_w, ids, weights, mask, temperature=temperature, softcap=cap, chunk_size=4)
    loss.backward()
    d_h, d_w = as_double(s_h, s_w)
    ref = dense_sparse_cross_entropy(d_h, d_w, ids, weights.double(), mask, temperature=temperature, softcap=cap)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= RTOL * abs(ref.item())
    assert rel(s_h.grad, d_h.grad) <= RTOL and rel(s_w.grad, d_w.grad) <= RTOL


@pytest.mark.parametrize("probs_dtype,tol", [(torch.float32, RTOL), (torch.float16, 1e-3)])
def test_topk_with_full_support_equals_dense_cross_entropy(probs_dtype, tol):
    """K = V top-k targets hold all of q: the renormalised sparse CE is -sum_x q log p_S (stored as
    float16, within its 2**-11 relative rounding)."""
    s_h, s_w, t_h, t_w, mask = problem(seed=4)
    q = teacher_distribution(t_h.detach(), t_w.detach(), temperature=0.7, softcap=5.0)
    logits = torch.tanh(t_h.detach() @ t_w.detach().t() / 5.0) * 5.0
    ids, probs = sample_targets(logits.reshape(-1, V), V, temperature=0.7, mode="topk")
    weights = target_weights("topk", probs.to(probs_dtype)).reshape(B, T, V)
    loss = sparse_cross_entropy(s_h, s_w, ids.reshape(B, T, V), weights, mask, softcap=3.0, chunk_size=4)
    loss.backward()
    d_h, d_w = as_double(s_h, s_w)
    ref = dense_cross_entropy(d_h, d_w, q.double(), mask, softcap=3.0)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= tol * ref.item()
    assert rel(s_h.grad, d_h.grad) <= tol and rel(s_w.grad, d_w.grad) <= tol


def test_sampled_estimator_is_unbiased():
    """Mean over R independent draws of K ids ~ q of -(1/K) sum log p_S(id) = -sum_x q log p_S.

    Tolerance: 4 standard errors of that mean, the standard error estimated from the R draws
    themselves (a false failure has probability ~6e-5 for an arbitrary seed; this seed is fixed).
    """
    R, K = 400, 4
    s_h, s_w, t_h, t_w, mask = problem(seed=5, scale=1.0)
    logits = (torch.tanh(t_h.detach() @ t_w.detach().t() / 5.0) * 5.0)[mask]  # [13, V]
    q = torch.softmax(logits / 0.8, -1)
    gen = torch.Generator().manual_seed(6)
    ids = torch.stack([sample_targets(logits, K, temperature=0.8, mode="sampled", generator=gen)[0]
                       for _ in range(R)])  # [R, 13, K]
    weights = target_weights("sampled", torch.ones(R, ids.shape[1], K))
    hidden = s_h.detach()[mask]
    # All draws in one call (draws as the batch dimension): the mean of the per-draw estimates.
    mean_estimate = sparse_cross_entropy(hidden.expand(R, -1, -1), s_w.detach(), ids, weights, None)
    log_ps = torch.log_softmax(hidden.double() @ s_w.detach().double().t(), -1)
    per_draw = -(log_ps.gather(-1, ids.long().permute(1, 0, 2).reshape(ids.shape[1], -1))
                 .reshape(ids.shape[1], R, K).mean(-1)).mean(0)  # [R]
    dense = -(q.double() * log_ps).sum(-1).mean()
    stderr = per_draw.std() / math.sqrt(R)
    assert abs(mean_estimate.item() - per_draw.mean().item()) <= 1e-5 * dense.item()
    assert abs(per_draw.mean() - dense) <= 4 * stderr, (per_draw.mean().item(), dense.item(), stderr.item())


def test_target_weights():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(target_weights("sampled", probs), torch.full((2, 4), 0.25))
    topk = target_weights("topk", probs)
    assert torch.allclose(topk[0], torch.tensor([0.5, 0.25, 0.25, 0.0])) and torch.equal(topk[1], torch.zeros(4))
    with pytest.raises(ValueError, match="unknown cache mode 'top'"):
        target_weights("top", probs)


def test_mix_with_next_token_equals_separate_losses():
    s_h, s_w, _, _, mask = problem(seed=7)
    gen = torch.Generator().manual_seed(8)
    input_ids = torch.randint(0, V, (B, T), generator=gen)
    ids = torch.randint(0, V, (B, T, 4), generator=gen)
    weights = target_weights("sampled", torch.ones(B, T, 4))
    next_ids = torch.cat([input_ids[:, 1:], torch.zeros(B, 1, dtype=torch.long)], dim=1)
    mask = mask & next_token_mask(torch.where(mask, input_ids, -100))
    mixed_ids, mixed_w = mix_with_next_token(ids, weights, next_ids, 0.3)
    mixed = sparse_cross_entropy(s_h, s_w, mixed_ids, mixed_w, mask, softcap=3.0)
    distill = sparse_cross_entropy(s_h, s_w, ids, weights, mask, softcap=3.0)
    nll = chunked_causal_lm_loss(s_h, s_w, shift_labels=torch.where(mask, next_ids, -100), softcap=3.0)
    assert abs(mixed.item() - (0.7 * distill + 0.3 * nll).item()) <= 1e-5 * mixed.item()


def test_next_token_nll_is_the_causal_lm_loss():
    s_h, s_w, _, _, mask = problem(seed=9)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(10))
    want = chunked_causal_lm_loss(s_h, s_w, shift_labels=torch.where(mask, ids, -100), softcap=3.0)
    assert abs(next_token_nll(s_h, s_w, ids, mask, softcap=3.0).item() - want.item()) <= 1e-5 * want.item()


def test_next_token_mask_is_trls_shift():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 10]])
    assert next_token_mask(labels).tolist() == [[False, True, True, False, False], [True, True, True, True, False]]


def test_argument_errors():
    s_h, s_w, t_h, t_w, mask = problem()
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd(s_h, s_w, t_h, t_w, mask, beta=1.5)
    with pytest.raises(ValueError, match="same sequences"):
        generalized_jsd(s_h, s_w, t_h[:, :-1], t_w, mask, beta=0.5)
    with pytest.raises(ValueError, match="share one vocabulary"):
        generalized_jsd(s_h, s_w, t_h, t_w[:-1], mask, beta=0.5)
    with pytest.raises(ValueError, match="target_ids must lie"):
        sparse_cross_entropy(s_h, s_w, torch.full((B, T, 2), V), torch.ones(B, T, 2), mask)
