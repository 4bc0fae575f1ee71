"""Students built from their teacher: a subset of its layers, everything else copied.

A student that keeps teacher layers ``keep_layers = [i_0, i_1, ...]`` (sorted, unique) is the
teacher's config with ``num_hidden_layers = len(keep_layers)`` and ``layer_types`` = the
teacher's types of those layers, so each kept layer keeps its attention kind (sliding window or
global) and with it its RoPE base (``rope_local_base_freq`` for sliding layers, ``rope_theta``
for global ones); every other field is the teacher's. Its tensors are the teacher's: embeddings,
final norm and lm_head as they are, and student layer j = teacher layer i_j, tensor for tensor
(names follow stock transformers, ``model.layers.N.<...>``, so the copy is a renaming of N).

With ``keep_layers`` = all layers the student *is* the teacher (same logits, bit for bit).

Beware layer patterns: Gemma 2 alternates local/global starting local, so ``every_kth(26, 2)``
keeps only local (sliding-window) layers; :func:`student_config` warns when a teacher with
global layers yields a student without any.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from gemma_hf.model.configuration import FULL, GemmaHFConfig
from gemma_hf.model.modeling import GemmaHFForCausalLM

# Config fields that set tensor shapes: a student copying the teacher's tensors must keep them.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "use_qk_norm", "use_post_norms", "attention_bias", "tie_word_embeddings")
# Set from keep_layers, never by an override.
DERIVED_FIELDS = ("num_hidden_layers", "layer_types")
# Bookkeeping of the teacher's config that must not travel to the student's.
_NOT_COPIED = ("_name_or_path", "transformers_version", "model_type", "auto_map")


def every_kth(num_layers: int, k: int) -> list[int]:
    """Every k-th layer starting at the first: [0, k, 2k, ...] (below num_layers)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"every_kth: k must be a positive integer, got {k!r}.")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"every_kth: num_layers must be a positive integer, got {num_layers!r}.")
    return list(range(0, num_layers, k))


def check_keep_layers(keep_layers, num_layers: int) -> list[int]:
    """keep_layers as a list of ints, or ValueError saying what is wrong and what is expected."""
    expected = f"a non-empty, sorted list of distinct teacher layer indices in [0, {num_layers - 1}]"
    try:
        layers = list(keep_layers)
    except TypeError:
        raise ValueError(f"keep_layers must be {expected}, got {keep_layers!r}.") from None
    if not layers:
        raise ValueError(f"keep_layers is empty: a student needs at least one layer; give {expected}.")
    bad = [x for x in layers if not isinstance(x, int) or isinstance(x, bool)]
    if bad:
        raise ValueError(f"keep_layers has non-integer entries {bad}; give {expected}.")
    out = [x for x in layers if not 0 <= x < num_layers]
    if out:
        raise ValueError(f"keep_layers has entries {out} outside the teacher's {num_layers} layers; give {expected}.")
    dupes = sorted({x for x in layers if layers.count(x) > 1})
    if dupes:
        raise ValueError(f"keep_layers repeats layers {dupes}; give {expected}.")
    if layers != sorted(layers):
        raise ValueError(f"keep_layers {layers} is not sorted (the student keeps the teacher's layer order: "
                         f"{sorted(layers)}); give {expected}.")
    return layers


def _teacher_config(teacher) -> GemmaHFConfig:
    if isinstance(teacher, GemmaHFConfig):
        return teacher
    if isinstance(teacher, (str, os.PathLike)):
        return GemmaHFConfig.from_pretrained(str(teacher))
    config = getattr(teacher, "config", None)
    if isinstance(config, GemmaHFConfig):
        return config
    raise TypeError(f"teacher must be a GemmaHFForCausalLM, a GemmaHFConfig or a checkpoint directory, "
                    f"got {type(teacher).__name__}.")


