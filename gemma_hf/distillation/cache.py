"""The offline teacher cache: K sampled (or top-K) teacher targets per position, written once.

Gemma 2 report, section 3.2: "we run inference on the teacher once and store the probabilities.
Since the vocabulary has 256k entries, we only store a sampled subset of the teacher
probabilities." This module computes those targets without building [B, T, V] logits
(:func:`teacher_targets`, :func:`sample_targets`), stores them in a resumable, verifiable
directory (:class:`CacheWriter`, :func:`build_cache`) and streams them back shard by shard
(:class:`CacheReader`, :func:`collate`). The estimators that turn targets into a loss are in
losses.py (:func:`~gemma_hf.distillation.losses.target_weights`).

Directory format (version 1)
----------------------------
``manifest.json`` (JSON, sorted keys, no timestamps: two identical runs write identical bytes)::

    format "gemma_hf.distill_cache", format_version 1
    teacher   {name: as given, fingerprint: see teacher_fingerprint}
    tokenizer {sha256: of tokenizer.json}
    K, temperature, mode ("sampled" | "topk"), seed, vocab_size
    ids_dtype "int32", probs_dtype "float16" (or "float32")
    shard_size (examples per shard), build {batch_size, chunk_size}: the teacher batches and the
        sampling chunks; the draws depend on them, so a resumed run must use the same values
    shards    [{index, file, num_examples, num_positions, num_tokens, bytes, sha256, tokens_sha256,
               complete}]
    dataset   {fingerprint, num_examples, num_positions, num_tokens}   (set by finish())
    complete  true once every shard is written and the dataset fingerprint is set

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

Atomicity and resumption
------------------------
A shard is serialised in memory, written to ``.shard-NNNNN.safetensors.tmp``, fsynced and
renamed into place; then the manifest (also written to a temporary file and renamed) records it.
A process killed at any point leaves complete shards and perhaps a stale temporary file. On
restart (same directory, same identity fields, else :class:`CacheMismatchError` naming them)
temporary files are deleted, and a shard counts as complete when its file's size equals what
its safetensors header describes, the header names the expected tensors, index and identity
digest (a shard renamed into place before the manifest update is adopted this way), and its
token ids hash to those of the examples the run would put in it (a changed dataset is refused).
Sampling is deterministic: shard k draws from a generator seeded with
sha256(seed, k), so the re-run writes exactly the bytes an uninterrupted run writes (on the same
device type and thread configuration: the teacher's float results must not change).

Fingerprints (cheap by design; what they do not see is said here)
-----------------------------------------------------------------
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
  (:func:`build_cache`) and, by :meth:`CacheWriter.finish` without it, from the shards' input_ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gemma_hf.errors import InputError

from .losses import MODES, _project, default_chunk_size, target_weights

FORMAT = "gemma_hf.distill_cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA_KEY = "gemma_hf.distill_cache"
PROBS_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# Manifest fields a resumed writer must agree on (the shards' contents depend on each).
IDENTITY_FIELDS = ("teacher", "tokenizer", "K", "temperature", "mode", "seed", "vocab_size", "probs_dtype",
                   "shard_size", "build")
SHARD_TENSORS = {"input_ids": "I32", "token_offsets": "I64", "positions": "I32", "target_offsets": "I64",
                 "target_ids": "I32", "target_probs": None}  # None: the manifest's probs_dtype
_SAFETENSORS_DTYPE = {"float16": "F16", "float32": "F32"}
_TMP = re.compile(r"^\.shard-\d+\.safetensors\.tmp$")
_SHARD = re.compile(r"^shard-\d+\.safetensors$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK_BYTES, FINGERPRINT_VALUES = 16, 4096, 4096


class CacheError(InputError):
    """A directory that is not a complete, valid distillation cache (message says why and the fix)."""


class CacheMismatchError(InputError):
    """A cache written for another teacher / tokenizer / dataset / sampling setting; `fields` names them."""

    def __init__(self, message: str, fields: Sequence[str]):
        super().__init__(message)
        self.fields = list(fields)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ----------------------------------------------------------------------------- sampling
def sample_targets(logits: torch.Tensor, K: int, temperature: float = 1.0, mode: str = "sampled",
                   generator: torch.Generator | None = None,
                   chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K targets per row of `logits` [N, V] (already soft-capped): (ids int32 [N, K], probs fp32 [N, K]).

    q = softmax(logits / temperature) in fp32, chunk by chunk over rows. "sampled": K ids drawn
    with replacement from q (torch.multinomial with `generator`), in draw order; "topk": the K
    most likely ids, most likely first. probs = q(id), exact in fp32.
    """
    if mode not in MODES:
        raise ValueError(f"unknown cache mode {mode!r}; expected one of {MODES}.")
    n, vocab = logits.shape
    if not 1 <= K <= (vocab if mode == "topk" else 2**24):
        raise ValueError(f"K={K} must be in [1, {vocab}] for topk, >= 1 for sampled.")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    chunk = chunk_size or default_chunk_size(vocab)
    ids = torch.empty(n, K, dtype=torch.int32, device=logits.device)
    probs = torch.empty(n, K, dtype=torch.float32, device=logits.device)
    for start in range(0, n, chunk):
        q = torch.softmax(logits[start:start + chunk].float() / temperature, dim=-1)
        if mode == "sampled":
            idx = torch.multinomial(q, K, replacement=True, generator=generator)
            p = q.gather(1, idx)
        else:
            p, idx = q.topk(K, dim=-1)
        ids[start:start + chunk] = idx.to(torch.int32)
        probs[start:start + chunk] = p
    return ids, probs


