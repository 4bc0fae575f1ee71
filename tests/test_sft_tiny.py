"""The tiny SFT recipe end to end on CPU: trains, held-out loss drops, the run directory keeps its
contract, the saved model reloads through AutoModelForCausalLM and chats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from gemma_hf.recipes.config import load_recipe
from gemma_hf.references import identity
from tests.assets import require
from tests.clirun import cli

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny" / "sft.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = tmp_path_factory.mktemp("tiny") / "run"
    # report_to tensorboard: the shared run also proves the tracker logs (test_tensorboard_...).
    assert cli(["sft", "--config", str(TINY), "--output_dir", str(out), "--report_to", "tensorboard"]) == 0
    return out


def test_run_directory_contract(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    for required in ("recipe.yaml", "config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "metrics.jsonl", "plots", "run.json", "eval.json", "checkpoints"):
        assert required in names, required
    assert not any(name.startswith(".") for name in names)  # no working files left behind
    assert not any(p.name.startswith(f".{tiny_run.name}.") for p in tiny_run.parent.iterdir())
    run = json.loads((tiny_run / "run.json").read_text())
    assert run["method"] == "sft" and run["family"] == "gemma2" and run["base_model"] == "preset:gemma2-2b"
    assert run["datasets"][0]["num_examples"] == 200 and run["datasets"][0]["fraction"] == 0.2
    assert run["global_step"] == 8 and run["num_processes"] == 1
    for key in ("started", "finished", "wall_time_s", "gemma_hf_version", "transformers_version", "trl_version"):
        assert run[key]
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in m and "epoch" in m for m in metrics)
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4, 6, 8]
    assert all("learning_rate" in m and "grad_norm" in m for m in metrics if "loss" in m)
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 4, 8]
    assert (tiny_run / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-4", "checkpoint-8"]
    assert json.loads((tiny_run / "config.json").read_text())["model_type"] == "gemma_hf"
    # recipe.yaml is the resolved recipe (with the command-line output_dir, recorded by identity: no
    # local absolute path in a file that will be pushed) and reloads as a recipe.
    resolved = yaml.safe_load((tiny_run / "recipe.yaml").read_text())
    assert resolved["output_dir"] == identity(str(tiny_run)) and not resolved["output_dir"].startswith("/")
    assert load_recipe(tiny_run / "recipe.yaml").values["learning_rate"] == 3e-3


def test_tensorboard_writes_readable_event_files_in_logs(tiny_run):
    """report_to: tensorboard writes its event files in the run's logs/ (not checkpoints/runs/), they hold
    the logged scalars (the same numbers as metrics.jsonl), and a push uploads them (the metrics tab)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gemma_hf import hub

    events = sorted((tiny_run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and not (tiny_run / "checkpoints" / "runs").exists()
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss"} <= set(scalars)
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    logged = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    assert {e.step: e.value for e in accumulator.Scalars("train/loss")} == pytest.approx(logged)
    assert [e.step for e in accumulator.Scalars("eval/loss")] == [0, 4, 8]
    plan = hub.upload_plan(tiny_run)
    assert [f for f in plan.files if f.startswith("logs/")] == [e.relative_to(tiny_run).as_posix() for e in events]
    # the Trainer's arguments (TensorBoard's "args" text): the run is named after its directory
    args = json.loads(accumulator.Tensors("args/text_summary")[0].tensor_proto.string_val[0])
    assert args["run_name"] == "run" and args["report_to"] == ["tensorboard"]


def test_held_out_loss_drops(tiny_run):
    results = json.loads((tiny_run / "eval.json").read_text())
    print(f"tiny recipe held-out loss {results['eval_loss_before']:.4f} -> {results['eval_loss_after']:.4f}")
    assert results["eval_loss_after"] < results["eval_loss_before"] - 0.5
    assert results["samples"][0]["prompt"] == "Give three tips for staying healthy."
    assert {"text", "stop", "new_tokens"} <= set(results["samples"][0]["after"])


def test_reloads_with_automodel_and_chats(tiny_run, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from gemma_hf import GemmaHFForCausalLM
    from gemma_hf.sampling import chat_reply

    model = AutoModelForCausalLM.from_pretrained(tiny_run)
    assert isinstance(model, GemmaHFForCausalLM)
    tok = AutoTokenizer.from_pretrained(tiny_run)
    eos = GenerationConfig.from_pretrained(tiny_run).eos_token_id
    assert tok.convert_tokens_to_ids("<end_of_turn>") in eos and tok.eos_token_id in eos
    # The final weights are the last checkpoint's.
    from safetensors.torch import load_file

    final = load_file(tiny_run / "model.safetensors")
    last = load_file(tiny_run / "checkpoints" / "checkpoint-8" / "model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    reply = chat_reply(model, tok, [{"role": "user", "content": "Hi"}], "gemma2", max_new_tokens=8)
    assert reply.stop in ("end_of_turn", "eos", "length") and 1 <= reply.new_tokens <= 8
    assert cli(["generate", str(tiny_run), "--prompt", "Hi", "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["prompt"] == "Hi"


def test_finished_run_is_never_overwritten(tiny_run, capsys):
    before = (tiny_run / "run.json").read_text()
    code = cli(["sft", "--config", str(TINY), "--output_dir", str(tiny_run)])
    err = capsys.readouterr().err
    assert code == 2 and "already holds a finished run" in err and "output_dir" in err
    assert (tiny_run / "run.json").read_text() == before
