"""Checkpoints in and out of gemma_hf: stock transformers, GGUF, vocabulary resizing, atomic saves.

=======================================  ==================================================================
function                                 what it does
=======================================  ==================================================================
``to_stock_model(model)``                our model -> stock ``Gemma/Gemma2/Gemma3ForCausalLM`` (or
                                         ``...ForSequenceClassification``) holding the same tensors
``from_stock_model(stock)``              the reverse, into ``GemmaHFForCausalLM`` / ``...ForSequenceClassification``
``export_to_transformers(src, dst)``     a gemma_hf checkpoint directory -> a stock checkpoint directory that
                                         loads in plain transformers (no gemma_hf, no remote code)
``import_checkpoint(src, dst)``          a stock directory or a GGUF file -> a gemma_hf checkpoint directory
``load_gguf(path)``                      a Gemma 2/3 GGUF file, dequantised by transformers, into our classes
``resize_vocab(model, n)``               trim or pad the embedding (and an untied head) to ``n`` rows, exactly
``save_pretrained_atomic(model, dir)``   ``save_pretrained`` into a temporary sibling, renamed when complete
=======================================  ==================================================================

Loading a *stock* checkpoint needs no function here: ``GemmaHFForCausalLM.from_pretrained(stock_dir)``
converts the config (``GemmaHFConfig.from_dict``) and the tensor names already match.

Every export and import writes through :func:`gemma_hf.io.atomic_directory`, and checks what it
wrote (tensor by tensor, bit for bit) before the directory gets its final name.

GGUF notes. transformers dequantises Gemma 2/3 GGUF files but reads only part of their metadata:
it ignores the soft-caps and RoPE scaling written by llama.cpp's converter, and GGUF carries no
query scale at all (llama.cpp derives it from the model size). :func:`load_gguf` reads those keys
itself and applies llama.cpp's rules, with a warning whenever the result differs from what stock
transformers would have built; see :func:`gguf_config_fixups`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .io import atomic_directory
from .model import GemmaHFConfig, GemmaHFForCausalLM, GemmaHFForSequenceClassification
from .model.configuration import FAMILY_TO_STOCK, FULL, SLIDING, STOCK_MODEL_TYPES, alternating_layer_types
from .model.safety import HF_GEMMA_VOCAB, REPORT_GEMMA_VOCAB, CheckpointMismatchError, check_loading_info

__all__ = [
    "ConversionError",
    "CheckpointMismatchError",
    "VocabResizeError",
    "TOKENIZER_FILES",
    "HF_GEMMA_VOCAB",
    "REPORT_GEMMA_VOCAB",
    "to_stock_model",
    "from_stock_model",
    "export_to_transformers",
    "import_checkpoint",
    "load_gguf",
    "gguf_config_fixups",
    "parse_gguf_once",
    "resize_vocab",
    "save_pretrained_atomic",
    "verify_saved_tensors",
]

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
_STOCK_CAUSAL = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_STOCK_SEQCLS = {
    "gemma": "GemmaForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
    "gemma3_text": "Gemma3TextForSequenceClassification",
}


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked (wrong format, unsupported variant, failed check)."""


class VocabResizeError(ValueError):
    """A vocabulary trim would drop rows that may hold real tokens."""


# ---------------------------------------------------------------------------------------------
# In memory: ours <-> stock, sharing tensors


def _is_seqcls(model: nn.Module) -> bool:
    return isinstance(model, GemmaHFForSequenceClassification) or type(model).__name__.endswith(
        "ForSequenceClassification"
    )


def _state_dict_for(model: nn.Module) -> dict[str, torch.Tensor]:
    # state_dict() shares storage with the parameters: the conversions below copy nothing.
    return dict(model.state_dict())


