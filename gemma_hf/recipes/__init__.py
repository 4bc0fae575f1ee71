"""The recipe engine behind ``gemma-hf <method> --config R.yaml`` (see docs/architecture.md).

- :mod:`.schema`, :mod:`.coercion`: the recipe dataclasses, :class:`Recipe`, value types;
- :mod:`.methods`: the method table and its key index (sft.py, reward.py, ...: one short file per method);
- :mod:`.config`: loading (YAML + command-line overrides) -> :class:`Recipe`, then
  :mod:`.validation`: the checks that need files, datasets and the model's config (no weights);
- :mod:`.sources`, :mod:`.formats`, :mod:`.data`: dataset sources, record formats -> canonical
  records of the method's data format, the mixture;
- :mod:`.runtime`: the Run context and the building blocks the methods share (tokenizer, model, LoRA);
- :mod:`.engine`: opening a run and the training run; :mod:`.publish`: the one publish protocol;
- :mod:`.pipeline`: stages of method recipes in one pipeline directory;
- :mod:`.problems`: Problem / RecipeError; :mod:`.distributed`: work on the main process only.

Below this package: gemma_hf.rundir (the run directory), gemma_hf.tokenization, gemma_hf.sampling,
gemma_hf.faults; nothing there imports recipes/.

Importing this package is cheap; torch/transformers/TRL load when a recipe is loaded or run.
"""

from .problems import Problem, RecipeError


def load_recipe(*args, **kwargs):
    from .config import load_recipe as _load

    return _load(*args, **kwargs)


def run_recipe(recipe, resume: bool = False):
    """Run a checked recipe with its method (gemma-hf <method> --config R.yaml)."""
    from .engine import run_recipe as _run

    return _run(recipe, resume=resume)


__all__ = ["Problem", "RecipeError", "load_recipe", "run_recipe"]
