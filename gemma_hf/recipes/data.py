"""Datasets of a recipe: where they come from, what format their records have, and the mixture.

Every record becomes one conversation, ``messages = [{"role", "content"}, ...]``, whatever its
source format:

=================  ==========================  ===============================================
format             columns                     conversation
=================  ==========================  ===============================================
messages           messages                    as is (roles system/user/assistant/model)
sharegpt           conversations               {from: human/gpt/system, value} -> role/content
prompt_completion  prompt, completion          user: prompt, assistant: completion
alpaca             instruction, output         user: instruction (+ "\\n\\n" + input), assistant: output
                   (input optional)
=================  ==========================  ===============================================

``columns`` renames source columns first, so ``{question: prompt, answer: completion}`` makes a
question/answer file a prompt_completion one.

Validation reads only the first records of each source (:func:`peek`); the run loads them all
(:func:`load_mixture`).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .schema import ASSET_SCHEME, DataArguments, DatasetSpec

FORMAT_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
}
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}
PEEK_RECORDS = 8


class DataError(ValueError):
    """A dataset problem; ``key`` names the recipe key (e.g. ``datasets[0].path``)."""

    def __init__(self, key: str, message: str, fix: str, environment: bool = False):
        super().__init__(message)
        self.key, self.message, self.fix, self.environment = key, message, fix, environment


# --------------------------------------------------------------------------------------------
# Where a dataset lives
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    kind: str  # "file", "disk" (save_to_disk directory), "hub"
    location: str  # absolute path, or the Hub id


def resolve_asset(reference: str) -> Path:
    """``asset:NAME[/SUB/PATH]`` -> the cached asset directory (fetched on first use) joined with SUB/PATH."""
    from gemma_hf import assets

    name, _, rest = reference[len(ASSET_SCHEME):].partition("/")
    if name not in assets.ASSETS:
        import difflib

        close = difflib.get_close_matches(name, list(assets.ASSETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown asset {name!r}.{hint} Known assets: {', '.join(assets.ASSETS)}")
    root = assets.ASSETS[name]()  # raises AssetUnavailable when it cannot be fetched
    return root / rest if rest else root


def looks_like_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or Path(value).suffix.lower() in FILE_BUILDERS


def resolve_source(spec: DatasetSpec, key: str) -> Source:
    from gemma_hf.assets import AssetUnavailable

    path = spec.path
    if path.startswith(ASSET_SCHEME):
        try:
            resolved = resolve_asset(path)
        except KeyError as err:
            raise DataError(key, str(err.args[0]), "use asset:NAME/FILE with a known asset name") from None
        except AssetUnavailable as err:
            raise DataError(key, f"cannot fetch {path}: {err}", "fetch it with `python -m gemma_hf.assets`", environment=True) from None
        if not resolved.exists():
            raise DataError(key, f"{path} resolves to {resolved}, which does not exist", "check the file name inside the asset")
        path = str(resolved)
    local = Path(path).expanduser()
    if local.exists():
        local = local.resolve()
        if local.is_file():
            if local.suffix.lower() not in FILE_BUILDERS:
                raise DataError(key, f"{local} has an unsupported extension {local.suffix!r}",
                                f"use one of {', '.join(FILE_BUILDERS)} or a save_to_disk directory")
            return Source("file", str(local))
        if (local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file():
            return Source("disk", str(local))
        raise DataError(key, f"{local} is a directory but not a datasets.save_to_disk directory (no dataset_info.json "
                        "or dataset_dict.json)", "point path at a data file, or save the dataset with save_to_disk")
    if looks_like_path(path) or path.count("/") != 1:
        raise DataError(key, f"dataset file {path!r} does not exist", "fix the path (relative paths are resolved "
                        f"from the current directory, {os.getcwd()})")
    return Source("hub", path)


def hub_offline() -> bool:
    return any(os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


# --------------------------------------------------------------------------------------------
# Reading the first records (validation)
# --------------------------------------------------------------------------------------------


def _peek_file(path: Path, count: int) -> tuple[list[str], list[dict]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and _first_char(path) == "{"):
        records = []
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    records.append(json.loads(line))
                if len(records) >= count:
                    break
        if suffix == ".json" and len(records) == 1 and not _is_record(records[0]):
            raise ValueError("a JSON object that is not a list of records (nested data needs conversion first)")
    elif suffix == ".json":
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
        if not isinstance(data, list):
            raise ValueError(f"the JSON file holds a {type(data).__name__}, not a list of records")
        records = data[:count]
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            records = [row for _, row in zip(range(count), reader)]
            if not records:
                return list(reader.fieldnames or []), []
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        batch = next(parquet.iter_batches(batch_size=count), None)
        if batch is None:
            return list(parquet.schema_arrow.names), []
        records = batch.to_pylist()
    else:  # pragma: no cover - resolve_source filters extensions
        raise ValueError(f"unsupported file {path}")
    if not all(_is_record(r) for r in records):
        raise ValueError("records must be JSON objects (mappings of column -> value)")
    columns = list(dict.fromkeys(k for r in records for k in r))
    return columns, records


def _first_char(path: Path) -> str:
    with path.open(encoding="utf-8") as handle:
        while True:
            chunk = handle.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]


def _is_record(value: Any) -> bool:
    return isinstance(value, dict)


def _open_disk(location: str, split: str):
    import datasets

    loaded = datasets.load_from_disk(location)
    if isinstance(loaded, datasets.DatasetDict):
        base = split.split("[")[0]
        if base not in loaded:
            raise KeyError(f"split {base!r} not in {sorted(loaded)}")
        loaded = loaded[base]
    return loaded


def peek(spec: DatasetSpec, source: Source, key: str, count: int = PEEK_RECORDS) -> tuple[list[str], list[dict]] | None:
    """(columns, first records) of one dataset, reading as little as possible; None for Hub datasets."""
    try:
        if source.kind == "file":
            if not spec.split.startswith("train"):
                raise DataError(f"{key}.split", f"a single data file has only the 'train' split, not {spec.split!r}",
                                "set split: train (or a slice such as train[:100]), or remove the key")
            return _peek_file(Path(source.location), count)
        if source.kind == "disk":
            dataset = _open_disk(source.location, spec.split)
            return list(dataset.column_names), dataset.select(range(min(count, len(dataset)))).to_list()
    except DataError:
        raise
    except KeyError as err:
        raise DataError(f"{key}.split", f"{source.location}: {err.args[0]}", "choose one of the saved splits") from None
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise DataError(f"{key}.path", f"cannot read {source.location}: {err}", "fix or convert the file") from None
    return None


# --------------------------------------------------------------------------------------------
# Formats: records -> conversations
# --------------------------------------------------------------------------------------------


def rename_columns(record: dict, columns: dict[str, str] | None) -> dict:
    if not columns:
        return record
    return {columns.get(name, name): value for name, value in record.items()}


def detect_format(columns: list[str], declared: str) -> str | None:
    if declared != "auto":
        return declared
    for fmt, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return fmt
    return None


def missing_columns(columns: list[str], fmt: str) -> list[str]:
    return [c for c in FORMAT_COLUMNS[fmt] if c not in columns]


def to_messages(record: dict, fmt: str) -> list[dict[str, str]]:
    """One record of format ``fmt`` as a conversation; raises ValueError on malformed records."""
    if fmt == "messages":
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("'messages' must be a list of {role, content} mappings")
        return [{"role": m.get("role"), "content": m.get("content")} for m in messages]
    if fmt == "sharegpt":
        turns = record["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise ValueError("'conversations' must be a list of {from, value} mappings")
        out = []
        for t in turns:
            speaker = t.get("from")
            if speaker not in SHAREGPT_ROLES:
                raise ValueError(f"unknown ShareGPT speaker {speaker!r}; expected one of {sorted(SHAREGPT_ROLES)}")
            out.append({"role": SHAREGPT_ROLES[speaker], "content": t.get("value")})
        return out
    if fmt == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
        # TRL's conversational prompt-completion: lists of messages
        if isinstance(prompt, list) and isinstance(completion, list):
            return to_messages({"messages": prompt + completion}, "messages")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if fmt == "alpaca":
        instruction, extra, output = record["instruction"], record.get("input"), record["output"]
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise ValueError("alpaca 'instruction' and 'output' must be strings")
        user = instruction if not extra else f"{instruction}\n\n{extra}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    raise ValueError(f"unknown format {fmt!r}")


def check_conversation(messages: list[dict], family: str) -> None:
    """Raise ValueError unless ``messages`` renders as a Gemma conversation ending in a model turn."""
    from gemma_hf.chat import render_chat

    render_chat(messages, family)  # roles alternate, contents are strings
    if messages[-1]["role"] not in ("assistant", "model"):
        raise ValueError("the conversation ends with a user turn: there is no model turn to train on")


# --------------------------------------------------------------------------------------------
# Loading the mixture (the run)
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedDataset:
    spec: DatasetSpec
    source: Source
    num_examples: int  # records taken into the mixture (after fraction)


def load_one(spec: DatasetSpec, source: Source):
    import datasets

    if source.kind == "file":
        builder = FILE_BUILDERS[Path(source.location).suffix.lower()]
        return datasets.load_dataset(builder, data_files=source.location, split=spec.split)
    if source.kind == "disk":
        dataset = _open_disk(source.location, spec.split)
        if "[" in spec.split:  # slices of a saved split
            raise ValueError("split slices are not supported for save_to_disk directories; use fraction")
        return dataset
    return datasets.load_dataset(source.location, name=spec.name, split=spec.split)


def load_mixture(data: DataArguments, family: str, seed: int):
    """(train, eval or None, [LoadedDataset]) of ``messages``-only datasets, with the held-out split."""
    import datasets

    parts, loaded = [], []
    for index, spec in enumerate(data.datasets):
        key = f"datasets[{index}]"
        source = resolve_source(spec, f"{key}.path")
        dataset = load_one(spec, source)
        if spec.columns:
            dataset = dataset.rename_columns({k: v for k, v in spec.columns.items() if k in dataset.column_names})
        fmt = detect_format(dataset.column_names, spec.format)
        if fmt is None or missing_columns(dataset.column_names, fmt):
            raise DataError(f"{key}.path", f"{spec.path}: columns {dataset.column_names} fit no known format",
                            "set `columns` to rename them, or `format`")
        if spec.fraction < 1.0:
            keep = max(1, round(spec.fraction * len(dataset)))
            dataset = dataset.shuffle(seed=seed).select(range(keep))

        def convert(record, _fmt=fmt):
            messages = to_messages(record, _fmt)
            return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}

        dataset = dataset.map(convert, remove_columns=dataset.column_names, desc=f"Converting {key} ({fmt})")
        for row, record in enumerate(dataset):
            try:
                check_conversation(record["messages"], family)
            except (ValueError, TypeError) as err:
                raise DataError(f"{key}.path", f"{spec.path}: record {row}: {err}", "fix or drop that record") from None
        parts.append(dataset)
        loaded.append(LoadedDataset(spec, source, len(dataset)))
    mixture = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    eval_dataset = None
    if data.test_split_size is not None:
        split = mixture.train_test_split(test_size=data.test_split_size, seed=seed, shuffle=True)
        mixture, eval_dataset = split["train"], split["test"]
    return mixture, eval_dataset, loaded
