"""The `replacer` command line: scan models, list plugins, replace and save."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from replacer.defaults import DEFAULT_MIXER
from replacer.errors import ReplacerError, summary

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
# Tables stay readable when piped: a non-terminal gets a wide console instead of 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


@app.callback()
def _set_up_process() -> None:
    """Engine notes (e.g. which scan kernel a mixer runs) go to stderr, one line each; the allocator
    keeps freed blocks for the next training step (`replacer.train.allocator`)."""
    import logging

    from rich.logging import RichHandler

    from replacer.train.allocator import keep_freed_memory

    logger = logging.getLogger("replacer")
    if not logger.handlers:
        logger.addHandler(RichHandler(console=errors, show_time=False, show_path=False))
        logger.setLevel(logging.INFO)
    keep_freed_memory()


def _fail(message: object, code: int = 2) -> NoReturn:
    errors.print(f"[bold red]error:[/bold red] {escape(str(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def _os_problem(exc: OSError) -> str:
    """A failed read or write as one line: which file, what the system said, and what to do."""
    where = f" {exc.filename}" if exc.filename else ""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        fix = "free some disk space, then run the same command again (finished work is kept)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make it writable (or readable), or point the command at another folder"
    else:
        fix = "check the path and run the same command again"
    return f"cannot use{where}: {reason}; {fix}"


def one_line_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Every failure of a command is one line on stderr: exit 2 for the user's input and the machine's
    files, 1 for anything unforeseen (with REPLACER_TRACEBACK=1 to see where it came from)."""

    @functools.wraps(command)
    def guarded(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except ReplacerError as exc:
            _fail(exc)
        except OSError as exc:
            _fail(_os_problem(exc))
        except Exception as exc:  # noqa: BLE001 - a bug still gets one readable line
            if os.environ.get("REPLACER_TRACEBACK") == "1":
                raise
            _fail(f"unexpected {type(exc).__name__}: {summary(exc)} (set REPLACER_TRACEBACK=1 to see where; please report it)", 1)

    return guarded


@app.command()
@one_line_errors
def scan(
    model: str = typer.Argument(..., help="timm name, local HF model dir, hf:ID, minilm, smollm2 or module:callable"),
    pretrained: bool = typer.Option(False, help="load pretrained weights (structure alone is enough to scan)"),
) -> None:
    """Show every attention site of MODEL and how it will be handled."""
    from replacer.graph.scan import scan as scan_model
    from replacer.models import load_model

    console.print(scan_model(load_model(model, pretrained=pretrained)))


@app.command()
@one_line_errors
def plugins() -> None:
    """List installed plugins, the distribution each comes from, and what it provides."""
    from replacer import fused
    from replacer.plugins import get_registry

    table = Table(title="replacer plugins (entry-point group 'replacer')")
    for col in ("plugin", "distribution", "version", "provides", "status"):
        table.add_column(col, overflow="fold")
    for p in get_registry().plugins:
        if p.error:
            status = f"[red]failed: {p.error}[/red]"
        elif p.problems:
            status = "[yellow]" + "\n".join(escape(problem) for problem in p.problems) + "[/yellow]"
        else:
            status = "[green]ok[/green]"
        table.add_row(p.name, p.distribution, p.version, "\n".join(p.provides), status)
    console.print(table)
    console.print(
        f"recurrent mixers with a fused kernel (lstm, gru) run on the CPU as: {fused.describe('cpu')}, on CUDA as: "
        f"{fused.describe('cuda')}; "
        "other cells run the reference loop (choose with REPLACER_RECURRENCE=auto|fused|reference)",
        highlight=False,
    )


def _parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ReplacerError(f"--option {text!r} is not KEY=VALUE (e.g. --option hidden_per_head=32)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


@app.command()
@one_line_errors
def replace(
    model: str = typer.Argument(..., help="model source, as for `replacer scan`"),
    out: Path = typer.Option(..., "--out", "-o", help="directory to save the replaced model into"),
    plugin: str = typer.Option(DEFAULT_MIXER, help="mixer plugin (see `replacer plugins`)"),
    site: Optional[list[str]] = typer.Option(None, "--site", help="site index, name or glob; repeatable (default: all)"),
    option: Optional[list[str]] = typer.Option(None, "--option", help="plugin option KEY=VALUE; repeatable"),
    pretrained: bool = typer.Option(True, help="start from pretrained weights"),
) -> None:
    """Replace the attention of MODEL with mixers from a plugin and save the result (untrained mixers)."""
    import replacer
    from replacer.checkpoint import check_destination

    selectors = [int(s) if s.isdigit() else s for s in site] if site else None
    options = dict(_parse_option(o) for o in option or [])
    replacer.get_registry().mixer(plugin).validate_options(options)
    check_destination(out)
    teacher = replacer.load_model(model, pretrained=pretrained)
    student = replacer.replace(teacher, plugin=plugin, sites=selectors, options=options)
    saved = replacer.save(student, out)
    replaced = sum(len(r["sites"]) for r in student.replacer_record["replacements"])
    before, after = replacer.count_parameters(teacher), replacer.count_parameters(student)
    console.print(
        f"replaced {replaced} attention sites with '{plugin}' mixers; parameters {before:,} -> {after:,} "
        f"({after / before:.2f}x); saved to {saved}"
    )


@app.command()
@one_line_errors
def validate(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override KEY.PATH=VALUE; repeatable"),
) -> None:
    """Check a recipe (and overrides) without running it: its fields, the plugins and options it names, the
    model (loaded, not trained), the data sources and the sites it selects."""
    from replacer.run.components import check_components
    from replacer.run.inputs import preflight
    from replacer.recipe import load_recipe
    from replacer.run.layout import check_run_dir

    loaded = load_recipe(recipe, set_)
    check_components(loaded)
    check_run_dir(loaded.directory, recipe)
    preflight(loaded)
    console.print(f"{recipe}: valid recipe '{loaded.name}' (run dir {loaded.directory})")


@app.command()
@one_line_errors
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override KEY.PATH=VALUE; repeatable"),
    restart: bool = typer.Option(False, help="discard the run directory's work and start over (only a replacer run directory)"),
) -> None:
    """Run a recipe: distill, tune, evaluate, export. Run it again to resume after an interruption.

    Under `torchrun --nproc-per-node N -m replacer run RECIPE` the N processes share the work.
    """
    from replacer.train.distributed import world_from_environment
    from replacer.recipe import load_recipe
    from replacer.run.runner import run_recipe

    loaded = load_recipe(recipe, set_)
    try:
        with world_from_environment() as world:
            report = run_recipe(loaded, restart=restart, console=console, world=world, recipe_file=recipe)
    except KeyboardInterrupt:
        errors.print("interrupted: run the same command again to resume from the last checkpoint")
        raise typer.Exit(code=130)
    if report is None:  # a torchrun rank other than 0: rank 0 reports
        return
    from replacer.run.layout import RunLayout

    layout = RunLayout(loaded.directory)
    console.print(layout.report_md.read_text(), markup=False, highlight=False)
    console.print(f"report: {layout.report_md} (all figures in {layout.report_json})")


@app.command()
@one_line_errors
def analyze(
    target: str = typer.Argument(..., help="a recipe YAML, or a text model source (minilm, smollm2, hf:ID, a folder)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override KEY.PATH=VALUE; repeatable"),
    out: Optional[Path] = typer.Option(None, help="where attention.json and the heatmap go (default: RUN_DIR/analysis)"),
) -> None:
    """Analyse a teacher's attention per layer and head: a table here, JSON and a heatmap PNG on disk.

    A model source is analysed on offline English text (docstrings of installed modules).
    """
    from replacer.run.teacher_attention import RESULT, layer_table
    from replacer.recipe import load_recipe, recipe_for_model
    from replacer.run.runner import analyze_recipe

    path = Path(target)
    loaded = load_recipe(path, set_) if path.suffix in (".yaml", ".yml") else recipe_for_model(target, set_)
    folder = out or loaded.directory / "analysis"
    statistics = analyze_recipe(loaded, folder, console)
    console.print(layer_table(statistics))
    console.print(f"per head: {folder / RESULT}; heatmap: {folder / 'teacher_attention.png'}")


@app.command()
@one_line_errors
def export(
    source: Path = typer.Argument(..., help="a run directory, or a model saved by replacer (then give --teacher)"),
    format_: str = typer.Option(..., "--format", "-f", help="export format (see `replacer plugins`), e.g. sentence-transformers"),
    out: Path = typer.Option(..., "--out", "-o", help="new or empty folder to write into"),
    teacher: Optional[str] = typer.Option(None, help="the teacher's source (tokenizer, pooling): read from the run's recipe when SOURCE is a run"),
    max_length: int = typer.Option(256, help="longest input in tokens, where neither the run nor the teacher says"),
    trust_remote_code: bool = typer.Option(False, help="let a model whose origin is a module:callable run that code to rebuild it"),
) -> None:
    """Write a converted model in another format (a folder `SentenceTransformer(OUT, trust_remote_code=True)` loads, ...)."""
    import replacer
    from replacer.exporting import export_formats, export_into
    from replacer.run.saved_source import SavedSource

    found = SavedSource.open(source, teacher, "--teacher SOURCE (its tokenizer and pooling)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReplacerError(f"{out} already exists and is not an empty folder; export into a new one")
    model = replacer.load(found.student_folder, trust_remote_code=trust_remote_code)
    context = found.context(model, max_length)
    (exporter,) = export_formats([format_], context)
    written = export_into(exporter, model, out, context)
    console.print(f"exported {source} as {exporter.name} to {written}")


@app.command()
@one_line_errors
def evaluate(
    source: Path = typer.Argument(..., help="a run directory, or a model saved by replacer (then give --teacher and --text)"),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="lm-evaluation-harness tasks, comma-separated (replacer_heldout: the held-out text)"),
    with_: Optional[str] = typer.Option(None, "--with", help="another ecosystem evaluation by name (see `replacer plugins`)"),
    option: Optional[list[str]] = typer.Option(None, "--option", help="evaluation option KEY=VALUE; repeatable"),
    teacher: Optional[str] = typer.Option(None, help="the teacher's source, for a saved model"),
    text: Optional[str] = typer.Option(None, help="held-out text source (fortunes, bible, file:PATH, ...): default the run's eval data"),
    limit: Optional[int] = typer.Option(None, min=1, help="at most this many held-out texts"),
    max_length: int = typer.Option(256, help="longest window in tokens, for a saved model"),
) -> None:
    """Measure a student beside its teacher with an ecosystem's own tools; for a run, the figures join its report."""
    from replacer.run.evaluate_saved import evaluate_saved

    if (lm_eval is None) == (with_ is None):
        raise ReplacerError("give one of --lm-eval TASKS or --with EVALUATION")
    options = dict(_parse_option(o) for o in option or [])
    if lm_eval is not None:
        options["tasks"] = lm_eval
    name = "lm-eval" if lm_eval is not None else with_
    figures = evaluate_saved(source, name, options, teacher=teacher, text=text, limit=limit, max_length=max_length)
    table = Table(title=f"{name}: {source}")
    models = list(figures)
    table.add_column("metric")
    for model in models:
        table.add_column(model, justify="right")
    for metric in next(iter(figures.values()), {}):
        table.add_row(metric, *(f"{figures[m][metric]:.4g}" for m in models))
    console.print(table)


@app.command("recipe-reference")
@one_line_errors
def recipe_reference() -> None:
    """Print the recipe reference (markdown) generated from the recipe models."""
    from replacer.recipe import reference_markdown

    print(reference_markdown())


def main() -> None:  # pragma: no cover - console entry for `python -m replacer`
    sys.exit(app())
