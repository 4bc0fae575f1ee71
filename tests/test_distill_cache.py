"""The offline teacher cache: sampling, round trip, manifest checks, kill -9 resumption, damaged caches
named and repaired, streaming memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gemma_hf.distillation.batches import CacheCollator
from gemma_hf.distillation.cache import build_cache, example_tokens_and_positions
from gemma_hf.distillation.fingerprints import dataset_fingerprint, teacher_fingerprint
from gemma_hf.distillation.losses import sparse_cross_entropy
from gemma_hf.distillation.manifest import MANIFEST, CacheError, CacheMismatchError, DamagedCacheError, manifest_fields
from gemma_hf.distillation.offline import CacheDataset
from gemma_hf.distillation.reader import CacheReader, check_cache_files, check_compatible
from gemma_hf.distillation.shards import CacheExample, shard_name
from gemma_hf.distillation.targets import sample_targets, teacher_targets
from gemma_hf.distillation.writer import CacheWriter
from cache_damage import delete, drop_entry, edit_manifest, flip_byte, rename, set_value
from tiny import make_ours, random_ids

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
K = 8


def examples() -> list[dict]:
    """Ten records in the three accepted forms, lengths 6..24 (past the tiny sliding window of 8)."""
    out = []
    for i in range(10):
        ids = random_ids(1, 6 + 2 * i, seed=100 + i)[0].tolist()
        if i % 3 == 0:
            out.append({"input_ids": ids})
        elif i % 3 == 1:
            out.append({"input_ids": ids, "loss_mask": [0] * (len(ids) // 2) + [1] * (len(ids) - len(ids) // 2)})
        else:
            out.append({"prompt_ids": ids[:3], "completion_ids": ids[3:]})
    return out


def tokenizer_file(directory: Path, text: str = '{"model": "tiny"}') -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(text)
    return directory / "tokenizer.json"


def build(teacher, directory: Path, tokenizer: Path, **kw):
    kw = {"K": K, "shard_size": 4, "batch_size": 3, "temperature": 0.8, **kw}
    return build_cache(teacher, examples(), directory, tokenizer=tokenizer, **kw)


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def count_teacher_runs(teacher) -> list[int]:
    calls = [0]
    teacher.model.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


# ----------------------------------------------------------------------------- sampling
def test_sample_targets_topk_sampled_and_determinism():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tanh(torch.randn(7, 50, generator=gen) * 3 / 30) * 30
    q = torch.softmax(logits / 0.7, -1)
    ids, probs = sample_targets(logits, 5, temperature=0.7, mode="topk", chunk_size=3)
    top_p, top_i = q.topk(5)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), top_i) and torch.equal(probs, top_p)

    draw = lambda seed: sample_targets(logits, 64, 0.7, "sampled", torch.Generator().manual_seed(seed), 3)  # noqa
    (a, pa), (b, _), (c, _) = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and not torch.equal(a, c)  # same seed, same draws
    assert torch.equal(pa, q.gather(1, a.long()))  # probs = q(id), fp32
    # Frequent ids are the likely ones: the empirical frequency of each row's argmax is near q's.
    freq = (a.long() == top_i[:, :1]).float().mean(1)
    assert (freq - top_p[:, 0]).abs().max() < 0.25


def test_teacher_targets_equal_the_models_own_logits():
    teacher = make_ours("gemma2")  # final soft-cap 30
    ids = random_ids(2, 14)
    attention = torch.ones_like(ids)
    attention[1, -4:] = 0
    positions = attention.bool().clone()
    positions[:, :2] = False
    got_ids, got_probs = teacher_targets(teacher, ids, attention, positions, K=6, temperature=0.8, mode="topk",
                                         chunk_size=5)
    with torch.no_grad():
        full = teacher(ids, attention_mask=attention).logits[positions]  # soft-capped by the model
    want_probs, want_ids = torch.softmax(full / 0.8, -1).topk(6)
    assert torch.equal(got_ids.long(), want_ids)
    assert torch.allclose(got_probs, want_probs, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- round trip
def test_round_trip_and_manifest(tmp_path):
    teacher = make_ours("gemma2")
    tok = tokenizer_file(tmp_path / "tok")
    manifest = build(teacher, tmp_path / "cache", tok)
    reader = CacheReader(tmp_path / "cache", verify=True)
    assert manifest == json.loads((tmp_path / "cache" / MANIFEST).read_text()) == reader.manifest
    assert manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0, 1, 2]
    assert all(s["complete"] for s in manifest["shards"])
    assert (manifest["K"], manifest["temperature"], manifest["mode"], manifest["probs_dtype"]) == (K, 0.8, "sampled",
                                                                                                   "float16")
    assert manifest["dataset"]["fingerprint"] == dataset_fingerprint(
        example_tokens_and_positions(e)[0] for e in examples())
    assert manifest["teacher"]["fingerprint"] == teacher_fingerprint(teacher)

    got = list(reader)
    assert len(got) == len(reader) == 10
    for index, record in enumerate(examples()):
        tokens, positions = example_tokens_and_positions(record)
        ex = got[index]
        assert ex.input_ids.tolist() == tokens and ex.positions.tolist() == positions
        assert ex.target_ids.dtype == torch.int32 and ex.target_probs.dtype == torch.float16
        assert ex.target_ids.shape == (len(positions), K)
    # The stored probabilities are the teacher's q(id) (float16-rounded): recompute them densely.
    with torch.no_grad():
        ex = got[4]
        logits = teacher(ex.input_ids.long()[None]).logits[0, ex.positions.long()]
        q = torch.softmax(logits / 0.8, -1).gather(1, ex.target_ids.long())
    assert torch.allclose(ex.target_probs.float(), q, rtol=2**-10, atol=2**-24)
    assert manifest["dataset"]["num_positions"] == sum(len(example_tokens_and_positions(e)[1]) for e in examples())

    # The offline trainer's batches (its dataset and collator) feed the sparse loss directly.
    loader = torch.utils.data.DataLoader(CacheDataset(tmp_path / "cache"), batch_size=4,
                                         collate_fn=CacheCollator(0, reader.mode))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 4 and batch["target_mask"].sum() == sum(ex.num_positions for ex in got[:4])
    student = make_ours("gemma2", seed=1)
    hidden = student.model(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    loss = sparse_cross_entropy(hidden, student.lm_head.weight, batch["target_ids"], batch["target_weights"],
                                batch["target_mask"], softcap=student.config.final_logit_softcapping)
    loss.backward()
    assert loss.item() > 0 and student.lm_head.weight.grad is not None


def test_sampling_is_deterministic_given_the_seed(tmp_path):
    teacher = make_ours("gemma2")
    tok = tokenizer_file(tmp_path / "tok")
    build(teacher, tmp_path / "a", tok, seed=3)
    build(teacher, tmp_path / "b", tok, seed=3)
    build(teacher, tmp_path / "c", tok, seed=4)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b
    assert a[shard_name(0)] != c[shard_name(0)]


# ----------------------------------------------------------------------------- manifest checks
def test_check_compatible_names_the_mismatching_field(tmp_path):
    teacher = make_ours("gemma2")
    tok = tokenizer_file(tmp_path / "tok")
    build(teacher, tmp_path / "cache", tok)
    reader = CacheReader(tmp_path / "cache")
    check_compatible(reader, teacher=teacher, tokenizer=tok, K=K, temperature=0.8, mode="sampled",
                     vocab_size=257, dataset=[example_tokens_and_positions(e)[0] for e in examples()])

    other_tok = tokenizer_file(tmp_path / "tok2", '{"model": "another"}')
    with pytest.raises(CacheMismatchError, match=r"tokenizer \(cache: sha256 ") as err:
        check_compatible(reader, tokenizer=other_tok)
    assert err.value.fields == ["tokenizer"]
    with pytest.raises(CacheMismatchError, match=r"teacher \(cache: fingerprint ") as err:
        check_compatible(tmp_path / "cache", teacher=make_ours("gemma2", seed=1))
    assert err.value.fields == ["teacher"]
    with pytest.raises(CacheMismatchError, match=r"K \(cache: 8, this run: 16\)") as err:
        check_compatible(reader.manifest, K=16, temperature=0.8)
    assert err.value.fields == ["K"]
    with pytest.raises(CacheMismatchError, match="dataset") as err:
        check_compatible(reader, dataset=[[2, 5, 6]])


def test_teacher_fingerprint_of_a_directory(tmp_path):
    teacher = make_ours("gemma2")
    teacher.save_pretrained(tmp_path / "t")
    from gemma_hf import GemmaHFForCausalLM

    loaded = GemmaHFForCausalLM.from_pretrained(tmp_path / "t")
    assert teacher_fingerprint(loaded) == teacher_fingerprint(tmp_path / "t")  # a model maps to its directory
    make_ours("gemma2", seed=1).save_pretrained(tmp_path / "u")  # same shapes, other weights
    assert teacher_fingerprint(tmp_path / "u") != teacher_fingerprint(tmp_path / "t")


def test_resuming_with_other_settings_is_refused(tmp_path):
    teacher = make_ours("gemma2")
    tok = tokenizer_file(tmp_path / "tok")
    build(teacher, tmp_path / "cache", tok)
    with pytest.raises(CacheMismatchError, match="K: cache 8, now 16") as err:
        build(teacher, tmp_path / "cache", tok, K=16)
    assert err.value.fields == ["K"]
    changed = examples()
    changed[5] = {"input_ids": [2, 7, 7, 7]}
    with pytest.raises(CacheMismatchError, match="the dataset changed") as err:
        build_cache(teacher, changed, tmp_path / "cache", tokenizer=tok, K=K, shard_size=4, batch_size=3,
                    temperature=0.8)
    assert err.value.fields == ["dataset"]
    remasked = examples()
    remasked[4]["loss_mask"] = [1] * len(remasked[4]["input_ids"])  # same tokens, other target positions
    with pytest.raises(CacheMismatchError, match="other target positions"):
        build_cache(teacher, remasked, tmp_path / "cache", tokenizer=tok, K=K, shard_size=4, batch_size=3,
                    temperature=0.8)
    with pytest.raises(CacheError, match="not a distillation cache"):
        CacheReader(tmp_path / "tok")
    with pytest.raises(CacheError, match="is not empty"):  # never writes into a foreign directory
        build(teacher, tmp_path / "tok", tok)


# ----------------------------------------------------------------------------- resumption
KILLER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import gemma_hf.distillation.writer as writer
from test_distill_cache import build, make_ours, tokenizer_file
from pathlib import Path

real = writer._atomic_write

def killed_midway(path, data):
    if path.name == "shard-00002.safetensors":  # the last shard: half its bytes, then kill -9
        with open(path.with_name("." + path.name + ".tmp"), "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)

writer._atomic_write = killed_midway
build(make_ours("gemma2"), Path({cache!r}), Path({tok!r}))
"""


