"""The `gemma-hf` command. Each subcommand lives in a module of gemma_hf.commands that defines
`register(subparsers)`; this file only assembles them, so `--help` works at every level."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, in the order `gemma-hf --help` lists them.
COMMAND_MODULES = (
    "gemma_hf.commands.recipes",  # sft, validate (and later recipes)
    "gemma_hf.commands.chat",  # chat, generate
    "gemma_hf.commands.checkpoints",  # export, push, card
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-hf",
        description="Gemma models and post-training recipes on the Hugging Face stack.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Each subparser sets `func` (args -> exit code) via set_defaults.
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
