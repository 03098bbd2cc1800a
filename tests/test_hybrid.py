"""Head-level hybrids (RecurFormer) of Llama-style attention: exactness, grouped-query KV cache, decoding."""

from __future__ import annotations

import pytest
import torch

import replacer
from conftest import tiny_llama
from helpers import greedy_without_cache
from replacer_transformers.cache import cache_bytes


def model():
    torch.manual_seed(0)
    return tiny_llama().eval()  # 4 query heads sharing 2 kv heads


def ids(n=7):
    return torch.randint(1, 100, (2, n), generator=torch.Generator().manual_seed(1))


def test_a_hybrid_with_no_replaced_heads_equals_the_original_layer():
    from replacer_transformers.hybrid import HFHybridAttention

    teacher = model()
    attn = teacher.model.layers[1].self_attn
    site = replacer.scan(teacher).site("model.layers.1.self_attn")
    spec = replacer.get_registry().mixer("lstm")
    mixer = spec.build(site.heads_subset(1), spec.validate_options({}), None)
    hybrid = HFHybridAttention(site, mixer, attn, replaced=[])
    x = torch.randn(2, 7, 32)
    position = teacher.model.rotary_emb(x, torch.arange(7)[None].expand(2, -1))
    with torch.no_grad():
        expected = attn(x, position_embeddings=position, attention_mask=None)[0]
        got = hybrid(x, position_embeddings=position, attention_mask=None)[0]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("heads, kv_kept", [([0, 1], 1), ([0], 2), ([1, 2], 2)])
def test_the_kv_cache_holds_only_kept_kv_heads_and_decoding_matches(heads, kv_kept):
    student = replacer.replace(model(), "lstm", heads={f"model.layers.{i}.self_attn": heads for i in range(2)})
    prompt = ids(5)
    with torch.no_grad():
        out = student.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        full = greedy_without_cache(student, prompt, 6)
        teacher_out = model().generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, full)
    held, dense = cache_bytes(out.past_key_values), cache_bytes(teacher_out.past_key_values)
    assert held["kv"] == dense["kv"] * kv_kept // 2
    assert held["mixer_state"] > 0


@pytest.mark.parametrize("kv_groups, kv_kept", [(False, 3), (True, 2)])
def test_the_kv_group_policy_shrinks_the_cache_by_the_fraction_of_groups_replaced(kv_groups, kv_kept):
    """Half the heads by recency: single heads leave a query head on each key/value group of layer 1, so
    its cache stays whole (3/4 kept); whole groups halve the cache of every layer."""
    from types import SimpleNamespace

    from replacer.recipe import SitePolicy
    from replacer.run.selection import choose_sites

    teacher = model()
    sites = replacer.scan(teacher).sites
    statistics = {s.name: {"heads": {"recency": r}} for s, r in zip(sites, ([0.9, 0.8, 0.1, 0.2], [0.7, 0.1, 0.6, 0.3]))}
    policy = SitePolicy(policy="recent-heads", fraction=0.5, kv_groups=kv_groups)
    selection = choose_sites(SimpleNamespace(sites=policy), sites, statistics)
    student = replacer.replace(teacher, "lstm", sites=selection.sites, heads=selection.heads)
    with torch.no_grad():
        held = cache_bytes(student(ids(5), use_cache=True).past_key_values)
        dense = cache_bytes(teacher(ids(5), use_cache=True).past_key_values)
    assert held["kv"] == dense["kv"] * kv_kept // 4


def test_a_hybrid_model_saves_and_loads(tmp_path):
    student = replacer.replace(model(), "gru", heads={"model.layers.0.self_attn": [3]})
    assert [s.name for s in replacer.scan(student).replaced] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    replacer.save(student, tmp_path)
    loaded = replacer.load(tmp_path, base=tiny_llama())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, student(ids()).logits, atol=0, rtol=0)
    assert loaded.model.layers[0].self_attn.replaced == [3]


