"""How long work reports its progress: one small interface, a rich display for terminals and plain
log lines elsewhere (a CI log or a file shows progress as it happens, not only when a bar finishes).

Stages take any `Progress`; `for_console` picks the implementation that suits where output goes.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, ContextManager, Iterator, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichBars, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Advance = Callable[[], None]


class Progress(Protocol):
    """Entered once around a run; `task` is entered per unit of work and yields a callable that marks one step done."""

    def __enter__(self) -> "Progress": ...

    def __exit__(self, *exc: object) -> None: ...

    def task(self, description: str, total: int) -> ContextManager[Advance]: ...


class RichProgress:
    """Rich progress bars with elapsed time and ETA, one per unit of work."""

    def __init__(self, console: Console) -> None:
        self.bars = RichBars(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False,
        )

    def __enter__(self) -> "RichProgress":
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.__exit__(*exc)

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        task_id = self.bars.add_task(description, total=total)
        yield lambda: self.bars.advance(task_id)
        self.bars.update(task_id, completed=total)


class PlainProgress:
    """A line when a unit of work starts, about every tenth of it (at most every `every` seconds), and when it ends."""

    def __init__(self, console: Console, every: float = 30.0) -> None:
        self.console, self.every = console, every

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        start = last = time.monotonic()
        done = 0
        self._line(f"{description}: 0/{total}")

        def advance() -> None:
            nonlocal done, last
            done += 1
            now = time.monotonic()
            tenth = max(1, total // 10)
            if done < total and (done % tenth == 0 or now - last >= self.every):
                last = now
                eta = (now - start) / done * (total - done)
                self._line(f"{description}: {done}/{total}, {now - start:.0f} s, eta {eta:.0f} s")

        yield advance
        self._line(f"{description}: {total}/{total} done in {time.monotonic() - start:.0f} s")

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)


def for_console(console: Console) -> Progress:
    """Bars on a terminal, plain lines anywhere else (pipes, files, CI)."""
    return RichProgress(console) if console.is_terminal else PlainProgress(console)
