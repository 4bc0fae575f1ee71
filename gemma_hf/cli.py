"""The `gemma-hf` command. Each subcommand lives in a module of gemma_hf.commands that defines
`register(subparsers)`; this file only assembles them, so `--help` works at every level.

One error handler for every subcommand: an error gemma_hf raises on purpose
(gemma_hf.errors.GemmaHFError) prints its message and exits with its code (2 bad input, 1 a
failure while running); `--debug` (or GEMMA_HF_DEBUG=1) also prints the traceback.

One logging setup for every subcommand (:func:`setup_logging`): gemma_hf's own messages (progress of
long steps such as an evaluation's generation and judging, notes, warnings) go to stderr; `-q/--quiet`
keeps warnings and errors only, `-v/--verbose` adds debug messages."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Modules that contribute subcommands, in the order `gemma-hf --help` lists them.
COMMAND_MODULES = (
    "gemma_hf.commands.recipes",  # one per method (sft, reward, ...), validate
    "gemma_hf.commands.pipeline",  # pipeline
    "gemma_hf.commands.chat",  # chat, generate
    "gemma_hf.commands.checkpoints",  # export, push, card
    "gemma_hf.commands.merge",  # merge (linear, slerp, liti)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-hf",
        description="Gemma models and post-training recipes on the Hugging Face stack.",
    )
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error too")
    volume = parser.add_mutually_exclusive_group()
    # Own dests: a subcommand's options of the same name (validate --quiet) must not overwrite them.
    volume.add_argument("-v", "--verbose", dest="log_verbose", action="store_true",
                        help="also print gemma_hf's debug messages")
    volume.add_argument("-q", "--quiet", dest="log_quiet", action="store_true",
                        help="print only gemma_hf's warnings and errors (what a command prints as its result stays)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("GEMMA_HF_DEBUG", "") not in ("", "0")
    setup_logging(logging.DEBUG if args.log_verbose else logging.WARNING if args.log_quiet else logging.INFO)
    if not sys.stderr.isatty():
        plain_progress()
    try:
        # Each subparser sets `func` (args -> exit code) via set_defaults.
        return int(args.func(args) or 0)
    except BaseException as err:  # noqa: BLE001 - the one place errors become messages and exit codes
        if isinstance(err, SystemExit):
            raise
        code, message = describe_error(err)
        if debug:
            import traceback

            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        return code
    finally:
        close_process_group()


class _Stderr(logging.Handler):
    """Writes to the sys.stderr of the moment (a test's capture, a pipeline stage's tee), not the one
    there was when the handler was made."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging must never be what fails a run
            self.handleError(record)


def setup_logging(level: int) -> None:
    """gemma_hf's loggers print at ``level`` and above to stderr, "gemma-hf: message" (warnings with
    their level). Called once per command; calling it again only changes the level. Records still
    propagate to the root logger (pytest's caplog, an application's own handlers)."""
    logger = logging.getLogger("gemma_hf")
    logger.setLevel(level)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(_Format())
        logger.addHandler(handler)


def plain_progress() -> None:
    """Output that is not a terminal (a pipe, CI's log, a pipeline stage's log) gets no carriage-return bars
    from the libraries: gemma_hf.progress prints plain lines for our own long steps, and the Trainer
    prints its logged numbers instead of a bar (recipes.config sets disable_tqdm then). Library behaviour
    relied on: datasets and huggingface_hub read these variables when first imported, transformers takes
    huggingface_hub's setting at import; for a library already imported its switch is called."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "gemma-hf: " if record.levelno < logging.WARNING else f"gemma-hf {record.levelname.lower()}: "
        return prefix + record.getMessage()


def close_process_group() -> None:
    """Under `accelerate launch`: destroy the process group before the interpreter exits.

    Library behaviour relied on (torch 2.13, gloo): a process group left to interpreter shutdown can
    still have gloo worker threads holding tensors whose destruction needs the GIL, and the process
    then aborts (SIGABRT, "terminate called without an active exception") after a run that succeeded;
    seen once in four runs of the two-process WARP test. torch documents destroy_process_group at the
    end of main as the shutdown. A no-op in a single process (no group) or before torch is imported.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    try:
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit: the run's own result is already decided
        pass


def describe_error(err: BaseException) -> tuple[int, str]:
    """(exit code, message) for an error that reached the command line."""
    import errno

    from .errors import GemmaHFError

    if isinstance(err, GemmaHFError):
        return err.exit_code, str(err)
    if isinstance(err, KeyboardInterrupt):
        return 130, ("interrupted. A training run continues from its last complete checkpoint with --resume; "
                     "nothing half-written counts as complete.")
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err):
        where = f" while writing {err.filename}" if getattr(err, "filename", None) else ""
        return 1, (f"no space left on the device{where}. Nothing that was being written counts as complete: free "
                   "space, then rerun (a training run continues from its last complete checkpoint with --resume).")
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return 1, ("out of memory. Lower per_device_train_batch_size or max_length, use gradient_checkpointing, "
                   "LoRA, or a smaller dtype; a training run continues with --resume.")
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return 1, (f"unexpected {type(err).__name__}: {first[:500]}\n(this is a gemma_hf bug or an environment problem "
               "it does not recognise: rerun with `gemma-hf --debug ...` for the traceback, and report it)")


if __name__ == "__main__":
    sys.exit(main())
