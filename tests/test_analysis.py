"""Teacher-student similarity analysis: CKA, per-site and per-layer similarity, token matrices, figures."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

import replacer
from conftest import tiny_deit, tiny_text_bert
from replacer.metrics import similarity
from replacer.report import figures
from replacer.graph.adapter import site_wrappers
from replacer.distill.capture import capture_sites
from replacer.tasks import ClassificationTask, EmbeddingTask

PNG = b"\x89PNG\r\n\x1a\n"


# ---- linear CKA ------------------------------------------------------------------------------------


def test_cka_of_identical_inputs_is_one():
    x = torch.randn(50, 8)
    assert similarity.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n", [30, 200])  # Gram form (n < features) and feature form
def test_cka_ignores_rotation_and_isotropic_scaling(n):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 64, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    assert similarity.linear_cka(x, 3.5 * x @ q) == pytest.approx(1.0, abs=1e-9)


def test_cka_of_independent_inputs_is_small_and_symmetric():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((500, 20)), rng.standard_normal((500, 20))
    value = similarity.linear_cka(x, y)
    assert 0 <= value < 0.2
    assert similarity.linear_cka(y, x) == pytest.approx(value, abs=1e-12)


def test_cka_compares_different_widths_and_rejects_mismatched_samples():
    x = torch.randn(40, 6)
    assert similarity.linear_cka(x, torch.cat([x, torch.zeros(40, 3)], dim=1)) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="same samples"):
        similarity.linear_cka(torch.randn(10, 4), torch.randn(11, 4))


# ---- tiny models -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision():
    torch.manual_seed(0)
    teacher = tiny_deit().eval()
    student = replacer.replace(teacher, plugin="lstm").eval()
    batches = [{"images": torch.randn(4, 3, 32, 32), "labels": torch.randint(0, 10, (4,))} for _ in range(2)]
    return teacher, student, ClassificationTask(), batches


@pytest.fixture(scope="module")
def text():
    teacher = tiny_text_bert().eval()
    student = replacer.replace(teacher, plugin="lstm", options={"hidden_per_head": 8}).eval()
    task = EmbeddingTask(replacer.get_registry().load_tokenizer("minilm"), max_length=16)
    batches = [
        task.collate(["alpha beta", "gamma delta epsilon zeta eta theta", "iota"]),
        task.collate(["kappa lambda mu nu", "xi"]),
    ]
    assert not batches[0]["attention_mask"].bool().all()  # padded
    return teacher, student, task, batches


def _faithful(teacher, student):
    """`student` made to compute exactly what `teacher` does: every wrapper runs the original attention."""
    student = copy.deepcopy(student)
    originals = copy.deepcopy(teacher)
    for name, wrapper in site_wrappers(student).items():
        original = originals.get_submodule(name)
        wrapper.forward = original.forward
        wrapper.mix = lambda x, keep, original=original: original(x)
    return student


def _repad(batch):
    """The same batch with different token ids at padded positions."""
    ids = batch["input_ids"].clone()
    ids[~batch["attention_mask"].bool()] = 1037
    return {**batch, "input_ids": ids}


def test_site_similarity_covers_every_site_and_matches_a_direct_sum(text):
    teacher, student, task, batches = text
    stats = similarity.site_similarity(teacher, student, task, batches)
    assert list(stats) == list(site_wrappers(student))
    wrappers = site_wrappers(student)
    num = {name: 0.0 for name in wrappers}
    den = dict(num)
    with torch.no_grad(), capture_sites(teacher, wrappers) as records:
        for batch in batches:
            task.run(teacher, batch)
    with torch.no_grad():
        for name, pairs in records.items():  # summed over real tokens, independently of the service
            for x, y, keep in pairs:
                err, power = (wrappers[name].mix(x, keep) - y).pow(2).sum(-1), y.pow(2).sum(-1)
                num[name] += err[keep].sum().item() if keep is not None else err.sum().item()
                den[name] += power[keep].sum().item() if keep is not None else power.sum().item()
    for name, values in stats.items():
        assert values["relative_error"] == pytest.approx(num[name] / den[name], rel=1e-5)
        assert 0 <= values["cka"] <= 1 + 1e-9
        assert -1 <= values["cosine"] <= 1


def test_site_similarity_of_a_faithful_mixer_is_perfect(vision):
    teacher, student, task, batches = vision
    stats = similarity.site_similarity(teacher, _faithful(teacher, student), task, batches)
    for values in stats.values():
        assert values["cka"] == pytest.approx(1.0, abs=1e-6)
        assert values["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert values["relative_error"] == pytest.approx(0.0, abs=1e-10)


def test_token_subsampling_bounds_and_is_deterministic(vision):
    teacher, student, task, batches = vision
    batches = batches[:1]
    first = similarity.site_similarity(teacher, student, task, batches, max_tokens=20)
    assert first == similarity.site_similarity(teacher, student, task, batches, max_tokens=20)
    full = similarity.site_similarity(teacher, student, task, batches)
    for name in first:  # cosine and error use every token; only CKA is sampled
        assert first[name]["relative_error"] == pytest.approx(full[name]["relative_error"], rel=1e-6)
        assert first[name]["cka"] != full[name]["cka"]


def test_block_names_find_the_layers():
    assert similarity.block_names(replacer.replace(tiny_deit())) == ["blocks.0", "blocks.1"]
    assert similarity.block_names(replacer.replace(tiny_text_bert(), sites=[1])) == ["encoder.layer.1"]


def test_layer_cka_per_block_and_one_for_a_faithful_student(vision, text):
    for teacher, student, task, batches in (vision, text):
        values = similarity.layer_cka(teacher, student, task, batches)
        assert len(values) == len(similarity.block_names(student))
        assert all(0 <= v <= 1 + 1e-9 for v in values)
        same = similarity.layer_cka(teacher, _faithful(teacher, student), task, batches)
        assert same == pytest.approx([1.0] * len(values), abs=1e-6)


def test_layer_cka_with_explicit_blocks_of_the_teacher_itself(vision):
    teacher, _, task, batches = vision
    assert similarity.layer_cka(teacher, teacher, task, batches, blocks=["blocks.0", "blocks.1"]) == pytest.approx(
        [1.0, 1.0], abs=1e-9
    )


def test_padded_tokens_do_not_count(text):
    teacher, student, task, batches = text
    repadded = [_repad(b) for b in batches]
    assert not torch.equal(repadded[0]["input_ids"], batches[0]["input_ids"])
    sites = similarity.site_similarity(teacher, student, task, batches)
    again = similarity.site_similarity(teacher, student, task, repadded)
    for name in sites:
        assert again[name] == pytest.approx(sites[name], abs=1e-6)
    assert similarity.layer_cka(teacher, student, task, repadded) == pytest.approx(
        similarity.layer_cka(teacher, student, task, batches), abs=1e-6
    )
    site = next(iter(sites))
    t, s = similarity.token_similarity(teacher, student, task, batches[0], site, index=0)
    t2, s2 = similarity.token_similarity(teacher, student, task, repadded[0], site, index=0)
    assert torch.allclose(t, t2, atol=1e-6) and torch.allclose(s, s2, atol=1e-6)


def test_token_similarity_is_over_real_tokens(text):
    teacher, student, task, batches = text
    site = "encoder.layer.0.attention.self"
    for index in range(3):
        t, s = similarity.token_similarity(teacher, student, task, batches[0], site, index=index)
        n = int(batches[0]["attention_mask"][index].sum())
        assert t.shape == s.shape == (n, n)
        assert torch.allclose(t.diagonal(), torch.ones(n, dtype=t.dtype))
        assert torch.allclose(s.diagonal(), torch.ones(n, dtype=s.dtype))


# ---- figures ---------------------------------------------------------------------------------------


def _check_png(path, min_size=(300, 200)):
    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as image:
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]


def test_every_plot_writes_a_png(tmp_path, vision):
    teacher, student, task, batches = vision
    per_site = similarity.site_similarity(teacher, student, task, batches)
    _check_png(figures.plot_layer_similarity({"student": [0.9, 0.8], "untrained": per_site}, tmp_path / "layers.png"))
    t, s = similarity.token_similarity(teacher, student, task, batches[0], "blocks.1.attn")
    _check_png(figures.plot_token_similarity([(t, s, "image 0"), (t.numpy(), s.numpy(), "again")], tmp_path / "tokens.png"))
    points = [{"label": "teacher", "params": 5.5e6, "value": 72.2}, {"label": "lstm", "params": 4.9e6, "value": 70.1}]
    _check_png(figures.plot_accuracy_vs_params(points, tmp_path / "acc.png", "top-1 (%)"))


def test_loss_curves_keep_the_last_record_of_a_resumed_step(tmp_path):
    rows = [{"site": f"blocks.{i}.attn", "step": k, "loss": 1.0 / k + i} for i in range(2) for k in range(1, 31)]
    rows += [{"site": "blocks.1.attn", "step": k, "loss": 5.0} for k in range(11, 16)]  # resumed after step 10
    rows += [{"site": "blocks.0.attn", "final_loss": 0.1}]
    rows += [{"stage": "tune", "step": 1, "loss": 0.5}, {"stage": "tune", "step": 2, "loss": 0.4}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"time": 0.0, **r}) for r in rows) + "\n")
    losses = figures.read_losses(metrics)
    assert set(losses) == {"distill", "tune"}
    assert len(losses["distill"]["blocks.1.attn"]) == 30 and losses["distill"]["blocks.1.attn"][12] == 5.0
    assert losses["tune"]["tune"] == {1: 0.5, 2: 0.4}
    _check_png(figures.plot_loss_curves(metrics, tmp_path / "loss.png"), min_size=(600, 200))
