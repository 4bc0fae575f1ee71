"""What a push of a run directory uploads (:func:`upload_plan`): exactly the files of the final model,
tokenizer, card and run record, never checkpoints, pickles, hidden files or links; the names the Hub can
hold (:func:`hub_name_problem`). The adapter-only push's plan is gemma_hf.hub.adapter's."""

from __future__ import annotations

import glob
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from gemma_hf.rundir import LOGS, TENSORBOARD_EVENTS

from .cards import published_weight_files, refuse_adapter_only
from .checks import CardError

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


class ExactFiles:
    """The upload_folder patterns of a plan that names its files (``files``): exactly those, nothing else."""

    files: list[str]

    @property
    def allow_patterns(self) -> list[str]:
        # Each file by its escaped literal name: upload_folder then uploads exactly these.
        return [glob.escape(f) for f in self.files]

    @property
    def ignore_patterns(self) -> list[str]:
        return list(IGNORE_PATTERNS)


@dataclass
class UploadPlan(ExactFiles):
    """Exactly the files a push uploads (relative to run_dir), and what it leaves out."""

    run_dir: Path
    files: list[str]
    skipped: list[str] = field(default_factory=list)

    def size_of(self, name: str) -> int:
        return (self.run_dir / name).stat().st_size

    @property
    def total_bytes(self) -> int:
        return sum(self.size_of(f) for f in self.files)

    def describe(self, repo_id: str | None = None, private: bool = True) -> str:
        return describe_files(self, repo_id, private)


def describe_files(plan, repo_id: str | None = None, private: bool = True, what: str | None = None) -> str:
    """A plan's files, one a line with its size, and what it leaves out (the dry run's listing)."""
    where = f" to {repo_id} ({'private' if private else 'public'})" if repo_id else ""
    lines = [f"{len(plan.files)} files, {_size(plan.total_bytes)}{where}" + (f", {what}" if what else "") + ":"]
    width = max(len(f) for f in plan.files)
    lines += [f"  {f:<{width}}  {_size(plan.size_of(f)):>9}" for f in plan.files]
    if plan.skipped:  # names of files not uploaded may hold anything: shown escaped, one line
        lines.append("not uploaded: " + ", ".join(shown_name(f) for f in plan.skipped))
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


def refuse_unholdable_names(root: Path, names: list[str]) -> None:
    for name in names:
        problem = hub_name_problem(name)
        if problem:
            raise CardError(
                f"{shown_name(str(root))}: the file name {name!r} holds {problem}. Rename the file (or remove "
                "it) before pushing; nothing was uploaded."
            )


def is_link(root: Path, relative: str) -> bool:
    """True if the file or any directory between ``root`` and it is a symbolic link."""
    path = root
    for part in Path(relative).parts:
        path = path / part
        if path.is_symlink():
            return True
    return False


def record_extras(root: Path) -> list[str]:
    """The images under plots/ and TensorBoard's event files under logs/ (the Hub shows them in the
    repository's metrics tab), not hidden; those that are links are left out by the caller."""
    found = []
    plots = root / "plots"
    if plots.is_dir():
        found += sorted(
            p.relative_to(root).as_posix()
            for p in plots.rglob("*")
            if p.is_file() and p.suffix.lower() in _PLOT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    logs = root / LOGS
    if logs.is_dir():
        found += sorted(
            p.relative_to(root).as_posix()
            for p in logs.rglob(TENSORBOARD_EVENTS)
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    return found


def upload_plan(run_dir: str | os.PathLike, *, card_pending: bool = False) -> UploadPlan:
    """Decide exactly what a push uploads: card, model config + safetensors weights (+ shard index),
    the model code written by save_pretrained (top-level *.py), tokenizer files, generation config,
    recipe.yaml, run.json, metrics.jsonl, eval.json, the images under plots/ and TensorBoard's event files
    under logs/ (``logs/**/events.out.tfevents.*``, written by ``report_to: tensorboard``). Only regular files
    inside the run directory: never checkpoints/, adapter/ (``--adapter-only`` pushes it: gemma_hf.hub.adapter),
    pickle files, hidden files, or anything reached through a symbolic link. Images and event files that are links are left out (and listed);
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
    refuse_unholdable_names(root, candidates)
    links = [f"{name} -> {(root / name).resolve()}" for name in candidates if is_link(root, name)]
    if links:  # the model, tokenizer and run record must be the run's own files
        raise CardError(f"{root}: {'; '.join(links)}: a link, which a push never follows; put the file itself in the "
                        "run directory (or remove the link).")
    candidates += record_extras(root)
    refuse_unholdable_names(root, candidates)  # the images under plots/ and the event files too
    files = sorted(name for name in dict.fromkeys(candidates) if not is_link(root, name))
    everything = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())
    skipped_files = [f for f in everything if f not in files]
    skipped = []
    for top in dict.fromkeys(f.split("/", 1)[0] for f in skipped_files):
        inside = [f for f in skipped_files if f == top or f.startswith(top + "/")]
        kind = " (link)" if (root / top).is_symlink() else ""
        skipped.append(f"{top}/ ({len(inside)} files){kind}" if (root / top).is_dir() and not kind else f"{top}{kind}")
    return UploadPlan(root, files, skipped)


