"""`gemma-hf merge`: average checkpoints -- linear, SLERP of task vectors (WARP), LITI.

`gemma-hf merge --config R.yaml` is the recipe form: a merge run (gemma_hf.recipes.merge: a run
directory with run.json, card, optional held-out evaluation; a pipeline stage `method: merge`).

Exit codes (through gemma_hf.errors and the CLI's one handler): 0 success, 2 unusable input (the
message says which file, tensor or option and why; nothing is written), 1 a failure while writing
(disk, I/O). The library is gemma_hf.merging.
"""

from __future__ import annotations

import argparse
import math
import sys

from .recipes import add_recipe_options, recipe_form

DESCRIPTION = """\
Average model checkpoints, tensor by tensor, into a new model directory.

  gemma-hf merge --method linear --models A B [C ...] [--weights w_A w_B ...] --output OUT
      theta = sum_i w_i * theta_i. Weights default to uniform (1/N); given weights must be finite
      and sum to 1 (a weighted average that does not sum to 1 rescales every tensor), or pass
      --normalize to divide them by their (positive, finite) sum. Negative weights need
      --allow-extrapolation. Each weight used is 0 or within float32's range (1.2e-38 to 3.4e38
      in magnitude): the arithmetic is float32. Each model is listed once (weight it with --weights).

  gemma-hf merge --method slerp --base INIT --models A B [C ...] --output OUT
      WARP's SLERP of task vectors delta_m = theta_m - theta_INIT, one angle per tensor, folded
      over the runs: merged_1 = delta_1, merged_m = slerp(merged_{m-1}, delta_m, 1/m);
      theta = theta_INIT + merged_M. Pairs that are zero or within 0.057 degrees of (anti)parallel
      (sin angle < 1e-3) are interpolated linearly instead.

  gemma-hf merge --method liti --base INIT --models M --eta 0.3 --output OUT
      theta = (1 - eta) * theta_INIT + eta * theta_M, eta in [0, 1] (eta > 1 extrapolates and
      needs --allow-extrapolation; negative eta is refused).

An input given twice, or a model that is the --base, is refused: the same directory (through
links, ./A and A/ alike) or the same weight files (linked). A copy in another directory counts
as another model. Options that cannot have an effect (--normalize or --allow-extrapolation
without --weights, --allow-extrapolation with slerp) are refused; ones with no effect for the
given values (--allow-extrapolation with no negative weight or eta <= 1, --normalize of weights
summing to 1) are warned about.

Inputs are model directories: gemma_hf or stock transformers Gemma checkpoints (gemma, gemma2,
gemma3_text; safetensors, sharded or not), or finished gemma-hf run directories (their root
model is used). All inputs must share the architecture, tensor names, shapes and dtypes (else
--dtype). The output is a complete model directory (weights, config.json from the first model /
the base, generation config, tokenizer, remote code, merge.json), written to a temporary sibling
and renamed when complete. Memory stays near --buffer-size whatever the model size and count.
"""


def register(subparsers) -> None:
    merge = subparsers.add_parser(
        "merge",
        help="average checkpoints: linear, SLERP of task vectors (WARP), LITI",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("--method", choices=("linear", "slerp", "liti"),
                       help="the flag form's merge (required without --config)")
    merge.add_argument("--models", nargs="+", metavar="DIR",
                       help="the models to average (linear, slerp: two or more; liti: exactly one)")
    merge.add_argument("--base", metavar="INIT", help="slerp, liti: the initialisation the task vectors start from")
    merge.add_argument("--weights", nargs="+", type=float, metavar="W",
                       help="linear: one weight per model, summing to 1 (default: uniform)")
    merge.add_argument("--normalize", action="store_true", help="linear: divide the weights by their sum")
    merge.add_argument("--eta", type=float, help="liti: the interpolation coefficient, in [0, 1]")
    merge.add_argument("--allow-extrapolation", action="store_true",
                       help="allow negative linear weights and liti eta > 1")
    merge.add_argument("--output", metavar="OUT", help="the merged model directory (must not exist)")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace OUT if it is an empty or a model directory (never other files or a run)")
    merge.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="output dtype (default auto: as stored in the inputs, which must then agree)")
    merge.add_argument("--max-shard-size", default=None, metavar="SIZE",
                       help="largest output weight file, e.g. 5GB (default 50GB, as transformers)")
    merge.add_argument("--buffer-size", default=None, metavar="SIZE",
                       help="working memory for tensor data (default 64MiB)")
    merge.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch threads for the arithmetic, 1 to the CPUs available (default 1: the merge is "
                            "streaming I/O, and on a busy machine more threads are slower; try N on an idle many-core "
                            "machine)")
    add_recipe_options(merge, "merge")
    merge.set_defaults(func=merge_command)


def _usage_problem(args: argparse.Namespace) -> str | None:
    """The first combination of options that cannot work or would have no effect, as a message."""
    method, n = args.method, len(args.models)
    if method == "linear":
        if args.base is not None:
            return "--base applies to --method slerp and liti; a linear merge averages --models only."
        if args.eta is not None:
            return "--eta applies to --method liti only."
        if n < 2:
            return "--method linear needs two or more --models."
        if args.weights is not None and len(args.weights) != n:
            return f"--weights got {len(args.weights)} values for {n} models; give one weight per model."
        if args.weights is None and args.normalize:
            return ("--normalize has no effect without --weights: the default weights are uniform (1/N) and sum to 1. "
                    "Give --weights to normalise, or leave --normalize out.")
        if args.weights is None and args.allow_extrapolation:
            return ("--allow-extrapolation has no effect without --weights: the default weights are uniform (1/N), "
                    "never negative. Give --weights, or leave --allow-extrapolation out.")
        return None
    if args.weights is not None or args.normalize:
        return f"--weights and --normalize apply to --method linear only (--method {method} has no weights)."
    if args.base is None:
        return f"--method {method} needs --base INIT, the initialisation the models were fine-tuned from."
    if method == "slerp":
        if args.eta is not None:
            return "--eta applies to --method liti only."
        if args.allow_extrapolation:
            return ("--allow-extrapolation has no effect with --method slerp (it has no weights or eta to "
                    "extrapolate with); it applies to --method linear (negative --weights) and liti (--eta > 1).")
        if n < 2:
            return "--method slerp needs two or more --models (SLERP of one task vector is that model)."
        return None
    if n != 1:
        return f"--method liti takes exactly one model (--models M), got {n}."
    if args.eta is None:
        return "--method liti needs --eta, e.g. --eta 0.3."
    return None