def test_kill_9_mid_shard_then_rerun_writes_identical_bytes(tmp_path):
    tok = tokenizer_file(tmp_path / "tok")
    script = KILLER.format(tests=str(TESTS), cache=str(tmp_path / "killed"), tok=str(tok))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = files(tmp_path / "killed")
    assert ".shard-00002.safetensors.tmp" in left and shard_name(2) not in left
    assert not json.loads(left[MANIFEST])["complete"]

    teacher = make_ours("gemma2")
    runs = count_teacher_runs(teacher)
    build(teacher, tmp_path / "killed", tok)
    assert runs[0] == 1  # only shard 2 (one batch of its 2 examples) ran the teacher again
    runs[0] = 0
    build(teacher, tmp_path / "clean", tok)
    assert runs[0] == 5  # an uninterrupted run: 2 + 2 + 1 batches
    assert files(tmp_path / "killed") == files(tmp_path / "clean")  # byte for byte, manifest included


def test_shard_renamed_before_the_manifest_update_is_adopted(tmp_path):
    teacher = make_ours("gemma2")
    tok = tokenizer_file(tmp_path / "tok")
    build(teacher, tmp_path / "cache", tok)
    complete = files(tmp_path / "cache")
    manifest = json.loads(complete[MANIFEST])
    manifest["shards"] = manifest["shards"][:1]  # the kill came between shard 1's rename and the manifest
    manifest["complete"], manifest["dataset"] = False, None
    (tmp_path / "cache" / MANIFEST).write_text(json.dumps(manifest))
    runs = count_teacher_runs(teacher)
    build(teacher, tmp_path / "cache", tok)
    assert runs[0] == 0 and files(tmp_path / "cache") == complete


