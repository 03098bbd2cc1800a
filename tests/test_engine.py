"""scan / replace / forward / backward / save-load for every supported family, on tiny random-init models."""

from __future__ import annotations

import pytest
import torch

import replacer
from replacer.graph.adapter import ReplacedAttention
from conftest import output_tensor, tiny_bert, tiny_deit, tiny_llama


def test_scan_finds_every_site(family):
    name, model, _, n_sites, causal = family
    found = replacer.scan(model)
    assert len(found.sites) == n_sites and not found.unsupported
    for i, site in enumerate(found.sites):
        assert site.layer_index == i
        assert site.causal is causal
        assert site.num_heads * site.head_dim == site.out_dim > 0
        assert isinstance(model.get_submodule(site.name), torch.nn.Module)
    assert found.sites[0].name in str(found)


def test_replace_forward_backward_and_roundtrip(family, tmp_path):
    name, model, inputs, n_sites, _ = family
    student = replacer.replace(model, plugin="lstm")
    replaced = [m for m in student.modules() if isinstance(m, ReplacedAttention)]
    assert len(replaced) == n_sites
    assert not any(isinstance(m, ReplacedAttention) for m in model.modules()), "default replace must copy"

    args, kwargs = inputs()
    teacher_out = output_tensor(model(*args, **kwargs))
    student_out = output_tensor(student(*args, **kwargs))
    assert student_out.shape == teacher_out.shape
    assert torch.isfinite(student_out).all()
    assert not torch.allclose(student_out, teacher_out), "the mixers must actually be in the forward path"

    student.train()
    output_tensor(student(*args, **kwargs)).float().pow(2).mean().backward()
    for m in replaced:
        grads = [p.grad for p in m.mixer.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)

    student.eval()
    with torch.no_grad():
        before = output_tensor(student(*args, **kwargs))
    base = None if name != "timm-swin" else type(model)  # swin's constructor arguments cannot be inferred
    if base is not None:
        from conftest import tiny_swin

        base = tiny_swin()
    replacer.save(student, tmp_path / "ckpt")
    again = replacer.load(tmp_path / "ckpt", base=base)
    with torch.no_grad():
        after = output_tensor(again(*args, **kwargs))
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_inplace_modifies_and_returns_the_same_model():
    model = tiny_deit()
    out = replacer.replace(model, inplace=True)
    assert out is model
    assert isinstance(model.blocks[0].attn, ReplacedAttention)


def test_kept_output_projection_is_the_teachers():
    model = tiny_deit()
    student = replacer.replace(model)
    torch.testing.assert_close(student.blocks[1].attn.proj.weight, model.blocks[1].attn.proj.weight)
    assert "blocks.1.attn.proj.weight" in student.state_dict()


def test_input_projection_starts_from_value_projection():
    model = tiny_llama()
    student = replacer.replace(model)
    v = model.model.layers[0].self_attn.v_proj.weight  # 2 KV heads of 8 shared by 4 query heads
    w = student.model.layers[0].self_attn.mixer.in_proj.weight
    torch.testing.assert_close(w[0:8], v[0:8])
    torch.testing.assert_close(w[8:16], v[0:8])
    torch.testing.assert_close(w[16:24], v[8:16])
    cold = replacer.replace(model, options={"init_from_value": False})
    assert not torch.allclose(cold.model.layers[0].self_attn.mixer.in_proj.weight[:8], v[:8])


def test_site_selection_by_index_name_and_glob():
    model = tiny_bert()
    names = [s.name for s in replacer.scan(model).sites]
    by_index = replacer.replace(model, sites=[1])
    assert [r["name"] for r in by_index.replacer_record["replacements"][0]["sites"]] == [names[1]]
    assert not isinstance(by_index.get_submodule(names[0]), ReplacedAttention)
    by_glob = replacer.replace(model, sites=["encoder.layer.*.attention.self"])
    assert len(by_glob.replacer_record["replacements"][0]["sites"]) == 2
    with pytest.raises(replacer.SiteSelectionError, match="matches no replaceable attention site"):
        replacer.replace(model, sites=["nothing.*"])
    with pytest.raises(replacer.SiteSelectionError):
        replacer.replace(model, sites=[7])


