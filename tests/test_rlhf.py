"""RLHF and WARP on CPU with a verifiable toy task.

The policy is a tiny Gemma 2 whose embedding gives every "ASCII-letters-only" token of the real
Gemma tokenizer (its 4,096-entry cut) a shared direction u: the reward (gemma_hf.rl.rules:ascii_letters, the share of
ASCII letters in the answer) can then be raised by moving the hidden state along u -- learnable in
a few RL steps, unlike a uniform random policy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from tests.assets import require
from tests.assets import tokenizer as load_tokenizer
from tests.clirun import cli, run_cli

REPO = Path(__file__).resolve().parent.parent
TINY_RLHF = REPO / "recipes" / "tiny" / "rlhf.yaml"
TINY_WARP = REPO / "recipes" / "tiny" / "warp.yaml"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """The toy policy: ASCII-letter tokens share a direction of the (tied) embedding."""
    from gemma_hf import GemmaHFForCausalLM, preset_config
    from gemma_hf.chat import install_chat_template
    from gemma_hf.recipes.runtime import set_generation_stops

    require(llamafactory_data)
    tok = load_tokenizer(gemma_tokenizer_tiny)
    recipe = yaml.safe_load(TINY_RLHF.read_text())
    torch.manual_seed(0)
    model = GemmaHFForCausalLM(preset_config("gemma2-2b", **recipe["preset_overrides"]))
    letters = [i for token, i in tok.get_vocab().items() if token.isascii() and token.isalpha()]
    with torch.no_grad():
        u = torch.randn(model.config.hidden_size)
        u /= u.norm()
        model.model.embed_tokens.weight[letters] += 0.5 * u
    set_generation_stops(model, tok)
    path = tmp_path_factory.mktemp("policy") / "policy"
    model.save_pretrained(path)
    tok = install_chat_template(tok, "gemma2")
    tok.save_pretrained(path)
    return path


def rl_argv(recipe: Path, policy: Path, out: Path, *extra: str) -> list[str]:
    return [recipe.stem, "--config", str(recipe), "--output_dir", str(out), "--model_name_or_path", str(policy),
            "--preset", "null", "--preset_overrides", "null", "--tokenizer_name_or_path", "null", *extra]


def test_rl_raises_the_held_out_reward_with_bounded_kl(policy_dir, tmp_path):
    out = tmp_path / "run"
    assert cli(rl_argv(TINY_RLHF, policy_dir, out, "--max_steps", "8", "--learning_rate", "2e-2")) == 0
    results = json.loads((out / "eval.json").read_text())
    print(f"toy RL: held-out reward {results['reward_before']:.3f} -> {results['reward_after']:.3f}, "
          f"KL to init {results['kl_to_init_after']:.4f} per token")
    assert results["reward_after"] > results["reward_before"] + 0.05
    assert 0 < results["kl_to_init_after"] < 2.0
    assert results["kl_to_init_before"] == 0.0 and results["num_prompts_after"] == 8
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "reward" in m] == [2, 4, 6, 8]
    assert all("kl" in m for m in metrics if "reward" in m)
    assert (out / "plots" / "rl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "rlhf" and run["rl_algorithm"] == "rloo" and run["global_step"] == 8
    # The policy keeps stopping at <end_of_turn>; the run directory chats like any other.
    config = json.loads((out / "generation_config.json").read_text())
    assert 107 in config["eos_token_id"] and 1 in config["eos_token_id"]


def test_the_ema_anchor_is_the_closed_form_of_the_policy_trajectory(policy_dir, tmp_path):
    """anchor_k = (1 - mu) anchor_{k-1} + mu theta_k after every step k, anchor_0 = theta_0."""
    from accelerate import PartialState
    from transformers import TrainerCallback

    from gemma_hf.recipes.config import load_recipe
    from gemma_hf.recipes.runtime import Run, build_model, load_tokenizer, prepare_splits, read_mixture
    from gemma_hf.recipes.methods import get_method
    from gemma_hf.rundir import RunDir

    mu = 0.3
    argv = rl_argv(TINY_RLHF, policy_dir, tmp_path / "run", "--ema_anchor", str(mu), "--max_steps", "3",
                   "--learning_rate", "1e-2", "--save_strategy", "no")[3:]
    recipe = load_recipe(TINY_RLHF, argv, method="rlhf")
    method = get_method("rlhf")
    run = Run(recipe, method, RunDir(recipe.output_dir), PartialState())
    run.tokenizer = load_tokenizer(recipe)
    train_set, eval_set = prepare_splits(run, read_mixture(recipe, method))
    model, _ = build_model(recipe, "causal-lm")
    method.configure_model(run, model)
    trajectory = [{k: v.detach().clone() for k, v in model.named_parameters()}]

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            trajectory.append({k: v.detach().clone() for k, v in model.named_parameters()})

    trainer = method.make_trainer(run, model, train_set, None)
    trainer.callback_handler.callbacks.insert(0, Record())  # before the sync: both see the same theta_k
    trainer.train()
    expected = {k: v.clone() for k, v in trajectory[0].items()}
    for theta in trajectory[1:]:
        for name, value in expected.items():
            value.mul_(1 - mu).add_(theta[name], alpha=mu)
    anchor = dict(trainer.ref_model.named_parameters())
    assert len(trajectory) == 4
    worst = max((anchor[k].detach() - v).abs().max().item() for k, v in expected.items())
    moved = max((trajectory[-1][k] - trajectory[0][k]).abs().max().item() for k in expected)
    assert worst == 0.0 and moved > 0


def test_warp_merges_its_runs_and_keeps_every_stage(policy_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "warp"
    assert cli(rl_argv(TINY_WARP, policy_dir, out, "--max_steps", "3", "--save_steps", "3",
                       "--learning_rate", "2e-2")) == 0
    stages = out / "stages" / "iter-0"
    assert sorted(p.name for p in stages.iterdir()) == ["liti-0.3", "liti-0.5", "liti-1", "run-0", "run-1", "slerp"]
    final, carried = load_file(out / "model.safetensors"), load_file(stages / "liti-0.5" / "model.safetensors")
    assert final.keys() == carried.keys() and all(torch.equal(final[k], carried[k]) for k in final)
    merge = json.loads((stages / "slerp" / "merge.json").read_text())
    assert merge["method"] == "slerp"
    results = json.loads((out / "eval.json").read_text())
    points = {row["point"]: row for row in results["pareto"]}
    assert set(points) == {"init", "run-0", "run-1", "slerp", "liti-0.3", "liti-0.5", "liti-1"}
    runs_reward = (points["run-0"]["reward"] + points["run-1"]["reward"]) / 2
    runs_kl = (points["run-0"]["kl_to_init"] + points["run-1"]["kl_to_init"]) / 2
    print("WARP toy pareto: " + ", ".join(f"{k}: reward {v['reward']:.3f} KL {v['kl_to_init']:.4f}"
                                          for k, v in points.items()))
    print(f"runs' mean: reward {runs_reward:.3f} KL {runs_kl:.4f}")
    assert points["init"]["kl_to_init"] == 0.0
    # LITI is exactly (1 - eta) init + eta (init + merged task vector), tensor by tensor.
    init, merged = load_file(out / "stages" / "init-0" / "model.safetensors"), load_file(stages / "slerp" / "model.safetensors")
    liti = load_file(stages / "liti-0.3" / "model.safetensors")
    assert max((liti[k] - (0.7 * init[k] + 0.3 * merged[k])).abs().max().item() for k in liti) < 1e-6
    # eta = 1 is the SLERP merge itself, byte for byte: the Pareto view measures it once.
    assert (stages / "liti-1" / "model.safetensors").read_bytes() == (stages / "slerp" / "model.safetensors").read_bytes()
    assert points["liti-1"]["reward"] == points["slerp"]["reward"]
    assert points["liti-1"]["kl_to_init"] == points["slerp"]["kl_to_init"]
    assert (out / "plots" / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every point has 95% intervals (one bootstrap over the 8 held-out prompts) around its estimates,
    # and its reward gain over init, paired prompt by prompt.
    assert results["pareto_intervals"]["num_prompts"] == 8 and results["pareto_intervals"]["confidence"] == 0.95
    for name, row in points.items():
        for key in ("reward", "kl_to_init", "reward_gain"):
            assert row[f"{key}_ci_low"] - 1e-9 <= row[key] <= row[f"{key}_ci_high"] + 1e-9, (name, key, row)
            assert results[f"{key}_{name}_ci_low"] == row[f"{key}_ci_low"]
        assert row["reward_gain"] == pytest.approx(row["reward"] - points["init"]["reward"], abs=1e-9)
    init_row = points["init"]
    assert (init_row["reward_gain_ci_low"], init_row["reward_gain_ci_high"]) == (0.0, 0.0)
    assert (init_row["kl_to_init_ci_low"], init_row["kl_to_init_ci_high"]) == (0.0, 0.0)
    assert {k: v for k, v in points["liti-1"].items() if k not in ("point", "group")} == \
        {k: v for k, v in points["slerp"].items() if k not in ("point", "group")}
    from gemma_hf.recipes.warp import METHOD as WARP

    lines = WARP.summary(results)
    print("\n".join(lines))
    assert len(lines) == 7 and all(line.count("[") >= 2 for line in lines)
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "warp" and [s["stage"] for s in run["stages"]] == [
        "iter-0/run-0", "iter-0/run-1", "iter-0/slerp", "iter-0/liti"]
    card = (out / "README.md").read_text()
    assert "pareto" in card and "WARP" in card
    slerp_row = next(line for line in card.splitlines() if line.startswith("| slerp |"))
    assert f"{points['slerp']['reward']:.6g} [{points['slerp']['reward_ci_low']:.6g}, " in slerp_row
    # The runs train with their own seeds but hold out the WARP recipe's records (split_seed), and
    # leave the init's evaluation to the Pareto view.
    import yaml

    warp_seed = yaml.safe_load((out / "recipe.yaml").read_text()).get("seed", 0)
    for m in (0, 1):
        sub = yaml.safe_load((stages / f"run-{m}" / "recipe.yaml").read_text())
        assert sub["seed"] == warp_seed + m and sub["split_seed"] == warp_seed and sub["eval_before_training"] is False
        assert sub["eval_after_training"] is False  # the Pareto view measured each run: no second evaluation
        assert not any(k.endswith("_after") and k.startswith("reward") for k in json.loads(
            (stages / f"run-{m}" / "eval.json").read_text()) if (stages / f"run-{m}" / "eval.json").is_file())


def test_pareto_intervals_are_paired_against_init():
    """One bootstrap over prompts for every point: a point that beats init by 0.25 on every prompt has
    a gain of exactly [0.25, 0.25] although its reward interval overlaps init's; KL is per token."""
    import random

    from gemma_hf.rl.metrics import paired_intervals

    rng = random.Random(0)
    init = [rng.uniform(0, 3) for _ in range(16)]
    tokens = [rng.randint(1, 20) for _ in init]
    per_prompt = {
        "init": {"reward": init, "kl_sum": [0.0] * 16, "kl_tokens": tokens},
        "better": {"reward": [r + 0.25 for r in init], "kl_sum": [0.1 * n for n in tokens], "kl_tokens": tokens},
        "noisy": {"reward": [float("nan"), *init[1:]], "kl_sum": [0.0] * 16, "kl_tokens": [0] * 16},
    }
    out = paired_intervals(per_prompt, "init", num_resamples=500, seed=3)
    assert out == paired_intervals(per_prompt, "init", num_resamples=500, seed=3)
    init_row = out["init"]
    assert init_row["reward_gain"] == 0.0 and (init_row["reward_gain_ci_low"], init_row["reward_gain_ci_high"]) == (0, 0)
    better = out["better"]
    assert better["reward_gain"] == pytest.approx(0.25)
    assert (better["reward_gain_ci_low"], better["reward_gain_ci_high"]) == pytest.approx((0.25, 0.25))
    assert better["reward_ci_low"] < out["init"]["reward_ci_high"]  # unpaired, they overlap
    assert (better["kl_to_init_ci_low"], better["kl_to_init_ci_high"]) == pytest.approx((0.1, 0.1))
    # A NaN reward is left out (as the mean leaves it out), of the gain too; no token sampled: no KL interval.
    noisy = out["noisy"]
    assert noisy["reward_gain"] == 0.0 and noisy["reward_ci_low"] <= sum(init[1:]) / 15 <= noisy["reward_ci_high"]
    assert noisy["kl_to_init_ci_low"] is None
    with pytest.raises(ValueError, match="same prompts"):
        paired_intervals({**per_prompt, "short": {"reward": init[:8]}}, "init")


