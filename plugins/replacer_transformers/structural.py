"""Self-attention of any transformers family, recognised by its projections rather than by its class.

transformers 5 gives nearly every attention module one calling convention (hidden states in, the
attention output first in the returned tuple) and the config says how many heads there are; what
still differs is what the projections are called and how a fused projection is laid out. So this
adapter reads a module's structure: separate q/k/v projections under any of the usual name sets, or
one fused projection, and the output projection if the module owns one (BERT-style modules leave it
to a sibling). Sizes come from the weights, checked against the config's head counts. What a
family does beyond that (ALBERT's norm over input + output, Bloom's residual inside the attention,
the order of a fused projection's rows) is one `FAMILIES` entry, keyed by the config's model type (or
by class, where one family's attention classes differ).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from replacer.graph.adapter import ReplacedAttention, Unsupported
from replacer.graph.site import LinearWeights, Site
from replacer.mixer import Mixer
from replacer_transformers.convention import (
    HFAdapter, HFReplacedAttention, expand_kv_heads, first_parameter, from_transformers, reject_cross_attention, rope_note,
)

SEPARATE = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"), ("q_lin", "k_lin", "v_lin"),
            ("query_proj", "key_proj", "value_proj"), ("Wq", "Wk", "Wv"))
FUSED = ("query_key_value", "qkv_proj", "Wqkv", "c_attn", "qkv")
LATENT = "kv_a_proj_with_mqa"  # multi-head latent attention (DeepSeek-V2/V3): keys and values from a low-rank latent
OUTPUT = ("o_proj", "out_proj", "dense", "o", "out_lin", "c_proj")
OUTPUT_DROPOUT = ("resid_dropout",)
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_HEAD_WIDTHS = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")


@dataclass(frozen=True)
class HFFamily:
    """What one model type does beyond the shared convention.

    `fused`: how a fused projection's rows are ordered, given the module: `stacked` ([q | k | v]),
    `interleaved` (per head [q, k, v]), `grouped` (per kv head [its q heads..., k, v]) or `unknown`
    (the mixer then starts from its own initialisation). `post_norm` names a norm the module applies to
    its input plus its output; `residual` a call argument the module adds to its output. `causal` says
    the attention is causal where the module's own flag does not (a shared attention class whose
    model passes it a causal mask). `mask_true_masks`: the boolean mask the module gets is True where a
    query may *not* attend (MPT's), the opposite of torch's convention.
    """

    fused: Callable[[nn.Module], str] = lambda module: "stacked"
    post_norm: str | None = None
    residual: str | None = None
    causal: bool | None = None
    mask_true_masks: bool = False
    note: str = ""
    unsupported: str = ""


def _falcon_layout(module: nn.Module) -> str:
    if getattr(module, "new_decoder_architecture", False):
        return "grouped"
    return "stacked" if getattr(module, "multi_query", False) else "interleaved"


_SLIDING = ("sliding-window attention with global tokens, whose mask marks global, local and padded tokens in one "
            "additive vector: no padding mask can be read from it")

FAMILIES: dict[str, HFFamily] = {
    "albert": HFFamily(post_norm="LayerNorm"),
    "bloom": HFFamily(fused=lambda m: "interleaved", residual="residual", note="ALiBi position bias dropped"),
    "falcon": HFFamily(fused=_falcon_layout),
    "gpt_neox": HFFamily(fused=lambda m: "interleaved"),
    "persimmon": HFFamily(fused=lambda m: "interleaved"),
    "gpt_bigcode": HFFamily(fused=lambda m: "stacked" if getattr(m, "multi_query", False) else "interleaved"),
    "codegen": HFFamily(fused=lambda m: "unknown"),
    "mpt": HFFamily(mask_true_masks=True, note="ALiBi position bias dropped"),
    "t5": HFFamily(note="relative position bias dropped"),
    "mt5": HFFamily(note="relative position bias dropped"),
    "umt5": HFFamily(note="relative position bias dropped"),
    "deberta": HFFamily(note="disentangled relative position attention dropped"),
    "deberta-v2": HFFamily(note="disentangled relative position attention dropped"),
    "mpnet": HFFamily(note="relative position bias dropped"),
    "LongformerSelfAttention": HFFamily(unsupported=_SLIDING),
    # CLIP-style text towers: the vision tower's attention class, given a causal mask by the text model
    **{t: HFFamily(causal=True) for t in (
        "clip_text_model", "clipseg_text_model", "groupvit_text_model", "metaclip_2_text_model", "owlvit_text_model",
        "owlv2_text_model", "xclip_text_model",
    )},
    "LEDEncoderSelfAttention": HFFamily(unsupported=_SLIDING),
}
DEFAULT = HFFamily()


def _weight(module: nn.Module) -> torch.Tensor:
    """A projection's weight as (out, in): transformers' `Conv1D` stores it transposed."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def _is_projection(module: Any) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor))


def _layout(module: nn.Module) -> tuple[tuple[str, ...], str | None] | None:
    """(the input projections' names, the output projection's name or None), or None if it has neither layout."""
    children = dict(module.named_children())
    inputs = next((names for names in SEPARATE if all(_is_projection(children.get(n)) for n in names)), None)
    inputs = inputs or next(((n,) for n in (*FUSED, LATENT) if _is_projection(children.get(n))), None)
    if inputs is None:
        return None
    out = next((n for n in OUTPUT if n not in inputs and _is_projection(children.get(n))), None)
    return inputs, out


def _first_int(sources: tuple[Any, ...], names: tuple[str, ...]) -> int | None:
    for source in sources:
        for name in names:
            value = getattr(source, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _model_type(module: nn.Module) -> str:
    """The config's model type; for modules that keep no config (BLOOM, MPT), the one their code folder
    is registered under (`transformers.models.deberta_v2...` -> `deberta-v2`)."""
    config = getattr(module, "config", None)
    if isinstance(getattr(config, "model_type", None), str):
        return config.model_type
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    parts = type(module).__module__.split(".")
    folder = parts[2] if len(parts) > 2 and parts[1] == "models" else ""
    return next((t for t in (folder, folder.replace("_", "-")) if t in CONFIG_MAPPING_NAMES), folder)


def _family(module: nn.Module) -> HFFamily:
    """The entry for the module's class if there is one (a family whose attention classes differ), else its model type's."""
    return FAMILIES.get(type(module).__name__) or FAMILIES.get(_model_type(module), DEFAULT)


def _is_causal(module: nn.Module, config: Any) -> bool:
    """The family's word where it has one; else the module's own flag; else the config's; else whether
    its model type is a causal LM only (Bloom, MPT and Falcon keep no flag on their attention)."""
    if _family(module).causal is not None:
        return _family(module).causal
    for source, name in ((module, "is_causal"), (module, "is_decoder"), (config, "is_decoder")):
        value = getattr(source, name, None)
        if isinstance(value, bool) and (value or source is module):
            return value
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = _model_type(module)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _is_attention_pooling(module: nn.Module) -> bool:
    """A pooling head (SigLIP's and its kin): a learned `probe` query attending to the tokens through torch's attention."""
    return isinstance(getattr(module, "probe", None), nn.Parameter) and any(isinstance(m, nn.MultiheadAttention) for m in module.children())


@functools.cache
def returned_items(cls: type) -> int:
    """How many items `cls.forward` returns, read from its return statements (2 when they disagree or
    cannot be read): the replacement returns as many, so callers that unpack them keep working."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return 2
    function = tree.body[0]
    tuples: dict[str, int] = {}
    counts: set[int | None] = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    tuples.setdefault(target.id, len(node.value.elts))
        if isinstance(node, ast.Return) and node.value is not None:
            value = node.value
            counts.add(len(value.elts) if isinstance(value, ast.Tuple) else tuples.get(getattr(value, "id", None)))
    return counts.pop() if len(counts) == 1 and None not in counts else 2


class HFStructuralAdapter(HFAdapter):
    """Self-attention of any transformers family with recognisable q/k/v projections (see the module
    docstring). Family-specific adapters take precedence (higher priority) where they exist."""

    name = "hf-attention"
    priority = -10

    def matches(self, module: nn.Module) -> bool:
        if not from_transformers(module):
            return False
        return _is_attention_pooling(module) or _layout(module) is not None

    def describe(self, name: str, module: nn.Module, layer_index: int) -> Site:
        if _is_attention_pooling(module):
            raise Unsupported("attention pooling: a learned probe query attends to the tokens, so the output is one vector, not a sequence")
        if first_parameter(module) != "hidden_states":
            params = ", ".join(list(inspect.signature(module.forward).parameters)[:3])
            raise Unsupported(f"its forward takes ({params}, ...), not the hidden states first: a calling convention no installed adapter reads")
        family = _family(module)
        if family.unsupported:
            raise Unsupported(family.unsupported)
        inputs, out = _layout(module)
        reject_cross_attention(name, module)
        config = getattr(module, "config", None)
        heads = _first_int((module, config), _HEAD_COUNTS)
        if heads is None:
            raise Unsupported(f"neither the module nor its config gives a head count ({', '.join(_HEAD_COUNTS)})")
        weights = [_weight(getattr(module, n)) for n in inputs]
        d_model = weights[0].shape[1]
        if any(w.shape[1] != d_model for w in weights):
            raise Unsupported("keys and values are projected from a different width than queries: cross-attention")
        head_dim = _first_int((module,), _HEAD_WIDTHS)
        if inputs == (LATENT,):  # the merged heads are what the output projection reads
            head_dim = _first_int((module,), ("v_head_dim",)) or (_weight(getattr(module, out)).shape[1] // heads if out else 0)
            kv_width = heads * head_dim
        elif len(inputs) == 3:
            head_dim = head_dim or weights[0].shape[0] // heads
            kv_width = weights[2].shape[0]
        else:
            head_dim = head_dim or _first_int((config,), ("head_dim",)) or d_model // heads
            kv_width = (weights[0].shape[0] - heads * head_dim) // 2
        if heads * head_dim <= 0 or kv_width <= 0 or kv_width % head_dim or heads % (kv_width // head_dim):
            raise Unsupported(f"projections of {[tuple(w.shape) for w in weights]} do not split into {heads} heads of {head_dim}")
        if out is not None and _weight(getattr(module, out)).shape[1] != heads * head_dim:
            raise Unsupported(f"output projection '{out}' does not read the {heads} x {head_dim} merged heads")
        latent = "multi-head latent attention: the input projection starts from its own initialisation" if inputs == (LATENT,) else ""
        note = "; ".join(n for n in (family.note, latent, rope_note(module)) if n)
        if out is None:
            note = "; ".join(n for n in ("output projection lives outside the module", note) if n)
        return Site(
            name=name, cls=type(module).__name__, adapter=self.name, layer_index=layer_index, d_model=d_model,
            num_heads=heads, head_dim=head_dim, num_kv_heads=kv_width // head_dim, causal=_is_causal(module, config),
            note=note,
        )

    def value_projection(self, module: nn.Module, site: Site) -> LinearWeights | None:
        inputs, _ = _layout(module)
        if inputs == (LATENT,):
            return None
        projection = getattr(module, inputs[-1])
        weight, bias = _weight(projection).detach(), projection.bias
        bias = None if bias is None else bias.detach()
        heads, kv = site.num_heads, site.num_kv_heads
        if len(inputs) == 1:
            rows = self._value_rows(module, site)
            if rows is None:
                return None
            weight, bias = weight[rows], None if bias is None else bias[rows]
        return LinearWeights(expand_kv_heads(weight, kv, heads), None if bias is None else expand_kv_heads(bias, kv, heads))

    @staticmethod
    def _value_rows(module: nn.Module, site: Site) -> torch.Tensor | None:
        """The rows of a fused projection that compute the values, by the family's layout."""
        layout = _family(module).fused(module)
        hd, heads, kv = site.head_dim, site.num_heads, site.num_kv_heads
        index = torch.arange((heads + 2 * kv) * hd)
        if layout == "stacked":
            return index[(heads + kv) * hd :]
        if layout == "interleaved" and kv == heads:
            return index.view(heads, 3, hd)[:, 2].flatten()
        if layout == "grouped":
            return index.view(kv, heads // kv + 2, hd)[:, -1].flatten()
        return None

    def wrap(self, site: Site, module: nn.Module, mixer: Mixer) -> ReplacedAttention:
        _, out = _layout(module)
        tail = tuple(n for n in (out, *OUTPUT_DROPOUT) if n is not None and isinstance(getattr(module, n, None), nn.Module))
        family = _family(module)
        return HFStructuralAttention(site, mixer, module, tail, family, returned_items(type(module)))


class HFStructuralAttention(HFReplacedAttention):
    """The shared convention, returning as many items as the original and applying its family's extras."""

    def __init__(self, site: Site, mixer: Mixer, original: nn.Module, tail: tuple[str, ...], family: HFFamily, items: int) -> None:
        super().__init__(site, mixer, original, tail + ((family.post_norm,) if family.post_norm else ()))
        self._tail, self.post_norm, self.residual, self.items = tail, family.post_norm, family.residual, items
        self.mask_true_masks = family.mask_true_masks
        self.mixes_alone = family.residual is None  # Bloom's output includes a residual `mix(x)` cannot see

    def _read(self, call: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask = call.get("attention_mask")
        if self.mask_true_masks and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            call = {**call, "attention_mask": ~mask}
        return super()._read(call)

    def complete(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = self.project(y)
        return y if self.post_norm is None else getattr(self, self.post_norm)(x + y)

    def forward(self, *args, **kwargs) -> tuple[torch.Tensor | None, ...]:
        call = self.arguments(args, kwargs)
        y = self.output(call)
        if self.residual is not None:
            y = y + call[self.residual]
        return (y,) + (None,) * (self.items - 1)
