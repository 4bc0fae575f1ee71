"""Recipe loading: YAML + command-line overrides -> a checked :class:`Recipe`, for any method.

:func:`load_recipe` reads the YAML (strictly: duplicate keys, non-UTF-8 text and alias bombs are
errors), applies command-line overrides (``--key value``), checks every key against the method's
schema (unknown keys get a "did you mean"), every value's type, builds the dataclasses (see
:mod:`gemma_hf.recipes.schema`), then runs the semantic checks of :mod:`gemma_hf.recipes.validation`
(files, every dataset record, the model's config, conflicting options, the method's own checks).
All problems are gathered into one :class:`RecipeError` that names the file, each key and its fix;
the CLI prints it and exits with status 2. Nothing is written and no model weights are loaded.

Problems that depend on the machine rather than the recipe (no CUDA GPU for QLoRA, a Hub model
that is not downloaded while offline) are *environment* problems: ``gemma-hf validate`` reports
them and still passes (the recipe is right; it needs another machine); a run refuses to start.

Library behaviours relied on (easy to break on upgrades):
- TRL's ``TrlParser`` would set YAML values as argparse defaults without converting or checking
  their types (``learning_rate: 1e-4`` is a *string* to PyYAML); we check and convert each value
  against the dataclass annotations first (coercion.py), then build the dataclasses with TRL's
  parser (``parse_dict``), so what TRL receives is already typed.
- TRL configs / ``TrainingArguments.__post_init__`` raise ValueError for some conflicts; we turn
  those into problems naming the key the message mentions.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import sys
import re
from pathlib import Path
from typing import Any

import yaml

from gemma_hf.errors import did_you_mean, suggestion
from gemma_hf.rundir import run_name_of

from .coercion import Mismatch, annotation, arms, coerce, describe, show, type_name
from .methods import get_method, groups, key_index, method_names, refused_keys
from .problems import COMMAND_LINE, Problem, RecipeError
from .schema import RENAMED_KEYS, DatasetSpec, KeyInfo, Recipe
from .validation import check_recipe

# A recipe is a few dozen keys; a document that expands (through YAML aliases) to more values than
# this is refused before anything walks it (an alias bomb would take minutes and gigabytes).
MAX_YAML_VALUES = 100_000
MAX_RECIPE_BYTES = 1_000_000


# --------------------------------------------------------------------------------------------
# YAML reading (duplicate keys are errors: PyYAML would silently keep the last one)
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Values in ``node`` with every alias expanded (each distinct node counted once per use)."""
    known = memo.get(id(node))
    if known is not None:
        return known
    memo[id(node)] = 1  # guards against recursive aliases
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[id(node)] = size
    return size


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(path, [Problem("config", f"recipe file {path} does not exist" if not path.exists()
                                         else f"{path} is not a file", "pass the path of a recipe YAML file")])
    raw = path.read_bytes()
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(path, [Problem("yaml", f"the file is {len(raw):,} bytes; a recipe is a few kB",
                                         "pass the recipe file, not a data file")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(path, [Problem("yaml", f"not UTF-8 text: byte {raw[err.start:err.start + 1]!r} at offset "
                                         f"{err.start}", "save the recipe as UTF-8")]) from None
    try:
        loader = _StrictLoader(text)
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node, {}) > MAX_YAML_VALUES:
                raise RecipeError(path, [Problem(
                    "yaml", f"the document expands to more than {MAX_YAML_VALUES:,} values (YAML aliases)",
                    "write the recipe without nested aliases")])
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        match = re.search(r"duplicate key '([^']+)'", str(problem))
        raise RecipeError(path, [Problem(match.group(1) if match else "yaml", f"not valid YAML{where}: {problem}",
                                         "fix the YAML syntax")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(path, [Problem("yaml", f"the file holds a YAML {type(data).__name__}, not a mapping of keys",
                                         "write the recipe as `key: value` lines")])
    return data


# --------------------------------------------------------------------------------------------
# Command-line overrides: --key value, --key=value, --flag, --no_flag, --list_key a b c
# --------------------------------------------------------------------------------------------


def parse_overrides(tokens: list[str], method: str = "sft") -> tuple[dict[str, Any], list[Problem]]:
    index = key_index(method)
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    position = 0
    while position < len(tokens):
        token = tokens[position]
        position += 1
        if not token.startswith("--") or token == "--":
            problems.append(Problem(token, f"unexpected argument {token!r}", "recipe keys are given as --key value",
                                    COMMAND_LINE))
            continue
        name, has_equals, inline = token[2:].partition("=")
        name = name.replace("-", "_")
        raw: list[str] = [inline] if has_equals else []
        if not has_equals:
            while position < len(tokens) and not tokens[position].startswith("--"):
                raw.append(tokens[position])
                position += 1
        negated = False
        if name not in index and name.startswith("no_") and name[3:] in index and not raw:
            name, negated = name[3:], True
        if name in values:
            problems.append(Problem(name, "given twice on the command line", "give each key once", COMMAND_LINE))
            continue
        if name not in index:
            values[name] = raw  # reported as an unknown key, with a suggestion, by load_recipe
            continue
        info = index[name]
        try:
            values[name] = _from_command_line(info, raw, negated)
        except ValueError as err:
            problems.append(Problem(name, str(err), f"give --{name} a value of type {type_name(info)}", COMMAND_LINE))
    return values, problems


def _from_command_line(info: KeyInfo, raw: list[str], negated: bool) -> Any:
    hint_arms = arms(annotation(info))
    if negated:
        if bool not in hint_arms:
            raise ValueError(f"--no_{info.key} is only for true/false keys")
        return False
    if not raw:
        if bool in hint_arms:
            return True
        raise ValueError("needs a value")
    list_arm = next((a for a in hint_arms if getattr(a, "__origin__", None) is list), None)
    if len(raw) > 1:
        if list_arm is None:
            raise ValueError(f"takes one value, got {len(raw)}: {raw}")
        item = list_arm.__args__[0] if getattr(list_arm, "__args__", None) else Any
        return [_scalar_from_text(text, item) for text in raw]
    return _scalar_from_text(raw[0], annotation(info))


def _scalar_from_text(text: str, hint: Any) -> Any:
    hint_arms = arms(hint)
    textual = str in hint_arms or any(isinstance(a, type) and issubclass(a, enum.Enum) for a in hint_arms)
    parsed = yaml_scalar(text)
    if textual and isinstance(parsed, bool) and bool not in hint_arms:
        return text  # `--eval_strategy no`: the word, not YAML's false
    if textual and not isinstance(parsed, (list, dict, bool)) and not (parsed is None and type(None) in hint_arms):
        # keep strings as typed (e.g. --hub_model_id 007) unless a number/bool arm fits better
        if isinstance(parsed, (int, float)) and any(a in (int, float) for a in hint_arms):
            return parsed
        return text
    return parsed


def yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# --------------------------------------------------------------------------------------------
# Checks, phase 1: keys and types
# --------------------------------------------------------------------------------------------


def _unknown_key_problem(key: str, origin: str, method: str) -> Problem:
    refused = refused_keys(method)
    if key in refused:
        return Problem(key, f"not used by gemma-hf {method}: {refused[key]}", "remove it", origin)
    if key in RENAMED_KEYS:
        return Problem(key, f"unknown key; its place is taken by {RENAMED_KEYS[key]}",
                       f"use {RENAMED_KEYS[key].split(' ')[0]} instead", origin)
    other = _method_with_key(key, method)
    if other:
        return Problem(key, f"not a key of {method} recipes (it belongs to gemma-hf {other})",
                       f"remove it, or run it with gemma-hf {other}", origin)
    close = did_you_mean(key, key_index(method))
    message = f"unknown key. Did you mean {close!r}?" if close else "unknown key"
    fix = f"rename it to {close!r}" if close else "remove it"
    return Problem(key, message, f"{fix} (`gemma-hf {method} --help-keys` lists every key)", origin)


def _method_with_key(key: str, method: str) -> str | None:
    for other in method_names():
        if other != method and key in key_index(other) and key_index(other)[key].group in ("method", "training"):
            return other
    return None


def _check_value(key: str, value: Any, info: KeyInfo, origin: str, problems: list[Problem]) -> Any:
    if key == "datasets":
        return _check_datasets(value, origin, problems)
    try:
        typed = coerce(value, annotation(info), key)
    except Mismatch as err:
        problems.append(Problem(key, f"wrong type: {err}", f"set {key} to {type_name(info)}", origin))
        return None
    if isinstance(typed, float) and not math.isfinite(typed):
        problems.append(Problem(key, f"{typed!r} is not a finite number", f"set {key} to a finite number", origin))
        return None
    choices = info.field.metadata.get("choices")
    if choices and typed is not None and typed not in choices:
        problems.append(Problem(key, f"{typed!r} is not allowed.{suggestion(str(typed), map(str, choices))}",
                                f"use one of {', '.join(map(repr, choices))}", origin))
    enum_arm = next((a for a in arms(annotation(info)) if isinstance(a, type) and issubclass(a, enum.Enum)), None)
    if enum_arm is not None and isinstance(typed, str) and typed not in {e.value for e in enum_arm}:
        allowed = [e.value for e in enum_arm]
        problems.append(Problem(key, f"{typed!r} is not allowed.{suggestion(typed, allowed)}",
                                f"use one of {', '.join(map(repr, allowed))}", origin))
    return typed


def _check_datasets(value: Any, origin: str, problems: list[Problem]) -> list[DatasetSpec] | None:
    import typing

    if isinstance(value, str):  # from the command line: a YAML/JSON list
        value = yaml_scalar(value)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        problems.append(Problem("datasets", f"wrong type: expected a list of {{path: ...}} mappings, got {show(value)}",
                                "write datasets as a YAML list: `datasets:\\n  - path: data.jsonl`", origin))
        return None
    specs = []
    names = {f.name: f for f in dataclasses.fields(DatasetSpec)}
    hints = typing.get_type_hints(DatasetSpec)
    for index, entry in enumerate(value):
        key = f"datasets[{index}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            problems.append(Problem(key, f"expected a mapping such as {{path: data.jsonl}}, got {show(entry)}",
                                    "give each dataset as a mapping with at least `path`", origin))
            continue
        kwargs, ok = {}, True
        for name, item in entry.items():
            if name not in names:
                problems.append(Problem(f"{key}.{name}", f"unknown dataset key.{suggestion(str(name), names)}",
                                        f"dataset keys are: {', '.join(names)}", origin))
                ok = False
                continue
            try:
                kwargs[name] = coerce(item, hints[name], f"{key}.{name}")
            except Mismatch as err:
                problems.append(Problem(f"{key}.{name}", f"wrong type: {err}",
                                        f"set it to {describe(hints[name])}", origin))
                ok = False
                continue
            choices = names[name].metadata.get("choices")
            if choices and kwargs[name] not in choices:
                problems.append(Problem(f"{key}.{name}", f"{kwargs[name]!r} is not allowed."
                                        f"{suggestion(str(kwargs[name]), choices)}",
                                        f"use one of {', '.join(map(repr, choices))}", origin))
                ok = False
        if "path" not in entry:
            problems.append(Problem(f"{key}.path", "missing", "every dataset needs a path", origin))
            ok = False
        if ok:
            specs.append(DatasetSpec(**kwargs))
    return specs


# --------------------------------------------------------------------------------------------
# load_recipe
# --------------------------------------------------------------------------------------------


def load_recipe(
    path: str | os.PathLike | None,
    overrides: list[str] | None = None,
    method: str = "sft",
    *,
    values: dict[str, Any] | None = None,
    check_environment: bool = True,
) -> Recipe:
    """Read, check and build a recipe of ``method``. Raises :class:`RecipeError` with every problem.

    ``path``: the YAML file (or None with ``values``, a dict of keys, for programmatic use).
    ``overrides``: command-line tokens, ``["--learning_rate", "1e-4", ...]``.
    """
    spec = get_method(method)
    source = Path(path) if path is not None else None
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    file_label = str(source) if source is not None else "<values>"
    if source is not None:
        raw.update(read_yaml(source))
    if values:
        raw.update(values)
    origins.update({k: file_label for k in raw})
    cli_values, problems = parse_overrides(list(overrides or []), method)
    for key, value in cli_values.items():
        raw[key] = value
        origins[key] = COMMAND_LINE

    # Phase 1: keys and types.
    env = {}
    if "env" in raw:
        env_value = raw.pop("env")
        origins.pop("env", None)
        if not isinstance(env_value, dict) or not all(isinstance(v, (str, int, float, bool)) for v in env_value.values()):
            problems.append(Problem("env", f"expected a mapping of variable names to values, got {show(env_value)}",
                                    "write env as `env:\\n  NAME: value`", file_label))
        else:
            env = {str(k): str(v) for k, v in env_value.items()}
            os.environ.update(env)  # as TRL's parser does: the recipe's environment applies from here on
    index = key_index(method)
    typed: dict[str, Any] = {}
    for key, value in raw.items():
        origin = origins[key]
        if not isinstance(key, str):
            problems.append(Problem(str(key)[:60], "keys must be strings", "quote the key or fix the indentation",
                                    origin))
            continue
        if key not in index:
            problems.append(_unknown_key_problem(key, origin, method))
            continue
        typed[key] = _check_value(key, value, index[key], origin, problems)
    if "output_dir" not in typed or not typed.get("output_dir"):
        problems.append(Problem("output_dir", "missing: a recipe must say where its run directory goes",
                                "add `output_dir: runs/<name>`", file_label))
    if problems:
        raise RecipeError(file_label, problems)

    # Phase 2: build the dataclasses.
    output_dir = Path(typed["output_dir"]).expanduser()
    group_values: dict[str, dict[str, Any]] = {name: {} for name, _ in groups(method)}
    for key, value in typed.items():
        group_values[index[key].group][key] = value
    config_fields = {f.name for f in dataclasses.fields(spec.config_class())}
    if spec.trains:  # the Trainer's own output_dir holds the checkpoints; the run directory is ours
        group_values["training"]["output_dir"] = str(output_dir / "checkpoints")
    if "disable_tqdm" in config_fields and "disable_tqdm" not in typed and not sys.stderr.isatty():
        # Not a terminal (a pipe, CI, a pipeline stage's log): the Trainer prints its logged numbers as
        # lines (its PrinterCallback) instead of redrawing a bar with carriage returns.
        group_values["training"]["disable_tqdm"] = True
    if "run_name" in config_fields and "run_name" not in typed:  # what trackers call the run (rundir.run_name_of)
        group_values["training"]["run_name"] = run_name_of(output_dir)
    for claimed in spec.claimed_keys & config_fields:
        group_values["training"].setdefault(claimed, False)  # TRL's own version of a key we own stays off
    if ("use_cpu" in config_fields and "use_cpu" not in typed and int(os.environ.get("WORLD_SIZE", "1")) > 1
            and not _cuda_available()):
        # A multi-process launch (accelerate launch / torchrun) on a machine without CUDA: accelerate
        # only sets up its CPU (gloo) process group when asked for the CPU, else every process trains alone.
        group_values["training"]["use_cpu"] = True
    launch_problems = _cpu_launch_problems() if "use_cpu" in config_fields else []
    if "lora_task_type" not in typed and "model" in group_values:
        group_values["model"]["lora_task_type"] = spec.lora_task_type
    built: dict[str, Any] = {}
    machine_problems: list[Problem] = list(launch_problems)
    for group, cls in groups(method):
        try:
            try:
                built[group] = _build(cls, group_values[group])
            except ValueError as err:
                # TrainingArguments refuses half precision the machine lacks (a CPU-only box): that is
                # the machine, not the recipe. Check the rest as if in full precision, and say so.
                precision = next((k for k in ("bf16", "fp16") if group_values[group].get(k, k == "bf16")
                                  and re.search(rf"{k}", str(err))), None)
                if group != "training" or precision is None or "support" not in str(err):
                    raise
                machine_problems.append(Problem(
                    precision, f"{precision} mixed precision needs a GPU that supports it; this machine has none",
                    f"run on such a GPU, or set {precision}: false here (full float32)",
                    origins.get(precision, file_label), environment=True))
                built[group] = _build(cls, {**group_values[group], "bf16": False, "fp16": False})
        except Exception as err:  # TrainingArguments/ModelConfig __post_init__ checks
            key = _key_in_message(str(err), group_values[group]) or group
            raise RecipeError(file_label, [Problem(key, f"rejected by {cls.__name__}: {_first_line(err)}",
                                                   "change the value(s) named in the message",
                                                   origins.get(key, file_label))]) from None
    recipe = Recipe(
        source=source,
        method=method,
        values=typed,
        origins=origins,
        env=env,
        gemma=built["gemma"],
        method_args=built.get("method"),
        data=built["data"],
        model=built["model"],
        training=built["training"],
        output_dir=output_dir,
    )
    # Phase 3: semantic checks (files, every dataset record, conflicts, the machine, the method's own).
    recipe.environment_problems.extend(machine_problems)
    check_recipe(recipe, file_label, check_environment=check_environment)
    return recipe


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cpu_launch_problems() -> list[Problem]:
    """An FSDP launch (`accelerate launch` with an FSDP config) of several processes on a machine without
    CUDA: refused, because it would silently train as plain DDP.

    Library behaviour relied on (accelerate 1.15, ``AcceleratorState.__init__``): the FSDP plugin is
    only taken up when the process group's type is a GPU-like one (MULTI_GPU, MULTI_NPU, MULTI_XPU,
    ...); CPU processes get MULTI_CPU and the plugin is dropped, so the Trainer wraps the model in
    DistributedDataParallel -- full replicas, no sharding, no error. (torch's own FSDP2 ``fully_shard``
    does run on CPU with gloo; the gate is accelerate's.) If accelerate starts honouring FSDP on
    CPU, this refusal is what to remove (tests/test_fsdp_cpu.py pins the behaviour).
    """
    from accelerate.utils import str_to_bool

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _cuda_available():
        return []
    if not str_to_bool(os.environ.get("ACCELERATE_USE_FSDP", "false")):
        return []
    return [Problem(
        "accelerate launch", "FSDP on CPU processes: accelerate 1.15 enables FSDP only on GPUs (and other "
        "accelerators); on CPUs it would silently train unsharded, as DDP",
        "launch with recipes/accelerate/ddp.yaml on CPUs (same results, full replicas), or use FSDP on GPUs",
        "the accelerate launch", environment=True)]


def _build(cls: type, kwargs: dict[str, Any]):
    """Build one dataclass with TRL's parser (HfArgumentParser.parse_dict), values already typed."""
    if cls.__module__.startswith("gemma_hf."):
        return cls(**kwargs)
    from trl import TrlParser

    # transformers 5 renamed `gradient_checkpointing*` to `activation_checkpointing*` and warns (FutureWarning)
    # whenever only the old name is set, while TRL's configs still default `gradient_checkpointing=True`: every
    # recipe would print the warning, whatever it says. The recipe key stays `gradient_checkpointing` (TRL's
    # name, used by every recipe and TRL's docs); it is handed over under the new name as well, which
    # TrainingArguments.__post_init__ then mirrors back to the old one.
    names = {f.name: f for f in dataclasses.fields(cls)}
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in names and new in names and kwargs.get(new) is None:
            value = kwargs.get(old, names[old].default)
            if value is not None and value is not dataclasses.MISSING:
                kwargs = {**kwargs, new: value}
    (obj,) = TrlParser(cls).parse_dict(kwargs, allow_extra_keys=False)
    return obj


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _key_in_message(message: str, candidates: dict[str, Any]) -> str | None:
    for key in sorted(candidates, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9_]){re.escape(key)}(?![A-Za-z0-9_])", message):
            return key
    return None


__all__ = ["COMMAND_LINE", "Problem", "Recipe", "RecipeError", "load_recipe", "parse_overrides", "read_yaml",
           "coerce", "yaml_scalar"]