def to_stock_model(model: GemmaHFForCausalLM | GemmaHFForSequenceClassification):
    """The stock transformers model (gemma / gemma2 / gemma3_text) with exactly our tensors.

    The config comes from `config.to_stock_dict()`, which raises ValueError naming the field if
    the family's stock class cannot express it. Tensors are shared, not copied. Every tensor
    name must match (strict), so a stock class that expects something else fails loudly.
    """
    import transformers

    stock_dict = model.config.to_stock_dict()
    model_type = stock_dict.pop("model_type")
    class_name = (_STOCK_SEQCLS if _is_seqcls(model) else _STOCK_CAUSAL)[model_type]
    stock_dict["architectures"] = [class_name]
    stock_config = transformers.AutoConfig.for_model(model_type, **stock_dict)
    stock, info = getattr(transformers, class_name).from_pretrained(
        None,
        config=stock_config,
        state_dict=_state_dict_for(model),
        dtype=model.dtype,
        attn_implementation=model.config._attn_implementation or "eager",
        output_loading_info=True,
        ignore_mismatched_sizes=True,
    )
    check_loading_info(info, where=f"{type(model).__name__} in memory", model_class=type(stock).__name__)
    if getattr(model, "generation_config", None) is not None:
        stock.generation_config = copy.deepcopy(model.generation_config)
    return stock.train(model.training)


