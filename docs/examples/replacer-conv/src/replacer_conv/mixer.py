"""A short depthwise convolution over tokens, per channel of every head.

The cheapest mixer there is: each output channel is a learned weighted sum of the same channel over
a window of `window` tokens (the last ones on causal sites, a centred window on encoders), after a
value projection started from the teacher's. It shows the whole Mixer contract without a
recurrence: padding handled by moving real tokens together, and a decoding state that is simply
the last `window - 1` projected tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from replacer import LinearWeights, Mixer, MixerState, Site


class ConvOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: int = Field(5, ge=2, description="tokens each output reads, itself included")
    init_from_value: bool = Field(True, description="start the projection as the teacher's value projection")


def build(site: Site, options: ConvOptions, value: LinearWeights | None) -> "ShortConvMixer":
    mixer = ShortConvMixer(site, options.window)
    if options.init_from_value and value is not None:
        value.copy_to(mixer.in_proj)
    return mixer


class ShortConvMixer(Mixer):
    def __init__(self, site: Site, window: int) -> None:
        super().__init__(site)
        self.window = window
        self.in_proj = nn.Linear(site.d_model, site.out_dim)
        # Start as a uniform average over the window: local attention with equal weights.
        self.kernel = nn.Parameter(torch.full((site.out_dim, 1, window), 1.0 / window))

    def extra_repr(self) -> str:
        return f"window={self.window}, channels={self.out_dim}, causal={self.causal}"

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.causal:
            return self.forward_stateful(x, None, padding_mask)[0]
        keep = _keep(x, padding_mask)
        v, order = _gather_real(self.in_proj(x) * keep.unsqueeze(-1), keep)
        left = (self.window - 1) // 2
        v = F.pad(v.transpose(1, 2), (left, self.window - 1 - left))
        return _scatter_back(F.conv1d(v, self.kernel, groups=self.out_dim).transpose(1, 2), order, keep)

    def forward_stateful(
        self, x: torch.Tensor, state: MixerState | None, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MixerState]:
        """State: the last `window - 1` projected real tokens, `(B, window - 1, channels)`."""
        if not self.causal:
            raise TypeError("a bidirectional conv mixer reads later tokens and cannot carry state")
        keep = _keep(x, padding_mask)
        v, order = _gather_real(self.in_proj(x) * keep.unsqueeze(-1), keep)
        past = state[0] if state is not None else v.new_zeros(x.shape[0], self.window - 1, self.out_dim)
        joined = torch.cat((past, v), 1)  # real tokens follow the past directly: padding takes no slot
        y = F.conv1d(joined.transpose(1, 2), self.kernel, groups=self.out_dim).transpose(1, 2)
        real = keep.sum(1, keepdim=True)  # the last window-1 entries before each row's first padded slot
        index = (real + torch.arange(self.window - 1, device=x.device)).unsqueeze(-1).expand(-1, -1, self.out_dim)
        return _scatter_back(y, order, keep), (joined.gather(1, index),)


def _keep(x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if padding_mask is None else padding_mask.bool()


def _gather_real(v: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real tokens moved to the front of each row, in order (padded ones, zeroed, behind them)."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    return v.gather(1, order.unsqueeze(-1).expand_as(v)), order


def _scatter_back(y: torch.Tensor, order: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Undo `_gather_real`; padded positions output zeros."""
    out = torch.zeros_like(y).scatter(1, order.unsqueeze(-1).expand_as(y), y)
    return out * keep.unsqueeze(-1)
