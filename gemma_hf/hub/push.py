"""Pushing a run directory to the Hugging Face Hub (:func:`push_to_hub`: the repository private by
default, one ``upload_folder`` commit of exactly the planned files: gemma_hf.hub.plan's for the whole
model, gemma_hf.hub.adapter's for a LoRA run's adapter alone)."""

from __future__ import annotations

import importlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .adapter import AdapterPlan, adapter_plan
from .cards import write_card
from .checks import CardError, validate_card
from .plan import UploadPlan, upload_plan


class HubError(RuntimeError):
    """A push cannot start or did not finish (no token, offline, Hub unreachable, refused)."""


@dataclass
class PushResult:
    repo_id: str
    private: bool
    plan: UploadPlan | AdapterPlan
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
    adapter_only: bool = False,
    base_model: str | None = None,
    api=None,
) -> PushResult:
    """Upload a run directory's model, tokenizer, card, recipe and plots to the Hub repo `repo_id`.

    Renders README.md first if it is missing, validates it, and decides the file list with
    :func:`upload_plan`. `dry_run=True` stops there (no token, no network). Otherwise it needs a
    token (argument, HF_TOKEN or `hf auth login`) and the Hub to be enabled, then calls
    `HfApi.create_repo(private=..., exist_ok=True)` and one `HfApi.upload_folder` with the plan's
    exact file list. Private by default; pushing to an existing *public* repo requires
    `private=False` (it is refused otherwise, so a run meant to be private never lands in public).

    `adapter_only=True`: a LoRA run's adapter alone (gemma_hf.hub.adapter.adapter_plan: PEFT's files, the
    tokenizer, the run record and the adapter's own card, assembled in a temporary folder: the run directory
    is only read). `base_model`: the base's Hub id, for a run trained from a local copy of it. Before
    anything is created the base must be on the Hub and readable with the token, and public if the
    adapter is.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not isinstance(repo_id, str) or repo_id.count("/") != 1:
            raise HFValidationError("expected the form ORG/NAME (or USER/NAME)")
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubError(f"invalid repo id {repo_id!r}: {err}") from None
    if base_model is not None and not adapter_only:
        raise CardError("--base-model names the base of an adapter: it applies to --adapter-only pushes only.")

    root = Path(run_dir)
    rendered = False
    if adapter_only:
        plan = adapter_plan(root, repo_id=repo_id, base_model=base_model)  # the card rendered and checked
        card_text = plan.card_text
    else:
        if not (root / "README.md").is_file():
            upload_plan(root, card_pending=True)  # every other refusal first: a refused push writes nothing
            write_card(root, repo_id=repo_id)
            rendered = True
        validate_card(root / "README.md")
        plan = upload_plan(root)
        card_text = (root / "README.md").read_text(encoding="utf-8")
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
        validate_card_on_hub(card_text)
    except ValueError as err:
        card = "the adapter's card" if adapter_only else root / "README.md"
        raise HubError(
            f"the Hub refuses the metadata of {card} (ModelCard.validate): {str(err).strip()[:500]}. "
            f"Nothing was uploaded; fix the run's files and re-render the card (gemma-hf card {root}).") from None
    except network as err:
        raise _hub_failure("validating the model card", repo_id, err) from err
    if adapter_only:
        _check_base_on_hub(api, plan.base_model, private, network)
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
    what = f"the LoRA adapter of {run_dir_name(root)}" if adapter_only else run_dir_name(root)
    message = commit_message or f"Upload {what} with gemma_hf"
    upload = dict(repo_id=repo_id, repo_type="model", allow_patterns=plan.allow_patterns,
                  ignore_patterns=plan.ignore_patterns, commit_message=message, revision=revision, create_pr=create_pr)
    try:
        if adapter_only:
            with tempfile.TemporaryDirectory(prefix="gemma-hf-adapter-") as folder:
                plan.stage(Path(folder))
                commit = api.upload_folder(folder_path=folder, **upload)
        else:
            commit = api.upload_folder(folder_path=str(root), **upload)
    except network as err:
        raise _hub_failure("uploading", repo_id, err) from err
    result.commit_url = str(getattr(commit, "commit_url", commit))
    return result


def _check_base_on_hub(api, base_model: str, private: bool, network) -> None:
    """An adapter's base must be a model the adapter's readers can download: on the Hub, readable with this
    token, and public when the adapter is."""
    try:
        info = api.model_info(base_model)
    except network as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403, 404):
            raise HubError(
                f"the adapter's base model {base_model} is not on the Hub (or not readable with this token; HTTP "
                f"{status}): push the base first (gemma-hf push BASE_DIR --repo-id {base_model}), or name the "
                "repository it is in with --base-model. Nothing was uploaded.") from None
        raise _hub_failure("reading the base model", base_model, err) from err
    if not private and getattr(info, "private", None) is True:
        raise HubError(
            f"the adapter's base model {base_model} is private, and this adapter push is public: its readers could "
            "not download the base. Make the base public, or push the adapter private (without --public). "
            "Nothing was uploaded.")


def validate_card_on_hub(text: str) -> None:
    """huggingface_hub's ModelCard.validate: the Hub's validate-yaml endpoint checks the metadata
    (ValueError with the Hub's reason when it refuses it)."""
    from huggingface_hub import ModelCard

    ModelCard(text, ignore_metadata_errors=False).validate(repo_type="model")


def run_dir_name(root: Path) -> str:
    return root.resolve().name
