"""Reading a complete offline cache for a run: :class:`CacheReader` (validated, streamed shard by
shard, one shard in memory at a time), :func:`check_cache_files` (the cache's files are what its
manifest says was written) and :func:`check_compatible` (is it this run's cache?).

Verification: every artefact read back is checked against what was written.

* Opening a cache (:class:`CacheReader`, and the recipe's validation before any model loads) checks its
  structure: the manifest's shard list is complete and contiguous (0..n-1, every shard but the last
  holding shard_size examples), the per-shard counts sum to the dataset's, every shard file is there
  with the size the manifest recorded, its safetensors header names its own index, the digest of the
  manifest's identity fields, the layout's tensors and the counts the manifest records, and no shard
  file lies there that the manifest does not list. About 1 KiB read per shard.
* sha256 of every shard file against the manifest: at validation for caches up to
  HASH_AT_VALIDATION_BYTES; always when the trainer reads a shard (the bytes are read once, hashed,
  then loaded from memory), before any of its examples is used.
* Contents (:func:`~gemma_hf.distillation.shards.shard_content_problem`: ids in the vocabulary,
  probabilities finite, in [0, 1] and summing as the mode says, offsets and positions consistent):
  when a shard is read.

A mismatch raises :class:`~gemma_hf.distillation.manifest.DamagedCacheError` (an InputError: exit 2)
naming the shard and the fix: ``gemma-hf distill-cache`` rewrites the damaged and missing shards.

The offline trainer (offline.py) iterates a CacheReader and collates its examples with
:class:`~gemma_hf.distillation.batches.CacheCollator`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from .fingerprints import _HEX64, dataset_fingerprint, sha_json, teacher_fingerprint, tokenizer_fingerprint
from .manifest import MANIFEST, REBUILD, CacheError, CacheMismatchError, DamagedCacheError, identity_fields, read_manifest
from .shards import (
    CacheExample,
    load_shard_bytes,
    shard_content_problem,
    shard_header_info,
    shard_header_problem,
    shard_name,
    split_examples,
)

# Validation hashes every shard when the whole cache is at most this size. Measured on this 2-core AMD
# EPYC (SHA-NI): hashlib's sha256 at 1.4-1.7 GB/s (about 0.4-0.5 GB/s on CPUs without SHA extensions),
# plus the disk read when the cache is not in the page cache. The tiny test cache (118 KB, 4 shards):
# 0.3 ms for the structure, 0.4 ms with every sha256; a 145 MiB cache of 24 shards: 1 ms and 0.1 s.
# 1 GiB is under a second here, a few seconds at worst, paid by `gemma-hf validate` and every run
# start. A large cache (a real 256k-vocabulary distillation: tens of GB, a minute or more) is not
# hashed at validation: its shards are hashed as the trainer reads them, each before its examples are
# used (reading, hashing, loading and checking a shard runs at ~470 MB/s, 0.1 s per 50 MB shard);
# its sizes and headers are still checked at validation.
HASH_AT_VALIDATION_BYTES = 2**30
_SHARD_FILE = re.compile(r"^shard-(\d+)\.safetensors$")
_ENTRY_INTS = ("index", "num_examples", "num_positions", "num_tokens", "bytes")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * 2**20), b""):
            h.update(block)
    return h.hexdigest()


def cache_bytes(manifest: Mapping) -> int:
    """The shards' total size as the manifest records it."""
    return sum(s.get("bytes", 0) for s in manifest["shards"] if isinstance(s, Mapping)
               and isinstance(s.get("bytes"), int))


