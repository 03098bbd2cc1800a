"""Conformance checks every mixer plugin must pass.

Each check builds the mixer through its registered `MixerSpec` on a small synthetic site, so a
third-party plugin is tested exactly as `replacer.replace` would use it. Mixers that declare
prunable groups (`Mixer.prunable_groups`) are also checked after pruning.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from pydantic import BaseModel

from replacer.graph.site import LinearWeights, Site
from replacer.mixer import Mixer, MixerSpec


def synthetic_site(causal: bool, d_model: int = 12, heads: int = 3, head_dim: int = 4) -> Site:
    """A small site with the shape of a real one (heads x head_dim may differ from d_model)."""
    return Site(
        name="layers.0.attn", cls="SyntheticAttention", adapter="synthetic", layer_index=0, d_model=d_model,
        num_heads=heads, head_dim=head_dim, num_kv_heads=heads, causal=causal,
    )


def build_mixer(spec: MixerSpec, causal: bool, options: BaseModel | dict | None = None, seed: int = 0) -> Mixer:
    """A mixer built through the plugin's own factory, with a random value projection to start from."""
    site = synthetic_site(causal)
    torch.manual_seed(seed)
    value = LinearWeights(torch.randn(site.out_dim, site.d_model) * site.d_model**-0.5, torch.zeros(site.out_dim))
    return spec.build(site, spec.validate_options(options), value).eval()


