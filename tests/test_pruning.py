"""Global structural pruning: exact parameter removal, ranking across sites, save/load, the kit's check."""

from __future__ import annotations

import json

import pytest
import torch

import replacer
from conftest import tiny_bert, tiny_deit, tiny_llama
from helpers import greedy_without_cache
from replacer.mixer import PruneGroup
from replacer.pruning import GroupIndex, hoyer_square, mixer_parameters, prune
from replacer.pruning.groups import shrink
from replacer.recurrent import MultiHeadRecurrence
from replacer.testing import check_mixer


def student(plugin: str = "lstm", base=tiny_deit) -> torch.nn.Module:
    torch.manual_seed(0)
    return replacer.replace(base(), plugin).eval()


def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("plugin", ["lstm", "gru"])
def test_removing_one_group_removes_exactly_its_parameters(plugin):
    model = student(plugin)
    index = GroupIndex.of(model)
    mixer = model.blocks[0].attn.mixer
    k, hd, width = mixer.gate_blocks, mixer.head_dim, mixer.widths[0]
    vectors = len(mixer.gate_vectors)
    expected = {
        # gate columns of the input weights, row and gate columns of the recurrent weights (their k
        # crossings counted once), one entry per gate vector, the merge row
        "unit": hd * k + (2 * k * width - k) + vectors * k + hd,
        # in_proj row and bias, the input-weight row of each direction
        "input": mixer.d_model + 1 + mixer.directions * k * width,
    }
    for kind, count in expected.items():
        gid = next(i for i, g in enumerate(index.groups) if g.name.startswith(kind) and index.sites[i] == "blocks.1.attn")
        fresh = student(plugin)
        before = replacer.count_parameters(fresh)
        shrink(fresh, GroupIndex.of(fresh), [gid])
        assert before - replacer.count_parameters(fresh) == count, kind
        assert fresh(images()).shape == (2, 10)


def test_a_zeroed_group_removed_changes_no_output():
    model = student()
    index = GroupIndex.of(model)
    chosen = [i for i, g in enumerate(index.groups) if g.name.endswith(".3")][:5]  # units and inputs, several sites
    index.zero_(chosen)
    with torch.no_grad():
        before = model(images())
        shrink(model, index, chosen)
        torch.testing.assert_close(model(images()), before, atol=1e-5, rtol=1e-5)


def test_ranking_is_global_across_sites():
    model = student()
    with torch.no_grad():  # the second block's mixer is far weaker: magnitude must take everything from it
        for p in model.blocks[1].attn.mixer.parameters():
            p.mul_(1e-3)
    result = prune(model, params=0.8)
    assert set(result.removed_by_site) == {"blocks.1.attn"}
    assert result.mixer_params_after <= round(0.8 * result.mixer_params_before)
    assert result.mixer_params_after == mixer_parameters(model)
    assert model(images()).shape == (2, 10)


def test_every_structure_keeps_a_member_and_impossible_budgets_fail():
    model = student()
    prune(model, params=0.2)
    for block in model.blocks:
        assert min(block.attn.mixer.widths) >= 1 and min(block.attn.mixer.input_widths) >= 1
    with pytest.raises(replacer.ReplacerError, match="larger budget"):
        prune(model, params=10)
    with pytest.raises(replacer.ReplacerError, match=r"fraction in \(0, 1\]"):
        prune(model, params=1.5)


def test_taylor_needs_losses_and_scores_by_effect_on_the_loss():
    model = student()
    with pytest.raises(replacer.ReplacerError, match="needs losses"):
        prune(model, params=0.9, importance="taylor")
    target = model(images()).detach()
    torch.manual_seed(2)
    noisy = model.blocks[0].attn.mixer
    with torch.no_grad():
        noisy.merge_bias.add_(torch.randn_like(noisy.merge_bias))
    result = prune(model, params=0.7, importance="taylor", losses=[lambda: (model(images()) - target).pow(2).mean()])
    assert result.mixer_params_after <= round(0.7 * result.mixer_params_before)
    assert model(images()).shape == (2, 10)


