"""Real test assets for pytest: fetched once into the cache (gemma_hf.assets), else skip.

A test that needs an asset skips with the fetcher's reason when it cannot be fetched, except in CI
(``CI=true``), where a missing asset is a failure: CI must never pass by skipping the real tests.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from gemma_hf.assets import AssetUnavailable


# Fetches that failed in this session: tried once, so a dead registry costs one timeout, not one per test.
_failed: dict[Callable[[], Path], str] = {}


def require(asset_fn: Callable[[], Path]) -> Path:
    """The cached path of ``asset_fn()`` (fetching it on first use); skip, or fail in CI, if unavailable."""
    reason = _failed.get(asset_fn)
    if reason is None:
        try:
            return asset_fn()
        except AssetUnavailable as err:
            reason = _failed[asset_fn] = f"test asset unavailable ({asset_fn.__name__}): {err}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}\n(CI=true: missing assets fail instead of skipping)", pytrace=False)
    pytest.skip(reason)


@functools.lru_cache(maxsize=None)
def tokenizer(asset_fn: Callable[[], Path]):
    """A transformers tokenizer loaded from a tokenizer asset; loaded once per test session."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(require(asset_fn))
