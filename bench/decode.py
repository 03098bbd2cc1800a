"""Decoding on SmolLM2-135M: per-token time, cache size and prefill time vs context length.

Run: python bench/decode.py [--lengths 512 1024 2048 4096 8192] [--plugins lstm ssm] [--steps 8]

Variants, all measured in the same run: the teacher; every attention layer replaced by each
plugin's mixer; the upper half of the layers replaced by the first plugin's (a hybrid whose
cache holds keys and values for the lower half only). For each context length L the prompt of
L - steps random tokens is prefilled once (timed), then `steps` tokens are decoded one at a time
through the model's cache (median time per token), ending at L tokens of context. The cache is
what the model holds after that: keys and values (attention layers) plus mixer state (replaced
layers). Mixers are untrained: time and memory do not depend on their weights. Batch 1, fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

from replacer.train.allocator import keep_freed_memory
import replacer
from replacer_transformers.cache import cache_argument_name, cache_bytes


@torch.no_grad()
def measure(model: torch.nn.Module, length: int, steps: int) -> dict[str, float]:
    """Prefill time (s), median decode time per token (ms) and cache bytes at `length` tokens of context."""
    torch.manual_seed(0)
    prompt = torch.randint(100, 40000, (1, length - steps))
    cache = DynamicCache(config=model.config)
    key = cache_argument_name(model)
    start = time.perf_counter()
    logits = model(prompt, use_cache=True, **{key: cache}).logits
    prefill = time.perf_counter() - start
    token = logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = model(token, use_cache=True, **{key: cache}).logits
        times.append((time.perf_counter() - start) * 1e3)
        token = logits[:, -1:].argmax(-1)
    return {"prefill_s": prefill, "decode_ms": statistics.median(times), **cache_bytes(cache)}


def variants(teacher: torch.nn.Module, plugins: list[str]) -> dict[str, torch.nn.Module]:
    layers = len(replacer.scan(teacher).sites)
    out = {"teacher": teacher}
    for plugin in plugins:
        out[f"{plugin}, all {layers} layers"] = replacer.replace(teacher, plugin=plugin).eval()
    upper = list(range(layers // 2, layers))
    out[f"{plugins[0]}, layers {upper[0]}-{upper[-1]}"] = replacer.replace(teacher, plugin=plugins[0], sites=upper).eval()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--plugins", nargs="+", default=["lstm", "ssm"])
    parser.add_argument("--steps", type=int, default=8, help="decoded tokens per length (median reported)")
    args = parser.parse_args()
    keep_freed_memory()  # as the command line does (replacer.train.allocator)
    console = Console(width=140)
    teacher = replacer.load_model("smollm2").eval()
    models = variants(teacher, args.plugins)
    results: dict[tuple[str, int], dict[str, float]] = {}
    for length in args.lengths:
        for name, model in models.items():
            results[name, length] = measure(model, length, args.steps)
            r = results[name, length]
            console.log(f"{name} @ {length}: decode {r['decode_ms']:.1f} ms/token, prefill {r['prefill_s']:.2f} s")
    table = Table(title=f"SmolLM2-135M decoding, batch 1, fp32, CPU ({torch.get_num_threads()} threads); "
                        f"decode: median of {args.steps} tokens; ratios against the teacher at the same length")
    for col in ("context", "model", "decode ms/token", "x teacher", "cache MiB (KV + state)", "x teacher",
                "prefill s", "x teacher"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for length in args.lengths:
        base = results["teacher", length]
        base_cache = base["kv"] + base["mixer_state"]
        for name in models:
            r = results[name, length]
            held = r["kv"] + r["mixer_state"]
            table.add_row(
                str(length) if name == "teacher" else "", name,
                f"{r['decode_ms']:.1f}", f"{r['decode_ms'] / base['decode_ms']:.2f}",
                f"{held / 2**20:.2f}", f"{held / base_cache:.4f}",
                f"{r['prefill_s']:.2f}", f"{r['prefill_s'] / base['prefill_s']:.2f}",
            )
    console.print(table)


if __name__ == "__main__":
    main()
