"""gemma_hf.evaluation: win rates and their bootstrap, the side-by-side judge in both orders, chat
health, batched greedy answers (= one by one), held-out loss, reward win rate, the LM judge, the
evaluate() report, and the optional lm-evaluation-harness entry point."""

from __future__ import annotations

import json
import math
import random
import sys

import pytest
import torch

from gemma_hf import GemmaHFForCausalLM, GemmaHFForSequenceClassification
from gemma_hf.assets import gemma_tokenizer
from gemma_hf.chat import encode_chat, render_chat
from gemma_hf.evaluation import (
    Answer,
    Contestant,
    LMEvalUnavailable,
    LMJudge,
    RewardModelScorer,
    bootstrap_interval,
    chat_health,
    combine_preferences,
    distinct_n,
    evaluate,
    fill_template,
    generate_answers,
    held_out,
    heldout_loss,
    load_template,
    markdown_table,
    read_verdict,
    repeats_prompt,
    reward_win_rate,
    run_lm_eval,
    side_by_side,
    template_path,
    win_rate,
)
from gemma_hf.model.configuration import alternating_layer_types
from gemma_hf.tokenization import encode_with_assistant_mask
from tests.assets import tokenizer as load_tokenizer
from tests.tiny import make_ours, tiny_config

FAMILY = "gemma2"
VOCAB = 256000  # the real Gemma 1/2 tokenizer's


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------------------------
# win rates and the bootstrap
# --------------------------------------------------------------------------------------------


def test_bootstrap_interval_is_seeded_reproducible_and_contains_the_estimate():
    rng = random.Random(0)
    scores = [rng.choice([0.0, 0.5, 1.0]) for _ in range(200)]
    mean = sum(scores) / len(scores)
    low, high = bootstrap_interval(scores, num_resamples=1000, seed=3)
    assert (low, high) == bootstrap_interval(scores, num_resamples=1000, seed=3)
    assert (low, high) != bootstrap_interval(scores, num_resamples=1000, seed=4)
    assert low < mean < high
    # Narrows with more prompts: the same mix of outcomes, 25 times as many prompts (~1/5 the width).
    wide = bootstrap_interval(scores[:40], seed=0)
    narrow = bootstrap_interval(scores[:40] * 25, seed=0)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3
    # A constant score has a zero-width interval; a wider confidence gives a wider interval.
    assert bootstrap_interval([1.0] * 30) == (1.0, 1.0)
    assert bootstrap_interval([0.5] * 7) == (0.5, 0.5)
    ninety = bootstrap_interval(scores, confidence=0.90, seed=3)
    assert low <= ninety[0] and ninety[1] <= high
    with pytest.raises(ValueError):
        bootstrap_interval([])


def test_bootstrap_draws_are_shared_and_weights_give_a_ratio():
    """The draws depend on (prompts, resamples, seed) only: intervals of scores on the same prompts are
    paired. Weights: the weighted mean sum(w x) / sum(w); a weight 0 leaves a prompt out (NaN allowed)."""
    rng = random.Random(1)
    a = [rng.gauss(0, 3) for _ in range(24)]
    b = [x + 0.5 for x in a]  # b beats a by 0.5 on every prompt, hidden in a spread of 3
    low_a, high_a = bootstrap_interval(a, seed=7)
    low_b, high_b = bootstrap_interval(b, seed=7)
    assert (low_b - low_a, high_b - high_a) == pytest.approx((0.5, 0.5))  # the same draws, shifted
    assert bootstrap_interval([y - x for x, y in zip(a, b)], seed=7) == pytest.approx((0.5, 0.5))
    assert low_b < high_a  # the unpaired intervals overlap: only the paired difference separates them
    ones = bootstrap_interval(a, seed=7, weights=[1.0] * len(a))
    assert ones == pytest.approx((low_a, high_a))
    # A per-token mean over prompts of different lengths: sums / tokens, a ratio per draw.
    tokens = [rng.randint(1, 9) for _ in a]
    low, high = bootstrap_interval(a, seed=7, weights=tokens)
    estimate = sum(x * w for x, w in zip(a, tokens)) / sum(tokens)
    assert low < estimate < high
    assert bootstrap_interval([*a, float("nan")], seed=7, weights=[*tokens, 0]) != (low, high)  # 25 prompts
    assert bootstrap_interval([2.0, float("nan"), 2.0], weights=[1, 0, 1]) == (2.0, 2.0)
    with pytest.raises(ValueError):
        bootstrap_interval([1.0, 2.0], weights=[0, 0])
    with pytest.raises(ValueError):
        bootstrap_interval([1.0, 2.0], weights=[1.0])


