"""Where a dataset's records come from, read as a stream: local files, save_to_disk directories,
cached assets, Hub datasets.

:func:`iter_records` yields ``(index, record)`` one record at a time, so checking every record of
a large JSON Lines file needs no more memory than one line, and a malformed line, a non-UTF-8 byte
or a non-object record is reported with its position (:class:`SourceError`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma_hf.references import BadReference, resolve
from gemma_hf.rundir import RunDir

from .schema import DatasetSpec

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class SourceError(ValueError):
    """A dataset that cannot be read; ``key`` names the recipe key, ``fix`` what to do."""

    def __init__(self, key: str, message: str, fix: str, environment: bool = False):
        super().__init__(message)
        self.key, self.message, self.fix, self.environment = key, message, fix, environment


@dataclass(frozen=True)
class Source:
    kind: str  # "file", "disk" (save_to_disk directory), "hub"
    location: str  # absolute path, or the Hub id
    reference: str  # as written in the recipe (asset:..., a path, a Hub id)


def resolve_source(spec: DatasetSpec, key: str) -> Source:
    try:
        ref = resolve(spec.path, "dataset file")
    except BadReference as err:
        raise SourceError(key, err.message, err.fix, err.environment) from None
    if ref.kind == "hub":
        return Source("hub", ref.text, spec.path)
    if ref.kind == "stage":  # a pipeline stage's output, before the stage has run (validation reads nothing)
        raise SourceError(key, f"{spec.path!r} is the output of a pipeline stage that has not run yet",
                          "read it in a pipeline, from a stage that publishes data (method: generate)")
    local = ref.path
    if ref.kind == "run":  # a finished run directory that publishes data (generate): its dataset file
        dataset = RunDir(local).dataset_file()
        if dataset is None:
            raise SourceError(key, f"{local} is a run directory that holds no dataset (it publishes a model or "
                              "results)", "point path at a generate run, or at a data file")
        if not dataset.is_file():
            raise SourceError(key, f"{local}: its dataset {dataset.name} is missing",
                              "re-run the generate recipe that wrote it")
        local = dataset
    if local.is_file():
        if local.suffix.lower() not in FILE_BUILDERS:
            raise SourceError(key, f"{local} has an unsupported extension {local.suffix!r}",
                              f"use one of {', '.join(FILE_BUILDERS)} or a save_to_disk directory")
        if not spec.split.startswith("train"):
            raise SourceError(key.rsplit(".", 1)[0] + ".split",
                              f"a single data file has only the 'train' split, not {spec.split!r}",
                              "set split: train (or a slice such as train[:100]), or remove the key")
        return Source("file", str(local), spec.path)
    if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
        return Source("disk", str(local), spec.path)
    raise SourceError(key, f"{local} is a directory but not a datasets.save_to_disk directory (no dataset_info.json "
                      "or dataset_dict.json)", "point path at a data file, or save the dataset with save_to_disk")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """The whole file as UTF-8; a bad byte is reported with its line, never silently replaced."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise SourceError("path", f"{path} is not UTF-8 text: byte {data[err.start:err.start + 1]!r} on line {line} "
                          f"(offset {err.start}): {err.reason}", "convert the file to UTF-8") from None


def _first_char(path: Path) -> str:
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return chr(stripped[0])