def test_hoyer_square_is_smallest_when_one_group_carries_the_weight():
    model = student()
    index = GroupIndex.of(model)
    groups_per_site = len(index) // 2
    value = hoyer_square(index)
    assert 2.0 <= float(value.detach()) <= 2.0 * groups_per_site
    value.backward()  # differentiable: the tuning stage trains through it
    assert model.blocks[0].attn.mixer.weight_hh[0].grad is not None
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.blocks[0].attn.mixer.weight_hh[0][0, 0] = 1.0
        model.blocks[1].attn.mixer.weight_hh[0][0, 0] = 1.0
    torch.testing.assert_close(hoyer_square(GroupIndex.of(model)), torch.tensor(2.0), atol=1e-2, rtol=0)


@pytest.mark.parametrize("plugin", ["lstm", "ssm"])
@pytest.mark.parametrize("base, example", [(tiny_deit, "image"), (tiny_llama, "text")])
def test_a_pruned_model_saves_and_loads_with_the_same_outputs(tmp_path, base, example, plugin):
    model = student(plugin, base)
    prune(model, params=0.6 if plugin == "lstm" else 0.8)  # ssm: only x-branch channels are prunable
    x = images() if example == "image" else torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    replacer.save(model, tmp_path)
    loaded = replacer.load(tmp_path, base=base())
    assert replacer.count_parameters(loaded) == replacer.count_parameters(model)
    with torch.no_grad():
        out, back = (model(x), loaded(x)) if example == "image" else (model(x).logits, loaded(x).logits)
    torch.testing.assert_close(back, out, atol=0, rtol=0)


@pytest.mark.parametrize("plugin", ["lstm", "gru", "ssm"])
def test_pruned_causal_model_still_decodes_through_the_cache(plugin):
    model = student(plugin, tiny_llama)
    prune(model, params=0.5 if plugin != "ssm" else 0.8)
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, greedy_without_cache(model, ids, 6))


def test_models_without_prunable_groups_are_refused():
    with pytest.raises(replacer.ReplacerError, match="replacer.replace"):
        prune(tiny_bert(), params=0.5)


def test_the_kit_catches_a_group_that_forgets_a_slice(monkeypatch):
    declared = MultiHeadRecurrence.prunable_groups

    def without_merge_rows(self):
        return [PruneGroup(g.name, g.family, tuple(s for s in g.slices if not s[0].startswith("merge_weight")))
                for g in declared(self)]

    monkeypatch.setattr(MultiHeadRecurrence, "prunable_groups", without_merge_rows)
    with pytest.raises((AssertionError, RuntimeError)):
        check_mixer("lstm")


def test_a_recipe_prunes_to_every_budget_and_reports_them(tmp_path):
    from helpers import tiny_text_recipe

    from replacer.recipe import load_recipe
    from replacer.run.runner import run_recipe

    path = tiny_text_recipe(tmp_path, distill_steps=5, tune_steps=4)
    recipe = load_recipe(path, ["prune.enabled=true", "prune.budgets=[0.5,0.8]", "prune.recovery_steps=3",
                                "prune.importance=taylor", "prune.taylor_batches=2"])
    report = run_recipe(recipe)
    assert list(report["stages"]) == ["distill", "tune", "prune", "evaluate", "export"]
    mixers = report["mixer_params"]
    assert mixers["pruned-80"] <= 0.8 * mixers["student"] and mixers["pruned-50"] <= 0.5 * mixers["student"]
    assert mixers["pruned-50"] > 0.4 * mixers["student"]  # budgets are met closely, not overshot
    assert report["params"]["pruned-50"] < report["params"]["pruned-80"] < report["params"]["student"]
    run = tmp_path / "run"
    assert (run / "figures" / "pruning_budgets.png").read_bytes()[:4] == b"\x89PNG"
    text = (run / "report.md").read_text()
    assert "## Pruning budgets" in text and "| pruned-50 |" in text
    recovery = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in recovery if r.get("stage") == "pruned-50" and "loss" in r) == 3

    # changing only the prune section of a finished run redoes pruning and evaluation, nothing earlier
    again = load_recipe(path, ["prune.enabled=true", "prune.budgets=[0.6]", "prune.recovery_steps=0"])
    report = run_recipe(again)
    assert report["stages"]["distill"] == json.loads((run / "state.json").read_text())["stages"]["distill"]
    assert set(report["mixer_params"]) == {"student", "pruned-60", "untrained"}
    assert not (run / "students" / "pruned-50").exists()


