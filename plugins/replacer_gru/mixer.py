"""Multi-head GRU: every head and direction an independent GRU, run as one grouped recurrence."""

from __future__ import annotations

import torch

from replacer.graph.site import LinearWeights, Site
from replacer.recurrent import MultiHeadRecurrence, RecurrentOptions


class GRUOptions(RecurrentOptions):
    """Options of the `gru` plugin."""


def build(site: Site, options: GRUOptions, value: LinearWeights | None) -> "MultiHeadGRU":
    return MultiHeadGRU.from_options("gru", site, options, value)


class MultiHeadGRU(MultiHeadRecurrence):
    """Gates laid out [reset, update | candidate], as in `nn.GRU`: the candidate's recurrent part
    has its own bias and is scaled by the reset gate, so it needs a recurrent bias of its own."""

    gate_blocks = 3
    state_size = 1
    gate_vectors = ("bias", "bias_hh")

    def cell(self, gates_x: torch.Tensor, state: tuple[torch.Tensor, ...], weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        (hx,) = state
        h = hx.shape[-1]
        g = torch.baddbmm(weights["bias_hh"][:, None], hx, weights["weight_hh"])
        rz = (gates_x[..., : 2 * h] + g[..., : 2 * h]).sigmoid()
        candidate = torch.addcmul(gates_x[..., 2 * h :], rz[..., :h], g[..., 2 * h :]).tanh()
        return (torch.lerp(candidate, hx, rz[..., h:]),)
