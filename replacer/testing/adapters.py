"""The conformance kit for adapters: what a family's adapter must get right for a replaced model to
compute what its teacher computes, and for `replacer.load` to give it back.

The rules, each failing with a sentence that names it:
- methods return what `Adapter` and `ReplacedAttention` declare (`matches` a bool, `describe` a
  `Site`, `value_projection` a `LinearWeights` of shape (heads x head_dim, d_model), `wrap` a
  `ReplacedAttention`, `read_call` an `(input, padding mask)` pair);
- a replaced model keeps the original call convention and output shape;
- teacher calls read as `(B, N, d_model)` plus a `(B, N)` bool padding mask, and `mix` of that read
  equals the installed forward where the site `mixes_alone` (what distillation trains is what runs);
- padding changes no real token's output through the replaced model (where the teacher has that
  property: text models given an attention mask);
- a site is called causal exactly when it is, and a causal model's replaced outputs at t do not
  depend on later tokens;
- the saved model reloads to the same outputs with `base=` and without it (from the origin the
  family's `replacer_describe_model` hook recorded).
"""

from __future__ import annotations

import tempfile
from typing import Any, Callable

import torch
from torch import nn

from replacer.defaults import DEFAULT_MIXER
from replacer.graph.adapter import Adapter, ReplacedAttention, site_wrappers
from replacer.graph.site import LinearWeights, Site
from replacer.testing.counting import main_tensor

Inputs = Callable[[], tuple[tuple, dict]]
PAD = 3  # padded positions appended to every text


@torch.no_grad()
def check_adapter(
    model: Callable[[], nn.Module], inputs: Inputs, adapter: str | None = None, plugin: str = DEFAULT_MIXER,
    tmp_dir: str | None = None, rebuild: bool = True,
) -> None:
    """Check an adapter on a small model of its family.

    `model` builds the model (called for the teacher and for a reload base), `inputs` returns
    `(args, kwargs)` for one call; `adapter` limits the checks to one adapter's sites. `rebuild=False`
    skips reloading without `base=`, for families whose users always pass a base.
    """
    import replacer

    torch.manual_seed(0)
    teacher = model().eval()
    adapters = {a.name: a for a in replacer.get_registry().adapters}
    sites = _check_sites(teacher, adapters, adapter)
    student = replacer.replace(teacher, plugin, sites=[s.name for s in sites]).eval()
    wrappers = _check_wrappers(student, sites)
    args, kwargs = inputs()
    reference = main_tensor(teacher(*args, **kwargs))
    out = main_tensor(student(*args, **kwargs))
    assert out.shape == reference.shape, f"the replaced model's output is {tuple(out.shape)}, the original's {tuple(reference.shape)}"
    _check_reads(teacher, wrappers, args, kwargs)
    _check_mix_is_forward(student, wrappers, args, kwargs)
    tokens = _token_ids(args, kwargs)
    if tokens is not None:
        _check_padding(teacher, student, args, kwargs, tokens)
        _check_causality(teacher, student, wrappers, args, kwargs, tokens)
    _check_reload(student, model, args, kwargs, out, tmp_dir, rebuild)