def test_win_rate_splits_ties_evenly_and_reports_shares():
    outcomes = ["win"] * 5 + ["tie"] * 3 + ["loss"] * 2
    result = win_rate(outcomes, seed=0)
    assert result["win_rate"] == pytest.approx(0.65)
    assert (result["wins"], result["ties"], result["losses"]) == (0.5, 0.3, 0.2)
    assert result["num_prompts"] == 10 and result["ci_low"] <= 0.65 <= result["ci_high"]
    assert win_rate([])["win_rate"] is None
    with pytest.raises(ValueError, match="unknown outcomes"):
        win_rate(["won"])


@pytest.mark.parametrize("first,second,outcome", [
    ("model", "model", "win"), ("model", "tie", "win"), ("tie", "model", "win"),
    ("baseline", "baseline", "loss"), ("baseline", "tie", "loss"),
    ("model", "baseline", "tie"), ("baseline", "model", "tie"), ("tie", "tie", "tie"),
])
def test_two_verdicts_combine_into_one_outcome(first, second, outcome):
    assert combine_preferences(first, second) == outcome


# --------------------------------------------------------------------------------------------
# side by side with tiny deterministic judges
# --------------------------------------------------------------------------------------------

PROMPTS = [user(f"Question number {i}: what do you know about topic {i}?") for i in range(40)]
MODEL_ANSWERS = [f"A detailed and helpful answer about topic {i}." for i in range(40)]
EMPTY = [""] * 40


def longer_answer_judge(instruction, answer_a, answer_b):
    if len(answer_a) == len(answer_b):
        return "tie"
    return "A" if len(answer_a) > len(answer_b) else "B"


def test_side_by_side_rigged_pair_is_won_every_time():
    result = side_by_side(longer_answer_judge, PROMPTS, MODEL_ANSWERS, EMPTY, seed=0)
    assert result["win_rate"] == 1.0 and (result["ci_low"], result["ci_high"]) == (1.0, 1.0)
    assert (result["wins"], result["ties"], result["losses"]) == (1.0, 0.0, 0.0)
    assert result["position_consistency"] == 1.0 and result["first_position_rate"] == 0.5
    assert result["per_prompt"][0] == {"model_first": "A", "model_second": "B", "outcome": "win"}
    # The baseline's view of the same comparison.
    reverse = side_by_side(longer_answer_judge, PROMPTS, EMPTY, MODEL_ANSWERS)
    assert reverse["win_rate"] == 0.0 and (reverse["ci_low"], reverse["ci_high"]) == (0.0, 0.0)


def test_a_judge_that_always_picks_the_first_answer_gives_exactly_one_half():
    result = side_by_side(lambda instruction, a, b: "A", PROMPTS, MODEL_ANSWERS, EMPTY)
    assert result["win_rate"] == 0.5 and result["ties"] == 1.0
    assert (result["ci_low"], result["ci_high"]) == (0.5, 0.5)
    assert result["position_consistency"] == 0.0 and result["first_position_rate"] == 1.0
    assert side_by_side(lambda instruction, a, b: "B", PROMPTS, MODEL_ANSWERS, EMPTY)["win_rate"] == 0.5


def test_a_judge_that_always_says_tie_gives_one_half():
    result = side_by_side(lambda instruction, a, b: "tie", PROMPTS, MODEL_ANSWERS, EMPTY)
    assert result["win_rate"] == 0.5 and result["ties"] == 1.0 and result["position_consistency"] == 1.0


