"""Embedding students measured by sentence-transformers' own evaluators on held-out text, beside
replacer's cosine-to-the-teacher figures: do they still tell which texts belong together?

Any held-out text genre gives the pairs: each text with at least `MIN_WORDS` words is cut in two
halves at a word boundary (at most `MAX_PAIRS` texts, evenly spaced, so the evaluation costs about
as much as the rest of the evaluate stage). Retrieval (`InformationRetrievalEvaluator`): each first half is a query
whose one relevant document is its own second half, among all second halves. Triplets
(`TripletEvaluator`): a first half should be closer to its own second half than to another text's.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from torch import nn

from replacer.ecosystem import Evaluation, ModelContext
from replacer.errors import ReplacerError

MIN_WORDS = 6
MAX_PAIRS = 500
FIGURES = {
    "retrieval_accuracy@1": "halves_cosine_accuracy@1",
    "retrieval_mrr@10": "halves_cosine_mrr@10",
    "retrieval_ndcg@10": "halves_cosine_ndcg@10",
    "triplet_accuracy": "halves_cosine_accuracy",
}


def split_halves(texts: list[str]) -> tuple[list[str], list[str]]:
    """(first halves, second halves) of the texts with at least `MIN_WORDS` words (at most `MAX_PAIRS` of them)."""
    long_enough = [t for t in texts if len(t.split()) >= MIN_WORDS]
    step = max(1, -(-len(long_enough) // MAX_PAIRS))
    firsts, seconds = [], []
    for text in long_enough[::step]:
        words = text.split()
        firsts.append(" ".join(words[: len(words) // 2]))
        seconds.append(" ".join(words[len(words) // 2 :]))
    return firsts, seconds


class SentenceTransformersEvaluation(Evaluation):
    name = "sentence-transformers"
    tasks = ("embedding",)

    def available(self) -> str | None:
        return None if importlib.util.find_spec("sentence_transformers") else "needs the package: pip install sentence-transformers"

    def evaluate(self, models: dict[str, nn.Module], examples: list, context: ModelContext, **options: Any) -> dict[str, dict[str, float]]:
        if options:
            raise ReplacerError(f"the sentence-transformers evaluation takes no options, got {sorted(options)}")
        from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator, TripletEvaluator

        from replacer_transformers.exporters import as_sentence_transformer

        firsts, seconds = split_halves([e for e in examples if isinstance(e, str)])
        if len(firsts) < 2:
            return {}
        shift = len(firsts) // 2  # each anchor's negative: the second half of a text half the list away
        negatives = seconds[shift:] + seconds[:shift]
        queries = {str(i): q for i, q in enumerate(firsts)}
        corpus = {str(i): d for i, d in enumerate(seconds)}
        retrieval = InformationRetrievalEvaluator(
            queries, corpus, {q: {q} for q in queries}, name="halves", accuracy_at_k=[1], mrr_at_k=[10], ndcg_at_k=[10],
            precision_recall_at_k=[1], map_at_k=[10], show_progress_bar=False, write_csv=False,
        )
        triplets = TripletEvaluator(firsts, seconds, negatives, name="halves", show_progress_bar=False, write_csv=False)
        figures = {}
        for label, model in models.items():
            encoder = as_sentence_transformer(model, context)
            scores = {**retrieval(encoder), **triplets(encoder)}
            figures[label] = {name: float(scores[key]) for name, key in FIGURES.items()}
            figures[label]["pairs"] = float(len(firsts))
        return figures
