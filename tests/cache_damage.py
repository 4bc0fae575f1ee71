"""Damaging an offline distillation cache the ways a disk, a copy or a hand edit does, for the tests
that check every artefact read back against what was written (test_distill_cache.py: the cache itself;
test_distill.py: `gemma-hf distill` and `distill-cache` on a damaged cache)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gemma_hf.distillation.manifest import MANIFEST
from gemma_hf.distillation.shards import shard_name


def edit_manifest(directory: Path, edit) -> None:
    """Apply `edit(manifest dict)` to the cache's manifest.json."""
    manifest = json.loads((directory / MANIFEST).read_text())
    edit(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def drop_entry(index: int, delete_file: bool = False):
    """A damage: the manifest's entry of shard `index` removed and the dataset counts edited to match
    (with `delete_file`, its file too: the manifest then agrees with the directory)."""
    def edit(manifest):
        gone = manifest["shards"].pop(index)
        for count in ("num_examples", "num_positions", "num_tokens"):
            manifest["dataset"][count] -= gone[count]

    def damage(directory: Path) -> None:
        edit_manifest(directory, edit)
        if delete_file:
            (directory / shard_name(index)).unlink()
    return damage


def flip_byte(index: int):
    """A damage: one bit of shard `index`'s last tensor flipped (size and header unchanged)."""
    def damage(directory: Path) -> None:
        path = directory / shard_name(index)
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x20
        path.write_bytes(bytes(data))
    return damage


def rewrite_shard(directory: Path, index: int, edit, record: bool = True) -> None:
    """Rewrite shard `index` with its tensors changed by `edit(dict of tensors)` (metadata kept); `record`:
    the manifest's bytes and sha256 follow, as a writer that got the contents wrong would leave them
    (then only the content checks can tell)."""
    from safetensors import safe_open
    from safetensors.torch import save

    path = directory / shard_name(index)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
    edit(tensors)
    data = save(tensors, metadata=metadata)
    path.write_bytes(data)
    if record:
        edit_manifest(directory, lambda manifest: manifest["shards"][index].update(
            bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))


def set_value(index: int, tensor: str, where, value, record: bool = True):
    """A damage: shard `index`'s `tensor`[where] = value (rewrite_shard)."""
    return lambda directory: rewrite_shard(directory, index, lambda t: t[tensor].__setitem__(where, value), record)


def rename(index: int, to: int):
    return lambda directory: (directory / shard_name(index)).rename(directory / shard_name(to))


def delete(index: int):
    return lambda directory: (directory / shard_name(index)).unlink()
