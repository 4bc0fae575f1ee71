"""The recipe engine behind ``gemma-hf <method> --config R.yaml`` (see docs/architecture.md).

- :mod:`.methods`: the method table (sft.py, reward.py, ...: one short file per method);
- :mod:`.schema`, :mod:`.coercion`, :mod:`.config`: which keys a recipe holds, their types, loading
  (YAML + command-line overrides) -> :class:`Recipe`;
- :mod:`.validation`: the checks that need files, datasets and the model's config (no weights);
- :mod:`.sources`, :mod:`.formats`, :mod:`.data`: dataset sources, record formats -> canonical
  records of the method's data format, the mixture;
- :mod:`.tokenization`: conversations -> input_ids (+ the assistant-only loss mask);
- :mod:`.engine`: the run every method shares; :mod:`.rundir`: the run directory (read and written);
- :mod:`.sampling`: chat answers (before/after samples, ``gemma-hf chat``/``generate``);
- :mod:`.problems`: Problem / RecipeError; :mod:`.distributed`: checks of accelerate config files.

Importing this package is cheap; torch/transformers/TRL load when a recipe is loaded or run.
"""

from .problems import Problem, RecipeError


def load_recipe(*args, **kwargs):
    from .config import load_recipe as _load

    return _load(*args, **kwargs)


def run_recipe(recipe, resume: bool = False):
    """Run a checked recipe with its method (gemma-hf <method> --config R.yaml)."""
    from .methods import get_method

    return get_method(recipe.method).run(recipe, resume=resume)


__all__ = ["Problem", "RecipeError", "load_recipe", "run_recipe"]
