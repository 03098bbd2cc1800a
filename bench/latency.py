"""Params and CPU latency: teacher vs the same model with every attention site replaced.

Run: python bench/latency.py [--repeats 20] [--plugin lstm] [--batch-sizes 1 32]
Mixers are untrained here; latency and size do not depend on training. Figures are medians. lstm and
gru students are timed on the fused kernels and on the reference loop in the same run.
"""

from __future__ import annotations

import argparse
import torch
from rich.console import Console
from rich.table import Table

from replacer.allocator import keep_freed_memory
import replacer
from replacer import fused
from replacer.evaluate import interleaved_latency_ms
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
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does (replacer.allocator)
    table = Table(title=f"CPU ({torch.get_num_threads()} threads), median of {args.repeats}, timed in turns")
    for col in ("model", "batch", "variant", "params", "params ratio", "latency ms", "latency ratio"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for batch in args.batch_sizes:
        for name, (teacher, inputs) in cases(batch).items():
            student = replacer.replace(teacher, plugin=args.plugin).eval()
            recurrent = any(isinstance(m, MultiHeadRecurrence) for m in student.modules())
            paths = {f"{args.plugin} (fused)": "fused", f"{args.plugin} (reference loop)": "reference"} if recurrent else {args.plugin: "auto"}
            base_params = replacer.count_parameters(teacher)
            calls = {"teacher": lambda inputs=inputs, teacher=teacher: teacher(**inputs)}
            # recurrence(path) as a decorator: each call runs on that path
            calls |= {v: fused.recurrence(p)(lambda i=inputs, s=student: s(**i)) for v, p in paths.items()}
            times = interleaved_latency_ms(calls, args.repeats)
            base_ms = times["teacher"]
            table.add_row(name, str(batch), "teacher", f"{base_params:,}", "1.00", f"{base_ms:.1f}", "1.00")
            params = replacer.count_parameters(student)
            for variant in paths:
                ms = times[variant]
                table.add_row("", "", variant, f"{params:,}", f"{params / base_params:.2f}", f"{ms:.1f}", f"{ms / base_ms:.2f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
