"""One block-wise distillation step of a quickstart site (forward + backward), fused kernels vs reference loop.

Run: python bench/training.py [--plugins lstm gru] [--repeats 10] [--batch 32] [--tokens 64]

The site is all-MiniLM-L6-v2's (width 384, 12 heads x 32, bidirectional, hidden 32 per head, as in
recipes/quickstart.yaml); the step is what `distill` runs: the mixer on a batch of site inputs, MSE
to a target, backward through the mixer's parameters. Both paths are timed in the same run, with a
padding mask as the quickstart's batches have; medians.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from replacer.train.allocator import keep_freed_memory
from replacer import fused
from replacer.metrics.timing import interleaved_median_ms
from replacer.train.optimizers import adam
from replacer.graph.site import Site
from replacer.plugins import get_registry

SITE = Site(name="encoder.layer.0.attention.self", cls="BertSelfAttention", adapter="bench", layer_index=0, d_model=384,
            num_heads=12, head_dim=32, num_kv_heads=12, causal=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", nargs="+", default=["lstm", "gru"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does (replacer.train.allocator)
    torch.manual_seed(0)
    x, target = torch.randn(args.batch, args.tokens, 384), torch.randn(args.batch, args.tokens, 384)
    keep = torch.ones(args.batch, args.tokens, dtype=torch.bool)
    keep[::2, args.tokens * 3 // 4 :] = False  # half the sequences padded, as length-bucketed text batches are
    table = Table(title=f"one site's training step, batch {args.batch} x {args.tokens} tokens, CPU "
                        f"({torch.get_num_threads()} threads), median of {args.repeats}, timed in turns")
    for col in ("mixer", "reference loop ms", "fused ms", "speed-up"):
        table.add_column(col, justify="right" if col != "mixer" else "left")
    for plugin in args.plugins:
        spec = get_registry().mixer(plugin)
        mixer = spec.build(SITE, spec.validate_options({"hidden_per_head": 32}), None).train()
        optimizer = adam(mixer.parameters(), lr=1e-3)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(mixer(x, keep), target).backward()
            optimizer.step()

        # recurrence(path) as a decorator: each step runs on that path; the two timed in turns
        times = interleaved_median_ms({path: fused.recurrence(path)(step) for path in ("reference", "fused")}, args.repeats)
        table.add_row(plugin, f"{times['reference']:.1f}", f"{times['fused']:.1f}", f"{times['reference'] / times['fused']:.2f}x")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