def check_shapes_and_gradients(mixer: Mixer) -> None:
    x = torch.randn(2, 7, mixer.d_model, requires_grad=True)
    y = mixer(x)
    assert y.shape == (2, 7, mixer.out_dim), f"output shape {tuple(y.shape)}, expected (2, 7, {mixer.out_dim})"
    assert torch.isfinite(y).all(), "outputs must be finite"
    y.pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, "gradients must reach the input"
    trained = [n for n, p in mixer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert trained, "gradients must reach the mixer's parameters"


def _padded(real: torch.Tensor, pad: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    n, p = real.shape[1], pad.shape[1]
    if side == "right":
        return torch.cat((real, pad), 1), torch.tensor([[True] * n + [False] * p])
    if side == "left":
        return torch.cat((pad, real), 1), torch.tensor([[False] * p + [True] * n])
    x = torch.cat((real[:, :2], pad, real[:, 2:]), 1)
    return x, torch.tensor([[True] * 2 + [False] * p + [True] * (n - 2)])


@torch.no_grad()
def check_padding(mixer: Mixer, sides: tuple[str, ...] = ("right", "left", "middle")) -> None:
    """Padded tokens, whatever their values and wherever they sit, never change real tokens' outputs."""
    real = torch.randn(1, 6, mixer.d_model)
    alone = mixer(real)
    for side in sides:
        for scale in (1.0, 100.0):
            x, keep = _padded(real, torch.randn(1, 3, mixer.d_model) * scale, side)
            out = mixer(x, keep)
            torch.testing.assert_close(
                out[:, keep[0]], alone, atol=1e-5, rtol=1e-4,
                msg=lambda m, side=side: f"{side} padding changed real tokens' outputs: {m}",
            )
            assert out[0, ~keep[0]].abs().max() == 0, f"{side} padding: padded positions must output zeros"


@torch.no_grad()
def check_causality(mixer: Mixer) -> None:
    """Causal mixers: position t depends on positions <= t only; bidirectional ones see later tokens."""
    x = torch.randn(1, 9, mixer.d_model)
    later = x.clone()
    later[:, 5:] += 1.0
    before, after = mixer(x), mixer(later)
    if mixer.causal:
        torch.testing.assert_close(after[:, :5], before[:, :5], atol=1e-6, rtol=1e-5,
                                   msg="a causal mixer's outputs before t changed when tokens from t on changed")
    else:
        assert not torch.allclose(after[:, :5], before[:, :5]), "a bidirectional mixer must read later tokens"
    assert not torch.allclose(after[:, 5:], before[:, 5:]), "outputs must depend on their own inputs"


@torch.no_grad()
def check_state_in_pieces(mixer: Mixer) -> None:
    """Causal mixers: running a sequence in pieces (prefill, then single tokens) equals running it whole."""
    if not mixer.causal:
        return
    x = torch.randn(2, 10, mixer.d_model)
    whole = mixer(x)
    pieces, state = [], None
    for start, stop in ((0, 4), (4, 5), (5, 6), (6, 10)):
        y, state = mixer.forward_stateful(x[:, start:stop], state)
        pieces.append(y)
        assert all(s.shape[0] == 2 for s in state), "state tensors must be batch-first (beam search reorders them)"
    torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=1e-5, rtol=1e-4,
                               msg="forward_stateful in pieces differs from forward on the whole sequence")
    padded = torch.cat((torch.zeros(1, 2, mixer.d_model), x[:1, :4]), 1)
    keep = torch.tensor([[False, False, True, True, True, True]])
    y, state = mixer.forward_stateful(padded, None, keep)
    y_next, _ = mixer.forward_stateful(x[:1, 4:6], state)
    torch.testing.assert_close(torch.cat((y[:, 2:], y_next), 1), whole[:1, :6], atol=1e-5, rtol=1e-4,
                               msg="a left-padded prefill must carry the same state as the unpadded one")


@torch.no_grad()
def check_state_dict_roundtrip(spec: MixerSpec, mixer: Mixer, causal: bool, options: BaseModel | dict | None) -> None:
    """A fresh mixer (different seed) loaded with the state dict computes the same function."""
    other = build_mixer(spec, causal, options, seed=1)
    other.load_state_dict(copy.deepcopy(mixer.state_dict()))
    x = torch.randn(2, 5, mixer.d_model)
    torch.testing.assert_close(other(x), mixer(x), atol=0, rtol=0, msg="state_dict does not hold the whole mixer")


def check_pruning(spec: MixerSpec, causal: bool, options: BaseModel | dict | None) -> None:
    """Mixers that declare prunable groups: a zeroed group is inert, removing groups cuts exactly their
    parameters and changes no output, and the pruned mixer still passes every check and reloads."""
    from replacer.pruning.groups import GroupIndex, ParameterCount, apply_shapes, shrink

    mixer = build_mixer(spec, causal, options, seed=2)
    index = GroupIndex.of_mixers({"mixer": ("", mixer)})
    if not index.groups:
        return
    # the first member of every other family: structures end up with different widths
    firsts = list({g.family: gid for gid, g in reversed(list(enumerate(index.groups)))}.values())[::2]
    x = torch.randn(2, 6, mixer.d_model)
    count = ParameterCount(index)
    with torch.no_grad():
        for gid in firsts:
            count.remove(gid)
        index.zero_(firsts)
        before = mixer(x)
        shapes = shrink(mixer, index, firsts)
        after = mixer(x)
    assert sum(p.numel() for p in mixer.parameters()) == count.total, (
        "removing groups must cut exactly the parameters their slices name (overlaps counted once)"
    )
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4,
                               msg="removing groups whose weights are zero changed the outputs: the slices are incomplete")
    for check in CHECKS.values():
        check(mixer)
    other = build_mixer(spec, causal, options, seed=3)
    apply_shapes(other, shapes)
    other.load_state_dict(copy.deepcopy(mixer.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(other(x), mixer(x), atol=0, rtol=0, msg="a pruned mixer does not reload from its shapes and weights")


CHECKS: dict[str, Callable[[Mixer], None]] = {
    "shapes and gradients": check_shapes_and_gradients,
    "padding": check_padding,
    "causality": check_causality,
    "state in pieces": check_state_in_pieces,
}


def check_mixer(plugin: str | MixerSpec, options: BaseModel | dict | None = None) -> None:
    """Run every check on the bidirectional (encoder) and causal (decoder) builds of a mixer plugin."""
    if isinstance(plugin, str):
        from replacer.plugins import get_registry

        plugin = get_registry().mixer(plugin)
    for causal in (False, True):
        mixer = build_mixer(plugin, causal, options)
        assert mixer.causal is causal, f"a mixer built for a {'causal' if causal else 'bidirectional'} site must say so"
        for check in CHECKS.values():
            check(mixer)
        check_state_dict_roundtrip(plugin, mixer, causal, options)
        check_pruning(plugin, causal, options)
