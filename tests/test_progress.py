"""Progress: bars on a terminal, timestamped plain lines elsewhere, so a log shows work as it happens."""

from __future__ import annotations

import io
import re

from rich.console import Console
from typer.testing import CliRunner

from replacer.progress import PlainProgress, RichProgress, for_console

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  "


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_at_start_every_tenth_and_end_with_loss_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    with PlainProgress(Console(file=out, width=80), clock=clock) as progress:
        with progress.task("distill: site", 20) as advance:
            for step in range(20):
                clock.now += 0.5
                advance(float(step))
    lines = out.getvalue().splitlines()
    assert all(re.match(STAMP, line) for line in lines), lines
    bodies = [line[21:] for line in lines]
    assert bodies[0] == "distill: site  0/20"
    assert [b.split("  ")[1] for b in bodies[1:-1]] == [f"{n}/20" for n in range(2, 20, 2)]
    # the mean loss since the previous line, the rate over the whole task, the time left at that rate
    assert bodies[1] == "distill: site  2/20  loss 0.5  2 step/s  eta 9s"
    assert bodies[2] == "distill: site  4/20  loss 2.5  2 step/s  eta 8s"
    assert bodies[-1] == "distill: site  20/20  done in 10s"


def test_plain_lines_after_every_seconds_on_slow_work_without_loss():
    out, clock = io.StringIO(), Clock()
    with PlainProgress(Console(file=out, width=200), every=30, clock=clock) as progress:
        with progress.task("capture", 1000) as advance:
            for _ in range(3):
                clock.now += 40
                advance()
    bodies = [line[21:] for line in out.getvalue().splitlines()]
    assert bodies[1:4] == ["capture  1/1000  40 s/step  eta 11h06m", "capture  2/1000  40 s/step  eta 11h05m",
                           "capture  3/1000  40 s/step  eta 11h04m"]


def test_a_tenth_right_after_a_timed_line_is_not_printed_again():
    out, clock = io.StringIO(), Clock()
    with PlainProgress(Console(file=out, width=200), every=30, clock=clock) as progress:
        with progress.task("capture", 100) as advance:
            for step in range(1, 21):
                clock.now += 3.4 if step <= 9 else 0.15  # 30.6 s to step 9 (a timed line), the tenth at step 10 right after
                advance()
    bodies = [line[21:].split("  ")[1] for line in out.getvalue().splitlines()]
    assert bodies == ["0/100", "9/100", "20/100", "100/100"]
    fast = io.StringIO()
    with PlainProgress(Console(file=fast, width=200), clock=Clock()) as progress:  # no time passes: start and end only
        with progress.task("instant", 50) as advance:
            for _ in range(50):
                advance()
    assert [line[21:].split("  ")[1] for line in fast.getvalue().splitlines()] == ["0/50", "50/50"]


def test_a_terminal_gets_bars_that_take_a_loss():
    out = io.StringIO()
    progress = for_console(Console(file=out, force_terminal=True, width=200))
    assert isinstance(progress, RichProgress)
    with progress, progress.task("tune", 3) as advance:
        for _ in range(3):
            advance(0.25)
    assert "loss 0.25" in out.getvalue()


def test_a_run_outside_a_terminal_logs_timestamped_progress_lines(tmp_path, monkeypatch):
    from helpers import tiny_text_recipe

    from replacer.cli import app

    monkeypatch.setattr(PlainProgress, "GAP", 0.0)  # every tenth prints, however fast this machine runs the steps
    result = CliRunner().invoke(app, ["run", str(tiny_text_recipe(tmp_path, distill_steps=10, tune_steps=10))])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    distill = [line for line in lines if re.match(STAMP + r"distill: \S+  \d+/10  loss \S+  .*eta", line)]
    tune = [line for line in lines if re.match(STAMP + r"tune: end-to-end  \d+/10  loss ", line)]
    assert distill and tune, result.output
    assert any(re.match(STAMP + r"tune: end-to-end  10/10  done in ", line) for line in lines)
