"""The method table: every post-training method is one row, a :class:`Method` subclass in a file of
its own (sft.py, reward.py, ...). The row declares

- its recipe dataclasses: TRL's config for its trainer (``trainer_config``) and our own fields
  (``arguments``), plus the TRL keys it refuses or owns;
- the data format it needs (``data_format``: conversation, preference or prompt) and the model head
  it trains (``head``: causal-lm or sequence-classification);
- its checks (:meth:`Method.check`, after the shared ones in validation.py);
- what it does at each step of the shared run (gemma_hf.recipes.engine): how its records are
  tokenized (:meth:`prepare`), what it does to the freshly built model (:meth:`configure_model`),
  what it measures on the held-out set before and after training (:meth:`evaluate`), how its
  trainer is built (:meth:`make_trainer`), the plots it adds (:meth:`plots`) and what it adds to
  run.json (:meth:`run_info`).

Everything else -- loading and checking the recipe, claiming and resuming output_dir, tokenizer,
model, LoRA, metrics, publishing the run directory, the card -- is the engine's, written once.
``gemma-hf <method>``, ``gemma-hf validate --method`` and ``--help-keys`` come from this table.

Adding a method: write ``gemma_hf/recipes/<name>.py`` with a ``Method`` subclass assigned to
``METHOD``, add its module to :data:`METHOD_MODULES`, add ``recipes/tiny/<name>.yaml``; the CLI,
validation and the fault-injection tests pick it up. See docs/architecture.md.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Run
    from .validation import Checks

# name -> module defining METHOD; the order is the order of `gemma-hf --help`.
METHOD_MODULES: dict[str, str] = {
    "sft": "gemma_hf.recipes.sft",
    "reward": "gemma_hf.recipes.reward",
    "distill": "gemma_hf.recipes.distill",
    "rlhf": "gemma_hf.recipes.rlhf",
    "warp": "gemma_hf.recipes.warp",
    "eval": "gemma_hf.recipes.evaluate",
}

HEADS = ("causal-lm", "sequence-classification")


class Method:
    """A row of the method table; subclass it and override what the method does differently."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""  # one line for `gemma-hf --help`
    about: ClassVar[str] = ""  # the first paragraph of `gemma-hf NAME --help`
    data_format: ClassVar[str] = "conversation"
    head: ClassVar[str] = "causal-lm"
    trainer_config: ClassVar[str] = ""  # "module:Class" of the TRL config dataclass
    arguments: ClassVar[type | None] = None  # our own recipe fields of this method
    refused_keys: ClassVar[dict[str, str]] = {}  # TRL config keys a recipe of this method may not set
    claimed_keys: ClassVar[frozenset[str]] = frozenset()  # TRL keys owned by `arguments` under the same name
    # Whether the engine sets eval_on_start (the Trainer's held-out evaluation at step 0, logged to
    # metrics.jsonl) when eval_before_training is on.
    eval_on_start: ClassVar[bool] = True
    # Whether held-out examples longer than max_length are dropped like training ones (the engine
    # then prepares the whole mixture before taking the held-out split, so that test_split_size
    # counts the examples actually evaluated).
    drop_long_eval: ClassVar[bool] = False
    # False for methods that train nothing (evaluation): their "training" group is a small dataclass of
    # our own (output_dir, seed, batch size), and the training checks do not apply.
    trains: ClassVar[bool] = True

    def config_class(self) -> type:
        module, _, name = self.trainer_config.partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def lora_task_type(self) -> str:
        return "CAUSAL_LM" if self.head == "causal-lm" else "SEQ_CLS"

    # -- validation (before any model loads) ----------------------------------------------------
    def architecture(self, c: "Checks"):
        """The config of the model this recipe trains when the method makes it itself (e.g. a student
        built from its teacher), else None: the shared model checks then read model_name_or_path /
        preset."""
        return None

    def check(self, c: "Checks") -> None:
        """Method-specific checks; report with ``c.error(key, message, fix)``."""

    # -- the run (see engine.py for the order) --------------------------------------------------
    def run(self, recipe, resume: bool = False):
        """Run a checked recipe: the engine's one-trainer run, unless the method orchestrates stages
        of its own (WARP: several RL runs, merges, iterations)."""
        from .engine import run_recipe

        return run_recipe(recipe, resume=resume)

    def prepare(self, run: "Run", dataset, split: str):
        """Canonical records -> what the trainer consumes (token ids); returns (dataset, stats dict)."""
        raise NotImplementedError

    def build_model(self, run: "Run"):
        """(model, new parameter names) when the method builds the model itself, else None (the engine
        loads model_name_or_path or a preset's random weights)."""
        return None

    def configure_model(self, run: "Run", model) -> None:
        """Adjust the freshly built model (before LoRA and training)."""

    def evaluate(self, run: "Run", model, eval_set, when: str) -> dict[str, Any]:
        """Held-out results of ``model`` ("before" or "after" training) for eval.json (JSON-able)."""
        return {}

    def make_trainer(self, run: "Run", model, train_set, eval_set):
        raise NotImplementedError

    def plots(self, run: "Run", results: dict[str, Any], directory) -> list[str]:
        """Write method plots into ``directory``; return their file names."""
        return []

    def run_info(self, run: "Run") -> dict[str, Any]:
        """What this method adds to run.json."""
        return {}

    def summary(self, results: dict[str, Any]) -> list[str]:
        """Lines the CLI prints after a finished run (held-out numbers before -> after)."""
        return []


@functools.lru_cache(maxsize=None)
def get_method(name: str) -> Method:
    if name not in METHOD_MODULES:
        from gemma_hf.errors import InputError, suggestion

        raise InputError(f"unknown method {name!r}.{suggestion(name, METHOD_MODULES)} Known methods: "
                         f"{', '.join(METHOD_MODULES)}")
    method = importlib.import_module(METHOD_MODULES[name]).METHOD
    assert method.name == name and method.head in HEADS, method
    return method


def method_names() -> list[str]:
    return list(METHOD_MODULES)


__all__ = ["Method", "METHOD_MODULES", "HEADS", "get_method", "method_names"]
