"""Progress: bars on a terminal, plain lines elsewhere, so a log shows work as it happens."""

from __future__ import annotations

import io

from rich.console import Console

from replacer.progress import PlainProgress, RichProgress, for_console


def test_plain_lines_at_start_every_tenth_and_end():
    out = io.StringIO()
    with for_console(Console(file=out, width=200)) as progress:
        assert isinstance(progress, PlainProgress)
        with progress.task("distill: site", 20) as advance:
            for _ in range(20):
                advance()
    lines = out.getvalue().splitlines()
    assert lines[0] == "distill: site: 0/20"
    assert [line.split(",")[0] for line in lines[1:-1]] == [f"distill: site: {n}/20" for n in range(2, 20, 2)]
    assert lines[-1].startswith("distill: site: 20/20 done in ")


def test_a_terminal_gets_bars():
    assert isinstance(for_console(Console(file=io.StringIO(), force_terminal=True)), RichProgress)
