"""Everything a saved checkpoint needs. Files here import each other only as `from .x import y`
(transformers copies them next to a checkpoint for trust_remote_code loading)."""

from .attention import BackendUnavailableError, SoftcapUnsupportedError
from .configuration import GemmaHFConfig
from .modeling import (
    GemmaHFForCausalLM,
    GemmaHFForSequenceClassification,
    GemmaHFModel,
    GemmaHFPreTrainedModel,
)

__all__ = [
    "GemmaHFConfig",
    "GemmaHFModel",
    "GemmaHFForCausalLM",
    "GemmaHFForSequenceClassification",
    "GemmaHFPreTrainedModel",
    "SoftcapUnsupportedError",
    "BackendUnavailableError",
]
