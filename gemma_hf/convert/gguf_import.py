"""GGUF import: a Gemma 2 or Gemma 3 GGUF file, dequantised by transformers, into our classes.

transformers dequantises Gemma 2/3 GGUF files but reads only part of their metadata: it ignores
the soft-caps and RoPE scaling written by llama.cpp's converter, and GGUF carries no query scale
at all (llama.cpp derives it from the model size). :func:`load_gguf` reads those keys itself and
applies llama.cpp's rules, with a warning whenever the result differs from what stock
transformers would have built; see :func:`gguf_config_fixups`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..model import GemmaHFConfig, GemmaHFForCausalLM, GemmaHFForSequenceClassification
from ..model.configuration import FULL, SLIDING, alternating_layer_types
from ..model.safety import HF_GEMMA_VOCAB, REPORT_GEMMA_VOCAB
from .errors import ConversionError
from .stock import state_dict_of

log = logging.getLogger(__name__)


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
    state = state_dict_of(stock)
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