def _iter_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """One record per line, streamed: a bad line (JSON or UTF-8) is reported with its number."""
    index = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SourceError("path", f"{path}: line {number} (record {index}) is not UTF-8 text: byte "
                                  f"{raw[err.start:err.start + 1]!r} at column {err.start + 1}",
                                  "convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                yield index, json.loads(line)
            except ValueError as err:
                raise SourceError("path", f"{path}: line {number} (record {index}) is not valid JSON: {err}",
                                  "fix or remove that line") from None
            index += 1


def _iter_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(_read_text(path))
    except ValueError as err:
        if isinstance(err, SourceError):
            raise
        raise SourceError("path", f"{path} is not valid JSON: {err}", "fix the file") from None
    if isinstance(data, dict):
        raise SourceError("path", f"{path} holds one JSON object, not a list of records (nested data needs converting "
                          "first)", "write the records as a JSON list or as JSON Lines")
    if not isinstance(data, list):
        raise SourceError("path", f"{path} holds a JSON {type(data).__name__}, not a list of records",
                          "write the records as a JSON list or as JSON Lines")
    yield from enumerate(data)


def parses_whole(source: Source) -> bool:
    """Whether reading ``source`` holds the whole file in memory: a JSON array or a CSV file (read whole
    to report a bad byte with its line). JSON Lines, Parquet, save_to_disk and the Hub stream."""
    if source.kind != "file":
        return False
    path = Path(source.location)
    suffix = path.suffix.lower()
    return suffix == ".csv" or (suffix == ".json" and _first_char(path) != "{")


def _iter_file(path: Path, split: str) -> Iterator[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and _first_char(path) == "{"):
        records = _iter_json_lines(path)
    elif suffix == ".json":
        records = _iter_json_array(path)
    elif suffix == ".csv":
        records = enumerate(csv.DictReader(io.StringIO(_read_text(path), newline="")))
    elif suffix == ".parquet":
        def rows():
            import pyarrow.parquet as pq

            index = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    yield index, row
                    index += 1
        records = rows()
    else:  # pragma: no cover - resolve_source filters extensions
        raise SourceError("path", f"unsupported file {path}", f"use one of {', '.join(FILE_BUILDERS)}")
    yield from _sliced(records, split)


def _sliced(records: Iterator[tuple[int, Any]], split: str) -> Iterator[tuple[int, Any]]:
    """Apply a datasets-style slice of the train split (train[:100], train[10:20]); percentages
    need the length and are applied by reading everything first."""
    if "[" not in split:
        yield from records
        return
    inner = split[split.index("[") + 1: split.rindex("]")]
    start_text, _, stop_text = inner.partition(":")
    if "%" in inner:
        items = list(records)
        total = len(items)

        def bound(text, default):
            text = text.strip()
            if not text:
                return default
            return round(float(text.rstrip("%")) * total / 100) if text.endswith("%") else int(text)
        start, stop = bound(start_text, 0), bound(stop_text, total)
        yield from items[start:stop]
        return
    start = int(start_text) if start_text.strip() else 0
    stop = int(stop_text) if stop_text.strip() else None
    for index, record in records:
        if index < start:
            continue
        if stop is not None and index >= stop:
            return
        yield index, record


def _open_disk(location: str, split: str):
    import datasets

    loaded = datasets.load_from_disk(location)
    if isinstance(loaded, datasets.DatasetDict):
        base = split.split("[")[0]
        if base not in loaded:
            raise SourceError("split", f"{location}: split {base!r} is not one of {sorted(loaded)}",
                              "choose one of the saved splits")
        loaded = loaded[base]
    return loaded


def iter_records(spec: DatasetSpec, source: Source, key: str) -> Iterator[tuple[int, Any]]:
    """``(index, record)`` for every record of one dataset, streamed; SourceError names ``key``."""
    try:
        if source.kind == "file":
            yield from _iter_file(Path(source.location), spec.split)
        elif source.kind == "disk":
            dataset = _open_disk(source.location, spec.split)
            if "[" in spec.split:
                raise SourceError("split", "split slices are not supported for save_to_disk directories",
                                  "use fraction instead")
            yield from enumerate(dataset)
        else:
            import datasets

            yield from enumerate(datasets.load_dataset(source.location, name=spec.name, split=spec.split,
                                                       streaming=True))
    except SourceError as err:
        err.key = f"{key}.{err.key}" if not err.key.startswith(key) else err.key
        raise
    except (ValueError, OSError) as err:
        raise SourceError(f"{key}.path", f"cannot read {source.location}: {err}", "fix or convert the file") from None


def columns_of(spec: DatasetSpec, source: Source, key: str, first_records: int = 1) -> list[str]:
    """The column names of a dataset (from its schema, or its first records)."""
    if source.kind == "file" and Path(source.location).suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(source.location).schema_arrow.names)
    if source.kind == "disk":
        return list(_open_disk(source.location, spec.split).column_names)
    names: list[str] = []
    for count, (_, record) in enumerate(iter_records(spec, source, key)):
        if isinstance(record, dict):
            names.extend(k for k in record if k not in names)
        if count + 1 >= first_records:
            break
    return names


__all__ = ["FILE_BUILDERS", "Source", "SourceError", "resolve_source", "iter_records", "columns_of", "parses_whole"]
