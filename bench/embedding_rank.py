"""How much of all-MiniLM-L6-v2's function its token embedding keeps at a reduced rank, before any training.

Run: python bench/embedding_rank.py [--ranks 96 128 192 256] [--texts 3000]

The teacher's token embedding is factorised (`replacer.pruning.embeddings.factorise`) twice: by a plain
SVD, and by the SVD with each token's row weighted by sqrt(1 + its count), counted over the quickstart's
training genres (technical docstrings, WordNet glosses, Bible narrative; `--texts` of each) as whole-model
pruning counts them. Each is truncated to each rank and the model's mean-pooled embeddings of two genres
the counts never saw (licences and fortune-file quips, 200 texts each, 64 tokens) are compared with the
teacher's by cosine. No mixer is involved: this is the embedding's share of a whole-model cut.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from replacer.data.text import bible_sentences, docstring_sentences, fortune_sentences, prose_sentences, wordnet_sentences
from replacer.models import load_model
from replacer.plugins import get_registry
from replacer.pruning import token_use
from replacer.pruning.embeddings import FactorisedEmbedding, factorise

TABLE = "embeddings.word_embeddings"


def pooled(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def truncated(teacher: torch.nn.Module, full: FactorisedEmbedding, rank: int) -> torch.nn.Module:
    model = copy.deepcopy(teacher)
    model.embeddings.word_embeddings = FactorisedEmbedding(
        full.codes[:, :rank].clone(), full.basis[:rank].clone(), full.padding_idx
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[96, 128, 192, 256])
    parser.add_argument("--texts", type=int, default=3000, help="texts of each training genre counted")
    args = parser.parse_args()

    teacher = load_model("minilm").eval()
    tokenizer = get_registry().load_tokenizer("minilm")
    encode = lambda texts: dict(tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))  # noqa: E731
    train = docstring_sentences(args.texts) + wordnet_sentences(limit=args.texts) + bible_sentences(limit=args.texts)
    batches = [encode(train[i:i + 256]) for i in range(0, len(train), 256)]
    counts = token_use(teacher, [lambda b=b: teacher(**b) for b in batches])[TABLE]
    held_out = {
        "licences": encode(prose_sentences("/usr/share/common-licenses/*", limit=200)),
        "quips": encode(fortune_sentences(parts=["cookie", "people", "platitudes", "wisdom", "work", "fortunes"], limit=200)),
    }
    references = {name: pooled(teacher, batch) for name, batch in held_out.items()}
    table = teacher.embeddings.word_embeddings
    factorised = {"plain SVD": factorise(table), "token-weighted SVD": factorise(table, counts)}

    out = Table(title=f"all-MiniLM-L6-v2, token embedding at reduced rank (of {table.embedding_dim}); "
                      f"{int((counts > 0).sum()):,} distinct tokens counted in {len(train):,} training texts")
    out.add_column("factorisation")
    out.add_column("rank", justify="right")
    out.add_column("embedding params (x table)", justify="right")
    for name in held_out:
        out.add_column(f"cosine, {name}", justify="right")
    for rank in args.ranks:
        for name, full in factorised.items():
            model = truncated(teacher, full, rank)
            cosines = [float((pooled(model, batch) * references[held]).sum(-1).mean()) for held, batch in held_out.items()]
            size = rank * (table.num_embeddings + table.embedding_dim)
            out.add_row(name, str(rank), f"{size:,} ({size / table.weight.numel():.2f})", *(f"{c:.4f}" for c in cosines))
    Console().print(out)


if __name__ == "__main__":
    main()
