"""Whole-model pruning: MLP hidden channels and hybrids' kept heads beside the mixers, in one ranking."""

from __future__ import annotations

import pytest
import torch

import replacer
from conftest import tiny_bert, tiny_deit, tiny_gpt2, tiny_llama, tiny_text_bert
from families import FAMILIES
from helpers import cut_zeroed_groups, greedy_without_cache
from replacer.report.figures import pareto_front
from replacer.graph.feed_forward import FeedForward
from replacer.pruning import GroupIndex, feed_forwards, model_parameters, prune
from replacer.pruning.groups import model_parts, shrink
from replacer_transformers.cache import cache_bytes

BASES = {"deit": tiny_deit, "bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def student(base: str, plugin: str = "lstm", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return replacer.replace(BASES[base](), plugin, **kwargs).eval()


def example(base: str):
    if base == "deit":
        return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if torch.is_tensor(out) else getattr(out, "logits", None) if hasattr(out, "logits") else out.last_hidden_state


def mlp_groups(index: GroupIndex) -> list[int]:
    return [g for g, kind in enumerate(index.kinds) if kind == "feed-forward"]


# where each tiny model's MLP is: (block, input projections, output projection, hidden channels)
EXPECTED_MLPS = {
    "deit": ("blocks.0", ["mlp.fc1"], "mlp.fc2", 768),
    "bert": ("encoder.layer.0", ["intermediate.dense"], "output.dense", 64),
    "gpt2": ("transformer.h.0", ["mlp.c_fc"], "mlp.c_proj", 128),
    "llama": ("model.layers.0", ["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj", 64),
}


@pytest.mark.parametrize("base", list(BASES))
def test_the_mlp_of_every_block_is_found_from_its_shapes(base):
    teacher = BASES[base]()
    found = list(feed_forwards(teacher).values())
    assert all(isinstance(f, FeedForward) for f in found) and len(found) == 2
    block, inputs, out, width = EXPECTED_MLPS[base]
    first = found[0]
    assert (first.block, [p.name for p in first.inputs], first.output.name, first.width) == (block, inputs, out, width)
    assert found[1].block == block[:-1] + "1"


@pytest.mark.parametrize("base", list(BASES))
def test_cutting_zeroed_channels_changes_no_output_and_removes_exactly_their_weights(tmp_path, base):
    model = student(base)
    index = GroupIndex.of(model, "model")
    channels = mlp_groups(index)
    chosen = channels[::3]  # both blocks, every third channel
    d = model.get_submodule(EXPECTED_MLPS[base][0]).get_submodule(EXPECTED_MLPS[base][2]).weight.shape
    d_model = min(d) if base != "gpt2" else d[1]
    per_channel = (len(EXPECTED_MLPS[base][1]) + 1) * d_model + len(EXPECTED_MLPS[base][1]) * (base != "llama")  # rows, column, biases
    x = example(base)
    assert cut_zeroed_groups(model, index, chosen, lambda m: output(m, x)) == len(chosen) * per_channel
    kept = {g.name for g in GroupIndex.of(model, "model").groups if g.family.startswith(EXPECTED_MLPS[base][0] + " ")}
    assert len(kept) == EXPECTED_MLPS[base][3] - sum(1 for g in chosen if index.sites[g] == EXPECTED_MLPS[base][0])
    replacer.save(model, tmp_path)
    loaded = replacer.load(tmp_path, base=BASES[base]())
    assert model_parameters(loaded) == model_parameters(model)
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, x), output(model, x), atol=0, rtol=0)


def test_a_gpt2_block_cut_in_its_conv1d_still_generates():
    model = student("gpt2")
    prune(model, params=0.7, scope="model")
    mlp = model.transformer.h[0].mlp
    assert mlp.c_fc.nf == mlp.c_fc.weight.shape[1] < 128
    ids = example("gpt2")[:, :4]
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, greedy_without_cache(model, ids, 5))


def test_one_ranking_mixes_kinds_and_meets_a_whole_model_budget():
    model = student("deit")
    total = model_parameters(model)
    result = prune(model, params=0.6, scope="model")
    assert result.params_before == total and result.params_after == model_parameters(model)
    assert 0.59 * total < result.params_after <= 0.6 * total
    assert result.removed_by_kind["feed-forward"] > 0 and result.removed_by_kind["mixer"] > 0
    mixers_only = student("deit")
    only = prune(mixers_only, params=0.6)
    assert only.removed_by_kind == {"mixer": only.removed_groups}  # the default scope leaves the MLPs whole


def test_raw_scores_let_one_kind_take_the_whole_cut():
    """On raw weight norms, kinds initialised on different scales do not compete: here every cut group is an
    MLP channel. Normalised per kind, both kinds lose groups: why normalising is the default."""
    raw = prune(student("deit"), params=0.8, scope="model", balance="none")
    normalised = prune(student("deit"), params=0.8, scope="model")
    assert list(raw.removed_by_kind) == ["feed-forward"]
    assert normalised.removed_by_kind["feed-forward"] > 0 and normalised.removed_by_kind["mixer"] > 0


