"""From a recipe's model and data sections to a teacher, a tokenizer and example lists, failing fast.

Everything a run needs from outside (weights, data folders) is checked before any work starts,
and all that is missing is reported in one line.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import ConcatDataset

from replacer.distill.lora import lora_targets
from replacer.errors import ModelSourceError, ReplacerError, SiteSelectionError, summary
from replacer.ecosystem import ModelContext
from replacer.exporting import export_formats
from replacer.graph.scan import ScanResult, scan
from replacer.models import load_model
from replacer.plugins import get_registry
from replacer.recipe import DataSource, DigitsData, IdxData, ImageFolderData, ModelSection, Recipe, SitePolicy, TextData
from replacer.tasks import task_kind


CHARS_PER_TOKEN = 4  # English text in the BPE and WordPiece vocabularies of the anchors' tokenizers


class MissingInputError(ReplacerError):
    """Weights or data a recipe names are not on this machine."""


def _missing_data(section: str, sources: list[DataSource]) -> list[str]:
    problems = []
    for i, source in enumerate(sources):
        where = f"data.{section}[{i}]"
        if isinstance(source, ImageFolderData) and not source.root.is_dir():
            problems.append(f"{where}.root {source.root} does not exist (point it at an ImageNet-style class-folder copy)")
        if isinstance(source, TextData):
            problems += _missing_text(where, source)
        if isinstance(source, IdxData) and not source.folder.is_dir():
            problems.append(
                f"{where}.folder {source.folder} does not exist (apt-get install dataset-fashion-mnist, or point it at the IDX files)"
            )
    return problems


def _missing_text(where: str, source: TextData) -> list[str]:
    """A text source that names a file or a part that is not there, or no source form at all."""
    from replacer.data.text import SOURCE_FORMS, SOURCE_PARTS, TEXT_SOURCES, parts_problem, prose_paths

    name = source.source
    kind, sep, target = name.partition(":")
    if source.parts is not None:
        if name not in SOURCE_PARTS:
            return [f"{where}.parts: text source '{name}' has no parts (parts apply to {', '.join(SOURCE_PARTS)}); remove parts"]
        available = SOURCE_PARTS[name]()
        problem = parts_problem(name, source.parts, available) if available else None  # else the loader says what to install
        if problem:
            return [f"{where}.parts: {problem}"]
    if name in TEXT_SOURCES or (sep and target and kind == "hf"):
        return []
    if sep and target and kind == "prose":
        return [] if prose_paths(target) else [f"{where}.source {name}: no file matches {target}"]
    if sep and target and kind in ("file", "jsonl"):
        return [] if Path(target).is_file() else [f"{where}.source {name}: {target} does not exist"]
    return [f"{where}.source: unknown text source '{name}': give one of {SOURCE_FORMS}"]


def load_teacher(spec: ModelSection) -> nn.Module:
    """The teacher, from the hub/offline package or from a local weights file (never unpickled)."""
    if spec.checkpoint is None:
        return load_model(spec.source, pretrained=spec.pretrained, kwargs=spec.kwargs).eval()
    if not spec.checkpoint.is_file():
        raise MissingInputError(f"model.checkpoint {spec.checkpoint} does not exist")
    model = load_model(spec.source, pretrained=False, kwargs=spec.kwargs)
    state = read_weights(spec.checkpoint)
    mismatch = state_dict_mismatch(model, state)
    if mismatch:
        raise ModelSourceError(f"model.checkpoint {spec.checkpoint} does not fit {spec.source}: {mismatch}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def state_dict_mismatch(model: nn.Module, state: dict[str, Any]) -> str | None:
    """What keeps `state` from loading into `model` strictly (missing, unexpected, mis-shaped keys), or None."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
        if k in state and (not torch.is_tensor(state[k]) or state[k].shape != v.shape)
    ]
    parts = [f"{label} {items[:3]}{' ...' if len(items) > 3 else ''} ({len(items)})"
             for label, items in (("missing", missing), ("unexpected", unexpected), ("shape differs", shapes)) if items]
    return "; ".join(parts) if parts else None



