"""The reward method's data and held-out evaluation without training: ``long_examples:
truncate_prompt`` on token ids (the prompt cut from the left, turn structure kept, answers whole;
every real pair kept), the accuracy's bootstrap interval and the card that shows it, and the held-out
sets of another kind built from instruction data (gemma_hf.evaluation.preference_sets)."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import yaml

from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from gemma_hf.evaluation.preference_sets import MAX_WORDS, preference_pairs
from gemma_hf.recipes.reward import METHOD, PairFitter, pair_metrics
from gemma_hf.tokenization import encode_conversation
from tests.assets import require, tokenizer
from tests.clirun import run_cli
from tests.test_reward import TINY_REWARD


@pytest.fixture(scope="module")
def tok():
    require(gemma_tokenizer_tiny)
    return tokenizer(gemma_tokenizer_tiny)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _pair(tok, prompt, chosen, rejected):
    encode = lambda answer: encode_conversation(tok, prompt + [{"role": "assistant", "content": answer}], "gemma2")  # noqa: E731
    return encode(chosen), encode(rejected)


def test_truncate_prompt_cuts_the_prompt_from_the_left_keeping_the_turns(tok):
    fit = PairFitter(tok)
    question = " ".join(f"word{i}" for i in range(60)) + " what is the answer?"
    chosen, rejected = _pair(tok, [{"role": "user", "content": question}], "It is forty-two.", "No idea.")
    header = _ids(tok, "<bos><start_of_turn>user\n")
    turn_end = _ids(tok, "<end_of_turn>\n<start_of_turn>model\n")
    answer = chosen[chosen.index(fit.start_of_turn, 2):]  # the model turn, header to <eos>
    max_length = len(answer) + len(header) + len(turn_end) + 12
    assert len(chosen) > max_length
    c, r, how = fit(chosen, rejected, max_length)
    assert how == "prompt_cut" and len(c) <= max_length and len(r) <= max_length
    assert c[:len(header)] == header and c.count(tok.bos_token_id) == 1
    assert c[-len(answer):] == answer  # the chosen answer whole
    assert r[:len(c) - len(answer)] == c[:len(c) - len(answer)]  # one prompt for both
    assert r[len(c) - len(answer):] == rejected[rejected.index(fit.start_of_turn, 2):]  # the rejected answer whole
    kept = c[len(header):len(c) - len(answer) - 2]  # the prompt's text: before <end_of_turn>\n
    assert c[len(c) - len(answer) - 2:len(c) - len(answer)] == turn_end[:2]
    assert 1 <= len(kept) and chosen[len(header):].index(kept[0]) > 0  # its last tokens, not its first
    assert tok.decode(c).endswith("what is the answer?<end_of_turn>\n<start_of_turn>model\nIt is forty-two.<end_of_turn><eos>")
    assert fit(chosen, rejected, len(chosen) + 5) == (chosen, rejected, None)  # a pair that fits is left alone


def test_truncate_prompt_drops_whole_earlier_turns_first(tok):
    fit = PairFitter(tok)
    earlier = [{"role": "user", "content": "alpha " * 40}, {"role": "assistant", "content": "beta " * 40}]
    last = [{"role": "user", "content": "Which colour is the sky?"}]
    chosen, rejected = _pair(tok, earlier + last, "Blue.", "Green.")
    short, _ = _pair(tok, last, "Blue.", "Green.")
    c, r, how = fit(chosen, rejected, len(short) + 3)
    assert how == "prompt_cut" and c == short  # the (user, model) pair gone, the last question whole


def test_answers_too_long_are_cut_at_the_end_with_a_short_prompt(tok):
    fit = PairFitter(tok)
    chosen, rejected = _pair(tok, [{"role": "user", "content": "Tell me a story " * 20}], "once upon a time " * 30,
                             "the end " * 40)
    c, r, how = fit(chosen, rejected, 64)
    assert how == "answers_cut" and len(c) == 64 and len(r) == 64 and c != r
    prompt = c[:c.index(fit.start_of_turn, 2)]  # <bos>, the user turn, <end_of_turn>\n
    header = _ids(tok, "<bos><start_of_turn>user\n")
    assert prompt[:len(header)] == header and len(prompt) <= 64 // 4
    assert tok.decode(c).split("<start_of_turn>model\n")[1].startswith("once upon a time")


def test_every_real_pair_is_kept_and_counted(tok):
    """All 300 of dpo_en_demo.json's pairs through the reward method's prepare: none dropped, each fits."""
    import datasets

    from gemma_hf.recipes.data import read_dataset
    from gemma_hf.recipes.runtime import Run
    from gemma_hf.recipes.schema import DatasetSpec

    require(llamafactory_data)
    part = read_dataset(DatasetSpec(path="asset:llamafactory-data/dpo_en_demo.json"), 0, "preference", "gemma2")
    recipe = SimpleNamespace(family="gemma2", training=SimpleNamespace(max_length=256),
                             method_args=SimpleNamespace(long_examples="truncate_prompt"))
    run = Run(recipe=recipe, method=METHOD, rundir=None, state=None, tokenizer=tok)
    prepared, stats = METHOD.prepare(run, datasets.Dataset.from_list(part.records), "all")
    assert len(prepared) == 300 == stats["examples"]
    assert stats["dropped"] == stats["made_equal"] == 0 and stats["handling"] == "truncate_prompt"
    assert stats["prompt_cut"] > 0 and stats["answers_cut"] > 0
    assert stats["prompt_cut"] + stats["answers_cut"] == stats["long"]
    assert max(max(len(c), len(r)) for c, r in zip(prepared["chosen_ids"], prepared["rejected_ids"])) <= 256


def test_accuracy_interval_and_the_card_cell():
    from gemma_hf.hub.cards import _eval_entries, _with_intervals

    out = pair_metrics([1.0, 2.0, 0.0, 3.0] * 10, [0.0, 1.0, 1.0, 2.0] * 10, seed=0)
    assert out["accuracy"] == 0.75 and out["accuracy_ci_low"] < 0.75 < out["accuracy_ci_high"]
    assert pair_metrics([1.0, 2.0], [0.0, 1.0], seed=3) == pair_metrics([1.0, 2.0], [0.0, 1.0], seed=3)
    recorded = {f"{k}_{when}": v for when in ("before", "after") for k, v in out.items()}
    cells = _with_intervals(recorded)
    assert cells["accuracy_after"] == f"0.75 [{out['accuracy_ci_low']:.4g}, {out['accuracy_ci_high']:.4g}]"
    assert "accuracy_ci_low_after" not in cells and cells["margin_after"] == out["margin"]
    names = {e.metric_type for e in _eval_entries(recorded, ["asset:llamafactory-data/dpo_en_demo.json"], "text-classification")}
    assert "accuracy" in names and not any("_ci_" in n for n in names)


def _conversations(count=30):
    return [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": (f"Answer number {i} " + "with more words " * (i % 5)).strip()}]}
            for i in range(count)]


def test_built_pairs_are_seeded_and_of_their_kind():
    records = _conversations()
    off = preference_pairs(records, "off_topic", 20, seed=1)
    assert off == preference_pairs(records, "off_topic", 20, seed=1) != preference_pairs(records, "off_topic", 20, seed=2)
    answers = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in records}
    assert len(off) == 20
    for pair in off:
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert chosen == answers[pair["prompt"][0]["content"]] and rejected in answers.values() and rejected != chosen
    for pair in preference_pairs(records, "shuffled", 10, seed=0):
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert Counter(chosen.split()) == Counter(rejected.split()) and chosen != rejected


@pytest.mark.parametrize("entry,text", [
    ({"path": "x.json"}, "needs a name and a path"),
    ({"name": "Off", "path": "x.json"}, "lower-case identifier"),
    ({"name": "off", "path": "asset:llamafactory-data/alpaca_en_demo.json", "build": "random"}, "is not one of"),
    ({"name": "off", "path": "asset:llamafactory-data/alpaca_en_demo.json"}, "fit no known preference format"),
])
def test_bad_extra_eval_datasets_are_refused_before_anything_runs(tmp_path, capsys, entry, text):
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    recipe = yaml.safe_load(TINY_REWARD.read_text())
    recipe.update(output_dir=str(tmp_path / "out"), extra_eval_datasets=[entry])
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli(["validate", str(path)], capsys)
    assert code == 2 and "extra_eval_datasets[0]" in err and text in err, err
    assert json.dumps(entry)  # the entry is plain YAML data


def test_every_built_kind_is_the_corruption_it_names():
    records = [{"messages": [{"role": "user", "content": f"Explain thing {i} in a few sentences."},
                             {"role": "assistant", "content": f"Thing {i} is a thing. It has many parts, and each part "
                                                              f"works with the others to make thing {i} do its job well."}]}
               for i in range(12)]
    answers = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in records}
    kinds = ["truncated", "repeated", "echo", "continued", "restated"]
    pairs = preference_pairs(records, kinds, size=10, seed=4)
    assert Counter(p["kind"] for p in pairs) == {"truncated": 2, "repeated": 2, "echo": 2, "continued": 2, "restated": 2}
    assert pairs == preference_pairs(records, kinds, size=10, seed=4)
    for pair in pairs:
        instruction = pair["prompt"][-1]["content"]
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert chosen == answers[instruction] and rejected != chosen
        if pair["kind"] == "truncated":  # a strict prefix, cut mid-sentence
            assert chosen.startswith(rejected) and len(rejected.split()) < len(chosen.split())
            assert not rejected.endswith((".", "!", "?", ":", ";"))
        elif pair["kind"] == "repeated":  # the answer's first words, looped
            words = rejected.split()
            head = next(n for n in range(4, 13) if words[n:2 * n] == words[:n])
            assert words[:head] == chosen.split()[:head] and len(words) >= len(chosen.split())
        elif pair["kind"] == "restated":  # the whole answer, then its first sentence again and again
            first = chosen.split(". ")[0] + "."
            assert rejected.startswith(chosen + " " + first + " " + first)
        elif pair["kind"] == "continued":  # the whole answer, then the start of another one: the longer side
            rest = rejected[len(chosen):]
            assert rejected.startswith(chosen + "\n\n") and rest.strip() and rest.strip() not in chosen
            assert any(other.startswith(rest.strip()) for other in answers.values() if other != chosen)
        else:
            assert rejected == instruction
    assert len(preference_pairs(records, ["off_topic", "echo"], size=5, seed=0)) == 5
    # continued and restated take answers of at most MAX_WORDS words (a longer pair would be cut equal by
    # a reward model's max_length); the other kinds make up the size, each up to an equal share.
    long = [{"messages": [r["messages"][0], {"role": "assistant", "content": " ".join(
        [r["messages"][1]["content"]] * 6)}]} for r in records]
    mixed = preference_pairs(records[:4] + long[4:], kinds, size=10, seed=1)
    by_kind = Counter(p["kind"] for p in mixed)
    assert len(mixed) == 10 and by_kind["continued"] + by_kind["restated"] == 4 and max(by_kind.values()) == 2
    assert all(len(p["chosen"][0]["content"].split()) <= MAX_WORDS["restated"]
               for p in mixed if p["kind"] in ("continued", "restated"))
    with pytest.raises(ValueError, match="unknown build"):
        preference_pairs(records, ["loud"])


def _reward_recipe(tmp_path, **changes):
    recipe = yaml.safe_load(TINY_REWARD.read_text())
    recipe.update(output_dir=str(tmp_path / "out"), **changes)
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


BUILT = {"path": "asset:llamafactory-data/alpaca_en_demo.json", "split": "train[:60]",
         "build": ["off_topic", "truncated", "repeated", "echo"], "build_size": 40}


@pytest.mark.parametrize("change,key,text", [
    ({"build": ["off_topic", "loud"]}, "datasets[1].build", "not kinds of built pairs"),
    ({"build": ["echo", "echo"]}, "datasets[1].build", "a kind named twice"),
    ({"build_size": 0}, "datasets[1].build_size", "not a count of pairs"),
    ({"format": "preference"}, "datasets[1].format", "build reads instruction records"),
])
def test_bad_builds_are_refused_before_anything_runs(tmp_path, capsys, change, key, text):
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    path = _reward_recipe(tmp_path, datasets=[{"path": "asset:llamafactory-data/dpo_en_demo.json"}, {**BUILT, **change}])
    code, _, err = run_cli(["validate", "--method", "reward", str(path)], capsys)
    assert code == 2 and key in err and text in err, err


def test_a_build_in_a_recipe_that_reads_no_pairs_is_refused(tmp_path, capsys):
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    path = tmp_path / "sft.yaml"
    recipe = yaml.safe_load((TINY_REWARD.parent / "sft.yaml").read_text())
    recipe.update(output_dir=str(tmp_path / "out"), datasets=[BUILT])
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli(["validate", "--method", "sft", str(path)], capsys)
    assert code == 2 and "datasets[0].build" in err and "only reward recipes" in err, err


def test_a_reward_model_on_real_and_built_pairs_reports_accuracy_by_origin(tmp_path, capsys):
    """The mixture of real pairs and built ones: every pair carries its origin, and eval.json reads the held-out
    accuracy by origin (with intervals) next to the mixture's, before and after."""
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    path = _reward_recipe(tmp_path, datasets=[{"path": "asset:llamafactory-data/dpo_en_demo.json"}, BUILT],
                          test_split_size=24, max_steps=2, save_steps=2)
    code, out, err = run_cli(["reward", "--config", str(path)], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "eval.json").read_text())
    origins = {k[len("origin_"):-len("_num_pairs_after")] for k in results
               if k.startswith("origin_") and k.endswith("_num_pairs_after")}
    assert origins <= {"dpo_en_demo", "off_topic", "truncated", "repeated", "echo"} and len(origins) >= 3, origins
    assert sum(results[f"origin_{o}_num_pairs_after"] for o in origins) == results["num_pairs_after"]
    for origin in origins:
        low, value, high = (results[f"origin_{origin}_accuracy{s}_after"] for s in ("_ci_low", "", "_ci_high"))
        assert 0 <= low <= value <= high <= 1
    assert "held-out pairs from" in out + err
