"""The base every model-family adapter extends, and the module that stands where attention stood."""

from __future__ import annotations

import abc
import inspect
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from replacer.graph.feed_forward import FeedForward, NoFeedForward, find_feed_forward
from replacer.graph.site import LinearWeights, Site
from replacer.mixer import Mixer, PruneGroup


Target = Callable[[tuple, Any], torch.Tensor]
"""A function of a teacher module's positional inputs and output: what a site learns block-wise."""


class Unsupported(Exception):
    """Raised by `Adapter.describe` for a module it recognises but cannot replace; the text is the reason."""


class Adapter(abc.ABC):
    """Knows one family of attention classes: how to recognise, measure, initialise from and wrap them."""

    name: str = ""
    priority: int = 0
    """Adapters with a higher priority are asked first (ties: the order plugins registered them), so a
    family's own adapter wins over a structural one that would also match, whatever was installed first."""

    @abc.abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """True if this adapter understands `module` (cheap: class and attributes only)."""

    @abc.abstractmethod
    def describe(self, name: str, module: nn.Module, layer_index: int) -> Site:
        """The site for `module`, or raise `Unsupported(reason)`."""

    @abc.abstractmethod
    def value_projection(self, module: nn.Module, site: Site) -> LinearWeights | None:
        """The value projection laid out as (num_heads * head_dim, d_model), grouped KV heads expanded."""

    @abc.abstractmethod
    def wrap(self, site: Site, module: nn.Module, mixer: Mixer) -> "ReplacedAttention":
        """The module to install in place of `module`: same call signature and return convention."""

    def wrap_heads(self, site: Site, module: nn.Module, mixer: Mixer, heads: list[int]) -> "ReplacedAttention":
        """A head-level hybrid: `heads` run `mixer`, the other heads keep attention (RecurFormer)."""
        raise Unsupported(f"adapter '{self.name}' cannot replace single heads; replace whole sites")

    def record_attention(self, module: nn.Module) -> ContextManager[list[torch.Tensor]]:
        """While active, `module` computes attention eagerly (even if it normally runs a fused kernel)
        and every call appends its probabilities `(B, heads, queries, keys)` to the yielded list."""
        raise Unsupported(f"adapter '{self.name}' cannot record attention probabilities")

    def sparsify_attention(self, module: nn.Module, top_k: int) -> ContextManager[None]:
        """While active, every query of `module` attends only to its `top_k` highest-scoring keys."""
        raise Unsupported(f"adapter '{self.name}' cannot make its attention sparse")

    linear_classes: tuple[type, ...] = ()
    """Classes besides `nn.Linear` that this family's MLPs are built of, storing their weight as (in, out)."""

    def feed_forward(self, model: nn.Module, site: Site, sites: set[str], attention: set[str]) -> FeedForward:
        """The MLP of the block `site` sits in (whole-model pruning cuts its hidden channels), or raise
        `Unsupported(reason)`. `sites` names every attention site of `model`, `attention` other
        attention-like modules (unsupported ones). The default finds the MLP from the block's shapes
        (`replacer.graph.feed_forward`); a family whose MLP that misreads overrides this."""
        try:
            return find_feed_forward(model, site.name, site.d_model, sites, attention, self.linear_classes)
        except NoFeedForward as why:
            raise Unsupported(str(why)) from None

    def token_embedding(self, model: nn.Module) -> str:
        """The name of `model`'s token embedding table (whole-model pruning factorises it and ranks its
        components), or raise `Unsupported(reason)`. Families without a vocabulary have none."""
        raise Unsupported(f"adapter '{self.name}' knows no token embedding")


