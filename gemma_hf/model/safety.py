"""Safe, loud checkpoint loading for the gemma_hf model classes.

Two guards wrap `PreTrainedModel.from_pretrained` (see `guarded_from_pretrained`):

1. **No pickle by default.** Weights load from safetensors only. A directory that holds only
   pickle weights (`pytorch_model.bin`, `*.pt`, ...) is refused with the reason -- unpickling
   can execute arbitrary code that the file carries -- and the explicit opt-in
   (`allow_pickle=True`). For a Hub repository id we cannot look inside before downloading, so
   we pass `use_safetensors=True` to transformers, which then never fetches a pickle file.
2. **Mismatches are errors that name the tensor and both shapes.** transformers 5 logs a table
   and raises a generic RuntimeError for shape mismatches, and only logs missing or unexpected
   tensors (the model then runs with randomly initialised weights). Here every mismatched,
   missing or unexpected tensor is listed in the exception itself, with a hint at the config
   field that sets that shape; a 256128 vs 256000 embedding (the Gemma vocabulary padding)
   gets its own explanation. A new classification head (`score.*`) may be missing and a
   dropped head (`lm_head.*` / `score.*`) may be unexpected: that is what loading a causal LM
   into a reward model (or back) means.

This file is part of the remote-code bundle written next to saved checkpoints: it imports
nothing from gemma_hf (see DESIGN.md, "Remote code"), so checkpoints loaded with
`trust_remote_code=True` get the same guards.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "UnsafeCheckpointError",
    "CheckpointMismatchError",
    "PICKLE_SUFFIXES",
    "REPORT_GEMMA_VOCAB",
    "HF_GEMMA_VOCAB",
    "check_safe_checkpoint",
    "check_loading_info",
    "guarded_from_pretrained",
]

# Weight files that are Python pickles (torch.save), in the names transformers and PEFT use.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files in a checkpoint directory that hold no weights even though their suffix says pickle.
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}

# The Gemma 1/2 vocabulary: 256000 rows in Hugging Face checkpoints, 256128 in the reports'
# Table 2 (the original, padded embedding). Kept here, not imported, because this file
# travels as remote code.
HF_GEMMA_VOCAB = 256000
REPORT_GEMMA_VOCAB = 256128

# Heads that may be absent from (missing) or left over in (unexpected) a checkpoint: a causal LM
# checkpoint loaded into a sequence classifier gets a fresh `score`, and drops `lm_head` when it
# is untied; a reward model loaded as a causal LM drops its `score`.
_NEW_HEAD_KEYS = ("score.weight", "score.bias")
_DROPPED_HEAD_KEYS = ("score.weight", "score.bias", "lm_head.weight", "lm_head.bias")


class UnsafeCheckpointError(ValueError):
    """A checkpoint would have to be unpickled to load, and nobody opted in."""


class CheckpointMismatchError(ValueError):
    """Checkpoint tensors do not fit the model built from the config (shape, missing, unexpected)."""


# ---------------------------------------------------------------------------------------------
# 1. Pickle refusal


def _pickle_weight_files(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    found = []
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if not entry.is_file() or name in _NOT_WEIGHTS:
            continue
        if name.endswith(PICKLE_SUFFIXES) or name.endswith(".bin.index.json"):
            found.append(name)
    return found


def _has_safetensors(directory: Path) -> bool:
    return directory.is_dir() and any(
        p.name.endswith(".safetensors") or p.name.endswith(".safetensors.index.json") for p in directory.iterdir()
    )


def _pickle_refusal(where: str, files: Iterable[str]) -> UnsafeCheckpointError:
    shown = ", ".join(files)
    return UnsafeCheckpointError(
        f"refusing to load pickle weights from {where} ({shown}): unpickling a file can execute "
        "arbitrary code that the file carries, so gemma_hf loads safetensors only by default "
        "(torch.load(weights_only=True) narrows that risk but has had bypasses). If you trust the "
        "file's origin, opt in explicitly with from_pretrained(..., allow_pickle=True) -- better, "
        "do that once and re-save with save_pretrained(), which writes model.safetensors."
    )


def check_safe_checkpoint(
    pretrained_model_name_or_path: str | os.PathLike | None,
    use_safetensors: bool | None = None,
    allow_pickle: bool = False,
    subfolder: str = "",
) -> bool | None:
    """Decide how transformers may read weights; return the `use_safetensors` value to pass on.

    - `allow_pickle=True`: the caller opted in; `use_safetensors` is returned unchanged.
    - `use_safetensors=False` without the opt-in: refused (it asks for pickle weights).
    - A local directory with safetensors weights: `True`.
    - A local directory (or file) with only pickle weights: refused with UnsafeCheckpointError,
      naming the files, the reason and the opt-in.
    - Anything else (a Hub repository id, a directory without weights): `True`, so transformers
      never falls back to downloading or reading a pickle file.
    """
    if allow_pickle:
        return use_safetensors
    where = str(pretrained_model_name_or_path)
    if use_safetensors is False:
        raise UnsafeCheckpointError(
            f"use_safetensors=False asks transformers to read pickle weights from {where}; unpickling "
            "can execute arbitrary code, so gemma_hf refuses that by default. Pass allow_pickle=True "
            "as well if you trust the file's origin."
        )
    if pretrained_model_name_or_path is None:
        return True
    path = Path(pretrained_model_name_or_path)
    if path.is_file():
        if path.name.endswith(PICKLE_SUFFIXES):
            raise _pickle_refusal(where, [path.name])
        return True
    directory = path / subfolder if subfolder else path
    if directory.is_dir() and not _has_safetensors(directory):
        pickles = _pickle_weight_files(directory)
        if pickles:
            raise _pickle_refusal(str(directory), pickles)
    return True


# ---------------------------------------------------------------------------------------------
# 2. Precise mismatch errors

_SHAPE_HINTS = (
    # (substring of the tensor name, what sets its shape)
    ("embed_tokens", "rows = vocab_size, columns = hidden_size"),
    ("lm_head", "rows = vocab_size, columns = hidden_size"),
    ("q_proj", "rows = num_attention_heads * head_dim, columns = hidden_size"),
    ("k_proj", "rows = num_key_value_heads * head_dim, columns = hidden_size"),
    ("v_proj", "rows = num_key_value_heads * head_dim, columns = hidden_size"),
    ("o_proj", "rows = hidden_size, columns = num_attention_heads * head_dim"),
    ("q_norm", "length = head_dim"),
    ("k_norm", "length = head_dim"),
    ("gate_proj", "rows = intermediate_size, columns = hidden_size"),
    ("up_proj", "rows = intermediate_size, columns = hidden_size"),
    ("down_proj", "rows = hidden_size, columns = intermediate_size"),
    ("layernorm", "length = hidden_size"),
    ("norm", "length = hidden_size"),
    ("score", "rows = num_labels, columns = hidden_size"),
)


def _shape_hint(name: str) -> str:
    for key, hint in _SHAPE_HINTS:
        if key in name:
            return hint
    return ""


def _shape(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def _vocab_advice(checkpoint_rows: int, model_rows: int) -> str:
    padded = {checkpoint_rows, model_rows} == {HF_GEMMA_VOCAB, REPORT_GEMMA_VOCAB}
    lines = [
        f"The embedding has {checkpoint_rows} rows in the checkpoint but the config asks for "
        f"vocab_size={model_rows}."
    ]
    if padded:
        lines.append(
            f"{REPORT_GEMMA_VOCAB} is the original, padded Gemma vocabulary (the reports' Table 2); "
            f"Hugging Face checkpoints and tokenizers use {HF_GEMMA_VOCAB} rows, and the extra "
            f"{REPORT_GEMMA_VOCAB - HF_GEMMA_VOCAB} rows hold no token."
        )
    lines.append(
        f"Load the checkpoint with its own size (from_pretrained(path, vocab_size={checkpoint_rows})), then "
        f"resize exactly with gemma_hf.convert.resize_vocab(model, {model_rows}), which "
        + ("trims only rows that no token uses." if checkpoint_rows > model_rows else "pads with zero rows.")
    )
    return " ".join(lines)


def check_loading_info(
    info: dict,
    where: str,
    model_class: str,
    strict: bool = True,
) -> None:
    """Raise CheckpointMismatchError for what `output_loading_info` reports as wrong.

    `info` is transformers' loading info (`missing_keys`, `unexpected_keys`, `mismatched_keys`
    with `(name, checkpoint_shape, model_shape)` triples). Shape mismatches always raise here;
    missing and unexpected tensors raise when `strict`, except a new / dropped head.
    """
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda t: t[0])
    missing = sorted(k for k in info.get("missing_keys") or () if k not in _NEW_HEAD_KEYS)
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if k not in _DROPPED_HEAD_KEYS)
    if not mismatched and not (strict and (missing or unexpected)):
        return

    lines = [f"checkpoint {where} does not fit {model_class} built from its config:"]
    vocab_rows = None
    for name, checkpoint_shape, model_shape in mismatched:
        hint = _shape_hint(name)
        lines.append(
            f"  - {name}: checkpoint shape {_shape(checkpoint_shape)}, model shape {_shape(model_shape)}"
            + (f"  [{hint}]" if hint else "")
        )
        is_vocab = ("embed_tokens" in name or "lm_head" in name) and len(checkpoint_shape) == 2
        if is_vocab and checkpoint_shape[1] == model_shape[1] and checkpoint_shape[0] != model_shape[0]:
            vocab_rows = (int(checkpoint_shape[0]), int(model_shape[0]))
    if strict:
        for name in missing:
            lines.append(f"  - {name}: missing from the checkpoint (it would be randomly initialised)")
        for name in unexpected:
            lines.append(f"  - {name}: in the checkpoint but not in the model (it would be dropped)")
    if vocab_rows is not None:
        lines.append(_vocab_advice(*vocab_rows))
    if mismatched:
        lines.append(
            "A config passed to from_pretrained (or config overrides) must describe the checkpoint's "
            "shapes; pass ignore_mismatched_sizes=True only if you really want those tensors re-initialised."
        )
    if strict and (missing or unexpected):
        lines.append(
            "If this is intended (e.g. a partial checkpoint), pass strict=False to load anyway."
        )
    raise CheckpointMismatchError("\n".join(lines))


def guarded_from_pretrained(
    load: Callable,
    pretrained_model_name_or_path,
    *model_args,
    allow_pickle: bool = False,
    strict: bool = True,
    model_class: str = "the model",
    **kwargs,
):
    """Run transformers' `from_pretrained` (`load`) behind both guards.

    Extra keyword arguments (popped before transformers sees them):
      allow_pickle: permit pickle weights (`pytorch_model.bin`); off by default.
      strict: raise on missing / unexpected tensors (a new or dropped head excepted); on by default.
    Everything else is transformers' own. With `ignore_mismatched_sizes=True` the caller accepts
    re-initialised tensors, and shape mismatches are left to transformers' report.
    """
    if kwargs.get("gguf_file") is not None:
        raise ValueError(
            f"{model_class}.from_pretrained(..., gguf_file=...) is not supported: transformers maps GGUF tensor "
            "names through the stock model types only. Use gemma_hf.convert.load_gguf(path) (or `gemma-hf export "
            "--to gemma_hf FILE.gguf DST`), which dequantises through the stock class and corrects the config "
            "from the GGUF metadata."
        )
    forced_safetensors = False
    if kwargs.get("state_dict") is None:
        use = check_safe_checkpoint(
            pretrained_model_name_or_path,
            use_safetensors=kwargs.get("use_safetensors"),
            allow_pickle=allow_pickle,
            subfolder=kwargs.get("subfolder") or "",
        )
        forced_safetensors = use is True and kwargs.get("use_safetensors") is None
        kwargs["use_safetensors"] = use

    wants_info = bool(kwargs.pop("output_loading_info", False))
    user_ignores_sizes = bool(kwargs.get("ignore_mismatched_sizes", False))
    # Let transformers finish loading even on a mismatch, so that we can name every offender.
    kwargs["ignore_mismatched_sizes"] = True
    try:
        model, info = load(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
    except OSError as err:
        is_remote = pretrained_model_name_or_path is not None and not Path(pretrained_model_name_or_path).exists()
        if forced_safetensors and is_remote:
            err.add_note(
                "gemma_hf loads safetensors weights only (unpickling can execute arbitrary code). If this "
                "repository has only pytorch_model.bin and you trust it, pass allow_pickle=True."
            )
        raise
    check_loading_info(
        {**info, "mismatched_keys": () if user_ignores_sizes else info.get("mismatched_keys")},
        where=str(pretrained_model_name_or_path if pretrained_model_name_or_path is not None else "state_dict"),
        model_class=model_class,
        strict=strict,
    )
    return (model, info) if wants_info else model
