"""flex_attention's mask and score modifier, checked on CPU without torch.compile.

We refuse flex_attention on CPU because torch 2.13's *compiled* CPU kernel returned wrong values
(tests/test_attention_backends.py). What flex computes is still fully defined by two things this
machine can check: the BlockMask transformers builds from our config (causality, left padding, a
sliding window of `sliding_window` keys including the current one, cache offsets while decoding)
and the score_mod that applies the attention soft-cap. Run through torch's uncompiled reference
`flex_attention` (and an uncompiled `create_block_mask`), the whole model must equal eager:
logits, gradients and cached greedy generation. What remains unverified without a GPU is the
compiled kernel itself, i.e. torch's code, not ours or the masks we feed it.
"""

from __future__ import annotations

import pytest
import torch

from tests.tiny import assert_grads_close, make_ours, max_abs_diff, param_grads, random_ids

flex_module = pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.fixture
def uncompiled_flex(monkeypatch):
    import transformers.integrations.flex_attention as hf_flex
    import transformers.masking_utils as masking
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from gemma_hf.model import attention

    def plain_flex(query, key, value, training=False, **kwargs):
        return flex_module.flex_attention(query, key, value, **kwargs)

    def plain_block_mask(*args, **kwargs):
        return flex_module.create_block_mask(*args, **{**kwargs, "_compile": False})

    # Library internals patched here (easy to break on an upgrade; the test then fails loudly):
    # transformers routes every flex call through compile_friendly_flex_attention and builds masks
    # with masking_utils.create_block_mask(..., _compile=True).
    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", plain_flex)
    monkeypatch.setattr(masking, "create_block_mask", plain_block_mask)
    # torch refuses flex backward on CPU up front; its uncompiled reference implementation
    # differentiates fine (plain autograd through the math path), which is what we compare.
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    real = attention.attention_function

    def allow_flex_on_cpu(config, device):
        if config._attn_implementation == "flex_attention":
            return ALL_ATTENTION_FUNCTIONS["flex_attention"]
        return real(config, device)

    monkeypatch.setattr(attention, "attention_function", allow_flex_on_cpu)


def _pair(name):
    eager = make_ours(name, attn="eager")
    flex = make_ours(name, attn="flex_attention")
    flex.load_state_dict(eager.state_dict())
    return eager, flex


def _padded_batch(seq=29):  # 29 > window 8: the sliding mask matters
    ids = random_ids(3, seq, seed=11)
    mask = torch.ones_like(ids)
    for row, pad in ((1, 5), (2, 11)) if seq > 20 else ((1, 2), (2, 4)):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
        ids[row, pad] = 2
    return ids, mask


@pytest.mark.parametrize("name", ["gemma2", "gemma2-27b-style", "gemma3", "gemma1-mqa"])
def test_flex_semantics_equal_eager_logits_and_gradients(uncompiled_flex, name):
    eager, flex = _pair(name)
    ids, mask = _padded_batch()
    out_e = eager.train()(input_ids=ids, attention_mask=mask)
    out_f = flex.train()(input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    assert max_abs_diff(out_e.logits[valid], out_f.logits[valid]) <= 1e-5
    weights = torch.randn(out_e.logits.shape, generator=torch.Generator().manual_seed(0)) * valid[..., None]
    (out_e.logits * weights).sum().backward()
    (out_f.logits * weights).sum().backward()
    assert_grads_close(param_grads(eager), param_grads(flex), rel=1e-4)


def test_flex_soft_cap_is_applied(uncompiled_flex):
    """Scores far beyond the cap of 50: flex equals eager with the cap, and differs without it
    (so the parity above is not vacuous)."""
    eager, flex = _pair("gemma2")
    ids, mask = _padded_batch()
    valid = mask.bool()
    with torch.no_grad():
        for model in (eager, flex):
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(300.0)
        reference = eager(input_ids=ids, attention_mask=mask).logits[valid]
        assert max_abs_diff(reference, flex(input_ids=ids, attention_mask=mask).logits[valid]) <= 1e-4
        for layer in flex.model.layers:
            layer.self_attn.softcap = None
        assert max_abs_diff(reference, flex(input_ids=ids, attention_mask=mask).logits[valid]) > 1e-2


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_flex_cached_greedy_generation_equals_eager(uncompiled_flex, name):
    eager, flex = _pair(name)
    ids, mask = _padded_batch(seq=10)
    kwargs = dict(attention_mask=mask, max_new_tokens=14, min_new_tokens=14, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(eager.generate(ids, **kwargs), flex.generate(ids, **kwargs))