def test_a_random_70_30_judge_gives_an_interval_around_0_7():
    rng = random.Random(1234)
    count = 600
    prompts = [user(f"prompt {i}") for i in range(count)]
    good, bad = [f"good {i}" for i in range(count)], [f"bad {i}" for i in range(count)]

    def judge(instruction, answer_a, answer_b):
        prefer_good = rng.random() < 0.7
        return "A" if answer_a.startswith("good") == prefer_good else "B"

    result = side_by_side(judge, prompts, good, bad, seed=0)
    assert result["ci_low"] < 0.7 < result["ci_high"]
    assert result["ci_high"] - result["ci_low"] < 0.1
    # Per prompt: win 0.49, tie 0.42, loss 0.09 in expectation.
    assert result["wins"] == pytest.approx(0.49, abs=0.07) and result["losses"] == pytest.approx(0.09, abs=0.05)


def test_judges_may_return_probabilities_and_batches():
    calls = []

    class Batched:
        def judge_batch(self, items):
            calls.append(len(items))
            return [{"A": 0.8, "B": 0.2} if "helpful" in a else {"A": 0.3, "B": 0.7} for _, a, _b in items]

    result = side_by_side(Batched(), PROMPTS[:5], MODEL_ANSWERS[:5], EMPTY[:5])
    assert calls == [10] and result["win_rate"] == 1.0
    assert result["per_prompt"][0]["probabilities_model_first"] == {"A": 0.8, "B": 0.2}
    assert read_verdict({"A": 0.5, "B": 0.5}) == ("tie", {"A": 0.5, "B": 0.5})
    assert read_verdict({"A": 0.2, "B": 0.3, "tie": 0.5})[0] == "tie"
    assert read_verdict(" b ")[0] == "B"
    with pytest.raises(ValueError, match="expected 'A', 'B' or 'tie'"):
        read_verdict("Response A is better")


# --------------------------------------------------------------------------------------------
# chat-format health
# --------------------------------------------------------------------------------------------


def test_health_metrics_on_hand_written_answers():
    prompts = ["Explain why the sky is blue during the day.", "Hi", "Name three primary colors please.", "Hi"]
    answers = [
        Answer("Explain why the sky is blue during the day. Because of Rayleigh scattering.", 20, "end_of_turn"),
        Answer("", 1, "eos"),
        Answer("red blue red blue", 4, "length"),
        Answer("Hi", 2, "end_of_turn"),
    ]
    health = chat_health(answers, prompts)
    # Bigrams: answer 0 has 13 tokens -> 12 distinct bigrams; "red blue red blue" -> 3 bigrams, 2 distinct
    # ("red blue" twice); "" and "Hi" have none: (12 + 2) / (12 + 3).
    assert health == {
        "num_answers": 4,
        "ended_turn_rate": 0.75,
        "empty_rate": 0.25,
        "repeat_prompt_rate": 0.5,  # answer 0 echoes its prompt; "Hi" answering "Hi" is an exact echo
        "control_token_rate": 0.0,
        "distinct_2": 14 / 15,
        "mean_new_tokens": 27 / 4,
        "mean_words": (13 + 0 + 4 + 1) / 4,
    }
    plain = chat_health(["<start_of_turn>user\nmore", "a b"], None)
    assert plain["ended_turn_rate"] is None and plain["repeat_prompt_rate"] is None
    assert plain["control_token_rate"] == 0.5 and plain["mean_new_tokens"] is None
    assert distinct_n(["one", ""]) is None and distinct_n(["a b a b a b"]) == 2 / 5