@torch.no_grad()
def teacher_targets(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    positions_mask: torch.Tensor, K: int, temperature: float = 1.0, mode: str = "sampled",
                    generator: torch.Generator | None = None,
                    chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of a causal LM's next-token distributions at the positions of `positions_mask` [B, T].

    The backbone runs once (``model.model``: hidden states [B, T, H]); the selected rows are
    projected through ``model.lm_head.weight`` chunk by chunk ([chunk, V] fp32 at a time, never
    [B, T, V]), soft-capped with ``model.config.final_logit_softcapping`` and sampled by
    :func:`sample_targets`. Returns (ids int32 [P, K], probs fp32 [P, K]), rows in the order of
    ``positions_mask.nonzero()`` (example by example, positions ascending). The model is used
    as it is (call ``.eval()`` first).
    """
    backbone = model.model
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    rows = hidden[positions_mask.to(device=hidden.device, dtype=torch.bool)]
    weight = model.lm_head.weight
    cap = model.config.final_logit_softcapping
    vocab = weight.shape[0]
    chunk = chunk_size or default_chunk_size(vocab)
    ids = torch.empty(rows.shape[0], K, dtype=torch.int32, device=hidden.device)
    probs = torch.empty(rows.shape[0], K, dtype=torch.float32, device=hidden.device)
    buf = torch.empty(max(1, min(chunk, rows.shape[0])), vocab, dtype=torch.float32, device=hidden.device)
    for start in range(0, rows.shape[0], chunk):
        h = rows[start:start + chunk]
        logits = buf[: h.shape[0]]
        _project(h, weight, logits)
        if cap is not None:
            logits.div_(cap).tanh_().mul_(cap)
        ids[start:start + chunk], probs[start:start + chunk] = sample_targets(
            logits, K, temperature, mode, generator, chunk_size=h.shape[0])
    return ids, probs


# ----------------------------------------------------------------------------- fingerprints
def _sha_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _config_for_hash(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "auto_map")}


def _safetensors_header(path: Path) -> tuple[int, bytes]:
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
    h.update(_sha_json(_config_for_hash(json.loads((path / "config.json").read_text()))).encode())
    for file in files:
        size = file.stat().st_size
        length, header = _safetensors_header(file)
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
    h.update(_sha_json(_config_for_hash(model.config.to_dict())).encode())
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


class _TokenHash:
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
    h = _TokenHash()
    for ids in token_sequences:
        h.update(ids)
    return h.hexdigest()


# ----------------------------------------------------------------------------- manifest
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


def _identity(manifest: Mapping) -> dict:
    out = {k: manifest.get(k) for k in IDENTITY_FIELDS}
    out["teacher"] = {"fingerprint": (manifest.get("teacher") or {}).get("fingerprint")}  # the name is not identity
    return out


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
        raise CacheError(f"{path} cannot be read: {err}. Rebuild the cache.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a gemma_hf distillation cache manifest (format {FORMAT!r}).")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path} has format_version {manifest.get('format_version')!r}; this gemma_hf reads "
                         f"version {FORMAT_VERSION}. Rebuild the cache with this version.")
    missing = [k for k in (*IDENTITY_FIELDS, "shards", "complete") if k not in manifest]
    if missing or not isinstance(manifest["shards"], list):
        raise CacheError(f"{path} lacks {missing or ['shards']}: the manifest is damaged. Rebuild the cache.")
    return manifest


# ----------------------------------------------------------------------------- shards
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


def _shard_header_info(path: Path) -> dict | None:
    """The shard's metadata, when its size matches its header; None for a partial or foreign file."""
    try:
        length, header_bytes = _safetensors_header(path)
        header = json.loads(header_bytes)
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        if path.stat().st_size != 8 + length + max(ends, default=0):
            return None
        info = json.loads(header["__metadata__"][METADATA_KEY])
        info["_tensors"] = {name: entry for name, entry in header.items() if name != "__metadata__"}
        return info
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _shard_is_valid(info: dict | None, index: int, identity_digest: str, manifest: Mapping) -> bool:
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


def _load_shard(path: Path, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in (names or f.keys())}


def _split(tensors: Mapping[str, torch.Tensor]) -> list[CacheExample]:
    tok, tgt = tensors["token_offsets"].tolist(), tensors["target_offsets"].tolist()
    return [CacheExample(tensors["input_ids"][tok[e]:tok[e + 1]], tensors["positions"][tgt[e]:tgt[e + 1]],
                         tensors["target_ids"][tgt[e]:tgt[e + 1]], tensors["target_probs"][tgt[e]:tgt[e + 1]])
            for e in range(len(tok) - 1)]


def _shard_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"gemma_hf.distill_cache:{seed}:{index}".encode()).digest()[:8], "little")


