"""The inputs of a merge: a model directory resolved to its config and tensor index, and the checks
that a set of them can be averaged at all. Nothing here reads tensor data.

An input is a directory holding ``config.json`` and safetensors weights (``model.safetensors`` or
a sharded ``model.safetensors.index.json``, preferred in that order as transformers does):

- a gemma_hf checkpoint (model_type ``gemma_hf``) or a stock transformers Gemma checkpoint
  (``gemma``, ``gemma2``, ``gemma3_text``); the tensor names are the same in both;
- a finished gemma-hf run directory: its root holds the final (for LoRA runs: merged) model next
  to recipe.yaml, run.json, metrics.jsonl, plots/, checkpoints/ and adapter/; the root weights are used;
- a Trainer checkpoint (``RUN/checkpoints/checkpoint-N``) of a full fine-tune.

Refused, each with the reason and what to do instead: pickle weights (``pytorch_model.bin``), a
LoRA adapter directory (``adapter_config.json`` without ``config.json``), an unfinished run,
files that are not directories, other model types.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..model.configuration import STOCK_MODEL_TYPES, GemmaHFConfig
from ..model.safety import PICKLE_SUFFIXES
from ..references import CAUSAL_LM, SEQUENCE_CLASSIFICATION, head_of_config
from ..rundir import RunDir
from .safetensors_stream import FLOAT_DTYPES, SafetensorsFormatError, TensorInfo, read_header

__all__ = [
    "MergeError",
    "IncompatibleModelsError",
    "ModelSource",
    "open_model",
    "check_compatible",
    "ARCHITECTURE_FIELDS",
    "TIED_HEAD",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The tensor that save_pretrained drops when the config ties it to the input embedding.
TIED_HEAD = "lm_head.weight"
# Config properties that must agree for two checkpoints to be averaged: the shapes, and the
# numerics a weight's meaning depends on. Compared after converting stock configs to ours, and as
# derived values where two spellings mean the same (query_pre_attn_scalar None = head_dim).
ARCHITECTURE_FIELDS = (
    "family", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_activation", "layer_types", "sliding_window",
    "attn_logit_softcapping", "final_logit_softcapping", "attention_scale", "use_post_norms", "use_qk_norm",
    "rope_theta", "local_rope_theta", "rope_linear_factor", "tie_word_embeddings", "rms_norm_eps",
    "attention_bias", "head",
)


class MergeError(InputError):
    """The inputs or parameters of a merge are unusable; nothing was written (the CLI exits 2)."""


class IncompatibleModelsError(MergeError):
    """The inputs differ in architecture, tensor names, shapes or dtypes."""


@dataclass
class ModelSource:
    """One input of a merge: where it is, what it is, and where each of its tensors lies."""

    path: Path
    kind: str  # "checkpoint" or "run directory"
    config: dict  # config.json as written
    gemma_config: GemmaHFConfig
    tensors: dict[str, TensorInfo]  # the tensors to merge, in the files' order
    weight_files: list[Path]
    index_file: Path | None
    dropped: list[str] = field(default_factory=list)  # tied copies present in the files, not merged

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def where(self, name: str) -> str:
        """'DIR/FILE' of tensor `name`, for messages."""
        info = self.tensors.get(name)
        return f"{self.path}/{info.path.name}" if info else str(self.path)

    def describe(self) -> dict:
        """What merge.json records about this input."""
        out = {
            "path": str(self.path),
            "kind": self.kind,
            "model_type": self.config.get("model_type"),
            "weight_files": {p.name: p.stat().st_size for p in self.weight_files},
        }
        if self.index_file is not None:
            out["index_sha256"] = hashlib.sha256(self.index_file.read_bytes()).hexdigest()
        if self.dropped:
            out["ignored_tied_tensors"] = list(self.dropped)
        return out


def _head(config: dict) -> str:
    # Merges compare the two heads we train; any other architecture counts as a causal LM, as before.
    return SEQUENCE_CLASSIFICATION if head_of_config(config) == SEQUENCE_CLASSIFICATION else CAUSAL_LM


def architecture_of(source: ModelSource) -> dict:
    cfg = source.gemma_config
    return {name: (_head(source.config) if name == "head" else getattr(cfg, name)) for name in ARCHITECTURE_FIELDS}


def _refuse_non_model(path: Path) -> None:
    """config.json is missing: say what the directory is instead."""
    run = RunDir(path)
    if (path / "adapter_config.json").is_file():
        raise MergeError(
            f"{path} is a LoRA adapter (adapter_config.json, no config.json), not a model: merging averages "
            "full weights. Merge the run directory's root instead (a finished LoRA run keeps the merged model "
            "there and the adapter in adapter/), or fold the adapter into its base first "
            "(peft: PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(DIR))."
        )
    if run.state() == "unfinished":
        raise MergeError(
            f"{path} is an unfinished gemma-hf run (no {run.run_json.name} yet, so no final model). Finish it "
            f"with --resume, or merge one of its complete checkpoints ({run.checkpoints}/checkpoint-N)."
        )
    raise MergeError(f"{path} is not a model directory: it has no config.json.")


def _weight_layout(path: Path) -> tuple[list[Path], Path | None, dict[str, str] | None]:
    """(weight files, index file, index weight map) of a model directory, or a refusal."""
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE], None, None
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise MergeError(f"{index} is not a valid safetensors index ({err!r}).") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise MergeError(f"{index} lists shard {missing[0]}, which is missing from {path}.")
        return [path / f for f in files], index, weight_map
    pickles = sorted(p.name for p in path.iterdir() if p.is_file() and (p.name.endswith(PICKLE_SUFFIXES)
                                                                         or p.name.endswith(".bin.index.json")))
    if pickles:
        raise MergeError(
            f"refusing pickle weights in {path} ({', '.join(pickles)}): merging reads safetensors only, since "
            "unpickling can execute arbitrary code the file carries. If you trust the file, convert it once: "
            "GemmaHFForCausalLM.from_pretrained(DIR, allow_pickle=True).save_pretrained(NEW_DIR)."
        )
    raise MergeError(f"{path} has config.json but no {SINGLE_FILE} or {INDEX_FILE}.")


def open_model(path: str | os.PathLike) -> ModelSource:
    """Resolve an input directory into a ModelSource (config, tensor index), or raise MergeError."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise MergeError(f"{path} does not exist.")
    if not path.is_dir():
        raise MergeError(f"{path} is a file; merging takes model directories (config.json + safetensors weights).")
    if not (path / "config.json").is_file():
        _refuse_non_model(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as err:
        raise MergeError(f"{path}/config.json is not valid JSON ({err}).") from None
    model_type = config.get("model_type")
    known = (GemmaHFConfig.model_type, *STOCK_MODEL_TYPES)
    if model_type not in known:
        raise MergeError(f"{path} has model_type={model_type!r}; merging supports Gemma checkpoints ({', '.join(known)}).")
    try:
        gemma_config = GemmaHFConfig.from_dict({k: v for k, v in config.items() if k not in ("auto_map",)})
    except (ValueError, TypeError, KeyError) as err:
        raise MergeError(f"{path}/config.json: {err}") from None

    files, index, weight_map = _weight_layout(path)
    headers = {}
    for file in files:
        try:
            headers[file.name] = read_header(file)[0]
        except (SafetensorsFormatError, OSError) as err:
            raise MergeError(str(err)) from None
    tensors: dict[str, TensorInfo] = {}
    if weight_map is None:
        tensors = dict(headers[files[0].name])
    else:
        for name, file in weight_map.items():
            if name not in headers[file]:
                raise MergeError(f"{index} maps {name!r} to {file}, which does not hold it.")
            tensors[name] = headers[file][name]
    # Read in file order (sequential I/O), whatever order the index lists.
    tensors = dict(sorted(tensors.items(), key=lambda kv: (kv[1].path.name, kv[1].offset)))
    dropped = []
    if gemma_config.tie_word_embeddings and TIED_HEAD in tensors:
        # The config ties the head to the embedding: transformers re-ties on load and never reads
        # this copy, so it is not merged, and the output omits it (as save_pretrained does).
        del tensors[TIED_HEAD]
        dropped.append(TIED_HEAD)
    kind = "run directory" if RunDir(path).is_finished() else "checkpoint"
    return ModelSource(path, kind, config, gemma_config, tensors, files, index, dropped)


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def check_compatible(sources: list[ModelSource], *, mixed_dtypes: bool = False) -> None:
    """Raise IncompatibleModelsError naming the first difference between sources[0] and another
    input: an architecture field, a tensor name, a shape, or (unless `mixed_dtypes`) a dtype.
    Every tensor must be floating point."""
    first = sources[0]
    arch = architecture_of(first)
    for other in sources[1:]:
        theirs = architecture_of(other)
        for name in ARCHITECTURE_FIELDS:
            if arch[name] != theirs[name]:
                raise IncompatibleModelsError(
                    f"the models have different architectures: {name} is {arch[name]!r} in {first.config_path} "
                    f"but {theirs[name]!r} in {other.config_path}. Only checkpoints of one architecture (e.g. "
                    "fine-tunes of the same base) can be averaged."
                )
    names = set(first.tensors)
    for other in sources[1:]:
        theirs = set(other.tensors)
        if theirs != names:
            only_first, only_other = sorted(names - theirs), sorted(theirs - names)
            count = len(only_first) + len(only_other)
            if only_first:
                what = f"tensor {only_first[0]!r} is in {first.where(only_first[0])} but not in {other.path}"
            else:
                what = f"tensor {only_other[0]!r} is in {other.where(only_other[0])} but not in {first.path}"
            raise IncompatibleModelsError(f"the models hold different tensors ({count} names differ): {what}.")
    for name, info in first.tensors.items():
        if not info.is_float:
            raise IncompatibleModelsError(
                f"tensor {name!r} in {first.where(name)} has dtype {info.dtype}; only floating-point tensors "
                f"({', '.join(FLOAT_DTYPES)}) can be averaged."
            )
        for other in sources[1:]:
            theirs = other.tensors[name]
            if theirs.shape != info.shape:
                raise IncompatibleModelsError(
                    f"tensor {name!r} has shape {_shape(info.shape)} in {first.where(name)} but "
                    f"{_shape(theirs.shape)} in {other.where(name)}."
                )
            if not theirs.is_float:
                raise IncompatibleModelsError(
                    f"tensor {name!r} in {other.where(name)} has dtype {theirs.dtype}; only floating-point "
                    "tensors can be averaged."
                )
            if theirs.dtype != info.dtype and not mixed_dtypes:
                raise IncompatibleModelsError(
                    f"tensor {name!r} is stored as {info.dtype} in {first.where(name)} but {theirs.dtype} in "
                    f"{other.where(name)}. Choose the output dtype explicitly (--dtype / dtype=) to merge "
                    "checkpoints saved in different precisions."
                )
