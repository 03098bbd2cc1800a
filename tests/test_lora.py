"""End-to-end tuning with low-rank adapters (tune.train: lora): what trains, the merge, loading without PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import replacer
from conftest import tiny_llama, tiny_text_llama
from helpers import greedy_without_cache, tiny_causal_recipe
from replacer.distill.lora import add_lora, lora_targets, merge_lora
from replacer.recipe import LoraSection, load_recipe
from replacer.run.runner import run_recipe

LORA_RUN = """mixer: {plugin: lstm, options: {hidden_per_head: 4}}
distill: {steps: 3, calibration_batches: 3}
tune: {steps: 12, lr: 0.01, train: lora, lora: {rank: 4, alpha: 8}, checkpoint_every: 5, task_weight: 0}
evaluate: {latency: false, figures: false}
"""


def test_default_targets_are_the_kept_linear_layers_not_the_mixers_or_the_head():
    student = replacer.replace(tiny_llama(), "lstm")
    targets = lora_targets(student, None)
    assert "lm_head" not in targets and not any(".mixer." in t for t in targets)
    assert set(targets) == {f"model.layers.{i}.{m}" for i in range(2)
                            for m in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert lora_targets(student, ["*.mlp.down_proj"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(replacer.ReplacerError, match=r"match no linear layer .*names look like"):
        lora_targets(student, ["*.nothing"])


def test_adapters_start_as_no_change_and_merge_into_exactly_what_they_computed():
    torch.manual_seed(0)
    student = replacer.replace(tiny_llama(), "lstm").eval()
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = student(ids).logits
        add_lora(student, LoraSection(rank=2))
        torch.testing.assert_close(student(ids).logits, plain, atol=0, rtol=0)  # B starts at zero
        for name, p in student.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
        adapted = student(ids).logits
        assert not torch.allclose(adapted, plain)
        assert merge_lora(student) == 8
        torch.testing.assert_close(student(ids).logits, adapted, atol=1e-5, rtol=1e-5)
    assert not any("lora" in n for n, _ in student.named_parameters())
    assert set(student.state_dict()) == set(replacer.replace(tiny_llama(), "lstm").state_dict())


def test_a_lora_run_trains_only_mixers_and_adapted_layers_and_exports_a_plain_model(tmp_path):
    report = run_recipe(load_recipe(tiny_causal_recipe(tmp_path, LORA_RUN)))
    run = tmp_path / "run"
    distilled = load_file(run / "students" / "distilled" / "model.safetensors")
    tuned = load_file(run / "students" / "tuned" / "model.safetensors")
    assert set(tuned) == set(distilled)  # merged: no adapter tensors left
    changed = {n for n in tuned if not torch.equal(tuned[n], distilled[n])}
    adapted = {f"model.layers.{i}.{m}.weight" for i in range(2)
               for m in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert adapted <= changed  # every adapted layer moved
    assert changed - adapted and all(".mixer." in n for n in changed - adapted)  # the rest: mixers only
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("stage") == "tune" and "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])  # the tuning lowered its loss
    assert report["fidelity"]["student"]["kl_to_teacher"] < report["fidelity"]["untrained"]["kl_to_teacher"]
    model = replacer.load(run / "model", base=tiny_text_llama())
    assert not any("lora" in n for n, _ in model.named_modules())
    prompt = torch.randint(1000, 2000, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    new = generated.shape[1] - prompt.shape[1]  # up to 4: generation stops at the end-of-text token
    assert new >= 1 and torch.equal(generated, greedy_without_cache(model, prompt, new))


def test_lora_targets_that_match_nothing_fail_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from replacer.cli import app

    path = tiny_causal_recipe(tmp_path, LORA_RUN.replace("alpha: 8", "alpha: 8, targets: ['*.nope']"))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "tune.lora.targets" in result.output and "match no linear layer" in result.output
    assert not (tmp_path / "run" / "students").exists()  # nothing trained or captured


def test_a_killed_lora_tuning_resumes_from_its_checkpoint_to_the_same_student(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    (tmp_path / "whole").mkdir()
    (tmp_path / "killed").mkdir()
    whole = tiny_causal_recipe(tmp_path / "whole", LORA_RUN)
    assert subprocess.run([sys.executable, "-m", "replacer", "run", str(whole)], env=env, capture_output=True, timeout=600).returncode == 0
    path = tiny_causal_recipe(tmp_path / "killed", LORA_RUN)
    killed = subprocess.run([sys.executable, "-m", "kill_at_step", "tune", "7", "run", str(path)], env=env, capture_output=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    resumed = subprocess.run([sys.executable, "-m", "replacer", "run", str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [r["step"] for r in map(json.loads, (tmp_path / "killed" / "run" / "metrics.jsonl").read_text().splitlines())
             if r.get("stage") == "tune" and "loss" in r]
    assert steps == [*range(1, 8), *range(6, 13)]  # steps 6 and 7 again, from the step-5 checkpoint
    one = load_file(tmp_path / "whole" / "run" / "students" / "tuned" / "model.safetensors")
    two = load_file(tmp_path / "killed" / "run" / "students" / "tuned" / "model.safetensors")
    assert set(one) == set(two) and all(torch.equal(one[n], two[n]) for n in one)


def test_an_encoder_tuned_with_lora_exports_merged_weights_that_sentence_transformers_encodes_as_evaluated(tmp_path):
    """The quickstart's path: an embedding model, LoRA on BERT's kept linear layers, the sentence-transformers folder."""
    from helpers import folder_embeddings, saved_embeddings, tiny_text_recipe

    recipe = load_recipe(tiny_text_recipe(tmp_path, distill_steps=2, tune_steps=6),
                         ["tune.train=lora", "tune.lora.rank=4", "tune.lora.alpha=8", "tune.lr=0.02", "evaluate.latency=false"])
    run_recipe(recipe)
    run = tmp_path / "run"
    distilled = load_file(run / "students" / "distilled" / "model.safetensors")
    tuned = load_file(run / "students" / "tuned" / "model.safetensors")
    assert set(tuned) == set(distilled)
    changed = {n for n in tuned if not torch.equal(tuned[n], distilled[n])}
    adapted = {f"encoder.layer.{i}.{m}.weight" for i in range(2)
               for m in ("attention.output.dense", "intermediate.dense", "output.dense")}
    assert adapted <= changed and all(".mixer." in n for n in changed - adapted)
    texts = ["alpha beta gamma", "tau sigma rho pi omicron xi nu mu"]
    _, encoded = folder_embeddings(run / "sentence-transformers", texts)
    torch.testing.assert_close(encoded, saved_embeddings(run / "model", texts, max_length=16), atol=1e-6, rtol=1e-5)
