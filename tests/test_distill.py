"""gemma-hf distill and distill-cache end to end on CPU: a tiny Gemma 3 teacher with a 4,096-entry
cut of the Gemma 3 tokenizer, a student built from two of its layers, real Alpaca records.

The loss functions themselves are checked against dense computations in test_distill_losses.py,
the cache format in test_distill_cache.py, the student construction in test_distill_student.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gemma_hf.assets import gemma3_tokenizer_tiny, gemma_tokenizer_tiny
from gemma_hf.distillation.shards import shard_name
from tests.cache_damage import delete, drop_entry, flip_byte, rename, set_value
from tests.clirun import cli
from tests.tiny import make_teacher, shared_teacher

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny" / "distill.yaml"
TINY_OFFLINE = REPO / "recipes" / "tiny" / "distill-offline.yaml"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def teacher() -> Path:
    """make_teacher(seed 0, the tiny Gemma 3 tokenizer), built once per machine (shared with the
    fault suite's subprocess runs)."""
    return shared_teacher()


def argv(recipe: Path, teacher: Path, out: Path, *extra) -> list:
    return ["distill", "--config", recipe, "--teacher_name_or_path", teacher, "--output_dir", out,
            "--student_init", "{keep_layers: [0, 3]}", "--max_new_tokens", "8", "--logging_steps", "1", *extra]


def run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


@pytest.fixture
def count_generations(monkeypatch):
    """Counts the calls that really generate (gemma_hf.distillation.trainer.generate_completions),
    by which model: the student is trained (requires grad), the teacher frozen."""
    from gemma_hf.distillation import trainer as module

    calls = {"student": 0, "teacher": 0}
    real = module.generate_completions

    def counting(model, *args, **kwargs):
        trained = any(p.requires_grad for p in model.parameters())
        calls["student" if trained else "teacher"] += 1
        return real(model, *args, **kwargs)

    monkeypatch.setattr(module, "generate_completions", counting)
    return calls


@pytest.mark.parametrize("lmbda, seq_kd, expected", [
    (0.0, False, {"student": 0, "teacher": 0, "data": 4}),
    (1.0, False, {"student": 4, "teacher": 0, "data": 0}),
    (0.0, True, {"student": 0, "teacher": 4, "data": 0}),
])
def test_lmbda_decides_who_writes_the_completions(teacher, tmp_path, count_generations, lmbda, seq_kd, expected):
    out = tmp_path / "run"
    code = cli(argv(TINY, teacher, out, "--lmbda", lmbda, "--seq_kd", str(seq_kd).lower(), "--max_steps", 4,
                    "--save_steps", 4, "--eval_steps", 4))
    assert code == 0
    info = run_json(out)
    assert info["generations"] == expected
    assert count_generations == {"student": expected["student"], "teacher": expected["teacher"]}
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in logged if "generated_by_student" in row][-1]
    assert last["generated_by_student"] == expected["student"]


def test_both_trainers_see_through_a_peft_wrapped_student():
    """The losses take the student's backbone and head; a LoRA student gives its base model's."""
    from peft import LoraConfig, get_peft_model

    from gemma_hf.distillation.batches import backbone_of, causal_lm_of, head_of
    from tests.tiny import make_ours

    model = make_ours("gemma2")
    wrapped = get_peft_model(make_ours("gemma2"), LoraConfig(r=2, target_modules="all-linear"))
    base = wrapped.base_model.model
    assert causal_lm_of(model) is model and causal_lm_of(wrapped) is base
    assert backbone_of(model) is model.model and backbone_of(wrapped) is base.model
    assert head_of(wrapped)[0] is base.lm_head.weight and head_of(wrapped)[1] == base.config.final_logit_softcapping


def test_the_on_policy_coin_is_the_same_in_every_process():
    """The coin is a function of (seed, step) only: two processes draw the same sequence."""
    script = ("import random; print([random.Random(f'0:{s}').random() < 0.5 for s in range(32)])")
    draws = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
             for _ in range(2)}
    assert len(draws) == 1
    seq = eval(draws.pop())  # noqa: S307 - our own output
    assert 8 <= sum(seq) <= 24  # and it is a coin, not a constant


