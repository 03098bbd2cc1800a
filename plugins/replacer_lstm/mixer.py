"""Multi-head LSTM: every head (and direction) is an independent LSTM, all run as one grouped recurrence.

Layout follows FAR: an input projection to heads (initialised from the teacher's value projection),
one LSTM per head and direction, the directions merged per head by a small linear map back to the
head width, then the site's original output projection (kept by the adapter, outside the mixer).

Heads and directions share one time loop: per step a single batched matmul over G = heads x
directions groups, which is what makes this several times faster than separate `nn.LSTM`s.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from replacer.errors import OptionsError
from replacer.graph.site import LinearWeights, Site
from replacer.mixer import Mixer, MixerState


GATE_BOUND = 15.0


class LSTMOptions(BaseModel):
    """Options of the `lstm` plugin."""

    model_config = ConfigDict(extra="forbid")

    hidden_per_head: int | None = Field(
        default=None, gt=0, description="LSTM hidden units per head and direction (default: the head width)"
    )
    bidirectional: bool | None = Field(
        default=None, description="run both directions; default: yes on bidirectional sites, no on causal ones"
    )
    init_from_value: bool = Field(
        default=True, description="initialise the input projection from the teacher's value projection"
    )
    forget_bias: float = Field(default=1.0, description="initial forget-gate bias (1.0 keeps memory at start)")


def build(site: Site, options: LSTMOptions, value: LinearWeights | None) -> "MultiHeadLSTM":
    bidirectional = options.bidirectional
    if bidirectional is None:
        bidirectional = not site.causal
    if bidirectional and site.causal:
        raise OptionsError(
            f"lstm option 'bidirectional': True is impossible at causal site '{site.name}' "
            "(it would read future tokens); leave it unset or set it to false"
        )
    mixer = MultiHeadLSTM(site, options.hidden_per_head or site.head_dim, bidirectional, options.forget_bias)
    if options.init_from_value and value is not None:
        mixer.init_input_projection(value)
    return mixer


class MultiHeadLSTM(Mixer):
    def __init__(self, site: Site, hidden: int, bidirectional: bool, forget_bias: float = 1.0) -> None:
        super().__init__(site)
        self.heads, self.head_dim, self.hidden = site.num_heads, site.head_dim, hidden
        self.directions = 2 if bidirectional else 1
        d, h, hd = self.directions, hidden, self.head_dim
        self.in_proj = nn.Linear(site.d_model, self.heads * hd)
        self.weight_ih = nn.Parameter(torch.empty(d, self.heads, hd, 4 * h))
        self.weight_hh = nn.Parameter(torch.empty(d, self.heads, h, 4 * h))
        self.bias = nn.Parameter(torch.zeros(d, self.heads, 4 * h))
        self.merge_weight = nn.Parameter(torch.empty(self.heads, d * h, hd))
        self.merge_bias = nn.Parameter(torch.zeros(self.heads, hd))
        self._reset(forget_bias)

    def _reset(self, forget_bias: float) -> None:
        bound = 1.0 / math.sqrt(self.hidden)
        nn.init.uniform_(self.weight_ih, -bound, bound)
        nn.init.uniform_(self.weight_hh, -bound, bound)
        with torch.no_grad():
            self.bias[..., self.hidden : 2 * self.hidden] = forget_bias
        nn.init.xavier_uniform_(self.merge_weight.view(-1, self.head_dim))

    @torch.no_grad()
    def init_input_projection(self, value: LinearWeights) -> None:
        self.in_proj.weight.copy_(value.weight)
        if value.bias is not None:
            self.in_proj.bias.copy_(value.bias)
        else:
            self.in_proj.bias.zero_()

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, hidden={self.hidden}, directions={self.directions}"

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(x, None, padding_mask)[0]

    def forward_stateful(
        self, x: torch.Tensor, state: MixerState | None, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MixerState]:
        if self.directions != 1:
            raise TypeError("a bidirectional LSTM reads the future and cannot carry state")
        return self._run(x, state, padding_mask)

    def _run(
        self, x: torch.Tensor, state: MixerState | None, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, MixerState]:
        # Saturated gates make states and gradients decay into denormal floats, which slow CPU ops
        # about 20x. Bounding the input part of the gate pre-activations (the recurrent part is
        # bounded by |h| <= 1) keeps them out; sigmoid(-15) is already 3e-7, so little is lost.
        torch.set_flush_denormal(True)
        B, N, _ = x.shape
        d, H, h, hd = self.directions, self.heads, self.hidden, self.head_dim
        u = self.in_proj(x).view(B, N, H, hd)
        # Input contributions to the gates for every step at once: (N, d*H, B, 4h).
        gates_x = torch.einsum("bnhi,dhio->ndhbo", u, self.weight_ih) + self.bias[None, :, :, None, :]
        gates_x = gates_x.clamp(-GATE_BOUND, GATE_BOUND)
        keep = None if padding_mask is None else padding_mask.to(x.device, torch.bool).t()  # (N, B)
        if d == 2:  # the backward direction runs over the reversed sequence in the same loop
            gates_x = torch.cat((gates_x[:, :1], gates_x[:, 1:].flip(0)), dim=1)
        gates_x = gates_x.reshape(N, d * H, B, 4 * h)
        if keep is not None:
            keep_g = keep[:, None, :, None].expand(N, d, B, 1)
            if d == 2:
                keep_g = torch.stack((keep_g[:, 0], keep_g[:, 1].flip(0)), dim=1)
            keep_g = keep_g.repeat_interleave(H, dim=1)  # (N, d*H, B, 1)
        w_hh = self.weight_hh.reshape(d * H, h, 4 * h)
        if state is None:
            hx = x.new_zeros(d * H, B, h)
            cx = x.new_zeros(d * H, B, h)
        else:
            hx, cx = (s.transpose(0, 1) for s in state)
        outputs = []
        for t in range(N):  # gates are laid out [input, forget, output | candidate]: one sigmoid, one tanh
            g = torch.baddbmm(gates_x[t], hx, w_hh)
            ifo = g[..., : 3 * h].sigmoid()
            c_new = torch.addcmul(ifo[..., h : 2 * h] * cx, ifo[..., :h], g[..., 3 * h :].tanh())
            h_new = ifo[..., 2 * h :] * c_new.tanh()
            if keep is not None:  # padded steps leave the state untouched, in either direction
                c_new = torch.where(keep_g[t], c_new, cx)
                h_new = torch.where(keep_g[t], h_new, hx)
            hx, cx = h_new, c_new
            outputs.append(h_new)
        hs = torch.stack(outputs).view(N, d, H, B, h)
        if d == 2:
            hs = torch.cat((hs[:, :1], hs[:, 1:].flip(0)), dim=1)
        hs = hs.permute(3, 0, 2, 1, 4).reshape(B, N, H, d * h)
        y = torch.einsum("bnhk,hko->bnho", hs, self.merge_weight) + self.merge_bias
        y = y.reshape(B, N, H * hd)
        if padding_mask is not None:
            y = y * padding_mask.to(y.dtype)[..., None]
        return y, (hx.transpose(0, 1), cx.transpose(0, 1))