@pytest.mark.parametrize("answer,prompt,repeats", [
    ("Sure! write a haiku about the sea in spring: waves...", "Write a haiku about the sea in spring, please.", True),
    ("Here is a haiku about the sea.", "Write a haiku about the sea in spring, please.", False),
    # Only the first 8 words matter; punctuation and case do not.
    ("WRITE a haiku, about the SEA in spring and", "Write a haiku about the sea in spring and then explain it.", True),
    ("Hi! How can I help?", "Hi", False),  # a greeting answering a greeting
    ("hi", "Hi!", True),
    ("anything", "", False),
])
def test_repeat_the_prompt_definition(answer, prompt, repeats):
    assert repeats_prompt(answer, prompt) is repeats


# --------------------------------------------------------------------------------------------
# tiny models with the real Gemma tokenizer
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(gemma_tokenizer)


def small_gemma2(seed: int = 0, **overrides):
    """A tiny Gemma 2 (sliding + global layer, both soft-caps) with the real tokenizer's vocabulary."""
    kw = dict(vocab_size=VOCAB, hidden_size=16, head_dim=8, num_hidden_layers=2,
              layer_types=alternating_layer_types(2, 1), num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=32, query_pre_attn_scalar=8, tie_word_embeddings=False)
    return make_ours("gemma2", seed=seed, **{**kw, **overrides})


@pytest.fixture(scope="module")
def babbler(tok):
    """Greedy answers of varied lengths: the head only scores 16 words, <end_of_turn> and <eos>, so some
    answers end their turn early and others run to the token limit (seed chosen for that mix)."""
    model = small_gemma2(seed=3)
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "and", "a", "big", "red", "house", "is", "blue", "green",
             "tree"]
    active = [tok(" " + w, add_special_tokens=False)["input_ids"][-1] for w in words]
    active += [tok.convert_tokens_to_ids("<end_of_turn>"), tok.convert_tokens_to_ids("<eos>")]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        head = torch.zeros_like(model.lm_head.weight)
        head[active] = torch.randn(len(active), 16, generator=gen) * 3
        model.lm_head.weight.copy_(head)
        model.model.embed_tokens.weight[active] = torch.randn(len(active), 16, generator=gen)
    return model


HELD_OUT = [
    user("Hi"),
    [*user("Tell me a story about a cat and a dog."), {"role": "assistant", "content": "Once upon a time..."}],
    user("What is 2+2?"),
    user("Write a poem about trees, with many words in it please and thank you."),
    [{"role": "system", "content": "Be brief."}, *user("ok")],
]


def test_batched_greedy_answers_equal_one_by_one_with_left_padding(tok, babbler):
    one_by_one = generate_answers(babbler, tok, HELD_OUT, FAMILY, max_new_tokens=8, batch_size=1)
    batched = generate_answers(babbler, tok, HELD_OUT, FAMILY, max_new_tokens=8, batch_size=3)
    assert batched == one_by_one
    # The batch mixes prompt lengths (padding) and answers that stop early with ones that run out.
    lengths = {len(encode_chat(tok, held_out(c).prompt, FAMILY, add_generation_prompt=True)) for c in HELD_OUT}
    assert len(lengths) == len(HELD_OUT) and min(lengths) > 8  # longer than the sliding window
    assert {a.stop for a in batched} == {"end_of_turn", "length"}
    assert all(a.new_tokens == 8 and not a.ended_turn for a in batched if a.stop == "length")
    # The batch equals the model's own unpadded greedy decoding, token for token.
    prompt = encode_chat(tok, HELD_OUT[3], FAMILY, add_generation_prompt=True)
    alone = babbler.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                             eos_token_id=[1, 107], pad_token_id=0)[0, len(prompt):].tolist()
    expected = alone[:-1] if alone[-1] in (1, 107) else alone
    assert batched[3].text == tok.decode(expected).strip() and batched[3].new_tokens == len(alone)


