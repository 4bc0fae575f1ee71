"""What a run and the methods' hooks share: the :class:`Run` context and the building blocks every
method may call (tokenizer, model with its head, LoRA config, the mixture and its held-out split).

The engine (engine.py) drives a run in its fixed order; the methods (sft.py, ..., warp.py) are
called by it and take what they need from here. Nothing here opens, claims or publishes a run.

Library behaviours relied on (easy to break on upgrades):
- PEFT's ``merge_and_unload`` returns the base model with the adapters (and ``modules_to_save``
  copies, e.g. a reward model's score head) folded in.
- datasets' ``Dataset.map`` takes ``new_fingerprint`` instead of hashing the function (Run.map).
"""

from __future__ import annotations

import copy
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma_hf.chat import CONTROL_TOKENS, FAMILIES, stop_token_ids
from gemma_hf.rundir import LOGS, RunDir

from .callbacks import FiniteGuard, MetricsCallback, SaveAtEnd, SavedFaultPoint, TokenCount, TrackerLogs
from .data import load_mixture, read_dataset, split_held_out
from .methods import Method
from .problems import Problem, RecipeError
from .schema import Recipe
from .streaming import StreamedMixture, load_streamed_mixture, shuffled, stream_features


@dataclass
class RunResult:
    output_dir: Path
    method: str
    results: dict  # eval.json
    wall_time_s: float = 0.0
    global_step: int = 0

    @property
    def samples(self) -> list[dict]:
        return self.results.get("samples", [])

    @property
    def eval_loss_before(self) -> float | None:
        return self.results.get("eval_loss_before")

    @property
    def eval_loss_after(self) -> float | None:
        return self.results.get("eval_loss_after")


@dataclass
class Run:
    """What the engine and a method's hooks share during one run."""

    recipe: Recipe
    method: Method
    rundir: RunDir
    state: Any  # accelerate.PartialState
    resume_from: Path | None = None
    tokenizer: Any = None
    started: str = ""
    start_time: float = 0.0
    new_parameters: list[str] = field(default_factory=list)  # created by this run (e.g. a new score head)
    train_set: Any = None  # the prepared training split (for a method's configure_model)
    stats: dict[str, dict] = field(default_factory=dict)  # per split, from the method's prepare()
    info: dict[str, Any] = field(default_factory=dict)  # run.json entries gathered along the way

    @property
    def family(self) -> str:
        return self.recipe.family

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    # -- helpers the methods share --------------------------------------------------------------
    def map(self, dataset, function, desc: str, remove_columns: bool = True, int_lists: list[str] | None = None):
        """``dataset.map(function)`` without datasets' fingerprinting of ``function``: it pickles the
        function's closure (a 256k-entry tokenizer: ~20 s per call) to name a cache file, and our
        datasets live in memory, so a fresh random fingerprint is both correct and instant.

        A stream (an IterableDataset, ``streaming: true``) is mapped lazily; ``int_lists`` names the
        columns ``function`` returns (lists of integers), its schema: TRL reads a stream's column names
        up front, and without a schema datasets would read the first example to learn them."""
        if self.streamed(dataset):
            features = None
            if int_lists is not None:
                from datasets import Features, List, Value

                features = Features({name: List(Value("int64")) for name in int_lists})
            return dataset.map(function, remove_columns=dataset.column_names if remove_columns else None,
                               features=features)
        return dataset.map(function, remove_columns=dataset.column_names if remove_columns else None, desc=desc,
                           new_fingerprint=uuid.uuid4().hex)

    @staticmethod
    def streamed(dataset) -> bool:
        """Whether ``dataset`` is a stream (a datasets.IterableDataset: the training split of a
        ``streaming: true`` recipe), prepared lazily and without a length."""
        from datasets import IterableDataset

        return isinstance(dataset, IterableDataset)

    def stream_long_examples(self, dataset, split: str, length):
        """:meth:`apply_long_examples` for a stream: ``long_examples: drop`` is a lazy filter on
        ``length(example)``, so how many are long is not known ahead (the stats say "streamed")."""
        max_length = getattr(self.recipe.training, "max_length", None)
        policy = getattr(self.recipe.method_args, "long_examples", "truncate")
        stats = {"examples": "streamed", "handling": policy}
        if max_length is not None and policy == "drop" and split != "eval":
            dataset = dataset.filter(lambda example: length(example) <= max_length)
        return dataset, stats

    def apply_long_examples(self, dataset, split: str, lengths: list[int], truncate):
        """Handle examples longer than max_length by the method's ``long_examples`` policy: drop
        (never in the "eval" split: held-out examples are kept, truncated) or ``truncate(ds)``."""
        max_length = getattr(self.recipe.training, "max_length", None)
        policy = getattr(self.recipe.method_args, "long_examples", "truncate")
        stats = {"examples": len(dataset), "long": 0, "dropped": 0, "handling": policy}
        if max_length is None:
            return dataset, stats
        long_rows = [i for i, length in enumerate(lengths) if length > max_length]
        stats["long"] = len(long_rows)
        if long_rows and policy == "drop" and split != "eval":
            keep = sorted(set(range(len(dataset))) - set(long_rows))
            dataset = dataset.select(keep)
            stats["dropped"] = len(long_rows)
        elif long_rows and truncate is not None:
            dataset = truncate(dataset, max_length)
            stats["handling"] = "truncate"
        if len(dataset) == 0:
            raise RecipeError(self.recipe.source, [Problem(
                "max_length", f"every {split} example is longer than max_length={max_length} and was dropped",
                "raise max_length, or set long_examples: truncate", self.recipe.origin("max_length"))])
        return dataset, stats

    def trainer_kwargs(self, model, train_set, eval_set) -> dict[str, Any]:
        """The arguments every method's TRL trainer gets from the engine."""
        args = self.recipe.training
        if "eval_on_start" not in self.recipe.values:
            args.eval_on_start = bool(self.method.eval_on_start and eval_set is not None
                                      and self.recipe.gemma.eval_before_training and self.resume_from is None)
        if "logging_nan_inf_filter" not in self.recipe.values:
            args.logging_nan_inf_filter = False  # log a NaN loss as NaN (FiniteGuard stops the run anyway)
        callbacks = [MetricsCallback(self.rundir.metrics, fresh=self.resume_from is None),
                     FiniteGuard(lambda: self.rundir.latest_complete_checkpoint()[0]), SaveAtEnd(), TokenCount(), SavedFaultPoint(),
                     TrackerLogs(self.rundir.path / LOGS, args.report_to)]
        return dict(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                    processing_class=self.tokenizer, peft_config=peft_config_for(self, model), callbacks=callbacks)


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(recipe.tokenizer_path)


