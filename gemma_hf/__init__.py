"""gemma_hf: the Gemma model family as first-class Hugging Face models.

Importing this package registers the `gemma_hf` model type with transformers' Auto* classes,
and marks our classes for `auto_map`, so that `save_pretrained` writes the code next to the
weights and the checkpoint loads with `trust_remote_code=True` where gemma_hf is not installed.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .model import (
    BackendUnavailableError,
    GemmaHFConfig,
    GemmaHFForCausalLM,
    GemmaHFForSequenceClassification,
    GemmaHFModel,
    GemmaHFPreTrainedModel,
    SoftcapUnsupportedError,
)
from .presets import PRESETS, get_preset, preset_config

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register(GemmaHFConfig.model_type, GemmaHFConfig, exist_ok=True)
    AutoModel.register(GemmaHFConfig, GemmaHFModel, exist_ok=True)
    AutoModelForCausalLM.register(GemmaHFConfig, GemmaHFForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(GemmaHFConfig, GemmaHFForSequenceClassification, exist_ok=True)
    # auto_map entries written by save_pretrained (remote-code loading without the package).
    GemmaHFConfig.register_for_auto_class()
    GemmaHFModel.register_for_auto_class("AutoModel")
    GemmaHFForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    GemmaHFForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")


_register()

__all__ = [
    "GemmaHFConfig",
    "GemmaHFModel",
    "GemmaHFForCausalLM",
    "GemmaHFForSequenceClassification",
    "GemmaHFPreTrainedModel",
    "SoftcapUnsupportedError",
    "BackendUnavailableError",
    "PRESETS",
    "get_preset",
    "preset_config",
]