def check_cache_files(directory, manifest: Mapping | None = None, *, hashes: bool | None = False,
                      rebuild: str = REBUILD) -> dict:
    """Check a complete cache's files against its manifest (module docstring: the structure; with
    `hashes` also every shard's sha256; None: when the cache is at most HASH_AT_VALIDATION_BYTES).
    Raises DamagedCacheError naming every damaged shard (CacheError for an unfinished one); returns
    the manifest."""
    directory = Path(directory)
    if manifest is None:
        manifest = read_manifest(directory)
    if not manifest.get("complete"):
        raise CacheError(f"{directory} is an unfinished distillation cache; run `gemma-hf distill-cache` "
                         "again with the same recipe to complete it (finished shards are kept).")
    problems: list[tuple[str | None, str]] = []
    entries = [s for s in manifest["shards"] if isinstance(s, Mapping)
               and all(isinstance(s.get(k), int) and not isinstance(s.get(k), bool) for k in _ENTRY_INTS)
               and all(isinstance(s.get(k), str) for k in ("file", "sha256", "tokens_sha256"))]
    if len(entries) != len(manifest["shards"]):
        problems.append((None, f"{MANIFEST} has {len(manifest['shards']) - len(entries)} malformed shard entries"))
    indices = [s["index"] for s in entries]
    listed = {s["file"] for s in entries}
    expected = list(range(max(indices, default=-1) + 1))
    if indices != expected or not entries:
        missing = sorted(set(expected) - set(indices)) or ([0] if not entries else [])
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        for index in missing:
            problems.append((shard_name(index), f"not listed in {MANIFEST} (the shard list must run 0..n-1)"))
            listed.add(shard_name(index))  # named once
        for index in repeated:
            problems.append((shard_name(index), f"listed more than once in {MANIFEST}"))
        if not missing and not repeated:
            problems.append((None, f"{MANIFEST} lists its shards out of order"))
    shard_size = manifest.get("shard_size")
    if not isinstance(shard_size, int) or shard_size < 1:
        problems.append((None, f"{MANIFEST} records shard_size={shard_size!r}"))
        shard_size = max((s["num_examples"] for s in entries), default=1)
    for position, s in enumerate(entries):
        last = position == len(entries) - 1
        if s["file"] != shard_name(s["index"]):
            problems.append((s["file"], f"listed as shard {s['index']}, whose file is {shard_name(s['index'])}"))
        elif not (1 <= s["num_examples"] <= shard_size if last else s["num_examples"] == shard_size):
            problems.append((s["file"], f"the manifest records {s['num_examples']} examples, but every shard "
                             f"holds shard_size={shard_size} (the last one 1 to {shard_size})"))
    dataset = manifest.get("dataset")
    if not isinstance(dataset, Mapping) or not isinstance(dataset.get("fingerprint"), str):
        problems.append((None, f"{MANIFEST} has no dataset block"))
    else:
        for count in ("num_examples", "num_positions", "num_tokens"):
            total = sum(s[count] for s in entries)
            if dataset.get(count) != total:
                problems.append((None, f"{MANIFEST} records dataset {count}={dataset.get(count)!r} but its shards "
                                 f"sum to {total} (a shard entry removed or a count edited)"))
    identity_digest = sha_json(identity_fields(manifest))
    hash_files = hashes or (hashes is None and cache_bytes(manifest) <= HASH_AT_VALIDATION_BYTES)
    for s in entries:
        name, path = s["file"], directory / s["file"]
        if not path.is_file():
            problems.append((name, f"missing (the manifest records {s['bytes']} bytes)"))
            continue
        size = path.stat().st_size
        if size != s["bytes"]:
            problems.append((name, f"has the wrong size ({size} bytes; the manifest records {s['bytes']})"))
            continue
        info = shard_header_info(path)
        problem = shard_header_problem(info, s["index"], identity_digest, manifest)
        if problem is None:
            differ = [k for k in ("num_examples", "num_positions", "num_tokens", "tokens_sha256")
                      if info[k] != s[k]]
            if differ:
                problem = f"its header's {', '.join(differ)} differ from the manifest's entry"
        if problem is None and hash_files and file_sha256(path) != s["sha256"]:
            problem = "its bytes changed since it was written: the sha256 differs from the manifest's"
        if problem:
            problems.append((name, problem))
    for path in sorted(directory.iterdir()):
        if _SHARD_FILE.match(path.name) and path.name not in listed:
            problems.append((path.name, f"in the directory but not in {MANIFEST} (a shard entry removed, or the "
                             "file renamed)"))
    if problems:
        raise DamagedCacheError(directory, problems, rebuild)
    return manifest


