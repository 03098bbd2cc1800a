"""The skeleton of per-head recurrent mixers (lstm, gru, a third party's cell), in one place.

Layout follows FAR: an input projection to heads (initialised from the teacher's value projection),
one recurrent cell per head and direction, the directions merged per head by a small linear map
back to the head width; the site's own output projection stays outside the mixer.

Heads and directions share one time loop: per step a single batched matmul over G = heads x
directions groups, several times faster than separate `nn.LSTM`/`nn.GRU` modules (which also have
no block-diagonal form and cannot skip padding in the middle or on the left of a sequence).
A subclass supplies only its cell: how many gate blocks it has and one step of its update.
"""

from __future__ import annotations

import abc
import math
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from replacer.errors import OptionsError
from replacer.graph.site import LinearWeights, Site
from replacer.mixer import MixerState, ScanMixer

R = TypeVar("R", bound="MultiHeadRecurrence")

GATE_BOUND = 15.0
"""Bound on the input part of gate pre-activations; see `MultiHeadRecurrence.scan`."""


class RecurrentOptions(BaseModel):
    """Options every per-head recurrent mixer takes."""

    model_config = ConfigDict(extra="forbid")

    hidden_per_head: int | None = Field(
        default=None, gt=0, description="hidden units per head and direction (default: the head width)"
    )
    bidirectional: bool | None = Field(
        default=None, description="run both directions; default: yes on bidirectional sites, no on causal ones"
    )
    init_from_value: bool = Field(
        default=True, description="initialise the input projection from the teacher's value projection"
    )


def resolve_bidirectional(plugin: str, site: Site, requested: bool | None) -> bool:
    """The direction count a site allows: both on encoders, forward-only on causal sites."""
    if requested is None:
        return not site.causal
    if requested and site.causal:
        raise OptionsError(
            f"{plugin} option 'bidirectional': True is impossible at causal site '{site.name}' "
            "(it would read future tokens); leave it unset or set it to false"
        )
    return requested


class MultiHeadRecurrence(ScanMixer):
    """Input projection -> G = heads x directions recurrent cells in one loop -> per-head merge.

    `gate_blocks` is the number of hidden-sized blocks in a cell's gate pre-activations (4 for an
    LSTM, 3 for a GRU). `state_size` is how many `(G, B, hidden)` tensors the cell carries; the
    first one is the cell's output.
    """

    gate_blocks: int = 1
    state_size: int = 1

    def __init__(self, site: Site, hidden: int, bidirectional: bool) -> None:
        super().__init__(site)
        self.heads, self.head_dim, self.hidden = site.num_heads, site.head_dim, hidden
        self.directions = 2 if bidirectional else 1
        d, h, hd, k = self.directions, hidden, self.head_dim, self.gate_blocks
        self.in_proj = nn.Linear(site.d_model, self.heads * hd)
        self.weight_ih = nn.Parameter(torch.empty(d, self.heads, hd, k * h))
        self.weight_hh = nn.Parameter(torch.empty(d, self.heads, h, k * h))
        self.bias = nn.Parameter(torch.zeros(d, self.heads, k * h))
        self.merge_weight = nn.Parameter(torch.empty(self.heads, d * h, hd))
        self.merge_bias = nn.Parameter(torch.zeros(self.heads, hd))
        bound = 1.0 / math.sqrt(hidden)
        nn.init.uniform_(self.weight_ih, -bound, bound)
        nn.init.uniform_(self.weight_hh, -bound, bound)
        nn.init.xavier_uniform_(self.merge_weight.view(-1, hd))

    @classmethod
    def from_options(
        cls: type[R], plugin: str, site: Site, options: RecurrentOptions, value: LinearWeights | None, **cell_args: Any
    ) -> R:
        """What every recurrent plugin's factory does: directions from the site and options, hidden size
        from the options (default: the head width), input projection started from the teacher's values."""
        bidirectional = resolve_bidirectional(plugin, site, options.bidirectional)
        mixer = cls(site, options.hidden_per_head or site.head_dim, bidirectional, **cell_args)
        if options.init_from_value and value is not None:
            value.copy_to(mixer.in_proj)
        return mixer

    @abc.abstractmethod
    def cell(self, gates_x: torch.Tensor, state: tuple[torch.Tensor, ...], weight_hh: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One step for all groups: input gate part `(G, B, k*h)`, state `(G, B, h)` each -> new state."""

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, hidden={self.hidden}, directions={self.directions}"

    def scan(
        self, x: torch.Tensor, state: MixerState | None, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, MixerState]:
        # Saturated gates make states and gradients decay into denormal floats, which slow CPU ops
        # about 20x. Bounding the input part of the gate pre-activations (the recurrent part is
        # bounded by |h| <= 1) keeps them out; sigmoid(-15) is already 3e-7, so little is lost.
        torch.set_flush_denormal(True)
        B, N, _ = x.shape
        d, H, h, hd, k = self.directions, self.heads, self.hidden, self.head_dim, self.gate_blocks
        u = self.in_proj(x).view(B, N, H, hd)
        # Input contributions to the gates for every step at once: (N, d, H, B, k*h).
        gates_x = torch.einsum("bnhi,dhio->ndhbo", u, self.weight_ih) + self.bias[None, :, :, None, :]
        gates_x = gates_x.clamp(-GATE_BOUND, GATE_BOUND)
        if d == 2:  # the backward direction runs over the reversed sequence in the same loop
            gates_x = torch.cat((gates_x[:, :1], gates_x[:, 1:].flip(0)), dim=1)
        gates_x = gates_x.reshape(N, d * H, B, k * h)
        keep = None if padding_mask is None else self._group_mask(padding_mask.to(x.device, torch.bool))
        w_hh = self.weight_hh.reshape(d * H, h, k * h)
        if state is None:
            carried = tuple(x.new_zeros(d * H, B, h) for _ in range(self.state_size))
        else:
            carried = tuple(s.transpose(0, 1) for s in state)
        outputs = []
        for t in range(N):
            new = self.cell(gates_x[t], carried, w_hh)
            if keep is not None:  # padded steps leave the state untouched, in either direction
                new = tuple(torch.where(keep[t], n, o) for n, o in zip(new, carried))
            carried = new
            outputs.append(new[0])
        hs = torch.stack(outputs).view(N, d, H, B, h)
        if d == 2:
            hs = torch.cat((hs[:, :1], hs[:, 1:].flip(0)), dim=1)
        hs = hs.permute(3, 0, 2, 1, 4).reshape(B, N, H, d * h)
        y = torch.einsum("bnhk,hko->bnho", hs, self.merge_weight) + self.merge_bias
        y = y.reshape(B, N, H * hd)
        if padding_mask is not None:
            y = y * padding_mask.to(y.dtype)[..., None]
        return y, tuple(s.transpose(0, 1) for s in carried)

    def _group_mask(self, padding_mask: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (N, d*H, B, 1), with the backward direction's mask reversed like its inputs."""
        d, H = self.directions, self.heads
        keep = padding_mask.t()[:, None, :, None].expand(-1, d, -1, 1)
        if d == 2:
            keep = torch.stack((keep[:, 0], keep[:, 1].flip(0)), dim=1)
        return keep.repeat_interleave(H, dim=1)
