"""Checking the plugins a recipe names before any work: a misspelt mixer or option fails in the first second.

`replacer validate` and `replacer run` both call `check_components`, so a recipe that validates does
not then fail on its mixer after the teacher has been loaded, analysed or trained.
"""

from __future__ import annotations

import inspect

from replacer.errors import OptionsError
from replacer.plugins import get_registry
from replacer.recipe import Recipe, RecipeError
from replacer.run.selection import needs_analysis


def check_components(recipe: Recipe) -> None:
    """The mixer plugin exists and accepts `mixer.options`; the analyzer, when one will run, exists and takes its options."""
    registry = get_registry()
    try:
        registry.mixer(recipe.mixer.plugin).validate_options(recipe.mixer.options)
    except OptionsError as exc:
        raise RecipeError(f"mixer.options: {exc}") from None
    if needs_analysis(recipe):
        analyzer = registry.analyzer(recipe.analyze.analyzer)
        try:
            inspect.signature(analyzer.run).bind(None, [], [], **recipe.analyze.options)
        except TypeError as exc:
            raise RecipeError(
                f"analyze.options {recipe.analyze.options} do not suit analyzer '{analyzer.name}': {exc}"
            ) from None
        except ValueError:  # no readable signature: the analyzer reports bad options itself when it runs
            pass
