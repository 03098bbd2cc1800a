"""A recipe run's directory: replacer's own folder, used by one run at a time, with its bookkeeping files.

A folder becomes a run directory when replacer creates it (or finds it empty) and writes the marker
file into it. Nothing else is ever written into, or deleted from, a folder without that marker: not
with `--restart`, not when `run_dir` points at the user's own project folder or at the folder that
holds the recipe. A lock held for the whole run stops a second run into the same directory; the
operating system releases it when the process ends, however it ends.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from replacer.train.distributed import SINGLE, World
from replacer.errors import RunDirectoryError
from replacer.files import read_or_explain, remove_leftovers, write_text_atomically
from replacer.recipe import LATER, Recipe, RecipeError
from replacer.version import __version__

MARKER = ".replacer-run"
LOCK = ".replacer-lock"
STATE = "state.json"
METRICS = "metrics.jsonl"
RESOLVED_RECIPE = "recipe.yaml"
BOOKKEEPING = frozenset({MARKER, LOCK, STATE, METRICS, RESOLVED_RECIPE})
"""Files that say how a run stands but hold none of its work: a folder of only these has nothing to lose."""


PRUNED_PREFIX = "pruned-"
"""Students pruned to a budget are saved as `students/pruned-<percent>`."""
HOYER = "hoyer"
"""The Hoyer-regularised student the budgets are cut from: `students/hoyer`."""


@dataclass(frozen=True)
class RunLayout:
    """Every path in a run directory, named once: stages, the report and the bookkeeping ask it for theirs."""

    root: Path

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def sparse_teacher(self) -> Path:
        return self.root / "sparse_teacher"

    @property
    def distill(self) -> Path:
        return self.root / "distill"

    @property
    def tune_state(self) -> Path:
        return self.root / "tune" / "state"

    @property
    def prune(self) -> Path:
        return self.root / "prune"

    @property
    def students(self) -> Path:
        return self.root / "students"

    @property
    def distilled(self) -> Path:
        return self.students / "distilled"

    @property
    def tuned(self) -> Path:
        return self.students / "tuned"

    def pruning_outputs(self) -> list[Path]:
        """What the prune stage writes: redone whole when its section changes."""
        return [self.prune, *self.students.glob(f"{PRUNED_PREFIX}*"), self.students / HOYER]

    def outputs_of(self, stage: str) -> list[Path]:
        """What a stage that a changed section redoes leaves behind and must not be found again: the old tuned
        student (or a tuning checkpoint made under other settings), the old budgets' students."""
        return {"tune": [self.tune_state.parent, self.tuned], "prune": self.pruning_outputs()}.get(stage, [])

    @property
    def model(self) -> Path:
        """The final student in replacer's own format (what `replacer.load` reads)."""
        return self.exported("model")

    def exported(self, folder: str) -> Path:
        """Where the export format whose folder is `folder` writes the final student."""
        return self.root / folder

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS



def _is_legacy_run(path: Path) -> bool:
    """A run made before the marker existed: its state.json has replacer's own keys."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "fingerprint" in state and "stages" in state


def _holds_recipe(path: Path, recipe_file: Path | None) -> bool:
    return recipe_file is not None and path.resolve() in recipe_file.resolve().parents


def writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def check_run_dir(path: Path, recipe_file: Path | None) -> None:
    """Refuse, before any work, a `run_dir` that is a file, holds the recipe, or is a folder of the user's."""
    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"run_dir {path} is a file; set run_dir to a folder (a new one, or a run of this recipe)")
    if _holds_recipe(path, recipe_file):
        raise RunDirectoryError(
            f"run_dir {path} holds the recipe {recipe_file}; replacer writes and deletes files in its run directory, "
            "so give it a folder of its own (the default is runs/<name>)"
        )
    if path.is_dir() and not (path / MARKER).is_file():
        entries = sorted(p.name for p in path.iterdir())
        if entries and not _is_legacy_run(path):
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise RunDirectoryError(
                f"run_dir {path} is not a replacer run directory (no {MARKER} file) and holds files ({shown}); "
                "set run_dir to a new or empty folder: replacer never writes into or deletes a folder it did not create"
            )
    if path.is_dir() and not writable(path):
        raise RunDirectoryError(f"run directory {path} is not writable; make it writable, or set run_dir to another folder")


def claim(path: Path, recipe_file: Path | None) -> None:
    """Make sure `path` is (or becomes) a run directory; refuse any folder that holds the user's files."""
    check_run_dir(path, recipe_file)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).is_file():
        write_text_atomically(path / MARKER, json.dumps({"replacer": __version__, "created": time.time()}) + "\n")


