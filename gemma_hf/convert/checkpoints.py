"""Checkpoint directories: atomic saves, checking what was written, and whole-directory conversion.

- `save_pretrained_atomic`: `save_pretrained` into a temporary sibling, renamed when complete.
- `verify_saved_tensors`: the safetensors in a directory hold exactly a model's tensors, bit for bit.
- `export_to_transformers`: a gemma_hf checkpoint directory -> a stock one (no remote code).
- `import_checkpoint`: a stock directory or a GGUF file -> a gemma_hf checkpoint directory.

Every export and import writes through :func:`gemma_hf.io.atomic_directory` and verifies the
tensors it wrote before the directory gets its final name.
"""

from __future__ import annotations

import json
import struct
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..io import atomic_directory, existing_output_refusal
from ..model import GemmaHFConfig, GemmaHFForCausalLM, GemmaHFForSequenceClassification
from ..model.configuration import STOCK_MODEL_TYPES, gemma_family
from .errors import ConversionError
from .gguf_import import load_gguf
from .stock import to_stock_model

log = logging.getLogger(__name__)

# Files a tokenizer (and generation defaults) may be spread over; copied verbatim on export.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"

_HEADS = {
    "GemmaHFForCausalLM": GemmaHFForCausalLM,
    "GemmaHFForSequenceClassification": GemmaHFForSequenceClassification,
}


