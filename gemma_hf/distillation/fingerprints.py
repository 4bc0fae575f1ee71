"""Fingerprints of what an offline cache was written from: its teacher, tokenizer and dataset.

Cheap by design; what they do not see is said here:

* tokenizer: sha256 of the tokenizer.json file's bytes.
* teacher: sha256 over its config.json (parsed; ``_name_or_path``, ``transformers_version`` and
  ``auto_map`` dropped) and, per ``*.safetensors`` file in name order: its name, size, full
  header (every tensor's name, dtype, shape, offsets), and 16 blocks of 4 KiB at evenly spaced
  offsets of its data. It reads about 64 KiB per file, whatever the model size. It tells apart
  different architectures, different exports and (with overwhelming probability) different
  weights of one architecture, since a fine-tune changes essentially every block; it cannot see
  an edit confined to unsampled bytes. A model object is fingerprinted through the directory it
  was loaded from (``name_or_path``), so a cache written from a loaded teacher matches its
  directory; a model with no directory (built in memory) is fingerprinted from its config and
  a strided sample of 4096 values per tensor (never equal to any directory's fingerprint).
* dataset: sha256 over the examples in order, each as its token count (uint64 little-endian)
  followed by its token ids (int32 little-endian). Computed while the examples stream in
  (:func:`~gemma_hf.distillation.cache.build_cache`) and, by
  :meth:`~gemma_hf.distillation.writer.CacheWriter.finish` without it, from the shards' input_ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

_HEX64 = re.compile(r"^[0-9a-f]{64}$")  # a value that already is a sha256 hex digest
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK_BYTES, FINGERPRINT_VALUES = 16, 4096, 4096


def sha_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _config_for_hash(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "auto_map")}


def safetensors_header(path: Path) -> tuple[int, bytes]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes).")
        (length,) = struct.unpack("<Q", head)
        if length > 100 * 2**20:
            raise ValueError(f"{path} is not a safetensors file (header length {length}).")
        header = f.read(length)
        if len(header) != length:
            raise ValueError(f"{path} is truncated inside its header.")
    return length, header


def _directory_fingerprint(path: Path) -> str:
    files = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or not files:
        raise ValueError(f"teacher fingerprint: {path} needs config.json and *.safetensors weights.")
    h = hashlib.sha256(b"gemma_hf.teacher.dir.v1\0")
    h.update(sha_json(_config_for_hash(json.loads((path / "config.json").read_text()))).encode())
    for file in files:
        size = file.stat().st_size
        length, header = safetensors_header(file)
        h.update(f"\0{file.name}\0{size}\0".encode())
        h.update(header)
        data_start, data_size = 8 + length, size - 8 - length
        with open(file, "rb") as f:
            for b in range(FINGERPRINT_BLOCKS):
                f.seek(data_start + (data_size * b) // FINGERPRINT_BLOCKS)
                h.update(f.read(min(FINGERPRINT_BLOCK_BYTES, data_size)))
    return h.hexdigest()


def _model_fingerprint(model) -> str:
    h = hashlib.sha256(b"gemma_hf.teacher.memory.v1\0")
    h.update(sha_json(_config_for_hash(model.config.to_dict())).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_VALUES)
        sample = flat[::step][:FINGERPRINT_VALUES].cpu().contiguous()
        h.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_fingerprint(teacher) -> str:
    """sha256 hex identifying a teacher (a checkpoint directory or a model); see the module docstring."""
    if isinstance(teacher, (str, os.PathLike)):
        path = Path(teacher)
        if not path.is_dir():
            raise ValueError(f"teacher fingerprint: {path} is not a checkpoint directory.")
        return _directory_fingerprint(path)
    source = getattr(teacher, "name_or_path", None) or ""
    if source and Path(source).is_dir() and any(Path(source).glob("*.safetensors")):
        return _directory_fingerprint(Path(source))
    return _model_fingerprint(teacher)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 hex of tokenizer.json: given as the file, its directory, or a tokenizer loaded from one."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = getattr(tokenizer, "name_or_path", None) or ""
    path = Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer fingerprint: no tokenizer.json at {path}; pass the tokenizer's directory or "
                         "its tokenizer.json.")
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TokenHash:
    """sha256 over examples: uint64 LE token count, then the ids as int32 LE."""

    def __init__(self):
        self._h = hashlib.sha256(b"gemma_hf.tokens.v1\0")

    def update(self, ids) -> None:
        arr = torch.as_tensor(ids).to(torch.int32).contiguous()
        self._h.update(struct.pack("<Q", arr.numel()))
        self._h.update(arr.numpy().astype("<i4", copy=False).tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def dataset_fingerprint(token_sequences: Iterable) -> str:
    """The dataset fingerprint of a cache (see the module docstring) of these token id sequences."""
    h = TokenHash()
    for ids in token_sequences:
        h.update(ids)
    return h.hexdigest()


__all__ = ["teacher_fingerprint", "tokenizer_fingerprint", "dataset_fingerprint"]
