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


def shard_header_problem(info: dict | None, index: int, identity_digest: str, manifest: Mapping) -> str | None:
    """What is wrong with shard `index`'s header (``shard_header_info``), or None when it is a whole shard of
    this cache: its own index, the digest of the manifest's identity fields, the tensors of the layout in
    the manifest's dtypes, their shapes agreeing with its counts."""
    if info is None:
        return "not a whole safetensors shard (its size disagrees with its header, or the header is unreadable)"
    if info.get("index") != index:
        return f"its header says it is shard {info.get('index')!r}, not shard {index} (renamed or swapped?)"
    if info.get("identity") != identity_digest:
        return "written for other cache settings than the manifest records (K, mode, teacher, vocab_size, ...)"
    if any(key not in info for key in ("num_examples", "num_positions", "num_tokens", "tokens_sha256",
                                       "positions_sha256")):
        return "its header lacks the shard's counts"
    tensors, k = info["_tensors"], manifest["K"]
    expected = {**SHARD_TENSORS, "target_probs": _SAFETENSORS_DTYPE.get(manifest["probs_dtype"])}
    if set(tensors) != set(expected) or any(tensors[n].get("dtype") != d for n, d in expected.items()):
        return f"holds tensors {sorted(tensors)} that are not the shard layout's"
    n, p, t = info["num_examples"], info["num_positions"], info["num_tokens"]
    shapes = {"input_ids": [t], "token_offsets": [n + 1], "positions": [p], "target_offsets": [n + 1],
              "target_ids": [p, k], "target_probs": [p, k]}
    wrong = [name for name, shape in shapes.items() if tensors[name].get("shape") != shape]
    if wrong:
        return f"the shapes of {', '.join(wrong)} disagree with its counts ({n} examples, {p} positions, K={k})"
    return None


def shard_is_valid(info: dict | None, index: int, identity_digest: str, manifest: Mapping) -> bool:
    return shard_header_problem(info, index, identity_digest, manifest) is None


# A row's probabilities, summed over its distinct ids, are at most 1 (they are q of distinct tokens); stored
# as float16 each may be 2**-11 high (module docstring), so the sum is allowed 2**-9 over.
PROBS_SUM_SLACK = 2**-9


