"""English text that exists offline, for calibrating, distilling and evaluating language models.

Every source returns a deduplicated, sorted-then-shuffled list, so the same `seed` always gives the
same texts in the same order, and `limit` always takes a prefix of that order. With `passage_chars`,
each source first joins the consecutive texts of one document (a file, a block of verses) into
passages of about that many characters, for calibrating on long contexts.
"""

from __future__ import annotations

import ast
import difflib
import functools
import gc
import glob
import json
import multiprocessing
import os
import random
import re
import site
import sys
import struct
import sysconfig
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from replacer.errors import DataError, summary

WORDNET_ROOT = "/usr/share/wordnet"
FORTUNES_ROOT = "/usr/share/games/fortunes"
BIBLE_ROOT = "/usr/share/sword/modules/texts/ztext/engWEB2015eb"
MIN_CHARS, MAX_CHARS = 30, 300
MIN_LETTER_FRACTION = 0.75
CANDIDATES_PER_TEXT = 4
SENTENCE_CHARS = 80  # a typical sentence, for sizing the docstring scan when sentences are joined into passages
MAX_SCAN_WORKERS = 8

# Directories whose docstrings are test scaffolding, vendored copies or editor code, not prose.
_SKIP_DIRS = frozenset(
    {"test", "tests", "testing", "idlelib", "lib2to3", "site-packages", "__pycache__", "_vendor", "vendor", "_vendored"}
)
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
WORDNET_PARTS = ("noun", "verb", "adj", "adv")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")
# A paragraph holding any of these lines is a parameter table, list, section header or code block.
_MARKUP_LINE = re.compile(
    r"^(?:\s+\S"  # indented: code, or the body of a section
    r"|\s*[-=~^*+#]{3,}\s*$"  # rst/numpydoc underline
    r"|\s*[-*+]\s"  # bullet
    r"|\s*[:@]\w+"  # :param x: / @param
    r"|\s*\w[\w, *]*\s:\s"  # numpydoc "name : type"
    r"|\s*\w+\s*\([^)]*\)\s*:"  # google "name (type): desc"
    r"|\s*\w[\w ]*:\s*$)"  # section header "Args:"
)
_CODE_MARKS = (">>>", "::", " : ", "`", "_", "|", "{", "}", "[", "<", ">", "$", "*", "\\", "=", "http")

SOURCE_FORMS = (
    "docstrings, wordnet, fortunes, bible, file:PATH (one text per line), prose:GLOB (sentences of plain-text files), "
    "jsonl:PATH (field=NAME), hf:NAME (split=SPLIT, field=NAME)"
)


def is_prose(text: str) -> bool:
    """Whether `text` reads like an English sentence rather than code, markup or a table row."""
    if not MIN_CHARS <= len(text) <= MAX_CHARS or not text[0].isupper() or text[-1] not in ".?!":
        return False
    if any(mark in text for mark in _CODE_MARKS):
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    return letters >= MIN_LETTER_FRACTION * len(text)


def split_sentences(text: str) -> list[str]:
    """Collapse whitespace and cut after `.`, `?` or `!` followed by a capital letter."""
    return [part for part in _SENTENCE_END.split(" ".join(text.split())) if part]


