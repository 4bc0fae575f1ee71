"""``streaming: true`` (gemma_hf.recipes.streaming): a tiny SFT run on a streamed mixture trains and
publishes; validation checks every record but keeps counts only; what needs the whole mixture (or its
length) is refused with exit 2; the held-out split is deterministic and apart from the training stream."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import yaml

from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from gemma_hf.recipes.config import load_recipe
from gemma_hf.recipes.methods import get_method
from gemma_hf.recipes.runtime import read_mixture
from gemma_hf.recipes.streaming import StreamedMixture, choose_held_out
from tests.assets import require
from tests.clirun import cli, run_cli

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def assets_present():
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)


DROP = object()  # a change that removes the key


def streamed_recipe(tmp_path: Path, method: str = "sft", **changes) -> Path:
    """The tiny recipe of ``method``, streamed: 200 demo records (a slice streams; a fraction is refused),
    12 held out, 2 steps; then ``changes`` (DROP removes a key)."""
    recipe = yaml.safe_load((TINY / f"{method}.yaml").read_text())
    recipe.update(streaming=True, output_dir=str(tmp_path / "run"), max_steps=2, test_split_size=12,
                  eval_steps=2, save_steps=2, logging_steps=1)
    recipe["datasets"] = [{"path": "asset:llamafactory-data/alpaca_en_demo.json", "split": "train[:200]"}]
    for key, value in changes.items():
        if value is DROP:
            recipe.pop(key, None)
        else:
            recipe[key] = value
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def jsonl(path: Path, name: str, count: int) -> Path:
    """``count`` distinguishable conversations (the answer names the record) as JSON Lines."""
    with path.open("w") as handle:
        for index in range(count):
            handle.write(json.dumps({"instruction": f"Say {name} {index}.", "output": f"{name} {index}"}) + "\n")
    return path


def test_streamed_sft_trains_and_publishes(tmp_path):
    out = tmp_path / "run"
    assert cli(["sft", "--config", streamed_recipe(tmp_path)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["global_step"] == 2 and run["num_train_examples"] == 188 and run["num_eval_examples"] == 12
    assert run["datasets"][0]["num_examples"] == 200
    assert run["examples_longer_than_max_length"]["train"]["examples"] == "streamed"
    results = json.loads((out / "eval.json").read_text())
    assert math.isfinite(results["eval_loss_before"]) and math.isfinite(results["eval_loss_after"])
    assert results["num_eval_examples"] == 12
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["streaming"] is True
    assert [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m] == [1, 2]


def test_validation_checks_every_record_but_keeps_counts(tmp_path):
    recipe = load_recipe(streamed_recipe(tmp_path))
    part = recipe.data_parts[0]
    assert part.count == 200 and part.records == [] and part.rows == []
    # The demo file is a JSON array: parsed whole on each pass, which validation says.
    assert any("convert it to JSON Lines" in note for note in recipe.notes)


# (name, recipe changes, key the message names, text it must contain)
REFUSED = [
    ("no-max-steps", dict(max_steps=DROP, num_train_epochs=1), "max_steps",
     "one epoch of the 188 training records is about 47 steps"),
    ("buffer-0", dict(shuffle_buffer_size=0), "shuffle_buffer_size", "at least one example"),
    ("fraction", dict(datasets=[{"path": "asset:llamafactory-data/alpaca_en_demo.json", "fraction": 0.2}]),
     "datasets[0].fraction", "split: train[:N]"),
    ("percent-slice", dict(datasets=[{"path": "asset:llamafactory-data/alpaca_en_demo.json", "split": "train[:10%]"}]),
     "datasets[0].split", "train[:1000]"),
    ("packing-without-length", dict(packing=True, max_length=None, long_examples="truncate"), "packing",
     "needs max_length"),
    ("sampler", dict(train_sampling_strategy="group_by_length"), "train_sampling_strategy", "shuffle_buffer_size: 1"),
    ("buffer-without-streaming", dict(streaming=False, shuffle_buffer_size=10), "shuffle_buffer_size",
     "set streaming: true"),
]


@pytest.mark.parametrize("changes,key,text", [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_streaming_refusals(tmp_path, capsys, changes, key, text):
    code, _, err = run_cli(["validate", streamed_recipe(tmp_path, **changes)], capsys)
    assert code == 2, err
    assert f"{key}:" in err and text in err, err


def test_methods_that_do_not_stream_refuse_it(tmp_path, capsys):
    code, _, err = run_cli(["validate", streamed_recipe(tmp_path, "reward")], capsys)
    assert code == 2
    assert "streaming:" in err and "the reward method reads its whole mixture into memory" in err
    assert "streaming works with sft only" in err


def test_held_out_split_is_deterministic_exact_and_apart_from_training(tmp_path):
    counts = [50, 30]
    first = choose_held_out(counts, 8, split_seed=3)
    assert first == choose_held_out(counts, 8, split_seed=3) and len(first) == 8
    assert first != choose_held_out(counts, 8, split_seed=4)
    assert len(choose_held_out(counts, 0.05, split_seed=3)) == math.ceil(0.05 * 80)
    assert choose_held_out(counts, None, split_seed=3) == frozenset()

    a, b = jsonl(tmp_path / "a.jsonl", "alpha", 50), jsonl(tmp_path / "b.jsonl", "beta", 30)
    path = streamed_recipe(tmp_path, datasets=[{"path": str(a)}, {"path": str(b)}], test_split_size=8, split_seed=3)

    def mixture() -> StreamedMixture:
        recipe = load_recipe(path)
        return read_mixture(recipe, get_method("sft"))

    def answer(record):
        return record["messages"][-1]["content"]

    one, two = mixture(), mixture()
    assert one.held_out == first
    held_out = [answer(r) for r in one.held_out_records()]
    assert held_out == [answer(r) for r in two.held_out_records()] and len(held_out) == 8
    training = [answer(r) for r in one.training_records()]
    assert training == [answer(r) for r in two.training_records()]  # the interleaving is seeded
    everything = [f"alpha {i}" for i in range(50)] + [f"beta {i}" for i in range(30)]
    assert Counter(training + held_out) == Counter(everything)  # each record once, in one split only
    # Interleaved, not one dataset after the other: the first half of the epoch holds both.
    assert {text.split()[0] for text in training[:36]} == {"alpha", "beta"}

    # A dataset that changes after validation stops the stream, never trains on other records.
    jsonl(a, "alpha", 49)
    with pytest.raises(RuntimeError, match="changed since it was checked"):
        list(one.training_records())


def test_one_bos_is_checked_as_the_stream_passes():
    """A stream cannot be checked ahead (that would read it all): SFT maps the check over it, so a row
    with two <bos> stops training when it comes, with its index."""
    from datasets import IterableDataset

    from gemma_hf.recipes.sft import _bos_checker

    rows = [{"input_ids": [2, 5, 6]}, {"input_ids": [2, 7, 2, 8]}]
    stream = IterableDataset.from_generator(lambda: iter(rows)).map(_bos_checker(2, "train"), with_indices=True)
    with pytest.raises(RuntimeError, match="train example 1"):
        list(stream)
