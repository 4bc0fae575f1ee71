"""Progress of long steps that are not training (the Trainer shows its own bar): merges, the teacher
cache, evaluation, asset fetches. One helper, so every long step reports the same way:

- stderr is a terminal: a tqdm bar (redrawn in place, removed or kept as tqdm does);
- stderr is not a terminal (a CI log, a pipe, a pipeline stage's log tee): plain lines through the
  ``gemma_hf`` logger ("gemma-hf: merging: 40% (0.41 of 1.02 GB, 3.1 s)"), one when another 10% is
  done and at least :data:`MIN_SECONDS` passed since the last line, one every :data:`EVERY_SECONDS`
  however little moved, and a last one with the total time; never a carriage return;
- the ``gemma_hf`` logger does not print INFO (``gemma-hf -q``, or a library user who configured no
  logging): nothing.

Usage::

    with progress("merging", total=total_bytes, unit="B") as bar:
        ...
        bar.update(n)
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("gemma_hf.progress")
T = TypeVar("T")

STEP = 0.10  # a plain line for each further 10% done ...
MIN_SECONDS = 2.0  # ... but not closer together than this
EVERY_SECONDS = 30.0  # and one at least this often, however little moved (or when the total is unknown)


def _amount(value: float, unit: str) -> str:
    if unit == "B":
        for size, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= size:
                return f"{value / size:.2f} {name}"
        return f"{int(value)} B"
    return f"{int(value):,}"


class Progress:
    """What a long step reports to: ``update(n)`` as work is done, ``set_total`` when learnt late."""

    def __init__(self, description: str, total: float | None, unit: str):
        self.description, self.total, self.unit = description, total, unit
        self.done = 0.0
        self.start = time.monotonic()

    def update(self, n: float = 1) -> None:
        self.done += n

    def set_total(self, total: float | None) -> None:
        self.total = total

    def close(self, finished: bool = True) -> None:
        pass


class _Bar(Progress):
    def __init__(self, description, total, unit, leave):
        super().__init__(description, total, unit)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=description, unit=unit, unit_scale=unit == "B", leave=leave,
                        file=sys.stderr, dynamic_ncols=True)

    def update(self, n=1):
        super().update(n)
        self.bar.update(n)

    def set_total(self, total):
        super().set_total(total)
        self.bar.total = total
        self.bar.refresh()

    def close(self, finished=True):
        self.bar.close()


class _Lines(Progress):
    def __init__(self, description, total, unit):
        super().__init__(description, total, unit)
        self.last_time = self.start
        self.last_fraction = 0.0

    def _line(self, final: bool = False) -> str:
        seconds = time.monotonic() - self.start
        unit = "" if self.unit in ("B", "it") else f" {self.unit}"
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            left = "" if final or fraction <= 0 else f", ~{seconds * (1 - fraction) / fraction:.0f} s left"
            return (f"{self.description}: {fraction:.0%} ({_amount(self.done, self.unit)} of "
                    f"{_amount(self.total, self.unit)}{unit}, {seconds:.1f} s{left})")
        return f"{self.description}: {_amount(self.done, self.unit)}{unit} in {seconds:.1f} s"

    def update(self, n=1):
        super().update(n)
        now = time.monotonic()
        since = now - self.last_time
        fraction = self.done / self.total if self.total else None
        stepped = fraction is not None and fraction - self.last_fraction >= STEP and since >= MIN_SECONDS
        if stepped or since >= EVERY_SECONDS:
            if fraction is not None and fraction >= 1.0:
                return  # the closing line says it
            log.info(self._line())
            self.last_time = now
            if fraction is not None:
                self.last_fraction = fraction

    def close(self, finished=True):
        if finished:  # a step that failed says so through its error, not through a last line
            log.info(self._line(final=True) + (" done" if self.total else ""))


def enabled() -> bool:
    """Whether progress shows at all: the gemma_hf logger prints INFO (not `gemma-hf -q`)."""
    return logging.getLogger("gemma_hf").isEnabledFor(logging.INFO)


@contextlib.contextmanager
def progress(description: str, total: float | None = None, *, unit: str = "it",
             leave: bool = True) -> Iterator[Progress]:
    """A progress report for one long step (module docstring). ``total``: the amount of work (None:
    unknown); ``unit``: what is counted ("B" shows bytes as kB/MB/GB); ``leave``: a terminal bar stays
    on screen when done (False for bars inside a step that prints its own line)."""
    if not enabled():
        reporter: Progress = Progress(description, total, unit)
    elif _is_terminal(sys.stderr):
        reporter = _Bar(description, total, unit, leave)
    else:
        reporter = _Lines(description, total, unit)
    try:
        yield reporter
    except BaseException:
        reporter.close(finished=False)
        raise
    reporter.close()


def tracked(items: Iterable[T], description: str, *, total: float | None = None, unit: str = "it",
            size: Callable[[T], float] | None = None, leave: bool = True) -> Iterator[T]:
    """``items``, reporting progress as each one is done (when the next is asked for): ``size(item)``
    is its amount of work (default 1), ``total`` the sum (default ``len(items)``). A loop that ends early
    or fails prints no closing line."""
    if total is None and hasattr(items, "__len__") and size is None:
        total = len(items)  # type: ignore[arg-type]
    with progress(description, total, unit=unit, leave=leave) as bar:
        for item in items:
            yield item
            bar.update(size(item) if size is not None else 1)


def batch_starts(count: int, batch_size: int, description: str, *, unit: str = "it") -> Iterator[int]:
    """``range(0, count, batch_size)`` with progress counted in items (not batches)."""
    return tracked(range(0, count, batch_size), description, total=count, unit=unit,
                   size=lambda start: min(batch_size, count - start))


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a stream without isatty, or a closed one
        return False


__all__ = ["progress", "tracked", "batch_starts", "Progress", "enabled", "STEP", "MIN_SECONDS", "EVERY_SECONDS"]
