"""Teacher sparsification: top-k attention per family, restored afterwards, and the recipe stage."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, output_tensor, tiny_deit, tiny_llama
from replacer.run.sparse_teacher import sparse_attention

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_top_k_with_every_key_is_the_dense_attention_and_is_undone(name):
    factory, inputs, _, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = factory().eval()
    args, kwargs = inputs()
    with torch.no_grad():
        dense = output_tensor(model(*args, **kwargs))
        with sparse_attention(model, top_k=10_000):
            wide = output_tensor(model(*args, **kwargs))
        with sparse_attention(model, top_k=1):
            narrow = output_tensor(model(*args, **kwargs))
        after = output_tensor(model(*args, **kwargs))
    torch.testing.assert_close(wide, dense, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(narrow, dense, rtol=1e-2, atol=0)
    torch.testing.assert_close(after, dense, atol=0, rtol=0)


def test_each_query_keeps_at_most_k_keys():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    seen = []
    model.model.layers[0].self_attn.register_forward_hook(lambda m, a, o: seen.append(o[1]) and None)
    with torch.no_grad(), sparse_attention(model, top_k=2):
        model(torch.randint(1, 100, (2, 7)))
    probs = seen[0]
    assert probs.shape == (2, 4, 7, 7)
    assert int((probs > 0).sum(-1).max()) <= 2
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 7))
    assert float(probs.triu(1).abs().max()) == 0  # still causal

    vit = tiny_deit().eval()
    seen.clear()
    vit.blocks[0].attn.attn_drop.register_forward_hook(lambda m, a, o: seen.append(o) and None)
    with torch.no_grad(), sparse_attention(vit, top_k=3):
        vit(torch.randn(2, 3, 32, 32))
    assert int((seen[0] > 0).sum(-1).max()) <= 3
    torch.testing.assert_close(seen[0].sum(-1), torch.ones_like(seen[0].sum(-1)))


def test_a_recipe_distills_from_a_sparsified_teacher(tmp_path):
    import json

    from helpers import tiny_text_recipe

    from replacer.recipe import load_recipe
    from replacer.run.runner import run_recipe

    path = tiny_text_recipe(tmp_path, distill_steps=3, tune_steps=2)
    recipe = load_recipe(path, ["sparsify.enabled=true", "sparsify.top_k=2", "sparsify.recovery_steps=3",
                                "evaluate.figures=false"])
    report = run_recipe(recipe)
    assert list(report["stages"])[:2] == ["sparsify", "distill"]
    assert 0 < report["sparse_teacher"]["embedding_cosine_mean"] < 1.0
    run = tmp_path / "run"
    assert (run / "sparse_teacher" / "model.safetensors").is_file()
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in losses if r.get("stage") == "sparsify" and "loss" in r) == 3
    assert "sparsified teacher" in (run / "report.md").read_text()
    again = run_recipe(recipe)  # finished: nothing is redone, the saved sparse teacher is reused
    assert again["fidelity"] == report["fidelity"]