class CacheReader:
    """A complete cache directory, validated, streamed shard by shard (one shard in memory at a time).

    Opening it checks the structure (:func:`check_cache_files`; `verify`: every shard's sha256 too);
    each shard read is hashed against the manifest and its contents checked before any example is
    handed out. `rebuild`: the command named as the fix of a damaged cache."""

    def __init__(self, directory, *, verify: bool = False, rebuild: str = REBUILD):
        self.directory = Path(directory)
        self.rebuild = rebuild
        self.manifest = check_cache_files(self.directory, hashes=verify, rebuild=rebuild)

    @property
    def K(self) -> int:
        return self.manifest["K"]

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def temperature(self) -> float:
        return self.manifest["temperature"]

    @property
    def num_positions(self) -> int:
        return self.manifest["dataset"]["num_positions"]

    def __len__(self) -> int:
        return self.manifest["dataset"]["num_examples"]

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def read_shard(self, index: int) -> list[CacheExample]:
        """The examples of one shard (views into that shard's tensors), its bytes and contents verified."""
        entry = self.manifest["shards"][index]
        name, path = entry["file"], self.directory / entry["file"]

        def damaged(what: str) -> DamagedCacheError:
            return DamagedCacheError(self.directory, [(name, what)], self.rebuild)

        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise damaged(f"missing (the manifest records {entry['bytes']} bytes)") from None
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise damaged(f"its bytes changed since it was written ({len(data)} bytes; the sha256 differs from the "
                          "manifest's)")
        try:
            tensors = load_shard_bytes(data)
        except Exception as err:  # noqa: BLE001 - safetensors' errors: a file that is not a shard
            raise damaged(f"cannot be loaded as safetensors ({err})") from None
        del data
        problem = shard_content_problem(tensors, self.manifest)
        held = tensors["token_offsets"].shape[0] - 1 if "token_offsets" in tensors else None
        if problem is None and held != entry["num_examples"]:
            problem = f"holds {held} examples; the manifest records {entry['num_examples']}"
        if problem:
            raise damaged(problem)
        return split_examples(tensors)

    def __iter__(self) -> Iterator[CacheExample]:
        for index in range(self.num_shards):
            examples = self.read_shard(index)[::-1]
            while examples:  # drop each example once handed out: the shard is freed after its last one
                yield examples.pop()

    def bytes_per_target(self) -> float:
        """Bytes on disk (shards + manifest) per stored target position."""
        total = sum(s["bytes"] for s in self.manifest["shards"]) + (self.directory / MANIFEST).stat().st_size
        return total / max(1, self.num_positions)


def check_compatible(manifest, *, teacher=None, tokenizer=None, K: int | None = None,
                     temperature: float | None = None, mode: str | None = None, dataset=None,
                     vocab_size: int | None = None) -> None:
    """Raise CacheMismatchError naming every field where the cache differs from this run.

    manifest: a manifest dict, a CacheReader or a cache directory. teacher: a checkpoint directory,
    a model or a fingerprint; tokenizer: its directory, tokenizer.json, a tokenizer loaded from a
    directory, or a sha256; dataset: a fingerprint or the token id sequences. Fields left None are
    not checked.
    """
    if isinstance(manifest, CacheReader):
        where, manifest = manifest.directory, manifest.manifest
    elif isinstance(manifest, (str, os.PathLike)):
        where, manifest = manifest, read_manifest(manifest)
    else:
        where = "the distillation cache"

    def digest(value, fingerprint):
        return value if isinstance(value, str) and _HEX64.match(value) else fingerprint(value)

    checks = []
    if teacher is not None:
        checks.append(("teacher", (manifest.get("teacher") or {}).get("fingerprint"),
                       digest(teacher, teacher_fingerprint), "fingerprint "))
    if tokenizer is not None:
        checks.append(("tokenizer", (manifest.get("tokenizer") or {}).get("sha256"),
                       digest(tokenizer, tokenizer_fingerprint), "sha256 "))
    for name, value in (("K", K), ("temperature", temperature), ("mode", mode), ("vocab_size", vocab_size)):
        if value is not None:
            checks.append((name, manifest.get(name), float(value) if name == "temperature" else value, ""))
    if dataset is not None:
        checks.append(("dataset", (manifest.get("dataset") or {}).get("fingerprint"),
                       digest(dataset, dataset_fingerprint), "fingerprint "))
    bad = [(name, have, want, kind) for name, have, want, kind in checks if have != want]
    if bad:
        def show(v, kind):
            return f"{kind}{v[:12]}..." if kind and isinstance(v, str) else repr(v)

        detail = "; ".join(f"{name} (cache: {show(have, kind)}, this run: {show(want, kind)})"
                           for name, have, want, kind in bad)
        teacher_name = (manifest.get("teacher") or {}).get("name")
        raise CacheMismatchError(
            f"{where} does not match this run: {detail}. A cache holds one teacher's targets for one tokenizer, "
            f"dataset and sampling setting (it was written from teacher {teacher_name!r}); rebuild it for this run "
            "with `gemma-hf distill-cache` (into another directory), or run with the settings it was written with.",
            [name for name, *_ in bad])


__all__ = ["CacheReader", "check_cache_files", "check_compatible", "HASH_AT_VALIDATION_BYTES"]
