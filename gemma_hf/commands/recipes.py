"""`gemma-hf sft` and `gemma-hf validate`: run or check a YAML recipe.

Heavy imports (torch, transformers, TRL) happen inside the command functions, so `gemma-hf --help`
stays fast. Exit codes: 0 success, 2 invalid recipe (or a run that may not start: output_dir
holds a finished run, the machine lacks what the recipe needs), 1 a failure during the run.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

SFT_DESCRIPTION = """\
Supervised fine-tuning of a Gemma model from a YAML recipe (TRL SFTTrainer).

Any recipe key can be overridden on the command line, after the recipe:
  gemma-hf sft --config recipes/gemma3-270m/sft.yaml --learning_rate 1e-4 --max_steps 50
  gemma-hf sft --config R.yaml --gradient_checkpointing false --lora_target_modules q_proj v_proj
Multi-process (accelerate):
  accelerate launch --config_file recipes/accelerate/ddp.yaml -m gemma_hf.cli sft --config R.yaml

The recipe is checked completely before any model is loaded; problems are reported together
(file, key, fix) with exit status 2 and nothing written. The run directory (output_dir) gets
recipe.yaml, the final model, metrics.jsonl, plots/loss.png, run.json, eval.json and
checkpoints/; it appears complete only when the run finishes. A killed run continues with
--resume from its latest complete checkpoint.
"""

VALIDATE_DESCRIPTION = """\
Check a recipe without loading any model: keys (with "did you mean"), types, files, dataset
columns (first records), conflicting options. Exit status 0 when the recipe is valid, 2 when it
is not. Requirements of the machine (a CUDA GPU for QLoRA, a Hub download while offline) are
listed but do not fail validation, unless --strict: the recipe may be meant for another machine.
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
    formatter = argparse.RawDescriptionHelpFormatter
    sft = subparsers.add_parser("sft", help="supervised fine-tuning from a YAML recipe",
                                description=SFT_DESCRIPTION, formatter_class=formatter)
    sft.add_argument("--config", metavar="RECIPE.yaml", help="the recipe file")
    sft.add_argument("--resume", action="store_true",
                     help="continue the unfinished run in output_dir from its latest complete checkpoint "
                          "(starts fresh when there is none)")
    sft.add_argument("--help-keys", action="store_true", help="list every recipe key with its type and meaning, and exit")
    sft.set_defaults(func=sft_command, overrides=[])
    _collect_overrides(sft)

    validate = subparsers.add_parser("validate", help="check a recipe without running it",
                                     description=VALIDATE_DESCRIPTION, formatter_class=formatter)
    validate.add_argument("recipe", metavar="RECIPE.yaml", help="the recipe file")
    validate.add_argument("--method", default="sft", choices=["sft"], help="the recipe's method (default: sft)")
    validate.add_argument("--strict", action="store_true",
                          help="also fail (exit 2) when this machine cannot run the recipe (GPU, packages, downloads)")
    validate.add_argument("--quiet", action="store_true", help="print nothing when the recipe is valid")
    validate.set_defaults(func=validate_command, overrides=[])
    _collect_overrides(validate)


# --------------------------------------------------------------------------------------------


def _print_error(err) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def _environment_error(recipe):
    from gemma_hf.recipes.config import RecipeError

    problems = recipe.environment_problems
    count = len(problems)
    return RecipeError(recipe.source, problems, heading=(
        f"recipe {recipe.source} cannot run on this machine ({count} requirement{'s' if count != 1 else ''} unmet):"))


def print_keys(method: str = "sft") -> None:
    from gemma_hf.recipes.config import _type_name
    from gemma_hf.recipes.schema import groups, help_text, key_index

    index = key_index(method)
    titles = {"gemma": "gemma_hf recipe fields", "data": "data (the dataset mixture)",
              "model": "model (trl.ModelConfig)", "training": "training (trl.SFTConfig / transformers.TrainingArguments)"}
    for group, cls in groups(method):
        print(f"\n== {titles[group]} ==")
        for key, info in index.items():
            if info.group != group:
                continue
            default = info.field.default
            default_text = "" if default is dataclasses_missing() else f" (default: {default!r})"
            print(f"  {key}: {_type_name(info)}{default_text}")
            text = help_text(info)
            if text:
                print(textwrap.indent(textwrap.fill(text, 92), "      "))
    print("\n  datasets entries: path, split (train), name, fraction (1.0), columns {source: standard}, "
          "format (auto|messages|sharegpt|prompt_completion|alpaca)")
    print("  env: a mapping of environment variables set before the run")


def dataclasses_missing():
    import dataclasses

    return dataclasses.MISSING


def sft_command(args: argparse.Namespace) -> int:
    if args.help_keys:
        print_keys("sft")
        return 0
    if not args.config:
        return _print_error("sft needs --config RECIPE.yaml (see gemma-hf sft --help)")
    from accelerate import PartialState

    from gemma_hf.recipes.config import RecipeError, load_recipe
    from gemma_hf.recipes.sft import run_sft

    try:
        recipe = load_recipe(args.config, args.overrides, method="sft")
        if recipe.environment_problems:
            raise _environment_error(recipe)
        main = PartialState().is_main_process
        if main:
            for note in recipe.notes:
                print(f"note: {note}", file=sys.stderr)
        result = run_sft(recipe, resume=args.resume)
    except RecipeError as err:
        return _print_error(err)
    if main:
        print(f"\nrun finished: {result.output_dir} ({result.global_step} steps, {result.wall_time_s:.0f}s)")
        if result.eval_loss_before is not None or result.eval_loss_after is not None:
            before = "-" if result.eval_loss_before is None else f"{result.eval_loss_before:.4f}"
            after = "-" if result.eval_loss_after is None else f"{result.eval_loss_after:.4f}"
            print(f"held-out loss: {before} -> {after}")
    return 0


def validate_command(args: argparse.Namespace) -> int:
    from gemma_hf.recipes.config import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides, method=args.method)
    except RecipeError as err:
        return _print_error(err)
    if args.strict and recipe.environment_problems:
        return _print_error(_environment_error(recipe))
    if args.quiet:
        return 0
    model = recipe.model_path or f"preset {recipe.gemma.preset} (random weights)"
    lora = " + QLoRA" if recipe.model.load_in_4bit or recipe.model.load_in_8bit else " + LoRA" if recipe.model.use_peft else ""
    print(f"ok: {args.recipe} is a valid {recipe.method} recipe: {model}{lora}, {recipe.family} chat format, "
          f"{len(recipe.data.datasets)} dataset(s), output_dir {recipe.output_dir}")
    for note in recipe.notes:
        print(f"note: {note}")
    if recipe.environment_problems:
        count = len(recipe.environment_problems)
        print(f"this machine cannot run it ({count} requirement{'s' if count != 1 else ''} unmet; the recipe itself is valid):")
        for problem in recipe.environment_problems:
            print(problem.render())
    return 0
