"""The post-training pipeline (``gemma-hf pipeline --config P.yaml``): stages that are ordinary
method recipes, run in order in one pipeline directory, each stage's output feeding the next.

A pipeline file::

    output_dir: runs/my-pipeline
    final: rlhf                      # the stage whose model is the pipeline's (default: the last model)
    stages:
      - name: sft
        method: sft
        recipe: sft.yaml             # a recipe file (relative to this file) or an inline mapping
        overrides: {max_steps: 60}
      - name: reward
        method: reward
        recipe: reward.yaml
        overrides: {model_name_or_path: {from: sft}}
      - name: rlhf
        method: warp
        recipe: warp.yaml
        overrides:
          model_name_or_path: {from: sft}
          rewards: [{model: {from: reward}}, {function: "gemma_hf.rl.rules:chat_health"}]
      - name: eval
        method: eval
        recipe: eval.yaml
        overrides: {model_name_or_path: {from: rlhf}, baseline_name_or_path: {from: sft}}
    push: {repo_id: ORG/NAME, private: true}    # optional, off by default

``{from: NAME}`` anywhere in a stage's values is the run directory of the earlier stage NAME, a
stage that publishes a model (not an evaluation). Every stage is validated before the first one
starts (a typo in the last stage fails in the first second), with the outputs of earlier stages
standing in as what they will be (their model's architecture, head and tokenizer: a reward stage's
output is refused as a judge, a policy's as a reward model).

Each stage runs in ``stages/NAME`` of the pipeline directory, never anywhere else: an ``output_dir``
in a stage's ``overrides`` or inline recipe is refused (it would be ignored), and the ``output_dir``
of a referenced recipe file (a method recipe that also runs on its own) is replaced, which
``gemma-hf validate`` and the run say.

The pipeline directory holds ``stages/NAME/`` (each stage's run directory), ``logs/NAME.log``
(each stage's output) and ``manifest.json``: per stage its method, the hash of its resolved recipe
(which includes the hashes of the stages it reads from), its status (pending, running, finished,
failed), its output, its wall time and its log. A re-run skips finished stages whose hash is
unchanged, resumes an interrupted one (from its checkpoints), and re-runs a stage whose recipe
changed and every stage after it. A finished stage whose output directory is gone (or no longer
holds a finished run) runs again, and so does every stage that reads from it, directly or through
another stage: their results were made from the lost output, which a re-run need not reproduce bit
for bit; the stages that do not read from it are kept. A failing stage is named with its log; the
stages before it stay as they are. When every stage has finished, the final stage's model is
published at the pipeline directory's root with a card that covers the whole pipeline (every
stage's held-out results, the evaluation's table), and pushed if ``push`` says so. A finished
pipeline whose stages must run again (a changed recipe, a lost output) withdraws that model
(run.json, the card) until it is published again.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from accelerate import PartialState

from gemma_hf.errors import GemmaHFError, suggestion
from gemma_hf.faults import STAGE, fault_point
from gemma_hf.hub import push_to_hub
from gemma_hf.references import PENDING_STAGES, PendingStage, identity
from gemma_hf.rundir import MANIFEST, STAGES, RunDir, now_iso, write_json, write_text

from .config import load_recipe, read_yaml, yaml_scalar
from .distributed import on_main_process
from .engine import open_run, run_recipe
from .methods import METHOD_MODULES, get_method, key_index, refused_keys
from .problems import Problem, RecipeError
from .publish import copy_model, finish, open_staging, record
from .runtime import RunResult
from .schema import shareable

PIPELINE_KEYS = ("output_dir", "stages", "final", "push", "env")
STAGE_KEYS = ("name", "method", "recipe", "overrides", "sweep")
# A sweep runs one full run per point: this many at most (a grid multiplies quickly; 32 runs of a stage
# is already a large search for one pipeline, and every point is validated before the first runs).
MAX_SWEEP_POINTS = 32


class StageFailed(GemmaHFError):
    """A stage of the pipeline failed; the message names it and its log."""


@dataclass
class Point:
    """One run of a sweep: its name (its directory under the stage's stages/) and the values it sets."""

    name: str
    values: dict[str, Any]


@dataclass
class Stage:
    name: str
    method: str
    values: dict[str, Any]  # the stage recipe's values, overrides applied, {from: X} as "stage:X"
    source: str  # the recipe file (or "inline")
    reads: list[str] = field(default_factory=list)  # the stages it takes output from
    hash: str = ""
    points: list[Point] = field(default_factory=list)  # a sweep's runs (empty: one run)

    @property
    def publishes(self) -> str:
        """What its directory holds for later stages: "model", "data", "results" or "runs" (a sweep)."""
        if self.points:
            return "runs"
        method = get_method(self.method)
        if getattr(method, "publishes_data", False):
            return "data"
        return "model" if method.publishes_model else "results"


@dataclass
class Pipeline:
    source: Path
    output_dir: Path
    stages: list[Stage]
    final: str
    push: dict | None
    env: dict[str, str]
    notes: list[str] = field(default_factory=list)  # said by `validate`, `--check` and the run

    def stage_dir(self, name: str) -> Path:
        return self.output_dir / "stages" / name

    def log(self, name: str) -> Path:
        return self.output_dir / "logs" / f"{name}.log"

    def point_dir(self, stage: str, point: str) -> Path:
        return self.stage_dir(stage) / STAGES / point


# --------------------------------------------------------------------------------------------
# Reading and checking
# --------------------------------------------------------------------------------------------


def _publishes_model(method: str) -> bool:
    return get_method(method).publishes_model


_DATASET_PATH = re.compile(r"\.datasets\[\d+\]\.path$")
_MERGE_MODELS = re.compile(r"\.models(\[\d+\](\.model)?)?$")


def _from_references(value: Any, known: dict[str, Stage], where: str, problems: list[Problem], source: str,
                     reads: set, method: str):
    """``{from: NAME}`` -> ``"stage:NAME"`` throughout ``value``; ``known``: the earlier stages. What the
    named stage publishes must fit the place: a model where a model is read, a generated dataset as a
    dataset's path, a sweep's runs as a merge's models."""
    if isinstance(value, dict):
        if set(value) == {"from"}:
            name = value["from"]
            if not isinstance(name, str) or name not in known:
                problems.append(Problem(where, f"{{from: {name!r}}} names no earlier stage",
                                        f"use one of {list(known) or '(none: this is the first stage)'}", source))
                return value
            kind = known[name].publishes
            models = [n for n, stage in known.items() if stage.publishes == "model"]
            as_data = bool(_DATASET_PATH.search(where))
            problem = None
            if as_data and kind != "data":
                problem = (f"{{from: {name!r}}} is a dataset path, but stage {name!r} ({known[name].method}) publishes "
                           f"{'a model' if kind == 'model' else 'no dataset'}",
                           f"read data from a stage that generates it (method generate): "
                           f"{[n for n, st in known.items() if st.publishes == 'data'] or '(none before it)'}")
            elif not as_data and kind == "data":
                problem = (f"{{from: {name!r}}} names a stage that publishes a dataset (method {known[name].method}), "
                           "not a model", f"use it as a dataset: datasets: [{{path: {{from: {name}}}}}]")
            elif kind == "runs" and not (method == "merge" and _MERGE_MODELS.search(where)):
                problem = (f"{{from: {name!r}}} names a sweep: its output is {len(known[name].points)} runs, not one "
                           "model", f"average them first: a merge stage with models: {{from: {name}}}")
            elif kind == "results":
                problem = (f"{{from: {name!r}}} names a stage that publishes no model (method {known[name].method}: "
                           "its run directory holds results only)",
                           f"read a model from a stage that trains one: {models or '(none before it)'}")
            if problem is not None:
                problems.append(Problem(where, problem[0], problem[1], source))
                return value
            reads.add(name)
            return f"stage:{name}"
        return {k: _from_references(v, known, f"{where}.{k}", problems, source, reads, method)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_from_references(v, known, f"{where}[{i}]", problems, source, reads, method)
                for i, v in enumerate(value)]
    return value


def _sweep_points(spec: Any, method: str, where: str, problems: list[Problem], source: str) -> list[dict]:
    """The override sets of a stage's ``sweep``: a grid ({key: [values]}) or an explicit list of sets."""
    if isinstance(spec, dict):
        if not spec:
            problems.append(Problem(where, "an empty sweep", "give {key: [value, ...]} (a grid) or remove sweep",
                                    source))
            return []
        for key, values in spec.items():
            if not isinstance(values, list) or not values:
                problems.append(Problem(f"{where}.{key}", f"expected a non-empty list of values, got {values!r}",
                                        f"write {key}: [v1, v2]", source))
                return []
        sets = [dict(zip(spec, combo)) for combo in itertools.product(*spec.values())]
    elif isinstance(spec, list) and spec and all(isinstance(item, dict) and item for item in spec):
        sets = [dict(item) for item in spec]
    else:
        problems.append(Problem(where, f"expected a grid {{key: [values]}} or a list of {{key: value}} sets, got "
                                f"{spec!r}", "write sweep: {learning_rate: [1.0e-5, 2.0e-5], seed: [0, 1]}", source))
        return []
    index, refused = key_index(method), refused_keys(method)
    for key in dict.fromkeys(k for point in sets for k in point):
        if key == "output_dir":
            problems.append(Problem(f"{where}.{key}", "each point runs in its own directory under the stage's",
                                    "remove it from the sweep", source))
        elif key in refused:
            problems.append(Problem(f"{where}.{key}", f"not used by gemma-hf {method}: {refused[key]}",
                                    "remove it from the sweep", source))
        elif key not in index:
            problems.append(Problem(f"{where}.{key}", f"not a key of {method} recipes.{suggestion(str(key), index)}",
                                    f"sweep over {method} recipe keys (gemma-hf {method} --help-keys)", source))
    if len(sets) > MAX_SWEEP_POINTS:
        problems.append(Problem(where, f"{len(sets)} points: a sweep runs at most {MAX_SWEEP_POINTS} runs of a stage",
                                "sweep fewer values (or split it into stages)", source))
    seen = set()
    for number, point in enumerate(sets):
        text = json.dumps(point, sort_keys=True, default=str)
        if text in seen:
            problems.append(Problem(f"{where}[{number}]", f"the point {point} is listed twice",
                                    "list each point once", source))
        seen.add(text)
    return sets


def _point_name(number: int, values: dict) -> str:
    """p<N>-key-value-...: readable, a valid directory name, never longer than 96 characters."""
    text = "-".join(f"{k}-{v}" for k, v in values.items())
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return f"p{number}-{text}"[:96].rstrip("._-")


def read_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    """Read a pipeline file; RecipeError for every problem of its own structure (stage recipes are
    checked by :func:`check_pipeline`)."""
    path = Path(path)
    raw = read_yaml(path)
    label = str(path)
    problems: list[Problem] = []
    for token_index in range(0, len(overrides or []), 2):
        key = overrides[token_index].lstrip("-").replace("-", "_")
        if key != "output_dir" or token_index + 1 >= len(overrides):
            problems.append(Problem(key, "a pipeline takes only --output_dir on the command line",
                                    "edit the pipeline file (or a stage's overrides)", "the command line"))
            continue
        raw["output_dir"] = yaml_scalar(overrides[token_index + 1])
    for key in raw:
        if key not in PIPELINE_KEYS:
            problems.append(Problem(str(key), f"unknown pipeline key.{suggestion(str(key), PIPELINE_KEYS)}",
                                    f"pipeline keys are {', '.join(PIPELINE_KEYS)}", label))
    if not raw.get("output_dir") or not isinstance(raw.get("output_dir"), str):
        problems.append(Problem("output_dir", "missing: where the pipeline's directory goes",
                                "add `output_dir: runs/<name>`", label))
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        problems.append(Problem("stages", "missing or empty: a pipeline is a list of stages",
                                "add `stages:` with {name, method, recipe, overrides} entries", label))
        stages_raw = []
    stages: list[Stage] = []
    names: list[str] = []
    known: dict[str, Stage] = {}  # the stages read so far
    replaced: list[str] = []  # stages whose recipe file's output_dir is replaced by stages/NAME
    for index, entry in enumerate(stages_raw):
        key = f"stages[{index}]"
        if not isinstance(entry, dict):
            problems.append(Problem(key, f"expected a mapping, got {entry!r}", "write {name, method, recipe}", label))
            continue
        unknown = [k for k in entry if k not in STAGE_KEYS]
        for k in unknown:
            problems.append(Problem(f"{key}.{k}", "unknown stage key", f"stage keys are {', '.join(STAGE_KEYS)}", label))
        name, method = entry.get("name"), entry.get("method")
        if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
            problems.append(Problem(f"{key}.name", f"{name!r} is not a stage name", "use letters, digits, - and _",
                                    label))
            continue
        if name in names:
            problems.append(Problem(f"{key}.name", f"{name!r} is used twice", "give each stage its own name", label))
            continue
        if method not in METHOD_MODULES:
            problems.append(Problem(f"{key}.method", f"{method!r} is not a method.{suggestion(str(method), METHOD_MODULES)}",
                                    f"use one of {', '.join(METHOD_MODULES)}", label))
            continue
        recipe = entry.get("recipe")
        values: dict[str, Any] = {}
        source = "inline"
        if isinstance(recipe, str):
            file = (path.parent / recipe) if not Path(recipe).is_absolute() else Path(recipe)
            source = str(file)
            try:
                values = read_yaml(file)
            except RecipeError as err:
                problems.extend(Problem(f"{key}.recipe ({p.key})", p.message, p.fix, label) for p in err.problems)
                continue
        elif isinstance(recipe, dict):
            values = dict(recipe)
        elif recipe is not None:
            problems.append(Problem(f"{key}.recipe", "expected a recipe file name or an inline mapping",
                                    "write `recipe: sft.yaml` or `recipe: {...}`", label))
            continue
        overrides_value = entry.get("overrides") or {}
        if not isinstance(overrides_value, dict):
            problems.append(Problem(f"{key}.overrides", "expected a mapping of recipe keys", "write {key: value}", label))
            continue
        # A stage runs in stages/NAME. An output_dir written for this stage (its overrides, its inline
        # recipe) would be ignored: refused. A recipe file's is the file's own run (the shipped method
        # recipes all set one): replaced, and said.
        written = [f"{key} ({name}).overrides.output_dir"] if "output_dir" in overrides_value else []
        if isinstance(recipe, dict) and "output_dir" in recipe:
            written.append(f"{key} ({name}).recipe.output_dir")
        for where in written:
            problems.append(Problem(where, f"a stage runs in the pipeline's directory, stages/{name}: this output_dir "
                                    "would be ignored", "remove it (the pipeline's output_dir places every stage)",
                                    label))
        if "output_dir" in values and not written:
            replaced.append(name)
        values.update(overrides_value)
        values.pop("output_dir", None)
        reads: set[str] = set()
        values = _from_references(values, known, f"{key} ({name})", problems, label, reads, method)
        points: list[Point] = []
        if entry.get("sweep") is not None:
            if not _publishes_model(method):
                problems.append(Problem(f"{key} ({name}).sweep", f"a {method} stage publishes no model: there is "
                                        "nothing to sweep and merge", "sweep a stage that trains (or merges) a model",
                                        label))
            sets = _sweep_points(entry["sweep"], method, f"{key} ({name}).sweep", problems, label)
            for number, point in enumerate(sets):
                point = _from_references(point, known, f"{key} ({name}).sweep[{number}]", problems, label, reads,
                                         method)
                points.append(Point(_point_name(number, point), point))
        stage = Stage(name, method, values, source, sorted(reads), points=points)
        stages.append(stage)
        names.append(name)
        known[name] = stage
    final = raw.get("final")
    model_stages = [s.name for s in stages if s.publishes == "model"]
    if final is None and model_stages:
        final = model_stages[-1]
    if stages and final not in model_stages:
        problems.append(Problem("final", f"{final!r} is not a stage that publishes one model", f"use one of "
                                f"{model_stages}", label))
    push = raw.get("push")
    if push is not None and (not isinstance(push, dict) or "repo_id" not in push
                             or set(push) - {"repo_id", "private"}):
        problems.append(Problem("push", "expected {repo_id: ORG/NAME, private: true}", "fix or remove push", label))
    env = raw.get("env") or {}
    if not isinstance(env, dict):
        problems.append(Problem("env", "expected a mapping", "write env as NAME: value", label))
        env = {}
    if problems:
        raise RecipeError(label, problems)
    output_dir = Path(raw["output_dir"]).expanduser().resolve()
    pipeline = Pipeline(path, output_dir, stages, final, push, {str(k): str(v) for k, v in env.items()})
    if replaced:
        pipeline.notes.append(f"every stage runs in {output_dir / 'stages'}/NAME: the output_dir of the recipe files "
                              f"of {', '.join(replaced)} is not used")
    _hash_stages(pipeline)
    return pipeline


def _hash_stages(pipeline: Pipeline) -> None:
    hashes: dict[str, str] = {}
    for stage in pipeline.stages:
        text = json.dumps({"method": stage.method, "values": stage.values,
                           "reads": {name: hashes[name] for name in stage.reads},
                           **({"sweep": [[p.name, p.values] for p in stage.points]} if stage.points else {})},
                          sort_keys=True, default=str)
        stage.hash = hashes[stage.name] = hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_values(pipeline: Pipeline, stage: Stage, resolve_outputs: bool, point: Point | None = None
                 ) -> dict[str, Any]:
    """The stage's recipe values with its output_dir, and (when running) the real paths of the stages it reads;
    with ``point``, that sweep point's values and directory."""

    def swap(value):
        if isinstance(value, str) and value.startswith("stage:") and resolve_outputs:
            return str(pipeline.stage_dir(value[len("stage:"):]))
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    values = swap(json.loads(json.dumps(stage.values)))
    values["output_dir"] = str(pipeline.stage_dir(stage.name))
    if point is not None:
        values.update(swap(json.loads(json.dumps(point.values))))
        values["output_dir"] = str(pipeline.point_dir(stage.name, point.name))
    if pipeline.env:
        values["env"] = {**pipeline.env, **(values.get("env") or {})}
    return values


def check_pipeline(pipeline: Pipeline) -> dict[str, Any]:
    """Validate every stage's recipe before anything runs; {stage: Recipe}. Earlier stages' outputs
    stand in as what they will be: their model's architecture and tokenizer."""
    recipes: dict[str, Any] = {}
    problems: list[Problem] = []
    PENDING_STAGES.clear()
    invalid: list[str] = []
    try:
        for index, stage in enumerate(pipeline.stages):
            broken = [name for name in stage.reads if name in invalid]
            if broken:  # what it reads cannot stand in for the output yet: checked once that stage is fixed
                invalid.append(stage.name)
                problems.append(Problem(f"stages[{index}] ({stage.name})", f"not checked: it reads from "
                                        f"{', '.join(broken)}, which has problems (above)",
                                        f"fix {', '.join(broken)} (above); this stage is checked then",
                                        str(pipeline.source)))
                continue
            recipe, failed = None, False
            for point in stage.points or [None]:  # every point of a sweep, before the first runs
                where = f"stages[{index}] ({stage.name})" + (f".sweep ({point.name})" if point else "")
                try:
                    checked = load_recipe(None, values=stage_values(pipeline, stage, False, point),
                                          method=stage.method)
                except RecipeError as err:
                    failed = True
                    problems.extend(Problem(f"{where}.{p.key}", p.message, p.fix, str(pipeline.source))
                                    for p in err.problems)
                    continue
                recipe = recipe or checked
            if failed or recipe is None:
                invalid.append(stage.name)
                continue
            recipes[stage.name] = recipe
            method = get_method(stage.method)
            # later stages' references are checked by what it will publish
            head = method.published_head(recipe) if method.publishes_model else None
            PENDING_STAGES[stage.name] = PendingStage(stage.name, recipe.architecture, recipe.tokenizer_path, head,
                                                      publishes=stage.publishes, points=len(stage.points))
    finally:
        PENDING_STAGES.clear()
    if problems:
        raise RecipeError(pipeline.source, problems)
    return recipes


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def read_manifest(pipeline: Pipeline) -> dict:
    path = pipeline.output_dir / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"stages": {}}