def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from .pth/.bin with `weights_only=True` (no arbitrary unpickling)."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelSourceError(
            f"model.checkpoint {path} is a pickle that holds more than tensors, and replacer never unpickles code; "
            "save its state_dict as .safetensors (in a trusted environment) and point model.checkpoint at that"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ModelSourceError(f"model.checkpoint {path} cannot be read: {summary(exc)}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelSourceError(f"model.checkpoint {path} holds no state dict")
    return state


def preflight(recipe: Recipe) -> tuple[nn.Module, str]:
    """Load the teacher, check the data folders, the sites the recipe selects against the model's scan
    and the export formats against its task; report every problem in one line, before any work
    (`replacer validate` runs the same). Returns the teacher and the task kind its one scan implies."""
    problems = _missing_data("train", recipe.data.train) + _missing_data("eval", recipe.data.eval)
    teacher, kind = None, recipe.model.task
    try:
        teacher = load_teacher(recipe.model)
        found = scan(teacher)
        kind = task_kind(recipe.model.task, found, is_text(recipe))
        check_sites(recipe, found)
        if recipe.tune.enabled and recipe.tune.train == "lora" and recipe.tune.lora.targets is not None:
            lora_targets(teacher, recipe.tune.lora.targets)  # the student keeps these layers
        if recipe.export.enabled:
            export_formats(recipe.export.formats, export_context(recipe, kind))
        check_model_budgets(recipe, teacher, found)
    except ReplacerError as exc:
        problems.insert(0, str(exc))
    if problems:
        raise MissingInputError("; ".join(problems))
    return teacher, kind


def check_sites(recipe: Recipe, found: ScanResult) -> None:
    """The recipe's sites exist in the teacher `found` by its scan: explicit selectors each match a replaceable
    site, a layer policy asks for no more layers than there are, and `all` finds at least one."""
    from replacer.replace import select_sites

    chosen = recipe.sites
    if isinstance(chosen, SitePolicy):
        if chosen.layers is not None and chosen.layers > len(found.sites):
            raise SiteSelectionError(f"sites.layers={chosen.layers} but {found.model_name} has {len(found.sites)} replaceable layers")
        chosen = None
    try:
        select_sites(found, None if chosen == "all" else chosen)
    except SiteSelectionError as exc:
        raise SiteSelectionError(f"sites: {exc}") from None


def check_model_budgets(recipe: Recipe, teacher: nn.Module, found: ScanResult) -> None:
    """Whole-model pruning budgets (`prune.scope: model`) lie above the share of the student that no group
    can cut. Checked by building the untrained student where its sites are known before any analysis
    (explicit sites, `all`, random policies); a policy that ranks by attention is checked when it prunes."""
    from replacer.pruning import fixed_fraction
    from replacer.replace import replace
    from replacer.run.selection import choose_sites

    spec, policy = recipe.prune, recipe.sites
    if not (spec.enabled and spec.scope == "model" and spec.target == "params"):
        return
    if isinstance(policy, SitePolicy) and not policy.policy.startswith("random"):
        return
    selection = choose_sites(recipe, found.sites, None)
    student = replace(teacher, recipe.mixer.plugin, sites=selection.sites, options=recipe.mixer.options, heads=selection.heads)
    floor = fixed_fraction(student, embeddings=spec.embeddings)
    low = [b for b in spec.budgets if b <= floor]
    if low:
        raise ReplacerError(
            f"prune.budgets {low}: {floor:.0%} of the student's parameters sit outside every prunable group "
            f"(norms, projections, embeddings left whole), so whole-model budgets must be above {floor:.2f}"
        )


def export_context(recipe: Recipe, task: str) -> ModelContext:
    """What exporters and ecosystem evaluations are told about the run's model (of kind `task`): its
    sources, its task, how long its inputs are."""
    return ModelContext(
        teacher_source=recipe.model.source,
        tokenizer_source=(recipe.model.tokenizer or recipe.model.source) if is_text(recipe) else None,
        task=task, max_length=max_text_length(recipe),
    )


def max_text_length(recipe: Recipe) -> int:
    """The longest text the recipe's data holds, in tokens (128 where it reads no text)."""
    lengths = [s.max_length for s in recipe.data.train + recipe.data.eval if isinstance(s, TextData)]
    return max(lengths, default=128)


def load_tokenizer(recipe: Recipe) -> Any:
    source = recipe.model.tokenizer or recipe.model.source
    return get_registry().load_tokenizer(source) if is_text(recipe) else None


def is_text(recipe: Recipe) -> bool:
    kinds = {isinstance(s, TextData) for s in recipe.data.train + recipe.data.eval}
    if len(kinds) > 1:
        raise ReplacerError("data.train and data.eval mix text and image sources; use one kind")
    return kinds == {True}


def _text_options(source: TextData) -> dict[str, Any]:
    """The per-source fields that apply: parts and match to any, a field to jsonl, a field of a split to hf."""
    kind = source.source.partition(":")[0]
    options: dict[str, Any] = {"parts": source.parts, "match": source.match, "passage_chars": passage_chars(source)}
    return options | {"jsonl": {"field": source.field}, "hf": {"field": source.field, "split": source.split}}.get(kind, {})


def passage_chars(source: TextData) -> int | None:
    """The characters a passage of `source` joins (enough to fill its max_length tokens), or None for single texts."""
    return CHARS_PER_TOKEN * source.max_length if source.passages else None


def load_source(source: DataSource, seed: int) -> Sequence[Any]:
    """One source's examples: a list of texts or an image dataset."""
    if isinstance(source, TextData):
        from replacer.data.text import load_texts

        return load_texts(source.source, limit=source.limit, seed=seed, **_text_options(source))
    from replacer.data.images import IdxImageDataset, ImageFolderDataset, digits_dataset

    if isinstance(source, ImageFolderData):
        return ImageFolderDataset(source.root, image_size=source.image_size, limit=source.limit)
    if isinstance(source, IdxData):
        return IdxImageDataset(source.folder, split=source.split, limit=source.limit)
    return digits_dataset(source.split, seed=seed)


def load_example_parts(sources: list[DataSource], seed: int) -> dict[str, Sequence[Any]]:
    """Each source's examples under its name, in the section's order (the report's per-source figures)."""
    return {source.name: load_source(source, seed) for source in sources}


def concatenated(parts: Sequence[Sequence[Any]]) -> Sequence[Any]:
    """The examples of several sources as one: a list of texts, or one image dataset."""
    if all(isinstance(p, list) for p in parts):
        return [example for part in parts for example in part]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def load_examples(sources: list[DataSource], seed: int) -> Sequence[Any]:
    """Texts (a list of strings) or an image dataset, from every source of one section."""
    return concatenated([load_source(s, seed) for s in sources])
