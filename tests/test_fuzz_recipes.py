"""A property-based recipe fuzzer (Hypothesis), for every method: mutate a valid tiny recipe (any
key set to any YAML value, keys dropped, unknown keys added, dataset entries changed, numbers at
their edges) and check the verdict is "exit 0, or exit 2 with a message naming a key" -- never a
traceback, never an unexpected error. A second fuzzer runs mutated numeric knobs for real (two
steps): exit 0, 1 (diverged) or 2, and never a finished run with non-finite weights.

Default: 60 validation examples and 3 runs per method; `pytest -m faults` runs 400 and 12.
Each test prints its tally (run with -s to see it).
"""

from __future__ import annotations

import collections
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from gemma_hf.recipes.methods import key_index
from tests.assets import require
from tests.clirun import cli
from tests.faults import ALL_METHODS, METHODS, extra_args, recipe_of, tiny_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 1e-30, 1e30, 0.5, "1e-4", "no", "yes", "null", ".inf", "-.nan", "",
                     "eager", "sdpa", "steps", "adamw_torch", "asset:gemma-tokenizer", "/nonexistent", "~", "../.."]),
    st.text(max_size=12),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
DATASET_KEYS = ["path", "split", "name", "fraction", "columns", "format", "typo"]


def mutations(method: str):
    keys = sorted(key_index(method))
    one = st.one_of(
        st.tuples(st.just("set"), st.sampled_from(keys), VALUES),
        st.tuples(st.just("drop"), st.sampled_from(keys), st.none()),
        st.tuples(st.just("add"), st.text(min_size=1, max_size=15), VALUES),
        st.tuples(st.just("dataset"), st.sampled_from(DATASET_KEYS), VALUES),
    )
    return st.lists(one, min_size=1, max_size=4)


def apply(recipe: dict, changes) -> dict:
    recipe = json.loads(json.dumps(recipe))
    for kind, key, value in changes:
        if kind in ("set", "add"):
            recipe[key] = value
        elif kind == "drop":
            recipe.pop(key, None)
        elif isinstance(recipe.get("datasets"), list) and recipe["datasets"] and isinstance(recipe["datasets"][0], dict):
            recipe["datasets"][0][key] = value
    return recipe


def validate(method: str, recipe: dict, tmp: Path, capsys) -> tuple[int, str]:
    path = tmp / f"{method}.yaml"
    try:
        text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:
        text = json.dumps(recipe)
    path.write_text(text, encoding="utf-8")
    code = cli(["validate", str(path), "--method", method])
    return code, capsys.readouterr().err


def base(method: str, tmp: Path) -> dict:
    recipe = tiny_recipe(method)
    recipe["output_dir"] = str(tmp / "out")
    return recipe


TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _fuzz_validation(method: str, tmp_path_factory, capsys, examples: int) -> None:
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    tmp = tmp_path_factory.mktemp(f"fuzz-{method}")
    recipe = base(method, tmp)
    tally = TALLY[f"validate-{method}"]

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(mutations(method))
    def check(changes):
        code, err = validate(method, apply(recipe, changes), tmp, capsys)
        tally["recipes"] += 1
        tally[f"exit {code}"] += 1
        assert code in (0, 2), (changes, err[-2000:])
        assert "Traceback" not in err and "unexpected" not in err, (changes, err[-2000:])
        if code == 2:
            assert err.startswith("error: ") and ("\n  - " in err or "fix" in err or "--" in err), (changes, err)
        assert not (tmp / "out").exists()

    check()
    print(f"\nfuzz validate {method}: {dict(tally)}")


@pytest.mark.parametrize("method", ALL_METHODS)
def test_fuzzed_recipes_exit_0_or_2_naming_a_key(method, tmp_path_factory, capsys):
    _fuzz_validation(method, tmp_path_factory, capsys, examples=60)


@pytest.mark.faults
@pytest.mark.parametrize("method", ALL_METHODS)
def test_fuzzed_recipes_long(method, tmp_path_factory, capsys):
    _fuzz_validation(method, tmp_path_factory, capsys, examples=150)


