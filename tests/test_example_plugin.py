"""The example plugin distribution in docs/examples installs with pip, is listed, and passes the kit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "replacer-conv"


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    """A copy of the example, so building it leaves the checkout untouched."""
    return Path(shutil.copytree(EXAMPLE, tmp_path_factory.mktemp("example") / "replacer-conv"))


@pytest.fixture(scope="module")
def installed(tmp_path_factory, copy: Path) -> dict[str, str]:
    """pip-installs the example into a private folder; returns an environment that sees it."""
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(copy)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(target.glob("replacer_conv-0.1.0.dist-info/entry_points.txt"))
    return {**os.environ, "PYTHONPATH": str(target)}


def test_example_is_listed_by_replacer_plugins(installed):
    result = subprocess.run(
        [sys.executable, "-m", "replacer", "plugins"], env={**installed, "COLUMNS": "200"}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if " conv " in f" {line} ")
    assert "replacer-conv" in row and "0.1.0" in row and "mixer" in row


def test_example_passes_its_own_tests_and_the_kit(installed, copy: Path):
    shutil.rmtree(copy / "src")  # the tests must use the installed distribution, not the sources
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(copy / "tests")],
        env=installed, capture_output=True, text=True, timeout=600, cwd=copy,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "5 passed" in result.stdout