def _check_sites(teacher: nn.Module, adapters: dict[str, Adapter], only: str | None) -> list[Site]:
    import replacer

    for name, module in teacher.named_modules():
        for a in adapters.values():
            if only in (None, a.name):
                answer = a.matches(module)
                assert isinstance(answer, bool), f"{type(a).__name__}.matches must return a bool, got {type(answer).__name__} for {name or 'the model'}"
    found = replacer.scan(teacher)
    for site in found.sites:
        assert isinstance(site, Site), f"Adapter.describe must return a Site, got {type(site).__name__}"
    misread = [u for u in found.unsupported if "could not read" in u.reason and (only is None or f"'{only}'" in u.reason)]
    assert not misread, (
        f"{misread[0].name}: {misread[0].reason}; describe must return a Site or raise Unsupported(reason), never fail otherwise"
    )
    sites = [s for s in found.sites if only is None or s.adapter == only]
    assert sites, f"no site of {found.model_name} is handled by adapter {only!r}"
    for site in sites:
        assert site.num_heads % site.num_kv_heads == 0, f"{site.name}: {site.num_heads} query heads cannot share {site.num_kv_heads} kv heads"
        value = adapters[site.adapter].value_projection(teacher.get_submodule(site.name), site)
        assert value is None or isinstance(value, LinearWeights), (
            f"{type(adapters[site.adapter]).__name__}.value_projection must return LinearWeights or None, got {type(value).__name__}"
        )
        if value is not None:
            assert tuple(value.weight.shape) == (site.out_dim, site.d_model), (
                f"{site.name}: value projection is {tuple(value.weight.shape)}, expected (heads x head_dim, d_model) = "
                f"({site.out_dim}, {site.d_model})"
            )
    return sites


def _check_wrappers(student: nn.Module, sites: list[Site]) -> dict[str, ReplacedAttention]:
    wrappers = site_wrappers(student)
    for site in sites:
        module = student.get_submodule(site.name)
        assert isinstance(module, ReplacedAttention), f"Adapter.wrap must return a ReplacedAttention; {site.name} is a {type(module).__name__}"
    return wrappers


def _check_reads(teacher: nn.Module, wrappers: dict[str, ReplacedAttention], args: tuple, kwargs: dict) -> None:
    """Every site's teacher call reads as `(B, N, d_model)` plus a `(B, N)` bool mask."""
    calls = _site_calls(teacher, {n: teacher.get_submodule(n) for n in wrappers}, args, kwargs)
    for name, wrapper in wrappers.items():
        assert name in calls, f"{name}: the teacher's forward never called this site"
        read = wrapper.read_call(*calls[name][:2])
        kind = type(wrapper).__name__
        assert isinstance(read, tuple) and len(read) == 2, f"{kind}.read_call must return (input, padding mask), got {type(read).__name__}"
        x, keep = read
        assert isinstance(x, torch.Tensor), f"{kind}.read_call must return a tensor input, got {type(x).__name__}"
        d_model = wrapper.site.d_model
        assert x.dim() == 3 and x.shape[-1] == d_model, f"{name}: read_call gave {tuple(x.shape)}, expected (B, N, {d_model})"
        y = wrapper.read_output(calls[name][2])
        assert isinstance(y, torch.Tensor), f"{kind}.read_output must return a tensor, got {type(y).__name__}"
        assert y.shape[:2] == x.shape[:2], f"{name}: the site's output {tuple(y.shape)} does not match its input {tuple(x.shape)}"
        assert keep is None or (isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and keep.shape == x.shape[:2]), (
            f"{name}: {kind}.read_call must return the padding mask as a (B, N) bool tensor or None"
        )


