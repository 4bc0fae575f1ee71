"""`gemma-hf <method>` for every row of the method table (sft, reward, ...), and `gemma-hf validate`.

Heavy imports (torch, transformers, TRL) happen inside the command functions, so `gemma-hf --help`
stays fast. Exit codes: 0 success, 2 invalid recipe (or a run that may not start: output_dir holds
a finished run, the machine lacks what the recipe needs), 1 a failure during the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from pathlib import Path

from gemma_hf.errors import InputError

COMMON_DESCRIPTION = """\
Any recipe key can be overridden on the command line, after the recipe:
  gemma-hf {name} --config R.yaml --learning_rate 1e-4 --max_steps 50
Multi-process (accelerate):
  accelerate launch --config_file recipes/accelerate/ddp.yaml -m gemma_hf.cli {name} --config R.yaml

The recipe is checked completely before any model is loaded (every dataset record included);
problems are reported together (file, key, fix) with exit status 2 and nothing written. The run
directory (output_dir) gets recipe.yaml, the final model, metrics.jsonl, plots/, run.json,
eval.json, README.md (the model card) and checkpoints/; it appears complete only when the run
finishes. A killed run continues with --resume from its latest complete checkpoint.
"""

VALIDATE_DESCRIPTION = """\
Check a recipe without loading any model: keys (with "did you mean"), types, ranges, files, every
dataset record, conflicting options. Exit status 0 when the recipe is valid, 2 when it is not.
Requirements of the machine (a CUDA GPU for QLoRA, a Hub download while offline) are listed but
do not fail validation, unless --strict: the recipe may be meant for another machine. The method
is --method, else the recipe file's name (reward.yaml, sft-qlora.yaml, ...), else sft.
"""


def _collect_overrides(parser: argparse.ArgumentParser) -> None:
    """Let `--key value` pairs the subcommand does not define through, as recipe overrides.

    argparse's subparser action calls ``parse_known_args`` on the subparser and reports leftovers
    as errors; collecting them here into ``args.overrides`` makes every recipe key a flag without
    declaring ~200 options (they are checked, with suggestions, by the recipe loader).
    """
    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, extras = original(args, namespace)
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + list(extras)
        return namespace, []

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def register(subparsers) -> None:
    from gemma_hf.recipes.methods import METHOD_MODULES, get_method

    formatter = argparse.RawDescriptionHelpFormatter
    for name in METHOD_MODULES:
        method = get_method(name)
        if method.shares_command:  # its command module's parser takes the recipe form (add_recipe_options)
            continue
        sub = subparsers.add_parser(name, help=method.help, formatter_class=formatter,
                                    description=textwrap.fill(method.about, 96) + "\n\n"
                                    + COMMON_DESCRIPTION.format(name=name))
        add_recipe_options(sub, name)
        sub.set_defaults(func=run_command)

    cache = subparsers.add_parser(
        "distill-cache", help="run a distillation recipe's teacher once and store its sampled probabilities",
        formatter_class=formatter,
        description="Offline distillation, step 1: run the teacher of a distill recipe (distill_mode: offline) once "
                    "over its training split and store, per target position, cache_top_k token ids sampled from the "
                    "teacher's distribution at cache_temperature (cache_mode: sampled) or its top K, with their "
                    "probabilities, in cache_dir: sharded safetensors and a manifest (teacher, tokenizer, K, "
                    "temperature, mode, dataset fingerprint). Resumable: complete shards are kept. Step 2: "
                    "gemma-hf distill --config the same recipe.")
    cache.add_argument("--config", metavar="RECIPE.yaml", required=True, help="the distill recipe")
    cache.set_defaults(func=distill_cache_command, overrides=[])
    _collect_overrides(cache)

    validate = subparsers.add_parser("validate", help="check a recipe without running it",
                                     description=VALIDATE_DESCRIPTION, formatter_class=formatter)
    validate.add_argument("recipe", metavar="RECIPE.yaml", help="the recipe file")
    validate.add_argument("--method", default=None, choices=list(METHOD_MODULES),
                          help="the recipe's method (default: from the file name, else sft)")
    validate.add_argument("--strict", action="store_true",
                          help="also fail (exit 2) when this machine cannot run the recipe (GPU, packages, downloads)")
    validate.add_argument("--quiet", action="store_true", help="print nothing when the recipe is valid")
    validate.set_defaults(func=validate_command, overrides=[])
    _collect_overrides(validate)


def add_recipe_options(parser: argparse.ArgumentParser, name: str) -> None:
    """--config, --resume, --help-keys and `--key value` recipe overrides on ``parser``: the recipe form of
    `gemma-hf NAME` (also for a command with another form of its own: merge, generate)."""
    parser.add_argument("--config", metavar="RECIPE.yaml", help="the recipe file")
    parser.add_argument("--resume", action="store_true",
                        help="continue the unfinished run in output_dir from its latest complete checkpoint "
                             "(starts fresh when there is none)")
    parser.add_argument("--help-keys", action="store_true",
                        help="list every recipe key with its type and meaning, and exit")
    parser.set_defaults(recipe_method=name, overrides=[])
    _collect_overrides(parser)


def recipe_form(args: argparse.Namespace, name: str, as_overrides) -> int | None:
    """For a command with two forms (merge, generate): with --config / --help-keys, run the recipe form
    (the other form's options given turned into recipe overrides by ``as_overrides(args)``, which may refuse
    them) and return its exit code; else None, after refusing what only the recipe form takes (leftover
    `--key value` pairs, --resume)."""
    if args.config or args.help_keys:
        args.overrides = as_overrides(args) + list(args.overrides)
        return run_command(args)
    if args.overrides:
        raise InputError(f"unrecognized arguments: {' '.join(args.overrides)} (see gemma-hf {name} --help)")
    if args.resume:
        raise InputError(f"--resume applies to the recipe form (gemma-hf {name} --config R.yaml --resume)")
    return None


def method_of_file(path: str) -> str | None:
    """The method a recipe file's name says (reward.yaml, sft-qlora.yaml -> reward, sft), or None."""
    from gemma_hf.recipes.methods import METHOD_MODULES

    stem = Path(path).stem
    for name in sorted(METHOD_MODULES, key=len, reverse=True):
        if stem == name or stem.startswith(f"{name}-") or stem.startswith(f"{name}_"):
            return name
    return None


