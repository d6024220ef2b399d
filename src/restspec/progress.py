"""What long work shows while it runs: a spinner or a bar on a terminal, one line per phase elsewhere.

:class:`Progress` is what the engine reports to (:meth:`Progress.phase` for work of unknown length,
:meth:`Progress.steps` for counted work); :class:`ConsoleProgress` draws it on stderr with rich, and
:class:`SilentProgress` shows nothing. When stderr is not a terminal (a log file, CI, a pipe), a
spinner would print nothing useful, so each phase prints one line when it starts and one with its
duration when it ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from rich.console import Console


class Progress(Protocol):
    """Where the engine reports its phases."""

    def phase(self, text: str) -> AbstractContextManager[None]:
        """Work of unknown length described by ``text``."""

    def steps(self, text: str, total: int) -> AbstractContextManager[Callable[[int], None]]:
        """``total`` units of work; the yielded callback takes the number done so far."""


class SilentProgress:
    """Shows nothing."""

    @contextmanager
    def phase(self, text: str) -> Iterator[None]:
        yield

    @contextmanager
    def steps(self, text: str, total: int) -> Iterator[Callable[[int], None]]:
        yield lambda done: None


class ConsoleProgress:
    """Spinners and bars on a terminal; otherwise a line when a phase starts and one when it ends."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False)

    @contextmanager
    def phase(self, text: str) -> Iterator[None]:
        if self.console.is_terminal:
            with self.console.status(f"{text}…", spinner="dots"):
                yield
            return
        with self._lines(text):
            yield

    @contextmanager
    def steps(self, text: str, total: int) -> Iterator[Callable[[int], None]]:
        if not self.console.is_terminal:
            with self._lines(f"{text} ({total})"):
                yield lambda done: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        columns = (TextColumn(text), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Bar(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(text, total=total)
            yield lambda done: bar.update(task, completed=done)

    @contextmanager
    def _lines(self, text: str) -> Iterator[None]:
        self.console.print(f"restspec: {text}…", soft_wrap=True, markup=False)
        start = time.perf_counter()
        yield
        self.console.print(
            f"restspec: {text}: done in {time.perf_counter() - start:.1f} s", soft_wrap=True, markup=False
        )


def progress_from(progress: bool | Progress) -> Progress:
    """``True`` -> :class:`ConsoleProgress` on stderr, ``False`` -> :class:`SilentProgress`, else as given."""
    if progress is True:
        return ConsoleProgress()
    if progress is False:
        return SilentProgress()
    return progress
