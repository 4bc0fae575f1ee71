"""The offline cache's manifest: its identity fields, reading it, and the cache's errors.

Directory format (version 1)
----------------------------
A cache directory holds ``manifest.json`` and its shards (``shard-00000.safetensors``, ...; the
shard layout is in shards.py). ``manifest.json`` (JSON, sorted keys, no timestamps: two
identical runs write identical bytes)::

    format "gemma_hf.distill_cache", format_version 1
    teacher   {name: as given, fingerprint: see fingerprints.teacher_fingerprint}
    tokenizer {sha256: of tokenizer.json}
    K, temperature, mode ("sampled" | "topk"), seed, vocab_size
    ids_dtype "int32", probs_dtype "float16" (or "float32")
    shard_size (examples per shard), build {batch_size, chunk_size}: the teacher batches and the
        sampling chunks; the draws depend on them, so a resumed run must use the same values
    shards    [{index, file, num_examples, num_positions, num_tokens, bytes, sha256, tokens_sha256,
               complete}]
    dataset   {fingerprint, num_examples, num_positions, num_tokens}   (set by CacheWriter.finish())
    complete  true once every shard is written and the dataset fingerprint is set

The identity fields (IDENTITY_FIELDS) are what a resumed writer must agree on; the teacher's name
is not one of them (only its fingerprint is).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from gemma_hf.errors import InputError

from .fingerprints import _HEX64, teacher_fingerprint, tokenizer_fingerprint
from .losses import MODES

FORMAT = "gemma_hf.distill_cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROBS_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# Manifest fields a resumed writer must agree on (the shards' contents depend on each).
IDENTITY_FIELDS = ("teacher", "tokenizer", "K", "temperature", "mode", "seed", "vocab_size", "probs_dtype",
                   "shard_size", "build")


class CacheError(InputError):
    """A directory that is not a complete, valid distillation cache (message says why and the fix)."""


# The fix of a damaged cache when the caller does not know the recipe (the recipe side names its file).
REBUILD = "`gemma-hf distill-cache --config RECIPE.yaml` (the recipe that wrote it)"


class DamagedCacheError(CacheError):
    """A cache whose files disagree with what was written (manifest entries, sizes, sha256, headers, contents).

    ``problems``: (shard file name or None for the manifest itself, what is wrong), every one found;
    ``detail``: them as one sentence; ``shards``: the files named. ``str()`` adds the fix: rebuild it
    with distill-cache, which rewrites damaged and missing shards (same bytes: sampling is seeded per
    shard) and keeps the others."""

    def __init__(self, directory, problems: Sequence[tuple[str | None, str]], rebuild: str = REBUILD):
        self.directory, self.problems, self.rebuild = Path(directory), list(problems), rebuild
        shown = [f"{name}: {what}" if name else what for name, what in self.problems[:5]]
        more = len(self.problems) - len(shown)
        self.detail = "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
        self.shards = [name for name, _ in self.problems if name]
        super().__init__(f"{self.directory} is a damaged distillation cache: {self.detail}. Rebuild it with {rebuild}: "
                         "it rewrites the damaged and missing shards and keeps the others.")


class CacheMismatchError(InputError):
    """A cache written for another teacher / tokenizer / dataset / sampling setting; `fields` names them."""

    def __init__(self, message: str, fields: Sequence[str]):
        super().__init__(message)
        self.fields = list(fields)


def manifest_fields(*, teacher, tokenizer, K: int, temperature: float = 1.0, mode: str = "sampled", seed: int = 0,
                    vocab_size: int, probs_dtype: str = "float16", teacher_name: str | None = None,
                    batch_size: int | None = None, chunk_size: int | None = None) -> dict:
    """The identity fields of a cache (teacher and tokenizer fingerprinted here)."""
    if mode not in MODES:
        raise ValueError(f"unknown cache mode {mode!r}; expected one of {MODES}.")
    if probs_dtype not in PROBS_DTYPES:
        raise ValueError(f"probs_dtype must be one of {list(PROBS_DTYPES)}, got {probs_dtype!r}.")
    if not isinstance(K, int) or K < 1 or (mode == "topk" and K > vocab_size):
        raise ValueError(f"K={K!r} must be a positive integer (at most vocab_size={vocab_size} for topk).")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    if teacher_name is None:
        teacher_name = str(teacher) if isinstance(teacher, (str, os.PathLike)) else (
            getattr(teacher, "name_or_path", "") or type(teacher).__name__)
    return {
        "teacher": {"name": teacher_name, "fingerprint": teacher_fingerprint(teacher)},
        "tokenizer": {"sha256": tokenizer if isinstance(tokenizer, str) and _HEX64.match(tokenizer)
                      else tokenizer_fingerprint(tokenizer)},
        "K": K, "temperature": float(temperature), "mode": mode, "seed": int(seed), "vocab_size": int(vocab_size),
        "probs_dtype": probs_dtype, "build": {"batch_size": batch_size, "chunk_size": chunk_size},
    }


def identity_fields(manifest: Mapping) -> dict:
    """The manifest's fields that say what its targets are (the writer and the reader hash the same ones)."""
    out = {k: manifest.get(k) for k in IDENTITY_FIELDS}
    out["teacher"] = {"fingerprint": (manifest.get("teacher") or {}).get("fingerprint")}  # the name is not identity
    return out


def _dump_manifest(manifest: Mapping) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def read_manifest(directory) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{directory} is not a distillation cache (no {MANIFEST}); write one with "
                         "`gemma-hf distill-cache`.") from None
    except (OSError, ValueError) as err:
        raise CacheError(f"{path} cannot be read: {err}. The cache cannot be repaired: remove {directory} and "
                         "write it again with `gemma-hf distill-cache`.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a gemma_hf distillation cache manifest (format {FORMAT!r}).")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path} has format_version {manifest.get('format_version')!r}; this gemma_hf reads "
                         f"version {FORMAT_VERSION}. Rebuild the cache with this version.")
    missing = [k for k in (*IDENTITY_FIELDS, "shards", "complete") if k not in manifest]
    if missing or not isinstance(manifest["shards"], list):
        raise CacheError(f"{path} lacks {missing or ['shards']}: the manifest is damaged beyond repair. Remove "
                         f"{directory} and write the cache again with `gemma-hf distill-cache`.")
    return manifest


__all__ = [
    "manifest_fields", "read_manifest", "CacheError", "CacheMismatchError", "DamagedCacheError", "REBUILD", "FORMAT",
    "FORMAT_VERSION", "MANIFEST", "PROBS_DTYPES", "IDENTITY_FIELDS", "identity_fields",
]