def test_replacing_in_two_steps_with_different_options_round_trips(tmp_path):
    model = tiny_bert().eval()
    step1 = replacer.replace(model, sites=[0], options={"hidden_per_head": 4})
    step2 = replacer.replace(step1, sites=[1], options={"hidden_per_head": 6})
    assert step2.encoder.layer[0].attention.self.mixer.hidden == 4
    assert step2.encoder.layer[1].attention.self.mixer.hidden == 6
    replacer.save(step2, tmp_path)
    again = replacer.load(tmp_path)
    ids = torch.randint(1, 100, (1, 6))
    torch.testing.assert_close(again(input_ids=ids).last_hidden_state, step2(input_ids=ids).last_hidden_state)


def test_hf_attention_mask_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    student = replacer.replace(tiny_bert()).eval()
    ids = torch.randint(1, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    padded = student(input_ids=ids, attention_mask=mask).last_hidden_state
    alone = student(input_ids=ids[1:, :5]).last_hidden_state
    torch.testing.assert_close(padded[1, :5], alone[0], atol=1e-5, rtol=1e-5)


def test_cross_attention_is_listed_as_unsupported_with_reason():
    model = tiny_bert(is_decoder=True, add_cross_attention=True)
    found = replacer.scan(model)
    assert len(found.sites) == 2 and all(s.causal for s in found.sites)
    assert len(found.unsupported) == 2
    assert all("cross-attention" in u.reason for u in found.unsupported)
    with pytest.raises(replacer.SiteSelectionError, match="cross-attention"):
        replacer.replace(model, sites=["encoder.layer.0.crossattention.*"])


def test_attention_like_module_without_adapter_is_listed_not_skipped():
    class MyAttention(torch.nn.Module):
        def forward(self, x):
            return x

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), MyAttention())
    found = replacer.scan(model)
    assert not found.sites
    assert found.unsupported[0].name == "1" and "no installed adapter" in found.unsupported[0].reason
    with pytest.raises(replacer.SiteSelectionError, match="no attention site .* can be replaced"):
        replacer.replace(model)


def test_model_without_attention_is_a_clear_error():
    with pytest.raises(replacer.NoAttentionError, match="has no attention modules"):
        replacer.scan(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))


def test_bidirectional_mixer_refuses_causal_calls():
    student = replacer.replace(tiny_deit())
    with pytest.raises(replacer.UnsupportedCallError, match="is_causal=True"):
        student.blocks[0].attn(torch.randn(1, 5, 192), is_causal=True)


def test_scan_of_a_replaced_model_keeps_layer_indices():
    model = tiny_bert()
    student = replacer.replace(model, sites=[0])
    found = replacer.scan(student)
    assert [s.layer_index for s in found.replaced] == [0]
    assert [s.layer_index for s in found.sites] == [1]
    with pytest.raises(replacer.SiteSelectionError, match="already replaced"):
        replacer.replace(student, sites=[0])


@pytest.mark.parametrize("call, message", [
    (lambda m: replacer.scan("deit_tiny"), r"works on a torch.nn.Module .* not a str; load the model first"),
    (lambda m: replacer.replace(None), r"not a NoneType"),
    (lambda m: replacer.replace(m, sites=[1.5]), r"site selector 1.5 is not a layer index, a name or a glob pattern"),
    (lambda m: replacer.replace(m, options=5), r"options must be a mapping of option names to values, not int 5"),
])
def test_bad_arguments_are_one_line_errors(call, message):
    with pytest.raises(replacer.ReplacerError, match=message):
        call(tiny_deit())


def test_one_site_selector_need_not_be_a_list():
    student = replacer.replace(tiny_deit(), sites="blocks.1.attn")
    assert [type(b.attn).__name__ == "TimmReplacedAttention" for b in student.blocks] == [False, True]
    assert isinstance(replacer.replace(tiny_deit(), sites=0).blocks[0].attn, ReplacedAttention)