def docstring_sentences(limit: int | None = None, seed: int = 0, passage_chars: int | None = None) -> list[str]:
    """Prose sentences from the docstrings of the stdlib and installed packages.

    Sources are parsed with `ast`, never imported, so scanning runs no third-party code. Files are
    visited in sorted order; with a `limit` the scan stops once it holds several times that many
    candidates, which keeps small requests fast.
    """
    check_limit(limit)
    per_text = max(1, (passage_chars or 0) // SENTENCE_CHARS)
    wanted = None if limit is None else CANDIDATES_PER_TEXT * limit * per_text
    files: list[list[str]] = []
    held = 0
    with _parallel_map() as mapper:
        for sentences in mapper(_file_prose, _python_files(_docstring_roots())):
            files.append(sentences)
            held += len(sentences)
            if wanted is not None and held >= wanted:
                break
    return _sample(
        files, limit, seed, "no prose docstrings found in the installed Python sources; use another text source", passage_chars
    )


@contextmanager
def _parallel_map() -> Iterator[Callable[..., Iterator[list[str]]]]:
    """A lazy `map` that yields in input order, spread over forked workers where forking is safe (Linux).

    Parsing is CPU-bound and dominates the scan, so workers divide the full scan by the core count;
    in-order results keep the output deterministic. Elsewhere, or on one core, the builtin `map`.
    """
    workers = min(MAX_SCAN_WORKERS, len(os.sched_getaffinity(0))) if sys.platform == "linux" else 1
    if workers < 2:
        with _gc_paused():
            yield map
        return
    with multiprocessing.get_context("fork").Pool(workers, initializer=gc.disable) as pool:
        yield functools.partial(pool.imap, chunksize=8)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic collector: syntax trees are acyclic, yet building them triggers full collections
    that double the scan time. Reference counting still frees each tree."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _docstring_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    candidates = [paths["stdlib"], *site.getsitepackages(), paths["purelib"], paths["platlib"]]
    return list(dict.fromkeys(Path(p) for p in candidates if os.path.isdir(p)))


def _python_files(roots: list[Path]) -> Iterator[Path]:
    """Every `.py` file under `roots`, in a fixed order, skipping test and vendored trees."""
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
            yield from (Path(folder, name) for name in sorted(files) if name.endswith(".py"))


def _file_docstrings(path: Path) -> Iterator[str]:
    """Docstrings of a module and the classes and functions nested in it; nothing if unparsable."""
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError, RecursionError):
        return
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        doc = ast.get_docstring(node)
        if doc:
            yield doc
        pending.extend(child for child in node.body if isinstance(child, _DOC_NODES))


def _file_prose(path: Path) -> list[str]:
    return [sentence for doc in _file_docstrings(path) for sentence in _docstring_prose(doc)]


def _docstring_prose(doc: str) -> Iterator[str]:
    for paragraph in re.split(r"\n\s*\n", doc):
        if not any(_MARKUP_LINE.match(line) for line in paragraph.splitlines()):
            yield from filter(is_prose, split_sentences(paragraph))


def wordnet_sentences(
    root: str | Path = WORDNET_ROOT, limit: int | None = None, seed: int = 0, parts: Sequence[str] | None = None,
    passage_chars: int | None = None,
) -> list[str]:
    """WordNet glosses and their quoted usage examples, each as its own sentence.

    `parts` keeps some parts of speech (noun, verb, adj, adv); all by default.
    """
    check_limit(limit)
    folder = Path(root)
    chosen = _chosen_parts("wordnet", parts, WORDNET_PARTS)
    files = [folder / f"data.{name}" for name in chosen if (folder / f"data.{name}").is_file()]
    if not files:
        raise DataError(
            f"WordNet not found at {folder} (no data.noun/verb/adj/adv): install the Debian package "
            "`wordnet-base` (apt-get install wordnet-base) or use another text source"
        )
    documents = (filter(is_prose, (s for line in _read_lines(path) for s in _wordnet_line(line))) for path in files)
    return _sample(documents, limit, seed, f"no prose WordNet glosses in {folder}; use another text source", passage_chars)


def _wordnet_line(line: str) -> list[str]:
    """`offset ... | gloss; "example"; "example"` -> [gloss, example, example]; the licence header -> []."""
    if line.startswith("  ") or "|" not in line:
        return []
    text = line.split("|", 1)[1].strip()
    gloss, _, examples = text.partition('; "')
    pieces = [gloss, *re.findall(r'"([^"]+)"', '"' + examples)] if examples else [gloss]
    return [_as_sentence(piece) for piece in pieces if piece.strip()]


def _as_sentence(text: str) -> str:
    text = " ".join(text.split()).rstrip(";,: ")
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


def fortune_sentences(
    root: str | Path = FORTUNES_ROOT, limit: int | None = None, seed: int = 0, parts: Sequence[str] | None = None,
    passage_chars: int | None = None,
) -> list[str]:
    """Entries of the plain-text fortune files, each entry one text, whitespace collapsed.

    `parts` names the files to read (one genre each: `songs-poems` is verse, `knghtbrd` IRC chat,
    `definitions` mock definitions); all by default. Only extensionless files directly in `root`
    are read: `.dat` indexes and `.u8` links are duplicates, and `off/` holds the offensive collection.
    """
    check_limit(limit)
    folder = Path(root)
    found = fortune_parts(folder)
    if not found:
        raise DataError(
            f"fortunes not found at {folder}: install the Debian package `fortunes` "
            "(apt-get install fortunes) or use another text source"
        )
    files = [folder / name for name in _chosen_parts("fortunes", parts, found)]
    documents = ((e for e in _fortune_entries(path) if MIN_CHARS <= len(e) <= MAX_CHARS) for path in files)
    return _sample(documents, limit, seed, f"no fortunes of 30-300 characters in {folder}; use another text source", passage_chars)


