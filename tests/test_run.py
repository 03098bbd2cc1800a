"""Whole recipe runs on tiny random-init models: stages, report, resume after a kill, fail-fast inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from replacer.cli import app
from replacer.recipe import load_recipe
from replacer.run.runner import run_recipe
from helpers import tiny_text_recipe

ROOT = Path(__file__).parent.parent
def test_tiny_run_produces_every_output(tmp_path):
    recipe = load_recipe(tiny_text_recipe(tmp_path))
    report = run_recipe(recipe)
    run = tmp_path / "run"
    for name in ("recipe.yaml", "state.json", "metrics.jsonl", "report.md", "report.json", "evaluation.json"):
        assert (run / name).is_file(), name
    assert (run / "model" / "manifest.json").is_file() and (run / "model" / "model.safetensors").is_file()
    assert set(report["stages"]) == {"distill", "tune", "evaluate", "export"}
    sites = report["site_similarity"]
    assert len(sites) == 2
    for site in sites.values():  # distillation must beat the same mixers untrained
        assert site["student"]["relative_error"] < site["untrained"]["relative_error"]
        assert site["student"]["cka"] > site["untrained"]["cka"]
    assert {len(v) for v in report["layer_cka"].values()} == {2}
    for figure in ("loss_curves", "site_similarity", "layer_cka", "token_similarity", "quality_vs_params"):
        assert (run / "figures" / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(figures/{figure}.png)" in (run / "report.md").read_text()
    fid = report["fidelity"]
    assert fid["student"]["embedding_cosine_mean"] > fid["untrained"]["embedding_cosine_mean"]
    assert report["latency_ms"]["1"]["teacher"] > 0
    assert "| embedding_cosine_mean |" in (run / "report.md").read_text()


def test_each_held_out_source_gets_its_own_figures(tmp_path):
    path = tiny_text_recipe(tmp_path, distill_steps=2, tune_steps=2)
    second = tmp_path / "numbers.txt"
    second.write_text("\n".join(f"{i} kg and {i * 3} m of item {i % 5}" for i in range(24)))
    extra = f'{{kind: text, source: "file:{second}", label: numbers, max_length: 16}}'
    text = path.read_text().replace("max_length: 16}]\n  batch_size", f"max_length: 16}}, {extra}]\n  batch_size")
    assert text != path.read_text()
    path.write_text(text.replace("evaluate: {latency_repeats: 2}", "evaluate: {latency: false, figures: false}"))
    report = run_recipe(load_recipe(path))
    by_source = report["fidelity_by_source"]
    first = f"file:{tmp_path / 'eval.txt'}"
    assert list(by_source) == [first, "numbers"]
    held = {first: 40, "numbers": 24}
    for model, overall in report["fidelity"].items():  # the whole is the example-weighted mean of its parts
        parts = sum(by_source[name][model]["embedding_cosine_mean"] * n for name, n in held.items()) / sum(held.values())
        assert overall["embedding_cosine_mean"] == pytest.approx(parts, abs=1e-5)
        assert by_source[first][model] != by_source["numbers"][model]
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "## Fidelity by held-out source" in markdown and "| numbers | embedding_cosine_mean |" in markdown


def test_rerunning_a_finished_run_redoes_nothing(tmp_path):
    recipe = load_recipe(tiny_text_recipe(tmp_path, distill_steps=5, tune_steps=2))
    run_recipe(recipe)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().count("\n")
    run_recipe(recipe)
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == lines


def test_changed_recipe_needs_restart(tmp_path):
    path = tiny_text_recipe(tmp_path, distill_steps=2, tune_steps=1)
    run_recipe(load_recipe(path))
    from replacer.recipe import RecipeError

    with pytest.raises(RecipeError, match="different recipe"):
        run_recipe(load_recipe(path, ["distill.steps=3"]))
    run_recipe(load_recipe(path, ["distill.steps=3"]), restart=True)


def test_changed_tune_section_retunes_from_the_distilled_student(tmp_path):
    from replacer.checkpoint import load

    path = tiny_text_recipe(tmp_path, distill_steps=3, tune_steps=2)
    first = run_recipe(load_recipe(path))
    run = tmp_path / "run"
    stale = run / "tune" / "state.safetensors"  # a checkpoint left by an interrupted tuning under the old settings
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"not a checkpoint")
    second = run_recipe(load_recipe(path, ["tune.steps=3"]))
    assert second["stages"]["distill"] == first["stages"]["distill"]  # distillation kept, not redone
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tuned = [r["step"] for r in rows if r.get("stage") == "tune" and "loss" in r]
    assert tuned == [1, 2, 1, 2, 3]  # the second tuning started at step 1 from the distilled student
    assert not stale.exists()
    distilled = dict(load(run / "students" / "distilled", trust_remote_code=True).named_parameters())
    retrained = dict(load(run / "students" / "tuned", trust_remote_code=True).named_parameters())
    assert any(not torch.equal(p, distilled[name]) for name, p in retrained.items())

    untuned = run_recipe(load_recipe(path, ["tune.enabled=false"]))  # no tuned student is left to be read
    assert "tune" not in untuned["stages"] and not (run / "students" / "tuned").exists()


def test_a_run_recorded_before_tune_could_change_still_resumes(tmp_path):
    recipe = load_recipe(tiny_text_recipe(tmp_path, distill_steps=2, tune_steps=1))
    run_recipe(recipe)
    state_file = tmp_path / "run" / "state.json"
    state = json.loads(state_file.read_text())
    state["fingerprint"] = recipe.fingerprint_before_retuning()  # what such a run recorded
    state["sections"].pop("tune")
    state_file.write_text(json.dumps(state))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().count("\n")
    run_recipe(recipe)  # resumes: nothing is redone
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == lines
    assert json.loads(state_file.read_text())["fingerprint"] == recipe.fingerprint()
    from replacer.recipe import RecipeError

    state["fingerprint"] = load_recipe(tiny_text_recipe(tmp_path, distill_steps=3, tune_steps=1)).fingerprint_before_retuning()
    state_file.write_text(json.dumps(state))
    with pytest.raises(RecipeError, match="different recipe"):  # an old run of other settings is still refused
        run_recipe(recipe)


def test_changed_tune_section_is_refused_when_the_sparse_teacher_recovered_with_it(tmp_path):
    from replacer.recipe import RecipeError

    path = tiny_text_recipe(tmp_path, distill_steps=2, tune_steps=1)
    sparse = ["sparsify.enabled=true", "sparsify.recovery_steps=1", "sparsify.top_k=4"]
    run_recipe(load_recipe(path, sparse))
    with pytest.raises(RecipeError, match="different recipe"):
        run_recipe(load_recipe(path, [*sparse, "tune.temperature=2"]))


def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    path = tiny_text_recipe(tmp_path, distill_steps=40, tune_steps=4, checkpoint_every=10)
    metrics = tmp_path / "run" / "metrics.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "replacer", "run", str(path)]
    second = "encoder.layer.1.attention.self"
    killed = subprocess.run(
        [sys.executable, "-m", "kill_at_step", second, "15", "run", str(path)], env=env, capture_output=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert "distill" not in state["stages"]
    assert (tmp_path / "run" / "distill" / "encoder.layer.0.attention.self.safetensors").is_file()

    finished = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    first_site_steps = Counter(r["step"] for r in rows if r.get("site") == "encoder.layer.0.attention.self" and "step" in r)
    assert all(count == 1 for count in first_site_steps.values()) and len(first_site_steps) == 40  # not redone
    second_steps = Counter(r["step"] for r in rows if r.get("site") == second and "step" in r)
    assert all(second_steps[s] == 1 for s in range(1, 11))  # resumed from the step-10 checkpoint, not from 0
    assert len(second_steps) == 40
    assert set(json.loads((tmp_path / "run" / "state.json").read_text())["stages"]) == {"distill", "tune", "evaluate", "export"}


def test_deit_recipe_fails_fast_offline_naming_what_is_missing(monkeypatch):
    from replacer.models import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline even where the hub answers
    hub_reachable.cache_clear()
    result = CliRunner().invoke(app, ["run", str(ROOT / "recipes" / "deit_lstm.yaml"), "--set", "run_dir=/tmp/replacer-never"])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "pretrained weights for deit_tiny_patch16_224 cannot be downloaded" in message
    assert "model.checkpoint" in message
    assert "data.train[0].root /data/imagenet/train does not exist" in message
    assert not Path("/tmp/replacer-never").exists()
    hub_reachable.cache_clear()


def test_deit_recipe_runs_on_a_local_checkpoint_and_image_folder(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "deit.safetensors"
    save_file(timm.create_model("deit_tiny_patch16_224").state_dict(), str(weights))
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = np.random.default_rng(i).integers(0, 255, (40 + i * 7, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    result = CliRunner().invoke(
        app,
        [
            "run", str(ROOT / "recipes" / "deit_lstm.yaml"),
            "--set", f"model.checkpoint={weights}", "--set", f"run_dir={tmp_path / 'run'}",
            "--set", f"data.train.0.root={tmp_path / 'train'}", "--set", f"data.eval.0.root={tmp_path / 'val'}",
            "--set", "data.batch_size=2", "--set", "distill.steps=1", "--set", "distill.calibration_batches=1",
            "--set", "distill.cache=memory", "--set", "tune.steps=1", "--set", "evaluate.latency=false",
            "--set", "sites=[0, 11]",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["task"] == "classification"
    assert set(report["fidelity"]["student"]) >= {"teacher_top1", "student_top1", "agreement_with_teacher"}
    assert set(report["site_similarity"]) == {"blocks.0.attn", "blocks.11.attn"}


def test_sites_train_on_worker_processes_from_a_disk_cache(tmp_path):
    overrides = ["distill.workers=2", "distill.cache=disk", "tune.enabled=false", "evaluate.latency=false"]
    recipe = load_recipe(tiny_text_recipe(tmp_path, distill_steps=8), overrides)
    report = run_recipe(recipe)
    cache = tmp_path / "run" / "distill" / "cache"
    assert (cache / "complete").is_file() and len(list((cache / "encoder.layer.1.attention.self").glob("*.safetensors"))) == 8
    for site in report["site_similarity"].values():
        assert site["student"]["relative_error"] < site["untrained"]["relative_error"]


def test_workers_need_the_disk_cache(tmp_path):
    from replacer.recipe import RecipeError

    with pytest.raises(RecipeError, match="set distill.cache to disk"):
        load_recipe(tiny_text_recipe(tmp_path), ["distill.workers=2"])


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed (scripts/install.sh installs it)")
def test_fashion_recipe_trains_a_teacher_then_converts_it(tmp_path):
    """The whole vision recipe on a tiny subset: teacher trained and cached, students evaluated on top-1."""
    tiny = [
        f"run_dir={tmp_path / 'run'}", "data.train.0.limit=512", "data.eval.0.limit=256", "data.batch_size=64",
        "teacher.steps=30", "teacher.checkpoint_every=10", "distill.steps=6", "distill.calibration_batches=2",
        "tune.steps=4", "evaluate.latency_repeats=1",
    ]
    report = run_recipe(load_recipe(ROOT / "recipes" / "fashion_vit_lstm.yaml", tiny))
    assert set(report["stages"]) == {"teacher", "distill", "tune", "evaluate", "export"}
    assert report["stages"]["teacher"]["trained_now"] is True
    fidelity = report["fidelity"]
    assert fidelity["student"]["teacher_top1"] > 18  # 30 steps already beat chance (10%) clearly
    assert {"student_top1", "agreement_with_teacher"} <= set(fidelity["student"])
    cached = list((tmp_path / ".teachers").glob("fashion_vit_lstm-*/model.safetensors"))
    assert len(cached) == 1
    # A changed student recipe in a new run dir reuses the cached teacher instead of retraining it.
    again = run_recipe(load_recipe(ROOT / "recipes" / "fashion_vit_lstm.yaml", [*tiny[1:], f"run_dir={tmp_path / 'run2'}", "tune.steps=2"]))
    assert again["stages"]["teacher"]["trained_now"] is False
    assert again["fidelity"]["student"]["teacher_top1"] == fidelity["student"]["teacher_top1"]
    import replacer

    exported = replacer.load(tmp_path / "run" / "model")  # rebuilt from timm's definition with the recipe's kwargs
    assert exported.patch_embed.proj.in_channels == 1 and len(exported.blocks) == 4
