"""Memory of end-to-end tuning under torchrun: DDP (every rank holds the whole student) vs FSDP (shards).

Each variant tunes recipes/smollm2_hybrid.yaml's student (its sites, block-wise distillation off)
with every weight trained (`tune.train: all`, so gradients and Adam moments are as large as the
model) for a few steps, in a fresh process tree: one process, then two under DDP, then two under
FSDP (`tune.parallel: fsdp`). Reported: the peak resident memory of the largest process of the tree
(ru_maxrss over the waited-for children, so one rank's peak, not the sum), and seconds per step
from the run's metrics. Run directories: runs/sharded_tuning/<variant>.

    .venv/bin/python bench/sharded_tuning.py [--steps 3] [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

RECIPE = Path(__file__).parent.parent / "recipes" / "smollm2_hybrid.yaml"


def run(name: str, processes: int, overrides: list[str]) -> tuple[float, float]:
    """Peak RSS (GiB) of the largest process in a fresh process tree, and the median seconds per tuning step."""
    folder = Path("runs/sharded_tuning") / name
    shutil.rmtree(folder, ignore_errors=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    prefix = [*launcher, "-m", "replacer"] if processes > 1 else [sys.executable, "-m", "replacer"]
    sets = [arg for value in (f"run_dir={folder}", *overrides) for arg in ("--set", value)]
    script = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    out = subprocess.run([sys.executable, "-c", script, *prefix, "run", str(RECIPE), *sets],
                         env=env, capture_output=True, text=True, check=True)
    peak_kib = int(out.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if r.get("stage") == "tune" and "loss" in r]
    step = statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else float("nan")
    return peak_kib / 2**20, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    common = ["distill.enabled=false", "tune.train=all", f"tune.steps={args.steps}", "evaluate.baseline=false",
              "data.eval.0.limit=4", "data.eval.1.limit=4", "export.enabled=false"]
    variants = {
        "one process": (1, common),
        f"{args.processes} processes, ddp": (args.processes, common),
        f"{args.processes} processes, fsdp": (args.processes, [*common, "tune.parallel=fsdp"]),
    }
    console = Console()
    results = {}
    for name, (processes, overrides) in variants.items():
        results[name] = run(name.replace(" ", "_").replace(",", ""), processes, overrides)
        console.log(f"{name}: peak {results[name][0]:.2f} GiB, {results[name][1]:.1f} s/step")
    table = Table(title=f"SmolLM2-135M hybrid, every weight tuned, {args.steps} steps, batch 4 x 256 tokens (CPU)")
    for column in ("variant", "peak RSS of the largest process, GiB", "x one process", "s per step"):
        table.add_column(column)
    base = results["one process"][0]
    for name, (peak, step) in results.items():
        table.add_row(name, f"{peak:.2f}", f"{peak / base:.2f}", f"{step:.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
