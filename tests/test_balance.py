"""The measured balance: kinds of groups ranked by the loss per parameter their cut costs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import replacer
from conftest import tiny_deit
from replacer.errors import ReplacerError
from replacer.mixer import PruneGroup
from replacer.pruning import GroupIndex, importance_scores, model_parameters, prune
from replacer.pruning.balance import _segment_slopes, balanced, measured_order
from replacer.pruning.groups import Part
from replacer.pruning.ranking import choose

# two kinds of eight groups (rows) each; a row of `wide` holds 10x the parameters of a row of `narrow`
WIDE, NARROW = 100, 10


def toy() -> tuple[GroupIndex, dict[str, nn.Parameter]]:
    params = {"wide": nn.Parameter(torch.ones(8, WIDE)), "narrow": nn.Parameter(torch.ones(8, NARROW))}
    parts = [
        Part(name, kind, "", [PruneGroup(f"row {r}", name, ((name, 0, (r,)),), "rows") for r in range(8)], {name: params[name]})
        for name, kind in (("wide", "feed-forward"), ("narrow", "token embedding"))
    ]
    return GroupIndex.of_parts(parts), params


def zeroed_rows_cost(params: dict[str, nn.Parameter], costs: dict[str, list[float]]):
    """A loss that rises by `costs[kind][row]` when that row is zeroed (and by nothing else)."""
    def loss() -> torch.Tensor:
        total = torch.zeros(())
        for name, p in params.items():
            gone = (p.detach().abs().sum(1) == 0).float()
            total = total + (gone * torch.tensor(costs[name])).sum()
        return total
    return loss


def test_hull_slopes_make_the_curve_convex_and_ignore_noise():
    points = [(0, 0.0), (10, 1.0), (20, 1.5), (30, -0.5), (40, 5.0)]  # a dip below the start is noise
    slopes = _segment_slopes(points, [5, 10, 20, 25, 30, 40])
    # (10, 1) lies above the chord to (30, 1.5): the hull is (0,0)-(30,1.5)-(40,5)
    assert slopes == pytest.approx([0.05, 0.05, 0.05, 0.05, 0.05, 0.35])
    assert _segment_slopes([(0, 0.0), (0, 0.3)], [0, 0]) == [0.0, 0.0]


def test_the_kind_cheaper_per_parameter_goes_first_where_the_mean_balance_cuts_both_alike():
    """Every row costs 1 to cut; a wide row frees 10x the parameters: the knapsack answer cuts wide rows only."""
    index, params = toy()
    loss = zeroed_rows_cost(params, {"wide": [1.0] * 8, "narrow": [1.0] * 8})
    scores = torch.arange(16, dtype=torch.float) % 8 + 1.0  # within each kind rows 0..7 in order
    target = 8 * WIDE + 8 * NARROW - 5 * WIDE
    measured = choose(index, balanced(index, scores, "measured", [loss]), target)
    assert sorted(measured) == [0, 1, 2, 3, 4]  # five wide rows, the lowest-scored first
    mean = choose(index, balanced(index, scores, "mean"), target)
    assert any(index.kinds[g] == "token embedding" for g in mean)  # sizes ignored: narrow rows go too
    assert all(torch.equal(p, torch.ones_like(p)) for p in params.values())  # weights restored after measuring


def test_a_kind_whose_deep_cuts_grow_dear_gives_way_to_the_other():
    """Narrow rows are dearer per parameter at first, but wide rows' costs climb: the balance switches kinds
    where the measured curves cross, and each family keeps its last member."""
    index, params = toy()
    wide = [0.5, 0.5, 0.5, 0.5, 20.0, 20.0, 20.0, 20.0]  # per parameter: 0.005 then 0.2
    loss = zeroed_rows_cost(params, {"wide": wide, "narrow": [0.5] * 8})  # 0.05 per parameter
    rank = measured_order(index, torch.arange(16, dtype=torch.float) % 8, [loss])
    order = torch.argsort(rank).tolist()
    assert order[:4] == [0, 1, 2, 3]  # the cheap wide rows
    assert order[4:11] == [8, 9, 10, 11, 12, 13, 14]  # then every narrow row that may go, before dear wide rows
    assert order[11:14] == [4, 5, 6] and {order[14], order[15]} == {7, 15}  # the families' last members rank last


def test_measured_needs_losses_and_a_known_balance():
    index, _ = toy()
    scores = torch.ones(len(index))
    with pytest.raises(ReplacerError, match="needs losses"):
        balanced(index, scores, "measured")
    with pytest.raises(ReplacerError, match="unknown balance"):
        balanced(index, scores, "even")  # type: ignore[arg-type]


def test_an_index_of_mixers_alone_keeps_its_raw_scores():
    torch.manual_seed(0)
    model = replacer.replace(tiny_deit(), "lstm").eval()
    index = GroupIndex.of(model, "mixers")
    scores = importance_scores(index, "magnitude", None, "measured")
    assert torch.equal(scores, index.norms())  # no loss needed: one part kind, nothing to balance


def test_a_tiny_vit_pruned_on_the_measured_balance_meets_its_budget_and_keeps_its_weights_elsewhere():
    torch.manual_seed(0)
    teacher = tiny_deit().eval()
    model = replacer.replace(teacher, "lstm").eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        target = teacher(images)
    losses = [lambda: (model(images) - target).pow(2).mean()]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    index = GroupIndex.of(model, "model")
    rank = importance_scores(index, "magnitude", None, "measured", losses)
    assert sorted(rank.tolist()) == list(range(len(index)))  # a strict order of every group
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    total = model_parameters(model)
    result = prune(model, params=0.7, scope="model", balance="measured", losses=losses)
    assert 0.69 * total < result.params_after <= 0.7 * total
