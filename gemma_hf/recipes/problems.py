"""Recipe problems: each names a key, what is wrong and the fix; a RecipeError carries them all.

A recipe is checked completely before any model loads (gemma_hf.recipes.config and
.validation); every problem found is gathered into one :class:`RecipeError`, whose message names
the file, each key and its fix. The CLI prints it and exits with status 2, having written nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from gemma_hf.errors import InputError

COMMAND_LINE = "the command line"


@dataclass
class Problem:
    key: str
    message: str
    fix: str
    origin: str = ""  # the file, or COMMAND_LINE
    environment: bool = False  # the machine, not the recipe, is the problem

    def render(self) -> str:
        where = f" (from --{self.key.split('[')[0].split('.')[0]} on {COMMAND_LINE})" if self.origin == COMMAND_LINE else ""
        return f"  - {self.key}{where}: {self.message}\n    fix: {self.fix}"


class RecipeError(InputError):
    """One or more problems with a recipe; ``str()`` is the message the CLI prints."""

    def __init__(self, source: str | os.PathLike | None, problems: list[Problem], heading: str | None = None):
        self.source = str(source) if source is not None else "<recipe>"
        self.problems = problems
        self.heading = heading
        super().__init__(str(self))

    def __str__(self) -> str:
        count = len(self.problems)
        heading = self.heading or f"recipe {self.source} is invalid ({count} problem{'s' if count != 1 else ''}):"
        return "\n".join([heading, *(p.render() for p in self.problems)])


__all__ = ["COMMAND_LINE", "Problem", "RecipeError"]
