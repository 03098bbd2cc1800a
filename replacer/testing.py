"""Conformance checks every mixer plugin must pass; the built-in plugins run them in their tests.

Each check builds the mixer through its registered `MixerSpec` on a small synthetic site, so a
third-party plugin is tested exactly as `replacer.replace` would use it:

    from replacer.testing import check_mixer
    check_mixer("my-mixer", options={"width": 8})

Adapters are checked on a small model of their family:

    from replacer.testing import check_adapter
    check_adapter(lambda: MyModel(tiny_config), lambda: ((), {"input_ids": ids}), adapter="my-family")

Every check raises AssertionError with a sentence saying which rule broke. Mixers that declare
prunable groups (`Mixer.prunable_groups`) are also checked after pruning.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from pydantic import BaseModel
from torch.overrides import TorchFunctionMode

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


class AttentionCounter(TorchFunctionMode):
    """While active, counts attention computations: every `scaled_dot_product_attention` call and every
    softmax over a square score map (eager attention). `inside_replaced` counts those made while a
    replaced site runs, which must stay zero: a replaced site computes no attention."""

    _SOFTMAX = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.total = self.inside_replaced = self._depth = 0
        self._model = model
        self._handles: list = []

    def __enter__(self) -> "AttentionCounter":
        from replacer.graph.adapter import ReplacedAttention

        for module in self._model.modules() if self._model is not None else ():
            if isinstance(module, ReplacedAttention):
                self._handles.append(module.register_forward_pre_hook(lambda *_: self._enter()))
                self._handles.append(module.register_forward_hook(lambda *_: self._leave()))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        super().__exit__(*exc)

    def _enter(self) -> None:
        self._depth += 1

    def _leave(self) -> None:
        self._depth -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        scores = args[0] if args else None
        square = func in self._SOFTMAX and isinstance(scores, torch.Tensor) and scores.dim() >= 2 and scores.shape[-1] == scores.shape[-2] > 1
        if func is torch.nn.functional.scaled_dot_product_attention or square:
            self.total += 1
            self.inside_replaced += self._depth > 0
        return func(*args, **kwargs)


def main_tensor(out: object) -> torch.Tensor:
    """The main output of a model or a site call: a tensor, the first of a tuple, or logits / last hidden state."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return main_tensor(out[0])
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise TypeError(f"cannot find the main tensor of a {type(out).__name__}")


@torch.no_grad()
def check_adapter(
    model: Callable[[], torch.nn.Module], inputs: Callable[[], tuple[tuple, dict]], adapter: str | None = None,
    plugin: str = "lstm", tmp_dir: str | None = None,
) -> None:
    """Adapters: sites measured consistently, the original call convention kept, `mix` (what distillation
    trains) equal to the installed forward, teacher calls read as `(B, N, d_model)` plus a padding mask,
    and a replaced model that saves and reloads to the same outputs.

    `model` builds the model (called twice: teacher and reload base), `inputs` returns `(args, kwargs)`
    for one call; `adapter` limits the checks to one adapter's sites.
    """
    import tempfile

    import replacer
    from replacer.graph.adapter import site_wrappers
    from replacer.distill.capture import capture_sites

    torch.manual_seed(0)
    teacher = model().eval()
    found = replacer.scan(teacher)
    sites = [s for s in found.sites if adapter is None or s.adapter == adapter]
    assert sites, f"no site of {found.model_name} is handled by adapter {adapter!r}"
    adapters = {a.name: a for a in replacer.get_registry().adapters}
    for site in sites:
        assert site.num_heads % site.num_kv_heads == 0, f"{site.name}: {site.num_heads} query heads cannot share {site.num_kv_heads} kv heads"
        value = adapters[site.adapter].value_projection(teacher.get_submodule(site.name), site)
        if value is not None:
            assert tuple(value.weight.shape) == (site.out_dim, site.d_model), (
                f"{site.name}: value projection is {tuple(value.weight.shape)}, expected (heads x head_dim, d_model) = "
                f"({site.out_dim}, {site.d_model})"
            )
    student = replacer.replace(teacher, plugin, sites=[s.name for s in sites]).eval()
    args, kwargs = inputs()
    reference = main_tensor(teacher(*args, **kwargs))
    out = main_tensor(student(*args, **kwargs))
    assert out.shape == reference.shape, f"the replaced model's output is {tuple(out.shape)}, the original's {tuple(reference.shape)}"

    wrappers = site_wrappers(student)
    with capture_sites(teacher, wrappers) as records:
        teacher(*args, **kwargs)
    for name, pairs in records.items():
        assert pairs, f"{name}: the teacher's forward never called this site"
        x, y, keep = pairs[0]
        d_model = wrappers[name].site.d_model
        assert x.dim() == 3 and x.shape[-1] == d_model, f"{name}: read_call gave {tuple(x.shape)}, expected (B, N, {d_model})"
        assert y.shape[:2] == x.shape[:2], f"{name}: the site's output {tuple(y.shape)} does not match its input {tuple(x.shape)}"
        assert keep is None or (keep.dtype == torch.bool and keep.shape == x.shape[:2]), f"{name}: padding mask must be (B, N) bool"

    calls: dict[str, tuple] = {}

    def record(name: str) -> Callable:
        def hook(_module: torch.nn.Module, a: tuple, k: dict, o: object) -> None:  # returns None: output unchanged
            calls.setdefault(name, (a, k, o))

        return hook

    hooks = [w.register_forward_hook(record(n), with_kwargs=True) for n, w in wrappers.items()]
    try:
        student(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    for name, (a, k, o) in calls.items():
        mixed = wrappers[name].mix(*wrappers[name].read_call(a, k))
        torch.testing.assert_close(mixed, wrappers[name].read_output(o), atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: mix(read_call(call)) differs from the installed forward: {m}")

    with tempfile.TemporaryDirectory(dir=tmp_dir) as folder:
        replacer.save(student, folder)
        torch.manual_seed(1)
        loaded = replacer.load(folder, base=model())
    torch.testing.assert_close(main_tensor(loaded(*args, **kwargs)), out, atol=0, rtol=0,
                               msg="a saved replaced model reloads to different outputs")


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
