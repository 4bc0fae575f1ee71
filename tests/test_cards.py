"""Model cards rendered from a run directory: content, Hub metadata (checked offline with
huggingface_hub's ModelCard / ModelCardData), refusals of malformed runs, `gemma-hf card`.

`make_run_dir` builds a synthetic run directory in the recipes' format (docs/architecture.md, "The run directory");
test_hub.py uses it too."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData

from gemma_hf import GemmaHFForSequenceClassification, hub, preset_config
from gemma_hf.commands import checkpoints as checkpoint_commands
from gemma_hf.hub import CardError
from tiny import make_ours, tiny_config

RECIPE = """\
# resolved recipe: sft on the tiny Gemma 2
model_name_or_path: google/gemma-2-2b
method: sft
learning_rate: 2.0e-05
lr_scheduler_type: cosine
warmup_ratio: 0.1
num_train_epochs: 1
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
max_length: 512
seed: 42
bf16: false
dataset_mixture:
  - path: tatsu-lab/alpaca
    split: train
    fraction: 0.5
  - path: /data/alpaca_en_demo.json
    split: train
    fraction: 1.0
"""

METRICS = [
    {"step": 1, "epoch": 0.1, "loss": 3.25, "learning_rate": 1e-05, "grad_norm": 4.5},
    {"step": 2, "epoch": 0.2, "loss": 2.75, "learning_rate": 2e-05, "grad_norm": 3.0},
    {"step": 3, "epoch": 0.3, "loss": 2.5, "learning_rate": 1.5e-05, "grad_norm": 2.0},
    {"step": 3, "epoch": 0.3, "eval_loss": 2.625},
    {"step": 4, "epoch": 0.4, "loss": 2.125, "learning_rate": 5e-06, "grad_norm": 1.5},
    {"step": 4, "epoch": 0.4, "eval_loss": 2.375},
]


def make_run_dir(root: Path, *, head: str = "causal-lm", eval_results: dict | None = None, base_model="google/gemma-2-2b",
                 datasets: list | None = None, readme: bool = False) -> Path:
    """A small but complete run directory: tiny model, tokenizer files, recipe, metrics, plot, run record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root.mkdir(parents=True)
    if head == "causal-lm":
        model = make_ours("gemma2")
    else:
        torch.manual_seed(0)
        model = GemmaHFForSequenceClassification(tiny_config("gemma2", num_labels=1))
    model.save_pretrained(root)
    (root / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (root / "tokenizer_config.json").write_text('{"bos_token": "<bos>", "eos_token": "<eos>"}')
    (root / "recipe.yaml").write_text(RECIPE)
    (root / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in METRICS))
    (root / "plots").mkdir()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([m["step"] for m in METRICS if "loss" in m], [m["loss"] for m in METRICS if "loss" in m])
    fig.savefig(root / "plots" / "loss.png")
    plt.close(fig)
    run = {
        "method": "sft" if head == "causal-lm" else "reward",
        "base_model": base_model,
        "family": "gemma2",
        "datasets": datasets if datasets is not None else [
            {"path": "tatsu-lab/alpaca", "split": "train", "fraction": 0.5, "num_examples": 26001},
            {"path": "/data/alpaca_en_demo.json", "split": "train", "fraction": 1.0, "num_examples": 999},
        ],
        "started": "2026-01-01T10:00:00Z",
        "finished": "2026-01-01T11:02:03Z",
        "wall_time_s": 3723.4,
        "gemma_hf_version": "0.1.0",
        "transformers_version": "5.23.0",
        "trl_version": "1.16.0",
    }
    (root / "run.json").write_text(json.dumps(run, indent=2))
    if eval_results is not None:
        (root / "eval.json").write_text(json.dumps(eval_results))
    ckpt = root / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"intermediate")
    (ckpt / "optimizer.pt").write_bytes(b"pickle")
    (ckpt / "trainer_state.json").write_text("{}")
    if readme:
        hub.write_card(root)
    return root


