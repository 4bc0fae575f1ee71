"""What a push uploads (:func:`upload_plan`), and pushing a run directory to the Hugging Face Hub
(:func:`push_to_hub`: the repository private by default, one ``upload_folder`` commit of exactly
the planned files)."""

from __future__ import annotations

import glob
import importlib
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from gemma_hf.rundir import LOGS, TENSORBOARD_EVENTS

from .cards import published_weight_files, refuse_adapter_only, write_card
from .checks import CardError, validate_card


class HubError(RuntimeError):
    """A push cannot start or did not finish (no token, offline, Hub unreachable, refused)."""


# ---------------------------------------------------------------------------------------------
# What a push uploads

# Files of the final model, tokenizer and run record, at the top of the run directory.
_TOP_LEVEL_FILES = (
    "README.md", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "recipe.yaml", "run.json", "metrics.jsonl", "eval.json",
)
_TOKENIZER_REQUIRED_ANY = ("tokenizer.json", "tokenizer.model")
# Never uploaded, whatever else matches (passed to upload_folder as ignore_patterns too).
IGNORE_PATTERNS = ["checkpoints/*", ".*", "*/.*", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle"]


@dataclass
class UploadPlan:
    """Exactly the files a push uploads (relative to run_dir), and what it leaves out."""

    run_dir: Path
    files: list[str]
    skipped: list[str] = field(default_factory=list)

    @property
    def allow_patterns(self) -> list[str]:
        # Each file by its escaped literal name: upload_folder then uploads exactly these.
        return [glob.escape(f) for f in self.files]

    @property
    def ignore_patterns(self) -> list[str]:
        return list(IGNORE_PATTERNS)

    @property
    def total_bytes(self) -> int:
        return sum((self.run_dir / f).stat().st_size for f in self.files)

    def describe(self, repo_id: str | None = None, private: bool = True) -> str:
        where = f" to {repo_id} ({'private' if private else 'public'})" if repo_id else ""
        lines = [f"{len(self.files)} files, {_size(self.total_bytes)}{where}:"]
        width = max(len(f) for f in self.files)
        lines += [f"  {f:<{width}}  {_size((self.run_dir / f).stat().st_size):>9}" for f in self.files]
        if self.skipped:  # names of files not uploaded may hold anything: shown escaped, one line
            lines.append("not uploaded: " + ", ".join(shown_name(f) for f in self.skipped))
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


_PLOT_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg")

# Folders the Hub refuses to receive files in (huggingface_hub's CommitOperationAdd checks the same).
_HUB_FORBIDDEN_FOLDERS = (".git", ".cache")
# Unicode's bidirectional formatting controls: a name holding one displays as another name.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def shown_name(name: str) -> str:
    """`name` as it can be printed on one line: as is, or escaped (repr) if it holds anything unprintable."""
    return name if name.isprintable() else repr(name)


def hub_name_problem(name: str) -> str | None:
    """Why a file cannot be uploaded to the Hub under the path `name` ('/'-separated, relative to the
    repository), or None. Refused: control characters (newline, tab, ESC, DEL, C1, the Unicode line
    and paragraph separators, bidirectional controls: a listing would show another name, or break
    the line), bytes that are not UTF-8 (the Hub's paths are UTF-8 text), a backslash (huggingface_hub
    reads it as a folder separator when it selects files), empty / '.' / '..' segments and a leading
    '/' (outside the repository), and hidden segments, .git/ and .cache/ included (the Hub refuses
    .git/ and .cache/; a push never uploads hidden files)."""
    for ch in name:
        category = unicodedata.category(ch)
        if category == "Cs":
            return "bytes that are not UTF-8 text (the Hub's file names are UTF-8)"
        if category in ("Cc", "Zl", "Zp") or ch in _BIDI_CONTROLS:
            return f"the control character U+{ord(ch):04X} (a file name on the Hub cannot hold control characters)"
    if "\\" in name:
        return "a backslash (huggingface_hub reads it as a folder separator, so it names another path)"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "an empty, '.' or '..' path segment (a path outside the repository)"
    for part in parts:
        if part in _HUB_FORBIDDEN_FOLDERS:
            return f"a {part}/ segment (the Hub refuses files under {part}/)"
        if part.startswith("."):
            return f"the hidden segment {part!r} (a push never uploads hidden files)"
    return None


def _refuse_unholdable_names(root: Path, names: list[str]) -> None:
    for name in names:
        problem = hub_name_problem(name)
        if problem:
            raise CardError(
                f"{shown_name(str(root))}: the file name {name!r} holds {problem}. Rename the file (or remove "
                "it) before pushing; nothing was uploaded."
            )


def _is_link(root: Path, relative: str) -> bool:
    """True if the file or any directory between ``root`` and it is a symbolic link."""
    path = root
    for part in Path(relative).parts:
        path = path / part
        if path.is_symlink():
            return True
    return False


def upload_plan(run_dir: str | os.PathLike, *, card_pending: bool = False) -> UploadPlan:
    """Decide exactly what a push uploads: card, model config + safetensors weights (+ shard index),
    the model code written by save_pretrained (top-level *.py), tokenizer files, generation config,
    recipe.yaml, run.json, metrics.jsonl, eval.json, the images under plots/ and TensorBoard's event files
    under logs/ (``logs/**/events.out.tfevents.*``, written by ``report_to: tensorboard``). Only regular files
    inside the run directory: never checkpoints/, adapter/, pickle files, hidden files, or anything
    reached through a symbolic link. Images and event files that are links are left out (and listed);
    a link among the model, tokenizer and run files is refused, as is a run without README.md,
    config, safetensors weights, tokenizer or recipe, and a planned file whose name the Hub cannot
    hold (:func:`hub_name_problem`: a control character, ...), dry run or not.
    ``card_pending``: README.md is about to be rendered (push_to_hub checks the rest first, so a
    refused push writes nothing)."""
    root = Path(run_dir)
    if root.is_symlink():
        raise CardError(f"{root} is a symbolic link; push the run directory itself.")
    if not card_pending and not (root / "README.md").is_file():
        raise CardError(f"{root} has no README.md; render it first (gemma-hf card {root}).")
    refuse_adapter_only(root)
    for required in ("config.json", "recipe.yaml"):
        if not (root / required).is_file():
            raise CardError(f"{root} has no {required}; it is not a complete run directory.")
    if not any((root / name).is_file() for name in _TOKENIZER_REQUIRED_ANY):
        raise CardError(f"{root} has no tokenizer (tokenizer.json or tokenizer.model); a model without its tokenizer cannot be used.")
    candidates = [name for name in _TOP_LEVEL_FILES if (root / name).is_file()]
    candidates += published_weight_files(root)
    candidates += sorted(p.name for p in root.glob("*.py") if p.is_file() and not p.name.startswith("."))
    _refuse_unholdable_names(root, candidates)
    links = [f"{name} -> {(root / name).resolve()}" for name in candidates if _is_link(root, name)]
    if links:  # the model, tokenizer and run record must be the run's own files
        raise CardError(f"{root}: {'; '.join(links)}: a link, which a push never follows; put the file itself in the "
                        "run directory (or remove the link).")
    plots = root / "plots"
    if plots.is_dir():
        candidates += sorted(
            p.relative_to(root).as_posix()
            for p in plots.rglob("*")
            if p.is_file() and p.suffix.lower() in _PLOT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    logs = root / LOGS
    if logs.is_dir():  # TensorBoard's event files: the Hub shows them in the repository's metrics tab
        candidates += sorted(
            p.relative_to(root).as_posix()
            for p in logs.rglob(TENSORBOARD_EVENTS)
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    _refuse_unholdable_names(root, candidates)  # the images under plots/ and the event files too
    files = sorted(name for name in dict.fromkeys(candidates) if not _is_link(root, name))
    everything = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())
    skipped_files = [f for f in everything if f not in files]
    skipped = []
    for top in dict.fromkeys(f.split("/", 1)[0] for f in skipped_files):
        inside = [f for f in skipped_files if f == top or f.startswith(top + "/")]
        kind = " (link)" if (root / top).is_symlink() else ""
        skipped.append(f"{top}/ ({len(inside)} files){kind}" if (root / top).is_dir() and not kind else f"{top}{kind}")
    return UploadPlan(root, files, skipped)


# ---------------------------------------------------------------------------------------------
# Push


@dataclass
class PushResult:
    repo_id: str
    private: bool
    plan: UploadPlan
    dry_run: bool
    commit_url: str | None = None
    card_rendered: bool = False


def _env_true(name: str) -> bool:
    return (os.environ.get(name) or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _network_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [HfHubHTTPError, OfflineModeIsEnabled, ConnectionError, TimeoutError]
    # The HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x, requests before).
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _hub_failure(action: str, repo_id: str, err: BaseException) -> HubError:
    from huggingface_hub import constants

    status = getattr(getattr(err, "response", None), "status_code", None)
    hint = {
        401: "the token was rejected: check HF_TOKEN / `hf auth login`.",
        403: f"the token may not write to {repo_id}: it needs write access to that namespace.",
        404: f"{repo_id} (or its namespace) was not found.",
    }.get(status, f"could not reach the Hub at {constants.ENDPOINT}.")
    return HubError(f"{action} failed for {repo_id}: {hint} ({type(err).__name__}: {err})")


def push_to_hub(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = True,
    dry_run: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    api=None,
) -> PushResult:
    """Upload a run directory's model, tokenizer, card, recipe and plots to the Hub repo `repo_id`.

    Renders README.md first if it is missing, validates it, and decides the file list with
    :func:`upload_plan`. `dry_run=True` stops there (no token, no network). Otherwise it needs a
    token (argument, HF_TOKEN or `hf auth login`) and the Hub to be enabled, then calls
    `HfApi.create_repo(private=..., exist_ok=True)` and one `HfApi.upload_folder` with the plan's
    exact file list. Private by default; pushing to an existing *public* repo requires
    `private=False` (it is refused otherwise, so a run meant to be private never lands in public).
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not isinstance(repo_id, str) or repo_id.count("/") != 1:
            raise HFValidationError("expected the form ORG/NAME (or USER/NAME)")
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubError(f"invalid repo id {repo_id!r}: {err}") from None

    root = Path(run_dir)
    rendered = False
    if not (root / "README.md").is_file():
        upload_plan(root, card_pending=True)  # every other refusal first: a refused push writes nothing
        write_card(root, repo_id=repo_id)
        rendered = True
    validate_card(root / "README.md")
    plan = upload_plan(root)
    result = PushResult(repo_id, private, plan, dry_run, card_rendered=rendered)
    if dry_run:
        return result

    from huggingface_hub import HfApi, constants, get_token

    if constants.is_offline_mode() or _env_true("HF_HUB_OFFLINE"):
        raise HubError(
            "the Hugging Face Hub is disabled here (HF_HUB_OFFLINE=1); unset it to push. "
            "`--dry-run` works offline and lists what would be uploaded."
        )
    token = token or get_token()
    if not token:
        raise HubError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access "
            f"to {repo_id.split('/')[0]} is needed to create the repository and upload)."
        )
    api = api if api is not None else HfApi(token=token)
    network = _network_errors()
    # The Hub's own check of the card's metadata, before anything is created (offline: validate_card above).
    try:
        validate_card_on_hub((root / "README.md").read_text(encoding="utf-8"))
    except ValueError as err:
        raise HubError(
            f"the Hub refuses the metadata of {root / 'README.md'} (ModelCard.validate): {str(err).strip()[:500]}. "
            f"Nothing was uploaded; fix the run's files and re-render the card (gemma-hf card {root}).") from None
    except network as err:
        raise _hub_failure("validating the model card", repo_id, err) from err
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    except network as err:
        raise _hub_failure("creating the repository", repo_id, err) from err
    if private:
        try:
            info = api.repo_info(repo_id=repo_id, repo_type="model")
        except network as err:
            raise _hub_failure("reading the repository's visibility", repo_id, err) from err
        if getattr(info, "private", None) is False:
            raise HubError(
                f"{repo_id} already exists and is public, and this push is private (the default). Pass "
                "--public (private=False) to publish into it, or make the repository private first."
            )
    message = commit_message or f"Upload {run_dir_name(root)} with gemma_hf"
    try:
        commit = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(root),
            allow_patterns=plan.allow_patterns,
            ignore_patterns=plan.ignore_patterns,
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
        )
    except network as err:
        raise _hub_failure("uploading", repo_id, err) from err
    result.commit_url = str(getattr(commit, "commit_url", commit))
    return result


def validate_card_on_hub(text: str) -> None:
    """huggingface_hub's ModelCard.validate: the Hub's validate-yaml endpoint checks the metadata
    (ValueError with the Hub's reason when it refuses it)."""
    from huggingface_hub import ModelCard

    ModelCard(text, ignore_metadata_errors=False).validate(repo_type="model")


def run_dir_name(root: Path) -> str:
    return root.resolve().name
