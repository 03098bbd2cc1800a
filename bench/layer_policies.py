"""Replacing the k sparsest vs the k densest vs k random attention layers of all-MiniLM-L6-v2.

Every variant runs recipes/minilm_layer_policy.yaml with the same training budget; only the site
policy differs. Prints held-out (fortunes) embedding fidelity per policy. About 5 minutes per
variant on a 2-core CPU; finished variants are reused (runs/layer_policy/<variant>).

    .venv/bin/python bench/layer_policies.py [--layers 3] [--random-seeds 0 1 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from replacer.train.allocator import keep_freed_memory
from replacer.recipe import load_recipe
from replacer.run.runner import run_recipe

RECIPE = Path(__file__).parent.parent / "recipes" / "minilm_layer_policy.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--random-seeds", type=int, nargs="*", default=[0, 1, 2])
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does (replacer.train.allocator)
    console = Console()
    variants = [("sparsest", 0), ("densest", 0)] + [("random", seed) for seed in args.random_seeds]
    table = Table(title=f"all-MiniLM-L6-v2, {args.layers} of 6 layers -> lstm, held-out fortunes")
    for column in ("policy", "layers replaced", "mean entropy of those layers", "cosine mean", "cosine p5", "top-10 agreement"):
        table.add_column(column)
    for policy, seed in variants:
        name = policy if policy != "random" else f"random-{seed}"
        recipe = load_recipe(RECIPE, [
            f"sites={{policy: {policy}, layers: {args.layers}, seed: {seed}}}",
            f"run_dir=runs/layer_policy/{name}", "analyze.enabled=true",
        ])
        report = run_recipe(recipe, console=console)
        fidelity = report["fidelity"]["student"]
        stats = report["teacher_attention"]
        replaced = report["replaced_sites"]
        entropy = sum(stats[s]["mean"]["entropy"] for s in replaced) / len(replaced)
        table.add_row(
            name, ", ".join(str(stats[s]["layer_index"]) for s in replaced), f"{entropy:.3f}",
            f"{fidelity['embedding_cosine_mean']:.4f}", f"{fidelity['embedding_cosine_p5']:.4f}",
            f"{fidelity['top10_neighbour_agreement']:.4f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
