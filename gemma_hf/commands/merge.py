"""`gemma-hf merge`: average checkpoints -- linear, SLERP of task vectors (WARP), LITI.

Exit codes (through gemma_hf.errors and the CLI's one handler): 0 success, 2 unusable input (the
message says which file, tensor or option and why; nothing is written), 1 a failure while writing
(disk, I/O). The library is gemma_hf.merging.
"""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Average model checkpoints, tensor by tensor, into a new model directory.

  gemma-hf merge --method linear --models A B [C ...] [--weights w_A w_B ...] --output OUT
      theta = sum_i w_i * theta_i. Weights default to uniform (1/N); given weights must be finite
      and sum to 1 (a weighted average that does not sum to 1 rescales every tensor), or pass
      --normalize to divide them by their sum. Negative weights need --allow-extrapolation.

  gemma-hf merge --method slerp --base INIT --models A B [C ...] --output OUT
      WARP's SLERP of task vectors delta_m = theta_m - theta_INIT, one angle per tensor, folded
      over the runs: merged_1 = delta_1, merged_m = slerp(merged_{m-1}, delta_m, 1/m);
      theta = theta_INIT + merged_M. Pairs that are zero or within 0.057 degrees of (anti)parallel
      (sin angle < 1e-3) are interpolated linearly instead.

  gemma-hf merge --method liti --base INIT --models M --eta 0.3 --output OUT
      theta = (1 - eta) * theta_INIT + eta * theta_M, eta in [0, 1] (eta > 1 extrapolates and
      needs --allow-extrapolation; negative eta is refused).

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
    merge.add_argument("--method", required=True, choices=("linear", "slerp", "liti"))
    merge.add_argument("--models", required=True, nargs="+", metavar="DIR",
                       help="the models to average (linear, slerp: two or more; liti: exactly one)")
    merge.add_argument("--base", metavar="INIT", help="slerp, liti: the initialisation the task vectors start from")
    merge.add_argument("--weights", nargs="+", type=float, metavar="W",
                       help="linear: one weight per model, summing to 1 (default: uniform)")
    merge.add_argument("--normalize", action="store_true", help="linear: divide the weights by their sum")
    merge.add_argument("--eta", type=float, help="liti: the interpolation coefficient, in [0, 1]")
    merge.add_argument("--allow-extrapolation", action="store_true",
                       help="allow negative linear weights and liti eta > 1")
    merge.add_argument("--output", required=True, metavar="OUT", help="the merged model directory (must not exist)")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace OUT if it is an empty or a model directory (never other files or a run)")
    merge.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                       help="output dtype (default auto: as stored in the inputs, which must then agree)")
    merge.add_argument("--max-shard-size", default=None, metavar="SIZE",
                       help="largest output weight file, e.g. 5GB (default 50GB, as transformers)")
    merge.add_argument("--buffer-size", default=None, metavar="SIZE",
                       help="working memory for tensor data (default 64MiB)")
    merge.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch threads for the arithmetic (default 1: the merge is streaming I/O, and "
                            "on a busy machine more threads are slower; try N on an idle many-core machine)")
    merge.set_defaults(func=merge_command)


def _usage_problem(args: argparse.Namespace) -> str | None:
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
        return None
    if args.weights is not None or args.normalize:
        return f"--weights and --normalize apply to --method linear only (--method {method} has no weights)."
    if args.base is None:
        return f"--method {method} needs --base INIT, the initialisation the models were fine-tuned from."
    if method == "slerp":
        if args.eta is not None:
            return "--eta applies to --method liti only."
        if n < 2:
            return "--method slerp needs two or more --models (SLERP of one task vector is that model)."
        return None
    if n != 1:
        return f"--method liti takes exactly one model (--models M), got {n}."
    if args.eta is None:
        return "--method liti needs --eta, e.g. --eta 0.3."
    return None


def merge_command(args: argparse.Namespace) -> int:
    from ..errors import GemmaHFError, InputError

    problem = _usage_problem(args)
    if problem:
        raise InputError(problem)

    from ..merging import linear_merge, liti, slerp_merge
    from ..merging.engine import DEFAULT_BUFFER_BYTES, DEFAULT_MAX_SHARD_SIZE, DEFAULT_THREADS

    common = dict(
        dtype=args.dtype,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size or DEFAULT_MAX_SHARD_SIZE,
        buffer_bytes=args.buffer_size or DEFAULT_BUFFER_BYTES,
        threads=args.threads or DEFAULT_THREADS,
        progress=_progress if sys.stderr.isatty() else None,
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
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(f"merged {len(args.models) + (args.base is not None)} checkpoints: {result.summary()}")
    return 0


def _progress(done: int, total: int) -> None:
    print(f"\rmerging: {100 * done / max(total, 1):5.1f}% of {total / 1e9:.2f} GB", end="", file=sys.stderr, flush=True)
