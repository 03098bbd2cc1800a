"""The fused LSTM and GRU time loops as torch operations (layouts in `numba_kernels`).

A call without autograd runs the forward kernel alone. Under autograd the forward saves the gate
activations and a `torch.autograd.Function` runs the backward kernel through time; the recurrent
weights' gradients are then single large products of the gate gradients with the states each step
started from.
"""

from __future__ import annotations

import functools

import numba
import torch

from replacer.fused import numba_kernels as kernels

State = tuple[torch.Tensor, ...]


def _np(t: torch.Tensor):
    return t.detach().contiguous().numpy()


def _run(kernel, *args) -> None:
    """Run a kernel with numba's pool as wide as torch's (so a user's torch.set_num_threads governs both),
    handing out work items one at a time: with groups widest first, threads finish together."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    with numba.parallel_chunksize(1):
        kernel(*args)


@functools.lru_cache(maxsize=256)
def _groups(widths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups' live widths and the groups in order of decreasing width (the kernels' work order); cached, as
    building and sorting them cost more than a short recurrence (the kernels only read them)."""
    live = torch.tensor(widths, dtype=torch.int64)
    return live, torch.argsort(live, descending=True, stable=True)


def _keep(padding_mask: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, bool]:
    """The step mask as (B, N) uint8, and whether any step is masked at all."""
    if padding_mask is None or bool(padding_mask.all()):
        return torch.ones(batch, 1, dtype=torch.uint8), False
    return padding_mask.to(torch.uint8).contiguous(), True


def _previous(h0: torch.Tensor, hs: torch.Tensor, batch: int) -> torch.Tensor:
    """The state each step started from, in the layout of `hs (H, B*N, d*h)`: direction 0 reads the step
    before, direction 1 (which runs backwards) the step after; the first step of each reads `h0 (G, B, h)`."""
    heads, rows, width = hs.shape
    G, _, h = h0.shape
    d, N = G // heads, rows // batch
    steps = hs.view(heads, batch, N, d, h)
    start = h0.view(d, heads, batch, h).permute(1, 2, 0, 3)
    before = torch.empty_like(steps)
    before[:, :, 1:, 0] = steps[:, :, :-1, 0]
    before[:, :, 0, 0] = start[:, :, 0]
    if d == 2:
        before[:, :, :-1, 1] = steps[:, :, 1:, 1]
        before[:, :, -1, 1] = start[:, :, 1]
    return before.view(heads, rows, width)


