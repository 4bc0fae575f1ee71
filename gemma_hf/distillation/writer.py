"""Writing an offline cache directory: :class:`CacheWriter`, shard by shard, atomic, resumable.

Atomicity and resumption
------------------------
A shard is serialised in memory, written to ``.shard-NNNNN.safetensors.tmp``, fsynced and
renamed into place; then the manifest (also written to a temporary file and renamed) records it.
A process killed at any point leaves complete shards and perhaps a stale temporary file. On
restart (same directory, same identity fields, else a CacheMismatchError naming them)
temporary files are deleted, and a shard counts as complete when its file's size equals what
its safetensors header describes, the header names the expected tensors, index and identity
digest (a shard renamed into place before the manifest update is adopted this way), its bytes
hash to the manifest's sha256 (when listed), its contents pass the reader's checks, and its
token ids hash to those of the examples the run would put in it (a changed dataset is refused).
Any other shard is rewritten, and finish() removes shard files the manifest does not list: so
re-running the writer over a damaged cache (reader.py names the damage) repairs it.
Sampling is deterministic: shard k draws from a generator seeded with
sha256(seed, k), so the re-run writes exactly the bytes an uninterrupted run writes (on the same
device type and thread configuration: the teacher's float results must not change).

The manifest is described in manifest.py, the shard files in shards.py; the driver that runs the
teacher and feeds this writer is :func:`~gemma_hf.distillation.cache.build_cache`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from gemma_hf.io import exclusive_lock

from .fingerprints import sha_json, TokenHash
from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    IDENTITY_FIELDS,
    MANIFEST,
    PROBS_DTYPES,
    CacheError,
    CacheMismatchError,
    _dump_manifest,
    identity_fields,
    read_manifest,
)
from .shards import (
    METADATA_KEY,
    CacheExample,
    load_shard,
    load_shard_bytes,
    shard_content_problem,
    shard_header_info,
    shard_is_valid,
    shard_name,
    split_examples,
)

_TMP = re.compile(r"^\.shard-\d+\.safetensors\.tmp$")
_SHARD = re.compile(r"^shard-\d+\.safetensors$")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _shard_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"gemma_hf.distill_cache:{seed}:{index}".encode()).digest()[:8], "little")


class CacheWriter:
    """Writes a cache directory shard by shard; atomic per shard, resumable (module docstring).

    ``manifest_fields``: the identity fields (:func:`~gemma_hf.distillation.manifest.manifest_fields`).
    Holds an exclusive lock on the directory until :meth:`close` (or the end of a ``with`` block).
    Typical use::

        with CacheWriter(directory, fields, shard_size) as writer:
            for index, examples in enumerate(shards):
                if not writer.shard_is_complete(index, tokens_sha256=...):
                    gen = writer.generator(index, device)
                    writer.write_shard(index, [CacheExample(...), ...])   # targets drawn with gen
            writer.finish()
    """

    def __init__(self, directory, manifest_fields: Mapping, shard_size: int):
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}.")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(exclusive_lock(self.directory, "distillation cache"))
        try:
            fields = {**manifest_fields, "shard_size": shard_size}
            missing = [k for k in IDENTITY_FIELDS if k not in fields]
            if missing:
                raise ValueError(f"CacheWriter: manifest_fields lacks {missing} (build them with manifest_fields()).")
            if (self.directory / MANIFEST).exists():
                manifest = read_manifest(self.directory)
                mismatched = [k for k in IDENTITY_FIELDS if identity_fields(manifest)[k] != identity_fields(fields)[k]]
                if mismatched:
                    detail = "; ".join(f"{k}: cache {identity_fields(manifest)[k]!r}, now {identity_fields(fields)[k]!r}"
                                       for k in mismatched)
                    raise CacheMismatchError(
                        f"{self.directory} holds a cache written with other settings ({detail}). A cache is resumed "
                        "only with the settings it was started with: use them, or write to another directory.",
                        mismatched)
            else:
                foreign = sorted(p.name for p in self.directory.iterdir()
                                 if not (_TMP.match(p.name) or _SHARD.match(p.name) or p.name == f".{MANIFEST}.tmp"))
                if foreign:
                    raise CacheError(f"{self.directory} is not empty ({', '.join(foreign[:5])}) and holds no "
                                     f"{MANIFEST}: a distillation cache is written into a new or empty directory.")
                manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **fields, "ids_dtype": "int32",
                            "shards": [], "dataset": None, "complete": False}
            self.manifest = manifest
            self.identity_digest = sha_json(identity_fields(manifest))
            for stale in self.directory.iterdir():  # a kill during a shard write leaves its temporary file
                if _TMP.match(stale.name):
                    stale.unlink()
            self._write_manifest()
        except BaseException:
            self._stack.close()
            raise

    # -- context manager ------------------------------------------------------------------------
    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- shards ---------------------------------------------------------------------------------
    @property
    def shard_size(self) -> int:
        return self.manifest["shard_size"]

    def entry(self, index: int) -> dict | None:
        """The manifest's entry of shard ``index``, or None."""
        return next((s for s in self.manifest["shards"] if s["index"] == index), None)

    def _set_entry(self, entry: dict) -> None:
        shards = [s for s in self.manifest["shards"] if s["index"] != entry["index"]] + [entry]
        self.manifest["shards"] = sorted(shards, key=lambda s: s["index"])
        self.manifest["complete"], self.manifest["dataset"] = False, None
        self._write_manifest()

    def _write_manifest(self) -> None:
        _atomic_write(self.directory / MANIFEST, _dump_manifest(self.manifest))

    def shard_seed(self, index: int) -> int:
        return _shard_seed(self.manifest["seed"], index)

    def generator(self, index: int, device="cpu") -> torch.Generator:
        """The generator shard `index` samples with (seeded from the cache seed and the index)."""
        return torch.Generator(device=device).manual_seed(self.shard_seed(index))

    def shard_is_complete(self, index: int, tokens_sha256: str | None = None,
                          positions_sha256: str | None = None) -> bool:
        """Whether shard `index` is on disk, whole and ours (adopting a shard the manifest missed).

        Whole: its header is this cache's (shards.shard_header_problem), its bytes hash to the
        manifest's sha256 when the manifest lists it, its contents pass the reader's checks
        (shards.shard_content_problem) and its token ids and positions hash to what its header
        records. A shard that fails any of these loses its file and manifest entry and is rewritten
        (the same bytes: sampling is seeded per shard), which is how `gemma-hf distill-cache` repairs a
        damaged cache; a manifest entry that disagrees with a whole shard is rewritten from the shard.

        With `tokens_sha256` (:func:`~gemma_hf.distillation.fingerprints.dataset_fingerprint` of the
        token ids of the examples that belong in the shard) and `positions_sha256` (the same hash of
        their target positions), a complete shard holding other ones raises CacheMismatchError: the
        dataset changed.
        """
        path = self.directory / shard_name(index)
        info = shard_header_info(path) if path.exists() else None
        entry = self.entry(index)
        data = sha256 = None
        whole = shard_is_valid(info, index, self.identity_digest, self.manifest)
        if whole:
            data = path.read_bytes()
            sha256 = hashlib.sha256(data).hexdigest()
            whole = (entry is None or entry.get("sha256") == sha256) and self._contents_match(data, info)
        if not whole:
            if entry is not None:  # recorded, but the file is gone or damaged: rewrite it
                self.manifest["shards"] = [s for s in self.manifest["shards"] if s["index"] != index]
                self._write_manifest()
            if path.exists():  # not a whole shard of ours: never adopted later (write_shard asks again)
                path.unlink()
            return False
        checks = (("token ids", info["tokens_sha256"], tokens_sha256),
                  ("target positions", info["positions_sha256"], positions_sha256))
        changed = [what for what, stored, given in checks if given is not None and stored != given]
        if changed:
            raise CacheMismatchError(
                f"{path} was written from other {' and '.join(changed)} than this run's examples "
                f"{index * self.shard_size}.."
                f"{(index + 1) * self.shard_size - 1}: the dataset changed since the cache was started. Write the "
                "cache for this dataset into another directory.", ["dataset"])
        expected = self._entry_of(index, info, len(data), sha256)
        if entry != expected:  # renamed into place before the manifest update, or an entry edited since
            self._set_entry(expected)
        return True

    def _contents_match(self, data: bytes, info: Mapping) -> bool:
        """The shard's contents pass the reader's checks and hash to the token ids and positions its
        header records."""
        try:
            tensors = load_shard_bytes(data)
        except Exception:  # noqa: BLE001 - safetensors' errors: not a shard
            return False
        if shard_content_problem(tensors, self.manifest) is not None:
            return False
        tokens, positions = TokenHash(), TokenHash()
        for example in split_examples(tensors):
            tokens.update(example.input_ids)
            positions.update(example.positions)
        return tokens.hexdigest() == info["tokens_sha256"] and positions.hexdigest() == info["positions_sha256"]

    @staticmethod
    def _entry_of(index: int, info: Mapping, size: int, sha256: str) -> dict:
        return {"index": index, "file": shard_name(index), "num_examples": info["num_examples"],
                "num_positions": info["num_positions"], "num_tokens": info["num_tokens"], "bytes": size,
                "sha256": sha256, "tokens_sha256": info["tokens_sha256"],
                "positions_sha256": info["positions_sha256"], "complete": True}

    def write_shard(self, index: int, examples: Sequence[CacheExample]) -> dict:
        """Write shard `index` atomically (skipped when already complete); returns its manifest entry."""
        if self.shard_is_complete(index):
            return self.entry(index)
        tensors, info = self._shard_tensors(index, examples)
        from safetensors.torch import save

        data = save(tensors, metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})
        path = self.directory / shard_name(index)
        _atomic_write(path, data)
        entry = self._entry_of(index, info, len(data), hashlib.sha256(data).hexdigest())
        self._set_entry(entry)
        return entry

    def _shard_tensors(self, index: int, examples: Sequence[CacheExample]) -> tuple[dict, dict]:
        if not examples:
            raise ValueError(f"shard {index}: no examples.")
        if len(examples) > self.shard_size:
            raise ValueError(f"shard {index}: {len(examples)} examples, more than shard_size={self.shard_size}.")
        k, vocab = self.manifest["K"], self.manifest["vocab_size"]
        probs_dtype = PROBS_DTYPES[self.manifest["probs_dtype"]]
        tokens, positions = TokenHash(), TokenHash()
        for e, ex in enumerate(examples):
            p, length = ex.positions.shape[0], ex.input_ids.shape[0]
            if length < 1:
                raise ValueError(f"shard {index}, example {e}: no tokens.")
            if tuple(ex.target_ids.shape) != (p, k) or tuple(ex.target_probs.shape) != (p, k):
                raise ValueError(f"shard {index}, example {e}: targets must be [{p}, K={k}], got ids "
                                 f"{tuple(ex.target_ids.shape)} and probs {tuple(ex.target_probs.shape)}.")
            if p and (int(ex.positions.min()) < 0 or int(ex.positions.max()) >= length - 1):
                raise ValueError(f"shard {index}, example {e}: positions must lie in [0, {length - 2}] (position t "
                                 "holds the distribution of token t + 1).")
            if p and (int(ex.target_ids.min()) < 0 or int(ex.target_ids.max()) >= vocab):
                raise ValueError(f"shard {index}, example {e}: target ids outside the vocabulary [0, {vocab}).")
            tokens.update(ex.input_ids)
            positions.update(ex.positions)

        def offsets(counts):
            return torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)

        tensors = {
            "input_ids": torch.cat([ex.input_ids.reshape(-1).to(torch.int32) for ex in examples]),
            "token_offsets": offsets([int(ex.input_ids.shape[0]) for ex in examples]),
            "positions": torch.cat([ex.positions.reshape(-1).to(torch.int32) for ex in examples]),
            "target_offsets": offsets([ex.num_positions for ex in examples]),
            "target_ids": torch.cat([ex.target_ids.reshape(-1, k).to(torch.int32) for ex in examples]),
            "target_probs": torch.cat([ex.target_probs.reshape(-1, k).float() for ex in examples]).to(probs_dtype),
        }
        tensors = {name: t.cpu().contiguous() for name, t in tensors.items()}
        info = {"format": FORMAT, "format_version": FORMAT_VERSION, "index": index, "identity": self.identity_digest,
                "num_examples": len(examples), "num_positions": int(tensors["positions"].shape[0]),
                "num_tokens": int(tensors["input_ids"].shape[0]), "tokens_sha256": tokens.hexdigest(),
                "positions_sha256": positions.hexdigest(), "seed": self.shard_seed(index)}
        return tensors, info

    def finish(self, dataset_fingerprint: str | None = None, num_shards: int | None = None) -> dict:
        """Mark the cache complete: shards 0..n-1 all present; the dataset fingerprint (recomputed from
        the shards' input_ids, one shard at a time, when not given). `num_shards`: how many the
        dataset makes (a directory holding more was started from a longer dataset: refused).
        Returns the manifest."""
        shards = self.manifest["shards"]
        indices = [s["index"] for s in shards]
        if num_shards is not None and indices and max(indices) >= num_shards:
            raise CacheMismatchError(
                f"{self.directory} holds shards up to {max(indices)} but this dataset makes {num_shards}: the "
                "dataset changed since the cache was started. Write the cache for this dataset into another "
                "directory.", ["dataset"])
        if not shards or indices != list(range(len(shards))):
            missing = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
            raise CacheError(f"{self.directory}: cannot finish, shards {missing or [0]} are missing.")
        short = [s["index"] for s in shards[:-1] if s["num_examples"] != self.shard_size]
        if short:  # the reader (and a run's check of its training split) cut the dataset into shard_size runs
            raise CacheError(f"{self.directory}: shards {short} hold fewer than shard_size={self.shard_size} examples; "
                             "every shard but the last must hold shard_size.")
        listed = {s["file"] for s in shards}
        for path in self.directory.iterdir():  # shard files the manifest does not list (renamed ones): leftovers
            if _SHARD.match(path.name) and path.name not in listed:
                path.unlink()
        if dataset_fingerprint is None:
            h = TokenHash()
            for s in shards:
                t = load_shard(self.directory / s["file"], ["input_ids", "token_offsets"])
                offs = t["token_offsets"].tolist()
                for e in range(len(offs) - 1):
                    h.update(t["input_ids"][offs[e]:offs[e + 1]])
            dataset_fingerprint = h.hexdigest()
        self.manifest["dataset"] = {"fingerprint": dataset_fingerprint,
                                    "num_examples": sum(s["num_examples"] for s in shards),
                                    "num_positions": sum(s["num_positions"] for s in shards),
                                    "num_tokens": sum(s["num_tokens"] for s in shards)}
        self.manifest["complete"] = True
        self._write_manifest()
        return self.manifest


__all__ = ["CacheWriter"]