def student_config(teacher, keep_layers, **config_overrides) -> GemmaHFConfig:
    """The student's config: the teacher's (a config, model or directory) with `keep_layers` only.

    `config_overrides` may change any field except the shapes of copied tensors (SHAPE_FIELDS) and
    the layer count and types (set from keep_layers); those raise ValueError naming the field.
    """
    config = _teacher_config(teacher)
    layers = check_keep_layers(keep_layers, config.num_hidden_layers)
    for name in config_overrides:
        if name in DERIVED_FIELDS:
            raise ValueError(f"{name} cannot be overridden: it follows from keep_layers.")
        if name in SHAPE_FIELDS and config_overrides[name] != getattr(config, name):
            raise ValueError(f"{name}={config_overrides[name]!r} differs from the teacher's "
                             f"{getattr(config, name)!r}: the student copies the teacher's tensors, so their shapes "
                             "must stay.")
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_COPIED}
    fields.update(config_overrides)
    fields["num_hidden_layers"] = len(layers)
    fields["layer_types"] = [config.layer_types[i] for i in layers]
    if FULL in config.layer_types and FULL not in fields["layer_types"]:
        warnings.warn(f"keep_layers {layers} keeps no full-attention (global) layer of the teacher: every student "
                      "layer sees only a sliding window. Include at least one global layer (the teacher's are "
                      f"{[i for i, t in enumerate(config.layer_types) if t == FULL]}) unless this is intended.",
                      stacklevel=2)
    return GemmaHFConfig(**fields)


def student_state_dict(teacher_state: dict[str, torch.Tensor], keep_layers: list[int]) -> dict[str, torch.Tensor]:
    """The student's tensors (shared with the teacher's: no copies) under the student's names."""
    source_of = {f"model.layers.{i}.": f"model.layers.{j}." for j, i in enumerate(keep_layers)}
    out = {}
    for name, tensor in teacher_state.items():
        if name.startswith("model.layers."):
            prefix = ".".join(name.split(".")[:3]) + "."
            if prefix not in source_of:
                continue  # a dropped layer
            name = source_of[prefix] + name[len(prefix):]
        out[name] = tensor
    return out


def student_from_teacher(teacher, keep_layers, **config_overrides) -> GemmaHFForCausalLM:
    """A GemmaHFForCausalLM keeping the teacher's layers `keep_layers`, all tensors copied.

    `teacher`: a GemmaHFForCausalLM or a checkpoint directory (ours or stock Gemma, loaded with
    gemma_hf's guarded from_pretrained). The student has the teacher's dtype and attention
    implementation, is in train mode, and shares no storage with the teacher. Its parameter
    counts: :func:`parameter_counts`.
    """
    if isinstance(teacher, (str, os.PathLike)):
        if not Path(teacher).is_dir():
            raise ValueError(f"teacher {teacher} is not a checkpoint directory.")
        teacher = GemmaHFForCausalLM.from_pretrained(str(teacher), dtype="auto")
    if not isinstance(teacher, GemmaHFForCausalLM):
        raise TypeError(f"teacher must be a GemmaHFForCausalLM or a checkpoint directory, got "
                        f"{type(teacher).__name__}.")
    config = student_config(teacher.config, keep_layers, **config_overrides)
    layers = check_keep_layers(keep_layers, teacher.config.num_hidden_layers)
    attn = teacher.config._attn_implementation
    student = GemmaHFForCausalLM._from_config(config, dtype=teacher.dtype,
                                              **({"attn_implementation": attn} if attn else {}))
    state = student_state_dict(teacher.state_dict(), layers)
    with torch.no_grad():
        result = student.load_state_dict(state, strict=False)
    # A tied lm_head may be absent from either side's state dict; nothing else may be.
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    unexpected = [k for k in result.unexpected_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"student_from_teacher: tensors missing {missing}, unexpected {unexpected}.")
    if config.tie_word_embeddings:
        student.tie_weights()
    return student.to(teacher.device).train()


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """{"total": parameters (tied ones once), "embedding": the input embedding's}."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


__all__ = ["student_from_teacher", "student_config", "every_kth", "check_keep_layers", "parameter_counts",
           "student_state_dict", "SHAPE_FIELDS"]