def _weight_grads(
    h0: torch.Tensor, hs: torch.Tensor, dz: torch.Tensor, widths: torch.Tensor, order: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d w `(G, h, K)` (the sum over sequences and steps of (state before the step)^T (gate
    gradient)) and the sum of the gate gradients `(G, K)`, in an order that no thread count changes."""
    before = _previous(h0, hs, batch)
    G, _, h = h0.shape
    K = dz.shape[-1] * hs.shape[0] // G
    dw, db = dz.new_empty(G, h, K), dz.new_empty(G, K)
    _run(kernels.weight_grads, _np(before), _np(dz), widths.numpy(), order.numpy(), hs.shape[0], dw.numpy(), db.numpy())
    return dw, db


class _LSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, bias, w, widths, order, h0, c0, keep, masked, heads):
        G, B, H = h0.shape
        rows, d = gx.shape[1], G // heads
        hs, h_n, c_n = gx.new_empty(heads, rows, d * H), torch.empty_like(h0), torch.empty_like(c0)
        acts, cs = torch.empty_like(gx), gx.new_empty(heads, rows, d * H)
        _run(kernels.lstm_forward, _np(gx), _np(bias), _np(w), widths.numpy(), order.numpy(), _np(h0), _np(c0),
             keep.numpy(), masked, heads, True, hs.numpy(), h_n.numpy(), c_n.numpy(), acts.numpy(), cs.numpy())
        ctx.save_for_backward(gx, bias, w, widths, order, h0, c0, keep, acts, cs, hs)
        ctx.masked, ctx.heads = masked, heads
        return hs, h_n, c_n

    @staticmethod
    def backward(ctx, dhs, dh_n, dc_n):
        gx, bias, w, widths, order, h0, c0, keep, acts, cs, hs = ctx.saved_tensors
        dz, dgx, dh0, dc0 = torch.empty_like(gx), torch.empty_like(gx), torch.empty_like(h0), torch.empty_like(c0)
        _run(kernels.lstm_backward, _np(gx), _np(bias), _np(w), widths.numpy(), order.numpy(), _np(c0), keep.numpy(),
             ctx.masked, ctx.heads, acts.numpy(), cs.numpy(), _np(dhs), _np(dh_n), _np(dc_n), dz.numpy(), dgx.numpy(),
             dh0.numpy(), dc0.numpy())
        dw = _weight_grads(h0, hs, dz, widths, order, h0.shape[1])[0] if ctx.needs_input_grad[2] else None
        return dgx, _row_sum(dgx), dw, None, None, dh0, dc0, None, None, None


class _GRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, bias, w, widths, order, bias_hh, h0, keep, masked, heads):
        G, B, H = h0.shape
        rows, d = gx.shape[1], G // heads
        hs, h_n, acts = gx.new_empty(heads, rows, d * H), torch.empty_like(h0), gx.new_empty(heads, rows, d * 4 * H)
        _run(kernels.gru_forward, _np(gx), _np(bias), _np(w), widths.numpy(), order.numpy(), _np(bias_hh), _np(h0),
             keep.numpy(), masked, heads, True, hs.numpy(), h_n.numpy(), acts.numpy())
        ctx.save_for_backward(gx, bias, w, widths, order, h0, keep, acts, hs)
        ctx.masked, ctx.heads = masked, heads
        return hs, h_n

    @staticmethod
    def backward(ctx, dhs, dh_n):
        gx, bias, w, widths, order, h0, keep, acts, hs = ctx.saved_tensors
        dgx, dgh, dh0 = torch.empty_like(gx), torch.empty_like(gx), torch.empty_like(h0)
        _run(kernels.gru_backward, _np(gx), _np(bias), _np(w), widths.numpy(), order.numpy(), _np(h0), keep.numpy(),
             ctx.masked, ctx.heads, acts.numpy(), hs.numpy(), _np(dhs), _np(dh_n), dgx.numpy(), dgh.numpy(), dh0.numpy())
        dw, db_hh = _weight_grads(h0, hs, dgh, widths, order, h0.shape[1])
        return dgx, _row_sum(dgx), dw, None, None, db_hh, dh0, None, None, None


def _row_sum(dgx: torch.Tensor) -> torch.Tensor:
    """The gate-input bias gradient `(H, d*K)`: `dgx` summed over rows, in an order no thread count changes."""
    sums = dgx.new_empty(dgx.shape[0], dgx.shape[2])
    _run(kernels.row_sums, _np(dgx), sums.numpy())
    return sums


def _tracked(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def lstm_scan(
    gx: torch.Tensor, bias: torch.Tensor, w: torch.Tensor, widths: list[int], state: State,
    padding_mask: torch.Tensor | None, heads: int,
) -> tuple[torch.Tensor, State]:
    """Outputs `(H, B*N, d*h)` and the final `(h, c)` `(G, B, h)` of a grouped LSTM whose groups have
    `widths` live units each (padded to the widest, h)."""
    h0, c0 = (s.contiguous() for s in state)
    keep, masked = _keep(padding_mask, h0.shape[1])
    live, order = _groups(tuple(widths))
    if _tracked(gx, bias, w, h0, c0):
        hs, h_n, c_n = _LSTM.apply(gx.contiguous(), bias.contiguous(), w.contiguous(), live, order, h0, c0, keep, masked,
                                   heads)
        return hs, (h_n, c_n)
    G, _, H = h0.shape
    hs, h_n, c_n = gx.new_empty(heads, gx.shape[1], G // heads * H), torch.empty_like(h0), torch.empty_like(c0)
    unused = gx.new_empty(1, 1, 1)
    _run(kernels.lstm_forward, _np(gx), _np(bias), _np(w), live.numpy(), order.numpy(), _np(h0), _np(c0), keep.numpy(),
         masked, heads, False, hs.numpy(), h_n.numpy(), c_n.numpy(), unused.numpy(), unused.numpy())
    return hs, (h_n, c_n)


def gru_scan(
    gx: torch.Tensor, bias: torch.Tensor, w: torch.Tensor, bias_hh: torch.Tensor, widths: list[int], state: State,
    padding_mask: torch.Tensor | None, heads: int,
) -> tuple[torch.Tensor, State]:
    """Outputs `(H, B*N, d*h)` and the final `(h,)` `(G, B, h)` of a grouped GRU (groups as in `lstm_scan`)."""
    h0 = state[0].contiguous()
    keep, masked = _keep(padding_mask, h0.shape[1])
    live, order = _groups(tuple(widths))
    if _tracked(gx, bias, w, bias_hh, h0):
        hs, h_n = _GRU.apply(gx.contiguous(), bias.contiguous(), w.contiguous(), live, order, bias_hh.contiguous(), h0,
                             keep, masked, heads)
        return hs, (h_n,)
    G, _, H = h0.shape
    hs, h_n = gx.new_empty(heads, gx.shape[1], G // heads * H), torch.empty_like(h0)
    _run(kernels.gru_forward, _np(gx), _np(bias), _np(w), live.numpy(), order.numpy(), _np(bias_hh), _np(h0),
         keep.numpy(), masked, heads, False, hs.numpy(), h_n.numpy(), gx.new_empty(1, 1, 1).numpy())
    return hs, (h_n,)