def from_stock_model(stock: nn.Module, model_class: type | None = None):
    """Our model with exactly the tensors of a stock gemma / gemma2 / gemma3_text model (shared)."""
    config_dict = stock.config.to_dict()
    if config_dict.get("model_type") not in STOCK_MODEL_TYPES:
        raise ConversionError(
            f"expected a stock model of type {sorted(STOCK_MODEL_TYPES)}, got model_type={config_dict.get('model_type')!r}."
        )
    for key in ("quantization_config", "_model_name_or_path", "torch_dtype", "auto_map"):
        config_dict.pop(key, None)
    if model_class is None:
        model_class = GemmaHFForSequenceClassification if _is_seqcls(stock) else GemmaHFForCausalLM
    config = GemmaHFConfig.from_dict(config_dict)
    state = _state_dict_for(stock)
    if model_class is GemmaHFForSequenceClassification:
        state.pop("lm_head.weight", None)  # a causal LM becomes a classifier: the LM head goes
    model, info = model_class.from_pretrained(
        None,
        config=config,
        state_dict=state,
        dtype=next(iter(state.values())).dtype,
        attn_implementation=stock.config._attn_implementation or "eager",
        output_loading_info=True,
    )
    check_loading_info(info, where=f"{type(stock).__name__} in memory", model_class=model_class.__name__)
    if getattr(stock, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(stock.generation_config)
    return model.train(stock.training)


# ---------------------------------------------------------------------------------------------
# Saving atomically, and checking what was saved


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


def _copy_side_files(src: Path, dst: Path, names) -> list[str]:
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise ConversionError(f"{directory} is not a checkpoint directory: it has no config.json.")
    return json.loads(path.read_text())


def _head_class(config: dict) -> type:
    for arch in config.get("architectures") or ():
        if arch in _HEADS:
            return _HEADS[arch]
        if arch.endswith("ForSequenceClassification"):
            return GemmaHFForSequenceClassification
    return GemmaHFForCausalLM


# ---------------------------------------------------------------------------------------------
# Export: gemma_hf -> stock transformers


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
    config = _read_config(src)
    model_type = config.get("model_type")
    if model_type in STOCK_MODEL_TYPES:
        raise ConversionError(f"{src} is already a stock {model_type!r} checkpoint; nothing to export.")
    if model_type != GemmaHFConfig.model_type:
        raise ConversionError(f"{src} has model_type={model_type!r}; expected a gemma_hf checkpoint ('gemma_hf').")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it.")
    model_class = _head_class(config)
    ours = model_class.from_pretrained(src, dtype="auto", attn_implementation="eager")
    try:
        stock = to_stock_model(ours)
    except ValueError as err:
        raise ConversionError(f"{src} cannot be written as a stock checkpoint: {err}") from err
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        stock.save_pretrained(tmp, **save_kwargs)
        _copy_side_files(src, tmp, (*TOKENIZER_FILES, GENERATION_CONFIG))
        written = json.loads((tmp / "config.json").read_text())
        if "auto_map" in written or written.get("model_type") != FAMILY_TO_STOCK[ours.config.family]:
            raise ConversionError(f"export wrote an unexpected config: model_type={written.get('model_type')!r}")
        verify_saved_tensors(tmp, ours)
    log.info("exported %s (%s) to %s (%s)", src, model_class.__name__, dst, type(stock).__name__)
    return dst


# ---------------------------------------------------------------------------------------------
# GGUF import


@contextlib.contextmanager
def parse_gguf_once() -> Iterator[None]:
    """Parse each GGUF file once while this context is open.

    transformers builds a fresh `gguf.GGUFReader` for the config, for the tensors and for the
    tokenizer; with a 262k-token vocabulary in the metadata each parse takes tens of seconds on
    a CPU. The reader only reads the file (memory-mapped), so one instance per path serves all
    three. transformers imports `GGUFReader` from `gguf` at call time, which is what this relies
    on; if that changes, loading stays correct and merely parses more than once.
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path, mode="r"):
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _resolve_gguf(path: str | os.PathLike, gguf_file: str | None) -> Path:
    path = Path(path)
    if gguf_file is not None:
        path = path / gguf_file
    elif path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise ConversionError(
                f"{path} holds {len(found)} .gguf files ({', '.join(p.name for p in found) or 'none'}); name one with gguf_file=."
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist.")
    return path


def _gguf_metadata(reader) -> dict:
    """The scalar and short-array metadata of a GGUF reader (tokenizer vocab arrays skipped)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key != "tokenizer.ggml.model":
            continue
        try:
            out[key] = field.contents()
        except Exception:  # exotic types we never need
            continue
    return out


# Layer counts that llama.cpp recognises as the 27B models; it scales their queries by
# d_model / num_heads instead of head_dim (144 for Gemma 2 27B, 168 for Gemma 3 27B).
_LLAMA_CPP_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _check_gguf_vocab(listed, embedding_rows: int) -> None:
    if listed == embedding_rows:
        return
    padded = {listed, embedding_rows} == {HF_GEMMA_VOCAB, REPORT_GEMMA_VOCAB}
    raise ConversionError(
        f"the GGUF's token_embd has {embedding_rows} rows but its tokenizer lists {listed} tokens; "
        + (
            f"{REPORT_GEMMA_VOCAB} rows is the original padded Gemma vocabulary (the reports' Table 2) and "
            f"{HF_GEMMA_VOCAB} the Hugging Face one. "
            if padded
            else ""
        )
        + "Convert the file with a tokenizer of the same size as the embedding; to change the embedding "
        "size of a loaded model, use gemma_hf.convert.resize_vocab."
    )


def gguf_config_fixups(arch: str, metadata: dict, stock_config: dict, embedding_rows: int) -> tuple[dict, list[str]]:
    """Correct transformers' GGUF config for a Gemma file using llama.cpp's reading of the metadata.

    Returns the corrected stock config dict and a list of human-readable changes. Raises
    ConversionError for metadata we cannot represent (an unknown RoPE scaling type, a vocabulary
    that does not match the embedding).
    """
    config = dict(stock_config)
    changes: list[str] = []

    def set_field(field: str, value, why: str) -> None:
        before = config.get(field, "<class default>")
        if before != value:
            changes.append(f"{field}: {before!r} -> {value!r} ({why})")
        config[field] = value

    _check_gguf_vocab(config.get("vocab_size"), embedding_rows)

    num_layers = int(config["num_hidden_layers"])
    head_dim = int(metadata.get(f"{arch}.attention.key_length", config.get("head_dim", 256)))
    num_heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    if num_layers == _LLAMA_CPP_27B_LAYERS[arch]:
        set_field("query_pre_attn_scalar", hidden // num_heads,
                  f"GGUF stores no query scale; llama.cpp treats a {num_layers}-layer {arch} as the 27B, scaled by d_model/num_heads")
    else:
        set_field("query_pre_attn_scalar", head_dim, "GGUF stores no query scale; llama.cpp uses head_dim")

    if arch == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if f"{arch}.{key}" in metadata:
                set_field(key, float(metadata[f"{arch}.{key}"]), f"GGUF {arch}.{key}")
        scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", None):
            raise ConversionError(f"the GGUF asks for RoPE scaling {scaling!r}, which Gemma 2 does not have.")
    else:  # gemma3: RoPE per layer type, as transformers' Gemma3TextConfig.to_dict() writes it
        rope = {k: dict(v) for k, v in (config.get("rope_parameters") or {}).items() if isinstance(v, dict)}
        full = rope.get(FULL, {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 1_000_000.0))})
        sliding = rope.get(SLIDING, {"rope_type": "default", "rope_theta": float(config.get("rope_local_base_freq", 10_000.0))})
        new_full, new_sliding = dict(full), dict(sliding)
        scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
        if scaling == "linear":
            new_full.update(rope_type="linear", factor=float(metadata[f"{arch}.rope.scaling.factor"]))
        elif scaling not in ("none", None):
            raise ConversionError(f"the GGUF asks for RoPE scaling {scaling!r}; only 'linear' is supported for Gemma 3.")
        if f"{arch}.rope.freq_base_swa" in metadata:
            new_sliding["rope_theta"] = float(metadata[f"{arch}.rope.freq_base_swa"])
        if (new_full, new_sliding) != (full, sliding) or not rope:
            set_field("rope_parameters", {FULL: new_full, SLIDING: new_sliding},
                      f"GGUF {arch}.rope.* (linear scaling applies to global layers only)")
        pattern = metadata.get(f"{arch}.attention.sliding_window_pattern")
        if pattern is not None:
            if isinstance(pattern, list):  # one flag per layer, True = sliding
                layer_types = [SLIDING if flag else FULL for flag in pattern]
            else:
                layer_types = alternating_layer_types(num_layers, int(pattern) - 1)
            if len(layer_types) != num_layers:
                raise ConversionError(f"GGUF sliding_window_pattern has {len(layer_types)} entries for {num_layers} layers.")
            set_field("layer_types", layer_types, f"GGUF {arch}.attention.sliding_window_pattern")
    return config, changes


