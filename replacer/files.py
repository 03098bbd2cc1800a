"""Writing files so that a kill never leaves half of one, and reading them back so damage is one line.

Every file replacer writes into a run directory or a checkpoint goes through `write_atomically`: the
bytes go to a temporary file beside the target, are flushed to disk, and replace the target in one
rename, so a reader sees the old file or the new one, never a mixture. Every reader goes through
`read_or_explain`, which turns whatever a damaged file raises into a `DamagedFileError` that names
the file and what to do about it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

from replacer.errors import DamagedFileError, summary

T = TypeVar("T")
TEMP_SUFFIX = ".partial-write"


def temporary_name(path: Path) -> Path:
    """Where `path` is written before it is renamed into place (suffix appended: names may hold dots)."""
    return path.with_name(f"{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` and move `tmp` over `path` in one rename, after flushing it to disk."""
    tmp = temporary_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def remove_leftovers(folder: Path) -> None:
    """Delete temporary files that a killed writer left in `folder` (never a finished file)."""
    if folder.is_dir():
        for leftover in folder.glob(f"*{TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)


def read_or_explain(path: Path, read: Callable[[Path], T], fix: str) -> T:
    """`read(path)`, with any failure but a missing or unreadable-by-permission file reported as damage.

    `fix` says what to do (delete the file, or `--restart` to redo its stage); it ends the message.
    """
    try:
        return read(path)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises is the same problem
        raise DamagedFileError(f"{path} is damaged ({summary(exc)}); {fix}") from None