# --------------------------------------------------------------------------------------------


def _environment_error(recipe):
    from gemma_hf.recipes.problems import RecipeError

    problems = recipe.environment_problems
    count = len(problems)
    return RecipeError(recipe.source, problems, heading=(
        f"recipe {recipe.source} cannot run on this machine ({count} requirement{'s' if count != 1 else ''} unmet):"))


def print_keys(method: str) -> None:
    from gemma_hf.recipes.coercion import type_name
    from gemma_hf.recipes.methods import groups, key_index
    from gemma_hf.recipes.schema import help_text

    index = key_index(method)
    titles = {"gemma": "gemma_hf recipe fields (every method)", "method": f"{method} fields",
              "data": "data (the dataset mixture)", "model": "model (trl.ModelConfig)"}
    for group, cls in groups(method):
        title = titles.get(group) or f"training (trl.{cls.__name__} / transformers.TrainingArguments)"
        print(f"\n== {title} ==")
        for key, info in index.items():
            if info.group != group:
                continue
            default = info.field.default
            default_text = "" if default is dataclasses.MISSING else f" (default: {default!r})"
            print(f"  {key}: {type_name(info)}{default_text}")
            text = help_text(info)
            if text:
                print(textwrap.indent(textwrap.fill(text, 92), "      "))
    print("\n  datasets entries: path, split (train), name, fraction (1.0), columns {source: standard}, "
          "format (auto|messages|sharegpt|prompt_completion|alpaca|preference)")
    print("  env: a mapping of environment variables set before the run")


def run_command(args: argparse.Namespace) -> int:
    name = args.recipe_method
    if args.help_keys:
        print_keys(name)
        return 0
    if not args.config:
        raise InputError(f"{name} needs --config RECIPE.yaml (see gemma-hf {name} --help)")
    from accelerate import PartialState

    from gemma_hf.recipes.config import load_recipe
    from gemma_hf.recipes.engine import run_recipe
    from gemma_hf.recipes.methods import get_method

    recipe = load_recipe(args.config, args.overrides, method=name)
    if recipe.environment_problems:
        raise _environment_error(recipe)
    main = PartialState().is_main_process
    if main:
        for note in recipe.notes:
            print(f"note: {note}", file=sys.stderr)
    result = run_recipe(recipe, resume=args.resume)
    if main:
        print(f"\nrun finished: {result.output_dir} ({result.global_step} steps, {result.wall_time_s:.0f}s)")
        for line in get_method(name).summary(result.results):
            print(line)
    return 0


