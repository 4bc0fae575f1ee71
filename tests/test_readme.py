"""Every ```python block of README.md runs as written, in a fresh temporary working directory.

A README edit that breaks an example (a renamed function, an override a preset rejects, a path
that only exists on someone's machine) fails here. Blocks run in this process, each with its own
globals, so the test costs what the examples cost (seconds), not a Python start-up per block.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
PYTHON_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in PYTHON_BLOCK.finditer(text)]


BLOCKS = python_blocks()


def test_readme_has_python_examples():
    assert BLOCKS, "README.md has no ```python block; update this test if that is intended"


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs_as_written(tmp_path, monkeypatch, line, code):
    monkeypatch.chdir(tmp_path)  # files the example writes land here
    # Line numbers in a traceback point into README.md.
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), {"__name__": "__readme__"})
