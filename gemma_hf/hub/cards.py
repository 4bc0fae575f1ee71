"""Model cards rendered from a run directory (read through gemma_hf.rundir.RunDir, the
same object that writes it).

:func:`render_card` / :func:`write_card` build the card from ``model_cards/gemma_hf_card.md`` (a
Jinja2 template rendered through ``huggingface_hub.ModelCard.from_template``); every value comes
from the run directory: recipe.yaml, run.json, metrics.jsonl, eval.json, config.json, plots/.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import yaml

from gemma_hf.model.configuration import GEMMA_FAMILIES
from gemma_hf.references import CAUSAL_LM, SEQUENCE_CLASSIFICATION, head_of_config, hub_id_of, identity, is_hub_id
from gemma_hf.rundir import STAGES, RunDir, RunDirError

from .checks import PIPELINE_TAGS, CardError, validate_card

CARD_TEMPLATE_NAME = "gemma_hf_card.md"


def card_template() -> Path:
    """The card template: model_cards/ of a source checkout (editable install), else the copy a
    regular install puts under <prefix>/share/gemma_hf/model_cards (setup.cfg data_files)."""
    import sys

    for root in (Path(__file__).resolve().parents[2], Path(sys.prefix) / "share" / "gemma_hf"):
        candidate = root / "model_cards" / CARD_TEMPLATE_NAME
        if candidate.is_file():
            return candidate
    return Path(__file__).resolve().parents[2] / "model_cards" / CARD_TEMPLATE_NAME


CARD_TEMPLATE = card_template()

# Recipe keys shown in the hyperparameter table (matched on the last component of a nested key);
# the full recipe is always on the card as well.
HYPERPARAMETER_KEYS = (
    "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "num_train_epochs", "max_steps",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "seed",
    "bf16", "fp16", "gradient_checkpointing", "max_length", "max_seq_length", "max_prompt_length",
    "max_completion_length", "packing", "completion_only_loss", "assistant_only_loss", "beta", "loss_type",
    "temperature", "alpha", "lmbda", "num_generations", "center_rewards_coefficient", "use_peft", "lora_r",
    "lora_alpha", "lora_dropout", "lora_target_modules", "ema_anchor", "warp_runs", "warp_iterations", "warp_eta",
)

_RUN_REQUIRED = ("method", "base_model", "family", "datasets")
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow", ".tsv")

# ---------------------------------------------------------------------------------------------
# Reading a run directory


@dataclass
class CardInputs:
    """Everything a card is rendered from, read from a finished run directory through RunDir."""

    path: Path
    recipe_text: str
    recipe: dict
    run: dict
    config: dict
    metrics: list[dict]
    evaluation: dict | None
    plots: list[str]
    weight_files: list[str]
    name: str | None = None  # the run's name when path is its publish staging directory

    def stage_dir(self, stage: str) -> Path:
        """A pipeline's stage directory: stages/NAME here, or in the working directory while the publish
        renders the card in its staging directory (stages/ moves in at the swap)."""
        here = self.path / STAGES / stage
        if here.is_dir() or not self.name:
            return here
        return self.path.parent / self.name / STAGES / stage

    @property
    def head(self) -> str:
        """run.json's head (recorded by every training run), else the config's."""
        if self.run.get("head") in (CAUSAL_LM, SEQUENCE_CLASSIFICATION):
            return self.run["head"]
        return SEQUENCE_CLASSIFICATION if head_of_config(self.config) == SEQUENCE_CLASSIFICATION else CAUSAL_LM


def published_weight_files(run_dir: Path) -> list[str]:
    try:
        names = RunDir(run_dir).weight_files()
    except RunDirError as err:
        raise CardError(str(err)) from None
    missing = [n for n in names if not (run_dir / n).is_file()]
    if missing:
        raise CardError(f"{run_dir}: the shard index lists missing files {missing}.")
    if not any(n.startswith("model.safetensors") for n in names):
        pickles = sorted(p.name for p in run_dir.glob("*.bin"))
        raise CardError(
            f"{run_dir} has no model.safetensors (or sharded index)"
            + (f"; it has pickle weights {pickles}, which gemma_hf never publishes" if pickles else "")
            + "."
        )
    return names


def refuse_adapter_only(run_dir: Path) -> None:
    """A whole-model card or push of a run whose root holds only the adapter (merge_lora: false) is refused."""
    if (run_dir / "adapter_config.json").is_file() and not (run_dir / "config.json").is_file():
        raise CardError(
            f"{run_dir} holds a LoRA adapter only (adapter_config.json, no config.json), not a whole model. Push "
            f"the adapter with `gemma-hf push {run_dir} --adapter-only --repo-id ORG/NAME` (its card names the "
            "base model), or merge the adapter into the base model (merge_lora: true) and push the merged run."
        )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# An estimate X with its interval is recorded as X, X_ci_low and X_ci_high (eval.json of eval and warp); a
# training run's held-out estimate X_before / X_after as X_ci_low_before, X_ci_high_after, ... (reward).
INTERVAL_SUFFIXES = ("_ci_low", "_ci_high")
_WHEN_SUFFIXES = ("_before", "_after")


def _split_when(key: str) -> tuple[str, str]:
    """(stem, "_before"/"_after"/"") of an eval.json key."""
    for when in _WHEN_SUFFIXES:
        if key.endswith(when):
            return key[: -len(when)], when
    return key, ""


def _is_interval_key(key: str, mapping: dict) -> bool:
    """``key`` is the bound of an interval whose estimate ``mapping`` also holds."""
    stem, when = _split_when(key)
    return stem.endswith(INTERVAL_SUFFIXES) and stem.rsplit("_ci_", 1)[0] + when in mapping


def _with_intervals(mapping: dict) -> dict:
    """X, X_ci_low, X_ci_high as one entry X: ``value [low, high]`` (cells of the card's tables); likewise
    X_before with X_ci_low_before and X_ci_high_before."""
    out = {}
    for key, value in mapping.items():
        if _is_interval_key(key, mapping):
            continue
        stem, when = _split_when(key)
        low, high = mapping.get(f"{stem}_ci_low{when}"), mapping.get(f"{stem}_ci_high{when}")
        if not (_is_number(low) and _is_number(high)) and when:  # an estimate whose name ends in _before/_after
            low, high = mapping.get(f"{key}_ci_low"), mapping.get(f"{key}_ci_high")
        if _is_number(value) and _is_number(low) and _is_number(high):
            value = f"{_cell(value)} [{_cell(low)}, {_cell(high)}]"
        out[key] = value
    return out


def _is_row_table(value) -> bool:
    """A list of flat records (e.g. warp's ``pareto``): shown as one table, a row per record."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(row, dict) and row and all(v is None or isinstance(v, (str, int, float, bool)) for v in row.values())
        for row in value)


def read_run(run_dir: str | os.PathLike, *, adapter: bool = False) -> CardInputs:
    """Read and check everything the card needs from a run directory (CardError names what is wrong).
    ``adapter``: the card of the run's LoRA adapter (adapter/): no whole model (config.json, weights) needed."""
    rundir = RunDir(run_dir)
    path = rundir.path
    if not path.is_dir():
        raise CardError(f"{path} is not a directory.")
    if not rundir.recipe.is_file():
        raise CardError(f"{rundir.recipe} is missing (the resolved recipe).")
    recipe_text = rundir.recipe.read_text(encoding="utf-8")
    try:
        recipe = yaml.safe_load(recipe_text)
    except yaml.YAMLError as err:
        raise CardError(f"{rundir.recipe} is not valid YAML: {err}") from None
    if not isinstance(recipe, dict):
        raise CardError(f"{rundir.recipe} must hold a mapping of recipe keys, got {type(recipe).__name__}.")
    try:
        run = rundir.read_run()
        missing = [k for k in _RUN_REQUIRED if k not in run]
        if missing:
            raise CardError(f"{rundir.run_json} lacks {missing}.")
        if not isinstance(run["datasets"], list):
            raise CardError(f"{rundir.run_json}: 'datasets' must be a list.")
        if adapter:
            config, weights = {}, []
        else:
            refuse_adapter_only(path)
            config = rundir.read_json(path / "config.json", "the model config")
            weights = published_weight_files(path)
        evaluation = rundir.read_eval()
        metrics = rundir.read_metrics()
    except RunDirError as err:
        raise CardError(str(err)) from None
    return CardInputs(path, recipe_text, recipe, run, config, metrics, evaluation, rundir.plot_files(), weights)


# ---------------------------------------------------------------------------------------------
# Architecture: match a preset (the reports' Table 1 rows) by config fields

_MATCH_FIELDS = (
    "family", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "layer_types", "sliding_window", "attn_logit_softcapping",
    "final_logit_softcapping", "use_post_norms", "use_qk_norm", "rope_theta", "local_rope_theta",
    "rope_linear_factor", "attention_scale", "tie_word_embeddings",
)


def _gemma_config(config: dict):
    from gemma_hf.model import GemmaHFConfig

    config = {k: v for k, v in config.items() if k not in ("auto_map", "transformers_version")}
    try:
        return GemmaHFConfig.from_dict(config)
    except Exception as err:
        raise CardError(f"config.json is not a Gemma config gemma_hf can read: {err}") from err


def match_preset(config):
    """(preset, "hf" | "report") whose architecture equals `config` field for field, or None.

    The vocabulary may be either the Hugging Face one or the reports' padded one."""
    from gemma_hf.presets import PRESETS

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


def _count_parameters(run: CardInputs) -> tuple[int, int, str]:
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
    return total, embedding, _dtype_names(dtypes)


def _dtype_names(dtypes: set[str]) -> str:
    """safetensors' dtype names (F32, BF16, ...) as torch's."""
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    return ", ".join(sorted(names.get(d, d) for d in dtypes))


# ---------------------------------------------------------------------------------------------
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
    """``org/name`` of a Hub repository (references.is_hub_id), not a data file's name."""
    if not isinstance(name, str) or name.count("/") != 1 or (dataset and name.lower().endswith(_DATA_SUFFIXES)):
        return False
    return is_hub_id(name)


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


def _architecture_section(run: CardInputs, config) -> tuple[str, str, int, str]:
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
    tables = {k: v for k, v in evaluation.items() if k not in samples and _is_row_table(v)}
    other = {k: v for k, v in evaluation.items() if k not in numbers and k not in samples and k not in tables}
    numbers = _with_intervals(numbers)  # value [low, high] in one cell
    parts = ["From `eval.json` (held-out results of the model before and after training; `value [low, high]`: an "
             "estimate and its interval):"]
    paired = {}
    for key in numbers:
        for when in ("before", "after"):
            if key.endswith(f"_{when}"):
                paired.setdefault(key[: -len(when) - 1], {})[when] = key
    if paired:
        parts.append(_table(["result", "before", "after"], [
            [_Raw(f"`{_cell(name)}`"), numbers.get(keys.get("before")), numbers.get(keys.get("after"))]
            for name, keys in paired.items()]))
    single = {k: v for k, v in numbers.items() if not any(k in keys.values() for keys in paired.values())}
    if single:
        parts.append(_table(["result", "value"], [[_Raw(f"`{_cell(k)}`"), v] for k, v in single.items()]))
    for key, rows in tables.items():
        rows = [_with_intervals(row) for row in rows]
        columns = list(dict.fromkeys(k for row in rows for k in row))
        parts.append(f"`{_cell(key)}`:\n\n" + _table([_cell(c) for c in columns],
                                                     [[row.get(c) for c in columns] for row in rows]))
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


def _family_name(family: str) -> str:
    return GEMMA_FAMILIES[family].display_name if family in GEMMA_FAMILIES else str(family)


def _usage_block(head: str, repo_id: str) -> str:
    """How to use the checkpoint: chat with a causal LM, score a chat with a reward model."""
    repo = json.dumps(repo_id)
    if head == "sequence-classification":
        code = f"""from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({repo}, trust_remote_code=True)
model = AutoModelForSequenceClassification.from_pretrained({repo}, trust_remote_code=True)
chat = [{{"role": "user", "content": "Name a primary colour."}},
        {{"role": "assistant", "content": "Red is a primary colour."}}]
inputs = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)
reward = model(**inputs).logits[0, 0].item()  # higher: more preferred"""
    else:
        code = f"""from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({repo}, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained({repo}, trust_remote_code=True)
chat = [{{"role": "user", "content": "Name three primary colours."}}]
inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=64)  # stops at <end_of_turn> (generation_config.json)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""
    return _fenced(code, "python")


# ---------------------------------------------------------------------------------------------
# A pipeline's card: each stage once (method, data, key hyper-parameters, before -> after, time)

# Held-out results a stage row shows before -> after, the first two present (the full table is under Evaluation).
_STAGE_ROW_SKIPS = ("seed", "per_device_eval_batch_size")  # in the stage's own recipe, not what distinguishes it
_HEADLINE_RESULTS = ("eval_loss", "accuracy", "margin", "reward", "kl_to_init", "win_rate")


def _stage_record(run: CardInputs, stage) -> dict | None:
    try:
        return RunDir(run.stage_dir(str(stage))).read_run()
    except (RunDirError, OSError):
        return None


def _stage_recipe(run: CardInputs, stage: str) -> dict:
    try:
        recipe = yaml.safe_load((run.stage_dir(stage) / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return recipe if isinstance(recipe, dict) else {}


def _dataset_label(recorded) -> str:
    path = str(recorded.get("path", "?") if isinstance(recorded, dict) else recorded)
    return path.split(":", 1)[-1] if path.startswith("asset:") else path


def _pipeline_stages_table(run: CardInputs) -> str:
    stages = run.run.get("stages") or []
    if not stages:
        return "run.json lists no stages."
    rows = []
    for stage in stages:
        name = str(stage.get("name"))
        record = _stage_record(run, name) or {}
        recipe = _flatten(_stage_recipe(run, name))
        data = "; ".join(dict.fromkeys(
            f"{_dataset_label(d)} ({_cell(d.get('num_examples')) if isinstance(d, dict) else '?'})"
            for d in record.get("datasets") or [])) or "–"
        hyper = ", ".join(f"{k.rsplit('.', 1)[-1]}={_cell(v)}" for k, v in recipe.items()
                          if k.rsplit(".", 1)[-1] in HYPERPARAMETER_KEYS and k.rsplit(".", 1)[-1] not in _STAGE_ROW_SKIPS
                          and v is not False and not isinstance(v, (dict, list))) or "–"
        evaluation = RunDir(run.stage_dir(name)).read_eval() if run.stage_dir(name).is_dir() else None
        evaluation = evaluation or {}
        changes = [f"{key} {_cell(evaluation[f'{key}_before'])} → {_cell(evaluation[f'{key}_after'])}"
                   for key in _HEADLINE_RESULTS
                   if _is_number(evaluation.get(f"{key}_before")) and _is_number(evaluation.get(f"{key}_after"))][:2]
        if not changes and record.get("method") == "eval":
            changes = [f"{k} {_cell(evaluation[k])}" for k in ("reward_win_rate", "judge_win_rate") if _is_number(evaluation.get(k))]
        rows.append([_Raw(f"`{_cell(name)}`"), stage.get("method") or record.get("method"), data, hyper,
                     "; ".join(changes) or "–", _duration(stage.get("seconds"))])
    final = run.run.get("final_stage")
    return (f"The model in this repository is stage `{_cell(final)}`'s. Each stage's run directory (recipe, "
            "metrics, card) is under `stages/NAME/` in the pipeline directory.\n\n"
            + _table(["stage", "method", "data (examples)", "key hyper-parameters", "held-out before → after",
                      "time"], rows))


def _pipeline_datasets_table(run: CardInputs) -> str:
    """Each dataset once, with the stages that read it and how many of its examples each took."""
    used: dict[str, list[str]] = {}
    for stage in run.run.get("stages") or []:
        record = _stage_record(run, stage.get("name")) or {}
        for d in record.get("datasets") or []:
            path = str(d.get("path", "?") if isinstance(d, dict) else d)
            count = d.get("num_examples") if isinstance(d, dict) else None
            used.setdefault(path, []).append(f"{stage.get('name')}" + (f" ({_cell(count)})" if count is not None else ""))
    if not used:
        return _datasets_table(run.run["datasets"])
    return _table(["dataset", "stages (examples)"], [[_link(p, dataset=True), ", ".join(s)] for p, s in used.items()])


def _started(run: CardInputs):
    """run.json's start, or for a pipeline whose record lacks it, its first stage's."""
    if run.run.get("started"):
        return run.run["started"]
    starts = [(_stage_record(run, s.get("name")) or {}).get("started") for s in run.run.get("stages") or []]
    return min((s for s in starts if s), default=None)


# ---------------------------------------------------------------------------------------------
# Rendering


def card_data(run: CardInputs, title: str | None = None):
    """The card's Hub metadata (YAML front matter) as a huggingface_hub ModelCardData: license,
    tags, the base model and datasets where a Hub repository is known (assets name the one they
    reproduce), and ``model-index`` with the held-out results of eval.json."""
    from huggingface_hub import ModelCardData

    base = run.run.get("base_model")
    base_id = hub_id_of(base) if isinstance(base, str) else None
    datasets = [d.get("path") if isinstance(d, dict) else d for d in run.run["datasets"]]
    hub_datasets = [d for d in dict.fromkeys(datasets) if _looks_like_hub_id(d, dataset=True)]
    family = run.run.get("family") or run.config.get("family")
    tags = ["gemma_hf", "gemma"] + ([family] if family and family != "gemma" else [])
    tags += [str(run.run["method"]), "trl"]
    kwargs = dict(
        license="gemma",
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS[run.head],
        tags=list(dict.fromkeys(tags)),
    )
    if base_id:
        kwargs.update(base_model=base_id, base_model_relation="finetune")
    if hub_datasets:
        kwargs["datasets"] = hub_datasets
    results = _eval_results(run, datasets)
    if results:
        kwargs.update(model_name=title or run.path.resolve().name, eval_results=results)
    return ModelCardData(**kwargs)


def _dataset_id(recorded) -> tuple[str, str]:
    """(id, name) of a recorded dataset for model-index: its Hub id when known (a Hub dataset, an asset
    that reproduces one), else the data's own name -- the file's stem (``alpaca_en_demo`` for
    ``asset:llamafactory-data/alpaca_en_demo.json`` or ``local:alpaca_en_demo.json``) -- with the
    recorded reference as its name."""
    text = identity(recorded) if isinstance(recorded, str) else str(recorded)
    hub = hub_id_of(text) or (text if _looks_like_hub_id(text, dataset=True) else None)
    if hub:
        return hub, hub
    base = text.split(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1] or text
    stem = re.sub(r"(\.(jsonl?|csv|parquet|txt|arrow|tsv))?(-[0-9a-f]{12})?$", "", base) or base
    return stem, f"{stem} ({text})" if stem != text else stem


def _eval_entries(evaluation: dict, datasets: list, task: str, prefix: str = "") -> list:
    """EvalResults of eval.json's numbers measured after training (not the _before ones, which describe
    the starting point) on the held-out split of ``datasets``: dataset_type is the dataset's id (Hub id
    or the data's own name; a mixture's ids joined by "+"), dataset_split "held-out"."""
    from huggingface_hub import EvalResult

    ids = list(dict.fromkeys(_dataset_id(d.get("path") if isinstance(d, dict) else d) for d in datasets))
    if not ids:
        return []
    dataset_type = "+".join(i for i, _ in ids)[:200]
    dataset_name = ("held-out split of " + ", ".join(n for _, n in ids))[:200]
    out = []
    for key, value in evaluation.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if not _is_number(value) or not math.isfinite(value) or name.endswith("_before") or "num_" in name \
                or _is_interval_key(key, evaluation):
            continue
        name = key[: -len("_after")] if key.endswith("_after") else key
        out.append(EvalResult(task_type=task, dataset_type=dataset_type, dataset_name=dataset_name,
                              dataset_split="held-out", metric_type=name, metric_value=float(value), metric_name=name))
    return out


def _eval_results(run: CardInputs, datasets: list) -> list:
    """model-index entries (:func:`_eval_entries`); a pipeline's per stage, on that stage's data."""
    evaluation = run.evaluation or {}
    task = PIPELINE_TAGS[run.head]
    if run.run.get("method") == "pipeline":
        out = []
        for stage in run.run.get("stages") or []:
            stage_run = _stage_record(run, stage.get("name"))
            out += _eval_entries(evaluation, (stage_run or {}).get("datasets") or [], task, f"{stage.get('name')}/")
        return out[:40]
    return _eval_entries(evaluation, datasets, task)[:40]


def render_card(
    run_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    template: str | os.PathLike | None = None,
    name: str | None = None,
) -> str:
    """The model card (README.md text) for a run directory; validated before it is returned."""
    from huggingface_hub import ModelCard

    run = read_run(run_dir)
    run.name = name
    template = _template(template)
    config = _gemma_config(run.config)
    arch_table, arch_note, total, dtype = _architecture_section(run, config)
    family = run.run.get("family") or config.family
    method = str(run.run["method"])
    base = str(run.run["base_model"])
    title = repo_id.split("/")[-1] if repo_id else (name or run.path.resolve().name)
    method_name = str(run.run.get("title") or method)  # run.json's title: the method's own (Method.title)
    pipeline = method == "pipeline"
    distinct = len(dict.fromkeys(str(d.get("path") if isinstance(d, dict) else d) for d in run.run["datasets"]))
    merge = run.run.get("merge") if isinstance(run.run.get("merge"), dict) else None
    if pipeline:
        stages = [str(s.get("name")) for s in run.run.get("stages") or []]
        what = f"a pipeline of {len(stages)} stages ({' → '.join(stages)})"
    else:
        what = method_name
    # The title is the heading above; the paragraph says what the run did, once (the tables below give the facts).
    if merge is not None:  # a merge trains nothing: its data (if any) is the held-out evaluation's
        summary = (
            f"The {_cell(merge.get('method'))} weight average of {len(merge.get('models') or [])} models"
            + (f" from the base `{_cell(merge['base'])}`" if merge.get("base") else "")
            + f" ({_family_name(family)}), made with gemma_hf {_cell(run.run.get('gemma_hf_version') or '?')}; "
            + (f"evaluated beside its inputs on the held-out records of {distinct} dataset(s). " if distinct else "")
            + "The facts and numbers below were read from the run directory."
        )
    else:
        summary = (
            f"`{_cell(base)}` ({_family_name(family)}) after {what}, trained with gemma_hf "
            f"{_cell(run.run.get('gemma_hf_version') or '?')} on {distinct} dataset(s). The facts and numbers below "
            "were read from the run directory."
        )
    card = ModelCard.from_template(
        card_data(run, title),
        template_path=str(template),
        title=_cell(title),
        summary=summary,
        base_model_md=_link(base),
        method_md=f"`{_cell(method)}`: {_cell(method_name)}",
        family_md=_cell(_family_name(family)),
        architecture=_cell((run.config.get("architectures") or ["GemmaHFForCausalLM"])[0]),
        num_parameters=f"{total:,}",
        dtype=dtype,
        architecture_table=arch_table,
        architecture_note=arch_note,
        usage_block=_usage_block(run.head, repo_id or "path/to/this/model"),
        repo_id=repo_id or "path/to/this/model",
        stock_model_type=GEMMA_FAMILIES[config.family].stock_model_type,
        datasets_table=_pipeline_datasets_table(run) if pipeline else _datasets_table(run.run["datasets"]),
        hyperparameters_table=(_pipeline_stages_table(run) if pipeline else _merge_table(merge) if merge is not None
                               else _hyperparameters_table(run.recipe)),
        **_record_sections(run),
    )
    return _checked_text(card)


def render_adapter_card(
    run_dir: str | os.PathLike,
    *,
    base_model: str,
    adapter_config: dict,
    adapter_weights: Path,
    repo_id: str | None = None,
    declared: bool = False,
    template: str | os.PathLike | None = None,
) -> str:
    """The card of a LoRA run's adapter alone (``gemma-hf push --adapter-only``): the same template and
    record sections as the whole model's card, with the base model named by its Hub id ``base_model``
    (``base_model_relation: adapter``, ``library_name: peft``), the adapter's settings from
    ``adapter_config`` and its size from ``adapter_weights``. ``declared``: the base was named at push time
    (``--base-model``), the run having been trained from a local copy of it. Validated before it is returned."""
    from huggingface_hub import ModelCard

    run = read_run(run_dir, adapter=True)
    template = _template(template)
    family = run.run.get("family")
    recorded = str(run.run["base_model"])
    method = str(run.run["method"])
    title = repo_id.split("/")[-1] if repo_id else f"{run.path.resolve().name}-lora"
    distinct = len(dict.fromkeys(str(d.get("path") if isinstance(d, dict) else d) for d in run.run["datasets"]))
    summary = (
        f"A LoRA adapter for {_link(base_model)} ({_family_name(family)}) from {_cell(run.run.get('title') or method)}, "
        f"trained with gemma_hf {_cell(run.run.get('gemma_hf_version') or '?')} on {distinct} dataset(s). The "
        "facts and numbers below were read from the run directory; the held-out results are those of the base "
        "model with this adapter applied."
    )
    card = ModelCard.from_template(
        _adapter_card_data(run, base_model, title),
        template_path=str(template),
        title=_cell(title),
        summary=summary,
        base_model_md=_link(base_model),
        method_md=f"`{_cell(method)}`: {_cell(run.run.get('title') or method)}, LoRA",
        family_md=_cell(_family_name(family)),
        adapter_table=_adapter_table(adapter_config, adapter_weights),
        adapter_note=_adapter_base_note(recorded, base_model, declared),
        usage_block=_adapter_usage_block(run.head, repo_id or "path/to/this/adapter", base_model),
        datasets_table=_datasets_table(run.run["datasets"]),
        hyperparameters_table=_hyperparameters_table(run.recipe),
        **_record_sections(run),
    )
    return _checked_text(card)


def _adapter_card_data(run: CardInputs, base_model: str, title: str):
    """Hub metadata of an adapter: the base by Hub id, relation ``adapter``, PEFT as its library."""
    from huggingface_hub import ModelCardData

    datasets = [d.get("path") if isinstance(d, dict) else d for d in run.run["datasets"]]
    hub_datasets = [d for d in dict.fromkeys(datasets) if _looks_like_hub_id(d, dataset=True)]
    family = run.run.get("family")
    tags = ["gemma_hf", "gemma"] + ([family] if family and family != "gemma" else [])
    tags += [str(run.run["method"]), "trl", "lora", "peft"]
    kwargs = dict(license="gemma", library_name="peft", pipeline_tag=PIPELINE_TAGS[run.head],
                  tags=list(dict.fromkeys(tags)), base_model=base_model, base_model_relation="adapter")
    if hub_datasets:
        kwargs["datasets"] = hub_datasets
    results = _eval_results(run, datasets)
    if results:
        kwargs.update(model_name=title, eval_results=results)
    return ModelCardData(**kwargs)


_ADAPTER_KEYS = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save",
                 "trainable_token_indices", "use_rslora", "use_dora", "bias")


def _adapter_table(adapter_config: dict, weights: Path) -> str:
    from safetensors import safe_open

    count, dtypes = 0, set()
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_slice(key)
            count += math.prod(tensor.get_shape())
            dtypes.add(tensor.get_dtype())
    rows = [[_Raw(f"`{key}`"), sorted(value) if isinstance(value, (list, set)) else value]
            for key, value in adapter_config.items() if key in _ADAPTER_KEYS and value not in (None, [], {})]
    rows.append([_Raw("parameters"), f"{count:,} ({_dtype_names(dtypes)})"])
    return ("From `adapter_config.json` and `adapter_model.safetensors` (PEFT's file layout):\n\n"
            + _table(["setting", "value"], rows))


def _adapter_base_note(recorded: str, base_model: str, declared: bool) -> str:
    if declared:
        return (f"The run was trained from `{_cell(recorded)}`, a local model; {_link(base_model)} was named as its "
                "base when the adapter was pushed (`gemma-hf push --adapter-only --base-model`): the repository "
                "holding those weights.")
    if recorded != base_model:
        source = ""
        if recorded.startswith("asset:"):
            from gemma_hf.assets import IDENTITY

            source = (IDENTITY.get(recorded[len("asset:"):].split("/")[0]) or {}).get("source") or ""
        return (f"The run was trained from `{_cell(recorded)}`" + (f" ({_cell(source)})" if source else "")
                + f", which stands for {_link(base_model)}. Its weights may differ from that repository's (a "
                "dequantised copy does), so on the Hub's base the adapter meets slightly different weights than "
                "in training; the held-out results below were measured on the training base.")
    return f"The run was trained from {_link(base_model)} itself."


def _adapter_usage_block(head: str, repo_id: str, base_model: str) -> str:
    repo, base = json.dumps(repo_id), json.dumps(base_model)
    if head == "sequence-classification":
        code = f"""from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({repo})
