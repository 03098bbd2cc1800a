"""Run the `replacer` CLI and SIGKILL it in the middle of its Nth training-state save.

`python -m kill_in_save N replacer-args...`: the Nth save has written its temporary file but not
renamed it into place when the process dies, the worst moment for a checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys

import replacer.train.state as training_state


def main() -> None:
    target = int(sys.argv[1])
    calls = {"n": 0}
    original = training_state.write_atomically

    def write_then_die(path, write):
        calls["n"] += 1
        if calls["n"] == target:
            write(training_state.temporary_name(path))
            os.kill(os.getpid(), signal.SIGKILL)
        original(path, write)

    training_state.write_atomically = write_then_die
    sys.argv = ["replacer", *sys.argv[2:]]
    from replacer.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
