"""One attention block vs each mixer that can replace it: forward time at 197 / 1024 / 4096 tokens.

Run: python bench/mixers.py [--lengths 197 1024 4096] [--plugins lstm gru ssm] [--repeats 5]

lstm and gru are timed twice in the same run: on the fused kernels (replacer.fused, the default on
the CPU) and on the reference loop, so both ratios come from one machine state.

Two site shapes: deit_tiny's (width 192, 3 heads x 64, bidirectional) and SmolLM2-135M's (width
576, 9 heads x 64, causal). The teacher block is qkv projection -> torch SDPA -> output projection;
a replaced block is mixer -> the same output projection, which is what the engine installs.
Batch 1, fp32, medians; ratios against SDPA at the same length, measured in the same run.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from replacer.train.allocator import keep_freed_memory
from replacer import fused
from replacer.metrics.timing import interleaved_latency_ms
from replacer.graph.site import Site
from replacer.plugins import get_registry


class SDPABlock(nn.Module):
    """The attention a site holds: fused qkv, scaled dot-product attention (torch SDPA), output projection."""

    def __init__(self, site: Site) -> None:
        super().__init__()
        self.site = site
        self.qkv = nn.Linear(site.d_model, 3 * site.out_dim)
        self.proj = nn.Linear(site.out_dim, site.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.site.num_heads, self.site.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.site.causal)
        return self.proj(y.transpose(1, 2).reshape(B, N, -1))


SITES = {
    "deit_tiny block (192 wide, 3 x 64, bidirectional)": Site(
        name="blocks.0.attn", cls="Attention", adapter="bench", layer_index=0, d_model=192, num_heads=3, head_dim=64,
        num_kv_heads=3, causal=False,
    ),
    "SmolLM2 block (576 wide, 9 x 64, causal)": Site(
        name="layers.0.self_attn", cls="LlamaAttention", adapter="bench", layer_index=0, d_model=576, num_heads=9,
        head_dim=64, num_kv_heads=9, causal=True,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[197, 1024, 4096])
    parser.add_argument("--plugins", nargs="+", default=["lstm", "gru", "ssm"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does (replacer.train.allocator)
    registry = get_registry()
    table = Table(title=f"one block, batch 1, fp32, CPU ({torch.get_num_threads()} threads), median of {args.repeats}, timed in turns")
    for col in ("site", "tokens", "module", "ms", "x SDPA"):
        table.add_column(col, justify="left" if col in ("site", "module") else "right")
    for label, site in SITES.items():
        torch.manual_seed(0)
        teacher = SDPABlock(site).eval()
        blocks = {"attention (SDPA)": (teacher, "auto")}
        for plugin in args.plugins:
            spec = registry.mixer(plugin)
            mixer = spec.build(site, spec.validate_options({}), None)
            block = nn.Sequential(mixer, teacher.proj).eval()
            if getattr(type(mixer), "fused_cell", None) is None:
                blocks[plugin] = (block, "auto")
            else:
                blocks[f"{plugin} (fused)"], blocks[f"{plugin} (reference loop)"] = (block, "fused"), (block, "reference")
        for length in args.lengths:
            x = torch.randn(1, length, site.d_model)
            # recurrence(path) as a decorator: each call runs on that path; all timed in turns
            calls = {name: fused.recurrence(path)(lambda b=block, x=x: b(x)) for name, (block, path) in blocks.items()}
            times = interleaved_latency_ms(calls, args.repeats, warmup=1)
            for name, ms in times.items():
                first = name == "attention (SDPA)"
                table.add_row(label if first and length == args.lengths[0] else "", str(length) if first else "", name,
                              f"{ms:.2f}", f"{ms / times['attention (SDPA)']:.2f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