def test_pareto_plot_merges_coincident_labels_and_keeps_labels_apart(tmp_path):
    from gemma_hf.recipes.plots import Point, merge_coincident, plot_points

    merged = merge_coincident([Point(0.07, 2.14, "slerp"), Point(0.07, 2.14, "η=1"), Point(0.0701, 2.141, "run-1"),
                               Point(0.0, 2.33, "init"), Point(0.0, 2.33)], x_span=0.1, y_span=1.0)
    assert [text for _, _, text in merged] == ["slerp = η=1 ≈ run-1", "init"]
    # WARP's points as the README measured them: η = 1 is the SLERP merge; η=0.5 sits near init.
    bars = (0.1, 0.1)
    groups = {"init": [Point(0.0, 2.33, "init", (0.0, 0.0), (2.1, 2.6))],
              "RL runs": [Point(0.023, 2.63, "run-0", bars, (2.4, 2.9)), Point(0.062, 2.17, "run-1", bars, (1.9, 2.4))],
              "SLERP merge": [Point(0.068, 2.14, "slerp")],
              "LITI": [Point(0.002, 2.34, "η=0.3"), Point(0.014, 2.33, "η=0.5"), Point(0.068, 2.14, "η=1")]}
    placed = plot_points(groups, tmp_path / "pareto.png", "title", "KL", "reward")
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    texts = [text for text, _ in placed]
    assert sorted(texts) == sorted(["init", "run-0", "run-1", "slerp = η=1", "η=0.3", "η=0.5"])
    boxes = [box for _, box in placed]
    for i, a in enumerate(boxes):
        for b in boxes[:i]:
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1]), (a, b)


