"""Multi-head selective state-space mixer (Mamba-2 / SSD), one SSM head per attention head.

Layout: an x branch (initialised from the teacher's value projection) through a short causal
depthwise conv and SiLU, a selective scan per head with input-dependent dt, B and C and a scalar
decay A, a skip D, then a SiLU gate. Encoders run a forward and a backward scan, each with its own
conv and SSM parameters (stacked on a leading direction axis) and sum them; decoders run forward.

Both directions run as one scan over `directions x heads` heads, so they share every kernel call.

Pruning removes x-branch channels (`replacer.pruning`): a channel's rows of the x and gate
projections and its conv filter in both directions. The `channels` buffer says which of the
`heads x head_dim` outputs remain; heads scan at the width of the widest one and removed channels
output zero, which the site's kept output projection then ignores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from replacer.graph.site import LinearWeights, Site
from replacer.mixer import MixerState, PruneGroup, ScanMixer
from replacer.recurrent import resolve_bidirectional
from replacer_ssm.scan import ssd_scan

DT_MIN, DT_MAX = 1e-3, 1e-1
A_MIN, A_MAX = 1.0, 16.0


class SSMOptions(BaseModel):
    """Options of the `ssm` plugin."""

    model_config = ConfigDict(extra="forbid")

    state_size: int = Field(
        default=16, gt=0, description="SSM state rows per head (N): each head keeps an N x head_dim state"
    )
    conv_kernel: int = Field(
        default=4, ge=0, description="width of the causal depthwise conv (and its SiLU) before the scan; 0 or 1: none"
    )
    chunk_size: int = Field(
        default=64, gt=0, description="scan chunk length: quadratic within a chunk, recurrent between chunks"
    )
    gate: bool = Field(default=True, description="multiply the outputs by silu of a gate projection of the input")
    bidirectional: bool | None = Field(
        default=None, description="run both directions; default: yes on bidirectional sites, no on causal ones"
    )
    init_from_value: bool = Field(
        default=True, description="initialise the x-branch projection from the teacher's value projection"
    )


def build(site: Site, options: SSMOptions, value: LinearWeights | None) -> "MultiHeadSSM":
    bidirectional = resolve_bidirectional("ssm", site, options.bidirectional)
    mixer = MultiHeadSSM(
        site, options.state_size, options.conv_kernel, options.chunk_size, options.gate, bidirectional
    )
    if options.init_from_value and value is not None:
        value.copy_to(mixer.in_proj)
    return mixer


class MultiHeadSSM(ScanMixer):
    def __init__(
        self, site: Site, state_size: int, conv_kernel: int, chunk_size: int, gate: bool, bidirectional: bool
    ) -> None:
        super().__init__(site)
        self.heads, self.head_dim, self.state_size = site.num_heads, site.head_dim, state_size
        self.conv_kernel = conv_kernel if conv_kernel > 1 else 0
        self.chunk_size = chunk_size
        self.directions = d = 2 if bidirectional else 1
        H, P, n, inner = self.heads, self.head_dim, state_size, self.heads * self.head_dim
        self.in_proj = nn.Linear(site.d_model, inner)
        self.gate_proj = nn.Linear(site.d_model, inner) if gate else None
        if self.conv_kernel:
            self.conv_weight = nn.Parameter(torch.empty(d, inner, self.conv_kernel))
            self.conv_bias = nn.Parameter(torch.empty(d, inner))
        self.B_weight = nn.Parameter(torch.empty(d, H * n, site.d_model))
        self.C_weight = nn.Parameter(torch.empty(d, H * n, site.d_model))
        self.dt_weight = nn.Parameter(torch.empty(d, H, site.d_model))
        self.dt_bias = nn.Parameter(torch.empty(d, H))
        self.A_log = nn.Parameter(torch.empty(d, H))
        self.D = nn.Parameter(torch.ones(d, H))
        self.register_buffer("channels", torch.arange(inner))
        self._reset()

    @torch.no_grad()
    def _reset(self) -> None:
        """Mamba's initialisation: Linear/Conv1d defaults, dt log-uniform in [1e-3, 1e-1], A uniform in [1, 16]."""
        bound = 1.0 / math.sqrt(self.d_model)
        for w in (self.B_weight, self.C_weight, self.dt_weight):
            nn.init.uniform_(w, -bound, bound)
        if self.conv_kernel:
            bound = 1.0 / math.sqrt(self.conv_kernel)
            nn.init.uniform_(self.conv_weight, -bound, bound)
            nn.init.uniform_(self.conv_bias, -bound, bound)
        dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(DT_MIN), math.log(DT_MAX)))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(A_MIN, A_MAX).log())

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, head_dim={self.head_dim}, state_size={self.state_size}, "
            f"conv_kernel={self.conv_kernel}, gate={self.gate_proj is not None}, directions={self.directions}"
        )

    def prunable_groups(self) -> list[PruneGroup]:
        """One x-branch channel: projection rows, conv filters (both directions) and its place in `channels`."""
        per_channel = [("in_proj.weight", 0), ("in_proj.bias", 0), ("channels", 0)]
        if self.gate_proj is not None:
            per_channel += [("gate_proj.weight", 0), ("gate_proj.bias", 0)]
        if self.conv_kernel:
            per_channel += [("conv_weight", 1), ("conv_bias", 1)]
        return [
            PruneGroup(
                f"channel {int(c)}", f"channels {int(c) // self.head_dim}", tuple((n, dim, (i,)) for n, dim in per_channel), "channels"
            )
            for i, c in enumerate(self.channels)
        ]

    def _head_layout(self) -> tuple[int, torch.Tensor | None]:
        """The widest head's channel count, and where each remaining channel sits in `(heads, widest)`
        (None while nothing is pruned)."""
        if len(self.channels) == self.heads * self.head_dim:
            return self.head_dim, None
        head = torch.div(self.channels, self.head_dim, rounding_mode="floor")
        counts = torch.bincount(head, minlength=self.heads)
        widest = int(counts.max())
        rank = torch.arange(len(head), device=head.device) - (torch.cumsum(counts, 0) - counts)[head]
        return widest, head * widest + rank

    def scan(
        self, x: torch.Tensor, state: MixerState | None, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, MixerState]:
        """State: (conv_state (B, heads*head_dim, conv_kernel-1), ssm_state (B, heads, state_size, head_dim))."""
        # Strong decays (exp(dt*A) over many steps) produce denormal floats, which slow CPU ops ~20x.
        torch.set_flush_denormal(True)
        Bsz, N, _ = x.shape
        d, H, n, K = self.directions, self.heads, self.state_size, self.conv_kernel
        P, layout = self._head_layout()
        inner = len(self.channels)
        keep = order = None
        count = torch.full((Bsz,), N, device=x.device)
        if padding_mask is not None and not bool(padding_mask.all()):
            # Move each row's real tokens to its front, in order: the conv windows and the scan then see
            # exactly the unpadded sequence, wherever the padding sat; outputs are moved back at the end.
            mask = padding_mask.to(x.device, torch.bool)
            order = torch.argsort(~mask, dim=1, stable=True)
            x = x.gather(1, order[..., None].expand_as(x))
            count = mask.sum(1)
            keep = torch.arange(N, device=x.device) < count[:, None]

        u = self.in_proj(x)
        if keep is not None:
            u = u.masked_fill(~keep[..., None], 0)
        xs = x[:, None] if d == 1 else torch.stack((x, x.flip(1)), 1)  # (B, d, N, d_model)
        us = u[:, None] if d == 1 else torch.stack((u, u.flip(1)), 1)  # (B, d, N, inner)

        conv_state = u.new_zeros(Bsz, inner, 0)
        if K:
            prefix = u.new_zeros(Bsz, d * inner, K - 1) if state is None else state[0].to(u.dtype)
            seq = torch.cat((prefix, us.transpose(2, 3).reshape(Bsz, d * inner, N)), -1)
            conv = F.conv1d(seq, self.conv_weight.view(d * inner, 1, K), self.conv_bias.view(-1), groups=d * inner)
            us = F.silu(conv.view(Bsz, d, inner, N).transpose(2, 3))
            if d == 1:  # the last K-1 real inputs, reaching back into the previous state for short pieces
                window = count[:, None, None] + torch.arange(K - 1, device=x.device)
                conv_state = seq.gather(2, window.expand(Bsz, inner, K - 1))

        weight = torch.cat((self.B_weight, self.C_weight, self.dt_weight), 1)
        proj = torch.einsum("bknd,kod->bnko", xs, weight)  # (B, N, d, 2*H*n + H)
        Bm, Cm, dt = proj.split((H * n, H * n, H), -1)
        dt = F.softplus(dt + self.dt_bias)
        if keep is not None:  # dt = 0: padded steps neither decay nor feed the state
            keep_d = keep[:, :, None] if d == 1 else torch.stack((keep, keep.flip(1)), 2)
            dt = dt.masked_fill(~keep_d[..., None], 0)
        us = us.permute(0, 2, 1, 3)  # (B, N, d, channels)
        if layout is not None:
            us = us.new_zeros(Bsz, N, d, H * P).index_copy(-1, layout, us)
        y, ssm_state = ssd_scan(
            us.reshape(Bsz, N, d * H, P),
            dt.reshape(Bsz, N, d * H),
            -torch.exp(self.A_log).view(-1),
            Bm.reshape(Bsz, N, d * H, n),
            Cm.reshape(Bsz, N, d * H, n),
            self.D.view(-1),
            self.chunk_size,
            None if state is None else state[1],
        )
        y = y.reshape(Bsz, N, d, H * P)
        if layout is not None:
            y = y.index_select(-1, layout)
        y = y[:, :, 0] if d == 1 else y[:, :, 0] + y[:, :, 1].flip(1)
        if self.gate_proj is not None:
            y = y * F.silu(self.gate_proj(x))
        if layout is not None:  # removed channels output zero
            y = y.new_zeros(Bsz, N, self.out_dim).index_copy(-1, self.channels, y)
        if order is not None:
            y = y.gather(1, torch.argsort(order, dim=1)[..., None].expand_as(y))
            y = y.masked_fill(~mask[..., None], 0)
        return y, (conv_state, ssm_state)