def model_class(head: str):
    from gemma_hf import GemmaHFForCausalLM, GemmaHFForSequenceClassification

    return GemmaHFForCausalLM if head == "causal-lm" else GemmaHFForSequenceClassification


def seed_everything(recipe: Recipe) -> None:
    """Seed before weights exist: a preset's random init, a new head and LoRA's init are reproducible."""
    from transformers import set_seed
    from transformers.trainer_utils import enable_full_determinism

    t = recipe.training
    if t.full_determinism:
        enable_full_determinism(t.seed)
    else:
        set_seed(t.seed)


def load_model(path: str, head: str, *, dtype: str | None = None, attn_implementation: str | None = None,
               revision: str | None = None, **kwargs):
    """(model, missing parameter names) of a checkpoint directory or Hub id, with ``head``."""
    import torch

    kwargs = {"dtype": getattr(torch, dtype) if dtype not in (None, "auto") else "auto", **kwargs}
    if head == "sequence-classification":
        kwargs.setdefault("num_labels", 1)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if revision and not Path(path).exists():
        kwargs["revision"] = revision
    model, info = model_class(head).from_pretrained(path, output_loading_info=True, **kwargs)
    return model, sorted(info.get("missing_keys") or ())


def build_model(recipe: Recipe, head: str):
    """(model, names of parameters the checkpoint did not have) for ``head``, seeded first."""
    import torch

    m = recipe.model
    seed_everything(recipe)
    cls = model_class(head)
    head_kwargs = {"num_labels": 1} if head == "sequence-classification" else {}
    dtype = None if m.dtype in (None, "auto") else getattr(torch, m.dtype)
    if recipe.model_path is None:  # random weights of a preset architecture
        config = copy.deepcopy(recipe.architecture)
        if head_kwargs:
            config.num_labels = head_kwargs["num_labels"]  # resets id2label/label2id to match
        model = cls._from_config(config, attn_implementation=m.attn_implementation or "eager")
        return (model.to(dtype) if dtype is not None else model), []
    kwargs = {}
    if m.load_in_4bit or m.load_in_8bit:
        from trl import get_kbit_device_map, get_quantization_config

        kwargs["quantization_config"] = get_quantization_config(m)
        kwargs["device_map"] = get_kbit_device_map()
    return load_model(recipe.model_path, head, dtype=m.dtype, attn_implementation=m.attn_implementation,
                      revision=m.model_revision, **kwargs)