def load_gguf(
    path: str | os.PathLike,
    gguf_file: str | None = None,
    *,
    model_class: type | None = None,
    dtype: torch.dtype = torch.float32,
    return_tokenizer: bool = False,
):
    """A Gemma 2 or Gemma 3 GGUF file, dequantised by transformers, as one of our models.

    Args:
        path: the .gguf file, or a directory holding it (then `gguf_file` names it, or the
            directory must hold exactly one).
        model_class: GemmaHFForCausalLM (default) or GemmaHFForSequenceClassification (a new,
            randomly initialised `score` head on the GGUF's backbone).
        dtype: dtype of the dequantised weights (float32 keeps every dequantised value exact).
        return_tokenizer: also return the tokenizer transformers rebuilds from the GGUF metadata.

    transformers' GGUF config is corrected with llama.cpp's reading of the metadata (soft-caps,
    RoPE scaling, the 27B query scale: :func:`gguf_config_fixups`); each correction that changes
    transformers' result is logged as a warning. The loading state of the GGUF path
    (`hf_quantizer`, `config.quantization_config`) never reaches our model, so it saves as a
    plain safetensors checkpoint. Gemma 1 GGUF files are refused: transformers cannot read them.
    """
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    file = _resolve_gguf(path, gguf_file)
    model_class = model_class or GemmaHFForCausalLM
    if model_class not in (GemmaHFForCausalLM, GemmaHFForSequenceClassification):
        raise ConversionError(f"model_class must be GemmaHFForCausalLM or GemmaHFForSequenceClassification, got {model_class!r}.")
    with parse_gguf_once():
        reader = gguf.GGUFReader(str(file))
        metadata = _gguf_metadata(reader)
        arch = metadata.get("general.architecture")
        if arch == "gemma":
            raise ConversionError(
                f"{file} is a Gemma 1 GGUF; transformers cannot dequantise that architecture. Use the "
                "safetensors release (it loads directly: GemmaHFForCausalLM.from_pretrained(dir))."
            )
        if arch not in _LLAMA_CPP_27B_LAYERS:
            raise ConversionError(f"{file} has general.architecture={arch!r}; load_gguf reads Gemma 2 and Gemma 3 ('gemma2', 'gemma3').")
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise ConversionError(f"{file} has no token_embd.weight tensor.")
        embedding_rows = int(embd.shape[-1])  # GGUF lists dimensions innermost first
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        listed = int(metadata.get(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else embedding_rows))
        _check_gguf_vocab(listed, embedding_rows)  # before transformers' load, whose error is vaguer

        stock = AutoModelForCausalLM.from_pretrained(
            str(file.parent),
            gguf_file=file.name,
            dtype=dtype,
            quantization_config=GgufConfig(dequantize=True),
            attn_implementation="eager",
        )
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name) if return_tokenizer else None
    if tokenizer is not None and len(tokenizer) > embedding_rows:
        raise ConversionError(
            f"the tokenizer transformers rebuilt from {file.name} has {len(tokenizer)} tokens (ids up to "
            f"{len(tokenizer) - 1}) but the embedding has {embedding_rows} rows; added tokens: "
            f"{sorted(tokenizer.get_added_vocab().items(), key=lambda kv: kv[1])[-3:]}."
        )

    stock_dict = stock.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "torch_dtype", "auto_map", "_name_or_path"):
        stock_dict.pop(key, None)
    stock_dict, changes = gguf_config_fixups(arch, metadata, stock_dict, embedding_rows)
    for change in changes:
        log.warning("GGUF %s: %s", file.name, change)
    config = GemmaHFConfig.from_dict(stock_dict)
    state = _state_dict_for(stock)
    if model_class is GemmaHFForSequenceClassification:
        state.pop("lm_head.weight", None)
    del stock  # its tensors live on in `state`, and then in our model
    model = model_class.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, attn_implementation="eager"
    )
    for attr in ("hf_quantizer",):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return (model, tokenizer) if return_tokenizer else model


