"""Run the `replacer` CLI and SIGKILL the process right after it logs one given training step.

Used by the resume tests: `python -m kill_at_step SITE STEP replacer-args...` (SITE: a distilled site,
or an end-to-end stage such as `tune`). The kill lands at an
exact point (not after a race with a polling parent), so the test is deterministic on any machine.
"""

from __future__ import annotations

import os
import signal
import sys

from replacer.run.layout import RunDir


def main() -> None:
    site, step = sys.argv[1], int(sys.argv[2])
    original = RunDir.log

    def log_then_maybe_die(self: RunDir, record: dict) -> None:
        original(self, record)
        if record.get("site", record.get("stage")) == site and record.get("step") == step:
            os.kill(os.getpid(), signal.SIGKILL)

    RunDir.log = log_then_maybe_die
    sys.argv = ["replacer", *sys.argv[3:]]
    from replacer.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
