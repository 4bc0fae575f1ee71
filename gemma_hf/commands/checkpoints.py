"""`gemma-hf export`, `gemma-hf push` and `gemma-hf card`: checkpoints in and out, cards, the Hub."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    export = subparsers.add_parser(
        "export",
        help="convert a checkpoint: gemma_hf -> stock transformers, or stock/GGUF -> gemma_hf",
        description=(
            "--to transformers: write a gemma_hf checkpoint SRC as a stock gemma/gemma2/gemma3_text checkpoint "
            "DST that loads in plain transformers without gemma_hf. --to gemma_hf: write a stock checkpoint "
            "directory or a Gemma 2/3 GGUF file SRC as a gemma_hf checkpoint DST. Tensors are checked bit for "
            "bit after writing, and DST appears only when complete."
        ),
    )
    export.add_argument("src", metavar="SRC", help="checkpoint directory, or a .gguf file (with --to gemma_hf)")
    export.add_argument("dst", metavar="DST", help="output directory (must not exist unless --overwrite)")
    export.add_argument("--to", required=True, choices=("transformers", "gemma_hf"), help="target format")
    export.add_argument("--overwrite", action="store_true",
                        help="replace DST if it is an empty or a model directory (never other files or a run)")
    export.add_argument("--max-shard-size", default=None, help="shard the weights, e.g. 2GB (default: transformers')")
    export.add_argument("--gguf-file", default=None, help="with --to gemma_hf: the .gguf file inside SRC")
    export.add_argument(
        "--head", choices=("causal-lm", "sequence-classification"), default="causal-lm",
        help="with --to gemma_hf: the model head to build (default causal-lm)",
    )
    export.set_defaults(func=_export)

    push = subparsers.add_parser(
        "push",
        help="upload a run directory (model, tokenizer, card, recipe, plots) to the Hugging Face Hub",
        description=(
            "Upload RUN_DIR to the Hub repository ORG/NAME with huggingface_hub (create_repo + one "
            "upload_folder commit). Private by default. README.md is rendered first if missing. "
            "checkpoints/ and pickle files are never uploaded. Needs a token (HF_TOKEN or `hf auth login`) "
            "unless --dry-run. --adapter-only uploads a LoRA run's adapter alone (PEFT's adapter_config.json and "
            "adapter_model.safetensors, the tokenizer, the run record and a card naming the base model by Hub id); "
            "the run directory is not changed."
        ),
    )
    push.add_argument("run_dir", metavar="RUN_DIR")
    push.add_argument("--repo-id", required=True, metavar="ORG/NAME")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True,
                            help="create the repository private (the default)")
    visibility.add_argument("--public", dest="private", action="store_false", help="create / push to a public repository")
    push.add_argument("--dry-run", action="store_true", help="list exactly what would be uploaded; no network")
    push.add_argument("--revision", default=None, help="branch to push to (default main)")
    push.add_argument("--commit-message", default=None)
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--adapter-only", action="store_true",
                      help="a LoRA run: upload its adapter (adapter/) instead of the merged model; the base model must "
                           "be on the Hub")
    push.add_argument("--base-model", default=None, metavar="ORG/NAME",
                      help="with --adapter-only: the Hub id of the base, for a run trained from a local copy of it "
                           "(e.g. a base run you pushed first)")
    push.set_defaults(func=_push)

    card = subparsers.add_parser(
        "card",
        help="(re)render RUN_DIR/README.md, the model card, from the run directory",
        description="Render the model card of RUN_DIR from its recipe, run record, metrics, evaluation and plots.",
    )
    card.add_argument("run_dir", metavar="RUN_DIR")
    card.add_argument("--repo-id", default=None, metavar="ORG/NAME", help="the Hub id shown in the usage snippet")
    card.add_argument("--template", default=None, help="a Jinja2 card template (default model_cards/gemma_hf_card.md)")
    card.set_defaults(func=_card)


def _bad_input(err: BaseException):
    from ..errors import InputError

    return InputError(str(err))


def _export(args: argparse.Namespace) -> int:
    """Bad input (a missing or corrupt source, a destination that exists or overlaps the source) is
    an InputError (exit 2); a failure while writing is exit 1 (the CLI's handler)."""
    from .. import convert
    from ..model.safety import CheckpointMismatchError, UnsafeCheckpointError

    try:
        if args.to == "transformers":
            if args.gguf_file or args.head != "causal-lm":
                raise convert.ConversionError("--gguf-file and --head apply to --to gemma_hf only.")
            out = convert.export_to_transformers(args.src, args.dst, overwrite=args.overwrite,
                                                 max_shard_size=args.max_shard_size)
        else:
            out = convert.import_checkpoint(args.src, args.dst, gguf_file=args.gguf_file, head=args.head,
                                            overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    except (CheckpointMismatchError, UnsafeCheckpointError, FileExistsError, FileNotFoundError) as err:
        raise _bad_input(err) from None
    print(f"wrote {out}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from ..hub import CardError, HubError, push_to_hub

    try:
        result = push_to_hub(
            args.run_dir, args.repo_id, private=args.private, dry_run=args.dry_run,
            revision=args.revision, commit_message=args.commit_message, create_pr=args.create_pr,
            adapter_only=args.adapter_only, base_model=args.base_model,
        )
    except CardError as err:  # the run directory: bad input
        raise _bad_input(err) from None
    except HubError as err:  # the Hub or the network: a failure while running
        from ..errors import GemmaHFError

        raise GemmaHFError(str(err)) from None
    if result.card_rendered:
        print(f"rendered {result.plan.run_dir / 'README.md'}")
    if args.dry_run:
        print("dry run: would upload " + result.plan.describe(args.repo_id, args.private))
    else:
        print("uploaded " + result.plan.describe(args.repo_id, args.private))
        print(f"commit: {result.commit_url}")
    return 0


def _card(args: argparse.Namespace) -> int:
    from ..hub import CardError, write_card

    try:
        path = write_card(args.run_dir, repo_id=args.repo_id, template=args.template)
    except CardError as err:
        raise _bad_input(err) from None
    print(f"wrote {path}")
    return 0