def peft_config_for(run: Run, model):
    recipe = run.recipe
    if not recipe.model.use_peft:
        return None
    from trl import get_peft_config

    config = get_peft_config(recipe.model)
    if config.target_modules is None:
        config.target_modules = "all-linear"  # PEFT has no default target list for model_type gemma_hf
    if recipe.gemma.train_top_layers is not None:
        # One regular expression over module names (PEFT full-matches a str target_modules): the named
        # linear layers inside the top layers only. (PEFT 0.21 ignores layers_to_transform when target_modules
        # is "all-linear", which it expands after that check: measured, hence no layers_to_transform here.)
        names = LINEAR_MODULES if config.target_modules == "all-linear" else sorted(
            [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules)
        layers = "|".join(str(i) for i in top_layer_indices(model, recipe.gemma.train_top_layers))
        config.target_modules = (rf".*\.layers\.({layers})\.(?:.*\.)?({'|'.join(map(re.escape, names))})")
    if recipe.gemma.lora_trainable_tokens:
        # PEFT's TrainableTokens: a delta on these embedding rows; with tied embeddings the lm_head rows
        # follow (and gemma_hf's loss reads lm_head.weight, which includes the delta).
        ids = run.tokenizer.convert_tokens_to_ids(list(recipe.gemma.lora_trainable_tokens))
        config.trainable_token_indices = {"embed_tokens": sorted(set(ids))}
    return config


LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # a Gemma layer's


def top_layer_indices(model, top: int) -> list[int]:
    """The indices of ``model``'s top ``top`` decoder layers (``train_top_layers``)."""
    layers = model.config.num_hidden_layers
    return list(range(max(0, layers - top), layers))


def freeze_below_top_layers(run: Run, model) -> None:
    """``train_top_layers`` without LoRA: only the top layers, the final norm and what comes after them (the
    head: lm_head or score) keep requires_grad; embeddings and lower layers are frozen. (With LoRA the
    adapters' target pattern places them: see :func:`peft_config_for`.)"""
    top = run.recipe.gemma.train_top_layers
    if top is None or run.recipe.model.use_peft:
        return
    keep = set(top_layer_indices(model, top))
    pattern = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    for name, parameter in model.named_parameters():
        match = pattern.search(name)
        if match:
            parameter.requires_grad_(int(match.group(1)) in keep)
        elif "embed_tokens" in name:
            parameter.requires_grad_(False)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        # a tied lm_head is the embedding matrix: frozen with it (its gradient would reach every row)
        model.lm_head.weight.requires_grad_(False)


def set_generation_stops(model, tokenizer) -> list[int]:
    """generation_config.eos_token_id = [<eos>, <end_of_turn>, ...]: chats stop at the end of a turn."""
    config = model.generation_config
    current = config.eos_token_id
    current = [] if current is None else [current] if isinstance(current, int) else list(current)
    config.eos_token_id = list(dict.fromkeys([*stop_token_ids(tokenizer), *current]))
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return config.eos_token_id


def merge_adapter(recipe: Recipe, head: str, model, adapter_dir: Path, reload: bool = False):
    """The base model with the LoRA weights merged in.

    In memory when the base is a plain (unquantized) model held whole by this process; otherwise
    (QLoRA, or ``reload``: a model sharded across processes) the base is reloaded unquantized in
    the recipe's dtype and the saved adapter merged into it.
    """
    m = recipe.model
    if not (m.load_in_4bit or m.load_in_8bit or reload):
        return model.merge_and_unload()
    import torch
    from peft import PeftModel

    if recipe.model_path is None:
        raise RuntimeError("cannot merge a QLoRA adapter into a preset's random weights: there is no base checkpoint")
    dtype = torch.float32 if m.dtype in (None, "auto") else getattr(torch, m.dtype)
    kwargs = {"num_labels": 1} if head == "sequence-classification" else {}
    base = model_class(head).from_pretrained(recipe.model_path, dtype=dtype, **kwargs)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def read_mixture(recipe: Recipe, method: Method):
    """The mixture from the records validation read (Hub datasets are read here, and checked alike):
    a data.Mixture in memory, or a streaming.StreamedMixture (``streaming: true``: counts only)."""
    parts = []
    streaming = recipe.data.streaming
    family = recipe.family if recipe.family in FAMILIES else "gemma2"
    for index, spec in enumerate(recipe.data.datasets):
        part = recipe.data_parts.get(index)
        if part is None:
            part = read_dataset(spec, index, method.data_format_for(recipe), family, CONTROL_TOKENS,
                                keep_records=not streaming)
            if part.problems:
                raise RecipeError(recipe.source, [Problem(p.key, p.message, p.fix, recipe.origin(p.key))
                                                  for p in part.problems])
        parts.append(part)
    if streaming:
        mixture = load_streamed_mixture(parts, recipe.data, method.data_format_for(recipe), family,
                                        recipe.training.seed)
        if recipe.data.test_split_size is not None and not 0 < len(mixture.held_out) < sum(mixture.taken):
            # validation checks this for local data; a Hub dataset is counted only now
            raise RecipeError(recipe.source, [Problem(
                "test_split_size", f"holds out {len(mixture.held_out)} of the mixture's {sum(mixture.taken)} records",
                "hold out at least one record and fewer than all", recipe.origin("test_split_size"))])
        return mixture
    return load_mixture(parts, method.data_format_for(recipe), recipe.training.seed)


def prepare_splits(run: Run, mixture):
    """(train, held-out or None), prepared by the method. A method that drops long held-out
    examples too (drop_long_eval) prepares the whole mixture first, so that test_split_size counts
    the examples that are evaluated; otherwise the split comes first and each part is prepared."""
    recipe, method = run.recipe, run.method
    if isinstance(mixture, StreamedMixture):
        return _prepare_streamed_splits(run, mixture)

    def split(dataset):
        try:
            return split_held_out(dataset, recipe.data, recipe.training.seed)
        except ValueError as err:  # datasets refuses a split that leaves either side empty
            raise RecipeError(recipe.source, [Problem(
                "test_split_size", f"cannot hold out {recipe.data.test_split_size} of the {len(dataset)} usable "
                f"examples: {err}", "hold out fewer examples (or raise max_length to keep more)",
                recipe.origin("test_split_size"))]) from None

    if method.drop_long_eval:
        prepared, run.stats["all"] = method.prepare(run, mixture.records, "all")
        return split(prepared)
    train, held_out = split(mixture.records)
    train, run.stats["train"] = method.prepare(run, train, "train")
    if held_out is not None:
        held_out, run.stats["eval"] = method.prepare(run, held_out, "eval")
    return train, held_out


def _prepare_streamed_splits(run: Run, mixture: StreamedMixture):
    """(train stream, held-out or None) of a streamed mixture: the held-out records in memory, prepared
    like any; the training records as a stream the method prepares lazily, then shuffled in a buffer."""
    import datasets

    recipe, method = run.recipe, run.method
    held_out = None
    if mixture.held_out:
        records = datasets.Dataset.from_list(mixture.held_out_records(), features=stream_features(mixture.data_format))
        held_out, run.stats["eval"] = method.prepare(run, records, "eval")
    train, run.stats["train"] = method.prepare(run, mixture.training_stream(), "train")
    # The first example, read now: a stream whose every example the method drops would otherwise train no
    # step at all (the Trainer stops on an empty epoch) and publish the untrained model.
    if next(iter(train), None) is None:
        raise RecipeError(recipe.source, [Problem(
            "max_length", f"no training example is left after preparation (all {mixture.train_records} were "
            "dropped: longer than max_length, or no answer token within it)",
            "raise max_length, or set long_examples: truncate", recipe.origin("max_length"))])
    data_seed = recipe.training.data_seed if recipe.training.data_seed is not None else recipe.training.seed
    return shuffled(train, recipe.data, data_seed), held_out


__all__ = ["Run", "RunResult", "load_tokenizer", "model_class", "seed_everything", "load_model", "build_model",
           "peft_config_for", "top_layer_indices", "freeze_below_top_layers", "set_generation_stops", "merge_adapter", "read_mixture", "prepare_splits"]
