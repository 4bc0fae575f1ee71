"""The code behind the YAML recipes (recipes/<preset>/<method>.yaml).

- :mod:`.schema`: which keys a recipe holds and the dataclass each belongs to;
- :mod:`.config`: loading (YAML + command-line overrides) and type checks -> :class:`Recipe`;
- :mod:`.validation`: the checks that need files, datasets and the model's config (no weights);
- :mod:`.data`: dataset sources, record formats -> conversations, the mixture;
- :mod:`.tokenization`: conversations -> input_ids + the assistant-only loss mask;
- :mod:`.sft`: the SFT run (TRL SFTTrainer); :mod:`.rundir`: the run directory;
- :mod:`.sampling`: chat answers (before/after samples, `gemma-hf chat`/`generate`);
- :mod:`.distributed`: checks of accelerate config files.

Importing this package is cheap; torch/transformers/TRL load when a recipe is loaded or run.
"""

from .config import Problem, Recipe, RecipeError, load_recipe

__all__ = ["Problem", "Recipe", "RecipeError", "load_recipe"]
