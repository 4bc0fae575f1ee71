"""The error every conversion raises when a checkpoint cannot be converted as asked."""

from __future__ import annotations

from ..errors import InputError


class ConversionError(InputError):
    """A checkpoint cannot be converted as asked (wrong format, unsupported variant, failed check)."""
