"""The chunked soft-capped cross-entropy equals the unfused computation (loss and gradients)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from gemma_hf.model.loss import chunked_causal_lm_loss
from tiny import make_ours, make_pair, random_ids

RTOL = 1e-5


def reference_loss(hidden, weight, labels, softcap, num_items_in_batch=None, shift_labels=None):
    """What stock transformers computes: full logits, soft-cap, fp32 cross-entropy."""
    logits = hidden @ weight.t()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100, reduction=reduction)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def case(seed=0, batch=3, seq=11, hidden=16, vocab=50):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=gen) * 2
    w = torch.randn(vocab, hidden, generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, :4] = -100
    labels[2, -3:] = -100
    return h, w, labels


@pytest.mark.parametrize("softcap", [None, 30.0, 2.0, 100.0])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
@pytest.mark.parametrize("num_items", [None, 17])
def test_loss_and_gradients_equal_unfused(softcap, chunk_size, num_items):
    h, w, labels = case()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ours = chunked_causal_lm_loss(h1, w1, labels, softcap, num_items_in_batch=num_items, chunk_size=chunk_size)
    ref = reference_loss(h2, w2, labels, softcap, num_items_in_batch=num_items)
    assert abs(ours.item() - ref.item()) <= RTOL * abs(ref.item())
    (ours * 1.7).backward()  # a non-unit upstream gradient
    (ref * 1.7).backward()
    assert rel(h1.grad, h2.grad) <= RTOL
    assert rel(w1.grad, w2.grad) <= RTOL


@pytest.mark.parametrize("softcap", [None, 30.0, 100.0])
@pytest.mark.parametrize("sub_rows", [1, 3])
def test_elementwise_sub_blocks_equal_unfused(monkeypatch, softcap, sub_rows):
    """The elementwise passes run a few rows at a time inside each chunk (uneven last block too)."""
    from gemma_hf.model import loss as loss_module

    h, w, labels = case(seed=4)
    monkeypatch.setattr(loss_module, "SUB_ELEMENTS", sub_rows * w.shape[0])
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ours = chunked_causal_lm_loss(h1, w1, labels, softcap, chunk_size=8)
    ref = reference_loss(h2, w2, labels, softcap)
    assert abs(ours.item() - ref.item()) <= RTOL * abs(ref.item())
    ours.backward()
    ref.backward()
    assert rel(h1.grad, h2.grad) <= RTOL
    assert rel(w1.grad, w2.grad) <= RTOL


@pytest.mark.parametrize("softcap", [30.0, 43.0, 50.0])
def test_every_logit_at_minus_cap_does_not_underflow(softcap):
    """All capped logits at -cap: the shift-free sum exp(-2 cap) * V must stay a normal fp32 number
    (caps up to 43); above that the max-shift path takes over. The loss is then exactly log(V)."""
    vocab = 262144
    h = -torch.ones(1, 4, 8)
    w = torch.ones(vocab, 8) * 1e4  # raw logits -8e4: every capped logit is -cap
    labels = torch.randint(0, vocab, (1, 4), generator=torch.Generator().manual_seed(0))
    h1 = h.clone().requires_grad_()
    loss = chunked_causal_lm_loss(h1, w, labels, softcap, chunk_size=2)
    loss.backward()
    assert abs(loss.item() - torch.log(torch.tensor(float(vocab))).item()) <= 1e-5 * loss.item()
    assert torch.isfinite(h1.grad).all()


@pytest.mark.parametrize("softcap", [30.0, 60.0])
def test_no_overflow_with_huge_logits_and_large_vocab(softcap):
    """Without the max-shift, exp(cap) summed over 262k entries must stay finite in fp32."""
    h, w, labels = case(seed=3, vocab=262144, seq=5, batch=3)
    h = h * 1e4  # raw logits ~1e5: every capped logit sits at +-cap
    h1 = h.clone().requires_grad_()
    loss = chunked_causal_lm_loss(h1, w, labels, softcap, chunk_size=2)
    loss.backward()
    ref = reference_loss(h, w, labels, softcap)
    assert torch.isfinite(loss) and torch.isfinite(h1.grad).all()
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())


def test_shift_labels_and_frozen_weight():
    h, w, labels = case(seed=1)
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
    h1 = h.clone().requires_grad_()
    ours = chunked_causal_lm_loss(h1, w, shift_labels=shift, softcap=30.0, chunk_size=5)  # w frozen (LoRA)
    h2 = h.clone().requires_grad_()
    ref = reference_loss(h2, w, None, 30.0, shift_labels=shift)
    ours.backward(), ref.backward()
    assert abs(ours.item() - ref.item()) <= RTOL * ref.item() and rel(h1.grad, h2.grad) <= RTOL


def test_all_ignored_matches_transformers_semantics():
    h, w, labels = case()
    labels[:] = -100
    assert torch.isnan(chunked_causal_lm_loss(h, w, labels, 30.0))  # mean over nothing, as stock
    assert chunked_causal_lm_loss(h, w, labels, 30.0, num_items_in_batch=5).item() == 0.0


def test_bf16_close_to_fp32():
    h, w, labels = case(seed=2, vocab=300)
    ref = reference_loss(h, w, labels, 30.0)
    ours = chunked_causal_lm_loss(h.bfloat16(), w.bfloat16(), labels, 30.0, chunk_size=4)
    assert ours.dtype == torch.float32 and abs(ours.item() - ref.item()) <= 2e-2 * ref.item()


@pytest.mark.parametrize("variant", ["gemma2", "gemma3", "gemma1-mqa"])
def test_model_forward_uses_chunked_loss_and_matches_stock(variant):
    ours, stock = make_pair(variant)
    ids = random_ids(2, 20)
    labels = ids.clone()
    labels[1, :6] = -100
    out = ours(ids, labels=labels, num_items_in_batch=torch.tensor(30))  # gradients on: the training path
    assert out.logits is None and out.loss.requires_grad  # the [B, T, V] logits were never built
    ref = stock(ids, labels=labels, num_items_in_batch=torch.tensor(30))
    assert abs(out.loss.item() - ref.loss.item()) <= RTOL * ref.loss.item()
    full = ours(ids, labels=labels, return_logits=True, num_items_in_batch=torch.tensor(30))
    assert full.logits is not None and abs(full.loss.item() - ref.loss.item()) <= RTOL * ref.loss.item()


def test_labels_with_logits_to_keep_is_refused():
    ours = make_ours("gemma2")
    ids = random_ids(1, 6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        ours(ids, labels=ids, logits_to_keep=1)
    with torch.no_grad(), pytest.raises(ValueError, match="logits_to_keep"):  # the full-logits path too
        ours(ids, labels=ids, logits_to_keep=1)
