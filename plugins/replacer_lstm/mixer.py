"""Multi-head LSTM (FAR): every head and direction an independent LSTM, run as one grouped recurrence."""

from __future__ import annotations

import torch
from pydantic import Field

from replacer import fused
from replacer.graph.site import LinearWeights, Site
from replacer.recurrent import MultiHeadRecurrence, RecurrentOptions


class LSTMOptions(RecurrentOptions):
    """Options of the `lstm` plugin."""

    forget_bias: float = Field(default=1.0, description="initial forget-gate bias (1.0 keeps memory at start)")


def build(site: Site, options: LSTMOptions, value: LinearWeights | None) -> "MultiHeadLSTM":
    return MultiHeadLSTM.from_options("lstm", site, options, value, forget_bias=options.forget_bias)


class MultiHeadLSTM(MultiHeadRecurrence):
    """Gates laid out [input, forget, output | candidate]: one sigmoid over three blocks, one tanh."""

    gate_blocks = 4
    state_size = 2

    def __init__(self, site: Site, hidden: int, bidirectional: bool, forget_bias: float = 1.0) -> None:
        super().__init__(site, hidden, bidirectional)
        with torch.no_grad():
            for bias in self.bias:
                bias[hidden : 2 * hidden] = forget_bias

    def cell(self, gates_x: torch.Tensor, state: tuple[torch.Tensor, ...], weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        hx, cx = state
        h = hx.shape[-1]
        # split/chunk rather than slices: a slice's backward writes a zero tensor of the whole input
        ifo, candidate = torch.baddbmm(gates_x, hx, weights["weight_hh"]).split((3 * h, h), dim=-1)
        i, f, o = ifo.sigmoid().chunk(3, dim=-1)
        c_new = torch.addcmul(f * cx, i, candidate.tanh())
        return o * c_new.tanh(), c_new

    def fused_kernel(
        self, gx: torch.Tensor, bias: torch.Tensor, carried: tuple[torch.Tensor, ...], weights: dict[str, torch.Tensor],
        widths: list[int], padding_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return fused.kernels(gx).lstm_scan(gx, bias, weights["weight_hh"], widths, carried, padding_mask, self.heads)


MultiHeadLSTM.fused_cell = MultiHeadLSTM.cell