class RunLock:
    """An exclusive lock on a run directory for as long as this process holds it open."""

    def __init__(self, path: Path) -> None:
        import fcntl

        self.file = open(path / LOCK, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunDirectoryError(
                f"{path} is in use by another replacer run ({holder}); wait for it to finish or stop it, "
                "or set run_dir to another folder"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            self.file.truncate(0)
            self.file.close()


class RunDir:
    """The run's directory and its bookkeeping files; under torchrun only rank 0 writes state.json."""

    def __init__(self, recipe: Recipe, restart: bool, world: World = SINGLE, recipe_file: Path | None = None) -> None:
        self.path, self.world = recipe.directory, world
        self.layout = RunLayout(self.path)
        self.lock: RunLock | None = None
        if world.is_main:
            claim(self.path, recipe_file)
            self.lock = RunLock(self.path)
            if restart:
                self._wipe()
            remove_leftovers(self.path)
            self._end_metrics_with_newline()
        world.barrier()
        self.state_file = self.path / STATE
        self.state = self._read_state()
        fingerprint = recipe.fingerprint()
        if self.state.get("fingerprint") == recipe.fingerprint_before_retuning():
            self.state["fingerprint"] = fingerprint  # a run made before tune could change: the same run
        if self.state.get("fingerprint", fingerprint) != fingerprint:
            if self._holds_work():
                self.release()
                raise RecipeError(
                    f"{self.path} holds a run of a different recipe (or different --set values); "
                    "pass --restart to start it over, or set run_dir to another folder"
                )
            self.state = {}  # nothing was computed under the old recipe: a corrected recipe starts afresh
            if world.is_main:
                (self.path / METRICS).unlink(missing_ok=True)
        self.state.setdefault("fingerprint", fingerprint)
        self.state.setdefault("stages", {})
        self._redo_changed_sections(recipe.section_fingerprints())
        if world.is_main:
            write_text_atomically(self.path / RESOLVED_RECIPE, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
            self._save()
        world.barrier()

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _wipe(self) -> None:
        """`--restart`: delete everything of this run but the marker and the lock held on it."""
        for entry in self.path.iterdir():
            if entry.name in (MARKER, LOCK):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _end_metrics_with_newline(self) -> None:
        """A kill can cut the log's last line short; the next record then starts on a line of its own."""
        metrics = self.path / METRICS
        if metrics.is_file() and metrics.stat().st_size:
            with open(metrics, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def _read_state(self) -> dict:
        if not self.state_file.is_file():
            return {}
        state = read_or_explain(
            self.state_file, lambda f: json.loads(f.read_text()),
            "delete it to let the run find its finished work again, or run with --restart to start over",
        )
        if not isinstance(state, dict) or not isinstance(state.get("stages", {}), dict):
            raise RunDirectoryError(f"{self.state_file} is damaged (not a run's state); delete it, or run with --restart")
        return state

    def _holds_work(self) -> bool:
        """Whether a stage finished or any file beyond the bookkeeping was written (work a restart would lose)."""
        if self.state.get("stages"):
            return True
        return any(f.is_file() and f.name not in BOOKKEEPING for f in self.path.rglob("*"))

    def _redo_changed_sections(self, sections: dict[str, str]) -> None:
        """Forget the stages from the first changed later section on (their old outputs are replaced)."""
        recorded = self.state.setdefault("sections", {})
        changed = [name for name in LATER if recorded.get(name, sections[name]) != sections[name]]
        if changed:
            for stage in LATER[LATER.index(changed[0]):]:
                self.state["stages"].pop(stage, None)
                if self.world.is_main:
                    for old in self.layout.outputs_of(stage):
                        shutil.rmtree(old, ignore_errors=True)
        self.state["sections"] = sections

    def _save(self) -> None:
        write_text_atomically(self.state_file, json.dumps(self.state, indent=2))

    def done(self, stage: str) -> bool:
        return stage in self.state["stages"]

    def finish(self, stage: str, seconds: float, **info: Any) -> None:
        self.state["stages"][stage] = {"seconds": round(seconds, 1), **info}
        if self.world.is_main:
            self._save()

    def log(self, record: dict) -> None:
        """Append one record; ranks append whole lines, so records from several ranks interleave safely."""
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


STUDENT = "student"
"""What a report calls the run's final student (tuned, else distilled block-wise)."""
UNTRAINED = "untrained"
"""What a report calls the baseline: the same mixers, initialised alike, never trained."""


def budget_name(budget: float) -> str:
    return f"{PRUNED_PREFIX}{budget * 100:g}"


def budget_family(models: list[str]) -> list[str]:
    """The final student and the students pruned from it, in report order; empty when none was pruned."""
    family = [m for m in models if m == STUDENT or m.startswith(PRUNED_PREFIX)]
    return family if len(family) > 1 else []
