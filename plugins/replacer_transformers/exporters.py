"""The sentence-transformers export: a folder `SentenceTransformer(path, trust_remote_code=True)` loads
offline, whose first module runs the converted encoder and whose pooling, dense and normalisation
modules are the teacher folder's own (mean pooling and L2 normalisation, as replacer's embedding
task computes, where the teacher is not a sentence-transformers folder)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

from torch import nn

from replacer.ecosystem import Exporter, ModelContext
from replacer.errors import ReplacerError


class SentenceTransformersExporter(Exporter):
    name = "sentence-transformers"
    folder = "sentence-transformers"
    default_for = ("embedding",)

    def check(self, context: ModelContext) -> None:
        if context.task != "embedding":
            raise ReplacerError(
                f"export format 'sentence-transformers' writes embedding models, and this recipe's task is '{context.task}'; "
                "drop it from export.formats"
            )
        if importlib.util.find_spec("sentence_transformers") is None:
            raise ReplacerError("export format 'sentence-transformers' needs the package: pip install sentence-transformers")
        if context.tokenizer_source is None:
            raise ReplacerError("export format 'sentence-transformers' needs a tokenizer: set model.tokenizer")

    def export(self, model: nn.Module, out: Path, context: ModelContext) -> None:
        self.check(context)
        as_sentence_transformer(model, context).save(str(out), create_model_card=False)


def as_sentence_transformer(model: nn.Module, context: ModelContext) -> Any:
    """`model` (a converted encoder, or its teacher) as a `SentenceTransformer`, with the teacher folder's
    pooling, dense and normalisation modules and settings, or mean pooling and L2 normalisation."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    from replacer.plugins import get_registry
    from replacer_transformers.sentence_transformers_module import ReplacerEncoder

    tokenizer = get_registry().load_tokenizer(context.tokenizer_source)
    teacher = _teacher_folder(context.teacher_source)
    if teacher is None:
        encoder = ReplacerEncoder(model, tokenizer, max_seq_length=context.max_length)
        modules = [encoder, Pooling(encoder.get_embedding_dimension(), pooling_mode="mean"), Normalize()]
        settings: dict[str, Any] = {"similarity_fn_name": "cosine"}
    else:
        encoder = ReplacerEncoder(model, tokenizer, max_seq_length=teacher.max_seq_length or context.max_length,
                                  do_lower_case=bool(getattr(teacher[0], "do_lower_case", False)))
        modules = [encoder, *list(teacher)[1:]]
        settings = {"similarity_fn_name": teacher.similarity_fn_name, "prompts": teacher.prompts,
                    "default_prompt_name": teacher.default_prompt_name}
    return SentenceTransformer(modules=modules, device="cpu", **settings)


@functools.lru_cache(maxsize=2)
def _teacher_folder(source: str) -> Any:
    """The teacher as a sentence-transformers model where its source is a local sentence-transformers folder
    (read once per source: an evaluation wraps the teacher and every student with its modules)."""
    from sentence_transformers import SentenceTransformer

    from replacer_transformers.loading import resolve

    resolved = resolve(source)
    if resolved is None or not isinstance(resolved[0], Path) or not (resolved[0] / "modules.json").is_file():
        return None
    try:
        return SentenceTransformer(str(resolved[0]), device="cpu", local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a folder sentence-transformers cannot read is one user error
        raise ReplacerError(f"the teacher folder {resolved[0]} does not load in sentence-transformers: {exc}") from None