def save_pretrained_atomic(
    model,
    save_directory: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
    **save_kwargs,
) -> Path:
    """`model.save_pretrained` (and `tokenizer.save_pretrained`) into a temporary sibling directory,
    renamed to `save_directory` only when everything is written: an interrupted save leaves a
    `.NAME.tmp-*` directory, never a `save_directory` that looks complete.

    An existing `save_directory` is an error unless `overwrite=True` (then it is replaced
    whole, not merged). `save_kwargs` go to `save_pretrained` (e.g. `max_shard_size`).
    Pickle serialisation is refused: the output is safetensors.
    """
    if save_kwargs.get("safe_serialization") is False:
        raise ValueError("save_pretrained_atomic writes safetensors only; drop safe_serialization=False.")
    final = Path(save_directory)
    with atomic_directory(final, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return final


def _saved_tensor_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConversionError(f"{directory} holds no model.safetensors or model.safetensors.index.json.")


def verify_saved_tensors(directory: str | os.PathLike, model: nn.Module) -> int:
    """Check that the safetensors in `directory` hold exactly `model`'s tensors (names, shapes,
    dtypes, values bit for bit). Tied copies may be absent from the files. Returns the count."""
    from safetensors import safe_open

    directory = Path(directory)
    expected = model.state_dict()
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    seen = set()
    problems = []
    for file in _saved_tensor_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                seen.add(name)
                if name not in expected:
                    problems.append(f"{name}: in {file.name} but not in the model")
                    continue
                saved, ours = f.get_tensor(name), expected[name]
                if saved.shape != ours.shape or saved.dtype != ours.dtype:
                    problems.append(
                        f"{name}: saved {tuple(saved.shape)} {saved.dtype}, model {tuple(ours.shape)} {ours.dtype}"
                    )
                elif not torch.equal(saved, ours.detach().cpu()):
                    problems.append(f"{name}: values differ")
    for name in sorted(set(expected) - seen - tied):
        problems.append(f"{name}: missing from the saved files")
    if problems:
        raise ConversionError(f"{directory}: saved tensors do not match the model:\n  " + "\n  ".join(problems))
    return len(seen)


def copy_side_files(src: Path, dst: Path, names) -> list[str]:
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise ConversionError(f"{directory} is not a checkpoint directory: it has no config.json.")
    return json.loads(path.read_text())


def head_class(config: dict) -> type:
    """Our head class for a checkpoint's config dict (from its `architectures`; causal LM by default)."""
    for arch in config.get("architectures") or ():
        if arch in _HEADS:
            return _HEADS[arch]
        if arch.endswith("ForSequenceClassification"):
            return GemmaHFForSequenceClassification
    return GemmaHFForCausalLM


def _load(model_class: type, src: Path, **kwargs):
    """from_pretrained, with a config.json that has wrong types or fields refused as a ConversionError."""
    try:
        return model_class.from_pretrained(src, **kwargs)
    except ConversionError:
        raise
    except (ValueError, TypeError, KeyError) as err:
        if type(err).__name__ in ("CheckpointMismatchError", "UnsafeCheckpointError"):
            raise
        raise ConversionError(f"cannot load {src}: {err}") from None


def check_paths(src: Path, dst: Path) -> None:
    """Refuse a destination that would destroy the source or a run: the same directory, one inside
    the other (overwriting a parent deletes its child), or a gemma-hf run directory."""
    source, target = src.resolve(), dst.resolve()
    if target == source or source in target.parents or target in source.parents:
        raise ConversionError(f"the destination {dst} {'is' if target == source else 'overlaps'} the source {src}; "
                              "writing it would delete the source. Choose a destination outside it.")
    if (target / "run.json").is_file():
        raise ConversionError(f"{dst} is a finished gemma-hf run directory; an export never replaces a run. Choose "
                              "a new destination.")


def check_complete_weights(src: Path) -> None:
    """Every safetensors file of a checkpoint directory is whole (not cut by a kill or a full disk)."""
    from ..rundir import safetensors_complete, weight_files

    files = [f for f in weight_files(src) if f.endswith(".safetensors")]
    broken = [f for f in files if not (src / f).is_file() or not safetensors_complete(src / f)]
    if not files and not any(src.glob("*.bin")):
        raise ConversionError(f"{src} has no weights (model.safetensors, or an index and its shards).")
    if broken:
        raise ConversionError(f"{src}: {', '.join(broken)} {'is' if len(broken) == 1 else 'are'} missing, truncated or "
                              "corrupt (not a whole safetensors file); re-save or re-download the checkpoint.")


def export_to_transformers(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_size: str | int | None = None,
) -> Path:
    """Write the gemma_hf checkpoint `src` as a stock checkpoint `dst`.

    `dst` gets the stock model_type (gemma, gemma2 or gemma3_text; config from
    `to_stock_dict()`), the same tensors in the same dtype (verified bit for bit after writing),
    the tokenizer files and `generation_config.json` of `src`, and no remote code: it loads with
    plain `AutoModelForCausalLM.from_pretrained(dst)` where gemma_hf is not installed.
    The head follows `src` (causal LM or sequence classification).
    """
    src, dst = Path(src), Path(dst)
    check_paths(src, dst)
    config = read_config(src)
    model_type = config.get("model_type")
    if model_type in STOCK_MODEL_TYPES:
        raise ConversionError(f"{src} is already a stock {model_type!r} checkpoint; nothing to export.")
    if model_type != GemmaHFConfig.model_type:
        raise ConversionError(f"{src} has model_type={model_type!r}; expected a gemma_hf checkpoint ('gemma_hf').")
    refusal = existing_output_refusal(dst, overwrite, "overwrite=True (--overwrite)")
    if refusal:  # before any loading: an overwrite replaces only an empty or a model directory
        raise FileExistsError(refusal)
    check_complete_weights(src)
    model_class = head_class(config)
    ours = _load(model_class, src, dtype="auto", attn_implementation="eager")
    try:
        stock = to_stock_model(ours)
    except ValueError as err:
        raise ConversionError(f"{src} cannot be written as a stock checkpoint: {err}") from err
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        stock.save_pretrained(tmp, **save_kwargs)
        copy_side_files(src, tmp, (*TOKENIZER_FILES, GENERATION_CONFIG))
        written = json.loads((tmp / "config.json").read_text())
        if "auto_map" in written or written.get("model_type") != gemma_family(ours.config.family).stock_model_type:
            raise ConversionError(f"export wrote an unexpected config: model_type={written.get('model_type')!r}")
        verify_saved_tensors(tmp, ours)
    log.info("exported %s (%s) to %s (%s)", src, model_class.__name__, dst, type(stock).__name__)
    return dst


def import_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    head: str = "causal-lm",
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    max_shard_size: str | int | None = None,
) -> Path:
    """Write `src` (a stock gemma/gemma2/gemma3_text directory, a gemma_hf directory, or a GGUF
    file / directory holding one) as a gemma_hf checkpoint `dst`: our config (model_type
    gemma_hf, auto_map + code for trust_remote_code), safetensors weights verified bit for bit,
    tokenizer and generation_config. `head`: "causal-lm" or "sequence-classification"."""
    src, dst = Path(src), Path(dst)
    check_paths(src, dst)
    if head not in ("causal-lm", "sequence-classification"):
        raise ValueError(f"head must be 'causal-lm' or 'sequence-classification', got {head!r}.")
    model_class = GemmaHFForCausalLM if head == "causal-lm" else GemmaHFForSequenceClassification
    refusal = existing_output_refusal(dst, overwrite, "overwrite=True (--overwrite)")
    if refusal:  # before any loading: an overwrite replaces only an empty or a model directory
        raise FileExistsError(refusal)
    is_gguf = gguf_file is not None or src.suffix == ".gguf" or (src.is_dir() and not (src / "config.json").exists()
                                                                  and any(src.glob("*.gguf")))
    tokenizer = None
    side_files_from = None
    if is_gguf:
        try:
            model, tokenizer = load_gguf(
                src, gguf_file, model_class=model_class, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
                return_tokenizer=True,
            )
        except (ValueError, IndexError, KeyError, struct.error) as err:
            if isinstance(err, ConversionError):
                raise
            raise ConversionError(f"cannot read the GGUF file {src}{'/' + gguf_file if gguf_file else ''}: {err}. It is "
                                  "truncated, corrupt or not a GGUF file; fetch it again.") from None
    else:
        config = read_config(src)
        if config.get("model_type") not in (*STOCK_MODEL_TYPES, GemmaHFConfig.model_type):
            raise ConversionError(
                f"{src} has model_type={config.get('model_type')!r}; expected gemma, gemma2, gemma3_text or gemma_hf."
            )
        check_complete_weights(src)
        model = _load(model_class, src, dtype=dtype or "auto", attn_implementation="eager")
        side_files_from = src
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp, (*TOKENIZER_FILES, GENERATION_CONFIG))
        verify_saved_tensors(tmp, model)
    return dst
