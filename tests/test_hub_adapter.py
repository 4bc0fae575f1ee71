"""`gemma-hf push RUN --adapter-only`: a LoRA run's adapter alone, in PEFT's file layout, with a card that
names the base model by Hub id. Tested like tests/test_hub.py, up to the HTTP boundary (autospecced HfApi
recorder; the live Hub is never contacted), on one real tiny LoRA SFT run (2 steps) from a local base.

The uploaded folder is captured when upload_folder is called and checked file by file: the rewritten
adapter_config.json (the base's Hub id, no local path), the card's metadata, and that PEFT loads the
uploaded adapter onto the base and reproduces the run's merged model. The run directory is never changed.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError

from gemma_hf import hub
from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from gemma_hf.hub import CardError, HubError
from tests.assets import require
from tests.clirun import cli, run_cli
from test_cards import make_run_dir
from test_hub import fake_api, httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_SFT = REPO_ROOT / "recipes" / "tiny" / "sft.yaml"
ADAPTER_REPO = "my-org/tiny-sft-lora"
BASE_REPO = "my-org/tiny-base"
TINY_ARCHITECTURE = dict(vocab_size=4096, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                         sliding_window=32, layer_types=["sliding_attention", "full_attention"])
ADAPTER_UPLOAD = ["README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "eval.json",
                  "metrics.jsonl", "plots/loss.png", "recipe.yaml", "run.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny LoRA SFT run (2 steps, merge_lora: true) from a local base model directory: the base is
    recorded as `local:base`, and PEFT wrote its absolute path into adapter/adapter_config.json."""
    from gemma_hf import GemmaHFForCausalLM, preset_config

    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    root = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    GemmaHFForCausalLM(preset_config("gemma2-2b", **TINY_ARCHITECTURE)).save_pretrained(root / "base")
    out = root / "run"
    assert cli(["sft", "--config", str(TINY_SFT), "--output_dir", str(out), "--model_name_or_path", str(root / "base"),
                "--preset", "null", "--preset_overrides", "null", "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
                "--max_steps", "2", "--eval_strategy", "no", "--save_steps", "2", "--logging_steps", "1",
                "--sample_prompts", "null"]) == 0
    return out


