"""What a located attention module is, independent of the family it comes from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Site:
    """One attention module the engine can replace.

    `out_dim` is the width of the merged heads the mixer must produce: the site's kept output
    projection (if it owns one) maps it back to the model width.
    """

    name: str
    cls: str
    adapter: str
    layer_index: int
    d_model: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    causal: bool
    note: str = ""

    @property
    def out_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def parent_name(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def attr(self) -> str:
        return self.name.rpartition(".")[2]

    def to_dict(self) -> dict:
        return asdict(self)

    def heads_subset(self, count: int) -> "Site":
        """The site seen by a mixer that replaces `count` of its heads (each its own kv head)."""
        return replace(self, num_heads=count, num_kv_heads=count)


def head_rows(heads: list[int], head_dim: int) -> "torch.Tensor":
    """Indices of the rows (or columns) that belong to `heads` in a projection laid out head by head."""
    import torch

    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


@dataclass(frozen=True)
class UnsupportedSite:
    """A module that looks like attention but that no adapter can replace, with the reason."""

    name: str
    cls: str
    reason: str


@dataclass(frozen=True)
class LinearWeights:
    """A projection's weight (out, in) and bias, laid out per query head, for initialising mixers."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def rows(self, index: "torch.Tensor") -> "LinearWeights":
        """The output rows in `index` (e.g. the heads a mixer replaces)."""
        return LinearWeights(self.weight[index], None if self.bias is None else self.bias[index])

    def copy_to(self, linear: "torch.nn.Linear") -> None:
        """Start `linear` as this projection (a missing bias becomes zeros)."""
        import torch

        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if linear.bias is not None and self.bias is not None:
                linear.bias.copy_(self.bias)
            elif linear.bias is not None:
                linear.bias.zero_()