def fortune_parts(root: str | Path = FORTUNES_ROOT) -> list[str]:
    """The names of the fortune files in `root`, the parts `fortune_sentences` can read."""
    folder = Path(root)
    return sorted(p.name for p in folder.glob("*") if p.is_file() and not p.suffix) if folder.is_dir() else []


def _chosen_parts(source: str, parts: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """`parts` checked against what `source` holds (all of it when None), in the source's order."""
    if parts is None:
        return list(available)
    problem = parts_problem(source, parts, available)
    if problem:
        raise DataError(problem)
    return [p for p in available if p in parts]


def parts_problem(source: str, parts: Sequence[str], available: Sequence[str]) -> str | None:
    """Why `parts` cannot be read from `source`, which holds `available`, in one line; None when they can."""
    unknown = [p for p in parts if p not in available]
    if not parts:
        return f"the parts of {source} are an empty list: choose from {', '.join(available)}, or drop parts"
    if not unknown:
        return None
    close = difflib.get_close_matches(unknown[0], available, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{source} has no part {', '.join(map(repr, unknown))}{hint}: choose from {', '.join(available)}"


def _fortune_entries(path: Path) -> list[str]:
    """Entries are separated by lines holding only `%`."""
    entries = re.split(r"^%\s*$", path.read_text(encoding="utf-8", errors="replace"), flags=re.MULTILINE)
    return [" ".join(entry.split()) for entry in entries if entry.strip()]


def bible_sentences(
    root: str | Path = BIBLE_ROOT, limit: int | None = None, seed: int = 0, passage_chars: int | None = None
) -> list[str]:
    """Sentences of the World English Bible (modern English narrative, poetry and letters).

    Read from the SWORD zText module of the Debian package `sword-text-web`: `*.bzs` lists each
    book's zlib-compressed block in `*.bzz` as (offset, size, plain size); the text is OSIS XML,
    whose footnotes and titles are dropped and whose other tags are stripped.
    """
    check_limit(limit)
    folder = Path(root)
    indexes = sorted(folder.glob("*.bzs")) if folder.is_dir() else []
    if not indexes:
        raise DataError(
            f"the World English Bible was not found at {folder} (no *.bzs/*.bzz): install the Debian package "
            "`sword-text-web` (apt-get install sword-text-web) or use another text source"
        )
    blocks = (filter(is_prose, split_sentences(_osis_text(block))) for index in indexes for block in _ztext_blocks(index))
    return _sample(blocks, limit, seed, f"no prose sentences in {folder}; use another text source", passage_chars)


def _ztext_blocks(index: Path) -> Iterator[str]:
    data = index.with_suffix(".bzz").read_bytes()
    table = index.read_bytes()
    for offset, size, _ in struct.iter_unpack("<III", table[: len(table) // 12 * 12]):
        if size:
            try:
                yield zlib.decompress(data[offset : offset + size]).decode("utf-8", errors="replace")
            except zlib.error as exc:
                raise DataError(f"{index.with_suffix('.bzz')} is corrupt at offset {offset} ({exc}); reinstall sword-text-web") from None


_OSIS_DROPPED = re.compile(r"<(note|title)\b[^>]*>.*?</\1>", re.DOTALL)
_OSIS_TAG = re.compile(r"<[^>]+>")


def _osis_text(block: str) -> str:
    """Plain text of an OSIS block; quotation marks and apostrophes made ASCII like the other sources."""
    text = " ".join(_OSIS_TAG.sub(" ", _OSIS_DROPPED.sub(" ", block)).split())
    text = text.replace("\u201c ", "\u201c").replace(" \u201d", "\u201d").replace("\u2018 ", "\u2018").replace(" \u2019", "\u2019")
    text = text.translate(str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"}))
    return re.sub(r"\s+([,.;:?!])", r"\1", text)


def text_file_lines(
    paths: Iterable[str | Path], limit: int | None = None, seed: int = 0, passage_chars: int | None = None
) -> list[str]:
    """One text per non-empty line of UTF-8 files: the simplest way to bring your own corpus."""
    check_limit(limit)
    paths = [Path(p) for p in paths]
    documents = ([line.strip() for line in _read_lines(path, strict=True) if line.strip()] for path in paths)
    names = ", ".join(map(str, paths)) or "(no files given)"
    return _sample(documents, limit, seed, f"no text in {names}: give UTF-8 files with one text per line", passage_chars)


def prose_sentences(pattern: str, limit: int | None = None, seed: int = 0, passage_chars: int | None = None) -> list[str]:
    """Sentences of plain-text files matched by a glob: paragraphs are separated by blank lines and
    their wrapped lines joined, so books, licences and manuals read as running prose."""
    check_limit(limit)
    paths = prose_paths(pattern)
    if not paths:
        raise DataError(f"no file matches {pattern}: give a path or glob of UTF-8 text files")
    documents = (filter(is_prose, _file_sentences(path)) for path in paths)
    return _sample(documents, limit, seed, f"no prose sentences in the files of {pattern}; use another text source", passage_chars)


def _file_sentences(path: Path) -> Iterator[str]:
    """Sentences of a plain-text file: wrapped lines joined within each blank-line-separated paragraph."""
    for paragraph in re.split(r"\n\s*\n", "\n".join(_read_lines(path))):
        yield from split_sentences(paragraph)


def prose_paths(pattern: str) -> list[Path]:
    """The regular files a `prose:` glob names (a plain path names itself), sorted."""
    return sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern)) if Path(p).is_file())


def jsonl_texts(
    path: str | Path, field: str = "text", limit: int | None = None, seed: int = 0, passage_chars: int | None = None
) -> list[str]:
    """The string `field` of each JSON object in a JSON-lines file."""
    check_limit(limit)
    path = Path(path)
    lines = enumerate(_read_lines(path, strict=True), 1)
    texts = [_jsonl_field(path, number, line, field) for number, line in lines if line.strip()]
    records = [t.strip() for t in texts if t.strip()]
    return _sample([records], limit, seed, f"{path} holds no non-empty '{field}' values", passage_chars)


def _jsonl_field(path: Path, number: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} line {number} is not valid JSON ({exc.msg}): fix that line; each line must be one JSON object"
        ) from None
    if not isinstance(record, dict) or field not in record:
        raise DataError(f"{path} line {number} has no field '{field}': pass field=NAME naming the text field of every line")
    if not isinstance(record[field], str):
        kind = type(record[field]).__name__
        raise DataError(f"{path} line {number}: field '{field}' is a {kind}, not a string; pick a text field")
    return record[field]


def _read_lines(path: Path, strict: bool = False) -> list[str]:
    """Lines of a text file; `strict` refuses bytes that are not UTF-8 instead of replacing them."""
    try:
        return path.read_text(encoding="utf-8", errors="strict" if strict else "replace").splitlines()
    except FileNotFoundError:
        raise DataError(f"text file not found: {path}; check the path") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}): convert it to UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}; check the path and its permissions") from None


