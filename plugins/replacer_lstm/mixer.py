"""Multi-head LSTM (FAR): every head and direction an independent LSTM, run as one grouped recurrence."""

from __future__ import annotations

import torch
from pydantic import Field

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
        g = torch.baddbmm(gates_x, hx, weights["weight_hh"])
        ifo = g[..., : 3 * h].sigmoid()
        c_new = torch.addcmul(ifo[..., h : 2 * h] * cx, ifo[..., :h], g[..., 3 * h :].tanh())
        return ifo[..., 2 * h :] * c_new.tanh(), c_new