def test_the_hoyer_importance_trains_with_the_penalty_before_cutting(tmp_path):
    from helpers import tiny_text_recipe

    from replacer.recipe import load_recipe
    from replacer.run.runner import run_recipe

    path = tiny_text_recipe(tmp_path, distill_steps=3, tune_steps=2)
    recipe = load_recipe(path, ["prune.enabled=true", "prune.budgets=[0.7]", "prune.importance=hoyer",
                                "prune.hoyer_steps=4", "prune.hoyer_weight=0.1", "prune.recovery_steps=1",
                                "evaluate.figures=false", "evaluate.baseline=false"])
    report = run_recipe(recipe)
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("stage") == "hoyer"] == [1, 2, 3, 4]
    assert (run / "students" / "hoyer" / "manifest.json").is_file()
    assert report["mixer_params"]["pruned-70"] <= 0.7 * report["mixer_params"]["student"]


@pytest.mark.parametrize("plugin", ["lstm", "ssm"])
def test_uniform_pruning_keeps_every_head_equally_wide(plugin):
    model = student(plugin, tiny_llama)
    result = prune(model, params=0.6 if plugin == "lstm" else 0.85, uniform=True)
    assert result.mixer_params_after <= round((0.6 if plugin == "lstm" else 0.85) * result.mixer_params_before)
    for layer in model.model.layers:
        mixer = layer.self_attn.mixer
        if plugin == "lstm":
            assert len(set(mixer.widths)) == 1 and len(set(mixer.input_widths)) == 1
            assert mixer.hidden < 8 or mixer.input_widths[0] < 8
        else:
            heads = torch.bincount(torch.div(mixer.channels, mixer.head_dim, rounding_mode="floor"))
            assert len(set(heads.tolist())) == 1 and int(heads[0]) < mixer.head_dim
    with torch.no_grad():
        assert model(torch.randint(1, 100, (2, 5))).logits.shape == (2, 5, 100)


def test_an_interrupted_prune_stage_resumes_from_its_finished_budgets(tmp_path):
    from helpers import tiny_text_recipe

    from replacer.recipe import load_recipe
    from replacer.run.runner import run_recipe

    path = tiny_text_recipe(tmp_path, distill_steps=3, tune_steps=2)
    sets = ["prune.enabled=true", "prune.budgets=[0.8,0.5]", "prune.recovery_steps=2", "prune.importance=hoyer",
            "prune.hoyer_steps=2", "evaluate.figures=false", "evaluate.baseline=false"]
    first = run_recipe(load_recipe(path, sets))
    run = tmp_path / "run"
    state = json.loads((run / "state.json").read_text())
    for stage in ("prune", "evaluate", "export"):  # as if killed after the 80 % budget was saved
        del state["stages"][stage]
    (run / "state.json").write_text(json.dumps(state))
    import shutil

    shutil.rmtree(run / "students" / "pruned-50")
    again = run_recipe(load_recipe(path, sets))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in rows if r.get("stage") == "pruned-80" and "loss" in r) == 2  # not redone
    assert sum(1 for r in rows if r.get("stage") == "hoyer" and "loss" in r) == 2  # not redone
    assert again["mixer_params"]["pruned-80"] == first["mixer_params"]["pruned-80"]
    assert again["mixer_params"]["pruned-50"] <= 0.5 * again["mixer_params"]["student"]


def params_clock(overhead_ms: float):
    """A stand-in for CPU timing: a fixed overhead plus time proportional to the mixers' parameters."""
    return lambda model: overhead_ms + mixer_parameters(model) * 1e-4


