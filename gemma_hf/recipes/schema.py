"""The recipe schema: which keys a recipe may hold, and the dataclass each key belongs to.

A recipe is one flat YAML mapping. Every key belongs to exactly one dataclass (a "group"); the
groups of a method come from the method table (gemma_hf.recipes.methods):

=========  ====================================  ===============================================
group      dataclass                             keys (examples)
=========  ====================================  ===============================================
gemma      :class:`GemmaArguments`               preset, tokenizer_name_or_path, chat_family,
           (every method)                        merge_lora, lora_trainable_tokens
method     the method's own (e.g. SFTArguments)  assistant_only_loss, sample_prompts, ...
data       :class:`DataArguments`                datasets (a list of :class:`DatasetSpec`), test_split_size
model      ``trl.ModelConfig``                   model_name_or_path, dtype, attn_implementation, use_peft, lora_*
training   the method's TRL config               output_dir, learning_rate, max_steps, max_length, ...
           (``trl.SFTConfig``, ``trl.RewardConfig``, ...)
=========  ====================================  ===============================================

plus ``env`` (a mapping of environment variables set before the run, as in TRL's parser).

It also holds :class:`Recipe`, the typed recipe every later step reads, and how a recipe's values are
recorded in a run directory (:func:`shareable`). Nothing here imports TRL, torch or the method table.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gemma_hf.references import identity

from .formats import FORMAT_NAMES
from .problems import COMMAND_LINE, Problem

CHAT_FAMILIES = ("auto", "gemma", "gemma2", "gemma3")


@dataclass
class GemmaArguments:
    """Our own recipe fields shared by every method: what TRL's dataclasses have no name for."""

    preset: str | None = field(
        default=None,
        metadata={
            "help": "A gemma_hf preset (gemma-2b, gemma-7b, gemma2-2b, gemma2-9b, gemma2-27b, gemma3-270m). Without "
            "model_name_or_path: train from random weights of this architecture (with preset_overrides). With it: "
            "the architecture the checkpoint must have (checked), used for validation when the checkpoint is not local."
        },
    )
    preset_overrides: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "GemmaHFConfig fields replacing the preset's (e.g. {num_hidden_layers: 2, ...})."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer directory, asset:NAME or Hub id. Defaults to model_name_or_path."},
    )
    chat_family: str = field(
        default="auto",
        metadata={
            "help": "Chat format: gemma (model turns end <end_of_turn>), gemma2/gemma3 (the final model turn ends "
            "<end_of_turn><eos>). auto: the model's family.",
            "choices": list(CHAT_FAMILIES),
        },
    )
    eval_before_training: bool = field(
        default=True,
        metadata={"help": "Evaluate the held-out split before training too (eval.json gets before and after)."},
    )
    eval_after_training: bool = field(
        default=True,
        metadata={"help": "Evaluate the held-out split after training (eval.json's *_after numbers). WARP turns it "
                          "off for its RL runs when its Pareto view measures them on the same prompts."},
    )
    lora_trainable_tokens: list[str] | None = field(
        default=None,
        metadata={
            "help": "LoRA runs: tokens whose embedding rows train too (PEFT trainable_token_indices; the tied "
            "lm_head rows follow), e.g. [<start_of_turn>, <end_of_turn>]: a base model has barely seen the control "
            "tokens, and LoRA alone is slow to make it emit <end_of_turn>."
        },
    )
    train_top_layers: int | None = field(
        default=None,
        metadata={
            "help": "Train only the top N decoder layers (and what sits above them: the final norm and the head); "
            "the embeddings and the layers below stay frozen, so the backward pass stops at layer L-N -- fewer "
            "gradients, a cheaper step. With LoRA, the adapters go on those N layers only (PEFT "
            "layers_to_transform); without, those layers are fine-tuned in full. null: every layer."
        },
    )
    merge_lora: bool = field(
        default=True,
        metadata={
            "help": "LoRA runs: save the merged model at the root of output_dir (the adapter goes to adapter/). "
            "false: the root holds only the adapter."
        },
    )


@dataclass
class SampleArguments:
    """Prompts a causal-LM method answers before and after training (a mixin of method arguments)."""

    sample_prompts: list[str] | None = field(
        default=None,
        metadata={"help": "Prompts answered greedily before and after training; the answers go to eval.json."},
    )
    sample_max_new_tokens: int = field(
        default=64, metadata={"help": "Most new tokens per sample_prompts answer."}
    )