def distill_cache_command(args: argparse.Namespace) -> int:
    from gemma_hf.recipes.config import load_recipe
    from gemma_hf.recipes.distill import write_cache

    recipe = load_recipe(args.config, args.overrides, method="distill")
    if recipe.method_args.distill_mode != "offline" or not recipe.method_args.cache_dir:
        raise InputError(f"{args.config} is not an offline distillation recipe: set distill_mode: offline and "
                         "cache_dir")
    blocking = [p for p in recipe.environment_problems if p.key != "cache_dir"]
    if blocking:
        recipe.environment_problems = blocking
        raise _environment_error(recipe)
    manifest = write_cache(recipe)
    print(f"\ncache written: {recipe.method_args.cache_dir} ({manifest['dataset'].get('num_examples')} examples, "
          f"{manifest['dataset'].get('num_positions')} target positions, K={manifest.get('K')}, {manifest.get('mode')}, "
          f"{manifest.get('_seconds')} s)")
    return 0


def _has_top_level_key(path: str, key: str) -> bool:
    """The YAML file at ``path`` sets ``key`` at its top level (read as text: the kind of a file is known
    before it is parsed as that kind)."""
    import re

    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 20).decode("utf-8", errors="replace")
    except OSError:
        return False
    return re.search(rf"^{re.escape(key)}:", head, re.MULTILINE) is not None


def _is_pipeline_file(path: str) -> bool:
    """A pipeline file (top-level `stages:`), which `validate` checks as `gemma-hf pipeline --check` does."""
    return _has_top_level_key(path, "stages")


def _is_accelerate_config(path: str) -> bool:
    """An accelerate config file (`accelerate config` writes `compute_environment:` at the top level)."""
    return _has_top_level_key(path, "compute_environment")


def validate_command(args: argparse.Namespace) -> int:
    from gemma_hf.recipes.config import load_recipe

    if args.method is None and _is_accelerate_config(args.recipe):
        from gemma_hf.recipes.distributed import check_accelerate_config

        problems = check_accelerate_config(args.recipe)
        if problems:
            raise InputError(f"{args.recipe} is not a valid accelerate config for gemma_hf "
                             f"({len(problems)} problem{'s' if len(problems) != 1 else ''}):\n"
                             + "\n".join(f"  - {p}" for p in problems))
        if not args.quiet:
            print(f"ok: {args.recipe} is a valid accelerate config for gemma_hf "
                  f"(use it with `accelerate launch --config_file {args.recipe} -m gemma_hf.cli ...`)")
        return 0
    if args.method is None and _is_pipeline_file(args.recipe):
        from gemma_hf.recipes.pipeline import check_pipeline, read_pipeline

        pipeline = read_pipeline(args.recipe, args.overrides)
        check_pipeline(pipeline)
        if not args.quiet:
            print(f"ok: {args.recipe} is a valid pipeline: {len(pipeline.stages)} stages ("
                  + ", ".join(f"{s.name} ({s.method})" for s in pipeline.stages) + f"), output_dir {pipeline.output_dir}")
            for note in pipeline.notes:
                print(f"note: {note}")
        return 0
    method = args.method or method_of_file(args.recipe) or "sft"
    recipe = load_recipe(args.recipe, args.overrides, method=method)
    if args.strict and recipe.environment_problems:
        raise _environment_error(recipe)
    if args.quiet:
        return 0
    from gemma_hf.recipes.methods import get_method

    model = get_method(recipe.method).describe_model(recipe) or recipe.model.model_name_or_path or (
        f"preset {recipe.gemma.preset} (random weights)" if recipe.gemma.preset
        else "a model the method builds (e.g. a student from its teacher)")
    lora = " + QLoRA" if recipe.model.load_in_4bit or recipe.model.load_in_8bit else " + LoRA" if recipe.model.use_peft else ""
    records = sum(part.num_examples for part in recipe.data_parts.values())
    print(f"ok: {args.recipe} is a valid {recipe.method} recipe: {model}{lora}, {recipe.family} chat format, "
          f"{len(recipe.data.datasets)} dataset(s) ({records} records checked), output_dir {recipe.output_dir}")
    for note in recipe.notes:
        print(f"note: {note}")
    if recipe.environment_problems:
        count = len(recipe.environment_problems)
        print(f"this machine cannot run it ({count} requirement{'s' if count != 1 else ''} unmet; the recipe itself is valid):")
        for problem in recipe.environment_problems:
            print(problem.render())
    return 0