@pytest.mark.faults
@pytest.mark.parametrize("point", ["warp:iter-0/run-0", "warp:iter-0/slerp", "publish:files"])
def test_warp_killed_between_stages_resumes_without_redoing_them(policy_dir, tmp_path, point):
    """kill -9 between stages (or while publishing), then --resume: finished stages are skipped, the
    final model equals the uninterrupted run's."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from gemma_hf.rundir import RunDir

    argv = ["--max_steps", "2", "--save_steps", "2", "--learning_rate", "2e-2"]

    def run(out, *extra, **env):
        return subprocess.run([sys.executable, "-m", "gemma_hf.cli", *rl_argv(TINY_WARP, policy_dir, out, *argv),
                               *extra], capture_output=True, text=True, timeout=1800, cwd=REPO,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", **env})

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert run(reference).returncode == 0
    first = run(killed, GEMMA_HF_KILL_AT=point)
    assert first.returncode == -9 and not RunDir(killed).is_finished()
    resumed = run(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    stages = {s["stage"]: s for s in json.loads((killed / "run.json").read_text())["stages"]}
    if point != "publish:files":
        assert stages["iter-0/run-0"].get("skipped") is True
    a, b = load_file(killed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in (killed / "stages").rglob(".*") if ".tmp-" in p.name]


# --------------------------------------------------------------------------------------------
# Reward functions that break the contract (issue 22, cases 3 and 4): the user's input, named;
# the run is never published on rewards that are not numbers.
# --------------------------------------------------------------------------------------------

BAD_REWARDS = [
    ("nan_for_all", 2, "NaN for 8 of 8 completions"),
    ("one_nan", 2, "NaN for 1 of 8 completions"),
    ("infinite", 2, "an infinity for 8 of 8"),
    ("returns_none", 2, "returned None for 8 completions, not a list of numbers"),
    ("none_per_sample", 2, "None for 8 of 8"),
    ("strings", 2, "str for 8 of 8"),
    ("too_few", 2, "returned 7 values for 8 completions"),
    ("too_many", 2, "returned 9 values for 8 completions"),
    ("raises", 1, "raised ValueError: the grader lost its rubric"),
]


def _rl_recipe(tmp_path: Path, rewards: list, **more) -> Path:
    recipe = yaml.safe_load(TINY_RLHF.read_text())
    recipe.update(rewards=rewards, output_dir=str(tmp_path / "out"), max_steps=2, save_steps=2, **more)
    path = tmp_path / "rlhf.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("name,code,text", BAD_REWARDS, ids=[b[0] for b in BAD_REWARDS])
def test_a_reward_function_that_returns_no_numbers_stops_the_run_unpublished(tmp_path, capsys, name, code, text):
    """Found by the held-out reward before training (the 8 held-out prompts, one answer each)."""
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    path = _rl_recipe(tmp_path, [{"function": f"tests.reward_functions:{name}"}])
    got, _, err = run_cli(["rlhf", "--config", str(path)], capsys)
    assert got == code, err[-2000:]
    assert f"reward rewards[0] (tests.reward_functions:{name})" in err and text in err, err[-2000:]
    assert "was not published" in err and "Traceback" not in err and "unexpected" not in err
    assert not (tmp_path / "out" / "run.json").exists()
    assert not (tmp_path / ".out.publish").exists()


def test_a_bad_reward_found_while_training_stops_the_run_unpublished(tmp_path, capsys):
    """Without a held-out split the first call comes from TRL's trainer (a batch of 4: one prompt's 4 generations)."""
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    path = _rl_recipe(tmp_path, [{"function": "tests.reward_functions:fine"},
                                 {"function": "tests.reward_functions:one_nan", "weight": 0.5}],
                      test_split_size=None, eval_strategy="no", per_device_train_batch_size=4)
    got, _, err = run_cli(["rlhf", "--config", str(path)], capsys)
    assert got == 2, err[-2000:]
    assert "reward rewards[1] (tests.reward_functions:one_nan) returned NaN for 1 of 4 completions" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "run.json").exists()


def test_every_reward_weight_zero_is_refused(tmp_path, capsys):
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    path = _rl_recipe(tmp_path, [{"function": "tests.reward_functions:fine", "weight": 0},
                                 {"function": "gemma_hf.rl.rules:chat_health", "weight": 0.0}])
    got, _, err = run_cli(["validate", str(path)], capsys)
    assert got == 2 and "- rewards" in err and "every reward's weight is 0" in err, err


def test_warp_resumed_after_an_edit_is_refused_naming_the_change(policy_dir, tmp_path, capsys):
    """Issue 22, case 2: killed after run-0, the recipe's learning_rate changed, --resume: run-0 was trained
    with the old value, so merging it with runs of the new one would publish a mixture. Refused (exit 2),
    naming the key and both values; resumed with the recipe it started with, it finishes."""
    import subprocess
    import sys

    argv = rl_argv(TINY_WARP, policy_dir, tmp_path / "run", "--max_steps", "2", "--save_steps", "2")
    killed = subprocess.run([sys.executable, "-m", "gemma_hf.cli", *argv], capture_output=True, text=True,
                            timeout=1800, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                         "GEMMA_HF_KILL_AT": "warp:iter-0/run-0"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    code, _, err = run_cli([*argv, "--learning_rate", "1e-2", "--resume"], capsys)
    assert code == 2 and "- learning_rate" in err and "when the run in" in err and "now 0.01" in err, err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "run" / "run.json").exists()
    code, _, err = run_cli([*argv, "--resume", "--logging_steps", "2"], capsys)  # how it reports may change
    assert code == 0, err[-3000:]


def test_a_reward_model_scoring_nan_stops_the_run_unpublished(tmp_path, capsys):
    """TRL sums rewards with nansum: a reward model whose scores are NaN was silently left out of the reward."""
    from gemma_hf import GemmaHFForSequenceClassification, preset_config
    from gemma_hf.chat import install_chat_template

    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    recipe = yaml.safe_load(TINY_RLHF.read_text())
    model = GemmaHFForSequenceClassification(preset_config("gemma2-2b", **recipe["preset_overrides"], num_labels=1))
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    reward_dir = tmp_path / "broken-rm"
    model.save_pretrained(reward_dir)
    install_chat_template(load_tokenizer(gemma_tokenizer_tiny), "gemma2").save_pretrained(reward_dir)
    path = _rl_recipe(tmp_path, [{"model": str(reward_dir)}, {"function": "tests.reward_functions:fine"}])
    code, _, err = run_cli(["rlhf", "--config", str(path)], capsys)
    assert code == 2 and "reward rewards[0] (the reward model" in err and "NaN or infinite" in err, err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "out" / "run.json").exists()