def hf_dataset_texts(
    name: str, split: str, field: str = "text", limit: int | None = None, seed: int = 0, passage_chars: int | None = None
) -> list[str]:
    """The `field` column of a Hugging Face dataset split, for corpora not shipped on this machine."""
    check_limit(limit)
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"cannot load hf:{name}: the Hugging Face `datasets` package is not installed; "
            "pip install datasets, or use a local source (file:PATH, jsonl:PATH, docstrings, wordnet, fortunes)"
        ) from None
    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as exc:  # datasets raises many unrelated types; all mean "not loadable here"
        reason = summary(exc)
        raise DataError(
            f"cannot load Hugging Face dataset {name} split {split}: {reason}; check the name, split and network or cache"
        ) from None
    if field not in table.column_names:
        columns = ", ".join(table.column_names)
        raise DataError(f"Hugging Face dataset {name} has no column '{field}' (columns: {columns}); pass field=NAME")
    texts = (t.strip() for t in table[field] if isinstance(t, str))
    message = f"Hugging Face dataset {name} split {split} holds no text in '{field}'"
    return _sample([(t for t in texts if t)], limit, seed, message, passage_chars)


TEXT_SOURCES: dict[str, Callable[..., list[str]]] = {
    "docstrings": docstring_sentences,
    "wordnet": wordnet_sentences,
    "fortunes": fortune_sentences,
    "bible": bible_sentences,
}
# Sources made of named parts (genres, parts of speech), with what each holds on this machine.
SOURCE_PARTS: dict[str, Callable[[], list[str]]] = {"wordnet": lambda: list(WORDNET_PARTS), "fortunes": fortune_parts}


