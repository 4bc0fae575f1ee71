"""Weight averaging as a method (``gemma-hf merge --config R.yaml``, a pipeline stage ``method: merge``):
the Gemma 2 report's "we average the models obtained after each phase" and "we average models from
experiments run with different hyperparameters" (Ramé et al. 2024), and WARM (several reward models
averaged in weight space).

A merge recipe::

    merge_method: linear            # linear | slerp | liti
    models:                         # references: run directories, model directories, asset:..., Hub ids,
      - {from: sft}                 #   {from: STAGE} in a pipeline, each optionally {model: REF, weight: w}
      - {model: {from: warp}, weight: 0.5}
    base: null                      # slerp, liti: the initialisation the task vectors start from
    eta: null                       # liti: (1 - eta) theta_base + eta theta_model
    datasets: [...]                 # optional: held-out evaluation of the merge and of each input
    output_dir: runs/average

A sweep's directory (a pipeline stage with ``sweep:``, or its ``{from: NAME}``) stands for all of its
runs, in its order. The arithmetic is gemma_hf.merging's streaming merge, the same call as the
``gemma-hf merge --method ...`` command with the same inputs (so the weights are the same bytes);
its working memory is ``buffer_size`` whatever the model size and count.

With datasets, the merged model and every input are evaluated on the same held-out records: causal
LMs by held-out loss on the reference answers and chat-format health of greedy answers (gemma_hf.
evaluation), reward models (a WARM merge) by pairwise accuracy on preference pairs, each with a 95%
bootstrap interval. eval.json holds the merged model's numbers (``merged_*``) and a table of every
model (``models``).

The run is opened and published like every run (engine.open_run, publish.py): the merge is written to
a working directory inside output_dir (kept by a resumed run: a merge a kill cut short is redone,
a finished one is not), then published atomically with run.json, merge.json, eval.json and a card.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma_hf.errors import InputError
from gemma_hf.faults import fault_point
from gemma_hf.references import (
    CAUSAL_LM,
    PENDING_STAGES,
    SEQUENCE_CLASSIFICATION,
    STAGE_SCHEME,
    BadReference,
    head_of,
    identity,
    resolve,
)
from gemma_hf.rundir import RUN_JSON, RunDir, write_json, write_text

from .distributed import on_main_process
from .engine import write_marker
from .methods import Method
from .publish import finish, link_model, open_staging, record
from .runtime import Run, RunResult, prepare_splits, read_mixture

MERGE_METHODS = ("linear", "slerp", "liti")
WORKING = ".merged"  # the merge, written inside the open run directory (a working file: not published twice)
SWEEP_METHOD = "sweep"  # run.json method of a sweep's directory (gemma_hf.recipes.pipeline)
# Fields of two architectures that must agree for their weights to average (names, shapes, vocabulary).
ARCHITECTURE_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim")


@dataclass
class MergeRunArguments:
    """What a merge needs of a "training" group: where, which seed (the bootstrap's), how many at once."""

    output_dir: str = field(default="", metadata={"help": "Where the merged model's run directory goes."})
    seed: int = field(default=0, metadata={"help": "Seed of the held-out split and of the bootstrap intervals."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Held-out records answered or scored at "
                                                                         "once."})


@dataclass
class MergeArguments:
    merge_method: str = field(
        default="linear",
        metadata={"help": "linear: sum_i w_i theta_i (uniform by default). slerp: WARP's SLERP of the task vectors "
                          "theta_m - theta_base. liti: (1 - eta) theta_base + eta theta_model.",
                  "choices": list(MERGE_METHODS)})
    models: Any = field(
        default=None,
        metadata={"help": "The models to average: a list of references (run or model directories, asset:NAME, Hub ids, "
                          "{from: STAGE} in a pipeline), each optionally {model: REF, weight: w} (linear; all or none "
                          "weighted, summing to 1 unless normalize). A sweep's directory stands for all its runs."})
    base: str | None = field(
        default=None, metadata={"help": "slerp, liti: the initialisation the models were fine-tuned from."})
    eta: float | None = field(default=None, metadata={"help": "liti: the interpolation coefficient, in [0, 1]."})
    normalize: bool = field(default=False, metadata={"help": "linear: divide the weights by their sum."})
    allow_extrapolation: bool = field(
        default=False, metadata={"help": "Allow negative linear weights and liti eta > 1."})
    merge_dtype: str = field(
        default="auto", metadata={"help": "Dtype of the merged weights (auto: as stored in the inputs, which must "
                                          "then agree).", "choices": ["auto", "float32", "bfloat16", "float16"]})
    buffer_size: str = field(default="64MiB", metadata={"help": "Working memory of the streaming merge."})
    max_shard_size: str = field(default="50GB", metadata={"help": "Largest weight file of the merged model."})
    merge_threads: int = field(default=1, metadata={"help": "Torch threads for the merge's arithmetic."})
    max_new_tokens: int = field(default=96, metadata={"help": "Causal LMs: most new tokens per greedy held-out "
                                                              "answer (chat health)."})
    heldout_loss: bool = field(default=True, metadata={"help": "Causal LMs: held-out loss on reference answers."})
    bootstrap_resamples: int = field(default=1000, metadata={"help": "Resamples of the 95% bootstrap intervals."})
    max_length: int | None = field(
        default=None, metadata={"help": "Reward models: the most tokens of a held-out conversation scored (longer "
                                        "ones keep their first token and their end); default: the model's context."})


@dataclass
class Entry:
    """One model of the merge as the recipe lists it."""

    reference: str
    weight: float | None
    key: str  # where it is written (models[1].model)


def parse_models(value) -> tuple[list[Entry], list[tuple[str, str, str]]]:
    """(entries, problems as (key, message, fix)) of a recipe's ``models``."""
    problems: list[tuple[str, str, str]] = []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        problems.append(("models", "missing or empty: a merge needs the models to average",
                         "write models: [RUN_A, RUN_B] (or {from: STAGE} entries in a pipeline)"))
        return [], problems
    entries = []
    for index, item in enumerate(value):
        key = f"models[{index}]"
        if isinstance(item, str) and item:
            entries.append(Entry(item, None, key))
            continue
        if isinstance(item, dict) and isinstance(item.get("model"), str) and set(item) <= {"model", "weight"}:
            weight = item.get("weight")
            if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
                problems.append((f"{key}.weight", f"{weight!r} is not a number", "write a weight such as 0.5"))
                continue
            entries.append(Entry(item["model"], None if weight is None else float(weight), f"{key}.model"))
            continue
        problems.append((key, f"{item!r} is not a model reference",
                         "write a reference (a directory, asset:NAME, {from: STAGE}) or {model: REF, weight: w}"))
    return entries, problems


def sweep_points(path: str | os.PathLike) -> list[Path] | None:
    """The run directories of a finished sweep directory, in the sweep's order; None when ``path`` is not one."""
    rundir = RunDir(Path(path))
    try:
        info = json.loads((rundir.path / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("method") != SWEEP_METHOD:
        return None
    return [rundir.path / point["output"] for point in info.get("points", [])]


def expand(entry: Entry) -> list[tuple[str, str]]:
    """(reference, key) of each model ``entry`` stands for: a sweep (finished, or a pipeline stage still to
    run) stands for each of its runs."""
    text = entry.reference
    if text.startswith(STAGE_SCHEME):
        pending = PENDING_STAGES.get(text[len(STAGE_SCHEME):])
        if pending is not None and getattr(pending, "points", None):
            return [(text, f"{entry.key} (run {i} of the sweep)") for i in range(pending.points)]
        return [(text, entry.key)]
    try:
        ref = resolve(text, "model")
    except BadReference:
        return [(text, entry.key)]
    points = sweep_points(ref.path) if ref.is_local else None
    if points is None:
        return [(text, entry.key)]
    return [(str(point), f"{entry.key} (run {point.name} of the sweep)") for point in points]


def _architecture_of(text: str) -> tuple[dict | None, Any]:
    """(config dict, GemmaHFConfig) of a model reference, as far as it can be known before the run."""
    from gemma_hf import GemmaHFConfig

    if text.startswith(STAGE_SCHEME):
        pending = PENDING_STAGES.get(text[len(STAGE_SCHEME):])
        arch = getattr(pending, "architecture", None)
        return (arch.to_dict() if arch is not None else None), arch
    try:
        ref = resolve(text, "model")
    except BadReference:
        return None, None
    if not ref.is_local or not (ref.path / "config.json").is_file():
        return None, None
    try:
        config = json.loads((ref.path / "config.json").read_text(encoding="utf-8"))
        return config, GemmaHFConfig.from_dict(dict(config))
    except (OSError, ValueError, TypeError):
        return config if isinstance(config, dict) else None, None


def _recipe_wording(message: str) -> str:
    """The merge library's messages name the command line's options; a recipe's keys are named here."""
    for option, key in (("--weights", "the models' weights"), ("--normalize / normalize=True", "normalize: true"),
                        ("--allow-extrapolation / allow_extrapolation=True", "allow_extrapolation: true"),
                        ("--normalize", "normalize"), ("--eta", "eta"), ("--allow-extrapolation", "allow_extrapolation")):
        message = message.replace(option, key)
    return message


class Merge(Method):
    name = "merge"
    title = "weight averaging (merge)"
    help = "average models in weight space: linear, SLERP of task vectors, LITI (phase averaging, sweeps, WARM)"
    about = ("Weight averaging of models as a run: linear (phase averaging, averaging a hyper-parameter sweep, WARM "
             "for reward models), SLERP of task vectors or LITI from a base, streamed with bounded memory, with an "
             "optional held-out evaluation of the merge and of each input on the same records. The flag form "
             "(gemma-hf merge --method ... --models ... --output ...) writes a bare model directory instead.")
    data_format = "prompt"
    head = CAUSAL_LM  # a merge of reward models keeps their head (head_of_inputs)
    model_role = "model to merge"
    model_heads = (CAUSAL_LM, SEQUENCE_CLASSIFICATION)
    trainer_config = "gemma_hf.recipes.merge:MergeRunArguments"
    arguments = MergeArguments
    trains = False
    needs_data = False
    shares_command = True

    # -- what the recipe names -------------------------------------------------------------------
    def inputs(self, recipe) -> list[tuple[str, str, float | None]]:
        """(reference, key, weight) of every model to average, sweeps expanded, the base excluded."""
        entries, _ = parse_models(recipe.method_args.models)
        out = []
        for entry in entries:
            out += [(text, key, entry.weight) for text, key in expand(entry)]
        return out

    def head_of_inputs(self, recipe) -> str:
        args = recipe.method_args
        for text in [args.base, *(text for text, _, _ in self.inputs(recipe))]:
            found = head_of(text) if text else None
            if found is not None:
                return found[0]
        return CAUSAL_LM

    def published_head(self, recipe) -> str:
        return self.head_of_inputs(recipe)

    def data_format_for(self, recipe) -> str:
        return "preference" if self.head_of_inputs(recipe) == SEQUENCE_CLASSIFICATION else "prompt"

    def primary(self, recipe) -> str | None:
        """The input whose config the merged model takes: the base (slerp, liti), else the first model."""
        args = recipe.method_args
        if args.merge_method != "linear" and isinstance(args.base, str):
            return args.base
        models = self.inputs(recipe)  # a sweep: its first run
        return models[0][0] if models else None

    def tokenizer_reference(self, recipe):
        if recipe.gemma.tokenizer_name_or_path:
            return "tokenizer_name_or_path", recipe.gemma.tokenizer_name_or_path
        return ("base" if recipe.method_args.merge_method != "linear" and recipe.method_args.base
                else "models[0]"), self.primary(recipe)

    def describe_model(self, recipe) -> str | None:
        args = recipe.method_args
        base = f" from {args.base}" if args.merge_method != "linear" and args.base else ""
        return f"the {args.merge_method} merge of {len(self.inputs(recipe))} models{base}"

    def builds_model(self, recipe) -> bool:
        return True

    def architecture(self, c):
        recipe = c.recipe
        text = self.primary(recipe)
        if not text:
            return None
        try:
            ref = resolve(text, "model")
        except BadReference:
            return None  # reported by check()
        recipe.model_path, recipe.model_kind = ref.location, ref.kind
        return _architecture_of(text)[1]

    # -- validation --------------------------------------------------------------------------------
    def check(self, c) -> None:
        from gemma_hf.merging.interpolation import check_eta, check_weights
        from gemma_hf.merging.safetensors_stream import parse_size

        recipe = c.recipe
        args, t = recipe.method_args, recipe.training
        if recipe.model.model_name_or_path:
            c.error("model_name_or_path", "a merge reads its models from `models` (and `base`)",
                    "move it into models: [...]")
        if recipe.model.use_peft:
            c.error("use_peft", "a merge trains nothing: LoRA has no effect", "remove use_peft")
        entries, problems = parse_models(args.models)
        for key, message, fix in problems:
            c.error(key, message, fix)
        method = args.merge_method
        if method == "linear":
            if args.base is not None:
                c.error("base", "a linear merge averages `models` only", "remove base (or use merge_method: slerp/liti)")
        elif not args.base:
            c.error("base", f"merge_method {method} needs the initialisation the models were fine-tuned from",
                    "set base: INIT (a run or model directory, {from: STAGE})")
        if args.eta is not None and method != "liti":
            c.error("eta", f"eta applies to merge_method liti, not {method}", "remove eta")
        if method == "liti" and args.eta is None:
            c.error("eta", "merge_method liti needs eta", "set eta, e.g. 0.3")
        if args.allow_extrapolation and method == "slerp":
            c.error("allow_extrapolation", "a SLERP merge has no weights or eta to extrapolate with",
                    "remove allow_extrapolation")
        for key, value, low in (("max_new_tokens", args.max_new_tokens, 1), ("bootstrap_resamples",
                                 args.bootstrap_resamples, 100), ("per_device_eval_batch_size",
                                 t.per_device_eval_batch_size, 1)):
            c.in_range(key, value, isinstance(value, int) and value >= low, f"{low} or more")
        c.in_range("max_length", args.max_length, args.max_length is None or (isinstance(args.max_length, int)
                   and args.max_length >= 2), "2 or more (or leave it out: the model's context)")
        c.in_range("seed", t.seed, isinstance(t.seed, int) and 0 <= t.seed < 2**32, "an integer in [0, 2**32)")
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        c.in_range("merge_threads", args.merge_threads, isinstance(args.merge_threads, int)
                   and 1 <= args.merge_threads <= cpus, f"a whole number from 1 to {cpus} (this machine's CPUs)")
        for key in ("buffer_size", "max_shard_size"):
            try:
                parse_size(getattr(args, key))
            except (ValueError, TypeError) as err:
                c.error(key, str(err), "write a size such as 64MiB or 5GB")
        if problems or not entries:
            return
        models = self.inputs(recipe)
        weights = [w for _, _, w in models]
        if any(w is not None for w in weights):
            if method != "linear":
                c.error("models", f"weights apply to merge_method linear, not {method}", "remove the weights")
            elif any(w is None for w in weights):
                missing = [k for (_, k, w) in models if w is None]
                c.error(missing[0].split(" ")[0], "some models have a weight and others not",
                        "give every model a weight, or none (uniform 1/N)")
            elif any(e.weight is not None and len(expand(e)) > 1 for e in entries):
                c.error("models", "a sweep's runs are averaged with one weight each: a weight on the sweep is "
                        "ambiguous", "leave the sweep unweighted (uniform), or list its runs with a weight each")
            else:
                try:
                    check_weights(weights, len(weights), normalize=args.normalize,
                                  allow_extrapolation=args.allow_extrapolation)
                except ValueError as err:
                    c.error("models", _recipe_wording(str(err)), "fix the weights (or set normalize: true)")
        elif args.normalize:
            c.error("normalize", "no model has a weight: the default weights are uniform (1/N) and sum to 1",
                    "give weights ({model: REF, weight: w}), or remove normalize")
        if method == "liti" and args.eta is not None:
            try:
                check_eta(args.eta, allow_extrapolation=args.allow_extrapolation)
            except ValueError as err:
                c.error("eta", _recipe_wording(str(err)), "use an eta in [0, 1]")
        count = len(models)
        needed = {"linear": (2, "two or more models"), "slerp": (2, "two or more models besides the base"),
                  "liti": (1, "exactly one model")}[method]
        if count < needed[0] or (method == "liti" and count != 1):
            c.error("models", f"merge_method {method} needs {needed[1]}, got {count}",
                    "list the models to average" if method != "liti" else "give one model (and base, eta)")
        self._check_inputs(c, models)

    def _check_inputs(self, c, models: list[tuple[str, str, float | None]]) -> None:
        recipe, args = c.recipe, c.recipe.method_args
        listed = [("base", args.base)] if args.merge_method != "linear" and args.base else []
        listed += [(key, text) for text, key, _ in models]
        heads: dict[str, str] = {}
        seen: dict[str, str] = {}  # real path or stage reference -> key
        out = recipe.output_dir.expanduser().resolve() if recipe.output_dir else None
        configs: list[tuple[str, dict]] = []
        local: list[tuple[str, Path]] = []
        for key, text in listed:
            try:
                ref = resolve(text, "model")
            except BadReference as err:
                (c.environment if err.environment else c.error)(key.split(" ")[0], err.message, err.fix)
                continue
            if ref.is_local and not (ref.path / "config.json").is_file():
                c.error(key.split(" ")[0], f"{ref.path} is not a model directory (no config.json)",
                        "point it at a run or model directory")
                continue
            if not c.role(key.split(" ")[0], text, self.model_role, self.model_heads):
                continue
            found = head_of(text)
            if found is not None:
                heads[key] = found[0]
            identity_key = str(ref.path.resolve()) if ref.is_local else text
            pending_sweep = text.startswith(STAGE_SCHEME) and getattr(
                PENDING_STAGES.get(text[len(STAGE_SCHEME):]), "points", None)
            if identity_key in seen and not pending_sweep:
                first = seen[identity_key]
                what = "the base itself: its task vector is zero" if first == "base" else f"the same model as {first}"
                c.error(key.split(" ")[0], f"{text!r} is {what}", "list each model once (weight it instead)"
                        if first != "base" else "remove it from models")
                continue
            seen[identity_key] = key
            if ref.is_local:
                path = ref.path.resolve()
                if out is not None and (out == path or path in out.parents):
                    c.error("output_dir", f"{out} is inside the input {path} ({key})",
                            "write the merge somewhere else (a sibling directory)")
                local.append((key, path))
            config, _ = _architecture_of(text)
            if config is not None:
                configs.append((key, config))
        if len(set(heads.values())) > 1:
            described = ", ".join(f"{k}: {h}" for k, h in heads.items())
            c.error("models", f"the models have different heads ({described}): weights average only within one head",
                    "merge causal LMs with causal LMs, reward models with reward models")
        if configs:
            from gemma_hf import GemmaHFConfig

            def fields(config: dict) -> dict:
                try:
                    arch = GemmaHFConfig.from_dict(dict(config))
                except (ValueError, TypeError):
                    return {}
                return {name: getattr(arch, name, None) for name in ARCHITECTURE_FIELDS}

            first_key, first = configs[0][0], fields(configs[0][1])
            for key, config in configs[1:]:
                other = fields(config)
                differ = [n for n in ARCHITECTURE_FIELDS if first.get(n) != other.get(n)]
                if differ and first and other:
                    name = differ[0]
                    c.error(key.split(" ")[0], f"its {name} is {other[name]!r} but {first_key}'s is {first[name]!r}: "
                            "models of different architectures or vocabularies cannot be averaged",
                            "merge models fine-tuned from the same base")
        if len(local) > 1 and not c.problems:
            from gemma_hf.merging import MergeError, open_model
            from gemma_hf.merging.sources import check_compatible

            try:  # tensor names, shapes and dtypes, from the safetensors headers (no weights are read)
                check_compatible([open_model(path) for _, path in local],
                                 mixed_dtypes=args.merge_dtype != "auto")
            except MergeError as err:
                c.error("models", str(err), "merge models of one architecture (or set merge_dtype for mixed dtypes)")

    # -- the run -----------------------------------------------------------------------------------
    orchestrates = True

    def orchestrate(self, run: Run) -> RunResult:
        return on_main_process(run.state, lambda: self._merge(run), f"the merge into {run.rundir.path}")

    def resolved_inputs(self, recipe) -> tuple[str | None, list[Path], list[float] | None]:
        """(base, model directories, weights or None) with every reference resolved and sweeps expanded."""
        args = recipe.method_args
        models = self.inputs(recipe)
        base = str(resolve(args.base, "model").location) if args.merge_method != "linear" and args.base else None
        paths = [Path(resolve(text, "model").location) for text, _, _ in models]
        weights = [w for _, _, w in models]
        return base, paths, (None if all(w is None for w in weights) else weights)

    def write_merge(self, recipe, out: Path):
        """The merged model directory at ``out`` (atomically: a temporary sibling, then a rename)."""
        from gemma_hf.merging import liti, linear_merge, slerp_merge

        args = recipe.method_args
        base, paths, weights = self.resolved_inputs(recipe)
        common = dict(dtype=args.merge_dtype, max_shard_size=args.max_shard_size, buffer_bytes=args.buffer_size,
                      threads=args.merge_threads)
        if args.merge_method == "linear":
            return linear_merge(paths, out, weights=weights, normalize=args.normalize,
                                allow_extrapolation=args.allow_extrapolation, **common)
        if args.merge_method == "slerp":
            return slerp_merge(base, paths, out, **common)
        return liti(base, paths[0], args.eta, out, allow_extrapolation=args.allow_extrapolation, **common)

    def _merge(self, run: Run) -> RunResult:
        recipe, rundir = run.recipe, run.rundir
        write_marker(run)  # the recipe's values: a resume after an edit is refused (engine.claim_output_dir)
        working = rundir.path / WORKING
        for leftover in rundir.path.glob(f".{WORKING}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # a merge a kill cut short: redone below
        merged = None
        if (working / "config.json").is_file():
            print(f"the merge in {working} was finished before: kept", flush=True)
        else:
            merged = self.write_merge(recipe, working)
            print(f"merged: {merged.summary()}", flush=True)
        fault_point("merge:merged")
        results = self._evaluate(run, working) if recipe.data.datasets else {}
        staged = open_staging(rundir)
        link_model(working, staged.path)
        write_text(staged.recipe, recipe.to_yaml())
        if results:
            write_json(staged.eval_json, results)
        base, paths, weights = self.resolved_inputs(recipe)
        first = RunDir(Path(base or paths[0]))
        first_run = first.read_run() if first.is_finished() else {}
        args = recipe.method_args
        record_inputs = [{"model": identity(str(p)), **({"weight": w} if w is not None else {})}
                         for p, w in zip(paths, weights or [None] * len(paths))]
        run_info = record(
            "merge", self.title, run.started, run.start_time,
            head=self.head_of_inputs(recipe),
            base_model=first_run.get("base_model") or identity(str(base or paths[0])),
            family=recipe.family,
            datasets=[{"path": identity(spec.path), "split": spec.split} for spec in recipe.data.datasets],
            merge={"method": args.merge_method, "models": record_inputs,
                   "base": identity(base) if base else None, "eta": args.eta,
                   "normalize": args.normalize, "dtype": args.merge_dtype,
                   "seconds": round(merged.seconds, 2) if merged is not None else None},
            global_step=0,
        )
        finish(rundir, staged, run_info)
        return RunResult(rundir.path, "merge", results, time.time() - run.start_time, 0)

    def _evaluate(self, run: Run, merged: Path) -> dict:
        """The merged model and every input on the same held-out records (eval.json)."""
        recipe = run.recipe
        base, paths, weights = self.resolved_inputs(recipe)
        mixture = read_mixture(recipe, self)
        train, held_out = prepare_splits(run, mixture)
        items = list(held_out if held_out is not None else train)
        contenders = [("merged", merged, None)] + [(f"model_{i}", p, (weights or [None] * len(paths))[i])
                                                   for i, p in enumerate(paths)]
        if base:
            contenders.append(("base", Path(base), None))
        reward = self.head_of_inputs(recipe) == SEQUENCE_CLASSIFICATION
        rows = []
        for name, path, weight in contenders:
            print(f"evaluating {name} ({identity(str(path)) if name != 'merged' else 'the merge'}) on {len(items)} "
                  "held-out records", flush=True)
            label = "the merge" if name == "merged" else identity(str(path))
            numbers = self._pairwise(run, path, items) if reward else self._chat(run, path, items, label)
            rows.append({"name": name, "model": "merged" if name == "merged" else identity(str(path)),
                         **({"weight": weight} if weight is not None else {}), **numbers})
        results: dict[str, Any] = {f"merged_{k}": v for k, v in rows[0].items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "weight"}
        results["num_heldout"] = len(items)
        results["models"] = rows
        return results

    def _pairwise(self, run: Run, path: Path, items: list) -> dict:
        """Pairwise accuracy of a reward model on preference pairs, with its 95% bootstrap interval."""
        import torch

        from gemma_hf.evaluation.rewards import RewardModelScorer
        from gemma_hf.evaluation.winrate import bootstrap_interval

        args, t = run.recipe.method_args, run.recipe.training
        scorer = RewardModelScorer.from_pretrained(path, batch_size=t.per_device_eval_batch_size,
                                                   device=run.state.device)
        if args.max_length is not None:
            scorer.max_length = args.max_length
        with torch.no_grad():
            chosen = scorer([r["prompt"] + r["chosen"] for r in items])
            rejected = scorer([r["prompt"] + r["rejected"] for r in items])
        del scorer
        correct = [1.0 if c > r else 0.0 for c, r in zip(chosen, rejected)]
        if not all(math.isfinite(v) for v in chosen + rejected):
            raise InputError(f"the reward model {path} scored a held-out pair NaN or infinite: it cannot be published "
                             "as evaluated")
        low, high = bootstrap_interval(correct, args.bootstrap_resamples, seed=t.seed)
        return {"accuracy": sum(correct) / len(correct), "accuracy_low": low, "accuracy_high": high,
                "margin": sum(c - r for c, r in zip(chosen, rejected)) / len(correct), "num_pairs": len(correct)}

    def _chat(self, run: Run, path: Path, items: list, label: str) -> dict:
        """Held-out loss and chat health of a causal LM's greedy answers (ended-turn rate with its interval)."""
        import torch

        from gemma_hf.evaluation import Contestant, evaluate
        from gemma_hf.evaluation.winrate import bootstrap_interval

        recipe = run.recipe
        args, t = recipe.method_args, recipe.training
        conversations = [{"prompt": r["prompt"], **({"reference": r["reference"]} if r.get("reference") else {})}
                         for r in items]
        dtype = recipe.model.dtype if recipe.model.dtype not in (None, "auto") else "float32"
        who = Contestant.from_pretrained(path, label, dtype=dtype, device=run.state.device)
        with torch.no_grad():
            result = evaluate(who, conversations, loss=args.heldout_loss, max_new_tokens=args.max_new_tokens,
                              batch_size=t.per_device_eval_batch_size, num_resamples=args.bootstrap_resamples,
                              seed=t.seed)
        del who
        numbers = {k[len("model_"):]: v for k, v in result["summary"].items() if k.startswith("model_")}
        ended = [1.0 if s.get("model_stop") in ("end_of_turn", "eos") else 0.0 for s in result["samples"]]
        if ended:
            numbers["ended_turn_low"], numbers["ended_turn_high"] = bootstrap_interval(
                ended, args.bootstrap_resamples, seed=t.seed)
        return numbers

    def prepare(self, run, dataset, split: str):
        return dataset, {"examples": len(dataset)}

    def summary(self, results: dict) -> list[str]:
        lines = []
        for row in results.get("models") or []:
            numbers = ", ".join(f"{k} {row[k]:.4f}" for k in ("accuracy", "heldout_loss", "ended_turn_rate",
                                                                "repeat_prompt_rate", "distinct_2")
                                if isinstance(row.get(k), (int, float)))
            lines.append(f"{row['name']:>12}: {numbers or 'not evaluated'}")
        return lines


METHOD = Merge()

__all__ = ["Merge", "MergeArguments", "MergeRunArguments", "METHOD", "parse_models", "sweep_points", "expand",
           "MERGE_METHODS"]
