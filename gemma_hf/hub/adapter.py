"""What an adapter-only push uploads (``gemma-hf push RUN --adapter-only``): a LoRA run's adapter in
PEFT's file layout, with the run's tokenizer and record and a card naming the base model by Hub id.

The repository gets, at its top level: ``adapter_model.safetensors`` (from the run's ``adapter/``),
``adapter_config.json`` (the run's, with ``base_model_name_or_path`` rewritten to the base's Hub id:
the run's copy names the local path it was trained from, which no one else can open), README.md (the
adapter's card), the tokenizer files (with the chat template the adapter was trained on), recipe.yaml,
run.json, metrics.jsonl, eval.json, plots/ and TensorBoard's event files. The two rewritten files are
never written into the run directory: :meth:`AdapterPlan.stage` assembles the upload in a separate
folder, which the push hands to ``upload_folder`` with the plan's exact file list.

Refused (:class:`~gemma_hf.hub.checks.CardError`, a fix in each message): a run that did not train
LoRA, a run without ``adapter/`` or without its safetensors weights, a base model no one else can
download (a local path, a preset's random weights) unless the push names the Hub id it was pushed to
(``--base-model``), and an ``adapter_config.json`` that would still hold a local absolute path.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from gemma_hf.references import hub_id_of, is_hub_id
from gemma_hf.rundir import ADAPTER, RunDir, RunDirError

from .cards import render_adapter_card
from .checks import CardError
from .plan import ExactFiles, describe_files, is_link, record_extras, refuse_unholdable_names

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The run's own files that travel with its adapter (from the run directory's top level).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
RECORD_FILES = ("recipe.yaml", "run.json", "metrics.jsonl", "eval.json")


def local_path_in(value, key: str = "") -> tuple[str, str] | None:
    """(key, string) of the first string in a JSON value that looks like a local absolute path (POSIX,
    home-relative, Windows drive or UNC), or None."""
    if isinstance(value, dict):
        for k, v in value.items():
            found = local_path_in(v, f"{key}.{k}" if key else str(k))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = local_path_in(v, f"{key}[{i}]")
            if found:
                return found
    elif isinstance(value, str) and (value.startswith(("/", "~", "\\\\")) or value[1:3] in (":\\", ":/")):
        return key or "(the value)", value
    return None


def base_model_refusal(root: Path, recorded: str) -> str:
    """Why the adapter of a run trained from ``recorded`` (run.json's base_model) cannot name its base, with the fix."""
    push = f"gemma-hf push {root} --adapter-only --repo-id ORG/NAME"
    if recorded.startswith("preset:"):
        return (f"{root}: the adapter was trained on {recorded}'s random initial weights, which were never saved: "
                "no one can rebuild its base model, so the adapter alone is unusable. Push the whole model instead "
                f"(gemma-hf push {root} --repo-id ORG/NAME, without --adapter-only; a run with merge_lora: true holds it).")
    return (f"{root}: the adapter's base model is `{recorded}`, a local model only, which no one else can download, "
            "so the adapter alone would be unusable. Push the base first and name it: "
            f"`gemma-hf push BASE_DIR --repo-id ORG/BASE`, then `{push} --base-model ORG/BASE`; or train from a Hub id "
            "(model_name_or_path: ORG/NAME); or push the whole merged model (without --adapter-only).")


@dataclass
class AdapterPlan(ExactFiles):
    """Exactly the files an adapter-only push uploads: ``sources`` (the repository's name -> the run's
    file) and ``generated`` (the repository's name -> bytes: the card and the rewritten adapter config)."""

    run_dir: Path
    base_model: str
    sources: dict[str, Path]
    generated: dict[str, bytes]
    skipped: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        return sorted({**self.sources, **self.generated})

    def size_of(self, name: str) -> int:
        return len(self.generated[name]) if name in self.generated else self.sources[name].stat().st_size

    @property
    def total_bytes(self) -> int:
        return sum(self.size_of(f) for f in self.files)

    @property
    def card_text(self) -> str:
        return self.generated["README.md"].decode("utf-8")

    def describe(self, repo_id: str | None = None, private: bool = True) -> str:
        return describe_files(self, repo_id, private, what=f"the LoRA adapter of {self.run_dir.name} for {self.base_model}")

    def stage(self, folder: Path) -> None:
        """Write the upload into ``folder`` (empty, outside the run directory): the run's files as hard links
        (copies across file systems), the generated ones as written. The run directory is only read."""
        for name, source in self.sources.items():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
        for name, data in self.generated.items():
            (folder / name).write_bytes(data)


def adapter_plan(run_dir: str | os.PathLike, *, repo_id: str | None = None, base_model: str | None = None) -> AdapterPlan:
    """Check a LoRA run's adapter and decide what its push uploads (the card rendered and validated).
    ``base_model``: the Hub id of the base, for a run trained from a local copy of it (``--base-model``)."""

    root = Path(run_dir)
    if root.is_symlink():
        raise CardError(f"{root} is a symbolic link; push the run directory itself.")
    rundir = RunDir(root)
    try:
        run = rundir.read_run()
    except RunDirError as err:
        raise CardError(f"{root} is not a finished run directory: {err}") from None
    if not run.get("lora"):
        raise CardError(
            f"{root} is not a LoRA run (run.json: method {run.get('method')!r}, lora {bool(run.get('lora'))}): it has no "
            f"adapter to push alone. Push the whole model without --adapter-only (gemma-hf push {root} --repo-id "
            "ORG/NAME), or train with use_peft: true.")
    adapter = rundir.adapter
    if adapter.is_symlink() or not adapter.is_dir():
        raise CardError(f"{root} has no {ADAPTER}/ directory (the LoRA adapter a run saves there); it is not a complete "
                        "LoRA run. Push the whole model without --adapter-only, or re-run it.")
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file() or is_link(root, f"{ADAPTER}/{ADAPTER_WEIGHTS}"):
        pickles = sorted(p.name for p in adapter.glob("*.bin"))
        raise CardError(f"{adapter} has no {ADAPTER_WEIGHTS} (a regular file)"
                        + (f"; it has pickle weights {pickles}, which gemma_hf never publishes" if pickles else "")
                        + ". Re-run the training to save the adapter as safetensors.")
    if is_link(root, f"{ADAPTER}/{ADAPTER_CONFIG}"):
        raise CardError(f"{adapter / ADAPTER_CONFIG} is a link, which a push never follows; put the file itself there.")
    try:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CardError(f"{adapter / ADAPTER_CONFIG} cannot be read ({err}); the adapter is incomplete.") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise CardError(f"{adapter / ADAPTER_CONFIG} is not a LoRA adapter's config (peft_type "
                        f"{config.get('peft_type') if isinstance(config, dict) else None!r}).")

    recorded = str(run.get("base_model") or "")
    known = hub_id_of(recorded)
    if recorded.startswith("preset:"):
        raise CardError(base_model_refusal(root, recorded))
    if base_model is not None:
        if not is_hub_id(base_model) or base_model.count("/") != 1:
            raise CardError(f"--base-model {base_model!r} is not a Hub repository id (ORG/NAME).")
        if known and known != base_model:
            raise CardError(f"{root} was trained from `{recorded}` ({known} on the Hub); --base-model {base_model} names "
                            f"another model. Leave --base-model out: the adapter's base is {known}.")
    elif not known:
        raise CardError(base_model_refusal(root, recorded))
    base = base_model or known
    config = {**config, "base_model_name_or_path": base}  # the uploaded copy only
    leftover = local_path_in(config)
    if leftover:
        raise CardError(f"{adapter / ADAPTER_CONFIG}: {leftover[0]} holds a local path ({leftover[1]!r}), which would be "
                        "published; remove it from the adapter's config and push again.")

    sources = {ADAPTER_WEIGHTS: weights}
    tokenizer = [n for n in TOKENIZER_FILES if (root / n).is_file()]
    if not any(n in tokenizer for n in ("tokenizer.json", "tokenizer.model")):
        raise CardError(f"{root} has no tokenizer (tokenizer.json or tokenizer.model); an adapter without its "
                        "tokenizer (and chat template) cannot be used as trained.")
    if not rundir.recipe.is_file():
        raise CardError(f"{root} has no recipe.yaml; it is not a complete run directory.")
    names = tokenizer + [n for n in RECORD_FILES if (root / n).is_file()]
    extras = record_extras(root)  # images and event files: those that are links are left out
    refuse_unholdable_names(root, names + extras)
    links = [f"{n} -> {(root / n).resolve()}" for n in names if is_link(root, n)]
    if links:  # the tokenizer and the run record must be the run's own files
        raise CardError(f"{root}: {'; '.join(links)}: a link, which a push never follows; put the file itself in the "
                        "run directory (or remove the link).")
    sources.update({n: root / n for n in names + extras if not is_link(root, n)})
    card = render_adapter_card(root, base_model=base, adapter_config=config, adapter_weights=weights, repo_id=repo_id,
                               declared=base_model is not None and not known)
    generated = {ADAPTER_CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"),
                 "README.md": card.encode("utf-8")}
    planned = {str(p) for p in sources.values()} | {str(adapter / ADAPTER_CONFIG)}  # uploaded as rewritten
    skipped = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                     if (p.is_file() or p.is_symlink()) and str(p) not in planned)
    return AdapterPlan(root, base, sources, generated, _folded(root, skipped))


def _folded(root: Path, skipped: list[str]) -> list[str]:
    """Files left out, one entry per top-level file or folder (``checkpoints/ (12 files)``)."""
    out = []
    for top in dict.fromkeys(f.split("/", 1)[0] for f in skipped):
        inside = [f for f in skipped if f == top or f.startswith(top + "/")]
        out.append(f"{top}/ ({len(inside)} files)" if (root / top).is_dir() and not (root / top).is_symlink() else top)
    return out


__all__ = ["AdapterPlan", "adapter_plan", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "local_path_in", "base_model_refusal"]