def _no_effect_warnings(args: argparse.Namespace) -> list[str]:
    """Options that are valid but, with these values, change nothing (a sweep may pass them always)."""
    warnings = []
    if args.method == "linear" and args.weights is not None:
        if args.allow_extrapolation and not any(w < 0 for w in args.weights):
            warnings.append("--allow-extrapolation has no effect: no weight in --weights is negative.")
        if args.normalize and _exact_sum(args.weights) == 1.0:
            warnings.append("--normalize has no effect: --weights already sum to 1.")
    if args.method == "liti" and args.allow_extrapolation and args.eta is not None and args.eta <= 1:
        warnings.append(f"--allow-extrapolation has no effect: --eta {args.eta:g} is within [0, 1].")
    return warnings


def _exact_sum(values: list[float]) -> float:
    try:
        return math.fsum(values)
    except (OverflowError, ValueError):  # an overflowing or NaN sum: refused by the merge's own checks
        return math.nan


# The flag form's options and the recipe keys they set in the recipe form (`--config R.yaml --eta 0.3`).
RECIPE_KEYS = {"method": "merge_method", "base": "base", "eta": "eta", "output": "output_dir",
               "max_shard_size": "max_shard_size", "buffer_size": "buffer_size", "threads": "merge_threads"}


def _as_overrides(args: argparse.Namespace) -> list[str]:
    """The flag-form options given with --config, as recipe overrides (each sets the recipe key it names)."""
    import json

    from ..errors import InputError

    if args.overwrite:
        raise InputError("--overwrite applies to the flag form: a merge run never replaces a finished run (choose "
                         "a new output_dir)")
    if args.weights is not None and args.models is None:
        raise InputError("--weights with --config needs --models too (one weight per model), or weights in the "
                         "recipe's models: [{model: REF, weight: w}, ...]")
    out: list[str] = []
    for option, key in RECIPE_KEYS.items():
        value = getattr(args, option)
        if value is not None:
            out += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    if args.models is not None:
        if args.weights is not None and len(args.weights) != len(args.models):
            raise InputError(f"--weights got {len(args.weights)} values for {len(args.models)} models; give one "
                             "weight per model.")
        models = [m if args.weights is None else {"model": m, "weight": w}
                  for m, w in zip(args.models, args.weights or args.models)]
        out += ["--models", json.dumps(models)]
    for flag, key, on in (("--normalize", "normalize", args.normalize),
                          ("--allow-extrapolation", "allow_extrapolation", args.allow_extrapolation)):
        if on:
            out += [f"--{key}", "true"]
    if args.dtype != "auto":
        out += ["--merge_dtype", args.dtype]
    return out


def merge_command(args: argparse.Namespace) -> int:
    from ..errors import GemmaHFError, InputError

    code = recipe_form(args, "merge", _as_overrides)  # the recipe form: a merge run (gemma_hf.recipes.merge)
    if code is not None:
        return code
    missing = [flag for flag, value in (("--method", args.method), ("--models", args.models),
                                        ("--output", args.output)) if value is None]
    if missing:
        raise InputError(f"gemma-hf merge needs {', '.join(missing)} (the flag form), or --config RECIPE.yaml "
                         "(a merge run): see gemma-hf merge --help")
    problem = _usage_problem(args)
    if problem:
        raise InputError(problem)

    from ..merging import linear_merge, liti, slerp_merge
    from ..merging.engine import DEFAULT_BUFFER_BYTES, DEFAULT_MAX_SHARD_SIZE, DEFAULT_THREADS

    common = dict(  # an empty or zero value is checked (and refused), never taken for the default
        dtype=args.dtype,
        overwrite=args.overwrite,
        max_shard_size=DEFAULT_MAX_SHARD_SIZE if args.max_shard_size is None else args.max_shard_size,
        buffer_bytes=DEFAULT_BUFFER_BYTES if args.buffer_size is None else args.buffer_size,
        threads=DEFAULT_THREADS if args.threads is None else args.threads,
    )
    try:
        if args.method == "linear":
            result = linear_merge(args.models, args.output, weights=args.weights, normalize=args.normalize,
                                  allow_extrapolation=args.allow_extrapolation, **common)
        elif args.method == "slerp":
            result = slerp_merge(args.base, args.models, args.output, **common)
        else:
            result = liti(args.base, args.models[0], args.eta, args.output,
                          allow_extrapolation=args.allow_extrapolation, **common)
    except GemmaHFError:
        raise  # bad input (MergeError, exit 2): the message names the file, tensor or option
    except OSError as err:
        raise GemmaHFError(f"writing {args.output} failed, nothing was written: {err}") from err
    # After the merge, so that a refusal prints its one line only.
    for warning in _no_effect_warnings(args):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"merged {len(args.models) + (args.base is not None)} checkpoints: {result.summary()}")
    return 0
