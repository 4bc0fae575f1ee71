"""Run the gemma-hf CLI in the test process: the same argv parsing and exit codes as the console
script, without a new interpreter importing torch, transformers and TRL again (tests/README.md).

Use a real subprocess (tests/faults.py) only where the process is the point: kill -9, locks held by
another process, signals, ``accelerate launch``, loading without gemma_hf importable.
"""

from __future__ import annotations

import contextlib
import io
import subprocess

import torch

from gemma_hf import cli as gemma_cli


def cli(argv) -> int:
    """`gemma-hf ARGV` in this process; its exit code (argparse's SystemExit included)."""
    try:
        return gemma_cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code
    finally:
        # A recipe's full_determinism switches torch's deterministic algorithms on process-wide.
        torch.use_deterministic_algorithms(False)


def run_cli(argv, capsys, stdin: str | None = None, monkeypatch=None):
    """`gemma-hf ARGV`: exit code, stdout, stderr (captured by pytest's capsys). `stdin` needs `monkeypatch`."""
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cli(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_captured(argv) -> subprocess.CompletedProcess:
    """`gemma-hf ARGV` in this process, its output captured here and returned the way `subprocess.run`
    returns it: for module-scoped fixtures (capsys is function-scoped) and tests that swap a subprocess
    for an in-process run."""
    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
