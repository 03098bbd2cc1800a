"""The example plugin distributions in docs/examples install with pip, are listed, and pass the kits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"
# distribution -> (what `replacer plugins` lists it as providing, how many tests it has)
PROVIDES = {"replacer-conv": (" conv ", "mixer", 5), "replacer-tinyformer": (" tinyformer ", "adapter", 4)}


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> Path:
    """Copies of the examples, so building them leaves the checkout untouched."""
    folder = tmp_path_factory.mktemp("examples")
    for name in PROVIDES:
        shutil.copytree(EXAMPLES / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def installed(tmp_path_factory, copies: Path) -> dict[str, str]:
    """pip-installs the examples into a private folder; returns an environment that sees them."""
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target),
         *(str(copies / name) for name in PROVIDES)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in PROVIDES:
        assert list(target.glob(f"{name.replace('-', '_')}-0.1.0.dist-info/entry_points.txt"))
    return {**os.environ, "PYTHONPATH": str(target)}


def test_examples_are_listed_by_replacer_plugins(installed):
    result = subprocess.run(
        [sys.executable, "-m", "replacer", "plugins"], env={**installed, "COLUMNS": "200"}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for name, (entry, kind, _) in PROVIDES.items():
        row = next(line for line in result.stdout.splitlines() if entry in f" {line} ")
        assert name in row and "0.1.0" in row and kind in row, row


@pytest.mark.parametrize("name", sorted(PROVIDES))
def test_example_passes_its_own_tests_and_the_kit(installed, copies: Path, name: str):
    copy = copies / name
    shutil.rmtree(copy / "src")  # the tests must use the installed distribution, not the sources
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(copy / "tests")],
        env=installed, capture_output=True, text=True, timeout=600, cwd=copy,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"{PROVIDES[name][2]} passed" in result.stdout