def load_texts(
    source: str, limit: int | None = None, seed: int = 0, parts: Sequence[str] | None = None, match: str | None = None,
    **kwargs,
) -> list[str]:
    """Texts from a source string, so configs and the CLI can name any source in one field.

    `parts` keeps some named parts of a source made of them (`SOURCE_PARTS`); `match` keeps the texts
    in which a regular expression is found, e.g. `\\d` for text dense with numbers, before `limit`
    counts them. Other `kwargs` go to the chosen source: `passage_chars=` to any (see `passages`),
    `root=` for wordnet/fortunes/bible, `field=` for jsonl and hf, `split=` for hf.
    """
    if parts is not None:
        if source not in SOURCE_PARTS:
            raise DataError(f"text source '{source}' has no parts: parts apply to {', '.join(SOURCE_PARTS)}")
        kwargs["parts"] = parts
    if match is None:
        return _load_source(source, limit, seed, kwargs)
    check_limit(limit)
    pattern = compile_match(match)
    kept = [t for t in _load_source(source, None, seed, kwargs) if pattern.search(t)]
    if not kept:
        raise DataError(f"no text of {source} matches {match!r}: loosen the pattern or choose another source")
    return kept[:limit]


def compile_match(match: str) -> re.Pattern[str]:
    """A `match` pattern compiled, or the one-line reason it is not a regular expression."""
    try:
        return re.compile(match)
    except re.error as exc:
        raise DataError(f"match {match!r} is not a regular expression ({exc}); fix the pattern") from None


def _load_source(source: str, limit: int | None, seed: int, kwargs: dict) -> list[str]:
    if source in TEXT_SOURCES:
        return TEXT_SOURCES[source](limit=limit, seed=seed, **kwargs)
    kind, sep, target = source.partition(":")
    if sep and target and kind == "file":
        return text_file_lines([target], limit=limit, seed=seed, **kwargs)
    if sep and target and kind == "prose":
        return prose_sentences(target, limit=limit, seed=seed, **kwargs)
    if sep and target and kind == "jsonl":
        return jsonl_texts(target, limit=limit, seed=seed, **kwargs)
    if sep and target and kind == "hf":
        return hf_dataset_texts(target, limit=limit, seed=seed, **kwargs)
    raise DataError(f"unknown text source '{source}': give one of {SOURCE_FORMS}")


def split_texts(texts: list[str], held_out: float | int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) parts of `texts`: a fraction in (0, 1) or a count of texts held out.

    The parts are disjoint by position and both non-empty; the same seed gives the same split.
    """
    count = _held_out_count(len(texts), held_out)
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    train = [t for i, t in enumerate(texts) if i not in held]
    return train, [texts[i] for i in sorted(held)]


def _held_out_count(total: int, held_out: float | int) -> int:
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)):
        raise DataError(f"held_out must be a fraction in (0, 1) or a whole count, not {held_out!r}")
    if isinstance(held_out, float):
        if not 0 < held_out < 1:
            raise DataError(f"held_out fraction {held_out} is outside (0, 1): give e.g. 0.1, or a whole count")
        held_out = round(held_out * total)
    if not 1 <= held_out < total:
        raise DataError(
            f"cannot hold out {held_out} of {total} texts: both parts must be non-empty; load more texts or hold out fewer"
        )
    return held_out


def passages(texts: Iterable[str], chars: int) -> Iterator[str]:
    """Consecutive `texts` joined by spaces into passages of at least `chars` characters; a document's
    last, shorter piece is kept when it reaches half of that, so each passage carries a long context."""
    pending: list[str] = []
    size = 0
    for text in texts:
        pending.append(text)
        size += len(text) + 1
        if size > chars:
            yield " ".join(pending)
            pending, size = [], 0
    if pending and size > chars // 2:
        yield " ".join(pending)


def check_limit(limit: int | None, name: str = "limit") -> None:
    """Refuse a `limit` (or another count called `name`) that is not None or a positive whole number;
    shared by every data source."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"{name} must be a positive whole number or None, not {limit!r}")


def _sample(
    documents: Iterable[Iterable[str]], limit: int | None, seed: int, empty_message: str, passage_chars: int | None = None
) -> list[str]:
    """Each document's texts (joined into passages when `passage_chars` is given), deduplicated, sorted,
    shuffled with `seed`, `limit` kept: the one ordering every source shares."""
    check_limit(passage_chars, "passage_chars")
    texts = (t for doc in documents for t in (doc if passage_chars is None else passages(doc, passage_chars)))
    unique = sorted(set(texts))
    if not unique:
        raise DataError(empty_message)
    random.Random(seed).shuffle(unique)
    return unique[:limit]