@pytest.fixture(autouse=True)
def hub_card_checks(monkeypatch):
    """The Hub's card validation (an HTTP call) replaced by a recorder, as in tests/test_hub.py; the pushes
    reach only the recorder API, whatever HF_HUB_OFFLINE another module of this worker left set."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.is_offline_mode", lambda: False)
    texts = []
    monkeypatch.setattr("gemma_hf.hub.push.validate_card_on_hub", texts.append)
    return texts


def _tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _recording_api(into: Path, **kwargs):
    """fake_api whose upload_folder copies the folder it is given (a temporary one) into ``into``."""
    api = fake_api(**kwargs)
    api.model_info.return_value = type("Info", (), {"private": False})()
    upload = api.upload_folder.return_value

    def record(**call):
        shutil.copytree(call["folder_path"], into)
        return upload

    api.upload_folder.side_effect = record
    return api


def _with_run_json(run: Path, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    record = json.loads((copy / "run.json").read_text())
    record.update(changes)
    (copy / "run.json").write_text(json.dumps(record))
    return copy


def test_the_run_holds_what_an_adapter_push_reads(lora_run):
    record = json.loads((lora_run / "run.json").read_text())
    assert record["lora"] is True and record["base_model"] == "local:base"
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"].startswith("/")  # a local path


def test_a_local_base_is_refused_with_the_fix(lora_run, capsys):
    before = _tree(lora_run)
    code, out, err = run_cli(["push", str(lora_run), "--repo-id", ADAPTER_REPO, "--adapter-only", "--dry-run"], capsys)
    assert code == 2 and out == ""
    assert "`local:base`, a local model only" in err
    assert "gemma-hf push BASE_DIR --repo-id ORG/BASE" in err and "--base-model ORG/BASE" in err
    assert "train from a Hub id" in err
    assert _tree(lora_run) == before


def test_dry_run_lists_exactly_the_adapter_files(lora_run, capsys):
    before = _tree(lora_run)
    code, out, err = run_cli(["push", str(lora_run), "--repo-id", ADAPTER_REPO, "--adapter-only",
                              "--base-model", BASE_REPO, "--dry-run"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:-1]] == ADAPTER_UPLOAD
    assert lines[0].startswith(f"dry run: would upload {len(ADAPTER_UPLOAD)} files, ")
    assert lines[0].endswith(f"to {ADAPTER_REPO} (private), the LoRA adapter of run for {BASE_REPO}:")
    assert [line.split()[0] for line in lines[1:-1]] == ADAPTER_UPLOAD
    left_out = lines[-1]
    assert left_out.startswith("not uploaded: ")
    for name in ("adapter/ (", "checkpoints/ (", "config.json", "model.safetensors", "generation_config.json"):
        assert name in left_out, name
    assert _tree(lora_run) == before  # no card written, no config rewritten


def test_push_uploads_peft_files_that_load_onto_the_base(lora_run, tmp_path, hub_card_checks):
    from peft import PeftModel

    from gemma_hf import GemmaHFForCausalLM

    before = _tree(lora_run)
    uploaded = tmp_path / "uploaded"
    api = _recording_api(uploaded)
    result = hub.push_to_hub(lora_run, ADAPTER_REPO, token="hf_test", api=api, adapter_only=True, base_model=BASE_REPO)
    assert hub_card_checks == [result.plan.card_text]  # the Hub checked the adapter's card before anything was created
    assert [c[0] for c in api.method_calls] == ["model_info", "create_repo", "repo_info", "upload_folder"]
    api.model_info.assert_called_once_with(BASE_REPO)
    api.create_repo.assert_called_once_with(repo_id=ADAPTER_REPO, repo_type="model", private=True, exist_ok=True)
    call = api.upload_folder.call_args.kwargs
    assert call["allow_patterns"] == result.plan.allow_patterns and "checkpoints/*" in call["ignore_patterns"]
    assert call["commit_message"] == "Upload the LoRA adapter of run with gemma_hf"
    assert not Path(call["folder_path"]).exists()  # the temporary folder is gone
    assert sorted(p.relative_to(uploaded).as_posix() for p in uploaded.rglob("*") if p.is_file()) == ADAPTER_UPLOAD
    assert _tree(lora_run) == before  # the run directory is only read

    config = json.loads((uploaded / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_REPO
    assert not any(isinstance(v, str) and v.startswith("/") for v in config.values())
    assert str(lora_run.parent) not in (uploaded / "adapter_config.json").read_text()
    assert (uploaded / "adapter_model.safetensors").read_bytes() == (lora_run / "adapter" / "adapter_model.safetensors").read_bytes()

    card = ModelCard((uploaded / "README.md").read_text())
    data = card.data.to_dict()
    assert data["base_model"] == BASE_REPO and data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft" and {"lora", "peft", "gemma_hf"} <= set(data["tags"])
    assert "### LoRA adapter" in card.text and "`r` | 4" in card.text and "`local:base`, a local model" in card.text
    assert f'PeftModel.from_pretrained(base, "{ADAPTER_REPO}")' in card.text
    hub.validate_card(uploaded / "README.md")

    # PEFT reads the uploaded files: the adapter on the base is the run's merged model.
    base = GemmaHFForCausalLM.from_pretrained(lora_run.parent / "base").eval()
    adapted = PeftModel.from_pretrained(base, str(uploaded)).eval()
    merged = GemmaHFForCausalLM.from_pretrained(lora_run).eval()
    ids = torch.tensor([[2, 10, 200, 3000, 7]])
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_the_base_must_be_readable_on_the_hub_and_public_for_a_public_adapter(lora_run, tmp_path):
    api = _recording_api(tmp_path / "a")
    response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/api/models/{BASE_REPO}"))
    api.model_info.side_effect = HfHubHTTPError("404 Not Found", response=response)
    with pytest.raises(HubError, match=rf"base model {BASE_REPO} is not on the Hub.*push the base first.*Nothing was uploaded"):
        hub.push_to_hub(lora_run, ADAPTER_REPO, token="hf_test", api=api, adapter_only=True, base_model=BASE_REPO)
    assert [c[0] for c in api.method_calls] == ["model_info"]

    api = _recording_api(tmp_path / "b", private_repo=False)
    api.model_info.return_value = type("Info", (), {"private": True})()
    with pytest.raises(HubError, match="base model .* is private, and this adapter push is public"):
        hub.push_to_hub(lora_run, ADAPTER_REPO, private=False, token="hf_test", api=api, adapter_only=True,
                        base_model=BASE_REPO)
    api.create_repo.assert_not_called()
    # a private adapter of a private base is fine
    api = _recording_api(tmp_path / "c")
    api.model_info.return_value = type("Info", (), {"private": True})()
    hub.push_to_hub(lora_run, ADAPTER_REPO, token="hf_test", api=api, adapter_only=True, base_model=BASE_REPO)
    api.upload_folder.assert_called_once()


def test_a_run_trained_from_a_hub_id_names_it_without_being_told(lora_run, tmp_path):
    run = _with_run_json(lora_run, tmp_path, base_model="google/gemma-2-2b")
    plan = hub.adapter_plan(run, repo_id=ADAPTER_REPO)
    assert plan.base_model == "google/gemma-2-2b"
    assert json.loads(plan.generated["adapter_config.json"])["base_model_name_or_path"] == "google/gemma-2-2b"
    assert "trained from [google/gemma-2-2b]" in plan.card_text
    with pytest.raises(CardError, match="trained from `google/gemma-2-2b`.*--base-model my-org/other names another model"):
        hub.adapter_plan(run, base_model="my-org/other")


def test_an_asset_base_names_the_model_it_reproduces_and_says_it_differs(lora_run, tmp_path):
    run = _with_run_json(lora_run, tmp_path, base_model="asset:gemma3-270m")
    plan = hub.adapter_plan(run)
    assert plan.base_model == "google/gemma-3-270m"
    assert "dequantised" in plan.card_text and "slightly different weights" in plan.card_text


@pytest.mark.parametrize("change, message", [
    ({"lora": False}, r"is not a LoRA run .*Push the whole model without --adapter-only"),
    ({"base_model": "preset:gemma2-2b"}, r"random initial weights, which were never saved.*without --adapter-only"),
])
def test_runs_without_a_usable_adapter_are_refused(lora_run, tmp_path, capsys, change, message):
    run = _with_run_json(lora_run, tmp_path, **change)
    code, out, err = run_cli(["push", str(run), "--repo-id", ADAPTER_REPO, "--adapter-only", "--base-model", BASE_REPO,
                              "--dry-run"], capsys)
    assert code == 2 and out == ""
    assert re.search(message, err), err


def test_missing_adapter_pickles_and_stray_options_are_refused(lora_run, tmp_path, capsys):
    run = _with_run_json(lora_run, tmp_path)
    (run / "adapter" / "adapter_model.safetensors").rename(run / "adapter" / "adapter_model.bin")
    with pytest.raises(CardError, match=r"no adapter_model.safetensors .*pickle weights \['adapter_model.bin'\]"):
        hub.adapter_plan(run, base_model=BASE_REPO)
    shutil.rmtree(run / "adapter")
    code, _, err = run_cli(["push", str(run), "--repo-id", ADAPTER_REPO, "--adapter-only", "--base-model", BASE_REPO,
                            "--dry-run"], capsys)
    assert code == 2 and "has no adapter/ directory" in err
    code, _, err = run_cli(["push", str(lora_run), "--repo-id", ADAPTER_REPO, "--base-model", BASE_REPO, "--dry-run"], capsys)
    assert code == 2 and "--adapter-only pushes only" in err
    with pytest.raises(CardError, match="not a Hub repository id"):
        hub.adapter_plan(lora_run, base_model="/home/me/base")


def test_a_full_fine_tune_is_refused(tmp_path, capsys):
    run = make_run_dir(tmp_path / "full")  # run.json has no lora: a full fine-tune
    code, out, err = run_cli(["push", str(run), "--repo-id", ADAPTER_REPO, "--adapter-only", "--dry-run"], capsys)
    assert code == 2 and "is not a LoRA run" in err


def test_local_paths_left_in_the_adapter_config_are_refused(lora_run, tmp_path):
    run = _with_run_json(lora_run, tmp_path)
    path = run / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["revision"] = str(tmp_path / "somewhere")
    path.write_text(json.dumps(config))
    with pytest.raises(CardError, match=r"revision holds a local path .*would be published"):
        hub.adapter_plan(run, base_model=BASE_REPO)


def test_a_run_that_kept_only_the_adapter_pushes_it_and_only_it(lora_run, tmp_path, capsys):
    """merge_lora: false leaves the adapter at the root too, and no whole model: the whole-model push points
    at --adapter-only, which uploads the same files as from a merged run."""
    run = _with_run_json(lora_run, tmp_path)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (run / name).unlink()
    for item in (run / "adapter").iterdir():
        shutil.copy2(item, run / item.name)
    code, _, err = run_cli(["push", str(run), "--repo-id", ADAPTER_REPO, "--dry-run"], capsys)
    assert code == 2 and "holds a LoRA adapter only" in err and "--adapter-only" in err
    code, out, err = run_cli(["push", str(run), "--repo-id", ADAPTER_REPO, "--adapter-only", "--base-model", BASE_REPO,
                              "--dry-run"], capsys)
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[1:-1]] == ADAPTER_UPLOAD


def test_the_offline_card_check_knows_an_adapter_card(lora_run):
    """library_name peft only with base_model_relation adapter, and an adapter card names its base."""
    text = hub.adapter_plan(lora_run, base_model=BASE_REPO).card_text
    hub.validate_card(text)
    with pytest.raises(CardError, match="library_name must be 'transformers', got 'peft'"):
        hub.validate_card(text.replace("base_model_relation: adapter\n", ""))
    with pytest.raises(CardError, match="an adapter's card must name its base_model"):
        hub.validate_card(text.replace(f"base_model: {BASE_REPO}\n", ""))
