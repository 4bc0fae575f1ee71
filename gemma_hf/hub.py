"""Model cards rendered from a run directory, and pushing a run to the Hugging Face Hub.

A run directory (written by the recipes, DESIGN.md "Recipes") holds::

    recipe.yaml            the resolved recipe
    config.json            the final model (save_pretrained: model_type gemma_hf, auto_map + code)
    model*.safetensors     its weights (one file, or shards + model.safetensors.index.json)
    tokenizer files        tokenizer.json, tokenizer_config.json, ...
    generation_config.json
    metrics.jsonl          one JSON object per logging event: step, epoch, loss, eval_loss, ...
    plots/loss.png         the loss curve (and any other plots)
    run.json               method, base_model, family, datasets, timings, versions
    eval.json              optional: flat {name: number} evaluation results
    checkpoints/           intermediate checkpoints: never uploaded
    README.md              the model card rendered here

:func:`render_card` / :func:`write_card` build the card from ``model_cards/gemma_hf_card.md``
(a Jinja2 template rendered through ``huggingface_hub.ModelCard.from_template``);
:func:`validate_card` checks a card offline (``ModelCard.validate`` needs the Hub);
:func:`upload_plan` decides exactly which files a push uploads; :func:`push_to_hub` creates the
repository (private by default) and uploads those files with one ``upload_folder`` commit.
"""

from __future__ import annotations

import glob
import importlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import yaml

__all__ = [
    "CardError",
    "HubError",
    "Run",
    "UploadPlan",
    "PushResult",
    "CARD_TEMPLATE",
    "CITATIONS",
    "read_run",
    "match_preset",
    "card_data",
    "render_card",
    "write_card",
    "validate_card",
    "upload_plan",
    "push_to_hub",
]

CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "gemma_hf_card.md"

# BibTeX keys of the two reports cited on every card (the template carries the entries).
CITATIONS = ("gemma_2024", "gemma_2024_gemma2")

# Sections every card must have (validate_card checks them).
REQUIRED_SECTIONS = (
    "## Model details",
    "## Training",
    "### Resolved recipe",
    "## Metrics",
    "## Evaluation",
    "## Intended use",
    "## Limitations and risks",
    "## License",
    "## Citation",
)

_FAMILY_NAMES = {"gemma": "Gemma 1", "gemma2": "Gemma 2", "gemma3": "Gemma 3 (text)"}
_STOCK_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
_METHOD_NAMES = {
    "sft": "supervised fine-tuning (SFT)",
    "distill": "knowledge distillation",
    "distillation": "knowledge distillation",
    "gkd": "on-policy distillation (GKD)",
    "reward": "reward modelling (Bradley-Terry)",
    "rlhf": "reinforcement learning from human feedback",
    "rloo": "RLHF with RLOO",
    "grpo": "RLHF with GRPO",
    "dpo": "direct preference optimisation (DPO)",
    "warp": "WARP (weight-averaged rewarded policies)",
    "pipeline": "a multi-stage pipeline",
}
_PIPELINE_TAGS = {"causal-lm": "text-generation", "sequence-classification": "text-classification"}

# Recipe keys shown in the hyperparameter table (matched on the last component of a nested key);
# the full recipe is always on the card as well.
HYPERPARAMETER_KEYS = (
    "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "seed",
    "bf16", "fp16", "gradient_checkpointing", "max_length", "max_seq_length", "max_prompt_length",
    "max_completion_length", "packing", "completion_only_loss", "assistant_only_loss", "beta", "loss_type",
    "temperature", "alpha", "lmbda", "num_generations", "center_rewards_coefficient", "use_peft", "lora_r",
    "lora_alpha", "lora_dropout", "lora_target_modules", "ema_decay", "ema_update_rate", "slerp_t", "liti_eta",
)

_RUN_REQUIRED = ("method", "base_model", "family", "datasets")
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow", ".tsv")


class CardError(ValueError):
    """The run directory cannot produce a valid card (missing or malformed file, invalid card)."""