NUMERIC = st.fixed_dictionaries({}, optional={
    "learning_rate": st.sampled_from([1e-12, 1e-4, 3e-3, 1.0, 1e3, 1e30, 3e38]),
    "weight_decay": st.sampled_from([0.0, 0.1, 10.0, 1e30]),
    "max_grad_norm": st.sampled_from([0.0, 1e-6, 1.0, 1e30]),
    "adam_beta1": st.sampled_from([0.0, 0.5, 0.999999]),
    "adam_beta2": st.sampled_from([0.0, 0.5, 0.999999]),
    "adam_epsilon": st.sampled_from([1e-30, 1e-8, 1.0]),
    "warmup_steps": st.sampled_from([0, 0.5, 1, 1000]),
    "per_device_train_batch_size": st.sampled_from([1, 3]),
    "gradient_accumulation_steps": st.sampled_from([1, 2]),
    "max_length": st.sampled_from([2, 8, 64]),
})


def _fuzz_runs(method: str, tmp_path_factory, capsys, examples: int) -> None:
    from safetensors.torch import load_file

    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    tmp = tmp_path_factory.mktemp(f"fuzz-run-{method}")
    tally = TALLY[f"run-{method}"]

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(NUMERIC)
    def check(knobs):
        out = tmp / f"run-{tally['recipes']}"
        argv = [method, "--config", str(recipe_of(method)), "--output_dir", str(out), "--max_steps", "2",
                "--save_steps", "2", "--eval_strategy", "no", "--test_split_size", "null"]
        if method == "sft":
            argv += ["--sample_prompts", "null"]
        if method == "distill":  # the tiny shared teacher, not the recipe's real 270M (tests/faults.py)
            argv += extra_args(method)
        for key, value in knobs.items():
            argv += [f"--{key}", repr(value) if isinstance(value, float) else str(value)]
        code = cli(argv)
        err = capsys.readouterr().err
        tally["recipes"] += 1
        tally[f"exit {code}"] += 1
        assert code in (0, 1, 2), (knobs, err[-2000:])
        assert "Traceback" not in err and "unexpected" not in err, (knobs, err[-3000:])
        if code == 1:
            assert "training diverged" in err or "not all finite" in err or "not finite" in err, (knobs, err[-2000:])
        if (out / "run.json").exists():
            assert code == 0
            for name, tensor in load_file(out / "model.safetensors").items():
                assert torch.isfinite(tensor).all(), (knobs, name)
            for value in json.loads((out / "eval.json").read_text()).values() if (out / "eval.json").exists() else []:
                assert not isinstance(value, float) or math.isfinite(value)
        else:
            assert code != 0

    check()
    print(f"\nfuzz run {method}: {dict(tally)}")


@pytest.mark.parametrize("method", METHODS)
def test_fuzzed_training_knobs_never_publish_non_finite_weights(method, tmp_path_factory, capsys):
    _fuzz_runs(method, tmp_path_factory, capsys, examples=3)


@pytest.mark.faults
@pytest.mark.parametrize("method", METHODS)
def test_fuzzed_training_knobs_long(method, tmp_path_factory, capsys):
    _fuzz_runs(method, tmp_path_factory, capsys, examples=5)


REWARD_VALUES = st.one_of(
    st.none(), st.integers(-10**400, 10**400), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.booleans(), st.lists(st.floats(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))


@settings(max_examples=400, deadline=None, database=None, derandomize=True)
@given(returned=st.one_of(st.lists(REWARD_VALUES, max_size=6), st.tuples(REWARD_VALUES, REWARD_VALUES), REWARD_VALUES),
       count=st.integers(0, 6))
def test_fuzzed_reward_function_results_are_numbers_or_a_named_error(returned, count):
    """What a reward function returns (issue 22, case 3) is one finite float per completion, or a
    RewardValueError naming the entry -- never another exception, never NaN passed on to TRL."""
    from gemma_hf.rl.rewards import RewardValueError, check_rewards

    try:
        values = check_rewards(returned, count, "rewards[0]", "m:f")
    except RewardValueError as err:
        assert "reward rewards[0] (m:f)" in str(err) and "was not published" in str(err)
        return
    assert len(values) == count and all(isinstance(v, float) and math.isfinite(v) for v in values)