@pytest.fixture(scope="module")
def hello_model(tok):
    """Says "Hello" after any prompt, then <end_of_turn> (as in test_cli_chat)."""
    hello = tok("Hello", add_special_tokens=False)["input_ids"][0]
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    config = tiny_config("gemma2", vocab_size=VOCAB, num_hidden_layers=1, layer_types=["full_attention"], hidden_size=8,
                         head_dim=8, num_attention_heads=1, num_key_value_heads=1, intermediate_size=8,
                         query_pre_attn_scalar=8, tie_word_embeddings=False, final_logit_softcapping=None)
    model = GemmaHFForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        u1, u2 = torch.eye(8)[0], torch.eye(8)[1]
        model.model.embed_tokens.weight.copy_(u1.expand(VOCAB, 8))
        model.model.embed_tokens.weight[hello] = u2
        model.lm_head.weight.zero_()
        model.lm_head.weight[hello] = 10 * u1
        model.lm_head.weight[eot] = 10 * u2
    return model


def test_answers_stop_at_end_of_turn(tok, hello_model):
    answers = generate_answers(hello_model, tok, HELD_OUT, FAMILY, max_new_tokens=6, batch_size=2)
    assert answers == [Answer("Hello", 2, "end_of_turn")] * len(HELD_OUT)
    assert all(a.ended_turn for a in answers)
    cut = generate_answers(hello_model, tok, HELD_OUT[:1], FAMILY, max_new_tokens=1)
    assert cut == [Answer("Hello", 1, "length")] and not cut[0].ended_turn
    assert cut[0].to_dict() == {"text": "Hello", "new_tokens": 1, "stop": "length", "ended_turn": False}


def test_heldout_loss_equals_a_direct_computation(tok):
    model = small_gemma2(seed=1)
    conversations = [
        [*user("Tell me a story."), {"role": "assistant", "content": "Once upon a time there was a cat."}],
        [*user("Hi"), {"role": "assistant", "content": "Hello! How can I help?"}, *user("What is 2+2?"),
         {"role": "assistant", "content": "4"}],
        {"prompt": user("Name a color."), "reference": "Blue, like the sky on a clear day."},
        user("No reference: skipped."),
    ]
    result = heldout_loss(model, tok, conversations, FAMILY, batch_size=2)

    total, count = 0.0, 0
    with torch.no_grad():
        for conversation in [held_out(c).conversation for c in conversations[:3]]:
            ids, mask = encode_with_assistant_mask(tok, conversation, FAMILY)
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(len(ids) - 1):
                if mask[t + 1]:
                    total -= logp[t, ids[t + 1]].item()
                    count += 1
    assert result["tokens"] == count and result["conversations"] == 3 and result["skipped"] == 1
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    # Cut to 17 tokens: the prompt is 14 (<bos> ... <start_of_turn>model\n), so 3 answer tokens count.
    prompt = encode_chat(tok, conversations[0][:1], FAMILY, add_generation_prompt=True)
    short = heldout_loss(model, tok, conversations[:1], FAMILY, max_length=len(prompt) + 3)
    assert short["truncated"] == 1 and short["tokens"] == 3


# --------------------------------------------------------------------------------------------
# reward win rate
# --------------------------------------------------------------------------------------------


def length_reward(conversations):
    """A stub scorer: the reward is the length of the final answer."""
    return [float(len(c[-1]["content"])) for c in conversations]


def test_reward_win_rate_with_a_stub_scorer():
    prompts = [user(f"q{i}") for i in range(4)]
    ours = ["long answer", "same", "x", Answer("longer still", 3, "end_of_turn")]
    theirs = ["short", "four", "xyz", ""]
    result = reward_win_rate(length_reward, prompts, ours, theirs, seed=0)
    assert [r["outcome"] for r in result["per_prompt"]] == ["win", "tie", "loss", "win"]
    assert result["win_rate"] == (2 + 0.5) / 4
    assert result["mean_model"] == (11 + 4 + 1 + 12) / 4 and result["mean_baseline"] == (5 + 4 + 3 + 0) / 4
    assert result["ci_low"] <= result["win_rate"] <= result["ci_high"]
    tolerant = reward_win_rate(length_reward, prompts, ours, theirs, tie_tolerance=2.0)
    assert [r["outcome"] for r in tolerant["per_prompt"]] == ["win", "tie", "tie", "win"]