class ReplacedAttention(nn.Module):
    """Holds a mixer plus the parts of the original attention that are kept (its output projection).

    Kept parts are stored under their original attribute names, so their state-dict keys are
    unchanged. Subclasses (one per adapter) implement the original calling convention in three
    pieces: `read_call` (a call -> input tensor and padding mask), `mix` (mixer plus kept output
    path) and `forward`. Distillation uses `read_call` on the teacher's calls and `mix` to train.
    """

    mixes_alone: bool = True
    """`mix(x, padding)` reproduces the site from its input alone. Per-site analyses need it; a head-level
    hybrid (whose kept heads need position embeddings) does not have it, yet distils block-wise
    (`distills_alone`)."""

    def __init__(self, site: Site, mixer: Mixer, original: nn.Module, kept: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.site = site
        self.mixer = mixer
        for attr in kept:
            setattr(self, attr, getattr(original, attr))
        self._signature = inspect.signature(original.forward)

    def arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return self._signature.bind(*args, **kwargs).arguments

    @abc.abstractmethod
    def read_call(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The `(B, N, D)` input and `(B, N)` padding mask (or None) of a call to the original module."""

    @abc.abstractmethod
    def mix(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """What the original module's main output would be, laid out like `read_call`'s input: mixer, then
        the kept output path."""

    @property
    def distills_alone(self) -> bool:
        """Block-wise distillation can train this site from recorded teacher pairs: `predict` on the site's
        input against what `target_in` reads from the teacher."""
        return self.mixes_alone

    def target_in(self, teacher_site: nn.Module) -> tuple[nn.Module, Target]:
        """Where block-wise distillation reads this site's target in the teacher: a module of the teacher's
        site (or the site itself) and a function of that module's positional inputs and its output. By
        default the site's main output, which `predict` (`mix`) reproduces."""
        return teacher_site, lambda inputs, output: self.read_output(output)

    def predict(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """What block-wise distillation compares with the target `target_in` reads: `mix` by default."""
        return self.mix(x, padding)

    def projection(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What carries `predict`'s output and its target into the site's output space, for a loss after the
        output projection (`distill.head_target`). Unchanged by default: the target is the site's output."""
        return lambda heads: heads

    def prunable_groups(self) -> list[PruneGroup]:
        """Groups of the kept parts (a hybrid's attention heads), slices named relative to this module;
        whole-model pruning ranks them beside the mixer's. None by default."""
        return []

    def read_output(self, output: Any) -> torch.Tensor:
        """The original module's main output laid out as `mix` returns it (the first of a tuple by default;
        sites whose tokens sit on a grid flatten it like `read_call` flattens the input)."""
        return output[0] if isinstance(output, tuple) else output

    def extra_repr(self) -> str:
        return f"site={self.site.name!r}, adapter={self.site.adapter!r}"


def site_wrappers(model: nn.Module) -> dict[str, ReplacedAttention]:
    """Every replaced site of `model`, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ReplacedAttention)}


def padding_from_attention_mask(
    mask: torch.Tensor | None, batch: int, query_len: int
) -> torch.Tensor | None:
    """A `(batch, query_len)` bool padding mask (True = real token) from whatever mask a layer receives.

    Handles 2-D masks (1 = keep), and 3-D or 4-D masks `(B, [1|H,] Q, K)` that are boolean, integer
    (1 = may attend, DeBERTa's) or additive (floating point, very negative = may not): a key is real
    when at least one query may attend to it, which holds for bidirectional and causal masks alike.
    The last `query_len` keys are the current tokens (earlier ones are cached context).
    """
    if mask is None:
        return None
    if mask.dim() == 3:  # (B, Q, K) without a head axis
        mask = mask[:, None]
    if mask.dim() == 2:
        keep = mask.bool()
    elif mask.dim() == 4:
        if mask.is_floating_point():
            allowed = mask > torch.finfo(mask.dtype).min / 2
        else:
            allowed = mask.bool()
        keep = allowed.any(dim=-2).all(dim=1)
    else:
        raise ValueError(f"cannot read a padding mask from an attention mask of shape {tuple(mask.shape)}")
    keep = keep[:, -query_len:].expand(batch, query_len)
    return None if bool(keep.all()) else keep