def test_damaged_shard_is_refused_then_rewritten(tmp_path):
    teacher = make_ours("gemma2")
    tok = tokenizer_file(tmp_path / "tok")
    build(teacher, tmp_path / "cache", tok)
    complete = files(tmp_path / "cache")
    path = tmp_path / "cache" / shard_name(1)
    path.write_bytes(complete[shard_name(1)][:-10])  # truncated
    with pytest.raises(CacheError, match="wrong size"):
        CacheReader(tmp_path / "cache")
    runs = count_teacher_runs(teacher)
    build(teacher, tmp_path / "cache", tok)
    assert runs[0] == 2 and files(tmp_path / "cache") == complete


# ----------------------------------------------------------------------------- damaged caches
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One finished cache (shards of 4, 4 and 2 examples), its teacher and tokenizer; a test that damages
    it works on a copy (`damaged_copy`)."""
    root = tmp_path_factory.mktemp("built")
    teacher = make_ours("gemma2")
    tok = tokenizer_file(root / "tok")
    build(teacher, root / "cache", tok)
    return teacher, tok, root / "cache"


def damaged_copy(cache: Path, directory: Path, damage) -> Path:
    shutil.copytree(cache, directory)
    damage(directory)
    return directory


# (name, damage, the shard named, what finds it, text of the message, the shards rewritten by the repair).
# What finds it: "structure" (opening the cache: what validation checks), "sha256" (validation hashes a small
# cache; the trainer hashes each shard it reads), "content" (a consistent manifest, wrong contents: found when
# the shard is read).
DAMAGED = [
    ("entry-removed", drop_entry(1), shard_name(1), "structure", "not listed in manifest.json", []),
    ("last-entry-removed", drop_entry(2), shard_name(2), "structure", "not in manifest.json", []),
    ("file-deleted", delete(2), shard_name(2), "structure", "missing", [2]),
    ("bytes-changed", flip_byte(1), shard_name(1), "sha256", "sha256 differs", [1]),
    ("renamed", rename(1, 7), shard_name(1), "structure", "missing", [1]),
    ("swapped", lambda d: [rename(0, 9)(d), rename(1, 0)(d), rename(9, 1)(d)], shard_name(0), "structure",
     "wrong size", [0, 1]),
    ("id-too-large", set_value(1, "target_ids", (3, 2), 257), shard_name(1), "content",
     "target_ids outside the vocabulary [0, 257)", [1]),
    ("id-negative", set_value(1, "target_ids", (0, 0), -1), shard_name(1), "content",
     "target_ids outside the vocabulary", [1]),
    ("id-changed-unrecorded", set_value(1, "target_ids", (3, 2), 257, record=False), shard_name(1), "sha256",
     "sha256 differs", [1]),
    ("nan-prob", set_value(2, "target_probs", (1, 5), float("nan")), shard_name(2), "content", "not finite", [2]),
    ("negative-prob", set_value(0, "target_probs", (2, 0), -0.25), shard_name(0), "content", "outside [0, 1]", [0]),
    ("probs-sum-above-1", set_value(0, "target_probs", (4, slice(None)), 0.5), shard_name(0), "content", "sum to",
     [0]),
    ("position-outside-example", set_value(0, "positions", 0, 10_000), shard_name(0), "content",
     "lies outside its example", [0]),
]


@pytest.mark.parametrize("name, damage, shard, kind, text, rewritten", DAMAGED, ids=[case[0] for case in DAMAGED])
def test_a_damaged_cache_is_named_then_repaired(built, tmp_path, name, damage, shard, kind, text, rewritten):
    """Every artefact read back is checked against what was written: a damaged cache raises
    DamagedCacheError (an InputError: exit 2) naming the shard and distill-cache as the fix, when it is
    opened (structure) or when the damaged shard is read (sha256, contents); then re-running the writer
    over it gives back the original bytes, running the teacher again only for the damaged shards."""
    teacher, tok, cache = built
    directory = damaged_copy(cache, tmp_path / "cache", damage)
    with pytest.raises(DamagedCacheError) as err:
        reader = CacheReader(directory)
        assert kind != "structure", "the structure should have been refused when opening the cache"
        list(reader)
    message = str(err.value)
    assert err.value.exit_code == 2 and shard in err.value.shards and shard in message, message
    assert text in message and "gemma-hf distill-cache" in message, message
    if kind == "sha256":  # a small cache is hashed at validation
        with pytest.raises(DamagedCacheError, match="sha256 differs"):
            check_cache_files(directory, hashes=None)
    elif kind == "content":  # the manifest agrees with the files: only reading the shard tells
        check_cache_files(directory, hashes=True)

    runs = [0]
    hook = teacher.model.register_forward_hook(lambda *args: runs.__setitem__(0, runs[0] + 1))
    try:
        build(teacher, directory, tok)
    finally:
        hook.remove()
    assert files(directory) == files(cache)
    assert runs[0] == sum(2 if index < 2 else 1 for index in rewritten)  # batches of 3: shards of 4, 4 and 2
    assert len(list(CacheReader(directory, verify=True))) == 10


def test_counts_that_disagree_with_the_shards_are_refused(built, tmp_path):
    """The manifest's dataset counts must be the sum of its shards'. (A shard entry removed, its file
    deleted and every count edited to match leaves a manifest consistent with itself: only the size of
    the training split tells, test_distill.py.)"""
    _, _, cache = built

    def edit(manifest):
        manifest["dataset"]["num_examples"] = 99
    directory = damaged_copy(cache, tmp_path / "cache", lambda d: edit_manifest(d, edit))
    with pytest.raises(DamagedCacheError, match="num_examples=99 but its shards sum to 10"):
        CacheReader(directory)


def test_an_unfinished_cache_is_not_called_damaged(built, tmp_path):
    _, _, cache = built
    directory = damaged_copy(cache, tmp_path / "cache", lambda d: edit_manifest(d, lambda m: m.update(complete=False)))
    with pytest.raises(CacheError, match="unfinished") as err:
        CacheReader(directory)
    assert not isinstance(err.value, DamagedCacheError)


# ----------------------------------------------------------------------------- streaming memory
READER = """
import sys
from gemma_hf.distillation.reader import CacheReader

