"""Subcommands of `gemma-hf`; each module defines register(subparsers) (see gemma_hf/cli.py)."""
