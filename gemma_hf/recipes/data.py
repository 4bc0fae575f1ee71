"""The dataset mixture of a recipe: every record read, checked and made canonical, then the split.

:func:`read_dataset` streams one dataset's records (gemma_hf.recipes.sources), converts each to the
method's canonical data format (gemma_hf.recipes.formats) and checks it: roles, strings, control
tokens written as text, the chat renders in the family's format, preference pairs that differ, ...
Every record is checked -- validation and the run read the same records through the same code --
and a bad record is reported with its index, the column at fault and the fix.

:func:`load_mixture` builds the ``datasets.Dataset`` of the mixture (fractions applied, seeded),
and splits off the held-out set. The canonical records are kept in memory (``Dataset.from_list``),
which suits the instruction and preference sets this project trains on (up to a few hundred
thousand records); Hub datasets are streamed the same way. A recipe with ``streaming: true`` keeps
counts instead (``read_dataset(..., keep_records=False)``) and reads its records again as a stream
(gemma_hf.recipes.streaming, :func:`iter_canonical`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from gemma_hf.chat import CONTROL_TOKENS
from gemma_hf.evaluation.preference_sets import BUILDS, preference_pairs

from .formats import RecordError, canonical, describe_formats, detect_format, required_columns
from .schema import DataArguments, DatasetSpec
from .sources import Source, SourceError, columns_of, iter_records, resolve_source

MAX_PROBLEMS_PER_DATASET = 5
log = logging.getLogger(__name__)


@dataclass
class DatasetProblem:
    key: str
    message: str
    fix: str
    environment: bool = False


@dataclass
class ReadDataset:
    """One dataset of the mixture, read and checked."""

    spec: DatasetSpec
    source: Source
    format: str | None
    records: list[dict] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # each record's index in its source (a split slice counts from 0)
    problems: list[DatasetProblem] = field(default_factory=list)
    bad_records: int = 0
    count: int = 0  # good records read (kept in `records` too, unless read with keep_records=False)

    @property
    def num_examples(self) -> int:
        return self.count


def _renamed(spec: DatasetSpec, record):
    if spec.columns and isinstance(record, dict):
        return {spec.columns.get(name, name): value for name, value in record.items()}
    return record


def read_dataset(spec: DatasetSpec, index: int, data_format: str, family: str,
                 forbidden_tokens: tuple[str, ...] = CONTROL_TOKENS, keep_records: bool = True) -> ReadDataset:
    """Read every record of ``spec`` as a canonical ``data_format`` record; problems are collected
    (at most MAX_PROBLEMS_PER_DATASET listed, all counted), never raised. ``keep_records=False``
    (a streamed mixture) checks every record the same way but keeps only the count."""
    key = f"datasets[{index}]"
    if spec.build is not None:
        return _read_built(spec, index, data_format, family, forbidden_tokens, keep_records)
    try:
        source = resolve_source(spec, f"{key}.path")
    except SourceError as err:
        out = ReadDataset(spec, Source("missing", spec.path, spec.path), None)
        out.problems.append(DatasetProblem(err.key, err.message, err.fix, err.environment))
        return out
    out = ReadDataset(spec, source, None)
    try:
        columns = columns_of(spec, source, key, first_records=8)
    except SourceError as err:
        out.problems.append(DatasetProblem(err.key, err.message, err.fix, err.environment))
        return out
    if spec.columns:
        absent = [name for name in spec.columns if name not in columns]
        if absent:
            out.problems.append(DatasetProblem(f"{key}.columns", f"renames columns {absent} that {spec.path} does "
                                               f"not have (it has {columns})", "rename existing columns only"))
            return out
        columns = [spec.columns.get(name, name) for name in columns]
    fmt = detect_format(columns, data_format, spec.format)
    if fmt is None:
        if spec.format != "auto":
            out.problems.append(DatasetProblem(
                f"{key}.format", f"{spec.format!r} is not a format of {data_format} data",
                f"use one of: {describe_formats(data_format)} (or auto)"))
        else:
            out.problems.append(DatasetProblem(
                f"{key}.path", f"{spec.path}: its columns {columns} fit no known {data_format} format ("
                f"{describe_formats(data_format)})",
                f"rename columns with `columns:` (e.g. {{{columns[0] if columns else 'question'}: prompt}}), or "
                "fix the data"))
        return out
    missing = [c for c in required_columns(data_format, fmt) if c not in columns]
    if missing:
        out.problems.append(DatasetProblem(f"{key}.format", f"format {fmt} needs the columns {missing}, which "
                                           f"{spec.path} lacks (it has {columns})",
                                           "rename columns with `columns:`, or choose the right format"))
        return out
    out.format = fmt
    try:
        for row, record in iter_records(spec, source, key):
            try:
                checked = canonical(_renamed(spec, record), data_format, fmt, family, forbidden_tokens)
            except RecordError as err:
                out.bad_records += 1
                if len(out.problems) < MAX_PROBLEMS_PER_DATASET:
                    out.problems.append(DatasetProblem(
                        f"{key}.path", f"{spec.path}: record {row}, key '{err.key}': {err.message}", err.fix))
                continue
            out.count += 1
            if keep_records:
                out.records.append(checked)
                out.rows.append(row)
    except SourceError as err:
        out.problems.append(DatasetProblem(err.key, err.message, err.fix, err.environment))
        return out
    if out.bad_records > MAX_PROBLEMS_PER_DATASET:
        out.problems.append(DatasetProblem(f"{key}.path", f"{spec.path}: {out.bad_records} bad records in all (the "
                                           f"first {MAX_PROBLEMS_PER_DATASET} are listed)", "fix or drop them"))
    if not out.count and not out.problems:
        out.problems.append(DatasetProblem(f"{key}.path", f"{spec.path} holds no records", "point it at a file with data"))
    return out


def _build_problem(spec: DatasetSpec, key: str, data_format: str) -> DatasetProblem | None:
    if data_format != "preference":
        return DatasetProblem(f"{key}.build", f"builds preference pairs, but this recipe reads {data_format} data",
                              "remove build (only reward recipes train on built pairs)")
    kinds = spec.build if isinstance(spec.build, list) else None
    if not kinds or any(not isinstance(k, str) for k in kinds):
        return DatasetProblem(f"{key}.build", f"{spec.build!r} is not a list of kinds",
                              f"write e.g. build: [off_topic, truncated] (kinds: {', '.join(BUILDS)})")
    unknown = [k for k in kinds if k not in BUILDS]
    if unknown or len(set(kinds)) != len(kinds):
        return DatasetProblem(f"{key}.build", f"{unknown or kinds}: " + ("not kinds of built pairs" if unknown else
                                                                       "a kind named twice"),
                              f"use each of {', '.join(BUILDS)} at most once")
    if spec.build_size is not None and (isinstance(spec.build_size, bool) or not isinstance(spec.build_size, int)
                                        or spec.build_size < 1):
        return DatasetProblem(f"{key}.build_size", f"{spec.build_size!r} is not a count of pairs",
                              "use a whole number of 1 or more, or remove it (one pair per record)")
    if spec.format not in ("auto", "messages", "sharegpt", "alpaca", "prompt_completion"):
        return DatasetProblem(f"{key}.format", f"build reads instruction records, not {spec.format!r} records",
                              "use format: auto (or alpaca, sharegpt, messages, prompt_completion)")
    return None


def _read_built(spec: DatasetSpec, index: int, data_format: str, family: str, forbidden_tokens,
                keep_records: bool) -> ReadDataset:
    """A dataset with ``build``: its instruction records read and checked as conversations, then turned into
    preference pairs by rule (gemma_hf.evaluation.preference_sets), each checked as any pair is, with its
    ``kind``. A build that gives no pair (records too short for its kinds) is a problem."""
    key = f"datasets[{index}]"
    problem = _build_problem(spec, key, data_format)
    if problem is not None:
        out = ReadDataset(spec, Source("missing", spec.path, spec.path), None)
        out.problems.append(problem)
        return out
    read = read_dataset(replace(spec, build=None), index, "conversation", family, forbidden_tokens)
    out = ReadDataset(spec, read.source, read.format, problems=read.problems, bad_records=read.bad_records)
    if read.problems:
        return out
    pairs = preference_pairs(read.records, spec.build, spec.build_size, spec.build_seed)
    for number, pair in enumerate(pairs):
        kind = pair.pop("kind")
        try:
            checked = canonical(pair, "preference", "preference", family, forbidden_tokens)
        except RecordError as err:  # not expected: built from checked records
            raise RuntimeError(f"{spec.path}: built pair {number} ({kind}) is not a valid pair: {err.message}") from None
        out.count += 1
        if keep_records:
            out.records.append({**checked, "origin": kind})
            out.rows.append(number)
    if spec.build_size is not None and 0 < out.count < spec.build_size:
        log.warning("%s.build: %s gives %d pairs, not build_size %d (its %d records give one pair each at most, none where "
                    "the answer is too short for its kind)", key, spec.path, out.count, spec.build_size, read.count)
    if not out.count:
        out.problems.append(DatasetProblem(f"{key}.build", f"{spec.path}: its {read.count} records give no "
                                           f"{'/'.join(spec.build)} pair (answers too short)",
                                           "add a kind every record can give (off_topic, echo), or other data"))
    return out


def iter_canonical(part: ReadDataset, index: int, data_format: str, family: str,
                   forbidden_tokens: tuple[str, ...] = CONTROL_TOKENS) -> Iterator[dict]:
    """The canonical records of a dataset that :func:`read_dataset` read and checked, read again from
    its source in the same order (a streamed mixture reads them once per epoch). A record that no
    longer converts, or a source that no longer reads, means the data changed since it was checked:
    RuntimeError, never a record skipped in silence."""
    key = f"datasets[{index}]"
    try:
        for row, record in iter_records(part.spec, part.source, key):
            try:
                yield canonical(_renamed(part.spec, record), data_format, part.format, family, forbidden_tokens)
            except RecordError as err:
                raise RuntimeError(f"{part.spec.path}: record {row} changed since it was checked and is now bad "
                                   f"(key '{err.key}': {err.message})") from None
    except SourceError as err:
        raise RuntimeError(f"{part.spec.path} can no longer be read as it was when checked: {err.message}") from None


@dataclass
class Mixture:
    records: Any  # datasets.Dataset of canonical records, before the held-out split
    parts: list[ReadDataset]
    taken: list[int]  # records of each part in the mixture (after its fraction)


def _fill_optional(records: list[dict], data_format: str) -> None:
    """Give every record the optional columns any record of the mixture has (Arrow needs one schema)."""
    defaults = {"preference": {"margin": 0.0}, "prompt": {"reference": None}}.get(data_format, {})
    for name, default in defaults.items():
        if any(name in r for r in records):
            for r in records:
                r.setdefault(name, default)


def load_mixture(parts: list[ReadDataset], data_format: str, seed: int) -> Mixture:
    """The training mixture: each dataset's records, its ``fraction`` a seeded random subset."""
    import datasets

    all_records: list[list[dict]] = []
    for part in parts:
        records = part.records
        if part.spec.fraction < 1.0:
            keep = max(1, round(part.spec.fraction * len(records)))
            order = datasets.Dataset.from_dict({"i": list(range(len(records)))}).shuffle(seed=seed)["i"][:keep]
            records = [records[i] for i in order]
        all_records.append(records)
    if data_format == "preference":
        # Each pair's origin -- its dataset's file name, or the kind of a built pair -- so that a reward
        # model's held-out accuracy can be read by origin (gemma_hf.recipes.reward).
        for part, records in zip(parts, all_records):
            name = _origin_name(part.spec.path)
            for r in records:
                r["origin"] = r.get("origin") or name
    flat = [r for records in all_records for r in records]
    _fill_optional(flat, data_format)
    return Mixture(datasets.Dataset.from_list(flat), parts, [len(r) for r in all_records])