def test_reward_model_scorer_reads_logits_0_0_of_each_conversation(tok):
    config = tiny_config("gemma2", vocab_size=VOCAB, hidden_size=16, head_dim=8, num_hidden_layers=2,
                         layer_types=alternating_layer_types(2, 1), num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=32, query_pre_attn_scalar=8, num_labels=1)
    torch.manual_seed(0)
    reward_model = GemmaHFForSequenceClassification._from_config(config, attn_implementation="eager").eval()
    scorer = RewardModelScorer(reward_model, tok, FAMILY, batch_size=3)
    conversations = [[*user("Hi"), {"role": "assistant", "content": a}]
                     for a in ("Hello!", "", "A much longer answer with many more words in it.", "Hey")]
    rewards = scorer(conversations)
    with torch.no_grad():
        for conversation, reward in zip(conversations, rewards):
            ids = encode_chat(tok, conversation, FAMILY)
            assert reward == pytest.approx(reward_model(input_ids=torch.tensor([ids])).logits[0, 0].item(), abs=1e-5)
    assert len(set(rewards)) == 4
    # Control tokens a model wrote as text are removed before scoring, never encoded as real ones.
    injected = scorer([[*user("Hi"), {"role": "assistant", "content": "Hello!<end_of_turn>\n<start_of_turn>user"}]])
    plain = scorer([[*user("Hi"), {"role": "assistant", "content": "Hello!\nuser"}]])
    assert injected == plain
    # Through reward_win_rate with a real reward model: one pair per prompt.
    result = reward_win_rate(scorer, [user("Hi")] * 2, ["Hello!", ""], ["", "Hello!"])
    assert [r["outcome"] for r in result["per_prompt"]] == (["win", "loss"] if rewards[0] > rewards[1]
                                                            else ["loss", "win"])
    assert result["win_rate"] == 0.5


# --------------------------------------------------------------------------------------------
# the LM judge
# --------------------------------------------------------------------------------------------


def test_the_judge_template_is_the_file_in_the_repository():
    text = template_path().read_text(encoding="utf-8")
    assert load_template() == text and "{instruction}" in text and "{answer_a}" in text and "{answer_b}" in text
    filled = fill_template(text, "Say {hi}", "a {b}", "c")
    assert "Say {hi}" in filled and "a {b}" in filled
    with pytest.raises(ValueError, match="missing"):
        load_template("Only {instruction} and {answer_a}")
    with pytest.raises(ValueError, match="unknown"):
        load_template("{instruction} {answer_a} {answer_b} {score}")


def test_lm_judge_on_a_tiny_model_returns_verdicts_for_both_orders(tok):
    model = small_gemma2(seed=2)
    judge = LMJudge(model, tok, FAMILY, batch_size=3)
    assert judge.template == template_path().read_text(encoding="utf-8")
    ids = judge.encode("Name a color.", "Blue.", "")
    assert tok.decode(ids) == render_chat(user(fill_template(judge.template, "Name a color.", "Blue.", "")), FAMILY,
                                          add_generation_prompt=True)
    single = judge("Name a color.", "Blue.", "Seven.")
    assert set(single) == {"A", "B", "mass"} and single["A"] + single["B"] == pytest.approx(1.0)
    assert 0 < single["mass"] < 1
    result = side_by_side(judge, [user("Name a color."), user("What is 2+2?")], ["Blue.", "4"], ["Seven.", "five"])
    for row in result["per_prompt"]:
        assert row["model_first"] in ("A", "B", "tie") and row["model_second"] in ("A", "B", "tie")
        assert set(row["probabilities_model_first"]) == {"A", "B", "mass"}
    # Batched (left-padded) probabilities equal one comparison at a time.
    first = result["per_prompt"][0]["probabilities_model_first"]
    assert first == pytest.approx(single, rel=1e-4)


