"""Types of recipe values: checking and converting a YAML or command-line value against the
annotation of the dataclass field it sets (``float | None``, ``list[str]``, enums, ...).

PyYAML reads ``1e-4`` (no dot) as a string and ``no`` as false; TRL's parser would hand such values
to the dataclasses unchecked. :func:`coerce` converts them strictly first (an int where an int is
expected), leniently second (``"1e-4"`` where a float is expected), and raises :class:`Mismatch`
with a readable description otherwise.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any

from .schema import KeyInfo

_HINTS: dict[type, dict[str, Any]] = {}


def annotation(info: KeyInfo) -> Any:
    if info.cls not in _HINTS:
        _HINTS[info.cls] = typing.get_type_hints(info.cls)
    return _HINTS[info.cls][info.key]


def arms(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def describe(hint: Any) -> str:
    names = []
    for arm in arms(hint):
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


def type_name(info: KeyInfo) -> str:
    return describe(annotation(info))


class Mismatch(ValueError):
    pass


def coerce(value: Any, hint: Any, where: str = "") -> Any:
    """``value`` converted to the type ``hint``, or Mismatch. Strict matches win over lenient ones."""
    for lenient in (False, True):
        for arm in arms(hint):
            try:
                return _coerce_arm(value, arm, lenient, where)
            except Mismatch:
                continue
    raise Mismatch(f"expected {describe(hint)}, got {show(value)}")


def show(value: Any) -> str:
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
        raise Mismatch
    if origin is typing.Literal:
        if value in typing.get_args(arm):
            return value
        raise Mismatch
    if arm is bool:
        if isinstance(value, bool):
            return value
        raise Mismatch
    if arm is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if lenient and isinstance(value, (float, str)) and not isinstance(value, bool):
            number = _to_float(value)
            if number is not None and number.is_integer():
                return int(number)
        raise Mismatch
    if arm is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if lenient and isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            number = _to_float(value)
            if number is not None:
                return number
        raise Mismatch
    if arm is str:
        if isinstance(value, str):
            return value
        if lenient and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise Mismatch
    if isinstance(arm, type) and issubclass(arm, enum.Enum):
        if isinstance(value, arm):
            return value
        if isinstance(value, str) and value in {e.value for e in arm}:
            return value
        if lenient and value is False and "no" in {e.value for e in arm}:
            return "no"  # YAML 1.1 reads an unquoted `no` (eval_strategy: no) as false
        raise Mismatch
    if origin is list or arm is list:
        (item,) = typing.get_args(arm) or (Any,)
        if isinstance(value, (list, tuple)):
            return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        if lenient and value is not None and not isinstance(value, dict):
            return [coerce(value, item, where)]
        raise Mismatch
    if origin is dict or arm is dict:
        key_type, value_type = typing.get_args(arm) or (Any, Any)
        if isinstance(value, dict):
            return {coerce(k, key_type): coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
        raise Mismatch
    if dataclasses.is_dataclass(arm):
        if isinstance(value, arm):
            return value
        raise Mismatch  # nested dataclasses are handled by the caller (datasets)
    # Types we cannot check (e.g. accelerate's ParallelismConfig): TRL/transformers check them.
    return value


def _to_float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


__all__ = ["Mismatch", "coerce", "describe", "type_name", "annotation", "arms", "show"]
