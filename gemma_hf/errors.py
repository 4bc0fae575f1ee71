"""The errors gemma_hf raises on purpose, and the one "did you mean" every message uses.

Every error a user can cause (a bad recipe, a bad path, a bad record) derives from
:class:`GemmaHFError`; its ``str()`` is the whole message, fix included, and its ``exit_code``
is what the ``gemma-hf`` command exits with: 2 for bad input (:class:`InputError`), 1 for a
failure while running. The CLI prints the message, never a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GemmaHFError(Exception):
    """A failure gemma_hf explains itself; ``str()`` is the message shown to the user."""

    exit_code = 1


class InputError(GemmaHFError, ValueError):
    """Bad input: a recipe, a path, a record, an argument. Nothing was written."""

    exit_code = 2


def did_you_mean(word: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The candidate closest to ``word`` (difflib ratio >= cutoff), or None."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=cutoff)
    return close[0] if close else None


def suggestion(word: str, candidates: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` (with a leading space) or the empty string."""
    close = did_you_mean(word, candidates)
    return f" Did you mean {close!r}?" if close else ""


__all__ = ["GemmaHFError", "InputError", "did_you_mean", "suggestion"]
