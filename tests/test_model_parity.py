"""Numerical parity with stock transformers (Gemma, Gemma2, Gemma3) on identical weights, fp32.

Each test copies one model's state dict into the other (strict: tensor names are identical) and
compares logits (max |diff| <= 1e-5), gradients (relative error <= 1e-4) and greedy generations.
"""

from __future__ import annotations

import pytest
import torch

from gemma_hf import SoftcapUnsupportedError
from tiny import NO_ATTN_SOFTCAP, TINY, WINDOW, make_ours, make_pair, max_abs_diff, random_ids, stock_from

LOGIT_TOL = 1e-5
GRAD_RTOL = 1e-4
VARIANTS = list(TINY)


def left_padded_batch(seq: int, lengths: list[int], seed: int = 3):
    """input_ids and attention_mask for rows of unequal length, left-padded with pad id 0."""
    ids = random_ids(len(lengths), seq, seed=seed)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, : seq - length] = 0
        ids[row, seq - length] = 2  # <bos> right after the padding
        mask[row, seq - length:] = 1
    return ids, mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_no_padding_past_window(variant):
    ours, stock = make_pair(variant)
    ids = random_ids(2, 3 * WINDOW + 5)  # longer than the sliding window
    with torch.no_grad():
        diff = max_abs_diff(ours(ids).logits, stock(ids).logits)
    assert diff <= LOGIT_TOL, f"{variant}: max |dlogit| = {diff:.3g}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_left_padding_unequal_lengths(variant):
    ours, stock = make_pair(variant)
    ids, mask = left_padded_batch(3 * WINDOW, [3 * WINDOW, 2 * WINDOW + 3, 5])
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = stock(ids, attention_mask=mask).logits
    valid = mask.bool()  # logits at padding positions are meaningless in both
    diff = max_abs_diff(a[valid], b[valid])
    assert diff <= LOGIT_TOL, f"{variant}: max |dlogit| = {diff:.3g}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padding_does_not_change_a_row(variant):
    """A row's logits are the same alone and left-padded in a batch (masks and positions are right)."""
    ours = make_ours(variant)
    ids, mask = left_padded_batch(2 * WINDOW, [2 * WINDOW, WINDOW + 3])
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        alone = ours(ids[1:, WINDOW - 3:]).logits
    diff = max_abs_diff(batched[1, WINDOW - 3:], alone[0])
    assert diff <= LOGIT_TOL, f"{variant}: padded vs alone max |dlogit| = {diff:.3g}"


@pytest.mark.parametrize("variant", NO_ATTN_SOFTCAP)
def test_sdpa_matches_stock_eager(variant):
    ours, stock = make_pair(variant, attn="sdpa", stock_attn="eager")
    assert ours.config._attn_implementation == "sdpa"
    ids, mask = left_padded_batch(3 * WINDOW, [3 * WINDOW, 2 * WINDOW + 1])
    with torch.no_grad():
        diff_plain = max_abs_diff(ours(ids[:1]).logits, stock(ids[:1]).logits)
        a = ours(ids, attention_mask=mask).logits
        b = stock(ids, attention_mask=mask).logits
    diff_padded = max_abs_diff(a[mask.bool()], b[mask.bool()])
    assert diff_plain <= LOGIT_TOL and diff_padded <= LOGIT_TOL, (diff_plain, diff_padded)


