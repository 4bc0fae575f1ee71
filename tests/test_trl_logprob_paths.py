"""TRL's chunked log-prob and distillation paths, run on our models.

TRL computes per-token log-probabilities outside the model's own loss for DPO, KTO, RLOO and GRPO
(`trl.trainer.utils.add_fused_lm_head` patches `model.forward`: backbone via `model.base_model`, head
weight via `get_output_embeddings()`, soft-cap read from `config.final_logit_softcapping`), and the
generalized-JSD distillation loss (`DistillationTrainer`) projects student and teacher hidden states
itself with the same config field. None of that goes through our forward, so our chunked loss does
not apply there; what must hold is that TRL's chunked kernels see exactly what our forward would
compute. These tests pin that down against the unfused computation on our full logits, and
against stock transformers patched the same way. If TRL renames the attribute it reads, or our
config stops exposing it under that name, the soft-cap would silently vanish: the cases below use
a small cap (2.0) so that dropping it changes the result by far more than the tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import assert_grads_close, make_ours, param_grads, random_ids, stock_from

trl_utils = pytest.importorskip("trl.trainer.utils")
add_fused_lm_head = trl_utils.add_fused_lm_head

CASES = {  # name -> overrides; gemma2 gets a small final cap so that it dominates the numerics
    "gemma1-mqa": {},
    "gemma2": {"final_logit_softcapping": 2.0},
    "gemma3": {},
}


def _make(name: str, seed: int = 0, **overrides):
    """make_ours, with the final norm scaled up so logits span tens of nats (random tiny models are
    otherwise near-uniform, and a soft-cap of 2 would barely touch them)."""
    model = make_ours(name, seed=seed, **{**CASES.get(name, {}), **overrides})
    with torch.no_grad():
        model.model.norm.weight.add_(15.0)
    return model


def _batch(seed: int = 1):
    ids = random_ids(2, 20, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding on the second row
    ids[1, :5] = 0
    ids[1, 5] = 2
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, :8] = -100  # "prompt": not scored, as in DPO/GRPO completions
    return ids, mask, labels


def _unfused_logps(model, ids, mask, labels, temperature, cap_override="keep"):
    """log p(label) and entropy from the model's full logits: the computation TRL's kernel replaces."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    if cap_override is None:  # recompute without the final soft-cap (used to prove the cap matters)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        logits = hidden @ model.get_output_embeddings().weight.t()
    logp = F.log_softmax(logits / temperature, dim=-1)
    target = labels[:, 1:]
    valid = target != -100
    token_logp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~valid, 0)
    entropy = -(logp.exp() * logp).sum(-1).masked_fill(~valid, 0)
    return token_logp, entropy, valid


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_lm_head_equals_unfused_logprobs_on_our_model(name, temperature):
    reference = _make(name).train()
    fused = copy.deepcopy(reference)
    add_fused_lm_head(fused, temperature=temperature, outputs=("log_probs", "entropy"))
    ids, mask, labels = _batch()
    weights = torch.randn(labels[:, 1:].shape, generator=torch.Generator().manual_seed(3))  # DPO-like weighting

    head_calls = []
    fused.lm_head.register_forward_hook(lambda *args: head_calls.append(1))
    out = fused(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert head_calls == [], "the fused path must not run the full [B, T, V] projection"
    ref_logp, ref_entropy, valid = _unfused_logps(reference, ids, mask, labels, temperature)

    assert torch.equal(out.label_mask, valid)
    torch.testing.assert_close(out.log_probs, ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, ref_entropy, rtol=1e-5, atol=1e-5)

    (out.log_probs * weights).sum().backward()
    (ref_logp * weights).sum().backward()
    assert_grads_close(param_grads(fused), param_grads(reference), rel=1e-5)

    if CASES[name].get("final_logit_softcapping"):
        uncapped, _, _ = _unfused_logps(reference, ids, mask, labels, temperature, cap_override=None)
        assert (uncapped - ref_logp).abs().max() > 1.0, "the test case must make the soft-cap matter"


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_fused_lm_head_on_our_model_equals_it_on_stock(name):
    ours = _make(name)
    stock = stock_from(ours)
    for model in (ours, stock):
        add_fused_lm_head(model, temperature=0.9, outputs=("log_probs", "entropy", "is_top1"))
    ids, mask, labels = _batch(seed=5)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        b = stock(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert (a.log_probs - b.log_probs).abs().max() <= 1e-5
    assert (a.entropy - b.entropy).abs().max() <= 1e-5
    assert torch.equal(a.is_top1, b.is_top1)
    # Without fused_lm_head the patched forward is ours, unchanged (generation relies on it).
    with torch.no_grad():
        assert (ours(input_ids=ids, attention_mask=mask).logits
                - stock(input_ids=ids, attention_mask=mask).logits).abs().max() <= 1e-5


def test_fused_lm_head_reaches_lora_adapters():
    peft = pytest.importorskip("peft")
    base = _make("gemma2").train()
    reference = copy.deepcopy(base)
    add_fused_lm_head(base)  # TRL patches the base model before PEFT wraps it
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    fused = peft.get_peft_model(base, lora)
    ref = peft.get_peft_model(reference, copy.deepcopy(lora))
    ref.load_state_dict(fused.state_dict())
    ids, mask, labels = _batch(seed=7)
    out = fused(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    ref_logp, _, _ = _unfused_logps(ref.base_model.model, ids, mask, labels, 1.0)
    torch.testing.assert_close(out.log_probs, ref_logp, rtol=1e-5, atol=1e-5)
    out.log_probs.sum().backward()
    ref_logp.sum().backward()
    grads, ref_grads = param_grads(fused), param_grads(ref)
    assert grads and all("lora_" in n for n in grads)
    assert_grads_close(grads, ref_grads, rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_chunked_distillation_divergence_equals_unfused_jsd(beta, temperature):
    distill = pytest.importorskip("trl.trainer.distillation_trainer")
    gkd = pytest.importorskip("trl.experimental.gkd")
    student = _make("gemma2", seed=0).train()
    teacher = _make("gemma2", seed=1, final_logit_softcapping=3.0, num_hidden_layers=2,
                    layer_types=["sliding_attention", "full_attention"])  # any depth: same vocab
    ids, mask, labels = _batch(seed=9)
    completion = (labels[:, 1:] != -100).long()

    # Chunked path, as DistillationTrainer.compute_loss feeds it: backbone hidden states + head weight + caps
    # read from each model's config (the field name is what this test pins).
    s_hidden = student.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    with torch.no_grad():
        t_hidden = teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    loss, _, n_valid = distill._chunked_divergence_loss(
        s_hidden, t_hidden, student.get_output_embeddings().weight, teacher.get_output_embeddings().weight,
        completion, beta,
        student_final_logit_softcapping=getattr(student.config.get_text_config(), "final_logit_softcapping", None),
        teacher_final_logit_softcapping=getattr(teacher.config.get_text_config(), "final_logit_softcapping", None),
        temperature=temperature)
    assert n_valid.item() == completion.sum().item()

    reference = copy.deepcopy(student)
    s_logits = reference(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    ref_loss = gkd.GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=labels[:, 1:], beta=beta,
                                                   temperature=temperature)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    loss.backward()
    ref_loss.backward()
    assert_grads_close(param_grads(student), param_grads(reference), rel=1e-4)


# ----------------------------------------------------------------------------- the trainers themselves
def _tiny_real_vocab_model():
    """Two small layers over the tiny Gemma 1/2 tokenizer's vocabulary (asset:gemma-tokenizer-tiny),
    so a Gemma tokenizer with the real control tokens drives it."""
    from gemma_hf import GemmaHFConfig, GemmaHFForCausalLM

    config = GemmaHFConfig(family="gemma2", vocab_size=4096, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                           query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"],
                           sliding_window=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                           max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    return GemmaHFForCausalLM._from_config(config, attn_implementation="eager")


def _preference_records(tok, n: int):
    import json

    from gemma_hf.assets import llamafactory_data
    from gemma_hf.chat import render_chat
    from tests.assets import require

    records = json.loads((require(llamafactory_data) / "dpo_en_demo.json").read_text())[:n]
    rows = []
    for rec in records:
        user = rec["conversations"][-1]["value"][:200]
        prompt = render_chat([{"role": "user", "content": user}], "gemma2", add_generation_prompt=True)
        rows.append({"prompt": prompt, "chosen": rec["chosen"]["value"][:200] + "<end_of_turn>",
                     "rejected": rec["rejected"]["value"][:200] + "<end_of_turn>"})
    return rows


def _count_head_calls(model) -> list:
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(args[2].shape))
    return calls


def test_dpo_trainer_trains_our_model_through_trls_chunked_head(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from gemma_hf.assets import gemma_tokenizer_tiny
    from tests.assets import tokenizer

    tok = tokenizer(gemma_tokenizer_tiny)
    model, ref = _tiny_real_vocab_model(), _tiny_real_vocab_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1, learning_rate=1e-2,
                         max_length=64, report_to="none", logging_steps=1, save_strategy="no", use_cpu=True,
                         dataloader_num_workers=0, seed=0)
    trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, processing_class=tok,
                             train_dataset=Dataset.from_list(_preference_records(tok, 2)))
    head_calls = _count_head_calls(model)
    trainer.train()
    assert head_calls == [], f"DPO built full logits {head_calls}: TRL's chunked head was not used"
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_grpo_trainer_generates_and_trains_our_model(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from gemma_hf.assets import gemma_tokenizer_tiny
    from tests.assets import tokenizer

    tok = tokenizer(gemma_tokenizer_tiny)
    model = _tiny_real_vocab_model()
    prompts = [row["prompt"] for row in _preference_records(tok, 2)]

    def reward_len(completions, **kwargs):
        return [float(len(c)) / 100.0 for c in completions]

    args = trl.GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=8, learning_rate=1e-2, report_to="none", logging_steps=1,
                          save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, beta=0.0)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_len, args=args, processing_class=tok,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    head_calls = _count_head_calls(model)
    trainer.train()
    # Generation runs our own forward (one row of logits per step); scoring must never project the full sequence.
    assert head_calls and all(shape[1] == 1 for shape in head_calls), head_calls
    assert any("loss" in row for row in trainer.state.log_history)
