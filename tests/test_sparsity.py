"""The sparsity analyzer: recorded probabilities are the model's own eager attention; statistics are right."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import replacer
from conftest import FAMILIES, tiny_bert, tiny_deit, tiny_gpt2, tiny_llama
from replacer_sparsity import analyze_sparsity, head_sums


def record(model, site_name: str, call):
    site = replacer.scan(model).site(site_name)
    adapter = {a.name: a for a in replacer.get_registry().adapters}[site.adapter]
    with torch.no_grad(), adapter.record_attention(model.get_submodule(site_name)) as probs:
        out = call()
    return probs, out


@pytest.mark.parametrize("factory, site", [
    (tiny_bert, "encoder.layer.1.attention.self"),
    (tiny_llama, "model.layers.1.self_attn"),
    (tiny_gpt2, "transformer.h.1.attn"),
])
def test_recorded_probabilities_equal_the_models_own_eager_attention(factory, site):
    torch.manual_seed(0)
    model = factory().eval()
    assert model.config._attn_implementation == "sdpa"  # a fused kernel that returns no probabilities
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        fused = model(ids, attention_mask=mask)
    probs, out = record(model, site, lambda: model(ids, attention_mask=mask))
    assert model.config._attn_implementation == "sdpa"  # restored
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        reference = eager(ids, attention_mask=mask, output_attentions=True).attentions[1]
    assert len(probs) == 1
    torch.testing.assert_close(probs[0], reference, atol=1e-6, rtol=1e-5)
    main = "last_hidden_state" if hasattr(out, "last_hidden_state") else "logits"
    torch.testing.assert_close(getattr(out, main), getattr(fused, main), atol=1e-4, rtol=1e-4)


def test_timm_probabilities_rebuild_the_attention_output():
    torch.manual_seed(0)
    model = tiny_deit().eval()
    attn = model.blocks[0].attn
    fused = attn.fused_attn
    seen = {}
    attn.register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o) and None)
    probs, _ = record(model, "blocks.0.attn", lambda: model(torch.randn(2, 3, 32, 32)))
    assert attn.fused_attn == fused  # restored
    x, y = seen["x"], seen["y"]
    B, N, C = x.shape
    v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim)[:, :, 2].transpose(1, 2)
    rebuilt = attn.proj((probs[0] @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(rebuilt, y, atol=1e-5, rtol=1e-5)


def test_statistics_of_known_attention_patterns():
    n = 6
    identity = torch.eye(n)[None, None]  # every query attends only itself
    sums, count = head_sums(identity, top_k=2, window=1, causal=False)
    means = {k: float(v[0] / count) for k, v in sums.items()}
    assert means == pytest.approx({"entropy": 0.0, "top_k_mass": 1.0, "recency": 1.0, "distance": 0.0}, abs=1e-6)

    uniform = torch.full((1, 1, n, n), 1 / n)
    sums, count = head_sums(uniform, top_k=2, window=1, causal=False)
    distances = torch.tensor([[abs(i - j) for j in range(n)] for i in range(n)], dtype=torch.float)
    assert float(sums["entropy"][0] / count) == pytest.approx(1.0, abs=1e-5)
    assert float(sums["top_k_mass"][0] / count) == pytest.approx(2 / n, abs=1e-6)
    assert float(sums["distance"][0] / count) == pytest.approx(float(distances.mean()), abs=1e-5)
    assert float(sums["recency"][0] / count) == pytest.approx(float((distances <= 1).float().mean()), abs=1e-6)

    causal = torch.tril(torch.ones(n, n))
    causal = (causal / causal.sum(-1, keepdim=True))[None, None]
    sums, count = head_sums(causal, top_k=2, window=1, causal=True)
    assert int(count) == n - 1  # the first query sees one key: not counted
    assert float(sums["entropy"][0] / count) == pytest.approx(1.0, abs=1e-5)

    padded = torch.zeros(1, 1, n, n)
    padded[..., :4] = 0.25  # the last two tokens are padding: no query attends to them
    sums, count = head_sums(padded, top_k=2, window=1, causal=False)
    assert int(count) == 4 and float(sums["entropy"][0] / count) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_analyzer_covers_every_family(name):
    factory, inputs, n_sites, causal = FAMILIES[name]
    torch.manual_seed(0)
    model = factory().eval()
    sites = replacer.scan(model).sites
    args, kwargs = inputs()
    stats = replacer.get_registry().analyzer("sparsity")(model, sites, [lambda: model(*args, **kwargs)] * 2)
    assert len(stats) == n_sites
    for site in sites:
        heads = stats[site.name]["heads"]
        assert set(heads) == {"entropy", "top_k_mass", "recency", "distance"}
        assert all(len(v) == site.num_heads for v in heads.values())
        assert all(0 <= e <= 1 + 1e-5 for e in heads["entropy"])
        assert all(0 <= m <= 1 + 1e-5 for m in heads["top_k_mass"] + heads["recency"])
    assert not math.isnan(stats[sites[0].name]["mean"]["entropy"])


def test_a_site_never_called_is_an_error():
    model = tiny_bert().eval()
    with pytest.raises(RuntimeError, match="never called"):
        analyze_sparsity(model, replacer.scan(model).sites, [])


def _fake_statistics(entropies: dict[str, float], recency: dict[str, list[float]] | None = None) -> dict:
    return {
        name: {"layer_index": i, "mean": {"entropy": e}, "heads": {"recency": (recency or {}).get(name, [])}}
        for i, (name, e) in enumerate(entropies.items())
    }


def test_site_policies_select_what_they_claim():
    from replacer.recipe import SitePolicy
    from replacer.run.selection import choose_sites

    model = tiny_llama()
    sites = replacer.scan(model).sites
    stats = _fake_statistics({sites[0].name: 0.9, sites[1].name: 0.2})

    class Fake:
        def __init__(self, sites):
            self.sites = sites

    def choose(policy, statistics=stats):
        return choose_sites(Fake(policy), sites, statistics)

    assert choose(SitePolicy(policy="sparsest", layers=1)).sites == [sites[1].name]
    assert choose(SitePolicy(policy="densest", layers=1)).sites == [sites[0].name]
    assert choose(SitePolicy(policy="sparsest", fraction=1.0)).sites == [s.name for s in sites]
    picks = {tuple(choose(SitePolicy(policy="random", layers=1, seed=seed), None).sites) for seed in range(20)}
    assert picks == {(sites[0].name,), (sites[1].name,)}  # seeded, and both layers come up
    assert choose(SitePolicy(policy="random", layers=1, seed=3), None) == choose(SitePolicy(policy="random", layers=1, seed=3), None)
    with pytest.raises(replacer.ReplacerError, match="3 but the model has 2"):
        choose(SitePolicy(policy="densest", layers=3))

    recent = _fake_statistics({sites[0].name: 0.5, sites[1].name: 0.5},
                              {sites[0].name: [0.9, 0.1, 0.7, 0.2], sites[1].name: [0.3, 0.8, 0.1, 0.1]})
    by_threshold = choose(SitePolicy(policy="recent-heads", threshold=0.6), recent)
    assert by_threshold.heads == {sites[0].name: [0, 2], sites[1].name: [1]}
    assert by_threshold.sites == [sites[0].name, sites[1].name]
    assert choose(SitePolicy(policy="recent-heads", fraction=0.25), recent).heads == {sites[0].name: [0], sites[1].name: [1]}
    with pytest.raises(replacer.ReplacerError, match="lower sites.threshold"):
        choose(SitePolicy(policy="recent-heads", threshold=0.95), recent)
    entropic = {name: {**entry, "heads": {"entropy": [1 - r for r in entry["heads"]["recency"]][::-1]}}
                for name, entry in recent.items()}  # per-head entropies 0.8 0.3 0.9 0.1 | 0.9 0.9 0.2 0.7
    assert choose(SitePolicy(policy="sparse-heads", fraction=0.375), entropic).heads == {
        sites[0].name: [1, 3], sites[1].name: [2]}  # the three lowest entropies, wherever they are
    assert choose(SitePolicy(policy="sparse-heads", fraction=0.5, kv_groups=True), entropic).heads == {
        sites[0].name: [2, 3], sites[1].name: [2, 3]}  # group means 0.55 / 0.5 and 0.9 / 0.45
    with pytest.raises(ValueError, match="sparse-heads takes fraction"):
        SitePolicy(policy="sparse-heads", threshold=0.5)
    drawn = choose(SitePolicy(policy="random-heads", fraction=0.5, seed=1), None).heads
    assert sum(len(h) for h in drawn.values()) == 4
    assert drawn == choose(SitePolicy(policy="random-heads", fraction=0.5, seed=1), None).heads
    ranked_in_one_layer = _fake_statistics({sites[0].name: 0.5, sites[1].name: 0.5},
                                           {sites[0].name: [0.9, 0.1, 0.7, 0.2], sites[1].name: [0.3, 0.6, 0.1, 0.1]})
    assert choose(SitePolicy(policy="recent-heads", fraction=0.25), ranked_in_one_layer).heads == {sites[0].name: [0, 2]}
    capped = choose(SitePolicy(policy="recent-heads", fraction=0.25, per_layer=0.25), ranked_in_one_layer)
    assert capped.heads == {sites[0].name: [0], sites[1].name: [1]}
    assert choose(SitePolicy(policy="recent-heads", threshold=0.5, per_layer=0.25), ranked_in_one_layer).heads == capped.heads
    with pytest.raises(replacer.ReplacerError, match=r"sites.per_layer=0.25 allows 2 heads but the policy asks for 3"):
        choose(SitePolicy(policy="recent-heads", fraction=0.375, per_layer=0.25), ranked_in_one_layer)
    # tiny_llama: 4 query heads over 2 key/value groups ({0, 1} and {2, 3}); group means 0.5 / 0.45 and 0.55 / 0.1
    assert choose(SitePolicy(policy="recent-heads", fraction=0.5, kv_groups=True), recent).heads == {
        sites[0].name: [0, 1], sites[1].name: [0, 1]}
    groups = choose(SitePolicy(policy="random-heads", fraction=0.5, kv_groups=True, seed=2), None).heads
    assert sorted(len(h) for h in groups.values()) in ([2, 2], [4]) and all(h in ([0, 1], [2, 3], [0, 1, 2, 3]) for h in groups.values())
    with pytest.raises(ValueError, match="kv_groups and per_layer are options of head policies"):
        SitePolicy(policy="sparsest", layers=1, kv_groups=True)
    with pytest.raises(ValueError, match="recent-heads takes exactly one"):
        SitePolicy(policy="recent-heads", layers=2)
    with pytest.raises(ValueError, match="exactly one of layers"):
        SitePolicy(policy="sparsest", layers=1, fraction=0.5)


def test_a_recipe_with_the_sparsest_policy_analyses_then_replaces_that_layer(tmp_path):
    import json

    from helpers import tiny_text_recipe

    from replacer.recipe import load_recipe
    from replacer.run.runner import run_recipe

    path = tiny_text_recipe(tmp_path, distill_steps=3, tune_steps=2)
    recipe = load_recipe(path, ["sites={policy: sparsest, layers: 1}", "analyze.batches=2"])
    report = run_recipe(recipe)
    assert list(report["stages"])[0] == "analyze"
    stats = json.loads((tmp_path / "run" / "analysis" / "attention.json").read_text())
    sparsest = min(stats, key=lambda s: stats[s]["mean"]["entropy"])
    assert report["replaced_sites"] == [sparsest]
    assert list(report["site_similarity"]) == [sparsest]
    text = (tmp_path / "run" / "report.md").read_text()
    assert "## Teacher attention" in text and "(figures/teacher_attention.png)" in text


def test_the_analyze_command_prints_a_table_and_writes_files(tmp_path):
    from typer.testing import CliRunner

    from replacer.cli import app
    from helpers import tiny_text_recipe

    path = tiny_text_recipe(tmp_path)
    result = CliRunner().invoke(app, ["analyze", str(path), "--set", "analyze.batches=2", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "encoder.layer.1.attention.self" in result.output and "entropy" in result.output
    assert (tmp_path / "a" / "attention.json").is_file()
    assert (tmp_path / "a" / "teacher_attention.png").read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(app, ["analyze", str(path), "--set", "analyze.options={depth: 3}", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "analyze.options" in bad.output


@pytest.mark.slow
def test_analyze_a_real_model_by_its_source(tmp_path):
    from typer.testing import CliRunner

    from replacer.cli import app

    result = CliRunner().invoke(app, ["analyze", "minilm", "--set", "analyze.batches=1", "--set", "data.batch_size=4",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "attention.json").read_text())
    assert len(stats) == 6 and all(len(s["heads"]["entropy"]) == 12 for s in stats.values())