@pytest.mark.parametrize("factory, site, call", [
    ("tiny_bert", "encoder.layer.1.attention.self", "text"),
    ("tiny_vit", "vit.layers.1.attention", "image"),
])
def test_encoder_hybrids_equal_the_original_with_no_replaced_heads_and_mix_alone(factory, site, call):
    import conftest
    from replacer_transformers.hybrid import HFHybridAttention

    torch.manual_seed(0)
    teacher = getattr(conftest, factory)().eval()
    inputs = {"input_ids": ids(), "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2])} if call == "text" \
        else {"pixel_values": torch.randn(2, 3, 32, 32)}
    found = replacer.scan(teacher).site(site)
    spec = replacer.get_registry().mixer("lstm")
    original = teacher.get_submodule(site)
    projections, kept = (("query", "key", "value"), ()) if call == "text" else (("q_proj", "k_proj", "v_proj"), ("o_proj",))
    hybrid = HFHybridAttention(found, spec.build(found.heads_subset(1), spec.validate_options({}), None), original, [],
                               projections, kept).eval()
    seen = {}
    original.register_forward_hook(lambda m, a, k, o: seen.update(a=a, k=k, o=o) and None, with_kwargs=True)
    with torch.no_grad():
        teacher(**inputs)
        again = hybrid(*seen["a"], **seen["k"])[0]
    torch.testing.assert_close(again, seen["o"][0], atol=1e-5, rtol=1e-5)

    student = replacer.replace(teacher, "lstm", heads={site: [0, 2]}).eval()
    wrapper = student.get_submodule(site)
    assert wrapper.mixes_alone
    seen.clear()
    wrapper.register_forward_hook(lambda m, a, k, o: seen.update(a=a, k=k, o=o) and None, with_kwargs=True)
    with torch.no_grad():
        student(**inputs)
        mixed = wrapper.mix(*wrapper.read_call(seen["a"], seen["k"]))
    torch.testing.assert_close(mixed, seen["o"][0], atol=1e-5, rtol=1e-5)  # block-wise training sees the real forward


def _head_targets(teacher, site: str, heads: list[int], inputs: dict) -> torch.Tensor:
    """What block-wise distillation records as the replaced heads' targets in one teacher forward."""
    import copy

    from replacer.distill.capture import capture_sites
    from replacer.graph.adapter import site_wrappers

    student = replacer.replace(copy.deepcopy(teacher), "lstm", sites=[site], heads={site: heads})
    with torch.no_grad(), capture_sites(teacher, site_wrappers(student)) as records:
        teacher(**inputs)
    (x, y, keep), = records[site]
    assert x.shape[-1] == teacher.config.hidden_size and keep is not None
    return y


@pytest.mark.parametrize("family, kv_heads, value", [
    ("llama", 2, "v_proj"),  # grouped-query: kv head 1 serves query heads 2 and 3
    ("llama", 4, "v_proj"),
    ("bert", 4, "value"),  # the output projection lives outside the layer: its output is the heads' context
])
def test_per_head_targets_are_each_replaced_heads_own_output(family, kv_heads, value):
    """Attention is linear in the values: doubling the value rows that feed head 2 doubles head 2's output
    and leaves head 0's alone. The recorded targets must do exactly that."""
    import copy

    import transformers as T

    torch.manual_seed(0)
    if family == "llama":
        teacher = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                    num_key_value_heads=kv_heads, vocab_size=100, pad_token_id=0)).eval()
        site, layer = "model.layers.1.self_attn", lambda m: m.model.layers[1].self_attn
    else:
        teacher = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                           vocab_size=100)).eval()
        site, layer = "encoder.layer.1.attention.self", lambda m: m.encoder.layer[1].attention.self
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0  # padding, on the left as decoders batch it
    inputs = {"input_ids": ids(7), "attention_mask": mask}
    hd = 8
    before = _head_targets(teacher, site, [0, 2], inputs)
    assert before.shape == (2, 7, 2 * hd)
    changed = copy.deepcopy(teacher)
    kv = 2 // (4 // kv_heads)  # the kv head query head 2 reads
    with torch.no_grad():
        getattr(layer(changed), value).weight[kv * hd:(kv + 1) * hd] *= 2
        if getattr(layer(changed), value).bias is not None:
            getattr(layer(changed), value).bias[kv * hd:(kv + 1) * hd] *= 2
    after = _head_targets(changed, site, [0, 2], inputs)
    real = mask.bool()
    torch.testing.assert_close(after[..., :hd][real], before[..., :hd][real])  # head 0: its own values unchanged
    torch.testing.assert_close(after[..., hd:][real], 2 * before[..., hd:][real], atol=1e-5, rtol=1e-4)
    three = _head_targets(teacher, site, [0, 1, 2], inputs)  # heads in the projection's column order
    torch.testing.assert_close(three[..., list(range(0, hd)) + list(range(2 * hd, 3 * hd))], before)
    if family == "llama":  # with the kept head's columns, the output projection gives the layer's output
        seen = {}
        hook = layer(teacher).o_proj.register_forward_hook(lambda m, a, o: seen.setdefault("in", a[0]))
        with torch.no_grad():
            teacher(**inputs)
        hook.remove()
        torch.testing.assert_close(three, seen["in"][..., : 3 * hd])

    hybrid = replacer.replace(copy.deepcopy(teacher), "lstm", sites=[site], heads={site: [0, 1, 2]}).get_submodule(site)
    if family == "bert":  # the projection is BertSelfOutput's, outside the site: refused, with the fix
        with pytest.raises(replacer.ReplacerError, match="set distill.head_target to heads"):
            hybrid.projection()
    else:  # the replaced heads' projected targets plus the kept head's share and the bias are the layer's output
        o_proj = layer(teacher).o_proj
        kept = torch.nn.functional.linear(seen["in"][..., 3 * hd:], o_proj.weight[:, 3 * hd:], o_proj.bias)
        with torch.no_grad():
            torch.testing.assert_close(hybrid.projection()(three) + kept, o_proj(seen["in"]), atol=1e-5, rtol=1e-4)