def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

for directory in sys.argv[1:]:
    total = 0
    for example in CacheReader(directory):
        total += int(example.target_ids[:, 0].sum()) + int(example.target_probs.float().sum() > 0)
    print(directory, hwm_kb(), total, flush=True)
"""


def synthetic_cache(directory: Path, shards: int, shard_size: int = 4, positions: int = 512, k: int = 256) -> int:
    """A cache of `shards` shards of random targets (no teacher; every example the same); returns
    the bytes of one shard."""
    fields = {"teacher": {"name": "synthetic", "fingerprint": "0" * 64}, "tokenizer": {"sha256": "0" * 64}, "K": k,
              "temperature": 1.0, "mode": "sampled", "seed": 0, "vocab_size": 1000, "probs_dtype": "float16",
              "build": {"batch_size": None, "chunk_size": None}}
    gen = torch.Generator().manual_seed(0)
    example = CacheExample(torch.randint(3, 1000, (positions + 1,), generator=gen, dtype=torch.int32),
                           torch.arange(positions, dtype=torch.int32),
                           torch.randint(0, 1000, (positions, k), generator=gen, dtype=torch.int32),
                           (torch.rand(positions, k, generator=gen) / k).half())  # a row sums to at most 1
    with CacheWriter(directory, fields, shard_size) as writer:
        for index in range(shards):
            writer.write_shard(index, [example] * shard_size)
        writer.finish()
    return writer.manifest["shards"][0]["bytes"]


def test_streaming_reader_memory_does_not_grow_with_the_dataset(tmp_path):
    """Peak RSS (VmHWM) after reading a 16-shard cache is within one shard of that after a 4-shard
    cache (shards of 3 MiB: reading everything at once would add 36 MiB)."""
    shard_bytes = synthetic_cache(tmp_path / "small", 4)
    synthetic_cache(tmp_path / "large", 16)
    proc = subprocess.run([sys.executable, "-c", READER, str(tmp_path / "small"), str(tmp_path / "large")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (_, small_kb, _), (_, large_kb, _) = [line.split() for line in proc.stdout.split("\n") if line][-2:]
    growth = (int(large_kb) - int(small_kb)) * 1024
    assert growth <= shard_bytes + 4 * 2**20, f"peak RSS grew by {growth / 2**20:.1f} MiB reading 4x the data"


@pytest.mark.parametrize("k", [16, 64, 256])
def test_shard_layout_bytes(tmp_path, k):
    """A shard is its safetensors header plus exactly: targets 6K bytes per position (int32 ids +
    float16 probs), 4 per position (its index), 4 per token, 8 per example per offsets table."""
    examples, positions, tokens = 3, 50, 51
    shard_bytes = synthetic_cache(tmp_path / "c", 1, shard_size=examples, positions=positions, k=k)
    header_length = int.from_bytes((tmp_path / "c" / shard_name(0)).read_bytes()[:8], "little")
    data = examples * (positions * (6 * k + 4) + 4 * tokens + 2 * 8) + 2 * 8
    assert shard_bytes == 8 + header_length + data
    assert header_length < 1024


def test_manifest_fields_validation(tmp_path):
    tok = tokenizer_file(tmp_path / "tok")
    teacher = make_ours("gemma2")
    with pytest.raises(ValueError, match="unknown cache mode"):
        manifest_fields(teacher=teacher, tokenizer=tok, K=4, mode="greedy", vocab_size=257)
    with pytest.raises(ValueError, match="at most vocab_size=257"):
        manifest_fields(teacher=teacher, tokenizer=tok, K=300, mode="topk", vocab_size=257)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        manifest_fields(teacher=teacher, tokenizer=tmp_path, K=4, vocab_size=257)