base = AutoModelForSequenceClassification.from_pretrained({base}, num_labels=1, trust_remote_code=True)
model = PeftModel.from_pretrained(base, {repo})  # the adapter and its trained score head
chat = [{{"role": "user", "content": "Name a primary colour."}},
        {{"role": "assistant", "content": "Red is a primary colour."}}]
inputs = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)
reward = model(**inputs).logits[0, 0].item()  # higher: more preferred"""
    else:
        code = f"""from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({repo})
base = AutoModelForCausalLM.from_pretrained({base}, trust_remote_code=True)
model = PeftModel.from_pretrained(base, {repo})
chat = [{{"role": "user", "content": "Name three primary colours."}}]
inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
output = model.generate(**inputs, max_new_tokens=64, eos_token_id=stops)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""
    return _fenced(code, "python")


def _template(template: str | os.PathLike | None) -> Path:
    template = Path(template) if template is not None else CARD_TEMPLATE
    if not template.is_file():
        raise CardError(
            f"card template {template} not found (it ships in the repository's model_cards/ directory); "
            "pass template= / --template with its path."
        )
    return template


def _record_sections(run: CardInputs) -> dict:
    """The card's sections read from the run's record (run.json, recipe, metrics, plots, eval.json)."""
    from gemma_hf import __version__

    return dict(
        run_table=_run_table({**run.run, "started": _started(run)}),
        recipe_block=_fenced(run.recipe_text, "yaml"),
        metrics_table=_metrics_section(run.metrics),
        plots_md=_plots_section(run.plots),
        evaluation_md=_evaluation_section(run.evaluation),
        gemma_hf_version=__version__,
    )


def _checked_text(card) -> str:
    text = str(card)
    if not text.endswith("\n"):
        text += "\n"
    validate_card(text)
    return text


def _merge_table(merge: dict) -> str:
    """A merge's inputs (by identity) with their weights, and its settings (run.json's ``merge``)."""
    models = merge.get("models") or []
    weights = [m.get("weight") for m in models]
    if merge.get("method") == "linear" and all(w is None for w in weights):
        weights = [1 / len(models)] * len(models) if models else []
    rows = [[_Raw(f"model {i}"), _Raw(_link(str(m.get("model")))), w] for i, (m, w) in enumerate(zip(models, weights))]
    if merge.get("base"):
        rows.insert(0, [_Raw("base"), _Raw(_link(str(merge["base"]))), "–"])
    settings = ", ".join(f"{k} {merge[k]}" for k in ("eta", "dtype") if merge.get(k) is not None)
    formula = {"linear": "θ = Σ w_i θ_i", "slerp": "θ = θ_base + SLERP of the task vectors θ_m − θ_base (WARP)",
               "liti": "θ = (1 − η) θ_base + η θ_model"}.get(str(merge.get("method")), "")
    return (f"Weight averaging, `{_cell(merge.get('method'))}`: {formula}" + (f" ({settings})" if settings else "")
            + ". Details in `merge.json`.\n\n" + _table(["input", "model", "weight"], rows))


def _method_of(run_dir) -> str | None:
    try:
        return RunDir(run_dir).read_run().get("method")
    except RunDirError:
        return None


def render_evaluation_card(run_dir: str | os.PathLike, *, name: str | None = None) -> str:
    """README.md of an evaluation directory (`gemma-hf eval`): what was compared, on which prompts, the
    results table (evaluation.md) and the recipe. It holds no model, so it has no Hub metadata."""
    from gemma_hf import __version__

    rundir = RunDir(run_dir)
    try:
        run = rundir.read_run()
        table = (rundir / "evaluation.md").read_text(encoding="utf-8")
        recipe_text = rundir.recipe.read_text(encoding="utf-8")
    except (OSError, RunDirError) as err:
        raise CardError(f"{rundir.path} is not a complete evaluation directory: {err}") from None
    title = name or rundir.path.resolve().name
    model, baseline = run.get("model"), run.get("baseline")
    datasets = run.get("datasets") or []
    against = f" against {_link(baseline)}" if baseline else ""
    lines = [
        "---", "tags:", "- gemma_hf", "- evaluation", "---", "",
        f"# Evaluation: {_cell(title)}", "",
        f"{_link(model)}{against} on {run.get('num_prompts', '?')} held-out prompts, evaluated with gemma_hf "
        f"{_cell(run.get('gemma_hf_version') or __version__)}. The numbers below were read from eval.json in this "
        "directory.", "",
        "## Results", "", table.rstrip(), "",
        "## What was evaluated", "",
        _table(["", ""], [["model", _link(model)], ["baseline", _link(baseline) if baseline else "–"],
                          ["reward model", _link(run["reward_model"]) if run.get("reward_model") else "–"],
                          ["judge", _link(run["judge"]) if run.get("judge") else "–"],
                          ["prompts", run.get("num_prompts")], ["started", run.get("started") or "–"],
                          ["wall time", _duration(run.get("wall_time_s"))]]), "",
        _datasets_table(datasets), "",
        "## Recipe", "", _fenced(recipe_text, "yaml"), "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The card of a generate run (teacher-written SFT data: no model, a dataset)
# ---------------------------------------------------------------------------------------------

GENERATION_MANIFEST = "generation.json"  # written by gemma_hf.recipes.generate
GENERATION_SAMPLES = 3  # records the card shows


def render_generation_card(run_dir: str | os.PathLike, *, name: str | None = None) -> str:
    """README.md of a generate run: the teacher (identity and weights fingerprint), the sampling settings,
    what each filter removed, the sources, a few records, how to train on it and the recipe; read from
    run.json, generation.json and the dataset in the directory."""
    from gemma_hf import __version__

    rundir = RunDir(run_dir)
    try:
        run = rundir.read_run()
        manifest = rundir.read_json(rundir / GENERATION_MANIFEST, "the generation manifest")
        recipe_text = rundir.recipe.read_text(encoding="utf-8")
        dataset = rundir.dataset_file()
        if dataset is None:
            raise RunDirError("run.json names no dataset")
        with dataset.open(encoding="utf-8") as handle:
            samples = [json.loads(line) for _, line in zip(range(GENERATION_SAMPLES), handle)]
    except (OSError, ValueError, RunDirError) as err:
        raise CardError(f"{rundir.path} is not a complete generate run directory: {err}") from None
    if not isinstance(manifest, dict):
        raise CardError(f"{rundir / GENERATION_MANIFEST} must hold a JSON object")
    title = name or rundir.path.resolve().name
    teacher = manifest.get("teacher") or {}
    counts, settings = manifest.get("counts") or {}, manifest.get("settings") or {}
    filters, removed = manifest.get("filters") or {}, counts.get("removed") or {}
    throughput = manifest.get("throughput") or {}
    filter_rows = [[f"`{key}`", "on" if value is True else "off" if value in (False, None) else value,
                    removed.get(key, 0)] for key, value in filters.items()]
    sample_lines = []
    for record in samples:
        messages = record.get("messages") or []
        prompt = next((m.get("content") for m in reversed(messages[:-1]) if m.get("role") == "user"), "")
        answer = messages[-1].get("content") if messages else ""
        sample_lines += [f"- **prompt**: {_cell(prompt)}", f"  **teacher**: {_cell(answer)}"]
    lines = [
        "---", "tags:", "- gemma_hf", "- synthetic", "- sft", "---", "",
        f"# Teacher-written SFT data: {_cell(title)}", "",
        f"{counts.get('kept', '?')} conversations: {_link(str(teacher.get('model')))} answered "
        f"{counts.get('prompts', '?')} prompts ({counts.get('answers', '?')} answers) in the "
        f"{_cell(settings.get('family'))} chat format, written with gemma_hf "
        f"{_cell(run.get('gemma_hf_version') or __version__)}. Every record of `{dataset.name}` carries its "
        "provenance (teacher and weights fingerprint, settings, seed and shard, source dataset and record index); "
        f"`{GENERATION_MANIFEST}` holds the counts, the settings and each shard's sha256.", "",
        "## Teacher and settings", "",
        _table(["", ""], [["teacher", _link(str(teacher.get("model")))],
                          ["weights fingerprint", f"{str(teacher.get('fingerprint'))[:16]}…"],
                          *[[key, settings.get(key)] for key in ("temperature", "top_p", "top_k", "max_new_tokens",
                                                                  "num_answers")],
                          ["seed", manifest.get("seed")], ["prompts per shard", manifest.get("shard_size")],
                          ["answers/s", throughput.get("answers_per_second")],
                          ["wall time", _duration(run.get("wall_time_s"))]]), "",
        "## Filters", "",
        "Each record removed is counted by the first filter that removed it (in this order).", "",
        _table(["filter", "setting", "removed"], filter_rows), "",
        "## Sources", "", _datasets_table(manifest.get("sources") or run.get("datasets") or []), "",
        "## Records", "", *(sample_lines or ["No record was kept."]), "",
        "## Training on it", "",
        _fenced("datasets:\n  - path: RUN_DIR            # this directory (or RUN_DIR/" + dataset.name
                + "; {from: STAGE} in a pipeline)", "yaml"), "",
        "## Recipe", "", _fenced(recipe_text, "yaml"), "",
    ]
    return "\n".join(lines)


def render_sweep_card(run_dir: str | os.PathLike, *, name: str | None = None) -> str:
    """README.md of a sweep's directory (a pipeline stage with ``sweep:``): one run per point, each with its
    values and held-out numbers; the runs are in stages/POINT (each with its own card). It holds no model
    of its own (a merge stage averages its runs), so it has no Hub metadata."""
    from gemma_hf import __version__

    rundir = RunDir(run_dir)
    try:
        run = rundir.read_run()
    except RunDirError as err:
        raise CardError(f"{rundir.path} is not a complete sweep directory: {err}") from None
    points = run.get("points") or []
    keys = [k for k in dict.fromkeys(k for p in points for k in (p.get("summary") or {}))
            if all(k in (p.get("summary") or {}) for p in points)][:8]
    swept = list(dict.fromkeys(k for p in points for k in (p.get("values") or {})))
    rows = [[p.get("name"), *[(p.get("values") or {}).get(k) for k in swept],
             *[(p.get("summary") or {}).get(k) for k in keys]] for p in points]
    title = name or rundir.path.resolve().name
    lines = [
        "---", "tags:", "- gemma_hf", "- sweep", "---", "",
        f"# Sweep: {_cell(title)}", "",
        f"{len(points)} runs of {_cell(run.get('title') or 'a hyper-parameter sweep')}"
        + (f" from {_link(run['base_model'])}" if run.get("base_model") else "")
        + f", one per point of the sweep over {', '.join(f'`{k}`' for k in swept) or 'its values'}, with gemma_hf "
        f"{_cell(run.get('gemma_hf_version') or __version__)}. Each run is in `stages/POINT/` with its own card; the "
        "numbers below are each run's held-out results (its eval.json).", "",
        "## Points", "", _table(["point", *swept, *keys], rows), "",
        _datasets_table(run.get("datasets") or []), "",
        _table(["started", "finished", "wall time"], [[run.get("started") or "–", run.get("finished") or "–",
                                                         _duration(run.get("wall_time_s"))]]), "",
    ]
    return "\n".join(lines)


def write_card(
    run_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    template: str | os.PathLike | None = None,
    name: str | None = None,
) -> Path:
    """Render the card and write RUN_DIR/README.md atomically (temporary file, then rename).
    ``name``: the run's name when RUN_DIR is not its final place (the publish's staging directory).
    An evaluation directory (run.json's method "eval") gets its evaluation card, a generate run its dataset card,
    a sweep's directory its list of runs."""
    method = _method_of(run_dir)
    if method == "eval":
        text = render_evaluation_card(run_dir, name=name)
    elif method == "generate":
        text = render_generation_card(run_dir, name=name)
    elif method == "sweep":
        text = render_sweep_card(run_dir, name=name)
    else:
        text = render_card(run_dir, repo_id=repo_id, template=template, name=name)
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


