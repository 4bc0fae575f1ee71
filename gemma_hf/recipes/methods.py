"""The method table: every post-training method is one row, a :class:`Method` subclass in a file of
its own (sft.py, reward.py, ...). The row declares

- its recipe dataclasses: TRL's config for its trainer (``trainer_config``) and our own fields
  (``arguments``), plus the TRL keys it refuses or owns;
- the data format it needs (``data_format``: conversation, preference or prompt) and the model head
  it trains (``head``: causal-lm or sequence-classification);
- its checks (:meth:`Method.check`, after the shared ones in validation.py);
- what it does at each step of the shared training run (gemma_hf.recipes.engine): how its records are
  tokenized (:meth:`prepare`), what it does to the freshly built model (:meth:`configure_model`),
  what it measures on the held-out set before and after training (:meth:`evaluate`), how its
  trainer is built (:meth:`make_trainer`), the plots it adds (:meth:`plots`) and what it adds to
  run.json (:meth:`run_info`); or, for a method that is not one trainer (WARP, evaluation), what it
  orchestrates in the opened run (``orchestrates = True``, :meth:`orchestrate`).

Everything else -- loading and checking the recipe, claiming and resuming output_dir, tokenizer,
model, LoRA, metrics, publishing the run directory, the card -- is the engine's, written once.
``gemma-hf <method>``, ``gemma-hf validate --method`` and ``--help-keys`` come from this table, and so
does the key index (:func:`groups`, :func:`key_index`): which dataclass field each recipe key sets.
A method is a declaration: nothing here runs a recipe (the engine calls the methods, never the
reverse).

Adding a method: write ``gemma_hf/recipes/<name>.py`` with a ``Method`` subclass assigned to
``METHOD``, add its module to :data:`METHOD_MODULES`, add ``recipes/tiny/<name>.yaml``; the CLI,
validation and the fault-injection tests pick it up. See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import TYPE_CHECKING, Any, ClassVar

from gemma_hf.errors import InputError, suggestion
from gemma_hf.references import CAUSAL_LM, SEQUENCE_CLASSIFICATION

from .schema import REFUSED_TRAINING_KEYS, DataArguments, GemmaArguments, KeyInfo

if TYPE_CHECKING:  # pragma: no cover
    from .runtime import Run
    from .validation import Checks

# name -> module defining METHOD; the order is the order of `gemma-hf --help`.
METHOD_MODULES: dict[str, str] = {
    "sft": "gemma_hf.recipes.sft",
    "reward": "gemma_hf.recipes.reward",
    "distill": "gemma_hf.recipes.distill",
    "rlhf": "gemma_hf.recipes.rlhf",
    "warp": "gemma_hf.recipes.warp",
    "eval": "gemma_hf.recipes.evaluate",
    "merge": "gemma_hf.recipes.merge",
    "generate": "gemma_hf.recipes.generate",
}

HEADS = (CAUSAL_LM, SEQUENCE_CLASSIFICATION)


class Method:
    """A row of the method table; subclass it and override what the method does differently."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # what the method does, as a card says it ("after supervised fine-tuning (SFT)")
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
    # False for methods whose run directory holds no model (evaluation): a pipeline stage may not
    # read a model from such a stage (`{from: NAME}`), nor make it the pipeline's final model.
    publishes_model: ClassVar[bool] = True
    # True for methods whose run directory holds a dataset (generate: a teacher's answers as conversations,
    # gemma_hf.rundir.RunDir.dataset_file): a later recipe's (or pipeline stage's) datasets may read it.
    publishes_data: ClassVar[bool] = False
    # What model_name_or_path is for, as messages say it, and the heads it may have
    # (gemma_hf.references.check_head, at validation).
    model_role: ClassVar[str] = "model to train"
    model_heads: ClassVar[tuple[str, ...]] = (CAUSAL_LM,)
    # False for methods that run without data (a merge evaluates only when it is given datasets).
    needs_data: ClassVar[bool] = True
    # True for methods whose training split may be a stream (`streaming: true`: a datasets.IterableDataset,
    # gemma_hf.recipes.streaming): their prepare() takes one, lazily. Validation refuses the key elsewhere.
    streams: ClassVar[bool] = False
    # True when `gemma-hf NAME` is also another command's form (merge's flags, generate's one-shot
    # prompts): that command's parser takes --config/--resume/--help-keys too (commands.recipes.
    # add_recipe_options) and hands a recipe to the run; the method table adds no parser of its own.
    shares_command: ClassVar[bool] = False

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

    def builds_model(self, recipe) -> bool:
        """Whether the recipe's model is made by the method (then :meth:`architecture` says what it is,
        when that can be known before the run) rather than read from model_name_or_path / preset."""
        return False

    def check(self, c: "Checks") -> None:
        """Method-specific checks; report with ``c.error(key, message, fix)``."""

    def data_format_for(self, recipe) -> str:
        """The format of this recipe's records (conversation, preference, prompt): the method's own, unless
        it depends on the recipe (a merge of reward models is evaluated on preference pairs)."""
        return self.data_format

    def published_head(self, recipe) -> str:
        """The head of the model this recipe's run publishes (a merge keeps its inputs' head)."""
        return self.head

    def describe_model(self, recipe) -> str | None:
        """What `gemma-hf validate` says the recipe's model is, when model_name_or_path does not say it."""
        return None

    def tokenizer_reference(self, recipe) -> tuple[str, str | None]:
        """(recipe key, reference) of the tokenizer the run uses: tokenizer_name_or_path, else the model's."""
        if recipe.gemma.tokenizer_name_or_path:
            return "tokenizer_name_or_path", recipe.gemma.tokenizer_name_or_path
        return "model_name_or_path", recipe.model.model_name_or_path

    def batches_records(self, recipe) -> bool:
        """Whether the Trainer batches the training records as they are (per_device_train_batch_size of
        them per step): then gradient_accumulation_steps is bounded by an epoch's batches at validation.
        Not for methods that batch generations (RL) or stream a store of their own (offline distillation)."""
        return self.trains

    # -- an orchestrating method (no trainer of its own) ------------------------------------------
    # True for methods whose run is not one trainer: the engine opens the run (lock, recovery, claim)
    # and hands it to orchestrate(), which runs what the method is made of (WARP: RL runs, merges,
    # iterations; an evaluation) and publishes through gemma_hf.recipes.publish.
    orchestrates: ClassVar[bool] = False

    def orchestrate(self, run: "Run"):
        """Do the method's work in the opened run directory and publish it; return a RunResult."""
        raise NotImplementedError

    # -- the training run (see engine.py for the order) --------------------------------------------
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
        raise InputError(f"unknown method {name!r}.{suggestion(name, METHOD_MODULES)} Known methods: "
                         f"{', '.join(METHOD_MODULES)}")
    method = importlib.import_module(METHOD_MODULES[name]).METHOD
    assert method.name == name and method.title and method.head in HEADS, method
    return method


