"""Reading a complete offline cache for a run: :class:`CacheReader` (validated, streamed shard by
shard, one shard in memory at a time) and :func:`check_compatible` (is it this run's cache?).

The offline trainer (offline.py) iterates a CacheReader and collates its examples with
:class:`~gemma_hf.distillation.batches.CacheCollator`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from .fingerprints import _HEX64, dataset_fingerprint, teacher_fingerprint, tokenizer_fingerprint
from .manifest import MANIFEST, CacheError, CacheMismatchError, read_manifest
from .shards import CacheExample, load_shard, split_examples


class CacheReader:
    """A complete cache directory, validated, streamed shard by shard (one shard in memory at a time)."""

    def __init__(self, directory, *, verify: bool = False):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if not self.manifest.get("complete"):
            raise CacheError(f"{self.directory} is an unfinished distillation cache; run `gemma-hf distill-cache` "
                             "again with the same recipe to complete it (finished shards are kept).")
        for s in self.manifest["shards"]:
            path = self.directory / s["file"]
            if not path.is_file() or path.stat().st_size != s["bytes"]:
                raise CacheError(f"{path} is missing or has the wrong size (manifest: {s['bytes']} bytes); the cache "
                                 "is damaged: rebuild it (run `gemma-hf distill-cache` again: damaged shards are "
                                 "rewritten).")
            if verify and hashlib.sha256(path.read_bytes()).hexdigest() != s["sha256"]:
                raise CacheError(f"{path} does not match its sha256 in the manifest; the cache is damaged.")

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
        """The examples of one shard (views into that shard's tensors)."""
        entry = self.manifest["shards"][index]
        return split_examples(load_shard(self.directory / entry["file"]))

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


__all__ = ["CacheReader", "check_compatible"]