def test_bad_head_choices_are_refused():
    with pytest.raises(replacer.SiteSelectionError, match="from 0 to 3"):
        replacer.replace(model(), "lstm", heads={"model.layers.0.self_attn": [4]})
    with pytest.raises(replacer.SiteSelectionError, match="not among the selected sites"):
        replacer.replace(model(), "lstm", sites=[1], heads={"model.layers.0.self_attn": [0]})
    from conftest import tiny_gpt2

    with pytest.raises(replacer.SiteSelectionError, match="cannot replace single heads"):
        replacer.replace(tiny_gpt2(), "lstm", heads={"transformer.h.0.attn": [0]})


@pytest.mark.parametrize("head_target", ["heads", "heads+projected"])
def test_a_hybrid_distils_block_wise_each_replaced_head_learning_its_teacher_head(tmp_path, head_target):
    import json

    from replacer.recipe import load_recipe
    from replacer.run.runner import run_recipe

    from helpers import tiny_causal_recipe

    path = tiny_causal_recipe(tmp_path, """sites: {policy: random-heads, fraction: 0.5}
distill: {steps: 60, lr: 0.01, calibration_batches: 8, head_target: %s}
tune: {enabled: false}
evaluate: {latency: false, figures: false}
""" % head_target)
    report = run_recipe(load_recipe(path))
    assert report["replaced_heads"] and all(len(h) < 4 for h in report["replaced_heads"].values())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for site in report["replaced_heads"]:
        losses = [r["loss"] for r in records if r.get("site") == site and "loss" in r]
        assert len(losses) >= 6 and sum(losses[-3:]) < 0.7 * sum(losses[:3]), (site, losses)  # per-head loss fell
    fidelity = report["fidelity"]  # the block-wise student is closer to the teacher than the same mixers untrained
    assert fidelity["student"]["kl_to_teacher"] < fidelity["untrained"]["kl_to_teacher"]


def test_a_recipe_replaces_the_most_recent_heads(tmp_path):
    from replacer.recipe import load_recipe
    from replacer.run.runner import run_recipe

    from helpers import tiny_causal_recipe

    path = tiny_causal_recipe(tmp_path, """sites: {policy: recent-heads, fraction: 0.25}
analyze: {batches: 2}
distill: {enabled: false}
tune: {steps: 12, lr: 0.01, task_weight: 0}
evaluate: {latency_repeats: 1}
""")
    report = run_recipe(load_recipe(path))
    fidelity = report["fidelity"]  # tuning on the teacher alone (no task loss) moved the replaced heads towards it
    assert fidelity["student"]["kl_to_teacher"] < fidelity["untrained"]["kl_to_teacher"]
    held = report["cache_bytes"]
    assert held["student"]["mixer_state"] > 0 and held["teacher"]["mixer_state"] == 0
    assert held["student"]["kv"] <= held["teacher"]["kv"]  # kv heads whose query heads all left are gone
    assert "## Decoding cache" in (tmp_path / "run" / "report.md").read_text()
    from conftest import tiny_text_llama

    student = replacer.load(tmp_path / "run" / "model", base=tiny_text_llama())
    replaced = [m for m in student.modules() if isinstance(m, replacer.ReplacedAttention)]
    heads = [len(m.replaced) if type(m).__name__ == "HFHybridAttention" else 4 for m in replaced]
    assert sum(heads) == 2 and all(type(m).__name__ == "HFHybridAttention" for m in replaced)  # 2 of 2 x 4 heads
    assert report["site_similarity"] == {}  # hybrids need position embeddings: per-site analyses skip them
    assert (tmp_path / "run" / "figures" / "layer_cka.png").is_file()