@dataclass
class DatasetSpec:
    """One dataset of the mixture."""

    path: str = field(
        metadata={
            "help": "A local .json/.jsonl/.parquet/.csv file, a save_to_disk directory, asset:NAME/FILE, or a Hub "
            "dataset id (online only)."
        }
    )
    split: str = field(default="train", metadata={"help": "Split to read (local files have only 'train'; slices such as train[:100] work)."})
    name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    fraction: float = field(
        default=1.0,
        metadata={"help": "Share of this dataset's records to use, in (0, 1]: a seeded random subset."},
    )
    columns: dict[str, str] | None = field(
        default=None,
        metadata={"help": "Renames applied first, source column -> standard column (e.g. {question: prompt})."},
    )
    format: str = field(
        default="auto",
        metadata={
            "help": "Record format: messages (list of {role, content}), sharegpt (conversations of {from, value}; "
            "preference pairs add chosen/rejected), prompt_completion, alpaca ({instruction, input, output}, or "
            "chosen/rejected for pairs), preference (chosen/rejected with an optional prompt and margin); auto "
            "detects it from the columns.",
            "choices": list(FORMAT_NAMES),
        },
    )
    build: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward recipes: preference pairs built by a rule from this instruction dataset instead of read "
            "from it -- the reference answer (chosen) against a corruption of it (rejected), one pair per record, "
            "the kinds in turn: off_topic (another instruction's answer), truncated (cut mid-sentence), repeated "
            "(its first words looped), echo (the instruction given back), shuffled (its words in random order). "
            "See gemma_hf.evaluation.preference_sets."
        },
    )
    build_size: int | None = field(
        default=None, metadata={"help": "build: how many pairs (default: one per usable record)."}
    )
    build_seed: int = field(default=0, metadata={"help": "build: the seed of the record order and of the corruptions."})


@dataclass
class DataArguments:
    """The dataset mixture and its held-out split."""

    datasets: list[DatasetSpec] = field(
        default_factory=list,
        metadata={"help": "The datasets of the mixture, each {path, split, name, fraction, columns, format} (reward "
                          "recipes: also build, build_size, build_seed)."},
    )
    test_split_size: int | float | None = field(
        default=None,
        metadata={
            "help": "Held-out split taken from the mixture (seeded): a fraction in (0, 1) or a number of records. "
            "It is the eval set (held-out results before/after training)."
        },
    )
    split_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the held-out split (default: `seed`). Stages that must hold out the same records "
            "(e.g. WARP's runs, whose training seeds differ; a pipeline's stages on one dataset) share it."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read the training split as a stream (a datasets.IterableDataset) from the sources on every epoch, "
            "never all in memory: for mixtures larger than RAM. Every record is still checked first (counted, not "
            "kept). sft only; needs max_steps; the held-out split is the test_split_size records with the smallest "
            "seeded hash of their position (docs/architecture.md); fraction < 1 and percentage slices are refused."
        },
    )
    shuffle_buffer_size: int = field(
        default=1000,
        metadata={
            "help": "streaming: the shuffle buffer, in examples (seeded by seed, reseeded each epoch); 1 keeps the "
            "datasets' interleaved order. Memory grows with it."
        },
    )


# TRL/transformers fields no gemma-hf recipe may set, with the reason (every method).
REFUSED_TRAINING_KEYS = {
    "dataset_text_field": "records are chat conversations (see `datasets[].format`), not a text column.",
    "dataset_kwargs": "gemma_hf prepares the dataset itself; TRL's preparation options do not apply.",
    "dataset_num_proc": "gemma_hf prepares the dataset itself; TRL's preparation options do not apply.",
    "chat_template_path": "the chat format is Gemma's own, chosen by `chat_family`.",
    "eos_token": "Gemma's <eos> and <end_of_turn> are fixed by the chat format.",
    "pad_token": "the tokenizer's <pad> is used.",
    "model_init_kwargs": "set the model fields (dtype, attn_implementation, ...) as recipe keys.",
    "resume_from_checkpoint": "resuming is `gemma-hf <method> --resume`, from the run's latest complete checkpoint.",
    "overwrite_output_dir": "gemma-hf never overwrites a finished run; choose a new output_dir.",
    "trust_remote_code": "gemma_hf loads Gemma checkpoints with its own classes; no remote code runs.",
    # The Trainer's own push would upload checkpoints/ (optimizer states, pickles) with its own card while
    # training, around our push plan (allowlist, no pickles, private by default).
    **{key: "the Trainer never pushes: push the finished run with `gemma-hf push RUN_DIR --repo-id ORG/NAME` (its files "
            "checked, private by default), or a pipeline's `push:`." for key in
       ("push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push",
        "hub_revision")},
}

