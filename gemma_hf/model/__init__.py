"""Everything a saved checkpoint needs. Files here import each other only as `from .x import y`
(transformers copies them next to a checkpoint for trust_remote_code loading)."""

from .attention import BackendUnavailableError, SoftcapUnsupportedError
from .configuration import GEMMA_FAMILIES, GemmaFamily, GemmaHFConfig, gemma_family
from .modeling import (
    GemmaHFForCausalLM,
    GemmaHFForSequenceClassification,
    GemmaHFModel,
    GemmaHFPreTrainedModel,
)

__all__ = [
    "GemmaHFConfig",
    "GemmaFamily",
    "GEMMA_FAMILIES",
    "gemma_family",
    "GemmaHFModel",
    "GemmaHFForCausalLM",
    "GemmaHFForSequenceClassification",
    "GemmaHFPreTrainedModel",
    "SoftcapUnsupportedError",
    "BackendUnavailableError",
]