def test_a_position_biased_lm_judge_gives_one_half(tok, hello_model):
    """A judge model whose next token is always "A": both orders cancel it."""
    letter_a = tok("A", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        saved = hello_model.lm_head.weight[letter_a].clone()
        hello_model.lm_head.weight[letter_a] = 20 * torch.eye(8)[0]
    try:
        judge = LMJudge(hello_model, tok, FAMILY)
        result = side_by_side(judge, PROMPTS[:3], MODEL_ANSWERS[:3], EMPTY[:3])
    finally:
        with torch.no_grad():
            hello_model.lm_head.weight[letter_a] = saved
    assert all(row["model_first"] == "A" and row["model_second"] == "A" for row in result["per_prompt"])
    assert result["win_rate"] == 0.5 and result["first_position_rate"] == 1.0


# --------------------------------------------------------------------------------------------
# evaluate(): one JSON-able report
# --------------------------------------------------------------------------------------------


def test_evaluate_reports_everything_in_one_json_dict(tok, babbler, hello_model):
    model = Contestant("sft", hello_model, tok, FAMILY)
    baseline = Contestant("base", babbler, tok, FAMILY)
    result = evaluate(model, HELD_OUT, baseline, reward=length_reward, judge=longer_answer_judge, max_new_tokens=4,
                      batch_size=2, num_resamples=200, seed=0)
    json.dumps(result)  # JSON-able
    summary = result["summary"]
    assert summary["num_prompts"] == len(HELD_OUT)
    for side in ("model", "baseline"):
        for key in ("heldout_loss", "heldout_perplexity", "heldout_tokens", "ended_turn_rate", "empty_rate",
                    "repeat_prompt_rate", "control_token_rate", "distinct_2", "mean_new_tokens"):
            assert f"{side}_{key}" in summary
    for prefix in ("reward", "judge"):
        for key in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "wins", "ties", "losses"):
            assert f"{prefix}_{key}" in summary
    assert summary["model_ended_turn_rate"] == 1.0 and summary["model_mean_new_tokens"] == 2.0
    assert summary["model_heldout_tokens"] == summary["baseline_heldout_tokens"] > 0  # one reference answer
    samples = result["samples"]
    assert [s["model"] for s in samples] == ["Hello"] * len(HELD_OUT)
    assert samples[1]["reference"] == "Once upon a time..." and samples[4]["prompt"] == "Be brief.\n\nok"
    assert {"baseline", "baseline_stop", "reward_model", "reward_baseline", "reward_outcome", "judge_model_first",
            "judge_model_second", "judge_outcome"} <= set(samples[0])
    # The stub judge and reward both prefer the longer answer: the outcomes agree prompt by prompt.
    assert [s["judge_outcome"] for s in samples] == [s["reward_outcome"] for s in samples]
    assert result["settings"]["model"] == "sft" and result["settings"]["judge"] == "longer_answer_judge"
    table = markdown_table(result)
    assert "| held-out loss |" in table and "LM judge (longer_answer_judge)" in table and "`sft` vs `base`" in table


def test_evaluate_with_given_answers_and_no_baseline():
    result = evaluate(Contestant("given", answers=["Hello", ""]), [user("Hi there friend"), user("Bye")],
                      reward=length_reward)
    assert result["summary"] == {"num_prompts": 2, "model_ended_turn_rate": None, "model_empty_rate": 0.5,
                                 "model_repeat_prompt_rate": 0.0, "model_control_token_rate": 0.0,
                                 "model_distinct_2": None, "model_mean_new_tokens": None, "model_mean_words": 0.5,
                                 "reward_mean_model": 2.5}
    assert held_out("Hi") == held_out(user("Hi")) == held_out({"prompt": "Hi"})
    pair = held_out({"prompt": user("Hi"), "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": []})
    assert pair.reference == "Hello" and pair.conversation == [*user("Hi"), {"role": "assistant", "content": "Hello"}]
    with pytest.raises(ValueError, match="needs a baseline"):
        evaluate(Contestant("given", answers=["a"]), [user("Hi")], judge=longer_answer_judge)


@pytest.mark.parametrize("judge,consistency", [(lambda instruction, a, b: "A", 0.0),  # position-biased
                                               (lambda instruction, a, b: "tie", 1.0)])  # ties everything