def test_student_is_built_from_the_teacher_and_counted(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(argv(TINY, teacher, out, "--lmbda", 0, "--max_steps", 2, "--save_steps", 2, "--eval_steps", 2)) == 0
    info = run_json(out)
    student = info["student"]
    assert student["keep_layers"] == [0, 3]
    t = load_file(teacher / "model.safetensors")
    s = load_file(out / "model.safetensors")
    assert student["parameters"] == sum(v.numel() for k, v in t.items() if not k.startswith("model.layers.")) + sum(
        v.numel() for k, v in t.items() if k.startswith(("model.layers.0.", "model.layers.3.")))
    assert f"{student['parameters']:,} parameters" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    teacher_types = json.loads((teacher / "config.json").read_text())["layer_types"]
    assert config["layer_types"] == [teacher_types[0], teacher_types[3]]  # each kept layer keeps its attention type
    assert set(s) <= set(t) | {k.replace("model.layers.1.", "model.layers.3.") for k in s}


def test_on_policy_distillation_brings_the_student_closer_to_the_teacher(teacher, tmp_path):
    out = tmp_path / "run"
    assert cli(argv(TINY, teacher, out, "--beta", 0.0, "--lmbda", 0.5, "--learning_rate", 3e-3, "--max_steps", 6,
                    "--save_steps", 6, "--eval_steps", 6)) == 0
    results = json.loads((out / "eval.json").read_text())
    before, after = results["kl_teacher_student_before"], results["kl_teacher_student_after"]
    assert after < 0.2 * before, results
    assert all(torch.isfinite(v).all() for v in load_file(out / "model.safetensors").values())


def cache_argv(teacher: Path, cache: Path, *extra) -> list:
    return ["distill-cache", "--config", TINY_OFFLINE, "--teacher_name_or_path", teacher, "--cache_dir", cache,
            "--student_init", "{keep_layers: [0, 3]}", "--cache_shard_size", 8, *extra]


@pytest.fixture(scope="module")
def offline_cache(teacher, tmp_path_factory) -> Path:
    """The tiny offline recipe's cache (31 examples in shards of 8: 8, 8, 8, 7), written once by
    `gemma-hf distill-cache`; tests that train on it only read it, a test that damages it works on a copy."""
    cache = tmp_path_factory.mktemp("offline") / "cache"
    assert cli(cache_argv(teacher, cache)) == 0
    return cache


def test_offline_distillation_from_the_cache(teacher, offline_cache, tmp_path):
    cache = offline_cache  # only read
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["K"] == 16 and manifest["mode"] == "sampled"
    out = tmp_path / "run"
    assert cli(["distill", "--config", TINY_OFFLINE, "--teacher_name_or_path", teacher, "--cache_dir", cache,
                "--student_init", "{keep_layers: [0, 3]}", "--output_dir", out, "--learning_rate", 3e-3,
                "--max_steps", 6, "--save_steps", 6, "--eval_steps", 6, "--nll_weight", 0.0]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["kl_teacher_student_after"] < 0.2 * results["kl_teacher_student_before"], results
    assert run_json(out)["cache"]["K"] == 16


def test_a_cache_of_another_teacher_is_refused_before_training(teacher, offline_cache, tmp_path, capsys):
    cache = offline_cache
    other = make_teacher(tmp_path / "other", gemma3_tokenizer_tiny, "gemma3", seed=1)
    out = tmp_path / "run"
    code = cli(["distill", "--config", TINY_OFFLINE, "--teacher_name_or_path", other, "--cache_dir", cache,
                "--student_init", "{keep_layers: [0, 3]}", "--output_dir", out, "--max_steps", 2])
    assert code == 2
    err = capsys.readouterr().err
    assert "cache_dir" in err and "teacher" in err
    assert not out.exists()


# -- a damaged cache: named, exit 2, nothing published, repaired by distill-cache -----------------

def _offline_argv(teacher: Path, cache: Path, out: Path) -> list:
    return ["distill", "--config", TINY_OFFLINE, "--teacher_name_or_path", teacher, "--cache_dir", cache,
            "--student_init", "{keep_layers: [0, 3]}", "--output_dir", out, "--max_steps", 2, "--save_steps", 2,
            "--eval_steps", 2]


# (name, damage, the shard named, found by: "validation" (before any model loads; `validate --strict` too),
#  "run start" (the training split against the manifest, before any model loads), "reading" (the shard's
#  contents, when the trainer reads it: shard 0, read by the first step))
DAMAGED_CACHES = [
    ("entry-removed", drop_entry(1), shard_name(1), "validation"),
    ("entry-and-file-removed", drop_entry(3, delete_file=True), shard_name(3), "run start"),
    ("file-deleted", delete(2), shard_name(2), "validation"),
    ("bytes-changed", flip_byte(1), shard_name(1), "validation"),
    ("renamed", rename(2, 5), shard_name(2), "validation"),
    ("id-out-of-range", set_value(0, "target_ids", (3, 2), 4096), shard_name(0), "reading"),
    ("id-negative", set_value(0, "target_ids", (3, 2), -7), shard_name(0), "reading"),
    ("nan-prob", set_value(0, "target_probs", (5, 1), float("nan")), shard_name(0), "reading"),
]


@pytest.mark.parametrize("name, damage, shard, found_by", DAMAGED_CACHES, ids=[c[0] for c in DAMAGED_CACHES])
def test_a_damaged_cache_is_refused_naming_the_shard(teacher, offline_cache, tmp_path, capsys, name, damage, shard,
                                                      found_by):
    """Issue 22, case 5: a manifest with a shard entry removed (and num_examples edited) trained on fewer
    examples with exit 0. Every damage is now exit 2 naming the shard and `gemma-hf distill-cache` as
    the fix, no traceback, no run published; the fix works: distill-cache gives back the original bytes."""
    from tests.clirun import run_cli

    cache = tmp_path / "cache"
    shutil.copytree(offline_cache, cache)
    damage(cache)
    out = tmp_path / "run"
    code, _, err = run_cli(_offline_argv(teacher, cache, out), capsys)
    assert code == 2, err[-3000:]
    assert shard in err and "gemma-hf distill-cache --config" in err and "Traceback" not in err, err[-3000:]
    assert not out.exists() and not (tmp_path / ".run.publish").exists()
    if found_by in ("validation", "run start"):
        assert "- cache_dir" in err and "damaged teacher cache" in err, err[-3000:]  # the recipe's refusal
    if found_by == "validation":
        code, _, err = run_cli(["validate", TINY_OFFLINE, "--method", "distill", "--strict", "--teacher_name_or_path",
                                teacher, "--cache_dir", cache, "--student_init", "{keep_layers: [0, 3]}"], capsys)
        assert code == 2 and shard in err and "distill-cache" in err, err[-3000:]

    assert cli(cache_argv(teacher, cache)) == 0
    files = lambda d: {p.name: p.read_bytes() for p in d.iterdir()}  # noqa: E731
    assert files(cache) == files(offline_cache)  # repaired: the original bytes, manifest included


def test_a_teacher_of_another_tokenizer_is_refused_naming_both(teacher, tmp_path, capsys):
    gemma2 = make_teacher(tmp_path / "gemma2-teacher", gemma_tokenizer_tiny, "gemma2", seed=0)
    out = tmp_path / "run"
    code = cli(["distill", "--config", TINY, "--teacher_name_or_path", gemma2, "--model_name_or_path", teacher,
                "--student_init", "null",
                "--output_dir", out, "--max_steps", 2])
    assert code == 2
    err = capsys.readouterr().err
    assert "teacher_name_or_path" in err and str(gemma2) in err and str(teacher) in err
    assert not out.exists()


# -- kill -9 and resume (real subprocesses) ------------------------------------------------------

def _command(*args) -> list[str]:
    return [sys.executable, "-m", "gemma_hf.cli", *map(str, args)]


def _env(**more) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **more}


def test_distill_cache_killed_after_a_shard_resumes_to_the_same_cache(teacher, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    done = subprocess.run(_command(*cache_argv(teacher, reference)), capture_output=True, text=True, env=_env(),
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    first = subprocess.run(_command(*cache_argv(teacher, killed)), capture_output=True, text=True,
                           env=_env(GEMMA_HF_KILL_AT="cache:shard"), cwd=REPO)
    assert first.returncode == -9
    assert not json.loads((killed / "manifest.json").read_text()).get("complete")
    second = subprocess.run(_command(*cache_argv(teacher, killed)), capture_output=True, text=True, env=_env(),
                            cwd=REPO)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "shard 0: complete, skipped" in second.stdout
    shards = sorted(p.name for p in reference.glob("*.safetensors"))
    assert len(shards) >= 2 and shards == sorted(p.name for p in killed.glob("*.safetensors"))
    for name in shards:
        a, b = load_file(reference / name), load_file(killed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    strip = lambda m: {k: v for k, v in m.items() if k not in ("created", "updated", "finished")}  # noqa: E731
    assert strip(json.loads((killed / "manifest.json").read_text())) == strip(
        json.loads((reference / "manifest.json").read_text()))


def test_a_student_diverged_before_sampling_stops_the_run_unpublished(teacher, tmp_path, capsys):
    """On-policy: after a step to non-finite weights, sampling the next completions fails inside torch;
    that is reported as the divergence it is (step, the tensors), not as a sampling error."""
    from tests.clirun import run_cli

    out = tmp_path / "run"
    code, _, err = run_cli(argv(TINY, teacher, out, "--lmbda", "1.0", "--learning_rate", "3e38", "--max_grad_norm", "0",
                                "--eval_strategy", "no", "--test_split_size", "null", "--max_steps", "4"), capsys)
    assert code == 1 and "training diverged at step 2" in err and "sampling the next completions failed" in err, err
    assert "Traceback" not in err and not (out / "run.json").exists()
