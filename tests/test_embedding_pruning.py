"""Token embeddings in whole-model pruning: factorised by a token-weighted SVD, their components ranked with the rest."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import replacer
from conftest import tiny_bert, tiny_deit, tiny_gpt2, tiny_llama, tiny_text_bert
from helpers import cut_zeroed_groups
from replacer.pruning import GroupIndex, cut, factorise_token_embeddings, fixed_fraction, model_parameters, prune, token_use
from replacer.pruning.embeddings import FactorisedEmbedding, factorise, token_embeddings

BASES = {"bert": (tiny_bert, "embeddings.word_embeddings"), "llama": (tiny_llama, "model.embed_tokens")}


def student(base: str) -> nn.Module:
    torch.manual_seed(0)
    return replacer.replace(BASES[base][0](), "lstm").eval()


def ids() -> torch.Tensor:
    return torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(1))


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def component_groups(index: GroupIndex) -> list[int]:
    return [g for g, kind in enumerate(index.kinds) if kind == "token embedding"]


@pytest.mark.parametrize("base", list(BASES))
def test_a_full_rank_factorisation_computes_the_same_model(base):
    model = student(base)
    x = ids()
    with torch.no_grad():
        before = output(model, x)
        table = model.get_submodule(BASES[base][1]).weight.clone()
        assert factorise_token_embeddings(model) == [BASES[base][1]]
        factorised = model.get_submodule(BASES[base][1])
        assert isinstance(factorised, FactorisedEmbedding) and factorised.rank == 32
        torch.testing.assert_close(factorised.weight, table, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(output(model, x), before, atol=1e-5, rtol=1e-5)
    assert model.replacer_record["factorised"] == [BASES[base][1]]


def test_counting_tokens_weights_the_factorisation_towards_frequent_rows():
    """Truncated to 8 of 32 components, the weighted factorisation reproduces the rows of the tokens it was
    told are frequent better than the plain SVD does (which it equals without counts)."""
    torch.manual_seed(0)
    table = nn.Embedding(100, 32)
    frequent = torch.arange(6)  # fewer than the 8 components kept
    counts = torch.zeros(100)
    counts[frequent] = 1000.0

    def row_error(f: FactorisedEmbedding, rows: torch.Tensor) -> float:
        approx = f.codes[rows, :8] @ f.basis[:8]
        return float((approx - table.weight[rows]).norm() / table.weight[rows].norm())

    with torch.no_grad():
        plain, weighted = factorise(table), factorise(table, counts)
        u, s, vh = torch.linalg.svd(table.weight)
        torch.testing.assert_close(plain.basis.norm(dim=1), s, atol=1e-5, rtol=1e-5)  # basis row norms: singular values
        assert row_error(weighted, frequent) < 0.1 < row_error(plain, frequent)


def test_token_use_counts_every_lookup():
    model = student("bert")
    x = ids()
    counts = token_use(model, [lambda: model(x), lambda: model(x[:1])])
    expected = torch.bincount(torch.cat([x.reshape(-1), x[0]]), minlength=100).double()
    assert torch.equal(counts["embeddings.word_embeddings"], expected)
    assert not model.embeddings.word_embeddings._forward_pre_hooks  # the counting hooks are gone


@pytest.mark.parametrize("base", list(BASES))
def test_cutting_zeroed_components_changes_nothing_and_reloads(tmp_path, base):
    model = student(base)
    x = ids()
    factorise_token_embeddings(model)
    index = GroupIndex.of(model, "model")
    chosen = component_groups(index)[-12:]  # the 12 smallest directions
    assert cut_zeroed_groups(model, index, chosen, lambda m: output(m, x)) == 12 * (100 + 32)
    assert model.get_submodule(BASES[base][1]).rank == 20
    replacer.save(model, tmp_path)
    loaded = replacer.load(tmp_path, base=BASES[base][0]())
    assert isinstance(loaded.get_submodule(BASES[base][1]), FactorisedEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, x), output(model, x), atol=0, rtol=0)


def test_a_whole_model_budget_cuts_embedding_components_in_the_same_ranking(tmp_path):
    model = replacer.replace(tiny_text_bert(), "lstm", options={"hidden_per_head": 8}).eval()  # embeddings: 96 %
    total = model_parameters(model)
    x = torch.randint(1000, 2000, (4, 12), generator=torch.Generator().manual_seed(0))
    counts = token_use(model, [lambda: model(x)])
    result = prune(model, params=0.5, scope="model", token_counts=counts)
    component = 30522 + 32  # the coarsest group: the budget is met to within one of them
    assert result.params_before == total and 0.5 * total - component < model_parameters(model) <= 0.5 * total
    assert result.removed_by_kind["token embedding"] > 0
    replacer.save(model, tmp_path)
    loaded = replacer.load(tmp_path, base=tiny_text_bert())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).last_hidden_state, model(x).last_hidden_state, atol=0, rtol=0)


def test_a_factorisation_that_loses_no_component_is_merged_back():
    model = student("bert")
    x = ids()
    with torch.no_grad():
        table = model.embeddings.word_embeddings.weight.clone()
    factorise_token_embeddings(model)
    index = GroupIndex.of(model, "model")
    scores = torch.ones(len(index))
    scores[component_groups(index)] = 1e9  # every other group goes first
    cut(model, index, scores, params=round(0.9 * sum(p.numel() for p in index.params.values())))
    embedding = model.embeddings.word_embeddings
    assert type(embedding) is nn.Embedding and "factorised" not in model.replacer_record
    torch.testing.assert_close(embedding.weight, table, atol=1e-6, rtol=1e-5)
    output(model, x)


def test_tied_and_missing_token_embeddings_stay_whole_with_the_reason():
    bert = student("bert")
    assert token_embeddings(bert) == {"embeddings.word_embeddings": bert.embeddings.word_embeddings}
    gpt2 = replacer.replace(tiny_gpt2(), "lstm")
    assert list(token_embeddings(gpt2).values()) == ["the token embedding is tied to the output head; a factorisation would untie them"]
    deit = replacer.replace(tiny_deit(), "lstm")
    assert list(token_embeddings(deit).values()) == ["adapter 'timm-attention' knows no token embedding"]
    result = prune(gpt2, params=0.8, scope="model")
    assert "token embedding" not in result.removed_by_kind and "factorised" not in gpt2.replacer_record


def test_factorisable_embeddings_lower_the_floor_of_whole_model_budgets():
    model = replacer.replace(tiny_text_bert(), "lstm", options={"hidden_per_head": 8})
    table = model.embeddings.word_embeddings.weight.numel()
    assert fixed_fraction(model, embeddings=False) - fixed_fraction(model) == pytest.approx(table / model_parameters(model))
    before = model_parameters(model)
    with pytest.raises(replacer.ReplacerError, match=r"sit outside every prunable group"):
        prune(model, params=0.7, scope="model", embeddings=False)
    assert model_parameters(model) == before and type(model.embeddings.word_embeddings) is nn.Embedding


def test_a_checkpoint_that_factorises_a_module_the_model_lacks_is_refused(tmp_path):
    import json

    model = student("bert")
    prune(model, params=0.6, scope="model")
    replacer.save(model, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["factorised"] = ["embeddings.no_such_table"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(replacer.CheckpointError, match="the rebuilt model does not have"):
        replacer.load(tmp_path, base=tiny_bert())
