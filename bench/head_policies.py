"""Which heads of SmolLM2-135M to turn into LSTMs: recent heads (RecurFormer) vs lowest-entropy vs random.

Every variant runs recipes/smollm2_hybrid.yaml (half of the key/value groups, block-wise per-head
transfer, then LoRA + logit distillation on 256-token passages) with the same budget and per-layer
cap; only the head policy differs. `--whole-layers lstm ssm` adds full conversions (every attention layer replaced by
that plugin's mixer) under the same budget. `--set` values go to every variant, e.g. a smaller shared
budget. Prints held-out perplexity (both held-out genres), KL to the teacher, next-token agreement,
the KV cache kept after the first held-out batch, and decode time per token at `--context` tokens of
context (batch 1, median of `--steps` tokens, each exported student timed beside the teacher in one
pass after training). Finished variants are reused (runs/head_policy/<variant>).

    .venv/bin/python bench/head_policies.py [--random-seeds 0 1 2] [--whole-layers lstm ssm]
        [--set distill.steps=100 --set tune.steps=20] [--context 2048]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

import replacer
from decode import measure
from replacer.recipe import load_recipe
from replacer.run.runner import run_recipe
from replacer.train.allocator import keep_freed_memory

RECIPE = Path(__file__).parent.parent / "recipes" / "smollm2_hybrid.yaml"


def variants(seeds: list[int], whole_layers: list[str]) -> dict[str, list[str]]:
    """Each variant's name and the `--set` values that make it from the recipe (its budget and cap kept)."""
    out = {"recent-heads": [], "sparse-heads": ["sites.policy=sparse-heads"]}
    for seed in seeds:
        out[f"random-heads (seed {seed})"] = ["sites.policy=random-heads", f"sites.seed={seed}"]
    for plugin in whole_layers:
        out[f"{plugin}, all layers"] = ["sites=all", f"mixer.plugin={plugin}"]
    return out


def mean_statistic(report: dict, metric: str) -> float | None:
    """The teacher's mean `metric` over the heads a variant replaced."""
    stats, heads = report.get("teacher_attention"), report["replaced_heads"]
    if stats is None:
        return None
    return statistics.mean(stats[site]["heads"][metric][h] for site, hs in heads.items() for h in hs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--whole-layers", nargs="*", default=[], metavar="PLUGIN")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--context", type=int, default=2048, help="context length of the decode timing")
    parser.add_argument("--steps", type=int, default=8, help="decoded tokens timed per model (median reported)")
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does (replacer.train.allocator)
    console = Console(width=180)
    reports = {}
    for name, choice in variants(args.random_seeds, args.whole_layers).items():
        folder = "runs/head_policy/" + name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        recipe = load_recipe(RECIPE, [
            *choice, "analyze.enabled=true", "evaluate.baseline=false", f"run_dir={folder}", *args.overrides,
        ])
        reports[name] = (run_recipe(recipe, console=console), recipe.directory / "model")

    teacher = replacer.load_model("smollm2").eval()
    timed = {"teacher": measure(teacher, args.context, args.steps)}
    for name, (_, exported) in reports.items():
        timed[name] = measure(replacer.load(exported).eval(), args.context, args.steps)
        console.log(f"{name}: decode {timed[name]['decode_ms']:.1f} ms/token at {args.context} tokens")

    budget = " ".join(args.overrides) or "the recipe's own"
    table = Table(title=f"SmolLM2-135M, half the key/value groups -> lstm, smollm2_hybrid.yaml, budget: {budget}; "
                        "held-out quips + licences")
    for column in ("variant", "heads (layers touched)", "recency", "entropy", "perplexity (x teacher)",
                   "KL to teacher", "next-token agreement %", "KV cache (x teacher)",
                   f"decode ms/token at {args.context} (x teacher)", "minutes"):
        table.add_column(column)
    base = timed["teacher"]["decode_ms"]
    for name, (report, _) in reports.items():
        fidelity, cache = report["fidelity"]["student"], report["cache_bytes"]
        heads = report["replaced_heads"]
        recency, entropy = mean_statistic(report, "recency"), mean_statistic(report, "entropy")
        minutes = sum(stage["seconds"] for stage in report["stages"].values()) / 60
        table.add_row(
            name, f"{sum(map(len, heads.values()))} ({len(heads)})",
            "" if recency is None else f"{recency:.3f}", "" if entropy is None else f"{entropy:.3f}",
            f"{fidelity['student_perplexity']:.2f} ({fidelity['student_perplexity'] / fidelity['teacher_perplexity']:.2f})",
            f"{fidelity['kl_to_teacher']:.4f}", f"{fidelity['next_token_agreement']:.2f}",
            f"{cache['student']['kv'] / cache['teacher']['kv']:.2f}",
            f"{timed[name]['decode_ms']:.1f} ({timed[name]['decode_ms'] / base:.2f})", f"{minutes:.1f}",
        )
    console.print(table)
    console.print(f"teacher perplexity {next(iter(reports.values()))[0]['fidelity']['student']['teacher_perplexity']:.2f}, "
                  f"decode {base:.1f} ms/token at {args.context} tokens")


if __name__ == "__main__":
    main()
