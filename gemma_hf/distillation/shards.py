"""The offline cache's shard files: their layout, checking one on its own, reading one back.

``shard-00000.safetensors``, one per ``shard_size`` examples, holding for its examples::

    input_ids      int32 [tokens]          all examples' token ids, concatenated
    token_offsets  int64 [examples + 1]    example e is input_ids[token_offsets[e]:token_offsets[e+1]]
    positions      int32 [P]               position t of a target row (it predicts token t + 1)
    target_offsets int64 [examples + 1]    example e's rows are [target_offsets[e], target_offsets[e+1])
    target_ids     int32 [P, K]            the K token ids
    target_probs   float16 [P, K]          q(id) of the temperature-scaled teacher distribution

and one safetensors metadata entry (``"gemma_hf.distill_cache"``: sorted JSON with the shard's
index, counts, tokens_sha256 and the digest of the manifest's identity fields), so a shard file
can be checked on its own. (One entry on purpose: safetensors 0.8 writes metadata in hash-map
order, which differs between processes; with one key the bytes are deterministic.)

Precision: probabilities are computed in fp32 and stored as float16: relative error at most
2**-11 (4.9e-4) for q >= 6.1e-5 (float16's smallest normal), absolute error at most 2**-25
(3e-8) below that, and q < 3e-8 rounds to 0. In "sampled" mode the weights are 1/K whatever
the stored q (q is kept for diagnostics and other estimators); in "topk" mode the weights
q_k / sum_j q_j inherit the 4.9e-4 relative error, far below the estimator's own bias.
bfloat16 would be 8x coarser for no gain (probabilities need no exponent range);
``probs_dtype="float32"`` doubles the probability bytes for exact values.

Bytes per target position: K * (4 + 2) for ids and probs, + 4 for its position, + 4 per token
of input_ids divided by targets per token, + the header (about 1 KiB per shard).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .fingerprints import safetensors_header

METADATA_KEY = "gemma_hf.distill_cache"
SHARD_TENSORS = {"input_ids": "I32", "token_offsets": "I64", "positions": "I32", "target_offsets": "I64",
                 "target_ids": "I32", "target_probs": None}  # None: the manifest's probs_dtype
_SAFETENSORS_DTYPE = {"float16": "F16", "float32": "F32"}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass
class CacheExample:
    """One example of a cache: its tokens and the teacher targets at some of its positions."""

    input_ids: torch.Tensor  # int32 [L]
    positions: torch.Tensor  # int32 [P]: row p is the teacher's distribution of token positions[p] + 1
    target_ids: torch.Tensor  # int32 [P, K]
    target_probs: torch.Tensor  # float16 / float32 [P, K]

    @property
    def num_positions(self) -> int:
        return int(self.positions.shape[0])


def shard_header_info(path: Path) -> dict | None:
    """The shard's metadata, when its size matches its header; None for a partial or foreign file."""
    try:
        length, header_bytes = safetensors_header(path)
        header = json.loads(header_bytes)
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        if path.stat().st_size != 8 + length + max(ends, default=0):
            return None
        info = json.loads(header["__metadata__"][METADATA_KEY])
        info["_tensors"] = {name: entry for name, entry in header.items() if name != "__metadata__"}
        return info
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def shard_is_valid(info: dict | None, index: int, identity_digest: str, manifest: Mapping) -> bool:
    if info is None or info.get("index") != index or info.get("identity") != identity_digest:
        return False
    if any(key not in info for key in ("num_examples", "num_positions", "num_tokens", "tokens_sha256",
                                       "positions_sha256")):
        return False
    tensors, k = info["_tensors"], manifest["K"]
    expected = {**SHARD_TENSORS, "target_probs": _SAFETENSORS_DTYPE[manifest["probs_dtype"]]}
    if set(tensors) != set(expected) or any(tensors[n]["dtype"] != d for n, d in expected.items()):
        return False
    n, p, t = info["num_examples"], info["num_positions"], info["num_tokens"]
    shapes = {"input_ids": [t], "token_offsets": [n + 1], "positions": [p], "target_offsets": [n + 1],
              "target_ids": [p, k], "target_probs": [p, k]}
    return all(tensors[name]["shape"] == shape for name, shape in shapes.items())


def load_shard(path: Path, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in (names or f.keys())}


def split_examples(tensors: Mapping[str, torch.Tensor]) -> list[CacheExample]:
    tok, tgt = tensors["token_offsets"].tolist(), tensors["target_offsets"].tolist()
    return [CacheExample(tensors["input_ids"][tok[e]:tok[e + 1]], tensors["positions"][tgt[e]:tgt[e + 1]],
                         tensors["target_ids"][tgt[e]:tgt[e + 1]], tensors["target_probs"][tgt[e]:tgt[e + 1]])
            for e in range(len(tok) - 1)]


__all__ = ["CacheExample", "shard_name", "METADATA_KEY", "SHARD_TENSORS"]
