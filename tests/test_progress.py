"""gemma_hf.progress: a tqdm bar on a terminal, plain lines elsewhere (no carriage return), nothing
when quiet; a failed step prints no closing line."""

from __future__ import annotations

import io
import logging

import pytest

from gemma_hf import progress as progress_module
from gemma_hf.cli import setup_logging
from gemma_hf.progress import batch_starts, progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def stderr(monkeypatch):
    def use(stream):
        monkeypatch.setattr("sys.stderr", stream)
        return stream
    yield use
    setup_logging(logging.INFO)


def test_plain_lines_in_a_pipe_at_a_modest_rate(stderr, monkeypatch):
    out = stderr(io.StringIO())
    setup_logging(logging.INFO)
    monkeypatch.setattr(progress_module, "MIN_SECONDS", 0.0)
    with progress("merging", total=100, unit="B") as bar:
        for _ in range(100):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # one line per further 10% (the last one is the closing line), never one per update
    assert len(lines) == 10, lines
    assert lines[0].startswith("gemma-hf: merging: 10% (10 B of 100 B")
    assert lines[-1].startswith("gemma-hf: merging: 100% (100 B of 100 B") and lines[-1].endswith("done")


def test_lines_are_rate_limited_in_time(stderr):
    out = stderr(io.StringIO())
    setup_logging(logging.INFO)
    assert list(batch_starts(10, 3, "generating", unit="prompts")) == [0, 3, 6, 9]
    # a fast step: only its closing line, counted in prompts, not batches
    assert out.getvalue().splitlines() == [
        line for line in out.getvalue().splitlines() if line.startswith("gemma-hf: generating: 100% (10 of 10 prompts")]
    assert len(out.getvalue().splitlines()) == 1


def test_quiet_shows_nothing_and_a_failure_no_closing_line(stderr):
    out = stderr(io.StringIO())
    setup_logging(logging.WARNING)
    with progress("merging", total=3) as bar:
        bar.update(3)
    assert out.getvalue() == ""
    setup_logging(logging.INFO)
    with pytest.raises(RuntimeError):
        with progress("merging", total=3) as bar:
            bar.update(1)
            raise RuntimeError("disk full")
    assert out.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar(stderr):
    out = stderr(_Terminal())
    setup_logging(logging.INFO)
    with progress("merging", total=4, unit="B") as bar:
        for _ in range(4):
            bar.update(1)
    text = out.getvalue()
    assert "\r" in text and "merging: 100%" in text and "gemma-hf:" not in text