class HubError(RuntimeError):
    """A push cannot start or did not finish (no token, offline, Hub unreachable, refused)."""


# ---------------------------------------------------------------------------------------------
# Reading a run directory


@dataclass
class Run:
    path: Path
    recipe_text: str
    recipe: dict
    run: dict
    config: dict
    metrics: list[dict]
    evaluation: dict | None
    plots: list[str]
    weight_files: list[str]

    @property
    def head(self) -> str:
        archs = self.config.get("architectures") or []
        return "sequence-classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal-lm"


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CardError(f"{path} is missing ({what}).") from None
    except json.JSONDecodeError as err:
        raise CardError(f"{path} is not valid JSON ({what}): {err}") from None


def _weight_files(run_dir: Path) -> list[str]:
    index = run_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, "the shard index")["weight_map"]
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (run_dir / s).is_file()]
        if missing:
            raise CardError(f"{run_dir}: the shard index lists missing files {missing}.")
        return ["model.safetensors.index.json", *shards]
    if (run_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    pickles = sorted(p.name for p in run_dir.glob("*.bin"))
    raise CardError(
        f"{run_dir} has no model.safetensors (or sharded index)"
        + (f"; it has pickle weights {pickles}, which gemma_hf never publishes" if pickles else "")
        + "."
    )


def _refuse_adapter_only(run_dir: Path) -> None:
    if (run_dir / "adapter_config.json").is_file() and not (run_dir / "config.json").is_file():
        raise CardError(
            f"{run_dir} holds a LoRA adapter only (adapter_config.json, no config.json). Cards and pushes of "
            "adapter-only runs are not supported: merge the adapter into the base model (merge_lora: true) "
            "and push the merged run."
        )


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise CardError(f"{path}:{number} is not valid JSON: {err}") from None
        if not isinstance(row, dict) or "step" not in row:
            raise CardError(f"{path}:{number}: each line must be a JSON object with a 'step'.")
        rows.append(row)
    return rows


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_run(run_dir: str | os.PathLike) -> Run:
    """Read and check everything the card needs from a run directory (CardError names what is wrong)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise CardError(f"{path} is not a directory.")
    recipe_path = path / "recipe.yaml"
    if not recipe_path.is_file():
        raise CardError(f"{recipe_path} is missing (the resolved recipe).")
    recipe_text = recipe_path.read_text(encoding="utf-8")
    try:
        recipe = yaml.safe_load(recipe_text)
    except yaml.YAMLError as err:
        raise CardError(f"{recipe_path} is not valid YAML: {err}") from None
    if not isinstance(recipe, dict):
        raise CardError(f"{recipe_path} must hold a mapping of recipe keys, got {type(recipe).__name__}.")
    run = _read_json(path / "run.json", "the run record")
    missing = [k for k in _RUN_REQUIRED if k not in run]
    if missing:
        raise CardError(f"{path / 'run.json'} lacks {missing}.")
    if not isinstance(run["datasets"], list):
        raise CardError(f"{path / 'run.json'}: 'datasets' must be a list.")
    _refuse_adapter_only(path)
    config = _read_json(path / "config.json", "the model config")
    weights = _weight_files(path)
    evaluation = None
    if (path / "eval.json").is_file():
        evaluation = _read_json(path / "eval.json", "evaluation results")
        if not isinstance(evaluation, dict):
            raise CardError(f"{path / 'eval.json'} must be a JSON object (name -> result).")
    plots_dir = path / "plots"
    plots = []
    if plots_dir.is_dir():
        plots = sorted(
            (p.relative_to(path).as_posix() for p in plots_dir.rglob("*") if p.is_file() and p.suffix.lower() in (".png", ".svg", ".jpg", ".jpeg")),
            key=lambda p: (p != "plots/loss.png", p),
        )
    return Run(path, recipe_text, recipe, run, config, _read_metrics(path / "metrics.jsonl"), evaluation, plots, weights)


# ---------------------------------------------------------------------------------------------
# Architecture: match a preset (the reports' Table 1 rows) by config fields

_MATCH_FIELDS = (
    "family", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "layer_types", "sliding_window", "attn_logit_softcapping",
    "final_logit_softcapping", "use_post_norms", "use_qk_norm", "rope_theta", "local_rope_theta",
    "rope_linear_factor", "attention_scale", "tie_word_embeddings",
)


def _gemma_config(config: dict):
    from .model import GemmaHFConfig

    config = {k: v for k, v in config.items() if k not in ("auto_map", "transformers_version")}
    try:
        return GemmaHFConfig.from_dict(config)
    except Exception as err:
        raise CardError(f"config.json is not a Gemma config gemma_hf can read: {err}") from err


def match_preset(config):
    """(preset, "hf" | "report") whose architecture equals `config` field for field, or None.

    The vocabulary may be either the Hugging Face one or the reports' padded one."""
    from .presets import PRESETS

    for preset in PRESETS.values():
        for vocab in ("hf", "report"):
            if vocab == "report" and preset.report_vocab_size is None:
                continue
            candidate = preset.build_config(vocab=vocab)
            if candidate.vocab_size != config.vocab_size:
                continue
            if all(getattr(candidate, f) == getattr(config, f) for f in _MATCH_FIELDS):
                return preset, vocab
    return None


def _count_parameters(run: Run) -> tuple[int, int, str]:
    """(total, embedding, dtype) from the safetensors headers (tied copies are stored once)."""
    from safetensors import safe_open

    total = embedding = 0
    dtypes = set()
    for name in run.weight_files:
        if not name.endswith(".safetensors"):
            continue
        with safe_open(str(run.path / name), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                count = math.prod(tensor.get_shape())
                total += count
                dtypes.add(tensor.get_dtype())
                if key.endswith("embed_tokens.weight"):
                    embedding += count
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    return total, embedding, ", ".join(sorted(names.get(d, d) for d in dtypes))


# ---------------------------------------------------------------------------------------------
# Formatting helpers


def _cell(value) -> str:
    """A value as one Markdown table cell (pipes escaped, newlines flattened)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, int):
        text = f"{value:,}" if abs(value) >= 10_000 else str(value)
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
    else:
        text = str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) if not isinstance(v, _Raw) else v for v in row) + " |" for row in rows]
    return "\n".join(lines)


class _Raw(str):
    """A cell that is already Markdown (a link): inserted as is."""


def _fenced(text: str, language: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def _looks_like_hub_id(name, *, dataset: bool = False) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or name.count("/") != 1 or Path(name).expanduser().exists():
        return False
    if dataset and name.lower().endswith(_DATA_SUFFIXES):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _link(name: str, *, dataset: bool = False) -> str:
    if _looks_like_hub_id(name, dataset=dataset):
        prefix = "datasets/" if dataset else ""
        return _Raw(f"[{_cell(name)}](https://huggingface.co/{prefix}{name})")
    return _Raw(f"`{_cell(name)}`")


def _duration(seconds) -> str:
    if not _is_number(seconds):
        return "–"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _flatten(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Card sections


def _architecture_section(run: Run, config) -> tuple[str, str, int, str]:
    total, embedding, dtype = _count_parameters(run)
    n_global = sum(t == "full_attention" for t in config.layer_types)
    n_local = len(config.layer_types) - n_global
    if n_local == 0:
        attention = "global"
    else:
        attention = f"local (window {config.sliding_window}) and global, {n_local}:{n_global} layers"
    kv = config.num_key_value_heads
    head_type = "MQA" if kv == 1 else ("MHA" if kv == config.num_attention_heads else "GQA")
    query_scale = config.query_pre_attn_scalar if config.query_pre_attn_scalar is not None else config.head_dim
    caps = f"{_cell(config.attn_logit_softcapping)} / {_cell(config.final_logit_softcapping)}"
    matched = match_preset(config)
    label = f"`{matched[0].name}`" if matched else "custom (no preset matches)"
    rows = [
        ["Preset", _Raw(label)],
        ["d_model", config.hidden_size],
        ["Layers", config.num_hidden_layers],
        ["Feedforward dim (GeGLU, both branches)", 2 * config.intermediate_size],
        ["Head type", head_type],
        ["Num heads / KV heads", f"{config.num_attention_heads} / {kv}"],
        ["Head size", config.head_dim],
        ["Query scale", f"1/sqrt({_cell(query_scale)})"],
        ["Attention", attention],
        ["Soft-caps (attention / final)", caps],
        ["Norms", "pre + post RMSNorm" if config.use_post_norms else "pre RMSNorm"],
        ["QK-norm", bool(config.use_qk_norm)],
        ["RoPE base (global / local)", f"{_cell(config.rope_theta)} / {_cell(config.local_rope_theta)}"
         + (f", linear x{config.rope_linear_factor:g} on global layers" if config.rope_linear_factor else "")],
        ["Vocab size", config.vocab_size],
        ["Tied embedding", bool(config.tie_word_embeddings)],
    ]
    table = _table(["", "this checkpoint"], rows)
    parts = [
        f"This checkpoint stores {total:,} parameters ({embedding:,} in the embedding, "
        f"{total - embedding:,} elsewhere) in {dtype or 'unknown dtype'}."
    ]
    if matched:
        preset, vocab = matched
        parts.append(f"Its architecture is the `{preset.name}` row of {preset.source}.")
        if preset.embedding_params is not None and preset.non_embedding_params is not None:
            parts.append(
                f"The report counts {preset.embedding_params:,} embedding and {preset.non_embedding_params:,} "
                f"non-embedding parameters"
                + (
                    f" with its padded {preset.report_vocab_size:,}-row vocabulary; Hugging Face checkpoints "
                    f"use {preset.hf_vocab_size:,} rows."
                    if preset.report_vocab_size
                    else "."
                )
            )
        elif preset.total_params is not None:
            parts.append(f"The source states {preset.total_params:,} parameters.")
    else:
        parts.append("No gemma_hf preset has exactly this shape (e.g. a reduced test model).")
    return table, " ".join(parts), total, dtype or "unknown dtype"


def _datasets_table(datasets: list) -> str:
    if not datasets:
        return "No datasets were recorded in run.json."
    rows = []
    for d in datasets:
        d = d if isinstance(d, dict) else {"path": d}
        rows.append([_link(str(d.get("path", "?")), dataset=True), d.get("split"), d.get("fraction"), d.get("num_examples")])
    return _table(["dataset", "split", "fraction", "examples"], rows)


def _hyperparameters_table(recipe: dict) -> str:
    flat = _flatten(recipe)
    rows = []
    for key, value in flat.items():
        if key.rsplit(".", 1)[-1] in HYPERPARAMETER_KEYS and (
            value is None or isinstance(value, (int, float, str, bool)) or (isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value))
        ):
            rows.append([_Raw(f"`{_cell(key)}`"), value])
    if not rows:
        return "The recipe sets no common training hyperparameters explicitly; see the resolved recipe below."
    return _table(["hyperparameter", "value"], rows)


def _run_table(run: dict) -> str:
    rows = [[
        run.get("started"), run.get("finished"), _duration(run.get("wall_time_s")),
        run.get("gemma_hf_version"), run.get("transformers_version"), run.get("trl_version"),
    ]]
    return _table(["started", "finished", "wall time", "gemma_hf", "transformers", "TRL"], rows)


# Logged numbers that describe the run's speed or position, not the model: left off the table.
_BOOKKEEPING = ("step", "epoch", "time", "total_flos", "train_runtime")
_BOOKKEEPING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")


def _is_bookkeeping(key: str) -> bool:
    return key in _BOOKKEEPING or key.endswith(_BOOKKEEPING_SUFFIXES)


def _metrics_section(metrics: list[dict]) -> str:
    if not metrics:
        return "No training metrics were recorded (metrics.jsonl is missing or empty)."
    keys: list[str] = []
    for row in metrics:
        for k, v in row.items():
            if _is_number(v) and k not in keys and not _is_bookkeeping(k):
                keys.append(k)
    rows = []
    for k in keys:
        series = [(r["step"], r[k]) for r in metrics if _is_number(r.get(k)) and math.isfinite(r[k])]
        if not series:
            rows.append([_Raw(f"`{k}`"), None, None, None, None, 0])
            continue
        best_step, best = min(series, key=lambda s: s[1])
        rows.append([_Raw(f"`{_cell(k)}`"), series[0][1], series[-1][1], best, best_step, len(series)])
    last = metrics[-1]
    summary = (
        f"{len(metrics)} logging events; the last at step {_cell(last.get('step'))}"
        + (f", epoch {_cell(last.get('epoch'))}" if last.get("epoch") is not None else "")
        + " (`metrics.jsonl`)."
    )
    return summary + "\n\n" + _table(["metric", "first", "last", "min", "min at step", "events"], rows)


def _plots_section(plots: list[str]) -> str:
    if not plots:
        return "No plots were saved with this run."
    return "\n\n".join(f"![{Path(p).stem}]({quote(p)})" for p in plots)


def _is_sample(item) -> bool:
    return isinstance(item, dict) and isinstance(item.get("prompt"), str)


def _sample_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("text")
    return value if isinstance(value, str) else None


def _evaluation_section(evaluation: dict | None) -> str:
    """Numbers (and nulls) as a table; generated samples ({prompt, before/after/completion}) as
    fenced text, so model output cannot inject Markdown; anything else as JSON."""
    if not evaluation:
        return (
            "No evaluation results were recorded for this run (no `eval.json`); the only held-out "
            "measurement, if any, is `eval_loss` under Metrics."
        )
    numbers = {k: v for k, v in evaluation.items() if v is None or _is_number(v)}
    samples = {k: v for k, v in evaluation.items() if isinstance(v, list) and v and all(_is_sample(i) for i in v)}
    other = {k: v for k, v in evaluation.items() if k not in numbers and k not in samples}
    parts = ["From `eval.json`:"]
    if numbers:
        parts.append(_table(["result", "value"], [[_Raw(f"`{_cell(k)}`"), v] for k, v in numbers.items()]))
    for key, items in samples.items():
        parts.append(f"Generations recorded under `{_cell(key)}`:")
        for item in items:
            lines = [f"**Prompt:**\n\n{_fenced(item['prompt'], 'text')}"]
            for label, value in item.items():
                text = _sample_text(value)
                if label != "prompt" and text is not None:
                    lines.append(f"**{_cell(label)}:**\n\n{_fenced(text, 'text')}")
            parts.append("\n\n".join(lines))
    if other:
        parts.append("Other recorded results:\n\n" + _fenced(json.dumps(other, indent=2, ensure_ascii=False), "json"))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Rendering


def card_data(run: Run):
    """The card's Hub metadata (YAML front matter) as a huggingface_hub ModelCardData."""
    from huggingface_hub import ModelCardData

    base = run.run.get("base_model")
    base_id = base if _looks_like_hub_id(base) else None
    datasets = [d.get("path") if isinstance(d, dict) else d for d in run.run["datasets"]]
    hub_datasets = [d for d in dict.fromkeys(datasets) if _looks_like_hub_id(d, dataset=True)]
    family = run.run.get("family") or run.config.get("family")
    tags = ["gemma_hf", "gemma"] + ([family] if family and family != "gemma" else [])
    tags += [str(run.run["method"]), "trl"]
    kwargs = dict(
        license="gemma",
        library_name="transformers",
        pipeline_tag=_PIPELINE_TAGS[run.head],
        tags=list(dict.fromkeys(tags)),
    )
    if base_id:
        kwargs.update(base_model=base_id, base_model_relation="finetune")
    if hub_datasets:
        kwargs["datasets"] = hub_datasets
    return ModelCardData(**kwargs)


def render_card(
    run_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    template: str | os.PathLike | None = None,
) -> str:
    """The model card (README.md text) for a run directory; validated before it is returned."""
    from huggingface_hub import ModelCard

    from . import __version__

    run = read_run(run_dir)
    template = Path(template) if template is not None else CARD_TEMPLATE
    if not template.is_file():
        raise CardError(
            f"card template {template} not found (it ships in the repository's model_cards/ directory); "
            "pass template= / --template with its path."
        )
    config = _gemma_config(run.config)
    arch_table, arch_note, total, dtype = _architecture_section(run, config)
    family = run.run.get("family") or config.family
    method = str(run.run["method"])
    base = str(run.run["base_model"])
    title = (repo_id.split("/")[-1] if repo_id else run.path.resolve().name)
    method_name = _METHOD_NAMES.get(method, method)
    summary = (
        f"**{_cell(title)}** is `{_cell(base)}` ({_FAMILY_NAMES.get(family, family)}) after {method_name}, "
        f"trained with gemma_hf {_cell(run.run.get('gemma_hf_version') or '?')} on "
        f"{len(run.run['datasets'])} dataset(s). The facts and numbers below were read from the run directory."
    )
    card = ModelCard.from_template(
        card_data(run),
        template_path=str(template),
        title=_cell(title),
        summary=summary,
        base_model_md=_link(base),
        method_md=f"`{_cell(method)}`: {_cell(method_name)}",
        family_md=_FAMILY_NAMES.get(family, _cell(family)),
        architecture=_cell((run.config.get("architectures") or ["GemmaHFForCausalLM"])[0]),
        num_parameters=f"{total:,}",
        dtype=dtype,
        architecture_table=arch_table,
        architecture_note=arch_note,
        auto_class="AutoModelForSequenceClassification" if run.head == "sequence-classification" else "AutoModelForCausalLM",
        repo_id=repo_id or "path/to/this/model",
        stock_model_type=_STOCK_TYPES.get(config.family, config.family),
        datasets_table=_datasets_table(run.run["datasets"]),
        hyperparameters_table=_hyperparameters_table(run.recipe),
        run_table=_run_table(run.run),
        recipe_block=_fenced(run.recipe_text, "yaml"),
        metrics_table=_metrics_section(run.metrics),
        plots_md=_plots_section(run.plots),
        evaluation_md=_evaluation_section(run.evaluation),
        gemma_hf_version=__version__,
    )
    text = str(card)
    if not text.endswith("\n"):
        text += "\n"
    validate_card(text)
    return text


def write_card(
    run_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    template: str | os.PathLike | None = None,
) -> Path:
    """Render the card and write RUN_DIR/README.md atomically (temporary file, then rename)."""
    text = render_card(run_dir, repo_id=repo_id, template=template)
    final = Path(run_dir) / "README.md"
    fd, tmp = tempfile.mkstemp(prefix=".README.md.tmp-", dir=final.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return final


# ---------------------------------------------------------------------------------------------
# Offline validation


def validate_card(content: str | os.PathLike):
    """Check a model card without the network; return the parsed huggingface_hub ModelCard.

    `ModelCard.validate()` asks the Hub's /api/validate-yaml endpoint. Offline we check what we
    can: the card parses with ModelCard (YAML front matter is a mapping), the metadata fields
    the Hub reads have the right types and values (license `gemma`, library_name `transformers`,
    a pipeline_tag, tags, base_model / datasets as Hub ids), the metadata round-trips through
    ModelCardData and through the card text unchanged, and the body has every required section.
    Raises CardError listing every problem.
    """
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if isinstance(content, os.PathLike) or (isinstance(content, str) and "\n" not in content and Path(content).is_file()):
        content = Path(content).read_text(encoding="utf-8")
    problems = []
    if not content.startswith("---\n"):
        raise CardError("model card: no YAML front matter (the file must start with a '---' line).")
    try:
        card = ModelCard(content)
    except (ValueError, yaml.YAMLError) as err:
        raise CardError(f"model card: front matter does not parse: {err}") from None
    data = card.data.to_dict()

    if data.get("license") != "gemma":
        problems.append(f"license must be 'gemma' (Gemma Terms of Use), got {data.get('license')!r}")
    if data.get("library_name") != "transformers":
        problems.append(f"library_name must be 'transformers', got {data.get('library_name')!r}")
    if data.get("pipeline_tag") not in _PIPELINE_TAGS.values():
        problems.append(f"pipeline_tag must be one of {sorted(_PIPELINE_TAGS.values())}, got {data.get('pipeline_tag')!r}")
    tags = data.get("tags")
    if not isinstance(tags, list) or not tags or not all(isinstance(t, str) and t for t in tags):
        problems.append(f"tags must be a non-empty list of strings, got {tags!r}")
    elif "gemma_hf" not in tags:
        problems.append("tags must include 'gemma_hf'")
    for key in ("base_model", "datasets"):
        value = data.get(key)
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            try:
                if not isinstance(item, str):
                    raise HFValidationError(f"not a string: {item!r}")
                validate_repo_id(item)
            except HFValidationError as err:
                problems.append(f"{key}: {item!r} is not a Hub repository id ({err})")
    if data.get("base_model_relation") not in (None, "adapter", "merge", "quantized", "finetune"):
        problems.append(f"base_model_relation {data.get('base_model_relation')!r} is not one the Hub knows")
    if ModelCardData(**data).to_dict() != data:
        problems.append("metadata does not round-trip through ModelCardData")
    if ModelCard(str(card)).data.to_dict() != data:
        problems.append("metadata does not round-trip through the card text")
    for section in REQUIRED_SECTIONS:
        if not re.search(rf"^{re.escape(section)}\s*$", card.text, flags=re.MULTILINE):
            problems.append(f"body lacks the section {section!r}")
    for key in CITATIONS:
        if f"@article{{{key}," not in card.text:
            problems.append(f"body lacks the BibTeX entry {key!r}")
    if problems:
        raise CardError("invalid model card:\n  - " + "\n  - ".join(problems))
    return card


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
        if self.skipped:
            lines.append("not uploaded: " + ", ".join(self.skipped))
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def upload_plan(run_dir: str | os.PathLike) -> UploadPlan:
    """Decide exactly what a push uploads: card, model config + safetensors weights (+ shard index),
    the model code written by save_pretrained (top-level *.py), tokenizer files, generation config,
    recipe.yaml, run.json, metrics.jsonl, eval.json and plots/. Never checkpoints/, pickle files or
    hidden files. Refuses a run without README.md, config, safetensors weights, tokenizer or recipe,
    and any planned file that is a link pointing outside the run directory."""
    root = Path(run_dir)
    resolved_root = root.resolve()
    if not (root / "README.md").is_file():
        raise CardError(f"{root} has no README.md; render it first (gemma-hf card {root}).")
    _refuse_adapter_only(root)
    for required in ("config.json", "recipe.yaml"):
        if not (root / required).is_file():
            raise CardError(f"{root} has no {required}; it is not a complete run directory.")
    if not any((root / name).is_file() for name in _TOKENIZER_REQUIRED_ANY):
        raise CardError(f"{root} has no tokenizer (tokenizer.json or tokenizer.model); a model without its tokenizer cannot be used.")
    files = [name for name in _TOP_LEVEL_FILES if (root / name).is_file()]
    files += _weight_files(root)
    files += sorted(p.name for p in root.glob("*.py") if p.is_file())
    plots = root / "plots"
    if plots.is_dir():
        files += sorted(
            p.relative_to(root).as_posix()
            for p in plots.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    for name in files:
        target = (root / name).resolve()
        if target != resolved_root and resolved_root not in target.parents:
            raise CardError(f"{root / name} points outside the run directory ({target}); refusing to upload it.")
    ordered = sorted(dict.fromkeys(files))
    everything = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    skipped_files = [f for f in everything if f not in ordered]
    skipped = []
    for top in dict.fromkeys(f.split("/", 1)[0] for f in skipped_files):
        inside = [f for f in skipped_files if f == top or f.startswith(top + "/")]
        skipped.append(f"{top}/ ({len(inside)} files)" if (root / top).is_dir() else top)
    return UploadPlan(root, ordered, skipped)


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


def run_dir_name(root: Path) -> str:
    return root.resolve().name
