"""How long work reports its progress: one small interface, a rich display for terminals and plain
log lines elsewhere (a CI log, nohup or a scheduler's file shows progress as it happens, not only
when a bar finishes).

Stages take any `Progress`; `for_console` picks the implementation that suits where output goes.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, ContextManager, Iterator, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichBars, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Advance(Protocol):
    """Marks one step done; training loops pass the step's loss so the display can show it."""

    def __call__(self, loss: float | None = None) -> None: ...


class Progress(Protocol):
    """Entered once around a run; `task` is entered per unit of work and yields an `Advance`."""

    def __enter__(self) -> "Progress": ...

    def __exit__(self, *exc: object) -> None: ...

    def task(self, description: str, total: int) -> ContextManager[Advance]: ...


class RichProgress:
    """Rich progress bars with elapsed time, ETA and the latest loss, one per unit of work."""

    def __init__(self, console: Console) -> None:
        self.bars = RichBars(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[loss]}"), console=console, transient=False,
        )

    def __enter__(self) -> "RichProgress":
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.__exit__(*exc)

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        task_id = self.bars.add_task(description, total=total, loss="")

        def advance(loss: float | None = None) -> None:
            self.bars.update(task_id, advance=1, **({"loss": f"loss {loss:.4g}"} if loss is not None else {}))

        yield advance
        self.bars.update(task_id, completed=total)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class PlainProgress:
    """Timestamped lines: when a unit of work starts, at every tenth of it or after `every` seconds
    (whichever comes first, so a long stage still shows life and a short one prints at most ten
    lines; never two within `gap` seconds), and when it ends. Each line has step / total, the mean
    loss since the previous line, the rate and the ETA."""

    EVERY, GAP = 30.0, 1.0

    def __init__(self, console: Console, every: float | None = None, gap: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.console, self.clock = console, clock
        self.every = self.EVERY if every is None else every
        self.gap = self.GAP if gap is None else gap

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        start = last = self.clock()
        done = 0
        losses: list[float] = []
        self._line(start, f"{description}  0/{total}")

        def advance(loss: float | None = None) -> None:
            nonlocal done, last
            done += 1
            if loss is not None:
                losses.append(loss)
            now = self.clock()
            tenth = max(1, total // 10)
            if done < total and (done % tenth == 0 and now - last >= self.gap or now - last >= self.every):
                last = now
                rate = done / max(now - start, 1e-9)
                parts = [f"{description}  {done}/{total}"]
                if losses:
                    parts.append(f"loss {sum(losses) / len(losses):.4g}")
                    losses.clear()
                parts += [_rate(rate), f"eta {_duration((total - done) / rate)}"]
                self._line(now, "  ".join(parts))

        yield advance
        now = self.clock()
        self._line(now, f"{description}  {total}/{total}  done in {_duration(now - start)}")

    def _line(self, at: float, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
        self.console.print(f"{stamp}  {text}", markup=False, highlight=False, soft_wrap=True)


def _rate(per_second: float) -> str:
    return f"{per_second:.3g} step/s" if per_second >= 1 else f"{1 / per_second:.3g} s/step"


def for_console(console: Console) -> Progress:
    """Bars on a terminal, plain lines anywhere else (pipes, files, CI)."""
    return RichProgress(console) if console.is_terminal else PlainProgress(console)
