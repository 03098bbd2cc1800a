"""Params and CPU latency at batch 1: teacher vs the same model with every attention site replaced.

Run: python bench/latency.py [--repeats 20] [--plugin lstm]
Mixers are untrained here; latency and size do not depend on training. Figures are medians.
"""

from __future__ import annotations

import argparse
import torch
from rich.console import Console
from rich.table import Table

import replacer
from replacer.evaluate import median_latency_ms


def cases() -> dict[str, tuple[torch.nn.Module, dict]]:
    import timm

    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224").eval()  # random init: no pretrained ViT weights offline
    minilm = replacer.load_model("minilm").eval()
    ids = torch.randint(1000, 20000, (1, 128))
    return {
        "deit_tiny 224px (197 tokens)": (deit, {"x": torch.randn(1, 3, 224, 224)}),
        "all-MiniLM-L6-v2 (128 tokens)": (minilm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--plugin", default="lstm")
    args = parser.parse_args()
    table = Table(title=f"batch 1, CPU ({torch.get_num_threads()} threads), median of {args.repeats}")
    for col in ("model", "variant", "params", "params ratio", "latency ms", "latency ratio"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name, (teacher, inputs) in cases().items():
        student = replacer.replace(teacher, plugin=args.plugin).eval()
        base_params, base_ms = replacer.count_parameters(teacher), median_latency_ms(lambda: teacher(**inputs), args.repeats)
        params, ms = replacer.count_parameters(student), median_latency_ms(lambda: student(**inputs), args.repeats)
        table.add_row(name, "teacher", f"{base_params:,}", "1.00", f"{base_ms:.1f}", "1.00")
        table.add_row("", args.plugin, f"{params:,}", f"{params / base_params:.2f}", f"{ms:.1f}", f"{ms / base_ms:.2f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
