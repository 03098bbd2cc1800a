"""Renders docs/api.md from the code's docstrings, with griffe (the loader mkdocstrings uses), so the
API reference reads the same in the repository and on the documentation site.

    .venv/bin/python docs/api_reference.py --write    # re-render after changing a public docstring

`tests/test_docs.py` fails when the committed page differs from what this renders.
"""

from __future__ import annotations

import sys
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "api.md"

SECTIONS: dict[str, list[str]] = {
    "Converting models": ["replacer.replace.replace", "replacer.scan", "replacer.save", "replacer.load", "replacer.load_model"],
    "Recipe runs": ["replacer.recipe.load_recipe", "replacer.run.runner.run_recipe"],
    "The Mixer contract": ["replacer.mixer.Mixer", "replacer.mixer.ScanMixer", "replacer.mixer.MixerSpec", "replacer.Site",
                           "replacer.LinearWeights"],
    "Building blocks for mixers": ["replacer.recurrent.MultiHeadRecurrence", "replacer.recurrent.RecurrentOptions"],
    "Adapters": ["replacer.Adapter", "replacer.ReplacedAttention", "replacer.Unsupported",
                 "replacer.graph.adapter.padding_from_attention_mask"],
    "Where users already work": ["replacer.Exporter", "replacer.Evaluation", "replacer.ModelContext"],
    "Pruning": ["replacer.mixer.PruneGroup", "replacer.pruning.GroupIndex"],
    "Attention analysis": ["replacer.AnalyzerSpec", "replacer.run.sparse_teacher.sparse_attention"],
    "Conformance kits": ["replacer.testing.check_mixer", "replacer.testing.check_adapter", "replacer.testing.AttentionCounter"],
}


def _target(obj: griffe.Object | griffe.Alias) -> griffe.Object:
    return obj.final_target if isinstance(obj, griffe.Alias) else obj


def _signature(function: griffe.Function, drop_self: bool) -> str:
    parts = []
    for p in function.parameters:
        if drop_self and p.name in ("self", "cls"):
            continue
        star = {"var_positional": "*", "var_keyword": "**"}.get(str(p.kind.name), "")
        text = star + p.name
        if p.annotation is not None:
            text += f": {p.annotation}"
        if p.default is not None and not star:
            text += f" = {p.default}"
        parts.append(text)
    returns = f" -> {function.returns}" if function.returns is not None else ""
    return f"{function.name}({', '.join(parts)}){returns}"


def _doc(obj: griffe.Object) -> str:
    return obj.docstring.value.strip() if obj.docstring else ""


def _members(cls: griffe.Class) -> list[str]:
    """The public methods and documented attributes a class declares itself, in source order."""
    out = []
    for name, member in cls.members.items():
        member = _target(member) if not isinstance(member, griffe.Alias) else member
        if name.startswith("_") or isinstance(member, griffe.Alias):
            continue
        if isinstance(member, griffe.Function):
            out += [f"- `{_signature(member, drop_self=True)}`" + (f": {_first_paragraph(_doc(member))}" if _doc(member) else "")]
        elif isinstance(member, griffe.Attribute) and _doc(member):
            out += [f"- `{name}`: {_first_paragraph(_doc(member))}"]
    return out


def _first_paragraph(text: str) -> str:
    return " ".join(text.split("\n\n")[0].split())


def _entry(path: str, package: griffe.Module) -> list[str]:
    obj = _target(package[path.removeprefix("replacer.")])
    lines = [f"### `{path}`", ""]
    if isinstance(obj, griffe.Function):
        lines += ["```python", _signature(obj, drop_self=False), "```", ""]
    elif isinstance(obj, griffe.Class):
        init = obj.members.get("__init__")
        bases = f"({', '.join(str(b) for b in obj.bases)})" if obj.bases else ""
        head = [f"class {obj.name}{bases}"]
        if isinstance(init, griffe.Function) and not isinstance(init, griffe.Alias) and len(init.parameters) > 1:
            head.append(_signature(init, drop_self=True).replace("__init__", obj.name, 1).removesuffix(" -> None"))
        lines += ["```python", *head, "```", ""]
    if _doc(obj):
        lines += [_doc(obj), ""]
    if isinstance(obj, griffe.Class):
        members = _members(obj)
        if members:
            lines += members + [""]
    return lines


def render() -> str:
    package = griffe.load("replacer", search_paths=[str(ROOT), str(ROOT / "plugins")], resolve_aliases=True,
                          resolve_external=False)
    lines = ["# API reference", "",
             "Rendered from the code's docstrings by `docs/api_reference.py` (griffe, the loader mkdocstrings uses); "
             "re-render with `.venv/bin/python docs/api_reference.py --write`.", ""]
    for section, paths in SECTIONS.items():
        lines += [f"## {section}", ""]
        for path in paths:
            lines += _entry(path, package)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    text = render()
    if "--write" in sys.argv:
        PAGE.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
