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

One file per job; this module only gathers their public names:

- ``stock.py``        ours <-> stock models in memory (``to_stock_model``, ``from_stock_model``)
- ``checkpoints.py``  directories: atomic saves, verification, ``export_to_transformers``, ``import_checkpoint``
- ``gguf_import.py``  GGUF files (``load_gguf``, ``gguf_config_fixups``, ``parse_gguf_once``); transformers
                      ignores some Gemma metadata there, which ``load_gguf`` re-applies with a warning
- ``vocab.py``        ``resize_vocab``
- ``errors.py``       ``ConversionError``
"""

from __future__ import annotations

from ..model.safety import HF_GEMMA_VOCAB, REPORT_GEMMA_VOCAB, CheckpointMismatchError
from .checkpoints import (
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    export_to_transformers,
    import_checkpoint,
    save_pretrained_atomic,
    verify_saved_tensors,
)
from .errors import ConversionError
from .gguf_import import gguf_config_fixups, load_gguf, parse_gguf_once
from .stock import from_stock_model, to_stock_model
from .vocab import VocabResizeError, resize_vocab

__all__ = [
    "ConversionError",
    "CheckpointMismatchError",
    "VocabResizeError",
    "TOKENIZER_FILES",
    "GENERATION_CONFIG",
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