def write_manifest(pipeline: Pipeline, manifest: dict) -> None:
    write_json(pipeline.output_dir / MANIFEST, manifest)


class _Tee:
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()

    def isatty(self):
        return False


@contextlib.contextmanager
def _logged(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as log:
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(old_out, log), _Tee(old_err, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = old_out, old_err


def run_pipeline(pipeline: Pipeline, resume: bool = True) -> dict:
    """Run (or continue) the pipeline; the manifest after the last stage."""
    state = PartialState()
    check_pipeline(pipeline)  # everything, before the first stage
    main = state.is_main_process
    rundir = RunDir(pipeline.output_dir)
    if main:
        for note in pipeline.notes:
            print(f"note: {note}", flush=True)
    with open_run(rundir, state, lambda: _check_output_dir(pipeline), "pipeline directory"):
        manifest = read_manifest(pipeline)
        if rundir.is_finished():
            recorded = manifest.get("stages", {})
            changed = [s.name for s in pipeline.stages if recorded.get(s.name, {}).get("hash") != s.hash]
            lost = [s.name for s in pipeline.stages if not RunDir(pipeline.stage_dir(s.name)).is_finished()]
            if not changed and not lost:
                if main:
                    print(f"{pipeline.output_dir} holds this pipeline, finished: nothing to do", flush=True)
                return manifest
            # A stage's recipe changed, or its output is gone: the published model is withdrawn (run.json,
            # the card) until those stages and the ones they affect have run again and the new final model
            # is published.
            if main:
                for name in ("run.json", "README.md"):
                    (pipeline.output_dir / name).unlink(missing_ok=True)
            state.wait_for_everyone()
        pipeline.output_dir.mkdir(parents=True, exist_ok=True)
        manifest.setdefault("stages", {})
        manifest["pipeline"] = str(pipeline.source.name)
        stale = False
        redone: set[str] = set()  # stages run again because an output they depend on was lost
        for stage in pipeline.stages:
            entry = manifest["stages"].get(stage.name, {})
            out = pipeline.stage_dir(stage.name)
            changed = entry.get("hash") not in (None, stage.hash)
            if changed or stale:
                stale = True  # this stage and everything after it run again
                if main and out.exists():
                    shutil.rmtree(out)
                entry = {}
            elif entry.get("status") == "finished" and not RunDir(out).is_finished():
                # Its output was deleted (or is no longer a finished run): it runs again from the start,
                # and so does every stage that reads from it (below).
                why = "is missing" if not out.exists() else "holds no finished run"
                if main:
                    print(f"== stage {stage.name} ({stage.method}): its output {out} {why}: it runs again ==",
                          flush=True)
                redone.add(stage.name)
            elif redone.intersection(stage.reads):
                # It was made from an output that is gone: a re-run of that stage need not reproduce it bit
                # for bit (GPU kernels, thread counts, library versions), so this one is redone from it.
                if main:
                    sources = ", ".join(sorted(redone.intersection(stage.reads)))
                    print(f"== stage {stage.name} ({stage.method}): reads {sources}, which runs again: it runs again "
                          "too ==", flush=True)
                redone.add(stage.name)
            if stage.name in redone:
                if main and out.exists():
                    shutil.rmtree(out)
                entry = {"attempts": entry.get("attempts", 0)}
            if entry.get("status") == "finished" and RunDir(out).is_finished():
                if main:
                    print(f"== stage {stage.name} ({stage.method}): finished earlier, skipped ==", flush=True)
                continue
            entry = {"method": stage.method, "hash": stage.hash, "status": "running", "output": str(out),
                     "log": str(pipeline.log(stage.name)), "recipe": stage.source, "reads": stage.reads,
                     "attempts": entry.get("attempts", 0) + 1}
            manifest["stages"][stage.name] = entry
            if main:
                write_manifest(pipeline, manifest)
            started = time.time()
            if main:
                print(f"== stage {stage.name} ({stage.method}) -> {out} ==", flush=True)
            os.environ[STAGE] = stage.name  # stage-specific fault points (gemma_hf.faults)
            try:
                with _logged(pipeline.log(stage.name)) if main else contextlib.nullcontext():
                    if stage.points:
                        result = run_sweep(pipeline, stage, entry, lambda: write_manifest(pipeline, manifest)
                                           if main else None)
                    else:
                        recipe = load_recipe(None, values=stage_values(pipeline, stage, resolve_outputs=True),
                                             method=stage.method)
                        if recipe.environment_problems:
                            raise RecipeError(f"stage {stage.name}", recipe.environment_problems)
                        result = run_recipe(recipe, resume=True)
            except BaseException as err:
                os.environ.pop(STAGE, None)
                entry.update(status="failed", seconds=round(time.time() - started, 1),
                             error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                if main:
                    write_manifest(pipeline, manifest)
                if isinstance(err, (KeyboardInterrupt, SystemExit)):
                    raise
                raise StageFailed(f"stage {stage.name!r} ({stage.method}) failed: {err}\nits log: "
                                  f"{pipeline.log(stage.name)}; the stages before it are kept. Fix it and rerun "
                                  "the pipeline: finished stages are skipped, this one resumes.") from err
            os.environ.pop(STAGE, None)
            entry.update(status="finished", seconds=round(time.time() - started, 1),
                         summary={k: v for k, v in (result.results or {}).items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)})
            if main:
                print(f"== stage {stage.name} finished in {entry['seconds']:.0f} s ==", flush=True)
                write_manifest(pipeline, manifest)
        on_main_process(state, lambda: publish_pipeline(pipeline, manifest), "publishing the pipeline")
    return manifest


SWEEP_MARKER = {"method": "sweep"}  # the marker of an unfinished sweep directory (rundir.MARKER)


def run_sweep(pipeline: Pipeline, stage: Stage, entry: dict, save_manifest) -> RunResult:
    """Run (or continue) a sweep stage: one run per point in stages/NAME/stages/POINT (a finished point is
    skipped, an interrupted one resumes from its checkpoints), then the sweep's directory is published
    like a run (run.json lists every point with its held-out numbers, eval.json holds them flat, a card)."""
    state = PartialState()
    main = state.is_main_process
    rundir = RunDir(pipeline.stage_dir(stage.name))
    started, start = now_iso(), time.time()

    def claim() -> str:
        if rundir.is_finished():
            return "finished"
        if main:
            rundir.path.mkdir(parents=True, exist_ok=True)
            if not rundir.marker.exists():
                write_json(rundir.marker, {**SWEEP_MARKER, "stage": stage.name, "started": started})
        return "open"

    with open_run(rundir, state, claim, "sweep directory") as status:
        if status == "finished":
            return RunResult(rundir.path, "sweep", rundir.read_eval() or {}, 0.0, 0)
        rows = []
        for number, point in enumerate(stage.points):
            out = pipeline.point_dir(stage.name, point.name)
            row = {"name": point.name, "values": point.values, "output": f"{STAGES}/{point.name}"}
            if RunDir(out).is_finished():
                if main:
                    print(f"== sweep {stage.name}: point {number + 1}/{len(stage.points)} {point.name} finished "
                          "earlier, skipped ==", flush=True)
                row["status"] = "skipped"
            else:
                if main:
                    print(f"== sweep {stage.name}: point {number + 1}/{len(stage.points)} {point.name} "
                          f"({', '.join(f'{k}={v}' for k, v in point.values.items())}) -> {out} ==", flush=True)
                point_start = time.time()
                recipe = load_recipe(None, values=stage_values(pipeline, stage, True, point), method=stage.method)
                if recipe.environment_problems:
                    raise RecipeError(f"stage {stage.name}, point {point.name}", recipe.environment_problems)
                run_recipe(recipe, resume=True)
                row.update(status="finished", seconds=round(time.time() - point_start, 1))
            row["summary"] = _numbers(RunDir(out).read_eval() or {})
            rows.append(row)
            entry["points"] = rows + [{"name": p.name, "values": p.values, "status": "pending"}
                                      for p in stage.points[number + 1:]]
            save_manifest()
            fault_point(f"sweep:{point.name}")
        on_main_process(state, lambda: _publish_sweep(stage, rundir, rows, started, start), "publishing the sweep")
    return RunResult(rundir.path, "sweep", rundir.read_eval() or {}, time.time() - start, 0)


def _numbers(evaluation: dict) -> dict:
    return {k: v for k, v in evaluation.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _publish_sweep(stage: Stage, rundir: RunDir, rows: list[dict], started: str, start: float) -> None:
    staged = open_staging(rundir)
    first = RunDir(rundir.path / rows[0]["output"]).read_run() if rows else {}
    write_json(staged.eval_json, {f"{row['name']}/{k}": v for row in rows for k, v in row["summary"].items()})
    write_text(staged.recipe, f"# A sweep of stage {stage.name} ({stage.method}): each point's resolved recipe is "
               f"its run's recipe.yaml (stages/POINT/recipe.yaml)\n"
               + yaml.safe_dump({"method": stage.method, "sweep": [{"name": r["name"], **r["values"]} for r in rows]},
                                sort_keys=False, allow_unicode=True, width=100))
    run_info = record(
        "sweep", f"a hyper-parameter sweep of {get_method(stage.method).title}", started, start,
        head=first.get("head"), base_model=first.get("base_model"), family=first.get("family"),
        datasets=first.get("datasets") or [], swept=stage.method,
        points=[{k: v for k, v in row.items() if k != "status"} for row in rows],
    )
    finish(rundir, staged, run_info)


def _check_output_dir(pipeline: Pipeline) -> str:
    """The pipeline directory is ours (a manifest), or empty/absent: its state (RunDir.state)."""
    out = pipeline.output_dir
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise RecipeError(pipeline.source, [Problem(
            "output_dir", f"{out} exists and is not a gemma-hf pipeline directory (no {MANIFEST})",
            "choose a new output_dir (or empty it)", str(pipeline.source))])
    return "finished" if RunDir(out).is_finished() else "open"


def publish_pipeline(pipeline: Pipeline, manifest: dict) -> None:
    """The final stage's model at the pipeline directory's root, with the pipeline's record and card."""
    rundir = RunDir(pipeline.output_dir)
    final = RunDir(pipeline.stage_dir(pipeline.final))
    staged = open_staging(rundir)
    copy_model(final.path, staged.path, into_existing=True)
    if final.metrics.is_file():
        shutil.copy2(final.metrics, staged.metrics)
    if final.plots.is_dir():
        shutil.copytree(final.plots, staged.plots)
    resolved = {"output_dir": identity(str(pipeline.output_dir)), "final": pipeline.final,
                "stages": [{"name": st.name, "method": st.method, "hash": st.hash,
                            "recipe": shareable("recipe", stage_values(pipeline, st, resolve_outputs=False))}
                           for st in pipeline.stages]}
    write_text(staged.recipe, f"# Resolved pipeline (from {pipeline.source.name}); {{from: NAME}} is written "
               f"stage:NAME\n" + yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True, width=100))
    results: dict[str, Any] = {}
    for st in pipeline.stages:
        evaluation = RunDir(pipeline.stage_dir(st.name)).read_eval() or {}
        for key, value in evaluation.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) or value is None:
                results[f"{st.name}/{key}"] = value
    tables = []  # every evaluation stage's table, under its stage's name (one stage: its table as it is)
    eval_stages = [s for s in pipeline.stages if s.method == "eval"]
    for eval_stage in eval_stages:
        table = pipeline.stage_dir(eval_stage.name) / "evaluation.md"
        if table.is_file():
            heading = f"### Stage {eval_stage.name}\n\n" if len(eval_stages) > 1 else ""
            tables.append(heading + table.read_text(encoding="utf-8").strip() + "\n")
    if tables:
        write_text(staged / "evaluation.md", "\n".join(tables))
    write_json(staged.eval_json, results)
    first = RunDir(pipeline.stage_dir(pipeline.stages[0].name)).read_run()
    final_run = final.read_run()
    seconds = [manifest["stages"][s.name].get("seconds") or 0 for s in pipeline.stages]
    run_info = record(
        "pipeline", "a multi-stage pipeline", first.get("started") or now_iso(), time.time(),
        head="causal-lm",
        base_model=first.get("base_model"),
        family=final_run.get("family"),
        datasets=[d for s in pipeline.stages for d in (RunDir(pipeline.stage_dir(s.name)).read_run().get("datasets")
                                                        or [])],
        final_stage=pipeline.final,
        stages=[{"name": s.name, "method": s.method, "hash": s.hash,
                 "seconds": manifest["stages"][s.name].get("seconds")} for s in pipeline.stages],
    )
    run_info["wall_time_s"] = round(sum(seconds), 1)  # every stage's own time, over all attempts' last
    # The working directory's stages/, logs/ and manifest move into the finished one (rundir.CARRIED).
    finish(rundir, staged, run_info)
    if pipeline.push:
        push_to_hub(rundir.path, pipeline.push["repo_id"], private=pipeline.push.get("private", True))


__all__ = ["Pipeline", "Stage", "Point", "StageFailed", "run_sweep", "MAX_SWEEP_POINTS", "read_pipeline", "check_pipeline", "run_pipeline", "publish_pipeline"]
