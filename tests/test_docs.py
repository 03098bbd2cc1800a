"""The docs site builds with --strict (broken links or missing pages fail), the API page is what the
code's docstrings render to today, and the recipe reference page is what `replacer recipe-reference`
prints today."""

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
    assert "check_adapter" in api and "ScanMixer" in api and ":::" not in api
    assert (tmp_path / "site" / "tutorials" / "img" / "quickstart" / "layer_cka.png").is_file()


def test_recipe_reference_page_is_current():
    assert (ROOT / "docs" / "recipes.md").read_text() == reference_markdown() + "\n"


def test_api_page_is_rendered_from_the_docstrings():
    sys.path.insert(0, str(ROOT / "docs"))
    from api_reference import render

    assert (ROOT / "docs" / "api.md").read_text() == render(), "re-render it: .venv/bin/python docs/api_reference.py --write"
