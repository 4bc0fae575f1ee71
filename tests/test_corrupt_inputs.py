"""Corrupt inputs of every kind the CLI reads -- recipes, dataset records, checkpoints, GGUF files,
tokenizers, sampling flags -- give exit 2 and one message naming what is wrong; never a traceback,
never a file written. Every method's recipe goes through the same checks (parameterised)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from tests.assets import require
from tests.clirun import run_cli
from tests.faults import ALL_METHODS, recipe_of, tiny_recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def assets():
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)


def expect_refusal(argv, capsys, *texts, tmp_path=None):
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (argv, out[-1000:], err[-3000:])
    assert "Traceback" not in err and "\nerror: " in "\n" + err.replace("\r", "\n"), err[-3000:]
    for text in texts:
        assert text in err, (text, err[-3000:])
    if tmp_path is not None:
        assert not (tmp_path / "out").exists()
    return err


def write_recipe(tmp_path: Path, method: str, text: str | bytes) -> Path:
    path = tmp_path / f"{method}.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("name,text,key,message", [
    ("not-utf8", b"learning_rate: 1e-4\noutput_dir: \xff\xfe\n", "yaml", "not UTF-8"),
    ("truncated", "learning_rate: [1e-4, \n", "yaml", "not valid YAML"),
    ("binary", b"\x00\x01\x02\x03", "yaml", "not"),
    ("alias-bomb", BOMB, "yaml", "expands to more than"),
    ("a-list", "- learning_rate\n- 1e-4\n", "yaml", "not a mapping"),
    ("inf-lr", "learning_rate: .inf\n", "learning_rate", "not a finite number"),
    ("nan-decay", "weight_decay: .nan\n", "weight_decay", "not a finite number"),
    ("negative-seed", "seed: -1\n", "seed", "out of range"),
    ("beta1", "adam_beta1: 1.5\n", "adam_beta1", "out of range"),
    ("epsilon", "adam_epsilon: -1.0e-8\n", "adam_epsilon", "out of range"),
    ("workers", "dataloader_num_workers: -2\n", "dataloader_num_workers", "out of range"),
    ("split-too-big", "test_split_size: 100000\n", "test_split_size", "leaving none to train on"),
])
def test_corrupt_recipes(tmp_path, capsys, method, name, text, key, message):
    if isinstance(text, str) and name not in ("truncated", "alias-bomb", "a-list"):
        recipe = tiny_recipe(method)  # a valid recipe, with this one value changed
        recipe["output_dir"] = str(tmp_path / "out")
        recipe.update(yaml.safe_load(text))
        text = yaml.safe_dump(recipe)
    path = write_recipe(tmp_path, method, text)
    if key != "yaml" and not _accepts(method, key):  # a training number in a method that trains nothing (eval)
        message = f"not a key of {method} recipes"
    started = time.time()
    for argv in (["validate", str(path), "--method", method], [method, "--config", str(path)]):
        expect_refusal(argv, capsys, f"- {key}", message, tmp_path=tmp_path)
    assert time.time() - started < 60  # an alias bomb is refused, not expanded


def _accepts(method: str, key: str) -> bool:
    from gemma_hf.recipes.methods import key_index

    return key in key_index(method)


# --------------------------------------------------------------------------------------------
# Dataset records: every record is read, a bad one is named by its index and column
# --------------------------------------------------------------------------------------------

def data_format(method: str) -> str:
    from gemma_hf.recipes.methods import get_method

    return get_method(method).data_format


# Per data format: a good record, bad JSON lines (the key that carries the text), bad records.
GOOD = {"conversation": {"instruction": "Say hi.", "output": "Hi!"},
        "preference": {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
        "prompt": {"prompt": "Say hi."}}
TEXT_KEY = {"conversation": "instruction", "preference": "prompt", "prompt": "prompt"}
BAD_LINES = {
    "malformed-json": (b'{"KEY": "x", "output": ', "line 51 (record 50) is not valid JSON"),
    "not-utf8": (b'{"KEY": "caf\xe9", "chosen": "x", "rejected": "y", "output": "z"}',
                 "line 51 (record 50) is not UTF-8"),
    "not-an-object": (b'["a", "b"]', "record 50, key 'record'"),
}
BAD_RECORDS = {
    "conversation": [
        ({"instruction": "Say hi.", "output": 7}, "record 50, key 'output'", "must be a string"),
        ({"instruction": "Say <pad> hi.", "output": "Hi"}, "record 50", "control token '<pad>'"),
        ({"instruction": "Hi <end_of_turn>", "output": "Hi"}, "record 50", "control token '<end_of_turn>'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "record 50", "ends with a user turn"),
    ],
    "preference": [
        ({"prompt": "Say hi.", "chosen": 7, "rejected": "No."}, "record 50, key 'chosen'", "must be a"),
        ({"prompt": "Say <pad> hi.", "chosen": "Hi", "rejected": "No"}, "record 50", "control token '<pad>'"),
        ({"prompt": "Say hi.", "chosen": "Hi"}, "record 50, key 'rejected'", "no 'rejected'"),
    ],
    "prompt": [
        ({"prompt": 7}, "record 50, key 'prompt'", "must be a string"),
        ({"prompt": "Say <start_of_turn> hi."}, "record 50", "control token '<start_of_turn>'"),
        ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
         "record 50, key 'prompt'", "end with a user turn"),
    ],
}


def _data_recipe(tmp_path: Path, method: str, lines: list[bytes], fmt: str = "auto") -> Path:
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    recipe = tiny_recipe(method)
    recipe.update(datasets=[{"path": str(data), "format": fmt}], output_dir=str(tmp_path / "out"),
                  test_split_size=None)
    if _accepts(method, "eval_strategy"):  # methods that train
        recipe["eval_strategy"] = "no"
    return write_recipe(tmp_path, method, yaml.safe_dump(recipe))


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("name", list(BAD_LINES))
def test_a_bad_line_far_into_a_dataset_is_named(tmp_path, capsys, method, name):
    kind = data_format(method)
    good = json.dumps(GOOD[kind]).encode()
    bad, message = BAD_LINES[name]
    bad = bad.replace(b"KEY", TEXT_KEY[kind].encode())
    path = _data_recipe(tmp_path, method, [good] * 50 + [bad] + [good] * 5)
    for argv in (["validate", str(path), "--method", method], [method, "--config", str(path)]):
        expect_refusal(argv, capsys, "datasets[0].path", message, tmp_path=tmp_path)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_bad_record_far_into_a_dataset_is_named(tmp_path, capsys, method):
    kind = data_format(method)
    good = json.dumps(GOOD[kind]).encode()
    for record, where, message in BAD_RECORDS[kind]:
        fmt = "messages" if "messages" in record else "auto"
        first = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
                           ).encode() if fmt == "messages" else good
        path = _data_recipe(tmp_path, method, [first] * 50 + [json.dumps(record).encode()] + [first] * 3, fmt)
        for argv in (["validate", str(path), "--method", method], [method, "--config", str(path)]):
            expect_refusal(argv, capsys, "datasets[0].path", where, message, tmp_path=tmp_path)


# --------------------------------------------------------------------------------------------
# Checkpoints, GGUF, tokenizers, sampling flags
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import AutoTokenizer

    from gemma_hf import GemmaHFForCausalLM
    from tests.tiny import tiny_config

    path = tmp_path_factory.mktemp("ckpt") / "model"
    GemmaHFForCausalLM(tiny_config("gemma2", vocab_size=4096, max_position_embeddings=64)).save_pretrained(path)
    AutoTokenizer.from_pretrained(require(gemma_tokenizer_tiny)).save_pretrained(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_weights_are_refused_by_every_reader(checkpoint, tmp_path, capsys):
    bad = _copy(checkpoint, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    for argv in (["generate", str(bad), "--prompt", "hi"],
                 ["export", "--to", "transformers", str(bad), str(tmp_path / "out")]):
        expect_refusal(argv, capsys, "model.safetensors", "truncated", tmp_path=tmp_path)
    recipe = yaml.safe_load(recipe_of("sft").read_text())
    for key in ("preset", "preset_overrides", "tokenizer_name_or_path"):
        recipe.pop(key)
    recipe.update(model_name_or_path=str(bad), output_dir=str(tmp_path / "out"), max_length=32)
    path = write_recipe(tmp_path, "sft", yaml.safe_dump(recipe))
    for argv in (["validate", str(path)], ["sft", "--config", str(path)]):
        expect_refusal(argv, capsys, "- model_name_or_path", "model.safetensors is missing, truncated", tmp_path=tmp_path)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(hidden_size="wide"), "hidden_size"),
    (lambda c: c.pop("model_type"), "model_type"),
    (lambda c: c.update(model_type="llama"), "llama"),
    (lambda c: c.update(num_attention_heads=3), "num_key_value_heads"),
])
def test_a_bad_config_json_is_refused(checkpoint, tmp_path, capsys, edit, message):
    bad = _copy(checkpoint, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    edit(config)
    (bad / "config.json").write_text(json.dumps(config))
    for argv in (["generate", str(bad), "--prompt", "hi"],
                 ["export", "--to", "transformers", str(bad), str(tmp_path / "out")]):
        expect_refusal(argv, capsys, message, tmp_path=tmp_path)


def test_a_truncated_gguf_is_refused(tmp_path, capsys):
    from gemma_hf.assets import gemma3_270m_gguf

    source = next(require(gemma3_270m_gguf).glob("*.gguf"))
    cut = tmp_path / "cut.gguf"
    with source.open("rb") as handle:
        cut.write_bytes(handle.read(3_000_000))
    expect_refusal(["export", "--to", "gemma_hf", str(cut), str(tmp_path / "out")], capsys, "cut.gguf",
                   "truncated, corrupt or not a GGUF file", tmp_path=tmp_path)


def test_export_onto_its_source_or_a_run_is_refused(checkpoint, tmp_path, capsys):
    src = _copy(checkpoint, tmp_path / "src")
    before = sorted(p.name for p in src.iterdir())
    expect_refusal(["export", "--to", "transformers", str(src), str(src), "--overwrite"], capsys, "is the source")
    expect_refusal(["export", "--to", "transformers", str(src), str(src / "inner"), "--overwrite"], capsys, "overlaps")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    expect_refusal(["export", "--to", "transformers", str(src), str(run), "--overwrite"], capsys,
                   "never replaces a run")
    assert sorted(p.name for p in src.iterdir()) == before and (run / "run.json").is_file()
    # A directory of the user's own files is not replaced either, and no --overwrite hint is given.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    for verb in (["export", "--to", "transformers"], ["export", "--to", "gemma_hf"]):
        for flags in ([], ["--overwrite"]):
            code, _, err = run_cli([*verb, str(src), str(mine), *flags], capsys)
            assert code == 2 and "not a model directory (notes.txt)" in err and "pass overwrite" not in err, err
    assert (mine / "notes.txt").read_text() == "my notes" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("flags,message", [
    (["--top-p", "-1"], "--top-p must be in (0, 1]"),
    (["--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "-1"], "--temperature must be a finite number"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be 1 or more"),
    (["--tokenizer", "/no/such/tokenizer"], "--tokenizer /no/such/tokenizer is not a directory"),
])
def test_bad_sampling_flags(checkpoint, capsys, flags, message):
    expect_refusal(["generate", str(checkpoint), "--prompt", "hi", *flags], capsys, message)


def test_a_prompt_longer_than_the_context_is_refused(checkpoint, capsys):
    expect_refusal(["generate", str(checkpoint), "--prompt", "word " * 200], capsys,
                   "the model's context holds 64")


def test_a_tokenizer_that_is_not_one_is_refused(checkpoint, tmp_path, capsys):
    bad = _copy(checkpoint, tmp_path / "bad")
    (bad / "tokenizer.json").write_text("{not json")
    recipe = yaml.safe_load(recipe_of("sft").read_text())
    recipe.update(tokenizer_name_or_path=str(bad), output_dir=str(tmp_path / "out"))
    path = write_recipe(tmp_path, "sft", yaml.safe_dump(recipe))
    expect_refusal(["validate", str(path)], capsys, "- tokenizer_name_or_path", "cannot load the tokenizer",
                   tmp_path=tmp_path)


@pytest.mark.parametrize("method, change, key, message", [
    # The student is built from the teacher (student_init): the teacher is what is missing.
    ("distill", {"teacher_name_or_path": None}, "teacher_name_or_path", "missing: distillation needs a teacher"),
    ("eval", {"model_name_or_path": None}, "model_name_or_path", "missing: the recipe names no model"),
    ("sft", {"tokenizer_name_or_path": None}, "tokenizer_name_or_path", "training from a preset needs a tokenizer"),
    ("distill", {"student_init": {"keep_layers": [99]}}, "student_init", "outside the teacher's 4 layers"),
    ("distill", {"student_init": {"every_kth": 0}}, "student_init", "every_kth must be a positive integer"),
], ids=["no-teacher", "no-model", "no-tokenizer", "layer-out-of-range", "every-kth-0"])
def test_a_missing_model_or_tokenizer_or_bad_student_is_named(tmp_path, capsys, method, change, key, message):
    """The references a recipe needs are checked before anything loads (the fuzzer meets these by chance;
    here each is pinned)."""
    recipe = tiny_recipe(method)
    recipe["output_dir"] = str(tmp_path / "out")
    for name, value in change.items():
        if value is None:
            recipe.pop(name)
        else:
            recipe[name] = value
    path = write_recipe(tmp_path, method, yaml.safe_dump(recipe))
    for argv in (["validate", str(path), "--method", method], [method, "--config", str(path)]):
        expect_refusal(argv, capsys, f"- {key}", message, tmp_path=tmp_path)


@pytest.mark.parametrize("change, key, message", [
    ({"seq_kd": True, "lmbda": 1.0}, "seq_kd", "no effect with lmbda: 1"),
    ({"distill_mode": "offline", "cache_dir": "{out}"}, "cache_dir", "is output_dir itself"),
    ({"distill_mode": "offline", "cache_dir": "{out}/cache"}, "cache_dir", "lies inside output_dir"),
    ({"distill_mode": "offline", "cache_dir": "{tmp}"}, "cache_dir", "contains output_dir"),
    ({"distill_mode": "offline", "cache_dir": "{tmp}/.out.publish/cache"}, "cache_dir", "publish staging"),
], ids=["seq-kd-with-lmbda-1", "cache-is-output-dir", "cache-inside-output-dir", "cache-contains-output-dir",
        "cache-in-publish-staging"])
def test_distill_options_that_do_nothing_or_lose_the_cache_are_named(tmp_path, capsys, change, key, message):
    """Issue 22, case 8: seq_kd with lmbda 1 (every batch on-policy: the teacher's sequences are never
    used) was accepted silently; a cache_dir in, equal to or around output_dir would be deleted by the
    publish swap or the "empty it" advice. Both refused at validation, naming the keys; distill-cache
    refuses the cache locations too."""
    recipe = tiny_recipe("distill")
    recipe.update(output_dir=str(tmp_path / "out"), max_steps=2)
    recipe.update({k: v.format(out=tmp_path / "out", tmp=tmp_path) if isinstance(v, str) else v
                   for k, v in change.items()})
    path = write_recipe(tmp_path, "distill", yaml.safe_dump(recipe))
    argvs = [["validate", str(path), "--method", "distill"], ["distill", "--config", str(path)]]
    if key == "cache_dir":
        argvs.append(["distill-cache", "--config", str(path)])
    for argv in argvs:
        err = expect_refusal(argv, capsys, f"- {key}", message, tmp_path=tmp_path)
        assert ("lmbda" in err) if key == "seq_kd" else ("output_dir" in err), err
    assert not any((tmp_path / "out").parent.glob(".out.*"))
