"""Semantic checks of a built recipe, for every method: numbers in range, the model's architecture,
the tokenizer, every dataset record, conflicting options; then the method's own checks.

Called by :func:`gemma_hf.recipes.config.load_recipe` after the dataclasses are built. Reads model
*configs* (config.json, a preset), tokenizers and data, never weights. Gathers every problem into a
:class:`Checks` and raises one :class:`~gemma_hf.recipes.problems.RecipeError`. Environment problems
(the machine lacks a GPU, a package, a download) are stored on the recipe instead
(``recipe.environment_problems``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

from gemma_hf.chat import BOS, CONTROL_TOKENS, END_OF_TURN, EOS, FAMILIES, START_OF_TURN
from gemma_hf.errors import suggestion
from gemma_hf.references import (
    CAUSAL_LM,
    PENDING_STAGES,
    STAGE_SCHEME,
    BadReference,
    WrongHead,
    check_head,
    hub_offline,
    is_hub_id,
    resolve,
)
from gemma_hf.rundir import RunDirError, safetensors_complete, weight_files

from .data import held_out_count, read_dataset
from .methods import get_method, method_names
from .sources import parses_whole
from .problems import Problem, RecipeError
from .schema import Recipe

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
GPU_ONLY_ATTENTION = ("flash_attention_2", "flash_attention_3")
LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
             "lora_modules_to_save", "use_rslora", "use_dora", "lora_task_type")
REPORTING_PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "trackio": "trackio", "mlflow": "mlflow",
                      "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive", "neptune": "neptune",
                      "swanlab": "swanlab", "codecarbon": "codecarbon", "azure_ml": "azureml"}


class Checks:
    """Collects the problems of one recipe; methods report theirs through it too."""

    def __init__(self, recipe: Recipe, file_label: str):
        self.recipe, self.file_label = recipe, file_label
        self.problems: list[Problem] = []
        self.tokenizer = None  # loaded by the tokenizer check, for the checks after it

    def origin(self, key: str) -> str:
        return self.recipe.origins.get(key.split("[")[0].split(".")[0], self.file_label)

    def error(self, key: str, message: str, fix: str) -> None:
        self.problems.append(Problem(key, message, fix, self.origin(key)))

    def environment(self, key: str, message: str, fix: str) -> None:
        self.recipe.environment_problems.append(Problem(key, message, fix, self.origin(key), environment=True))

    def note(self, text: str) -> None:
        self.recipe.notes.append(text)

    def given(self, key: str) -> bool:
        return key in self.recipe.values

    def role(self, key: str, text: str, role: str, heads: tuple[str, ...] | str = CAUSAL_LM) -> bool:
        """The model ``text`` (the value of ``key``) has a head its role allows
        (gemma_hf.references.check_head); else the problem is reported. False when it was."""
        try:
            check_head(text, role, heads)
        except WrongHead as err:
            self.error(key, err.message, err.fix)
            return False
        return True

    def in_range(self, key: str, value: Any, ok: bool, expected: str) -> None:
        if not ok:
            self.error(key, f"{value!r} is out of range", f"set {key} to {expected}")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_recipe(recipe: Recipe, file_label: str, check_environment: bool = True) -> None:
    c = Checks(recipe, file_label)
    trains = get_method(recipe.method).trains
    if trains:
        _check_numbers(c)
    architecture = _check_model(c)
    recipe.architecture = architecture
    _check_family(c, architecture)
    _check_tokenizer(c, architecture)
    _check_precision_and_attention(c, architecture)
    _check_lengths(c, architecture)
    if trains:
        _check_peft(c)
        _check_top_layers(c, architecture)
        _check_eval(c)
    split_seed = recipe.data.split_seed
    c.in_range("split_seed", split_seed, split_seed is None or 0 <= split_seed < 2**32, "an integer in [0, 2**32)")
    _check_datasets(c)
    _check_streaming(c)
    _check_output_paths(c)
    if trains:
        _check_misc(c)
    get_method(recipe.method).check(c)
    if not check_environment:
        recipe.environment_problems.clear()
    if c.problems:
        raise RecipeError(file_label, c.problems)


# --------------------------------------------------------------------------------------------


def _check_numbers(c: Checks) -> None:
    """Ranges of the shared numeric keys, checked here rather than by TRL/torch mid-run."""
    t, m = c.recipe.training, c.recipe.model
    rules: list[tuple[str, Any, bool, str]] = [
        ("learning_rate", t.learning_rate, t.learning_rate > 0, "a positive learning rate, e.g. 2e-5"),
        ("per_device_train_batch_size", t.per_device_train_batch_size, t.per_device_train_batch_size >= 1, "1 or more"),
        ("per_device_eval_batch_size", t.per_device_eval_batch_size, t.per_device_eval_batch_size >= 1, "1 or more"),
        ("gradient_accumulation_steps", t.gradient_accumulation_steps, t.gradient_accumulation_steps >= 1, "1 or more"),
        ("max_steps", t.max_steps, t.max_steps == -1 or t.max_steps >= 1, "-1 (use num_train_epochs) or 1 or more"),
        ("num_train_epochs", t.num_train_epochs, t.max_steps >= 1 or t.num_train_epochs > 0, "a positive number"),
        ("logging_steps", t.logging_steps, t.logging_steps > 0, "a positive number"),
        ("save_steps", t.save_steps, t.save_steps > 0, "a positive number"),
        ("warmup_steps", t.warmup_steps, t.warmup_steps >= 0, "0 or more (below 1: a ratio of the total steps)"),
        ("weight_decay", t.weight_decay, t.weight_decay >= 0, "0 or more"),
        ("max_grad_norm", t.max_grad_norm, t.max_grad_norm is None or t.max_grad_norm >= 0, "0 (off) or more"),
        ("adam_beta1", t.adam_beta1, 0 <= t.adam_beta1 < 1, "a number in [0, 1)"),
        ("adam_beta2", t.adam_beta2, 0 <= t.adam_beta2 < 1, "a number in [0, 1)"),
        ("adam_epsilon", t.adam_epsilon, t.adam_epsilon > 0, "a small positive number, e.g. 1e-8"),
        ("seed", t.seed, 0 <= t.seed < 2**32, "an integer in [0, 2**32)"),
        ("data_seed", t.data_seed, t.data_seed is None or 0 <= t.data_seed < 2**32, "an integer in [0, 2**32)"),
        ("dataloader_num_workers", t.dataloader_num_workers, t.dataloader_num_workers >= 0, "0 or more"),
        ("save_total_limit", t.save_total_limit, t.save_total_limit is None or t.save_total_limit >= 1,
         "1 or more, or null (keep all)"),
        ("lora_r", m.lora_r, m.lora_r >= 1, "1 or more"),
        ("lora_alpha", m.lora_alpha, m.lora_alpha > 0, "a positive number"),
        ("lora_dropout", m.lora_dropout, 0 <= m.lora_dropout < 1, "a number in [0, 1)"),
    ]
    if getattr(t, "max_length", None) is not None:
        rules.append(("max_length", t.max_length, t.max_length >= 2, "2 or more, or null"))
    if t.eval_steps is not None:
        rules.append(("eval_steps", t.eval_steps, t.eval_steps > 0, "a positive number"))
    for key, value, ok, expected in rules:
        c.in_range(key, value, ok, expected)
    args = c.recipe.method_args
    if args is not None and hasattr(args, "sample_prompts"):
        c.in_range("sample_max_new_tokens", args.sample_max_new_tokens, args.sample_max_new_tokens >= 1, "1 or more")
        if args.sample_prompts is not None and not all(isinstance(p, str) and p.strip() for p in args.sample_prompts):
            c.error("sample_prompts", "every prompt must be a non-empty string", "remove the empty entries")


def _read_config(path: Path) -> dict:
    with (path / "config.json").open(encoding="utf-8") as handle:
        return json.load(handle)


def _architecture_from_dict(config: dict):
    from gemma_hf import GemmaHFConfig

    return GemmaHFConfig.from_dict(dict(config))


def _gemma_model_types() -> tuple[str, ...]:
    from gemma_hf.model.configuration import STOCK_MODEL_TYPES

    return ("gemma_hf", *STOCK_MODEL_TYPES)


def _check_model(c: Checks):
    from gemma_hf import PRESETS, preset_config

    recipe, g, m = c.recipe, c.recipe.gemma, c.recipe.model
    made = get_method(recipe.method).architecture(c)
    if made is not None or get_method(recipe.method).builds_model(recipe):
        return made  # the method builds the model itself (a student from its teacher, ...); None: not known yet
    preset_arch = checkpoint_arch = None
    if m.model_name_or_path is None and g.preset is None:
        c.error("model_name_or_path", "missing: the recipe names no model",
                "set model_name_or_path (a checkpoint or run directory, asset:gemma3-270m or a Hub id), or preset "
                "(random weights of a named architecture)")
        return None
    if g.preset_overrides and g.preset is None:
        c.error("preset_overrides", "given without a preset", "set preset, or remove preset_overrides")
    if g.preset is not None:
        if g.preset not in PRESETS:
            c.error("preset", f"unknown preset {g.preset!r}.{suggestion(g.preset, PRESETS)}",
                    f"use one of {', '.join(PRESETS)}")
        else:
            try:
                preset_arch = preset_config(g.preset, **(g.preset_overrides or {}))
            except (ValueError, TypeError) as err:
                key = "preset_overrides" if g.preset_overrides else "preset"
                c.error(key, f"the preset's config is invalid with these overrides: {err}",
                        "fix the overrides (e.g. layer_types must have num_hidden_layers entries)")
    text = m.model_name_or_path
    if text is not None:
        try:
            ref = resolve(text, "model directory")
        except BadReference as err:
            (c.environment if err.environment else c.error)("model_name_or_path", err.message, err.fix)
            return preset_arch
        recipe.model_path, recipe.model_kind = ref.location, ref.kind
        if ref.kind == "stage":  # a pipeline stage's output: what that stage will write
            from gemma_hf.references import PENDING_STAGES

            checkpoint_arch = PENDING_STAGES[text[len("stage:"):]].architecture
        elif ref.is_local:
            local = ref.path
            if not (local / "config.json").is_file():
                adapter = (local / "adapter_config.json").is_file()
                c.error("model_name_or_path", f"{local} has no config.json: "
                        + ("it holds a LoRA adapter only" if adapter else "not a model directory"),
                        "point it at a directory written by save_pretrained"
                        + (" (a run with merge_lora: true keeps the merged model at its root)" if adapter else ""))
                return preset_arch
            try:
                config = _read_config(local)
            except (OSError, ValueError) as err:
                c.error("model_name_or_path", f"cannot read {local}/config.json: {err}", "fix or re-save the checkpoint")
                return preset_arch
            model_type = config.get("model_type") if isinstance(config, dict) else None
            if model_type not in _gemma_model_types():
                c.error("model_name_or_path", f"{local} holds a {model_type!r} model, not a Gemma one",
                        f"use a checkpoint of model_type {', '.join(_gemma_model_types())}")
                return preset_arch
            try:
                checkpoint_arch = _architecture_from_dict(config)
            except (ValueError, TypeError) as err:
                c.error("model_name_or_path", f"{local}/config.json is not a valid Gemma config: {err}", "re-export it")
                return preset_arch
            _check_weights(c, local)
        else:  # a Hub id
            cached = _hub_cached_file(text, "config.json")
            if cached is not None:
                checkpoint_arch = _architecture_from_dict(json.loads(Path(cached).read_text()))
            elif hub_offline():
                c.environment("model_name_or_path", f"{text} is not a local directory, so it is read as a Hub model id, "
                              "which is not downloaded, and the Hub is offline here",
                              "download it and point model_name_or_path at the directory (a local run directory that "
                              "does not exist yet: write ./PATH, and run the recipe that makes it first)")
            else:
                c.note(f"model {text} will be downloaded from the Hub when the run starts"
                       + ("" if preset_arch else "; set `preset` so its architecture is checked now"))
        method = get_method(recipe.method)
        c.role("model_name_or_path", text, method.model_role, method.model_heads)
    if preset_arch is not None and checkpoint_arch is not None:
        for name in ("family", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads"):
            if getattr(preset_arch, name) != getattr(checkpoint_arch, name):
                c.error("preset", f"the checkpoint's {name} is {getattr(checkpoint_arch, name)!r} but preset "
                        f"{g.preset!r} has {getattr(preset_arch, name)!r}", "remove preset, or use the matching one")
                break
    return checkpoint_arch or preset_arch


def _check_weights(c: Checks, local: Path) -> None:
    """The checkpoint's safetensors files are whole (their headers say how long they are)."""
    try:
        files = [f for f in weight_files(local) if f.endswith(".safetensors")]
    except RunDirError as err:
        c.error("model_name_or_path", str(err), "re-save the checkpoint")
        return
    if not files:
        pickles = sorted(p.name for p in local.glob("*.bin"))
        c.error("model_name_or_path", f"{local} has no safetensors weights" + (
            f" (only pickle files {pickles}, which gemma_hf does not load: unpickling can run code)" if pickles else ""),
            "convert the checkpoint to safetensors (save_pretrained writes them)")
        return
    broken = [f for f in files if not (local / f).is_file() or not safetensors_complete(local / f)]
    if broken:
        c.error("model_name_or_path", f"{local}: {', '.join(broken)} {'is' if len(broken) == 1 else 'are'} missing, "
                "truncated or corrupt (not a whole safetensors file)", "re-save or re-download the checkpoint")


