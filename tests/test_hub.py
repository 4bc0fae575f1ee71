"""Pushing a run directory to the Hub, tested up to the HTTP boundary: the exact file list, the card
check, the arguments given to huggingface_hub's HfApi (autospecced mocks, so a call that does not
fit the real signature fails), and clear errors for a missing token, an offline or unreachable Hub.
The live Hub is never contacted."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

from gemma_hf import hub
from tests.clirun import run_cli
from gemma_hf.commands import checkpoints as checkpoint_commands
from gemma_hf.hub import CardError, HubError
from test_cards import make_run_dir

try:  # the HTTP client under huggingface_hub: httpx2 (huggingface_hub 2.x) or httpx (1.x)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

REPO = "my-org/gemma2-tiny-sft"


def code_files(run: Path) -> list[str]:
    """The model code save_pretrained wrote next to the weights (for trust_remote_code)."""
    return sorted(p.name for p in run.glob("*.py"))


def expected_upload(run: Path, *, eval_json: bool = True) -> list[str]:
    names = ["README.md", "config.json", "generation_config.json", "metrics.jsonl", "model.safetensors",
             "plots/loss.png", "recipe.yaml", "run.json", "tokenizer.json", "tokenizer_config.json"]
    if eval_json:
        names.append("eval.json")
    return sorted(names + code_files(run))


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    # Nothing here may reach the network, whatever the environment says.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    run = make_run_dir(tmp_path / "run", eval_results={"accuracy": 0.5}, readme=True)
    (run / "notes.txt").write_text("scratch")
    (run / "pytorch_model.bin").write_bytes(b"a pickle that must never be published")
    (run / ".secret").write_text("hidden")
    return run


@pytest.fixture(autouse=True)
def hub_card_checks(monkeypatch):
    """The Hub's card validation (ModelCard.validate, an HTTP call) replaced by a recorder: no test
    reaches the network. A test makes it refuse by setting ``refusal``."""
    seen = {"texts": [], "refusal": None}

    def validate(text):
        seen["texts"].append(text)
        if seen["refusal"]:
            raise ValueError(seen["refusal"])

    monkeypatch.setattr("gemma_hf.hub.push.validate_card_on_hub", validate)
    return seen


def fake_api(*, private_repo: bool = True) -> mock.MagicMock:
    api = mock.create_autospec(HfApi, instance=True)
    api.create_repo.return_value = f"https://huggingface.co/{REPO}"
    api.repo_info.return_value = mock.Mock(private=private_repo)
    api.upload_folder.return_value = mock.Mock(commit_url=f"https://huggingface.co/{REPO}/commit/abc123")
    return api


def test_upload_plan_is_exactly_the_model_tokenizer_card_recipe_and_plots(run_dir):
    plan = hub.upload_plan(run_dir)
    assert plan.files == expected_upload(run_dir)
    assert "configuration.py" in plan.files and "modeling.py" in plan.files  # remote code travels too
    assert plan.skipped == [".secret", "checkpoints/ (3 files)", "notes.txt", "pytorch_model.bin"]
    assert not any(f.startswith("checkpoints/") or f.endswith(".bin") for f in plan.files)


def test_upload_folder_selects_exactly_the_plan(run_dir):
    """Apply huggingface_hub's own filter, with the patterns we pass plus the defaults
    upload_folder adds, to the directory listing upload_folder makes: same list as the plan."""
    plan = hub.upload_plan(run_dir)
    listing = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.glob("**/*") if p.is_file())
    selected = list(filter_repo_objects(listing, allow_patterns=plan.allow_patterns,
                                        ignore_patterns=plan.ignore_patterns + DEFAULT_IGNORE_PATTERNS))
    assert selected == plan.files


def test_sharded_weights_are_uploaded_with_their_index(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    run = make_run_dir(tmp_path / "run", readme=True)
    from gemma_hf import GemmaHFForCausalLM

    model = GemmaHFForCausalLM.from_pretrained(run)
    (run / "model.safetensors").unlink()
    model.save_pretrained(run, max_shard_size="40KB")
    plan = hub.upload_plan(run)
    shards = sorted(p.name for p in run.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(shards) <= set(plan.files)
    assert "model.safetensors.index.json" in plan.files and "model.safetensors" not in plan.files


def test_push_calls_create_repo_then_one_upload_folder(run_dir):
    api = fake_api()
    result = hub.push_to_hub(run_dir, REPO, token="hf_test", api=api)
    api.create_repo.assert_called_once_with(repo_id=REPO, repo_type="model", private=True, exist_ok=True)
    api.repo_info.assert_called_once_with(repo_id=REPO, repo_type="model")
    api.upload_folder.assert_called_once()
    kwargs = api.upload_folder.call_args.kwargs
    plan = hub.upload_plan(run_dir)
    assert kwargs == {
        "repo_id": REPO,
        "repo_type": "model",
        "folder_path": str(run_dir),
        "allow_patterns": plan.allow_patterns,
        "ignore_patterns": plan.ignore_patterns,
        "commit_message": "Upload run with gemma_hf",
        "revision": None,
        "create_pr": False,
    }
    assert "checkpoints/*" in kwargs["ignore_patterns"] and "*.bin" in kwargs["ignore_patterns"]
    assert result.commit_url.endswith("/commit/abc123") and result.plan.files == plan.files
    assert [c[0] for c in api.method_calls] == ["create_repo", "repo_info", "upload_folder"]


def test_the_hub_validates_the_card_before_anything_is_created(run_dir, hub_card_checks):
    api = fake_api()
    hub.push_to_hub(run_dir, REPO, token="hf_test", api=api)
    assert hub_card_checks["texts"] == [(run_dir / "README.md").read_text()]
    hub_card_checks["refusal"] = '"model-index[0].results[0].dataset.type" is required'
    api = fake_api()
    with pytest.raises(HubError, match=r"the Hub refuses the metadata of .*README.md \(ModelCard.validate\): "
                                       r"\"model-index.*Nothing was uploaded.*gemma-hf card"):
        hub.push_to_hub(run_dir, REPO, token="hf_test", api=api)
    assert api.method_calls == []


def test_public_push(run_dir):
    api = fake_api(private_repo=False)
    hub.push_to_hub(run_dir, REPO, private=False, token="hf_test", api=api, revision="dev",
                    commit_message="first upload", create_pr=True)
    api.create_repo.assert_called_once_with(repo_id=REPO, repo_type="model", private=False, exist_ok=True)
    api.repo_info.assert_not_called()
    kwargs = api.upload_folder.call_args.kwargs
    assert (kwargs["revision"], kwargs["commit_message"], kwargs["create_pr"]) == ("dev", "first upload", True)


def test_private_push_into_an_existing_public_repo_is_refused(run_dir):
    api = fake_api(private_repo=False)
    with pytest.raises(HubError, match="already exists and is public.*--public"):
        hub.push_to_hub(run_dir, REPO, token="hf_test", api=api)
    api.upload_folder.assert_not_called()


def test_dry_run_renders_the_missing_card_and_touches_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a dry run works offline
    run = make_run_dir(tmp_path / "run")
    assert not (run / "README.md").exists()
    with mock.patch.object(hub.push, "_network_errors", side_effect=AssertionError("network path taken")), \
         mock.patch("huggingface_hub.HfApi", side_effect=AssertionError("HfApi constructed")):
        result = hub.push_to_hub(run, REPO, dry_run=True)
    assert result.dry_run and result.card_rendered and result.commit_url is None
    hub.validate_card(run / "README.md")
    assert REPO in (run / "README.md").read_text()
    assert result.plan.files == expected_upload(run, eval_json=False)


def test_cli_dry_run_lists_exactly_what_would_be_uploaded(run_dir, capsys):
    parser = argparse.ArgumentParser(prog="gemma-hf")
    checkpoint_commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["push", str(run_dir), "--repo-id", REPO, "--dry-run"])
    assert args.private is True  # private by default
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"dry run: would upload {len(expected_upload(run_dir))} files, ")
    assert out[0].endswith(f"to {REPO} (private):")
    listed = [line.split()[0] for line in out[1:-1]]
    assert listed == expected_upload(run_dir)
    assert out[-1] == "not uploaded: .secret, checkpoints/ (3 files), notes.txt, pytorch_model.bin"
    args = parser.parse_args(["push", str(run_dir), "--repo-id", REPO, "--dry-run", "--public"])
    assert args.private is False
    with pytest.raises(SystemExit):
        parser.parse_args(["push", str(run_dir), "--repo-id", REPO, "--private", "--public"])


def test_missing_token_is_a_clear_error(run_dir, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with mock.patch("huggingface_hub.HfApi", side_effect=AssertionError("HfApi constructed")):
        with pytest.raises(HubError, match="no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
            hub.push_to_hub(run_dir, REPO)


def test_offline_hub_is_a_clear_error(run_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    api = fake_api()
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE=1.*--dry-run"):
        hub.push_to_hub(run_dir, REPO, token="hf_test", api=api)
    assert api.method_calls == []


def test_unreachable_hub_and_rejected_token_are_clear_errors(run_dir):
    api = fake_api()
    api.create_repo.side_effect = httpx.ConnectError("[Errno -3] Temporary failure in name resolution")
    with pytest.raises(HubError, match=r"creating the repository failed for my-org/gemma2-tiny-sft: could not reach the Hub at https://"):
        hub.push_to_hub(run_dir, REPO, token="hf_test", api=api)
    api.upload_folder.assert_not_called()

    api = fake_api()
    response = httpx.Response(401, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
    api.create_repo.side_effect = HfHubHTTPError("401 Unauthorized", response=response)
    with pytest.raises(HubError, match="the token was rejected"):
        hub.push_to_hub(run_dir, REPO, token="hf_bad", api=api)

    api = fake_api()
    api.upload_folder.side_effect = httpx.ReadTimeout("timed out")
    with pytest.raises(HubError, match="uploading failed"):
        hub.push_to_hub(run_dir, REPO, token="hf_test", api=api)


def test_push_refusals_before_any_network(run_dir, tmp_path):
    api = fake_api()
    with pytest.raises(HubError, match="invalid repo id 'no-namespace'"):
        hub.push_to_hub(run_dir, "no-namespace", token="hf_test", api=api)
    with pytest.raises(HubError, match="invalid repo id"):
        hub.push_to_hub(run_dir, "my org/x", token="hf_test", api=api)
    (run_dir / "README.md").write_text((run_dir / "README.md").read_text().replace("license: gemma", "license: mit"))
    with pytest.raises(CardError, match="license must be 'gemma'"):
        hub.push_to_hub(run_dir, REPO, token="hf_test", api=api)
    assert api.method_calls == []


def test_links_out_of_the_run_directory_are_refused(run_dir, tmp_path):
    secret = tmp_path / "elsewhere.json"
    secret.write_text("{}")
    (run_dir / "tokenizer_config.json").unlink()
    (run_dir / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(CardError, match="tokenizer_config.json -> .*elsewhere.json: a link, which a push never follows"):
        hub.upload_plan(run_dir)


def test_dry_run_lists_only_the_runs_own_files(run_dir, capsys):
    """Links (even into the run's own checkpoints/), hidden files and pickles under plots/ are never
    planned; the dry run prints exactly what a push would upload."""
    checkpoint = run_dir / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "optimizer.pt").write_bytes(b"pickle")
    (run_dir / "plots" / "optimizer.png").symlink_to(checkpoint / "optimizer.pt")
    (run_dir / "plots" / "more").symlink_to(checkpoint, target_is_directory=True)
    (run_dir / "plots" / "state.pt").write_bytes(b"pickle")
    (run_dir / "plots" / ".hidden.png").write_bytes(b"x")
    (run_dir / ".secret").write_text("token")
    plan = hub.upload_plan(run_dir)
    assert not any(f.endswith((".pt", ".bin")) or "/." in f or f.startswith(".") or "checkpoint" in f
                   or f in ("plots/optimizer.png",) or f.startswith("plots/more") for f in plan.files), plan.files
    assert all((run_dir / f).is_file() and not (run_dir / f).is_symlink() for f in plan.files)
    assert any("(link)" in s for s in plan.skipped) or "plots/ (" in " ".join(plan.skipped)
    code, out, err = run_cli(["push", str(run_dir), "--repo-id", "me/run", "--dry-run"], capsys)
    assert code == 0, err
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == plan.files


def test_incomplete_run_directories_are_refused(run_dir):
    (run_dir / "tokenizer.json").unlink()
    with pytest.raises(CardError, match="no tokenizer"):
        hub.upload_plan(run_dir)


# ---------------------------------------------------------------------------------------------
# Issue 22: a planned file whose name the Hub cannot hold is refused (dry run or not), by name,
# before anything is written or sent


@pytest.fixture(scope="module")
def pristine_run(tmp_path_factory):
    """One complete run directory without README.md; tests change copies of it."""
    return make_run_dir(tmp_path_factory.mktemp("pristine") / "run")


def _add_file(run: Path, name: str) -> None:
    path = run / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def _index_naming(shard: str):
    """A run whose weights are sharded through an index that names `shard` (which exists)."""
    def make(run: Path) -> None:
        target = run / shard
        target.parent.mkdir(parents=True, exist_ok=True)
        (run / "model.safetensors").rename(target)
        (run / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}))
    return make


BAD_NAMES = {
    "newline in a plot": (lambda run: _add_file(run, "plots/a\nb.png"), r"'plots/a\nb.png'", "U+000A"),
    "tab in a plot": (lambda run: _add_file(run, "plots/a\tb.png"), r"'plots/a\tb.png'", "U+0009"),
    "carriage return in a plot folder": (lambda run: _add_file(run, "plots/x\r/loss.png"), r"'plots/x\r/loss.png'",
                                         "U+000D"),
    "escape in model code": (lambda run: _add_file(run, "x\x1b[31m.py"), r"'x\x1b[31m.py'", "U+001B"),
    "DEL in a plot": (lambda run: _add_file(run, "plots/a\x7f.png"), r"'plots/a\x7f.png'", "U+007F"),
    "C1 control in a plot": (lambda run: _add_file(run, "plots/a\x85.png"), r"'plots/a\x85.png'", "U+0085"),
    "line separator in a plot": (lambda run: _add_file(run, "plots/a\u2028b.png"), r"'plots/a\u2028b.png'", "U+2028"),
    "right-to-left override in a plot": (lambda run: _add_file(run, "plots/evil\u202egnp.png"),
                                         r"'plots/evil\u202egnp.png'", "U+202E"),
    "bytes that are not UTF-8": (lambda run: (run / "plots" / os.fsdecode(b"\xff.png")).write_bytes(b"x"),
                                 r"'plots/\udcff.png'", "not UTF-8"),
    "backslash in a plot": (lambda run: _add_file(run, "plots/a\\b.png"), r"'plots/a\\b.png'", "a backslash"),
    "shard index: newline": (_index_naming("model\n-00001.safetensors"), r"'model\n-00001.safetensors'", "U+000A"),
    "shard index: outside the run": (_index_naming("../outside.safetensors"), "'../outside.safetensors'",
                                     "'..' path segment"),
    "shard index: a .git folder": (_index_naming("w/.git/shard.safetensors"), "'w/.git/shard.safetensors'",
                                   "the Hub refuses files under .git/"),
    "shard index: hidden": (_index_naming(".shard.safetensors"), "'.shard.safetensors'", "never uploads hidden"),
}


def _tree(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run.parent).as_posix(): (p.read_bytes() if p.is_file() else b"")
            for p in sorted(run.parent.rglob("*"))}


@pytest.mark.parametrize("readme", [True, False], ids=["with README", "card to render"])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry run", "push"])
@pytest.mark.parametrize("make_bad, shown, why", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_names_the_hub_cannot_hold_are_refused(pristine_run, tmp_path, monkeypatch, capsys, make_bad, shown, why,
                                               dry_run, readme):
    """Exit 2 naming the file (escaped, on one line) and why; no traceback; nothing written (the card
    is not rendered either) and nothing sent."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # a real push would get past the token check
    run = Path(shutil.copytree(pristine_run, tmp_path / "place" / "run"))
    if readme:
        hub.write_card(run, repo_id=REPO)
    make_bad(run)
    before = _tree(run)
    with mock.patch("huggingface_hub.HfApi", side_effect=AssertionError("HfApi constructed")):
        code, out, err = run_cli(["push", str(run), "--repo-id", REPO, *(["--dry-run"] if dry_run else [])], capsys)
    assert code == 2, err
    assert f"the file name {shown} holds" in err and why in err, err
    assert "Traceback" not in err and "unexpected" not in err and len(err.strip().splitlines()) == 1, err
    assert out == ""
    assert _tree(run) == before  # no README.md rendered, no temporary file left
    api = fake_api()
    with pytest.raises(CardError, match="holds"):
        hub.push_to_hub(run, REPO, token="hf_test", api=api, dry_run=dry_run)
    assert api.method_calls == [] and _tree(run) == before


def test_files_left_out_are_listed_escaped_on_one_line(run_dir, capsys):
    """A file that is not uploaded may have any name: the dry run lists it escaped."""
    (run_dir / "notes\n\x1b[2J.txt").write_text("x")
    code, out, err = run_cli(["push", str(run_dir), "--repo-id", REPO, "--dry-run"], capsys)
    assert code == 0, err
    assert out.splitlines()[-1].startswith("not uploaded: ") and r"'notes\n\x1b[2J.txt'" in out
    assert "\x1b" not in out