def test_a_hybrids_kept_kv_head_is_cut_with_its_query_heads_and_the_cache_shrinks(tmp_path):
    # 4 query heads on 2 kv heads; layer 0 replaces head 1: kept heads 0, 2, 3 read kv heads 0 and 1
    model = student("llama", heads={"model.layers.0.self_attn": [1]})
    ids = example("llama")
    with torch.no_grad():
        full_cache = cache_bytes(model(ids, use_cache=True).past_key_values)
    index = GroupIndex.of(model, "model")
    heads = [g for g, kind in enumerate(index.kinds) if kind == "attention heads"]
    assert [index.groups[g].name for g in heads] == ["kv head 0", "kv head 1"]
    cut = heads[1]  # kv head 1 with query heads 2 and 3
    index.zero_([cut])
    with torch.no_grad():
        before = output(model, ids)
        model.replacer_record.setdefault("shapes", {}).update(shrink(model, index, [cut]))
        after = output(model, ids)
        small_cache = cache_bytes(model(ids, use_cache=True).past_key_values)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    attn = model.model.layers[0].self_attn
    assert attn.kept == [0] and attn.kv_heads.tolist() == [0]
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (8, 8, 16)  # 1 kept + 1 mixer head
    assert small_cache["kv"] == full_cache["kv"] // 2  # layer 1 runs a mixer alone; layer 0 now holds 1 of its 2 kv heads
    replacer.save(model, tmp_path)
    loaded = replacer.load(tmp_path, base=tiny_llama())
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, ids), after, atol=0, rtol=0)
        generated = loaded.generate(ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, greedy_without_cache(loaded, ids[:, :4], 5))


def test_a_hybrids_last_kept_kv_head_stays():
    model = student("llama", heads={"model.layers.0.self_attn": [1, 2, 3]})  # kept: head 0 on kv head 0
    index = GroupIndex.of(model, "model")
    assert sum(kind == "attention heads" for kind in index.kinds) == 1
    prune(model, params=0.5, scope="model")
    assert model.model.layers[0].self_attn.kept == [0]


@pytest.mark.parametrize("name, reason", [
    ("PVT v2", "runs over the"),  # a depthwise convolution between the projections
    ("LeViT", "runs over the"),  # a batch norm over the hidden channels
    ("Mixtral (MoE)", "nothing maps back"),  # experts, no linear back to the model width
])
def test_mlps_that_cannot_be_cut_channel_by_channel_are_left_whole_with_the_reason(name, reason):
    family = next(f for f in FAMILIES if f.name == name)
    model = family.build().eval()
    found = feed_forwards(model)
    assert found and all(isinstance(f, str) and reason in f for f in found.values()), found


def test_an_unreplaced_teachers_mlps_are_prunable_too():
    """Partial replacement: the blocks that keep attention still have MLPs to cut."""
    model = student("deit", sites=[0])
    index = GroupIndex.of(model, "model")
    assert {index.sites[g] for g in mlp_groups(index)} == {"blocks.0", "blocks.1"}


def test_the_pareto_front_keeps_only_undominated_models():
    costs, values = [1.0, 0.8, 0.7, 0.75, 0.5], [90.0, 89.0, 89.5, 88.0, 80.0]
    assert pareto_front(costs, values) == [4, 2, 0]
    assert pareto_front(costs, [-v for v in values]) == [4]  # lower is better: the cheapest is also the best


def test_a_recipe_prunes_the_whole_model_and_reports_the_family(tmp_path):
    from helpers import tiny_text_recipe

    from replacer.recipe import load_recipe
    from replacer.run.runner import run_recipe

    path = tiny_text_recipe(tmp_path, distill_steps=3, tune_steps=2)  # 96 % of its parameters are embeddings
    recipe = load_recipe(path, ["prune.enabled=true", "prune.budgets=[0.6]", "prune.scope=model", "prune.recovery_steps=2",
                                "evaluate.baseline=false"])
    report = run_recipe(recipe)
    params = report["params"]
    component = 30522 + 32  # the coarsest group (one embedding component): the budget is met to within one
    assert 0.6 * params["student"] - component < params["pruned-60"] <= 0.6 * params["student"]
    budget = report["stages"]["prune"]["budgets"]["pruned-60"]
    assert budget["scope"] == "model" and budget["removed_by_kind"]["feed-forward"] > 0
    assert budget["removed_by_kind"]["token embedding"] > 0
    text = (tmp_path / "run" / "report.md").read_text()
    assert "groups cut (mixer / MLP / heads / embedding components)" in text and "in one ranking" in text
    assert (tmp_path / "run" / "figures" / "pruning_budgets.png").read_bytes()[:4] == b"\x89PNG"
    loaded = replacer.load(tmp_path / "run" / "students" / "pruned-60", base=tiny_text_bert())
    assert model_parameters(loaded) == params["pruned-60"]
    assert loaded.embeddings.word_embeddings.rank < 32


