"""Grouped LSTM and GRU recurrences on CUDA through FlashRNN (PyPI `flashrnn`, `replacer[cuda]`).

FlashRNN runs head-wise recurrences with block-diagonal recurrent weights, which is exactly the
shape of `MultiHeadRecurrence`: each group (direction x head) becomes one FlashRNN head. These
functions take and return the layouts of `replacer.fused.autograd` (see `numba_kernels`), so a cell
calls one or the other by device alone; FlashRNN's own autograd function gives the backward.

What FlashRNN cannot do, the caller is told through `KernelUnavailable` and takes the reference loop:
it has no step mask (padding in a batch), and a configuration whose kernel fails to build or run is
remembered and not tried again. Groups narrower than the widest (pruning) are zero-padded, which
keeps them exact: a zero unit stays zero in both cells. The backward direction runs on a reversed
copy of its inputs, and the input part of the gate pre-activations is bounded here (GATE_BOUND),
as the other paths bound it.

Gate orders differ from replacer's: FlashRNN's LSTM is [input, forget, candidate, output]
(replacer's [input, forget, output, candidate]); its GRU takes recurrent gates [candidate, reset,
update], input gates [reset, update, candidate] and biases [recurrent candidate, reset, update,
input candidate].
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from replacer.fused import GATE_BOUND, KernelUnavailable

State = tuple[torch.Tensor, ...]
BACKEND = "cuda_fused"
"""FlashRNN backend; its pure-torch `vanilla` backend computes the same function anywhere (the tests use it)."""

LSTM_GATES = (0, 1, 3, 2)  # FlashRNN's gate i is replacer's gate LSTM_GATES[i]
GRU_RECURRENT_GATES = (2, 0, 1)
_failed: dict[tuple, str] = {}


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why FlashRNN cannot run here (None when it can): no CUDA device, or flashrnn missing or broken."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    try:
        import flashrnn  # noqa: F401
    except Exception as exc:  # an install without its CUDA toolchain can fail with more than ImportError
        return f"flashrnn is not installed or does not import ({type(exc).__name__}: {exc}; pip install 'replacer[cuda]')"
    return None


def lstm_scan(
    gx: torch.Tensor, bias: torch.Tensor, w: torch.Tensor, widths: list[int], state: State,
    padding_mask: torch.Tensor | None, heads: int,
) -> tuple[torch.Tensor, State]:
    """`replacer.fused.autograd.lstm_scan` on FlashRNN (same arguments and results)."""
    G, B, h = state[0].shape
    wx = _gate_inputs(gx, bias, heads, G, B, 4, h, padding_mask)[:, :, list(LSTM_GATES)]
    R = _recurrent(w, 4, h)[list(LSTM_GATES)]
    b = wx.new_zeros(4, G, h)
    states = torch.stack([s.transpose(0, 1) for s in state])[:, :, None]  # (2, B, 1, G, h)
    out, last = _call("lstm", wx, R, b, states)
    return _outputs(out, heads, G, B, h), (last[0, :, 0].transpose(0, 1), last[1, :, 0].transpose(0, 1))


def gru_scan(
    gx: torch.Tensor, bias: torch.Tensor, w: torch.Tensor, bias_hh: torch.Tensor, widths: list[int], state: State,
    padding_mask: torch.Tensor | None, heads: int,
) -> tuple[torch.Tensor, State]:
    """`replacer.fused.autograd.gru_scan` on FlashRNN (same arguments and results)."""
    G, B, h = state[0].shape
    wx = _gate_inputs(gx, bias, heads, G, B, 3, h, padding_mask)
    R = _recurrent(w, 3, h)[list(GRU_RECURRENT_GATES)]
    recurrent_bias = bias_hh.view(G, 3, h).transpose(0, 1)  # (3, G, h): reset, update, candidate
    b = torch.cat((recurrent_bias[2:], recurrent_bias[:2], torch.zeros_like(recurrent_bias[:1])))
    out, last = _call("gru", wx, R, b, state[0].transpose(0, 1)[None, :, None])
    return _outputs(out, heads, G, B, h), (last[0, :, 0].transpose(0, 1),)


def _gate_inputs(
    gx: torch.Tensor, bias: torch.Tensor, heads: int, G: int, B: int, k: int, h: int, padding_mask: torch.Tensor | None,
) -> torch.Tensor:
    """`gx (H, B*N, d*k*h)` + bias, bounded, as FlashRNN's `(B, N, k, G, h)`, the backward direction reversed in time."""
    if padding_mask is not None and not bool(padding_mask.all()):
        raise KernelUnavailable("FlashRNN kernels have no step mask; batches with padding take the reference loop")
    d = G // heads
    z = (gx + bias[:, None]).clamp(-GATE_BOUND, GATE_BOUND)
    z = z.view(heads, B, -1, d, k, h).permute(1, 2, 4, 3, 0, 5)  # (B, N, k, d, H, h)
    if d == 2:
        z = torch.cat((z[:, :, :, :1], z[:, :, :, 1:].flip(1)), dim=3)
    return z.reshape(B, z.shape[1], k, G, h)


def _recurrent(w: torch.Tensor, k: int, h: int) -> torch.Tensor:
    """`w (G, h_prev, k*h)` (replacer: z += state @ w) as FlashRNN's `(k, G, h_new, h_prev)`."""
    return w.view(w.shape[0], h, k, h).permute(2, 0, 3, 1)


def _outputs(out: torch.Tensor, heads: int, G: int, B: int, h: int) -> torch.Tensor:
    """FlashRNN's hidden states `(B, N, G, h)` as `(H, B*N, d*h)`, the backward direction back in order."""
    d = G // heads
    hs = out.view(B, -1, d, heads, h)
    if d == 2:
        hs = torch.cat((hs[:, :, :1], hs[:, :, 1:].flip(1)), dim=2)
    return hs.permute(3, 0, 1, 2, 4).reshape(heads, -1, d * h)


def _call(
    function: str, wx: torch.Tensor, R: torch.Tensor, b: torch.Tensor, states: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashRNN's hidden outputs `(B, N, G, h)` and final states `(S, B, 1, G, h)`; a configuration that fails once
    is remembered and reported as unavailable from then on."""
    from flashrnn import flashrnn

    key = (function, BACKEND, tuple(R.shape), wx.dtype, wx.device.type)
    if key in _failed:
        raise KernelUnavailable(_failed[key])
    options: dict[str, Any] = {"function": function, "backend": BACKEND, "dtype": str(wx.dtype).removeprefix("torch.")}
    try:
        out, last = flashrnn(wx, R.contiguous(), b.contiguous(), states=states.contiguous(), **options)
    except Exception as exc:  # a kernel that cannot be compiled or launched for this shape
        shape = f"{R.shape[1]} groups of {R.shape[2]} units, {options['dtype']}"
        _failed[key] = f"FlashRNN {function} ({BACKEND}) failed for {shape}: {type(exc).__name__}: {exc}"
        raise KernelUnavailable(_failed[key]) from exc
    return out[0], last