def section(card_text: str, heading: str) -> str:
    """The text under a Markdown heading, up to the next heading of the same or a higher level
    (lines inside fenced code blocks are not headings)."""
    level = heading.index(" ")
    lines = card_text.splitlines()
    start = lines.index(heading) + 1
    fence = None
    for i in range(start, len(lines)):
        line = lines[i]
        marker = re.match(r"^(`{3,})", line)
        if marker and (fence is None or marker.group(1) == fence):
            fence = None if fence else marker.group(1)
        elif fence is None and re.match(rf"^#{{1,{level}}} ", line):
            return "\n".join(lines[start:i])
    return "\n".join(lines[start:])


@pytest.fixture
def run_dir(tmp_path):
    return make_run_dir(tmp_path / "my-run", eval_results={"accuracy": 0.8125, "win_rate": 0.55})


def test_card_metadata_is_valid_hub_metadata(run_dir):
    text = hub.render_card(run_dir, repo_id="my-org/gemma2-tiny-sft")
    card = hub.validate_card(text)
    assert card.data.to_dict() == {
        "license": "gemma",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["gemma_hf", "gemma", "gemma2", "sft", "trl"],
        "base_model": "google/gemma-2-2b",
        "base_model_relation": "finetune",
        "datasets": ["tatsu-lab/alpaca"],  # the local JSON file is not a Hub dataset
        # eval.json's numbers, on the held-out split, datasets named by identity (no local path)
        "model-index": [{"name": "gemma2-tiny-sft", "results": [{
            "task": {"type": "text-generation"},
            # dataset type: the ids (a Hub id, a local file's own name), never "held-out" (the split)
            "dataset": {"name": "held-out split of tatsu-lab/alpaca, alpaca_en_demo (local:alpaca_en_demo.json)",
                        "type": "tatsu-lab/alpaca+alpaca_en_demo", "split": "held-out"},
            "metrics": [{"type": "accuracy", "value": 0.8125, "name": "accuracy"},
                        {"type": "win_rate", "value": 0.55, "name": "win_rate"}]}]}],
    }
    # huggingface_hub's own parser agrees, and the metadata round-trips unchanged.
    reparsed = ModelCard(text)
    assert ModelCardData(**reparsed.data.to_dict()).to_dict() == card.data.to_dict()
    assert text.startswith("---\n") and str(reparsed) == text


def test_card_body_carries_the_run(run_dir):
    text = hub.render_card(run_dir, repo_id="my-org/gemma2-tiny-sft")
    assert text.splitlines()[text.splitlines().index("---", 1) + 2] == "# gemma2-tiny-sft"
    # The resolved recipe, verbatim, in a YAML block.
    recipe = section(text, "### Resolved recipe")
    block = re.search(r"```yaml\n(.*?)\n```", recipe, re.DOTALL).group(1)
    assert block + "\n" == RECIPE and yaml.safe_load(block)["learning_rate"] == 2e-05
    datasets = section(text, "### Datasets")
    assert "| [tatsu-lab/alpaca](https://huggingface.co/datasets/tatsu-lab/alpaca) | train | 0.5 | 26,001 |" in datasets
    assert "| `/data/alpaca_en_demo.json` | train | 1 | 999 |" in datasets
    hyper = section(text, "### Hyperparameters")
    assert "| `learning_rate` | 2e-05 |" in hyper and "| `gradient_accumulation_steps` | 2 |" in hyper
    assert "| `bf16` | no |" in hyper and "dataset_mixture" not in hyper
    assert "| 2026-01-01T10:00:00Z | 2026-01-01T11:02:03Z | 1:02:03 | 0.1.0 | 5.23.0 | 1.16.0 |" in section(text, "### Run")
    metrics = section(text, "## Metrics")
    assert "6 logging events; the last at step 4, epoch 0.4" in metrics
    assert "| `loss` | 3.25 | 2.125 | 2.125 | 4 | 4 |" in metrics
    assert "| `eval_loss` | 2.625 | 2.375 | 2.375 | 4 | 2 |" in metrics
    assert "![loss](plots/loss.png)" in metrics and (run_dir / "plots" / "loss.png").is_file()
    evaluation = section(text, "## Evaluation")
    assert "| `accuracy` | 0.8125 |" in evaluation and "| `win_rate` | 0.55 |" in evaluation


