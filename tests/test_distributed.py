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


def _run(recipe: Path, run_dir: Path, processes: int, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    prefix = launcher + ["-m", "replacer"] if processes > 1 else [sys.executable, "-m", "replacer"]
    sets = [arg for value in (f"run_dir={run_dir}", *overrides) for arg in ("--set", value)]
    return subprocess.run(prefix + ["run", str(recipe), *sets], env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int | str, Path]:
    """One process, two under DDP, and two under FSDP (`"fsdp"`), on the same recipe."""
    tmp = tmp_path_factory.mktemp("torchrun")
    recipe = tiny_vision_recipe(tmp)
    folders: dict[int | str, Path] = {}
    for key, processes, overrides in ((1, 1, ()), (2, 2, ()), ("fsdp", 2, ("tune.parallel=fsdp",))):
        folders[key] = tmp / f"run{key}"
        result = _run(recipe, folders[key], processes, *overrides)
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


def test_sharded_tuning_matches_a_single_process(runs):
    """FSDP: each rank trains shards of the student; the gathered model is what one process trains."""
    rows = [json.loads(line) for line in (runs["fsdp"] / "metrics.jsonl").read_text().splitlines()]
    two = [r["loss"] for r in rows if r.get("stage") == "tune"]
    rows = [json.loads(line) for line in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    one = [r["loss"] for r in rows if r.get("stage") == "tune"]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=1e-4, rtol=1e-4)
    tuned = {n: load_file(str(runs[n] / "model" / "model.safetensors")) for n in (1, "fsdp")}
    assert set(tuned["fsdp"]) == set(tuned[1])
    for k in tuned[1]:  # every weight, trained or not, comes back whole
        assert tuned["fsdp"][k].shape == tuned[1][k].shape, k
        torch.testing.assert_close(tuned["fsdp"][k], tuned[1][k], atol=1e-5, rtol=1e-4)


def test_sharded_weights_gradients_and_checkpoints_across_two_ranks(tmp_path):
    """Inside `sharded` each rank holds shards and the student's own weights are released; a checkpoint of
    shards restores exactly; the gathered result equals one process training on the whole batches."""
    from shard_worker import Stack, train

    from replacer.train.optimizers import adam

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(launcher + ["-m", "shard_worker", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    torch.manual_seed(0)
    reference = Stack()
    params = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    losses = train(reference, params, 0, 1, range(5), adam(params.values(), lr=0.05))
    sharded_losses = [float(x) for x in (tmp_path / "losses.txt").read_text().split()]
    torch.testing.assert_close(torch.tensor(sharded_losses), torch.tensor(losses), atol=1e-5, rtol=1e-5)
    trained = load_file(str(tmp_path / "trained.safetensors"))
    for name, p in reference.named_parameters():
        torch.testing.assert_close(trained[name], p.detach(), atol=1e-5, rtol=1e-4)


def test_a_hybrid_llm_tunes_with_lora_sharded_as_one_process_does(tmp_path):
    """Head-level hybrid of a tiny Llama (tied embeddings, rotary buffers), LoRA on the kept layers,
    tuned under FSDP on two ranks: the merged, exported student equals a one-process run's."""
    from helpers import tiny_causal_recipe

    recipe = tiny_causal_recipe(tmp_path, """sites: {policy: random-heads, fraction: 0.5, kv_groups: true}
mixer: {plugin: lstm, options: {hidden_per_head: 4}}
distill: {steps: 3, calibration_batches: 2}
tune: {steps: 4, lr: 0.01, train: lora, lora: {rank: 2, alpha: 4}}
evaluate: {latency: false, figures: false, baseline: false}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "replacer"]
    folders = {}
    for name, prefix in (("one", [sys.executable, "-m", "replacer"]), ("fsdp", launcher)):
        folders[name] = tmp_path / name
        sets = ["--set", f"run_dir={folders[name]}", "--set", "tune.parallel=fsdp"]
        result = subprocess.run(prefix + ["run", str(recipe), *sets], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = (load_file(str(folders[n] / "model" / "model.safetensors")) for n in ("one", "fsdp"))
    distilled = load_file(str(folders["one"] / "students" / "distilled" / "model.safetensors"))
    assert set(one) == set(two) and not any("lora" in k for k in one)  # adapters merged before saving
    assert any(not torch.equal(one[k], distilled[k]) for k in one if ".o_proj." in k)  # the merged adapters moved them
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4)


def test_blocks_are_the_outermost_repeated_layers():
    import timm

    from replacer.train.sharding import repeated_blocks

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=3, embed_dim=32, num_heads=2)
    assert repeated_blocks(model) == list(model.blocks)


def test_every_rank_gets_a_share_and_shares_cover_the_batch():
    plan = BatchPlan(list(range(10)), 5, collate=list, seed=3)
    shares = [plan.batch(4, World(rank, 2)) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(plan.batch(4))
    assert len(shares[0]) == 3 and len(shares[1]) == 2
    world = World(1, 3)
    assert world.mine(["a", "b", "c", "d", "e"]) == ["b", "e"] and not world.is_main
    assert SINGLE.mine(["a", "b"]) == ["a", "b"] and SINGLE.mean(torch.tensor(2.5)) == 2.5
