"""Selective state-space scans (Mamba-2 / SSD): the recurrence, a chunked form of it, and the CUDA kernels.

Every scan computes, per head, with a scalar decay `A` and an `N x P` state:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * outer(B_t, x_t)        y_t = C_t . h_t + D * x_t

Shapes (batch first): x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, h, n), D (h,), states
(b, h, n, p). A step with dt = 0 leaves the state untouched, which is how padding is skipped.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("replacer.ssm")


def ssm_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the recurrence: x (b, h, p), dt (b, h), B and C (b, h, n); returns y (b, h, p), new state."""
    decay = torch.exp(dt * A)[..., None, None]
    state = decay * state + (dt[..., None] * B)[..., :, None] * x[..., None, :]
    y = torch.einsum("bhn,bhnp->bhp", C, state)
    if D is not None:
        y = y + D[:, None] * x
    return y, state


def reference_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence token by token, in the inputs' dtype: slow and obviously right, to check the fast paths."""
    b, l, h, p = x.shape
    state = x.new_zeros(b, h, B.shape[-1], p) if initial_state is None else initial_state.to(x.dtype)
    ys = []
    for t in range(l):
        y, state = ssm_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    return torch.stack(ys, 1), state


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """`out[..., t, s] = a[s+1] + ... + a[t]` for s <= t (0 above the diagonal), summed directly.

    Differences of one cumulative sum would lose the small segments next to large totals to
    cancellation; summing each segment keeps every decay accurate (all sums are <= 0 for a <= 0).
    """
    T = a.shape[-1]
    below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)  # [k, s]: k > s
    return a[..., :, None].masked_fill(~below, 0).cumsum(-2)


def chunked_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD form: quadratic (attention-like) within chunks, the recurrence only between chunks.

    Computed in at least float32 (decays of half-precision cumulative sums are too coarse); the
    outputs come back in x's dtype, the final state in the compute dtype.
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    T = min(chunk_size, l)
    c = -(-l // T)
    if c * T != l:  # pad the last chunk with dt = 0 steps: no input, no decay, state unchanged
        pad = c * T - l
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    # Head-major chunks, (b, h, c, T, .), so every product below is a plain batched matmul.
    x = x.view(b, c, T, h, p).permute(0, 3, 1, 2, 4)
    B = B.view(b, c, T, h, n).permute(0, 3, 1, 2, 4)
    C = C.view(b, c, T, h, n).permute(0, 3, 1, 2, 4)
    dt = dt.view(b, c, T, h).permute(0, 3, 1, 2)
    a = dt * A[:, None, None]  # (b, h, c, T), <= 0
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    decay = torch.where(causal, torch.exp(segment_sums(a)), 0.0)  # [t, s]: s's input as seen at t
    from_start = torch.exp(a.cumsum(-1))  # the state entering the chunk as seen at t
    xdt = x * dt[..., None]

    y = ((C @ B.transpose(-1, -2)) * decay) @ xdt
    # What each chunk adds to the state by its end, then the states entering each chunk.
    added = (B * decay[..., -1, :, None]).transpose(-1, -2) @ xdt  # (b, h, c, n, p)
    chunk_decay = from_start[..., -1, None, None]  # (b, h, c, 1, 1)
    state = x.new_zeros(b, h, n, p) if initial_state is None else initial_state.to(dtype)
    entering = []
    for i in range(c):
        entering.append(state)
        state = chunk_decay[:, :, i] * state + added[:, :, i]
    y = y + (C @ torch.stack(entering, 2)) * from_start[..., None]
    if D is not None:
        y = y + D[:, None, None, None] * x
    y = y.permute(0, 2, 3, 1, 4).reshape(b, c * T, h, p)
    return y[:, :l], state


@functools.cache
def _mamba_kernel():
    """mamba-ssm's fused SSD kernel, or None: it is optional and may also fail to import on a broken install."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except (ImportError, OSError, RuntimeError):
        return None
    return mamba_chunk_scan_combined


@functools.cache
def _log_path(message: str) -> None:
    """Say which scan runs, once per path (cached), not once per layer and call."""
    log.info(message)


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fastest exact path: one direct step for a single token, mamba-ssm's kernels on CUDA, else chunked."""
    if x.shape[1] == 1:  # a decoding step: the recurrence itself is cheapest
        dtype = torch.promote_types(x.dtype, torch.float32)
        y, state = reference_scan(
            *(t.to(dtype) for t in (x, dt, A, B, C)), None if D is None else D.to(dtype), initial_state
        )
        return y.to(x.dtype), state
    kernel = _mamba_kernel() if x.is_cuda else None
    if kernel is not None:
        _log_path("ssm: mamba-ssm Triton kernels on cuda")
        init = None if initial_state is None else initial_state.transpose(-1, -2).float().contiguous()
        y, final = kernel(
            x.contiguous(), dt.float().contiguous(), A.float(), B.contiguous(), C.contiguous(),
            chunk_size, D=None if D is None else D.float(), initial_states=init, return_final_states=True,
        )
        return y.to(x.dtype), final.transpose(-1, -2).float()  # the kernels keep states as (p, n)
    reason = "mamba-ssm not installed" if x.is_cuda else f"on {x.device.type}"
    _log_path(f"ssm: chunked PyTorch scan ({reason})")
    return chunked_scan(x, dt, A, B, C, D, chunk_size, initial_state)