def method_names() -> list[str]:
    return list(METHOD_MODULES)


@functools.lru_cache(maxsize=None)
def groups(method: str = "sft") -> tuple[tuple[str, type], ...]:
    """(group name, dataclass) pairs of a method's recipe, in the order they are documented."""
    from trl import ModelConfig

    spec = get_method(method)
    out: list[tuple[str, type]] = [("gemma", GemmaArguments)]
    if spec.arguments is not None:
        out.append(("method", spec.arguments))
    out += [("data", DataArguments), ("model", ModelConfig), ("training", spec.config_class())]
    return tuple(out)


@functools.lru_cache(maxsize=None)
def key_index(method: str = "sft") -> dict[str, KeyInfo]:
    """Every recipe key -> the group and dataclass field it sets."""
    spec = get_method(method)
    refused = refused_keys(method)
    index: dict[str, KeyInfo] = {}
    for group, cls in groups(method):
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            if group in ("model", "training") and (f.name in spec.claimed_keys or f.name in refused):
                continue
            if f.name in index:  # two dataclasses sharing a name would make a flat recipe ambiguous
                raise RuntimeError(f"recipe key {f.name!r} is defined by both {index[f.name].group} and {group}")
            index[f.name] = KeyInfo(f.name, group, cls, f)
    return index


def refused_keys(method: str) -> dict[str, str]:
    return {**REFUSED_TRAINING_KEYS, **get_method(method).refused_keys}


__all__ = ["Method", "METHOD_MODULES", "HEADS", "get_method", "method_names", "groups", "key_index", "refused_keys"]