@pytest.mark.parametrize("uniform", [False, True])
def test_a_latency_budget_keeps_the_most_parameters_that_run_within_it(uniform):
    model = student()
    before = mixer_parameters(model)
    clock = params_clock(1.0)
    result = prune(model, latency=0.6, measure=clock, uniform=uniform)
    fit = result.latency
    assert fit.target_ms == pytest.approx(0.6 * clock(student()))
    assert clock(model) == pytest.approx(fit.latency_ms) and fit.latency_ms <= fit.target_ms
    exact = (fit.target_ms - 1.0) / 1e-4  # the parameter count at which the clock reads the target
    assert exact - 0.03 * before <= result.mixer_params_after <= exact  # met closely, not overshot
    with torch.no_grad():
        assert model(images()).shape == (2, 10)


def test_an_unreachable_latency_budget_fails_and_leaves_the_model_whole():
    model = student()
    before = mixer_parameters(model)
    with pytest.raises(replacer.ReplacerError, match="out of reach.*larger latency budget"):
        prune(model, latency=0.5, measure=params_clock(100.0))  # the overhead alone exceeds the budget
    assert mixer_parameters(model) == before
    with pytest.raises(replacer.ReplacerError, match="exactly one budget"):
        prune(model)
    with pytest.raises(replacer.ReplacerError, match="exactly one budget"):
        prune(model, params=0.5, latency=0.5, measure=params_clock(1.0))
    with pytest.raises(replacer.ReplacerError, match="measure"):
        prune(model, latency=0.5)


def test_a_recipe_prunes_to_latency_budgets_and_reports_the_timings(tmp_path, monkeypatch):
    from helpers import tiny_text_recipe

    import replacer.run.runner as run_module
    import replacer.run.stages as stages
    from replacer.recipe import load_recipe

    monkeypatch.setattr(stages, "latency_measure", lambda *_: params_clock(0.5))
    path = tiny_text_recipe(tmp_path, distill_steps=3, tune_steps=2)
    recipe = load_recipe(path, ["prune.enabled=true", "prune.target=latency", "prune.budgets=[0.9,0.7]",
                                "prune.recovery_steps=1", "evaluate.figures=false", "evaluate.baseline=false"])
    report = run_module.run_recipe(recipe)
    budgets = report["stages"]["prune"]["budgets"]
    tuned_ms = budgets["pruned-90"]["tuned_ms"]
    assert tuned_ms == pytest.approx(0.5 + report["mixer_params"]["student"] * 1e-4)
    for name, fraction in (("pruned-90", 0.9), ("pruned-70", 0.7)):
        assert budgets[name]["target_ms"] == pytest.approx(fraction * tuned_ms)
        assert 0.5 + report["mixer_params"][name] * 1e-4 <= budgets[name]["target_ms"] + 1e-9
    assert report["mixer_params"]["pruned-70"] < report["mixer_params"]["pruned-90"] < report["mixer_params"]["student"]
    text = (tmp_path / "run" / "report.md").read_text()
    assert "fraction of the tuned student's CPU latency" in text and "pruning: target ms" in text


def test_an_unreachable_latency_budget_stops_the_stage_and_keeps_the_budgets_before_it(tmp_path, monkeypatch):
    from helpers import tiny_text_recipe

    import replacer.run.runner as run_module
    import replacer.run.stages as stages
    from replacer.recipe import load_recipe

    monkeypatch.setattr(stages, "latency_measure", lambda *_: params_clock(0.5))
    path = tiny_text_recipe(tmp_path, distill_steps=2, tune_steps=1)
    recipe = load_recipe(path, ["prune.enabled=true", "prune.target=latency", "prune.budgets=[0.9,0.2]",
                                "prune.recovery_steps=1", "evaluate.figures=false", "evaluate.baseline=false"])
    with pytest.raises(replacer.ReplacerError, match="out of reach"):  # 20 % is below the clock's fixed 0.5 ms
        run_module.run_recipe(recipe)
    students = tmp_path / "run" / "students"
    assert (students / "pruned-90" / "manifest.json").is_file() and not (students / "pruned-20").exists()
