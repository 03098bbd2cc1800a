"""torchrun: two CPU processes (gloo) run a recipe and get what one process gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from replacer.train.batches import BatchPlan
from replacer.train.distributed import SINGLE, World
from helpers import write_idx

SITES = ["blocks.0.attn", "blocks.1.attn"]


def tiny_vision_recipe(folder: Path) -> Path:
    """A 2-block DeiT on random 8 x 8 IDX images: the task loss keeps tuning gradients large and
    per-example means make two half-batches average to exactly the whole batch."""
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir()
    for prefix, count in (("train", 64), ("t10k", 32)):
        write_idx(images / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 8, 8)), "u1", False)
        write_idx(images / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 4, "u1", False)
    path = folder / "tiny.yaml"
    path.write_text(f"""
name: tiny-vision
model:
  source: deit_tiny_patch16_224
  pretrained: false
  kwargs: {{img_size: 8, patch_size: 2, in_chans: 1, num_classes: 4, embed_dim: 32, depth: 2, num_heads: 2}}
  task: classification
data:
  train: [{{kind: idx, folder: {images}, split: train}}]
  eval: [{{kind: idx, folder: {images}, split: test}}]
  batch_size: 16
mixer: {{plugin: lstm, options: {{hidden_per_head: 8}}}}
distill: {{steps: 20, lr: 0.01, calibration_batches: 4}}
tune: {{steps: 10, lr: 0.003}}
evaluate: {{latency: false}}
""")
    return path


def _run(recipe: Path, run_dir: Path, processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    prefix = launcher + ["-m", "replacer"] if processes > 1 else [sys.executable, "-m", "replacer"]
    return subprocess.run(
        prefix + ["run", str(recipe), "--set", f"run_dir={run_dir}"], env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    tmp = tmp_path_factory.mktemp("torchrun")
    recipe = tiny_vision_recipe(tmp)
    folders = {}
    for processes in (1, 2):
        folders[processes] = tmp / f"run{processes}"
        result = _run(recipe, folders[processes], processes)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folders


def test_block_wise_sites_are_dealt_out_and_equal_a_single_process(runs):
    rows = [json.loads(line) for line in (runs[2] / "metrics.jsonl").read_text().splitlines()]
    assert {r["site"] for r in rows if "final_loss" in r} == set(SITES)
    assert (runs[2] / "distill" / "cache").exists() is False  # the default memory cache writes nothing
    for site in SITES:  # each site trained by one rank on the same pairs with the same seed: identical
        one = load_file(str(runs[1] / "distill" / f"{site}.safetensors"))
        two = load_file(str(runs[2] / "distill" / f"{site}.safetensors"))
        for key in one:
            torch.testing.assert_close(two[key], one[key], atol=0, rtol=0)


def test_ddp_tuning_matches_a_single_process(runs):
    def tune_losses(folder: Path) -> list[float]:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r.get("stage") == "tune"]

    one, two = tune_losses(runs[1]), tune_losses(runs[2])
    assert len(one) == len(two) == 10  # rank 0 alone logs, once per step
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=1e-4, rtol=1e-4)
    tuned = {n: load_file(str(runs[n] / "model" / "model.safetensors")) for n in (1, 2)}
    distilled = load_file(str(runs[1] / "students" / "distilled" / "model.safetensors"))
    sites = {k.split(".mixer.")[0] for k in distilled if ".mixer." in k}
    assert len(sites) == 2
    for site in sites:  # tuning moved every mixer
        keys = [k for k in distilled if k.startswith(f"{site}.mixer.")]
        assert any(not torch.equal(tuned[1][k], distilled[k]) for k in keys), site
    for k in (k for k in distilled if ".mixer." in k):
        torch.testing.assert_close(tuned[2][k], tuned[1][k], atol=1e-5, rtol=1e-4)
    one = json.loads((runs[1] / "report.json").read_text())["fidelity"]["student"]
    two = json.loads((runs[2] / "report.json").read_text())["fidelity"]["student"]
    assert two["agreement_with_teacher"] == one["agreement_with_teacher"]


def test_every_rank_gets_a_share_and_shares_cover_the_batch():
    plan = BatchPlan(list(range(10)), 5, collate=list, seed=3)
    shares = [plan.batch(4, World(rank, 2)) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(plan.batch(4))
    assert len(shares[0]) == 3 and len(shares[1]) == 2
    world = World(1, 3)
    assert world.mine(["a", "b", "c", "d", "e"]) == ["b", "e"] and not world.is_main
    assert SINGLE.mine(["a", "b"]) == ["a", "b"] and SINGLE.mean(torch.tensor(2.5)) == 2.5