def _hub_cached_file(repo_id: str, filename: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # malformed ids and the like: treat as not cached
        return None
    return found if isinstance(found, str) else None


def _check_family(c: Checks, architecture) -> None:
    recipe, g = c.recipe, c.recipe.gemma
    if g.chat_family == "auto":
        if architecture is None:
            if not c.problems:
                c.error("chat_family", "auto, but the model's family is unknown before it is downloaded",
                        "set chat_family (gemma, gemma2 or gemma3) or preset")
            return
        recipe.family = architecture.family
    else:
        recipe.family = g.chat_family
        if architecture is not None and architecture.family != g.chat_family:
            c.note(f"chat_family {g.chat_family} differs from the model's family {architecture.family}: the model is "
                   f"trained on the {g.chat_family} chat format")


def _check_tokenizer(c: Checks, architecture) -> None:
    recipe = c.recipe
    key, text = get_method(recipe.method).tokenizer_reference(recipe)
    if text is None and get_method(recipe.method).builds_model(recipe) and c.problems:
        return  # the method makes the model (and its tokenizer) from a source already reported unusable
    if text is None:
        c.error("tokenizer_name_or_path", "missing: training from a preset needs a tokenizer",
                "set tokenizer_name_or_path (e.g. asset:gemma-tokenizer for Gemma 1/2, asset:gemma3-tokenizer)")
        return
    if key != "tokenizer_name_or_path" and recipe.model_path is None:
        return  # the model problem is reported already
    try:
        ref = resolve(text, "tokenizer directory")
    except BadReference as err:
        (c.environment if err.environment else c.error)(key, err.message, err.fix)
        return
    recipe.tokenizer_path = ref.location
    if ref.kind == "stage":  # the tokenizer the stage's run directory will hold
        from gemma_hf.references import PENDING_STAGES

        pending = PENDING_STAGES[text[len("stage:"):]].tokenizer_path
        if pending is None:
            return
        ref = resolve(pending, "tokenizer directory")
    if not ref.is_local:
        if _hub_cached_file(text, "tokenizer_config.json") is None and hub_offline():
            c.environment(key, f"the tokenizer of {text} is not downloaded, and the Hub is offline here",
                          "download it and point tokenizer_name_or_path at the directory")
        return
    local = ref.path
    if not any((local / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        c.error(key, f"{local} holds no tokenizer (tokenizer.json / tokenizer.model)",
                "set tokenizer_name_or_path to a tokenizer directory")
        return
    try:
        tokenizer = cached_tokenizer(str(local))
    except Exception as err:  # noqa: BLE001 - any load failure is a recipe problem here
        c.error(key, f"cannot load the tokenizer in {local}: {err}", "point it at a working tokenizer directory")
        return
    c.tokenizer = tokenizer
    vocab = tokenizer.get_vocab()
    missing = [t for t in (BOS, EOS, START_OF_TURN, END_OF_TURN) if t not in vocab]
    if missing:
        c.error(key, f"the tokenizer in {local} lacks the Gemma control tokens {missing}",
                "use a Gemma tokenizer (asset:gemma-tokenizer, asset:gemma3-tokenizer)")
    if tokenizer.pad_token is None:
        c.error(key, f"the tokenizer in {local} has no pad token", "use a Gemma tokenizer (its pad token is <pad>)")
    for token in c.recipe.gemma.lora_trainable_tokens or []:
        if token not in vocab:
            c.error("lora_trainable_tokens", f"{token!r} is not a single token of the tokenizer in {local}",
                    "list tokens exactly as the vocabulary spells them, e.g. <end_of_turn>")
    if architecture is not None and len(tokenizer) > architecture.vocab_size:
        c.error(key, f"the tokenizer has {len(tokenizer)} tokens but the model only {architecture.vocab_size} "
                "embedding rows", "use the model's own tokenizer (or a preset_overrides vocab_size that fits)")


@functools.lru_cache(maxsize=8)
def cached_tokenizer(path: str):
    """The tokenizer at ``path``, loaded once per process (validation reads it several times)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _check_precision_and_attention(c: Checks, architecture) -> None:
    recipe, m, t = c.recipe, c.recipe.model, c.recipe.training
    family = architecture.family if architecture is not None else recipe.family
    if family in ("gemma2", "gemma3"):
        if getattr(t, "fp16", False):
            c.error("fp16", f"fp16 overflows in {family} models (activations exceed the float16 range)",
                    "use bf16: true on a GPU that has bf16, else full precision (fp16: false, bf16: false)")
        if m.dtype == "float16":
            c.error("dtype", f"float16 weights overflow in {family} models", "use dtype: bfloat16 or float32")
    elif getattr(t, "fp16", False) or m.dtype == "float16":
        c.note("Gemma 1 in float16 can overflow; bfloat16 is the safe half precision")
    if getattr(t, "bf16", False) and not cuda_available():
        c.note("bf16 mixed precision on a CPU runs through autocast, slower than float32 here; set bf16: false "
               "for CPU runs")
    attn = m.attn_implementation
    if attn is not None:
        if attn not in ATTN_IMPLEMENTATIONS and not attn.startswith("kernels-community/"):
            c.error("attn_implementation", f"unknown attention implementation {attn!r}."
                    f"{suggestion(attn, ATTN_IMPLEMENTATIONS)}", f"use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        cap = getattr(architecture, "attn_logit_softcapping", None) if architecture is not None else None
        if attn == "sdpa" and cap is not None:
            c.error("attn_implementation", f"sdpa cannot apply this model's attention logit soft-cap "
                    f"(attn_logit_softcapping={cap}); it would silently train a different model",
                    "use eager (exact, any device), or flex_attention / flash_attention_2 on a GPU")
        if attn in GPU_ONLY_ATTENTION:
            if not cuda_available():
                c.environment("attn_implementation", f"{attn} needs a CUDA GPU; this machine has none",
                              "run on a GPU machine, or use eager here")
            elif importlib.util.find_spec("flash_attn") is None:
                c.environment("attn_implementation", f"{attn} needs the flash-attn package", "pip install flash-attn")


def _check_lengths(c: Checks, architecture) -> None:
    t, args = c.recipe.training, c.recipe.method_args
    max_length = getattr(t, "max_length", None)
    if getattr(args, "long_examples", None) == "drop" and max_length is None:
        c.error("long_examples", "drop needs max_length (what counts as long)", "set max_length, or long_examples: truncate")
    if architecture is not None and max_length is not None and max_length > architecture.max_position_embeddings:
        c.error("max_length", f"{max_length} is longer than the model's max_position_embeddings "
                f"({architecture.max_position_embeddings})", f"set max_length to at most {architecture.max_position_embeddings}")
    if architecture is None:
        return
    # Lengths that size generation and its caches: none may exceed what the model can attend to (a billion
    # new tokens passed validation and then ran until the position limit, or allocated for it).
    limit = architecture.max_position_embeddings
    for key in GENERATION_LENGTH_KEYS:
        value = getattr(args, key, None) if hasattr(args, key) else getattr(t, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            c.error(key, f"{value} is longer than the model's max_position_embeddings ({limit})",
                    f"set {key} to at most {limit}")
    prompt, completion = getattr(args, "max_prompt_length", None), getattr(t, "max_completion_length", None)
    if isinstance(prompt, int) and isinstance(completion, int) and prompt <= limit and completion <= limit \
            and prompt + completion > limit:
        c.error("max_completion_length", f"max_prompt_length + max_completion_length = {prompt + completion} is "
                f"longer than the model's max_position_embeddings ({limit})", "lower one of them")
    top_k = getattr(args, "cache_top_k", None)
    if isinstance(top_k, int) and top_k > architecture.vocab_size:
        c.error("cache_top_k", f"{top_k} targets per position, but the vocabulary has {architecture.vocab_size} "
                "entries", f"set cache_top_k to at most {architecture.vocab_size} (e.g. 64)")


# Keys (of any method) bounding how many tokens a generation or a prompt may take.
GENERATION_LENGTH_KEYS = ("sample_max_new_tokens", "max_new_tokens", "eval_max_new_tokens", "max_prompt_length",
                          "max_completion_length")


def _check_top_layers(c: Checks, architecture) -> None:
    top = c.recipe.gemma.train_top_layers
    if top is None:
        return
    layers = getattr(architecture, "num_hidden_layers", None)
    if layers is None:
        c.in_range("train_top_layers", top, top >= 1, "a number of layers of 1 or more (null: every layer)")
    else:
        c.in_range("train_top_layers", top, 1 <= top <= layers,
                   f"a number of layers from 1 to the model's {layers} (null: every layer)")
    if c.recipe.model.use_peft and c.given("lora_target_parameters"):
        c.error("train_top_layers", "cannot be combined with lora_target_parameters", "remove one of them")


def _check_peft(c: Checks) -> None:
    m, method = c.recipe.model, get_method(c.recipe.method)
    quantized = m.load_in_4bit or m.load_in_8bit
    if quantized and not m.use_peft:
        key = "load_in_4bit" if m.load_in_4bit else "load_in_8bit"
        c.error(key, "a quantized base model cannot be fine-tuned without LoRA (QLoRA trains LoRA adapters on top)",
                "set use_peft: true")
    if not m.use_peft:
        for key in (*LORA_KEYS, "lora_trainable_tokens"):
            if c.given(key):
                c.error(key, "has no effect: use_peft is false, so this would be a full fine-tune",
                        "set use_peft: true for LoRA, or remove the LoRA keys")
                break
    else:
        targets = m.lora_target_modules
        target_list = [targets] if isinstance(targets, str) else list(targets or [])
        if "lm_head" in target_list:
            c.error("lora_target_modules", "a LoRA adapter on lm_head is never trained (TRL computes log-probs from "
                    "lm_head.weight directly)", "remove lm_head (its weight is tied to the embeddings anyway)")
        if m.lora_task_type != method.lora_task_type:
            c.error("lora_task_type", f"{m.lora_task_type!r} is not the task of a {method.name} recipe "
                    f"({method.head} head)", f"use {method.lora_task_type} (or remove the key)")
    if quantized:
        if not cuda_available():
            c.environment("load_in_4bit" if m.load_in_4bit else "load_in_8bit",
                          "QLoRA (bitsandbytes quantization) needs a CUDA GPU; this machine has none",
                          "run this recipe on a GPU machine (the YAML is kept as it is)")
        elif importlib.util.find_spec("bitsandbytes") is None:
            c.environment("load_in_4bit" if m.load_in_4bit else "load_in_8bit",
                          "QLoRA needs the bitsandbytes package", "pip install bitsandbytes")


def _check_eval(c: Checks) -> None:
    t, d = c.recipe.training, c.recipe.data
    strategy = getattr(t.eval_strategy, "value", t.eval_strategy)
    if d.test_split_size is not None:
        size = d.test_split_size
        if isinstance(size, float) and not 0 < size < 1:
            c.error("test_split_size", f"{size} is not a fraction in (0, 1)", "use e.g. 0.05, or a record count such as 50")
        if isinstance(size, int) and size < 1:
            c.error("test_split_size", f"{size} records is not a held-out split", "use a count of 1 or more, or a fraction")
    elif strategy != "no":
        c.error("eval_strategy", f"{strategy!r}, but there is no held-out split to evaluate on",
                "set test_split_size (e.g. 0.05), or eval_strategy: 'no'")


def _check_datasets(c: Checks) -> None:
    """Every record of every local dataset, in the method's data format (see data.py)."""
    recipe = c.recipe
    method = get_method(recipe.method)
    family = recipe.family if recipe.family in FAMILIES else "gemma2"
    if not recipe.data.datasets:
        if method.needs_data:
            c.error("datasets", "missing: the recipe has no data", "add `datasets:\\n  - path: data.jsonl`")
        return
    forbidden = tuple(dict.fromkeys((*CONTROL_TOKENS, *getattr(c.tokenizer, "all_special_tokens", ()))))
    parts = {}
    for index, spec in enumerate(recipe.data.datasets):
        key = f"datasets[{index}]"
        if not 0 < spec.fraction <= 1:
            c.error(f"{key}.fraction", f"{spec.fraction} is not in (0, 1]", "use a share such as 0.5 (1 = all records)")
        if recipe.data.streaming and "%" in spec.split:
            continue  # refused (_check_streaming) unread: the slice would hold the whole split in memory
        if spec.path.startswith(STAGE_SCHEME) and spec.path[len(STAGE_SCHEME):] in PENDING_STAGES:
            _check_pending_dataset(c, key, spec.path[len(STAGE_SCHEME):])
            continue
        if not (spec.path.startswith("asset:") or Path(spec.path).expanduser().exists()) and _is_hub_dataset(spec.path):
            if hub_offline():
                c.environment(f"{key}.path", f"{spec.path!r} is neither a local file nor available: it would be a "
                              "Hub dataset, and the Hub is offline here", "download it and point path at the files")
                continue
            c.note(f"{key}: Hub dataset {spec.path} is read (and each record checked) when the run starts")
            continue
        # A streamed mixture is checked the same way, record by record, but only counted (data.py).
        part = read_dataset(spec, index, method.data_format_for(recipe), family, forbidden,
                            keep_records=not recipe.data.streaming)
        for problem in part.problems:
            (c.environment if problem.environment else c.error)(problem.key, problem.message, problem.fix)
        parts[index] = part
    recipe.data_parts = parts
    if len(parts) == len(recipe.data.datasets):
        _check_split_sizes(c, list(parts.values()))


def _check_pending_dataset(c: Checks, key: str, name: str) -> None:
    """A dataset read from a pipeline stage that has not run yet (`{from: NAME}`): accepted, unread, when the
    stage publishes data (a generate stage); its records are read and checked when the stage has run."""
    publishes = PENDING_STAGES[name].publishes
    if publishes == "data":
        c.note(f"{key}: {{from: {name}}} is read when the stage has run (its records are checked then)")
        return
    what = {"model": "a model", "results": "evaluation results", "runs": "a sweep's runs"}.get(publishes, publishes)
    fitting = [n for n, pending in PENDING_STAGES.items() if pending.publishes == "data"]
    c.error(f"{key}.path", f"{{from: {name}}}: stage {name!r} publishes {what}, not a dataset",
            f"read data from a stage that generates it ({', '.join(fitting) or 'none comes before this one'}: "
            "method generate), or give a data file")


def _is_hub_dataset(path: str) -> bool:
    return is_hub_id(path)


def _check_split_sizes(c: Checks, parts) -> None:
    """The held-out split and the training split both hold records (datasets' train_test_split would
    fail mid-run otherwise)."""
    if any(p.problems for p in parts) or not parts:
        return
    total = sum(max(1, round(p.spec.fraction * p.num_examples)) if p.spec.fraction < 1 else p.num_examples
                for p in parts)
    size = c.recipe.data.test_split_size
    held_out = held_out_count(size, total)
    if size is None:
        _check_accumulation(c, total)
        return
    if held_out >= total:
        c.error("test_split_size", f"holds out {held_out} of the mixture's {total} records, leaving none to train on",
                "hold out fewer records")
    elif held_out < 1:
        c.error("test_split_size", f"{size} of {total} records is an empty held-out split", "hold out more records")
    _check_accumulation(c, total - held_out)


def _check_accumulation(c: Checks, train_records: int) -> None:
    """gradient_accumulation_steps beyond an epoch's batches does not accumulate more: the Trainer ends
    each optimizer step at the epoch's end, so the key would silently mean 'one step per epoch'."""
    t = c.recipe.training
    if train_records < 1 or not get_method(c.recipe.method).batches_records(c.recipe):
        return
    if c.recipe.data.streaming:
        # A stream has no epoch length the Trainer knows (nor do we: long_examples drops are found while
        # training), and an optimizer step of a stream may span an epoch's end: no bound to check.
        if t.gradient_accumulation_steps > 1:
            c.note("streaming: gradient_accumulation_steps is not checked against an epoch's batches (a stream's "
                   "epoch length is unknown ahead)")
        return
    processes = int(os.environ.get("WORLD_SIZE", "1") or 1)
    batches = math.ceil(train_records / max(1, t.per_device_train_batch_size * processes))
    if t.gradient_accumulation_steps > batches:
        c.error("gradient_accumulation_steps", f"{t.gradient_accumulation_steps} exceeds the {batches} batches of "
                f"an epoch ({train_records} training records, {t.per_device_train_batch_size} per batch): an "
                "optimizer step never spans more than one epoch, so it would silently mean one step per epoch",
                f"set it to at most {batches} (or raise per_device_train_batch_size)")


def _check_streaming(c: Checks) -> None:
    """``streaming: true`` (gemma_hf.recipes.streaming): a method that streams, and no option that needs
    the whole mixture in memory or its length."""
    recipe, data, t = c.recipe, c.recipe.data, c.recipe.training
    method = get_method(recipe.method)
    if not data.streaming:
        if c.given("shuffle_buffer_size"):
            c.error("shuffle_buffer_size", "has no effect: streaming is false (the mixture is in memory and the "
                    "Trainer shuffles all of it)", "set streaming: true, or remove shuffle_buffer_size")
        return
    if not method.streams:
        streaming = [name for name in method_names() if get_method(name).streams]
        c.error("streaming", f"the {method.name} method reads its whole mixture into memory; streaming works with "
                f"{', '.join(streaming)} only", f"remove streaming from this {method.name} recipe")
        return
    if data.shuffle_buffer_size < 1:
        c.error("shuffle_buffer_size", f"{data.shuffle_buffer_size}: a shuffle buffer needs room for at least one "
                "example (shuffling a stream fully would need all of it in memory)",
                "set it to 1 (the datasets' interleaved order) or more, e.g. 1000")
    for index, spec in enumerate(data.datasets):
        key = f"datasets[{index}]"
        if spec.fraction < 1:
            c.error(f"{key}.fraction", f"{spec.fraction}: with streaming, a fraction (a seeded random subset, drawn "
                    "from all the records in memory) is not available",
                    "stream a slice instead (fraction: 1 and split: train[:N]), or set streaming: false")
        if "%" in spec.split:
            c.error(f"{key}.split", f"{spec.split!r}: a percentage slice needs the split's length, so it reads the "
                    "whole split into memory first",
                    "slice by record counts (e.g. train[:1000]), or set streaming: false")
        part = recipe.data_parts.get(index)
        if part is not None and not part.problems and parses_whole(part.source):
            c.note(f"streaming: {key} ({spec.path}) is a {Path(part.source.location).suffix} file, parsed whole on "
                   "each pass: convert it to JSON Lines (or Parquet) to bound memory")
    strategy = getattr(t, "train_sampling_strategy", "random")
    if strategy != "random":
        # The Trainer builds no sampler for an IterableDataset: any other strategy would be ignored in silence.
        c.error("train_sampling_strategy", f"{strategy!r}: a stream has no sampler (its order is the datasets' "
                "seeded interleaving through the shuffle buffer)",
                "remove train_sampling_strategy (shuffle_buffer_size: 1 keeps the interleaved order), or set "
                "streaming: false")
    counted = sum(p.num_examples for p in recipe.data_parts.values())
    records = counted - held_out_count(data.test_split_size, counted)
    complete = counted and len(recipe.data_parts) == len(data.datasets)
    if complete and records > 0 and data.shuffle_buffer_size >= records:
        c.note(f"streaming: shuffle_buffer_size {data.shuffle_buffer_size} holds all {records} training records: "
               "the whole training split will be in memory (as without streaming)")
    if t.max_steps < 1:
        hint = ""
        if complete and records > 0:
            processes = int(os.environ.get("WORLD_SIZE", "1") or 1)
            per_step = max(1, t.per_device_train_batch_size * t.gradient_accumulation_steps * processes)
            hint = (f" (one epoch of the {records} training records is about {math.ceil(records / per_step)} steps of "
                    f"{per_step} examples)")
        c.error("max_steps", "streaming: a stream has no length, so the Trainer cannot turn num_train_epochs into "
                "steps (it refuses an IterableDataset without max_steps)", f"set max_steps{hint}")


# A file name may have 255 bytes (NAME_MAX on Linux, macOS and Windows filesystems); the run directory's
# siblings add ".{name}.publish" (the longest: 9 bytes more).
NAME_MAX = 255
SIBLING_OVERHEAD = len("..publish")


def _check_output_paths(c: Checks) -> None:
    """Directories this run will create fit the filesystem's limits (a 300-character name passed
    validation, then failed mid-run with "File name too long")."""
    for key in ("output_dir", "cache_dir"):
        value = c.recipe.output_dir if key == "output_dir" else getattr(c.recipe.method_args, key, None)
        if not value:
            continue
        path = Path(value).expanduser()
        parts = [p for p in path.parts if p not in ("/", "")]
        limit = NAME_MAX - SIBLING_OVERHEAD if key == "output_dir" else NAME_MAX
        for index, part in enumerate(parts):
            size = len(part.encode("utf-8", "surrogateescape"))
            allowed = limit if index == len(parts) - 1 else NAME_MAX
            if size > allowed:
                c.error(key, f"the path component {part[:40]!r}... is {size} bytes long; a file name may have at most "
                        f"{allowed} here", "choose a shorter name")
                break
        if len(str(path.resolve()).encode("utf-8", "surrogateescape")) > 3800:
            c.error(key, f"the path is {len(str(path.resolve()))} characters long: the checkpoints inside it would "
                    "exceed the system's path limit (4096)", "choose a shorter path")


def _check_misc(c: Checks) -> None:
    t = c.recipe.training
    if isinstance(t.deepspeed, str) and not t.deepspeed.lstrip().startswith("{") and not Path(t.deepspeed).exists():
        c.error("deepspeed", f"DeepSpeed config file {t.deepspeed!r} does not exist",
                "fix the path (or use an accelerate config: recipes/accelerate/zero3.yaml)")
    if t.deepspeed and importlib.util.find_spec("deepspeed") is None:
        c.environment("deepspeed", "DeepSpeed is not installed", "pip install deepspeed (needs a CUDA toolchain)")
    for integration in t.report_to or []:
        package = REPORTING_PACKAGES.get(integration)
        # transformers' TensorBoardCallback writes with torch.utils.tensorboard (needs tensorboard) or tensorboardX.
        alternatives = [package, "tensorboardX"] if integration == "tensorboard" else [package]
        if package and all(importlib.util.find_spec(name) is None for name in alternatives):
            extra = " (or pip install 'gemma_hf[track]')" if integration == "tensorboard" else ""
            c.environment("report_to", f"{integration} is not installed",
                          f"pip install {package}{extra}, or report_to: none")


__all__ = ["cached_tokenizer", "Checks", "check_recipe", "ATTN_IMPLEMENTATIONS", "cuda_available"]
