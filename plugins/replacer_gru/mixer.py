"""Multi-head GRU: every head and direction an independent GRU, run as one grouped recurrence."""

from __future__ import annotations

import torch

from replacer import fused
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
        # split/chunk rather than slices: a slice's backward writes a zero tensor of the whole input
        rz_x, candidate_x = gates_x.split((2 * h, h), dim=-1)
        rz_h, candidate_h = torch.baddbmm(weights["bias_hh"][:, None], hx, weights["weight_hh"]).split((2 * h, h), dim=-1)
        r, z = (rz_x + rz_h).sigmoid().chunk(2, dim=-1)
        candidate = torch.addcmul(candidate_x, r, candidate_h).tanh()
        return (torch.lerp(candidate, hx, z),)

    def fused_kernel(
        self, gx: torch.Tensor, bias: torch.Tensor, carried: tuple[torch.Tensor, ...], weights: dict[str, torch.Tensor],
        widths: list[int], padding_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return fused.kernels(gx).gru_scan(gx, bias, weights["weight_hh"], weights["bias_hh"], widths, carried, padding_mask, self.heads)


MultiHeadGRU.fused_cell = MultiHeadGRU.cell