def _check_mix_is_forward(
    student: nn.Module, wrappers: dict[str, ReplacedAttention], args: tuple, kwargs: dict, context: str = "",
) -> None:
    """What distillation trains (`mix` of the read call) is what the installed forward computes."""
    for name, (a, k, o) in _site_calls(student, wrappers, args, kwargs).items():
        if not wrappers[name].mixes_alone:
            continue  # the site says its output needs more than its input (a kept residual or kept heads)
        mixed = wrappers[name].mix(*wrappers[name].read_call(a, k))
        torch.testing.assert_close(mixed, wrappers[name].read_output(o), atol=1e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: mix(read_call(call)) differs from the installed forward{context}: {m}")


def _site_calls(model: nn.Module, modules: dict[str, nn.Module], args: tuple, kwargs: dict) -> dict[str, tuple]:
    """The first call of each module during one forward of `model`: (args, kwargs, output)."""
    calls: dict[str, tuple] = {}

    def record(name: str) -> Callable:
        def hook(_module: nn.Module, a: tuple, k: dict, o: object) -> None:  # returns None: output unchanged
            calls.setdefault(name, (a, k, o))

        return hook

    hooks = [m.register_forward_hook(record(n), with_kwargs=True) for n, m in modules.items()]
    try:
        model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def _token_ids(args: tuple, kwargs: dict) -> tuple[int | str, torch.Tensor] | None:
    """Where the call's token ids are (a keyword or a position) and the ids; None for other inputs (images)."""
    if isinstance(kwargs.get("input_ids"), torch.Tensor):
        return "input_ids", kwargs["input_ids"]
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dim() == 2 and not a.is_floating_point():
            return i, a
    return None


def _with_tokens(args: tuple, kwargs: dict, where: int | str, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[tuple, dict]:
    args, kwargs = list(args), dict(kwargs)
    if isinstance(where, int):
        args[where] = ids
    else:
        kwargs[where] = ids
    if mask is not None:
        kwargs["attention_mask"] = mask
    return tuple(args), kwargs


def _per_token(out: Any, length: int) -> torch.Tensor | None:
    """The model's main output when it has one row per token (hidden states, logits); None when pooled."""
    main = main_tensor(out)
    return main if main.dim() >= 2 and main.shape[1] == length else None


def _check_padding(teacher: nn.Module, student: nn.Module, args: tuple, kwargs: dict, tokens: tuple[int | str, torch.Tensor]) -> None:
    """Texts padded on the right (pad tokens of any id, attention mask 0) keep every real token's output."""
    where, ids = tokens
    batch, length = ids.shape
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    generator = torch.Generator().manual_seed(7)
    pads = torch.randint(1, int(ids.max()) + 1, (batch, PAD), generator=generator, dtype=ids.dtype)
    padded = _with_tokens(args, kwargs, where, torch.cat((ids, pads), 1), torch.cat((mask, torch.zeros_like(pads, dtype=mask.dtype)), 1))
    plain = _with_tokens(args, kwargs, where, ids, mask)
    real = mask.bool()

    def outputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        a, b = _per_token(model(*plain[0], **plain[1]), length), _per_token(model(*padded[0], **padded[1]), length + PAD)
        return (a[real], b[:, :length][real]) if a is not None and b is not None else None

    try:
        reference = outputs(teacher)
    except TypeError:  # the family takes no attention mask: nothing to check
        return
    if reference is None or not torch.allclose(*reference, atol=1e-4, rtol=1e-3):
        return  # the teacher itself is not padding-invariant here (pooled output): the rule does not apply
    wrappers = site_wrappers(student)
    _check_masks_read(teacher, wrappers, padded, torch.cat((real, torch.zeros_like(pads, dtype=torch.bool)), 1))
    got = outputs(student)
    assert got is not None, "the replaced model's output lost its per-token layout under padding"
    torch.testing.assert_close(got[1], got[0], atol=1e-4, rtol=1e-3, msg=lambda m: (
        "padding changed real tokens' outputs through the replaced model (does read_call pass the padding mask, "
        f"with True for real tokens?): {m}"
    ))
    _check_mix_is_forward(student, wrappers, *padded, context=" on a padded call (does read_call drop the padding mask?)")


def _check_masks_read(teacher: nn.Module, wrappers: dict[str, ReplacedAttention], call: tuple[tuple, dict], real: torch.Tensor) -> None:
    """On a padded teacher call, every site whose tokens are the text's reads True at real tokens, False at
    padding. A causal site may read no mask: padding on the right comes after every real token it serves."""
    calls = _site_calls(teacher, {n: teacher.get_submodule(n) for n in wrappers}, *call)
    for name, wrapper in wrappers.items():
        if name not in calls:
            continue
        x, keep = wrapper.read_call(*calls[name][:2])
        if x.shape[:2] != real.shape:
            continue  # this site's tokens are not the text's (pooled, downsampled)
        if keep is None and wrapper.site.causal:
            continue
        assert keep is not None and torch.equal(keep, real), (
            f"{name}: {type(wrapper).__name__}.read_call's padding mask must be True at real tokens and False at padding, "
            f"got {'None' if keep is None else keep.int().tolist()} for {real.int().tolist()}"
        )


def _check_causality(
    teacher: nn.Module, student: nn.Module, wrappers: dict[str, ReplacedAttention], args: tuple, kwargs: dict,
    tokens: tuple[int | str, torch.Tensor],
) -> None:
    """A site is called causal exactly when it is (seen in the teacher: with its input before t unchanged
    and after t changed, its output before t stays the same), and a causal model stays causal once replaced."""
    where, ids = tokens
    length = ids.shape[1]
    if length < 4:
        return
    t = length // 2
    later = ids.clone()
    later[:, t:] = (ids[:, t:] % max(int(ids.max()), 1)) + 1  # different ids, never 0 (often padding)
    calls = [_with_tokens(args, kwargs, where, i) for i in (ids, later)]
    modules = {n: teacher.get_submodule(n) for n in wrappers}
    first, second = (_site_calls(teacher, modules, *call) for call in calls)
    for name, wrapper in wrappers.items():
        if name not in first or name not in second:
            continue
        (x1, _), (x2, _) = (wrapper.read_call(*c[name][:2]) for c in (first, second))
        y1, y2 = (wrapper.read_output(c[name][2]) for c in (first, second))
        if x1.shape[1] != length or not torch.equal(x1[:, :t], x2[:, :t]) or torch.equal(x1[:, t:], x2[:, t:]):
            continue  # the change reaches this site's earlier tokens too (or not at all): its causality cannot be seen
        causal = torch.allclose(y1[:, :t], y2[:, :t], atol=1e-6, rtol=1e-5)
        assert wrapper.site.causal == causal, (
            f"{name}: the adapter calls this site {'causal' if wrapper.site.causal else 'bidirectional'}, but it is "
            f"{'causal' if causal else 'bidirectional'} (its outputs before t {'do not change' if causal else 'change'} "
            "when only its inputs from t on change)"
        )

    def before_t(model: nn.Module, call: tuple[tuple, dict]) -> torch.Tensor | None:
        out = _per_token(model(*call[0], **call[1]), length)
        return None if out is None else out[:, :t]

    reference = [before_t(teacher, call) for call in calls]
    if reference[0] is not None and torch.allclose(*reference, atol=1e-5, rtol=1e-4):
        torch.testing.assert_close(before_t(student, calls[1]), before_t(student, calls[0]), atol=1e-5, rtol=1e-4, msg=lambda m: (
            f"a causal model's replaced outputs before t changed when tokens from t on changed: {m}"
        ))


def _check_reload(
    student: nn.Module, model: Callable[[], nn.Module], args: tuple, kwargs: dict, out: torch.Tensor, tmp_dir: str | None, rebuild: bool,
) -> None:
    import replacer
    from replacer.errors import CheckpointError

    with tempfile.TemporaryDirectory(dir=tmp_dir) as folder:
        replacer.save(student, folder)
        torch.manual_seed(1)
        loaded = replacer.load(folder, base=model())
        torch.testing.assert_close(main_tensor(loaded(*args, **kwargs)), out, atol=0, rtol=0,
                                   msg="a saved replaced model reloads to different outputs (with base=)")
        if not rebuild:
            return
        kind = type(model()).__name__
        assert student.replacer_record.get("origin") is not None, (
            f"replacer.load(path) without base= cannot rebuild a {kind}: no installed plugin's replacer_describe_model "
            "hook could describe it (implement replacer_describe_model and replacer_build_model in the family's plugin, "
            "or pass rebuild=False if its users always pass base=)"
        )
        try:
            rebuilt = replacer.load(folder)
        except CheckpointError as exc:
            raise AssertionError(
                f"replacer.load(path) without base= fails for a {kind}: {exc} (the family's replacer_build_model hook "
                "must rebuild what its replacer_describe_model hook recorded)"
            ) from None
        torch.testing.assert_close(main_tensor(rebuilt(*args, **kwargs)), out, atol=0, rtol=0,
                                   msg="a saved replaced model rebuilt without base= computes different outputs")
