"""In memory: our models <-> stock transformers models (gemma / gemma2 / gemma3_text), sharing tensors.

Tensor names are the same on both sides, so a conversion builds the other class from the converted
config and hands it our state dict (no copy); every tensor name must match. The stock class
names come from the family table (`GEMMA_FAMILIES` in gemma_hf.model.configuration).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..model import GemmaHFConfig, GemmaHFForCausalLM, GemmaHFForSequenceClassification
from ..model.configuration import STOCK_MODEL_TYPES, gemma_family
from ..model.safety import check_loading_info
from .errors import ConversionError

def is_sequence_classifier(model: nn.Module) -> bool:
    return isinstance(model, GemmaHFForSequenceClassification) or type(model).__name__.endswith(
        "ForSequenceClassification"
    )


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
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
    family = gemma_family(model.config.family)
    class_name = family.stock_sequence_classification if is_sequence_classifier(model) else family.stock_causal_lm
    stock_dict["architectures"] = [class_name]
    stock_config = transformers.AutoConfig.for_model(model_type, **stock_dict)
    stock, info = getattr(transformers, class_name).from_pretrained(
        None,
        config=stock_config,
        state_dict=state_dict_of(model),
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
        model_class = GemmaHFForSequenceClassification if is_sequence_classifier(stock) else GemmaHFForCausalLM
    config = GemmaHFConfig.from_dict(config_dict)
    state = state_dict_of(stock)
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