def test_a_judge_that_does_not_discriminate_gets_no_win_rate(judge, consistency):
    model = Contestant("sft", answers=["A long helpful answer.", "Another helpful answer."])
    baseline = Contestant("base", answers=["", "no"])
    result = evaluate(model, [user("Hi there"), user("Tell me")], baseline, judge=judge, loss=False)
    summary = result["summary"]
    assert summary["judge_discriminated"] is False and summary["judge_win_rate"] is None
    assert summary["judge_position_consistency"] == consistency and summary["judge_ties"] == 1.0
    assert "judge did not discriminate" in markdown_table(result)
    rigged = evaluate(model, [user("Hi there"), user("Tell me")], baseline, judge=longer_answer_judge, loss=False)
    assert rigged["summary"]["judge_discriminated"] is True and rigged["summary"]["judge_win_rate"] == 1.0


# --------------------------------------------------------------------------------------------
# lm-evaluation-harness (optional)
# --------------------------------------------------------------------------------------------


def test_run_lm_eval_without_the_package_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError, installed or not
    with pytest.raises(LMEvalUnavailable, match="pip install lm-eval") as info:
        run_lm_eval(tmp_path, ["hellaswag"])
    assert isinstance(info.value, ImportError) and info.value.exit_code == 1
    with pytest.raises(ValueError, match="at least one task"):
        run_lm_eval(tmp_path, [])


def test_rule_rewards_give_an_empty_answer_nothing():
    """An empty answer ends its turn and repeats nothing: the chat-health reward must still give it
    nothing, or RL learns to answer with <eos> at once (seen on the real 270M)."""
    from gemma_hf.rl import rules

    prompts = [[{"role": "user", "content": "Name three colors."}]] * 3
    completions = [[{"role": "assistant", "content": text}] for text in ("", "  \n", "Red, green and blue.")]
    ids = [[106], [236743, 106], [5, 6, 7, 106]]
    rules.STOP_IDS.clear()
    rules.STOP_IDS.update({1, 106})
    try:
        assert rules.no_repetition(prompts, completions) == [0.0, 0.0, 1.0]
        assert rules.chat_health(prompts, completions, ids) == [0.0, 0.0, 3.0]
        looping = [[{"role": "assistant", "content": "a b a b a b a b"}]]
        assert rules.chat_health(prompts[:1], looping, [[5, 106]]) == [1.0 + 2 / 7 + 1.0]
        # "0000..." is one word: only its tokens show the loop (digits are single tokens)
        zeros = [[{"role": "assistant", "content": "The answer is " + "0" * 40}]]
        zero_ids = [[818, 3890, 563] + [236771] * 40]
        assert rules.no_repetition(prompts[:1], zeros) == [1.0]
        assert rules.no_repetition(prompts[:1], zeros, zero_ids) == [pytest.approx(4 / 42)]
    finally:
        rules.STOP_IDS.clear()
        rules.STOP_IDS.update({1, 107})


def test_overlong_penalty_is_dapo_soft_punishment():
    """overlong: 0 up to L - L/4 tokens, then linear down to -1 at the limit L (a cut-off completion); it
    refuses to score without the run's limit instead of guessing one."""
    from gemma_hf.rl import rules

    prompts = [[{"role": "user", "content": "Hi"}]] * 5
    completions = [[{"role": "assistant", "content": "x"}]] * 5
    ids = [[5] * n for n in (10, 72, 84, 96, 100)]
    try:
        rules.LIMIT["max_completion_length"] = None
        with pytest.raises(RuntimeError, match="max_completion_length"):
            rules.overlong(prompts, completions, ids)
        rules.LIMIT["max_completion_length"] = 96  # window 24: from 72 tokens on
        assert rules.overlong(prompts, completions, ids) == [0.0, 0.0, -0.5, -1.0, -1.0]
        with pytest.raises(RuntimeError, match="completion_ids"):
            rules.overlong(prompts, completions)
    finally:
        rules.LIMIT["max_completion_length"] = None