# Keys from other tools or older versions, mapped to where they live now.
RENAMED_KEYS = {
    "max_seq_length": "max_length",
    "torch_dtype": "dtype",
    "evaluation_strategy": "eval_strategy",
    "warmup_ratio": "warmup_steps (transformers 5: a value below 1 is a ratio of the total steps)",
    "dataset_mixture": "datasets",
    "dataset_name": "datasets (a list of {path: ...})",
    "lora_target_modules_list": "lora_target_modules",
    "output_directory": "output_dir",
}


@dataclass(frozen=True)
class KeyInfo:
    key: str
    group: str
    cls: type
    field: dataclasses.Field


def help_text(info: KeyInfo) -> str:
    return " ".join(str(info.field.metadata.get("help", "")).split())


@dataclass
class Recipe:
    """A checked recipe: the dataclasses plus what validation resolved."""

    source: Path | None
    method: str
    values: dict[str, Any]  # every key set by the file or the command line, typed, in order
    origins: dict[str, str]
    env: dict[str, str]
    gemma: GemmaArguments
    method_args: Any  # the method's own dataclass (e.g. SFTArguments), or None
    data: DataArguments
    model: Any  # trl.ModelConfig
    training: Any  # the method's TRL config (its output_dir is output_dir/checkpoints)
    output_dir: Path
    # Resolved by validation:
    family: str = "gemma2"
    model_path: str | None = None  # local directory or Hub id; None for preset random init
    model_kind: str | None = None  # the reference kind: asset, run, local or hub
    tokenizer_path: str | None = None
    architecture: Any = None  # GemmaHFConfig when known (from the checkpoint or the preset)
    data_parts: dict = field(default_factory=dict)  # dataset index -> data.ReadDataset, every record checked
    notes: list[str] = field(default_factory=list)
    environment_problems: list[Problem] = field(default_factory=list)

    def origin(self, key: str) -> str:
        return self.origins.get(key.split("[")[0].split(".")[0], str(self.source or "<recipe>"))

    def to_yaml(self) -> str:
        """The resolved recipe (file + command-line overrides) as YAML, loadable by load_recipe."""
        header = f"# Resolved {self.method} recipe"
        if self.source is not None:
            header += f" (from {self.source.name})"  # the file name only: a run directory is shared
        overridden = [k for k, o in self.origins.items() if o == COMMAND_LINE]
        if overridden:
            header += f"\n# overridden on the command line: {', '.join(overridden)}"
        body: dict[str, Any] = {}
        if self.env:
            body["env"] = dict(self.env)
        for key, value in self.values.items():
            body[key] = shareable(key, plain(value))
        return header + "\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=100)


# Recipe keys whose values are paths or model references (recorded by identity: see shareable()).
PATH_KEYS = ("output_dir", "model_name_or_path", "tokenizer_name_or_path", "teacher_name_or_path", "cache_dir",
             "baseline_name_or_path", "reward_name_or_path", "judge_name_or_path", "judge_template", "deepspeed",
             "path", "model", "teacher", "from", "cache", "base_model")


def shareable(key: str, value: Any) -> Any:
    """``value`` of recipe key ``key`` as a run directory records it: references by identity
    (gemma_hf.references.identity), never a local absolute path, in nested lists and mappings too."""
    if isinstance(value, dict):
        return {k: shareable(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [shareable(key, v) for v in value]
    if key in PATH_KEYS and isinstance(value, str):
        return identity(value)
    return value


def plain(value: Any) -> Any:
    """A recipe value as plain YAML data: dataclasses as mappings of their non-default fields, enums as
    their values."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) != f.default}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


__all__ = ["Recipe", "shareable", "plain", "PATH_KEYS", "CHAT_FAMILIES", "GemmaArguments", "SampleArguments", "DatasetSpec", "DataArguments", "KeyInfo",
           "REFUSED_TRAINING_KEYS", "RENAMED_KEYS", "help_text"]