# ---------------------------------------------------------------------------------------------
# Import: stock / GGUF -> gemma_hf directory


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
    if head not in ("causal-lm", "sequence-classification"):
        raise ValueError(f"head must be 'causal-lm' or 'sequence-classification', got {head!r}.")
    model_class = GemmaHFForCausalLM if head == "causal-lm" else GemmaHFForSequenceClassification
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it.")
    is_gguf = gguf_file is not None or src.suffix == ".gguf" or (src.is_dir() and not (src / "config.json").exists()
                                                                  and any(src.glob("*.gguf")))
    tokenizer = None
    side_files_from = None
    if is_gguf:
        model, tokenizer = load_gguf(
            src, gguf_file, model_class=model_class, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
            return_tokenizer=True,
        )
    else:
        config = _read_config(src)
        if config.get("model_type") not in (*STOCK_MODEL_TYPES, GemmaHFConfig.model_type):
            raise ConversionError(
                f"{src} has model_type={config.get('model_type')!r}; expected gemma, gemma2, gemma3_text or gemma_hf."
            )
        model = model_class.from_pretrained(src, dtype=dtype or "auto", attn_implementation="eager")
        side_files_from = src
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if side_files_from is not None:
            _copy_side_files(side_files_from, tmp, (*TOKENIZER_FILES, GENERATION_CONFIG))
        verify_saved_tensors(tmp, model)
    return dst


# ---------------------------------------------------------------------------------------------
# Vocabulary resizing (the 256128 <-> 256000 padding, or any other size)