def shard_content_problem(tensors: Mapping[str, torch.Tensor], manifest: Mapping) -> str | None:
    """What is wrong with a loaded shard's contents, or None. What the trainer relies on: offsets that
    cut the tensors into examples of at least one token, positions inside their example, token and
    target ids inside the vocabulary [0, vocab_size), probabilities finite and in [0, 1], each row's
    probabilities summing to at most 1 over its distinct ids (sampled: ids repeat; topk: K distinct ids,
    whose sum must also be positive: the weights are q / sum q). Measured on one core of a 2-core AMD
    EPYC: about 2 GB/s of targets where rows sum below 1 as they stand (topk; flat sampled rows), about
    170 MB/s where a sampled row's repeated ids must be sorted out (a peaked teacher: most rows). A
    50 MB shard costs 0.3 s at worst, next to training the student on its examples."""
    try:
        k, vocab, mode = int(manifest["K"]), int(manifest["vocab_size"]), manifest["mode"]
        ids, probs = tensors["target_ids"], tensors["target_probs"]
        tok, tgt = tensors["token_offsets"].long(), tensors["target_offsets"].long()
        input_ids, positions = tensors["input_ids"], tensors["positions"]
    except (KeyError, TypeError, ValueError) as err:
        return f"is not a shard of this cache's layout ({err})"
    p = positions.shape[0]
    if ids.shape != (p, k) or probs.shape != (p, k) or tok.shape != tgt.shape or tok.ndim != 1 or tok.numel() < 2:
        return (f"has tensors of inconsistent shapes (target_ids {tuple(ids.shape)}, target_probs "
                f"{tuple(probs.shape)}, {p} positions, K={k})")
    for name, offsets, total in (("token_offsets", tok, input_ids.shape[0]), ("target_offsets", tgt, p)):
        if int(offsets[0]) != 0 or int(offsets[-1]) != total or bool((offsets[1:] < offsets[:-1]).any()):
            return f"{name} do not cut its {total} entries into examples"
    lengths = tok[1:] - tok[:-1]
    if bool((lengths < 1).any()):
        return f"example {int((lengths < 1).nonzero()[0])} has no tokens"
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        return f"input_ids outside the vocabulary [0, {vocab}) (min {int(input_ids.min())}, max {int(input_ids.max())})"
    if p:
        limit = torch.repeat_interleave(lengths - 1, tgt[1:] - tgt[:-1])  # position t predicts token t + 1
        bad = (positions.long() < 0) | (positions.long() >= limit)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            return f"target position {int(positions[row])} (row {row}) lies outside its example"
    rows = max(1, 2**22 // max(1, k))  # bounded scratch memory, whatever the shard size
    for start in range(0, p, rows):
        chunk_ids, q = ids[start:start + rows], probs[start:start + rows].float()
        low, high = torch.aminmax(chunk_ids)
        if int(low) < 0 or int(high) >= vocab:
            row = start + int(((chunk_ids < 0) | (chunk_ids >= vocab)).any(1).nonzero()[0])
            return (f"target_ids outside the vocabulary [0, {vocab}) (row {row}: "
                    f"{ids[row][(ids[row] < 0) | (ids[row] >= vocab)].tolist()[:3]})")
        if not (bool(torch.isfinite(q).all()) and float(q.min()) >= 0 and float(q.max()) <= 1):
            bad = ~torch.isfinite(q) | (q < 0) | (q > 1)
            row = start + int(bad.any(1).nonzero()[0])
            return (f"target_probs not finite or outside [0, 1] (row {row}: "
                    f"{probs[row][bad[row - start]].float().tolist()[:3]})")
        total = q.sum(1)
        if mode == "sampled":  # ids drawn with replacement: sum each id once, where repeats could matter
            over = (total > 1 + PROBS_SUM_SLACK).nonzero().flatten()
            if over.numel():
                sorted_ids, order = chunk_ids[over].sort(dim=1)
                first = torch.ones_like(sorted_ids, dtype=torch.bool)
                first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
                total[over] = (q[over].gather(1, order) * first).sum(1)
        elif bool((total <= 0).any()):  # topk: K distinct ids, weighted q / sum q
            row = start + int((total <= 0).nonzero()[0])
            return f"target_probs of row {row} sum to 0; topk weights are q / sum(q)"
        if bool((total > 1 + PROBS_SUM_SLACK).any()):
            row = int((total > 1 + PROBS_SUM_SLACK).nonzero()[0])
            return (f"target_probs of row {start + row} sum to {float(total[row]):.4f} over its "
                    f"{'distinct ' if mode == 'sampled' else ''}ids; teacher probabilities of distinct tokens sum to "
                    "at most 1")
    return None


def load_shard(path: Path, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in (names or f.keys())}


def load_shard_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a shard file's bytes (read once: hashed, then loaded from memory)."""
    from safetensors.torch import load

    return load(data)


def split_examples(tensors: Mapping[str, torch.Tensor]) -> list[CacheExample]:
    tok, tgt = tensors["token_offsets"].tolist(), tensors["target_offsets"].tolist()
    return [CacheExample(tensors["input_ids"][tok[e]:tok[e + 1]], tensors["positions"][tgt[e]:tgt[e + 1]],
                         tensors["target_ids"][tgt[e]:tgt[e + 1]], tensors["target_probs"][tgt[e]:tgt[e + 1]])
            for e in range(len(tok) - 1)]


__all__ = ["CacheExample", "shard_name", "shard_header_problem", "shard_content_problem", "METADATA_KEY",
           "SHARD_TENSORS"]