def test_card_architecture_model_and_responsible_use(run_dir):
    text = hub.render_card(run_dir)
    details = section(text, "## Model details")
    assert "| Base model | [google/gemma-2-2b](https://huggingface.co/google/gemma-2-2b) |" in details
    assert "| Model family | Gemma 2 |" in details
    architecture = section(text, "### Architecture")
    assert "| Preset | custom (no preset matches) |" in architecture  # a tiny test model
    assert "| d_model | 64 |" in architecture and "| Num heads / KV heads | 4 / 2 |" in architecture
    assert "| Soft-caps (attention / final) | 50 / 30 |" in architecture
    assert "| Attention | local (window 8) and global, 2:2 layers |" in architecture
    n = sum(p.numel() for p in make_ours("gemma2").parameters())
    assert f"This checkpoint stores {n:,} parameters" in architecture
    assert 'AutoModelForCausalLM.from_pretrained("path/to/this/model", trust_remote_code=True)' in text
    intended, limits = section(text, "## Intended use"), section(text, "## Limitations and risks")
    assert "Prohibited Use Policy" in intended
    for topic in ("Factuality", "adversarial", "Bias, toxicity and privacy", "Safety evaluations do not carry over",
                  "test the model rigorously"):
        assert topic in limits, topic
    assert "https://ai.google.dev/gemma/terms" in section(text, "## License")
    bib = section(text, "## Citation")
    assert "arXiv:2403.08295" in bib and "arXiv:2408.00118" in bib
    assert "{{Gemma Team}}" in bib  # the Jinja raw block kept BibTeX's braces


def test_preset_matching_by_config_fields():
    preset, vocab = hub.match_preset(preset_config("gemma2-2b"))
    assert (preset.name, vocab) == ("gemma2-2b", "hf")
    preset, vocab = hub.match_preset(preset_config("gemma2-27b", vocab="report"))
    assert (preset.name, vocab) == ("gemma2-27b", "report")
    assert hub.match_preset(preset_config("gemma2-27b", query_pre_attn_scalar=128)) is None  # the 27B quirk matters
    assert hub.match_preset(preset_config("gemma-7b", num_key_value_heads=8)) is None


def test_card_of_the_real_270m_names_its_preset_row(tmp_path):
    from assets import require
    from gemma_hf import assets

    checkpoint = require(assets.gemma3_270m)
    run = make_run_dir(tmp_path / "run", base_model="google/gemma-3-270m")
    for name in ("model.safetensors", "config.json"):
        (run / name).unlink()
        (run / name).symlink_to(checkpoint / name)  # stock gemma3_text config: converted on reading
    text = hub.render_card(run)
    architecture = section(text, "### Architecture")
    assert "| Preset | `gemma3-270m` |" in architecture
    assert "This checkpoint stores 268,098,176 parameters (167,772,160 in the embedding" in architecture
    assert "the released google/gemma-3-270m checkpoint's config" in architecture


def test_reward_model_card(tmp_path):
    run = make_run_dir(tmp_path / "rm", head="sequence-classification", base_model="/local/base", eval_results=None)
    text = hub.render_card(run)
    data = hub.validate_card(text).data.to_dict()
    assert data["pipeline_tag"] == "text-classification" and "reward" in data["tags"]
    assert "base_model" not in data  # a local path is not a Hub id
    assert "| Base model | `/local/base` |" in text
    assert "AutoModelForSequenceClassification.from_pretrained" in text
    assert "No evaluation results were recorded for this run (no `eval.json`)" in text


def test_card_escapes_markdown_and_fences(tmp_path):
    datasets = [{"path": "weird|name.jsonl", "split": "train", "fraction": 1.0, "num_examples": 3}]
    run = make_run_dir(tmp_path / "run", datasets=datasets)
    with open(run / "recipe.yaml", "a") as f:
        f.write("note: |\n  a ``` fence inside the recipe\n")
    text = hub.render_card(run)
    assert "| `weird\\|name.jsonl` | train | 1 | 3 |" in text
    recipe = section(text, "### Resolved recipe")
    assert "````yaml\n" in recipe and recipe.rstrip().endswith("````")


