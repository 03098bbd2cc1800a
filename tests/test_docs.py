"""The docs site builds with --strict (broken links, missing pages or API objects fail), and the
recipe reference page is what `replacer recipe-reference` prints today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from replacer.recipe import reference_markdown

ROOT = Path(__file__).parent.parent


def test_docs_build_strictly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "check_mixer" in api and "ScanMixer" in api  # mkdocstrings rendered the code's docstrings
    assert (tmp_path / "site" / "tutorials" / "img" / "quickstart" / "layer_cka.png").is_file()


def test_recipe_reference_page_is_current():
    assert (ROOT / "docs" / "recipes.md").read_text() == reference_markdown() + "\n"
