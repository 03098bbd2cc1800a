"""Params and CPU latency: teacher vs the same model with every attention site replaced.

Run: python bench/latency.py [--repeats 20] [--plugin lstm] [--batch-sizes 1 32] [--pruned 0.5] [--model-params 0.7]
Mixers are untrained here; latency and size do not depend on training. Figures are medians. lstm and
gru students are timed on the fused kernels and on the reference loop in the same run.
"""

from __future__ import annotations

import argparse
import copy
import torch
from rich.console import Console
from rich.table import Table

from replacer.train.allocator import keep_freed_memory
import replacer
from replacer import fused
from replacer.errors import ReplacerError
from replacer.metrics.timing import interleaved_latency_ms
from replacer.pruning import prune
from replacer.recurrent import MultiHeadRecurrence


def cases(batch: int) -> dict[str, tuple[torch.nn.Module, dict]]:
    import timm

    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224").eval()  # random init: no pretrained ViT weights offline
    minilm = replacer.load_model("minilm").eval()
    ids = torch.randint(1000, 20000, (batch, 128))
    return {
        "deit_tiny 224px (197 tokens)": (deit, {"x": torch.randn(batch, 3, 224, 224)}),
        "all-MiniLM-L6-v2 (128 tokens)": (minilm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--plugin", default="lstm")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--pruned", type=float, nargs="*", default=[],
                        help="also time the student pruned (magnitude importance) to these fractions of its mixer "
                             "parameters, in lockstep (prune.uniform) and ranked unit by unit")
    parser.add_argument("--model-params", type=float, nargs="*", default=[],
                        help="also time the student pruned as a whole (prune.scope: model: MLP channels too) to "
                             "these fractions of the teacher's parameters")
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does (replacer.train.allocator)
    table = Table(title=f"CPU ({torch.get_num_threads()} threads), median of {args.repeats}, timed in turns")
    for col in ("model", "batch", "variant", "params", "params ratio", "latency ms", "latency ratio", "x student"):
        table.add_column(col, justify="right" if col != "model" else "left")
    notes: list[str] = []
    for batch in args.batch_sizes:
        for name, (teacher, inputs) in cases(batch).items():
            student = replacer.replace(teacher, plugin=args.plugin).eval()
            recurrent = any(isinstance(m, MultiHeadRecurrence) for m in student.modules())
            default = f"{args.plugin} (fused)" if recurrent else args.plugin
            models = {"teacher": (teacher, "auto"), default: (student, "fused" if recurrent else "auto")}
            if recurrent:
                models[f"{args.plugin} (reference loop)"] = (student, "reference")
            for fraction in args.pruned:
                for kind, uniform in (("lockstep", True), ("ranked", False)):
                    pruned = copy.deepcopy(student)
                    prune(pruned, params=fraction, uniform=uniform)
                    models[f"{args.plugin} pruned-{round(fraction * 100)} {kind}"] = (pruned.eval(), "auto")
            for fraction in args.model_params:
                pruned = copy.deepcopy(student)
                try:
                    prune(pruned, params=round(fraction * replacer.count_parameters(teacher)), scope="model")
                except ReplacerError as exc:
                    notes.append(f"{name}, whole model at {fraction}x the teacher: {exc}")
                    continue
                models[f"{args.plugin} whole model at {fraction}x teacher"] = (pruned.eval(), "auto")
            # recurrence(path) as a decorator: each call runs on that path
            calls = {v: fused.recurrence(p)(lambda i=inputs, m=m: m(**i)) for v, (m, p) in models.items()}
            times = interleaved_latency_ms(calls, args.repeats)
            base_params = replacer.count_parameters(teacher)
            for variant, (model, _) in models.items():
                params, ms = replacer.count_parameters(model), times[variant]
                table.add_row(name if variant == "teacher" else "", str(batch) if variant == "teacher" else "", variant,
                              f"{params:,}", f"{params / base_params:.2f}", f"{ms:.1f}", f"{ms / times['teacher']:.2f}",
                              "" if variant == "teacher" else f"{ms / times[default]:.2f}")
    console = Console(width=140)
    console.print(table)
    for note in notes:
        console.print(f"not timed: {note}")


if __name__ == "__main__":
    main()