def _origin_name(path: str) -> str:
    """A short name for a dataset's pairs: the stem of its file (``dpo_en_demo``), or the path's last part."""
    last = path.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    stem = last.rsplit(".", 1)[0] if "." in last else last
    return re.sub(r"[^0-9a-zA-Z]+", "_", stem).strip("_").lower() or "data"


def held_out_seed(data: DataArguments, seed: int) -> int:
    """The seed of the held-out split: ``split_seed`` if set, else the training ``seed``."""
    return seed if data.split_seed is None else data.split_seed


def held_out_count(size: int | float | None, total: int) -> int:
    """How many of ``total`` records ``test_split_size`` holds out (the in-memory split, a stream's and validation's count alike)."""
    if size is None:
        return 0
    return math.ceil(size * total) if isinstance(size, float) else int(size)


def split_held_out(dataset, data: DataArguments, seed: int):
    """(train, held-out or None): datasets' seeded train_test_split by ``test_split_size``, seeded by
    ``split_seed`` if set, else ``seed`` (the training seed)."""
    if data.test_split_size is None:
        return dataset, None
    split = dataset.train_test_split(test_size=data.test_split_size, seed=held_out_seed(data, seed), shuffle=True)
    return split["train"], split["test"]


__all__ = ["DatasetProblem", "ReadDataset", "Mixture", "read_dataset", "iter_canonical", "load_mixture", "held_out_seed",
           "held_out_count",
           "split_held_out", "MAX_PROBLEMS_PER_DATASET"]
