"""Attention backends other than eager and sdpa (sdpa parity is in test_model_parity.py).

flex_attention is refused on CPU: with torch 2.13, transformers' compiled flex path returned NaN or
wrong values in one process once it had run both padded and unpadded batches (stock Gemma 2 as
well as ours; measured by the lead while building this test). flash_attention_2 needs CUDA and
the flash-attn package. Neither can be parity-tested on this CPU-only machine; the issue note
records that they are unverified here.
"""

from __future__ import annotations

import pytest

from gemma_hf import BackendUnavailableError
from tiny import make_ours, random_ids


def test_flex_attention_is_refused_on_cpu_with_a_clear_error():
    model = make_ours("gemma2", attn="flex_attention")
    with pytest.raises(BackendUnavailableError, match="Use attn_implementation='eager' on CPU"):
        model(random_ids(1, 8))