@pytest.mark.parametrize("variant", ["gemma2", "gemma2-27b-style"])
def test_sdpa_refused_for_attention_softcap(variant):
    with pytest.raises(SoftcapUnsupportedError, match="soft-cap"):
        make_ours(variant, attn="sdpa")
    # Asking for nothing picks the exact path, never a silently uncapped one.
    from gemma_hf import GemmaHFForCausalLM
    from tiny import tiny_config

    default = GemmaHFForCausalLM(tiny_config(variant))
    assert default.config._attn_implementation == "eager"
    # Switching an existing model to sdpa is refused too.
    with pytest.raises(SoftcapUnsupportedError):
        default.set_attn_implementation("sdpa")
    # And a config edited behind the model's back fails at forward time, not silently.
    default.config._attn_implementation = "sdpa"
    with pytest.raises(SoftcapUnsupportedError):
        default(random_ids(1, 4))


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_gradients_match_stock(variant):
    ours, stock = make_pair(variant)
    ours.train(), stock.train()
    ids = random_ids(2, 2 * WINDOW + 3)
    labels = ids.clone()
    labels[0, :4] = -100  # ignore_index semantics
    out_a, out_b = ours(ids, labels=labels), stock(ids, labels=labels)
    assert abs(out_a.loss.item() - out_b.loss.item()) <= 1e-5 * abs(out_b.loss.item())
    out_a.loss.backward(), out_b.loss.backward()
    grads_b = dict(stock.named_parameters())
    for name, param in ours.named_parameters():
        ga, gb = param.grad, grads_b[name].grad
        assert ga is not None and gb is not None, f"{variant}: {name} got no gradient"
        assert gb.norm() > 0, f"{variant}: {name} has a zero gradient: the comparison would say nothing"
        rel = ((ga - gb).norm() / gb.norm()).item()
        assert rel <= GRAD_RTOL, f"{variant}: grad of {name}: relative error {rel:.3g}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_with_cache_matches_stock(variant):
    ours, stock = make_pair(variant)
    ids = random_ids(1, 5)
    new = 5 * WINDOW + 8  # 40+ tokens past the window
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        a = ours.generate(ids, **kwargs)
        b = stock.generate(ids, **kwargs)
    assert a.shape[1] == ids.shape[1] + new
    assert torch.equal(a, b), f"{variant}: first divergence at {int((a != b).nonzero()[0, 1])}"


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_cached_decoding_equals_uncached_and_stays_bounded(variant):
    """Step-by-step decoding with our cache gives the same logits as one full forward, and the
    sliding layers' caches never hold more than `sliding_window` keys."""
    ours = make_ours(variant)
    ids = random_ids(1, 4 * WINDOW + 3)
    with torch.no_grad():
        full = ours(ids).logits
        out = ours(ids[:, :3], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(3, ids.shape[1]):
            out = ours(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    diff = max_abs_diff(torch.cat(steps, dim=1), full)
    assert diff <= LOGIT_TOL, f"cached vs uncached max |dlogit| = {diff:.3g}"
    for layer_idx, layer_type in enumerate(ours.config.layer_types):
        kept = cache.layers[layer_idx].keys.shape[-2]
        if layer_type == "sliding_attention":
            assert kept <= WINDOW, f"sliding layer {layer_idx} keeps {kept} keys > window {WINDOW}"
        else:
            assert kept == ids.shape[1]


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_logits_to_keep_matches_full(variant):
    ours = make_ours(variant)
    ids = random_ids(2, 12)
    with torch.no_grad():
        full = ours(ids).logits
        last = ours(ids, logits_to_keep=1).logits
        picked = ours(ids, logits_to_keep=torch.tensor([0, 5])).logits
    assert last.shape[1] == 1 and max_abs_diff(last, full[:, -1:]) <= 1e-6
    assert max_abs_diff(picked, full[:, [0, 5]]) <= 1e-6


def test_final_softcap_bounds_logits():
    ours = make_ours("gemma2")
    with torch.no_grad():
        ours.lm_head.weight.mul_(1e4)  # huge raw logits
        logits = ours(random_ids(1, 6)).logits
    assert logits.abs().max() < 30.0 + 1e-4 and logits.abs().max() > 29.0


@pytest.mark.parametrize("variant", ["gemma1-mqa", "gemma2", "gemma3"])
def test_sequence_classification_matches_stock(variant):
    from gemma_hf import GemmaHFForSequenceClassification
    from tiny import randomize_norms, tiny_config

    torch.manual_seed(0)
    ours = GemmaHFForSequenceClassification._from_config(tiny_config(variant, num_labels=1),
                                                         attn_implementation="eager")
    randomize_norms(ours)
    ours.eval()
    stock = stock_from(ours, head="sequence-classification")
    ids = random_ids(2, 2 * WINDOW + 1)  # no padding: both read the last token
    with torch.no_grad():
        diff = max_abs_diff(ours(ids).logits, stock(ids).logits)
    assert diff <= LOGIT_TOL
    # With left padding we read the last real token (stock's pad-id rule reads the same one here).
    ids2, mask = left_padded_batch(2 * WINDOW, [2 * WINDOW, WINDOW])
    with torch.no_grad():
        padded = ours(ids2, attention_mask=mask).logits
        alone = ours(ids2[1:, WINDOW:]).logits
    assert max_abs_diff(padded[1], alone[0]) <= LOGIT_TOL


# --------------------------------------------------------------------------------------------
# output_attentions: stock's attention maps on eager, a clear refusal elsewhere


def _assert_same_attentions(ours, stock, valid_queries=None):
    assert ours is not None and stock is not None
    assert len(ours) == len(stock) > 0
    for layer, (a, b) in enumerate(zip(ours, stock)):
        assert a.shape == b.shape, (layer, a.shape, b.shape)
        if valid_queries is not None:  # rows of padded queries are masked out entirely in both
            a, b = a.transpose(1, 2)[valid_queries], b.transpose(1, 2)[valid_queries]
        diff = max_abs_diff(a, b)
        assert diff <= 1e-6, f"layer {layer}: max |d attention| = {diff:.3g}"


@pytest.mark.parametrize("variant", ["gemma1-mqa", "gemma2", "gemma2-27b-style", "gemma3"])
def test_attention_maps_equal_stock_eager(variant):
    ours, stock = make_pair(variant)
    ids = random_ids(2, 3 * WINDOW + 1)  # past the window: sliding layers' maps are banded
    with torch.no_grad():
        a = ours(ids, output_attentions=True)
        b = stock(ids, output_attentions=True)
        backbone = ours.model(ids, output_attentions=True).attentions
    _assert_same_attentions(a.attentions, b.attentions)
    assert len(a.attentions) == ours.config.num_hidden_layers
    _assert_same_attentions(backbone, b.attentions)
    for layer, layer_type in enumerate(ours.config.layer_types):
        weights = a.attentions[layer][0, 0]  # [query, key] of the first row and head
        reach = (weights > 0).sum(-1)  # keys each query attends to
        expected = torch.arange(1, ids.shape[1] + 1)
        if layer_type == "sliding_attention":
            expected = expected.clamp(max=WINDOW)  # W keys including the current one
        assert torch.equal(reach, expected), (layer, layer_type)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_attention_maps_equal_stock_with_left_padding(variant):
    ours, stock = make_pair(variant)
    ids, mask = left_padded_batch(3 * WINDOW, [3 * WINDOW, 2 * WINDOW + 3, 5])
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, output_attentions=True).attentions
        b = stock(ids, attention_mask=mask, output_attentions=True).attentions
    _assert_same_attentions(a, b, valid_queries=mask.bool())
    # Padding keys get no weight from any real query.
    for weights in a:  # [batch, heads, query, key]
        for row in (1, 2):  # the padded rows
            real, pad = mask[row].bool(), ~mask[row].bool()
            assert weights[row][:, real][:, :, pad].abs().max().item() == 0.0


def test_sequence_classifier_returns_attention_maps_of_stock():
    from gemma_hf import GemmaHFForSequenceClassification
    from tiny import randomize_norms, tiny_config

    torch.manual_seed(0)
    ours = GemmaHFForSequenceClassification._from_config(tiny_config("gemma2", num_labels=1),
                                                         attn_implementation="eager")
    randomize_norms(ours)
    ours.eval()
    stock = stock_from(ours, head="sequence-classification")
    ids = random_ids(2, 2 * WINDOW + 1)
    with torch.no_grad():
        _assert_same_attentions(ours(ids, output_attentions=True).attentions,
                                stock(ids, output_attentions=True).attentions)


def test_attention_maps_are_not_built_unless_asked():
    ours = make_ours("gemma2")
    with torch.no_grad():
        assert ours(random_ids(1, 6)).attentions is None


@pytest.mark.parametrize("variant, attn", [("gemma3", "sdpa"), ("gemma1-mqa", "sdpa"), ("gemma2", "flex_attention")])
def test_attention_maps_are_refused_where_the_backend_has_none(variant, attn):
    from gemma_hf import GemmaHFForSequenceClassification
    from tiny import tiny_config

    model = make_ours(variant, attn=attn)
    fix = r"output_attentions=True needs attn_implementation='eager': '%s' never materialises" % attn
    with pytest.raises(ValueError, match=fix + r".*attn_implementation='eager'.*set_attn_implementation\('eager'\)"):
        model(random_ids(1, 6), output_attentions=True)
    with pytest.raises(ValueError, match=fix):
        model.model(random_ids(1, 6), output_attentions=True)
    clf = GemmaHFForSequenceClassification._from_config(tiny_config(variant, num_labels=1), attn_implementation=attn)
    with pytest.raises(ValueError, match=fix):
        clf(random_ids(1, 6), output_attentions=True)
    # The fix the message names works.
    model.set_attn_implementation("eager")
    with torch.no_grad():
        assert len(model(random_ids(1, 6), output_attentions=True).attentions) == model.config.num_hidden_layers