def test_a_budget_below_what_no_group_holds_is_refused_before_anything_is_cut():
    model = replacer.replace(tiny_deit(), "lstm")  # no token embedding: patch and position embeddings stay whole
    before = model_parameters(model)
    with pytest.raises(replacer.ReplacerError, match=r"sit outside every prunable group"):
        prune(model, params=0.05, scope="model")
    assert model_parameters(model) == before


def _outputs(out):
    if isinstance(out, tuple):
        return out[0]
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out


@pytest.mark.parametrize("name", ["BERT", "T5", "Falcon", "Phi-3", "Llama", "CLIP text", "ViT / DeiT", "Swin", "MaxViT"])
def test_mlp_channels_are_the_ones_torch_pruning_finds_coupled(name):
    """Torch-Pruning traces the model's graph to find coupled channels; on these families each hidden channel
    replacer finds from shapes touches exactly the same rows and columns. (On EVA-02's chunked GLU its graph
    couples one row of the two and the pruned model fails; on GPT-2's Conv1D and DeepSeek's MoE it cannot
    build the graph; the test below holds those against the model itself.)"""
    tp = pytest.importorskip("torch_pruning")
    family = next(f for f in FAMILIES if f.name == name)
    torch.manual_seed(0)
    model = family.build().eval()
    args, kwargs = family.inputs()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=kwargs or args[0], output_transform=_outputs)
    names = {id(m): n for n, m in model.named_modules()}
    mlps = [f for f in feed_forwards(model).values() if isinstance(f, FeedForward)]
    assert mlps
    for mlp in mlps:
        for j in (0, mlp.width // 2):
            first = model.get_submodule(f"{mlp.block}.{mlp.inputs[0].name}")
            coupled = graph.get_pruning_group(first, tp.prune_linear_out_channels, idxs=[j])
            theirs = {names[id(item.dep.target.module)]: sorted(item.idxs) for item in coupled if id(item.dep.target.module) in names}
            ours = {f"{mlp.block}.{p.name}": [j + c * mlp.width for c in range(p.chunks)] for p in mlp.inputs}
            ours[f"{mlp.block}.{mlp.output.name}"] = [j]
            assert theirs == ours


MLP_FAMILIES = [f for f in FAMILIES if f.expect != "unsupported" and f.name not in ("MobileBERT", "Longformer")]


@pytest.mark.parametrize("family", MLP_FAMILIES, ids=[f.name for f in MLP_FAMILIES])
def test_cutting_a_channel_equals_silencing_it_before_the_output_projection(family):
    """The reference for every family, with no weights zeroed: removing hidden channel j (and, in a chunked
    GLU, its gate row) gives exactly the model whose output projection never sees channel j."""
    torch.manual_seed(0)
    model = family.build().eval()
    mlps = [f for f in feed_forwards(model).values() if isinstance(f, FeedForward)]
    if not mlps:
        pytest.skip(f"{family.name}: no MLP that can be cut channel by channel")
    args, kwargs = family.inputs()
    index = GroupIndex.of_parts([p for p in model_parts(model) if p.kind == "feed-forward"])
    chosen = {mlp.block: [1, mlp.width - 2] for mlp in mlps}
    gids = [g for g, (owner, group) in enumerate(zip(index.sites, index.groups))
            if owner in chosen and int(group.name.split()[-1]) in chosen[owner]]
    silenced = []
    for mlp in mlps:
        def silence(_module, inputs, channels=chosen[mlp.block]):
            x = inputs[0].clone()
            x[..., channels] = 0
            return (x, *inputs[1:])
        silenced.append(model.get_submodule(f"{mlp.block}.{mlp.output.name}").register_forward_pre_hook(silence))
    with torch.no_grad():
        expected = _outputs(model(*args, **kwargs))
        for hook in silenced:
            hook.remove()
        shrink(model, index, gids)
        got = _outputs(model(*args, **kwargs))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_lockstep_cuts_reach_both_kinds_and_keep_every_mixer_head_equally_wide():
    model = student("llama")
    result = prune(model, params=0.7, scope="model", uniform=True)
    assert result.removed_by_kind.get("mixer", 0) > 0 and result.removed_by_kind.get("feed-forward", 0) > 0
    for layer in model.model.layers:
        mixer = layer.self_attn.mixer
        assert len(set(mixer.widths)) == 1 and len(set(mixer.input_widths)) == 1


def test_a_latency_budget_over_the_whole_model_times_copies_cut_in_every_kind():
    model = student("deit")
    clock = lambda m: 1.0 + model_parameters(m) * 1e-5  # noqa: E731 - a stand-in for CPU timing
    before = clock(model)
    result = prune(model, latency=0.7, measure=clock, scope="model")
    assert result.latency.latency_ms <= 0.7 * before and clock(model) == pytest.approx(result.latency.latency_ms)
    assert clock(model) > 0.67 * before  # met closely: the most parameters within the budget
    assert set(result.removed_by_kind) == {"mixer", "feed-forward"}
