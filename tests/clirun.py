"""Run the gemma-hf CLI in-process, as tests need it: exit code, stdout, stderr."""

from __future__ import annotations

import io

from gemma_hf import cli


def run_cli(argv, capsys, stdin: str | None = None, monkeypatch=None):
    """`gemma-hf ARGV`; argparse's SystemExit becomes the exit code. `stdin` needs `monkeypatch`."""
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err
