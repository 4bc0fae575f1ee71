"""Recipe loading and validation. Everything here runs before any model weights are loaded.

:func:`load_recipe` reads the YAML, applies command-line overrides (``--key value``), checks every
key (unknown keys get a "did you mean"), every value's type, builds the dataclasses (see
:mod:`gemma_hf.recipes.schema`), then checks what the dataclasses cannot: files exist, datasets
have the columns their format needs (reading their first records), and options do not conflict
(fp16 on Gemma 2/3, sdpa with an attention soft-cap, packing without max_length, QLoRA without
LoRA, ...). All problems are gathered into one :class:`RecipeError` that names the file, each key
and its fix; the CLI prints it and exits with status 2.

Problems that depend on the machine rather than the recipe (no CUDA GPU for QLoRA, a Hub model
that is not downloaded while offline) are *environment* problems: ``gemma-hf validate`` reports
them and still passes (the recipe is right; it needs another machine), ``gemma-hf sft`` refuses
to start.

Library behaviours relied on (easy to break on upgrades):
- TRL's ``TrlParser`` would set YAML values as argparse defaults without converting or checking
  their types (``learning_rate: 1e-4`` is a *string* to PyYAML); we check and convert each value
  against the dataclass annotations first, then build the dataclasses with TRL's parser
  (``parse_dict``), so what TRL receives is already typed.
- ``SFTConfig.__post_init__`` (TrainingArguments) raises ValueError for some conflicts; we turn
  those into problems naming the key the message mentions.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .schema import (
    ASSET_SCHEME,
    CHAT_FAMILIES,
    DataArguments,
    DatasetSpec,
    GemmaArguments,
    KeyInfo,
    REFUSED_TRAINING_KEYS,
    RENAMED_KEYS,
    groups,
    key_index,
)

COMMAND_LINE = "the command line"
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
GEMMA_MODEL_TYPES = {"gemma_hf": None, "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


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


class RecipeError(Exception):
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


# --------------------------------------------------------------------------------------------
# The loaded recipe
# --------------------------------------------------------------------------------------------


@dataclass
class Recipe:
    """A checked recipe: the dataclasses plus what validation resolved."""

    source: Path | None
    method: str
    values: dict[str, Any]  # every key set by the file or the command line, typed, in order
    origins: dict[str, str]
    env: dict[str, str]
    gemma: GemmaArguments
    data: DataArguments
    model: Any  # trl.ModelConfig
    training: Any  # trl.SFTConfig (its output_dir is output_dir/checkpoints)
    output_dir: Path
    # Resolved by validation:
    family: str = "gemma2"
    model_path: str | None = None  # local directory or Hub id; None for preset random init
    tokenizer_path: str | None = None
    architecture: Any = None  # GemmaHFConfig when known (from the checkpoint or the preset)
    notes: list[str] = field(default_factory=list)
    environment_problems: list[Problem] = field(default_factory=list)

    def to_yaml(self) -> str:
        """The resolved recipe (file + command-line overrides) as YAML, loadable by load_recipe."""
        header = f"# Resolved {self.method} recipe"
        if self.source is not None:
            header += f" from {self.source}"
        overridden = [k for k, o in self.origins.items() if o == COMMAND_LINE]
        if overridden:
            header += f"\n# overridden on the command line: {', '.join(overridden)}"
        body: dict[str, Any] = {}
        if self.env:
            body["env"] = dict(self.env)
        for key, value in self.values.items():
            body[key] = _plain(value)
        return header + "\n" + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=100)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if getattr(value, f.name) != f.default}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


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


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(path, [Problem("config", f"recipe file {path} does not exist" if not path.exists()
                                         else f"{path} is not a file", "pass the path of a recipe YAML file")])
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        key = "yaml"
        match = re.search(r"duplicate key '([^']+)'", str(problem))
        if match:
            key = match.group(1)
        raise RecipeError(path, [Problem(key, f"not valid YAML{where}: {problem}", "fix the YAML syntax")]) from None
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
            values[name] = raw  # reported as an unknown key, with a suggestion, by _check_keys
            continue
        info = index[name]
        try:
            values[name] = _from_command_line(info, raw, negated)
        except ValueError as err:
            problems.append(Problem(name, str(err), f"give --{name} a value of type {_type_name(info)}", COMMAND_LINE))
    return values, problems


def _from_command_line(info: KeyInfo, raw: list[str], negated: bool) -> Any:
    arms = _arms(_annotation(info))
    if negated:
        if bool not in arms:
            raise ValueError(f"--no_{info.key} is only for true/false keys")
        return False
    if not raw:
        if bool in arms:
            return True
        raise ValueError("needs a value")
    list_arm = next((a for a in arms if typing.get_origin(a) is list), None)
    if len(raw) > 1:
        if list_arm is None:
            raise ValueError(f"takes one value, got {len(raw)}: {raw}")
        return [_scalar_from_text(text, typing.get_args(list_arm)[0] if typing.get_args(list_arm) else Any) for text in raw]
    return _scalar_from_text(raw[0], _annotation(info))


def _scalar_from_text(text: str, annotation: Any) -> Any:
    arms = _arms(annotation)
    textual = str in arms or any(isinstance(a, type) and issubclass(a, enum.Enum) for a in arms)
    parsed = _yaml_scalar(text)
    if textual and isinstance(parsed, bool) and bool not in arms:
        return text  # `--eval_strategy no`: the word, not YAML's false
    if textual and not isinstance(parsed, (list, dict, bool)) and not (parsed is None and type(None) in arms):
        # keep strings as typed (e.g. --hub_model_id 007) unless a number/bool arm fits better
        if isinstance(parsed, (int, float)) and any(a in (int, float) for a in arms):
            return parsed
        return text
    return parsed


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------


_HINTS: dict[type, dict[str, Any]] = {}


def _annotation(info: KeyInfo) -> Any:
    if info.cls not in _HINTS:
        _HINTS[info.cls] = typing.get_type_hints(info.cls)
    return _HINTS[info.cls][info.key]


def _arms(annotation: Any) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _describe(annotation: Any) -> str:
    arms = _arms(annotation)
    names = []
    for arm in arms:
        if arm is type(None):
            names.append("null")
        elif isinstance(arm, type) and issubclass(arm, enum.Enum):
            names.append("one of " + ", ".join(repr(e.value) for e in arm))
        elif typing.get_origin(arm) is list:
            names.append("a list")
        elif typing.get_origin(arm) is dict or arm is dict:
            names.append("a mapping")
        elif typing.get_origin(arm) is typing.Literal:
            names.append("one of " + ", ".join(repr(v) for v in typing.get_args(arm)))
        elif isinstance(arm, type):
            names.append({bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(arm, arm.__name__))
        else:
            names.append(str(arm))
    return " or ".join(dict.fromkeys(names))


def _type_name(info: KeyInfo) -> str:
    return _describe(_annotation(info))


class _Mismatch(ValueError):
    pass


def coerce(value: Any, annotation: Any, where: str = "") -> Any:
    """``value`` converted to ``annotation``, or _Mismatch. Strict matches win over lenient ones."""
    arms = _arms(annotation)
    for lenient in (False, True):
        for arm in arms:
            try:
                return _coerce_arm(value, arm, lenient, where)
            except _Mismatch:
                continue
    raise _Mismatch(f"expected {_describe(annotation)}, got {_show(value)}")


def _show(value: Any) -> str:
    kind = {bool: "true/false", int: "integer", float: "number", str: "string", list: "list", dict: "mapping",
            type(None): "null"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) < 60 else text[:57] + '...'}"


def _coerce_arm(value: Any, arm: Any, lenient: bool, where: str) -> Any:
    origin = typing.get_origin(arm)
    if arm is Any:
        return value
    if arm is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is typing.Literal:
        if value in typing.get_args(arm):
            return value
        raise _Mismatch
    if arm is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if arm is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if lenient and isinstance(value, (float, str)) and not isinstance(value, bool):
            number = _to_float(value)
            if number is not None and number.is_integer():
                return int(number)
        raise _Mismatch
    if arm is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if lenient and isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            number = _to_float(value)
            if number is not None:
                return number
        raise _Mismatch
    if arm is str:
        if isinstance(value, str):
            return value
        if lenient and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if isinstance(arm, type) and issubclass(arm, enum.Enum):
        if isinstance(value, arm):
            return value
        if isinstance(value, str) and value in {e.value for e in arm}:
            return value
        if lenient and value is False and "no" in {e.value for e in arm}:
            return "no"  # YAML 1.1 reads an unquoted `no` (eval_strategy: no) as false
        raise _Mismatch
    if origin is list or arm is list:
        (item,) = typing.get_args(arm) or (Any,)
        if isinstance(value, (list, tuple)):
            return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        if lenient and value is not None and not isinstance(value, dict):
            return [coerce(value, item, where)]
        raise _Mismatch
    if origin is dict or arm is dict:
        key_type, value_type = typing.get_args(arm) or (Any, Any)
        if isinstance(value, dict):
            return {coerce(k, key_type): coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
        raise _Mismatch
    if dataclasses.is_dataclass(arm):
        if isinstance(value, arm):
            return value
        raise _Mismatch  # nested dataclasses are handled by the caller (datasets)
    # Types we cannot check (e.g. accelerate's ParallelismConfig): TRL/transformers check them.
    return value


def _to_float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Checks, phase 1: keys and types
# --------------------------------------------------------------------------------------------


def _suggest(key: str, candidates) -> str | None:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_key_problem(key: str, origin: str, method: str) -> Problem:
    if key in REFUSED_TRAINING_KEYS:
        return Problem(key, f"not used by gemma-hf {method}: {REFUSED_TRAINING_KEYS[key]}", "remove it", origin)
    if key in RENAMED_KEYS:
        return Problem(key, f"unknown key; its place is taken by {RENAMED_KEYS[key]}",
                       f"use {RENAMED_KEYS[key].split(' ')[0]} instead", origin)
    suggestion = _suggest(key, key_index(method))
    message = f"unknown key. Did you mean {suggestion!r}?" if suggestion else "unknown key"
    fix = f"rename it to {suggestion!r}" if suggestion else "remove it"
    return Problem(key, message, f"{fix} (`gemma-hf {method} --help-keys` lists every key)", origin)


def _check_value(key: str, value: Any, info: KeyInfo, origin: str, problems: list[Problem]) -> Any:
    if key == "datasets":
        return _check_datasets(value, origin, problems)
    try:
        typed = coerce(value, _annotation(info), key)
    except _Mismatch as err:
        problems.append(Problem(key, f"wrong type: {err}", f"set {key} to {_type_name(info)}", origin))
        return None
    choices = info.field.metadata.get("choices")
    if choices and typed is not None and typed not in choices:
        suggestion = _suggest(str(typed), [str(c) for c in choices])
        hint = f" Did you mean {suggestion!r}?" if suggestion else ""
        problems.append(Problem(key, f"{typed!r} is not allowed.{hint}", f"use one of {', '.join(map(repr, choices))}",
                                origin))
    enum_arm = next((a for a in _arms(_annotation(info)) if isinstance(a, type) and issubclass(a, enum.Enum)), None)
    if enum_arm is not None and isinstance(typed, str) and typed not in {e.value for e in enum_arm}:
        allowed = [e.value for e in enum_arm]
        suggestion = _suggest(typed, allowed)
        hint = f" Did you mean {suggestion!r}?" if suggestion else ""
        problems.append(Problem(key, f"{typed!r} is not allowed.{hint}", f"use one of {', '.join(map(repr, allowed))}",
                                origin))
    return typed


def _check_datasets(value: Any, origin: str, problems: list[Problem]) -> list[DatasetSpec] | None:
    if isinstance(value, str):  # from the command line: a YAML/JSON list
        value = _yaml_scalar(value)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        problems.append(Problem("datasets", f"wrong type: expected a list of {{path: ...}} mappings, got {_show(value)}",
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
            problems.append(Problem(key, f"expected a mapping such as {{path: data.jsonl}}, got {_show(entry)}",
                                    "give each dataset as a mapping with at least `path`", origin))
            continue
        kwargs, ok = {}, True
        for name, item in entry.items():
            if name not in names:
                suggestion = _suggest(str(name), names)
                hint = f" Did you mean {suggestion!r}?" if suggestion else ""
                problems.append(Problem(f"{key}.{name}", f"unknown dataset key.{hint}",
                                        f"dataset keys are: {', '.join(names)}", origin))
                ok = False
                continue
            try:
                kwargs[name] = coerce(item, hints[name], f"{key}.{name}")
            except _Mismatch as err:
                problems.append(Problem(f"{key}.{name}", f"wrong type: {err}",
                                        f"set it to {_describe(hints[name])}", origin))
                ok = False
                continue
            choices = names[name].metadata.get("choices")
            if choices and kwargs[name] not in choices:
                suggestion = _suggest(str(kwargs[name]), choices)
                hint = f" Did you mean {suggestion!r}?" if suggestion else ""
                problems.append(Problem(f"{key}.{name}", f"{kwargs[name]!r} is not allowed.{hint}",
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
    """Read, check and build a recipe. Raises :class:`RecipeError` with every problem found.

    ``path``: the YAML file (or None with ``values``, a dict of keys, for programmatic use).
    ``overrides``: command-line tokens, ``["--learning_rate", "1e-4", ...]``.
    """
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
            problems.append(Problem("env", f"expected a mapping of variable names to values, got {_show(env_value)}",
                                    "write env as `env:\\n  NAME: value`", file_label))
        else:
            env = {str(k): str(v) for k, v in env_value.items()}
            os.environ.update(env)  # as TRL's parser does: the recipe's environment applies from here on
    index = key_index(method)
    typed: dict[str, Any] = {}
    for key, value in raw.items():
        origin = origins[key]
        if not isinstance(key, str):
            problems.append(Problem(str(key), "keys must be strings", "quote the key or fix the indentation", origin))
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
    group_values["training"]["output_dir"] = str(output_dir / "checkpoints")
    group_values["training"]["assistant_only_loss"] = False  # ours handles it: see tokenization.py
    if "use_cpu" not in typed and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _cuda_available():
        # A multi-process launch (accelerate launch / torchrun) on a machine without CUDA: accelerate
        # only sets up its CPU (gloo) process group when asked for the CPU, else every process trains alone.
        group_values["training"]["use_cpu"] = True
    built: dict[str, Any] = {}
    machine_problems: list[Problem] = []
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
        data=built["data"],
        model=built["model"],
        training=built["training"],
        output_dir=output_dir,
    )
    # Phase 3: semantic checks (files, datasets, conflicts, the machine).
    recipe.environment_problems.extend(machine_problems)
    from .validation import check_recipe

    check_recipe(recipe, file_label, check_environment=check_environment)
    return recipe


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _build(cls: type, kwargs: dict[str, Any]):
    """Build one dataclass with TRL's parser (HfArgumentParser.parse_dict), values already typed."""
    if cls in (GemmaArguments, DataArguments):
        return cls(**kwargs)
    from trl import TrlParser

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


def is_asset_reference(value: str | None) -> bool:
    return isinstance(value, str) and value.startswith(ASSET_SCHEME)


__all__ = [
    "COMMAND_LINE",
    "CHAT_FAMILIES",
    "Problem",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "parse_overrides",
    "read_yaml",
    "coerce",
]