def test_eval_json_with_generations_and_timing_metrics(tmp_path):
    # The recipes write before/after losses, a count, and sample generations; the Trainer logs timings.
    evaluation = {
        "eval_loss_before": 12.5, "eval_loss_after": None, "num_eval_examples": 5,
        "samples": [{"prompt": "Give three tips.", "before": {"text": "x ``` y", "new_tokens": 3},
                     "after": {"text": "| not | a table", "new_tokens": 4}}],
        "judge": {"model": "none"},
    }
    run = make_run_dir(tmp_path / "run", eval_results=evaluation)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "eval_loss": 2.0, "eval_runtime": 8.5, "eval_samples_per_second": 0.6,
                            "time": 12.0}) + "\n")
    text = hub.render_card(run)
    evaluation_md = section(text, "## Evaluation")
    assert "| result | before | after |" in evaluation_md and "| `eval_loss` | 12.5 | – |" in evaluation_md
    assert "| `num_eval_examples` | 5 |" in evaluation_md
    assert "**Prompt:**\n\n```text\nGive three tips.\n```" in evaluation_md
    assert "**before:**\n\n````text\nx ``` y\n````" in evaluation_md  # fenced past the output's backticks
    assert "**after:**\n\n```text\n| not | a table\n```" in evaluation_md
    assert '```json\n{\n  "judge": {\n    "model": "none"\n  }\n}\n```' in evaluation_md
    metrics = section(text, "## Metrics")
    assert "| `eval_loss` | 2.625 | 2 | 2 | 5 | 3 |" in metrics
    assert "eval_runtime" not in metrics and "per_second" not in metrics and "`time`" not in metrics


def test_adapter_only_runs_are_refused_clearly(tmp_path):
    run = make_run_dir(tmp_path / "run")
    (run / "config.json").unlink()
    (run / "adapter_config.json").write_text("{}")
    with pytest.raises(CardError, match="LoRA adapter only.*merge_lora: true"):
        hub.render_card(run)


@pytest.mark.parametrize(
    "breakage,message",
    [
        (lambda r: (r / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss":\n'), r"metrics\.jsonl:2 is not valid JSON"),
        (lambda r: (r / "eval.json").write_text('[0.5]'), r"eval\.json must be a JSON object"),
        (lambda r: (r / "run.json").write_text('{"method": "sft"}'), r"run\.json lacks \['base_model', 'family', 'datasets'\]"),
        (lambda r: (r / "recipe.yaml").unlink(), r"recipe\.yaml is missing"),
        (lambda r: (r / "recipe.yaml").write_text("- a list\n"), "must hold a mapping"),
        (lambda r: (r / "model.safetensors").rename(r / "pytorch_model.bin"), "no model.safetensors.*pickle weights"),
    ],
)
def test_malformed_run_directories_are_refused(tmp_path, breakage, message):
    run = make_run_dir(tmp_path / "run")
    breakage(run)
    with pytest.raises(CardError, match=message):
        hub.render_card(run)


def test_validate_card_rejects_bad_metadata_and_missing_sections(run_dir):
    good = hub.render_card(run_dir)
    hub.validate_card(good)
    with pytest.raises(CardError, match="license must be 'gemma'"):
        hub.validate_card(good.replace("license: gemma", "license: mit"))
    with pytest.raises(CardError, match="base_model: 'google/gemma 2' is not a Hub repository id"):
        hub.validate_card(good.replace("base_model: google/gemma-2-2b", "base_model: google/gemma 2"))
    with pytest.raises(CardError, match="body lacks the section '## Limitations and risks'"):
        hub.validate_card(good.replace("## Limitations and risks", "## Caveats"))
    with pytest.raises(CardError, match="no YAML front matter"):
        hub.validate_card(good.split("---\n", 2)[2])
    with pytest.raises(CardError, match="does not parse"):
        hub.validate_card("---\nlicense: [gemma\n---\nbody\n")


def test_gemma_hf_card_command_writes_readme(run_dir, capsys):
    parser = argparse.ArgumentParser(prog="gemma-hf")
    checkpoint_commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["card", str(run_dir), "--repo-id", "my-org/x"])
    assert args.func(args) == 0
    readme = run_dir / "README.md"
    assert readme.is_file() and "my-org/x" in readme.read_text()
    hub.validate_card(readme)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".README")]  # no temp file left
    (run_dir / "run.json").unlink()
    from tests.clirun import cli

    assert cli(["card", str(run_dir)]) == 2
    assert "run.json is missing" in capsys.readouterr().err
    assert "my-org/x" in readme.read_text()  # the failed render left the old card alone