class CacheWriter:
    """Writes a cache directory shard by shard; atomic per shard, resumable (module docstring).

    ``manifest_fields``: the identity fields (:func:`manifest_fields`). Holds an exclusive lock on
    the directory until :meth:`close` (or the end of a ``with`` block). Typical use::

        with CacheWriter(directory, fields, shard_size) as writer:
            for index, examples in enumerate(shards):
                if not writer.shard_is_complete(index, tokens_sha256=...):
                    gen = writer.generator(index, device)
                    writer.write_shard(index, [CacheExample(...), ...])   # targets drawn with gen
            writer.finish()
    """

    def __init__(self, directory, manifest_fields: Mapping, shard_size: int):
        from gemma_hf.io import exclusive_lock

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
                mismatched = [k for k in IDENTITY_FIELDS if _identity(manifest)[k] != _identity(fields)[k]]
                if mismatched:
                    detail = "; ".join(f"{k}: cache {_identity(manifest)[k]!r}, now {_identity(fields)[k]!r}"
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
            self.identity_digest = _sha_json(_identity(manifest))
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

    def _entry(self, index: int) -> dict | None:
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

        With `tokens_sha256` (:func:`dataset_fingerprint` of the token ids of the examples that
        belong in the shard) and `positions_sha256` (the same hash of their target positions), a
        complete shard holding other ones raises CacheMismatchError: the dataset changed.
        """
        path = self.directory / shard_name(index)
        info = _shard_header_info(path) if path.exists() else None
        if not _shard_is_valid(info, index, self.identity_digest, self.manifest):
            if self._entry(index) is not None:  # recorded, but the file is gone or damaged: rewrite it
                self.manifest["shards"] = [s for s in self.manifest["shards"] if s["index"] != index]
                self._write_manifest()
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
        entry = self._entry(index)
        size = path.stat().st_size
        if entry is None or entry.get("bytes") != size:  # renamed into place, manifest not yet updated
            self._set_entry(self._entry_of(index, info, size, hashlib.sha256(path.read_bytes()).hexdigest()))
        return True

    @staticmethod
    def _entry_of(index: int, info: Mapping, size: int, sha256: str) -> dict:
        return {"index": index, "file": shard_name(index), "num_examples": info["num_examples"],
                "num_positions": info["num_positions"], "num_tokens": info["num_tokens"], "bytes": size,
                "sha256": sha256, "tokens_sha256": info["tokens_sha256"],
                "positions_sha256": info["positions_sha256"], "complete": True}

    def write_shard(self, index: int, examples: Sequence[CacheExample]) -> dict:
        """Write shard `index` atomically (skipped when already complete); returns its manifest entry."""
        if self.shard_is_complete(index):
            return self._entry(index)
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
        tokens, positions = _TokenHash(), _TokenHash()
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
        if dataset_fingerprint is None:
            h = _TokenHash()
            for s in shards:
                t = _load_shard(self.directory / s["file"], ["input_ids", "token_offsets"])
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
        return _split(_load_shard(self.directory / entry["file"]))

    def __iter__(self) -> Iterator[CacheExample]:
        for index in range(self.num_shards):
            examples = self.read_shard(index)[::-1]
            while examples:  # drop each example once handed out: the shard is freed after its last one
                yield examples.pop()

    def batches(self, batch_size: int, pad_token_id: int) -> Iterator[dict]:
        """Collated batches (see :func:`collate`) in cache order; the last one may be smaller."""
        batch = []
        for example in self:
            batch.append(example)
            if len(batch) == batch_size:
                yield collate(batch, pad_token_id, self.mode)
                batch = []
        if batch:
            yield collate(batch, pad_token_id, self.mode)

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


def collate(examples: Sequence[CacheExample], pad_token_id: int, mode: str) -> dict[str, torch.Tensor]:
    """Right-padded batch for :func:`~gemma_hf.distillation.losses.sparse_cross_entropy`:

    input_ids [B, L] int64, attention_mask [B, L], target_ids [B, L, K] int64 and target_weights
    [B, L, K] fp32 (the mode's estimator weights; zeros where no target), target_mask [B, L] bool
    (position t holds a target for token t + 1).
    """
    width = max(int(ex.input_ids.shape[0]) for ex in examples)
    k = examples[0].target_ids.shape[-1]
    b = len(examples)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros(b, width, dtype=torch.int64)
    ids = torch.zeros(b, width, k, dtype=torch.int64)
    weights = torch.zeros(b, width, k, dtype=torch.float32)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for row, ex in enumerate(examples):
        length, pos = int(ex.input_ids.shape[0]), ex.positions.long()
        input_ids[row, :length] = ex.input_ids.long()
        attention_mask[row, :length] = 1
        ids[row, pos] = ex.target_ids.long()
        weights[row, pos] = target_weights(mode, ex.target_probs)
        mask[row, pos] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_ids": ids, "target_weights": weights,
            "target_mask": mask}


# ----------------------------------------------------------------------------- the driver
def example_tokens_and_positions(example: Mapping) -> tuple[list[int], list[int]]:
    """(input_ids, target positions) of a record, in one of three forms:

    {"prompt_ids", "completion_ids"}: positions predicting the completion tokens;
    {"input_ids", "loss_mask" or "assistant_masks"}: positions t with mask[t + 1] set;
    {"input_ids"}: every position but the last.
    """
    if "prompt_ids" in example:
        prompt, completion = list(example["prompt_ids"]), list(example["completion_ids"])
        if not prompt:
            raise ValueError("an example with completion_ids needs a non-empty prompt (at least <bos>).")
        return prompt + completion, list(range(len(prompt) - 1, len(prompt) + len(completion) - 1))
    ids = list(example["input_ids"])
    mask = example.get("loss_mask", example.get("assistant_masks"))
    if mask is None:
        return ids, list(range(len(ids) - 1))
    mask = list(mask)
    if len(mask) != len(ids):
        raise ValueError(f"loss mask has {len(mask)} entries for {len(ids)} tokens.")
    return ids, [t for t in range(len(ids) - 1) if mask[t + 1]]


def _shard_batches(examples: Iterable, shard_size: int) -> Iterator[list[tuple[list[int], list[int]]]]:
    shard = []
    for example in examples:
        shard.append(example_tokens_and_positions(example))
        if len(shard) == shard_size:
            yield shard
            shard = []
    if shard:
        yield shard


def build_cache(teacher, examples: Iterable[Mapping], directory, *, tokenizer, K: int, temperature: float = 1.0,
                mode: str = "sampled", seed: int = 0, shard_size: int = 256, batch_size: int = 8,
                probs_dtype: str = "float16", chunk_size: int | None = None, teacher_name: str | None = None,
                pad_token_id: int | None = None, progress=None) -> dict:
    """Run the teacher over `examples` once and write (or resume) the cache in `directory`.

    teacher: a GemmaHFForCausalLM (put in eval mode for the run; on any device). examples: records
    in a form :func:`example_tokens_and_positions` reads, consumed in order, once. Shards already
    complete are skipped without running the teacher. `progress(index, entry, skipped)` is called
    after each shard. Returns the finished manifest.
    """
    chunk = chunk_size or default_chunk_size(teacher.config.vocab_size)
    fields = manifest_fields(teacher=teacher, tokenizer=tokenizer, K=K, temperature=temperature, mode=mode, seed=seed,
                             vocab_size=teacher.config.vocab_size, probs_dtype=probs_dtype, teacher_name=teacher_name,
                             batch_size=batch_size, chunk_size=chunk)
    if pad_token_id is None:
        pad_token_id = teacher.config.pad_token_id if teacher.config.pad_token_id is not None else 0
    device = teacher.lm_head.weight.device
    was_training = teacher.training
    teacher.eval()
    dataset_hash = _TokenHash()
    try:
        with CacheWriter(directory, fields, shard_size) as writer:
            num_shards = 0
            for index, shard in enumerate(_shard_batches(examples, shard_size)):
                num_shards = index + 1
                shard_tokens, shard_positions = _TokenHash(), _TokenHash()
                for ids, positions in shard:
                    shard_tokens.update(ids)
                    shard_positions.update(positions)
                    dataset_hash.update(ids)
                if writer.shard_is_complete(index, shard_tokens.hexdigest(), shard_positions.hexdigest()):
                    if progress:
                        progress(index, writer._entry(index), True)
                    continue
                generator = writer.generator(index, device)
                written = []
                for start in range(0, len(shard), batch_size):
                    batch = shard[start:start + batch_size]
                    width = max(len(ids) for ids, _ in batch)
                    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.int64)
                    attention_mask = torch.zeros(len(batch), width, dtype=torch.int64)
                    positions_mask = torch.zeros(len(batch), width, dtype=torch.bool)
                    for row, (ids, positions) in enumerate(batch):
                        input_ids[row, :len(ids)] = torch.tensor(ids)
                        attention_mask[row, :len(ids)] = 1
                        positions_mask[row, positions] = True
                    target_ids, probs = teacher_targets(teacher, input_ids.to(device), attention_mask.to(device),
                                                        positions_mask.to(device), K, temperature, mode, generator,
                                                        chunk)
                    target_ids, probs = target_ids.cpu(), probs.cpu()
                    row0 = 0
                    for ids, positions in batch:
                        rows = slice(row0, row0 + len(positions))
                        written.append(CacheExample(torch.tensor(ids, dtype=torch.int32),
                                                    torch.tensor(positions, dtype=torch.int32),
                                                    target_ids[rows], probs[rows]))
                        row0 += len(positions)
                entry = writer.write_shard(index, written)
                if progress:
                    progress(index, entry, False)
            return writer.finish(dataset_hash.hexdigest(), num_shards=num_shards)
    finally:
        if was_training:
            teacher.train()


__all__ = [
    "sample_targets", "teacher_targets", "build_cache", "CacheWriter", "CacheReader", "CacheExample",
    "check_compatible", "collate", "manifest_fields", "read_manifest", "teacher_fingerprint",
    "tokenizer_fingerprint", "dataset_fingerprint", "example_tokens_and_positions", "shard_name",
    "CacheError", "CacheMismatchError", "FORMAT", "FORMAT_VERSION", "MANIFEST", "PROBS_DTYPES",
]
