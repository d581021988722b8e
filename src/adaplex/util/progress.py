"""Progress of long work as one line per phase: library code says where it is (``report``), and whoever
runs it decides whether and where that shows (``reporting``: the command line prints it on stderr)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_reporter: ContextVar[Callable[[str], None] | None] = ContextVar("adaplex_progress", default=None)


def report(message: str) -> None:
    """Say what the work is doing now; silent unless a ``reporting`` block is active."""
    reporter = _reporter.get()
    if reporter is not None:
        reporter(message)


@contextmanager
def reporting(reporter: Callable[[str], None]) -> Iterator[None]:
    """Inside the block every ``report`` goes to ``reporter``."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)