def _special_token_ids(config) -> dict[str, int]:
    ids = {}
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        for i, v in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            if v is not None:
                ids[f"{name}[{i}]" if isinstance(value, (list, tuple)) else name] = int(v)
    return ids


def _resized(weight: torch.Tensor, rows: int) -> nn.Parameter:
    new = torch.zeros((rows, *weight.shape[1:]), dtype=weight.dtype, device=weight.device)
    keep = min(rows, weight.shape[0])
    with torch.no_grad():
        new[:keep].copy_(weight[:keep])
    return nn.Parameter(new, requires_grad=weight.requires_grad)


def resize_vocab(model, new_size: int, *, tokenizer=None, check_unused: bool = True):
    """Trim or pad the vocabulary of `model` (in place) to exactly `new_size` rows; returns the model.

    Rows `[0, min(old, new))` are copied bit for bit, so the logits of every kept token are
    unchanged. Padding adds zero rows (a zero embedding; with a tied head, a logit of exactly 0).
    Trimming drops rows `[new_size, old)`; with `check_unused` (the default) it first proves that
    no token uses them:

    - no special token id of the config (pad/bos/eos) may be >= new_size;
    - with a `tokenizer`, `len(tokenizer)` must be <= new_size;
    - without one, the dropped rows must be all zero (as padding rows are), in the embedding and
      in an untied output head.

    Note that a softmax over the trimmed vocabulary renormalises over fewer entries; raw logits of
    the kept ids are identical. The config's `vocab_size` (and the model's `vocab_size`
    attributes) follow. The usual case is the Gemma 1/2 padding: 256128 rows (the reports) to
    256000 (Hugging Face tokenizers and checkpoints), or back.
    """
    if not isinstance(new_size, int) or isinstance(new_size, bool) or new_size <= 0:
        raise ValueError(f"new_size must be a positive integer, got {new_size!r}.")
    embed = model.get_input_embeddings()
    old = embed.weight.shape[0]
    if new_size == old:
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is embed.weight
    if new_size < old and check_unused:
        too_big = {k: v for k, v in _special_token_ids(model.config).items() if v >= new_size}
        if too_big:
            raise VocabResizeError(
                f"cannot trim the vocabulary from {old} to {new_size} rows: the config's special tokens "
                f"{too_big} use ids >= {new_size}."
            )
        if tokenizer is not None:
            if len(tokenizer) > new_size:
                raise VocabResizeError(
                    f"cannot trim the vocabulary from {old} to {new_size} rows: the tokenizer has "
                    f"{len(tokenizer)} tokens, so ids up to {len(tokenizer) - 1} are in use."
                )
        else:
            matrices = [("embedding", embed.weight)] + ([] if tied or head is None else [("output head", head.weight)])
            for what, weight in matrices:
                dropped = weight[new_size:]
                if torch.count_nonzero(dropped).item():
                    nonzero = torch.nonzero(dropped.abs().sum(dim=tuple(range(1, dropped.dim()))))
                    first = new_size + int(nonzero[0, 0])
                    raise VocabResizeError(
                        f"cannot trim the vocabulary from {old} to {new_size} rows: {what} row {first} (of the "
                        f"{old - new_size} to be dropped) is not zero, so it may belong to a real token. Pass the "
                        f"tokenizer (resize_vocab(model, {new_size}, tokenizer=tok)) to prove no token id >= "
                        f"{new_size} exists, or check_unused=False to trim anyway."
                    )
    embed.weight = _resized(embed.weight, new_size)
    embed.num_embeddings = new_size
    if head is not None:
        if tied:
            head.weight = embed.weight
        else:
            head.weight = _resized(head.weight, new_size)
        head.out_features = new_size
    model.config.vocab_size = new_size
    for module in (model, getattr(model, "model", None)):
        if module is not None and hasattr(module, "vocab_size"):
            module.vocab_size = new_size
    return model

