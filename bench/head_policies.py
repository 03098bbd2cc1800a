"""Head-level hybrids of SmolLM2-135M: the heads with the highest recency ratio vs as many random heads.

Every variant runs recipes/smollm2_heads.yaml with the same training budget; only the head policy
differs. Prints held-out (fortunes) perplexity, KL to the teacher and the KV cache kept after the
first held-out batch. Finished variants are reused (runs/head_policy/<variant>).

    .venv/bin/python bench/head_policies.py [--fraction 0.25]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from replacer.train.allocator import keep_freed_memory
from replacer.recipe import load_recipe
from replacer.run.runner import run_recipe

RECIPE = Path(__file__).parent.parent / "recipes" / "smollm2_heads.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.25)
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does (replacer.train.allocator)
    console = Console()
    table = Table(title=f"SmolLM2-135M, {args.fraction:.0%} of heads -> lstm (hybrid layers), held-out fortunes")
    for column in ("policy", "mean recency of replaced heads", "perplexity (teacher)", "KL to teacher",
                   "next-token agreement %", "KV MiB (x teacher)", "mixer state MiB"):
        table.add_column(column)
    for policy in ("recent-heads", "random-heads"):
        recipe = load_recipe(RECIPE, [
            f"sites={{policy: {policy}, fraction: {args.fraction}}}", f"run_dir=runs/head_policy/{policy}",
            "analyze.enabled=true",
        ])
        report = run_recipe(recipe, console=console)
        fidelity = report["fidelity"]["student"]
        stats = report["teacher_attention"]
        heads = report["replaced_heads"]
        recency = [stats[site]["heads"]["recency"][h] for site, hs in heads.items() for h in hs]
        cache = report["cache_bytes"]
        table.add_row(
            policy, f"{sum(recency) / len(recency):.3f}",
            f"{fidelity['student_perplexity']:.2f} ({fidelity['teacher_perplexity']:.2f})",
            f"{fidelity['kl_to_teacher']:.4f}", f"{fidelity['next_token_agreement']:.2f}",
            f"{cache['student']['kv'] / 2**20:.2f} ({cache['student']['kv'] / cache['teacher']['kv']:.2f})",
            f"{cache['student']['mixer_state'] / 2**20:.3f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
