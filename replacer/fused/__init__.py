"""Which path grouped recurrences take, in one place: the fused kernels, or the reference Python loop.

The fused path runs every group, sequence and time step of a recurrence in one compiled loop: on the
CPU numba's (`replacer.fused.autograd`; nothing is compiled at install and no compiler is needed), on
CUDA FlashRNN's (`replacer.fused.flashrnn_scan`, with `replacer[cuda]`). The reference path is the
loop of small tensor operations in `replacer.recurrent`, kept as the definition the fused paths are
tested against. The choice is global state, so it lives here alone, as timm keeps its layer switches:

- `REPLACER_RECURRENCE=auto|fused|reference` in the environment sets the default (auto: fused where
  it can run, which is float32 tensors on the CPU with numba installed, and float32, float16 or
  bfloat16 tensors on CUDA with flashrnn installed);
- `set_recurrence(name)` changes it, and `recurrence(name)` changes it inside a `with` block.

`fused` insists: where the kernels cannot run it raises instead of falling back, so a test (or a
benchmark) can never measure the loop while believing it measures the kernels. A kernel that finds
out only when called (FlashRNN has no step mask, or fails to build for a shape) raises
`KernelUnavailable`, and the recurrence then takes the reference loop under the same rule.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from types import ModuleType
from typing import Iterator, Literal

import torch

GATE_BOUND = 15.0
"""Bound on the input part of gate pre-activations, which both paths apply; see `MultiHeadRecurrence.scan`."""

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""What the CUDA kernels compute in (FlashRNN's kernel dtypes)."""

Recurrence = Literal["auto", "fused", "reference"]
CHOICES: tuple[str, ...] = ("auto", "fused", "reference")
logger = logging.getLogger("replacer")


class KernelUnavailable(RuntimeError):
    """A fused kernel cannot run this call after all (raised by the kernel; the caller takes the reference loop)."""


def _from_environment() -> Recurrence:
    value = os.environ.get("REPLACER_RECURRENCE", "auto").strip().lower()
    if value not in CHOICES:
        raise ValueError(f"REPLACER_RECURRENCE={value!r}: use one of {', '.join(CHOICES)}")
    return value  # type: ignore[return-value]


_choice: Recurrence = _from_environment()


def get_recurrence() -> Recurrence:
    return _choice


def set_recurrence(name: Recurrence) -> None:
    """Choose the path of every grouped recurrence from now on (auto, fused or reference)."""
    global _choice
    if name not in CHOICES:
        raise ValueError(f"recurrence {name!r}: use one of {', '.join(CHOICES)}")
    _choice = name


@contextlib.contextmanager
def recurrence(name: Recurrence) -> Iterator[None]:
    """`with recurrence("reference"): ...` runs the block on that path and restores the previous choice."""
    previous = _choice
    set_recurrence(name)
    try:
        yield
    finally:
        set_recurrence(previous)


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why the fused CPU kernels cannot run here (None when they can); logged once when it matters."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return "numba is not installed (pip install numba)"
    return None


def fused_reason(tensor: torch.Tensor) -> str | None:
    """Why a recurrence on `tensor` would not take the fused path (None when it would)."""
    return path_reason(tensor.device.type, tensor.dtype)


def path_reason(device: str, dtype: torch.dtype) -> str | None:
    """Why a recurrence on a `device` tensor of `dtype` would not take the fused path (None when it would)."""
    name = str(dtype).removeprefix("torch.")
    if device == "cpu":
        missing = unavailable_reason()
        if missing is not None:
            return missing
        if dtype != torch.float32:
            return f"the fused CPU kernels compute in float32; this recurrence is {name}"
        return None
    if device == "cuda":
        from replacer.fused import flashrnn_scan

        missing = flashrnn_scan.unavailable_reason()
        if missing is not None:
            return missing
        if dtype not in GPU_DTYPES:
            return f"FlashRNN computes in float32, float16 or bfloat16; this recurrence is {name}"
        return None
    return f"the fused kernels run on the CPU (numba) or on CUDA (FlashRNN); this recurrence is on {device}"


def kernels(tensor: torch.Tensor) -> ModuleType:
    """The module whose `lstm_scan` / `gru_scan` run recurrences on `tensor`'s device (same layouts on both)."""
    if tensor.device.type == "cuda":
        from replacer.fused import flashrnn_scan

        return flashrnn_scan
    from replacer.fused import autograd

    return autograd


def fall_back(reason: str) -> None:
    """A kernel turned a call down (`KernelUnavailable`): raise under `fused`, else note it once."""
    if _choice == "fused":
        raise RuntimeError(f"REPLACER_RECURRENCE is 'fused' but {reason}")
    if reason not in _noted:
        _noted.add(reason)
        logger.info("recurrences: reference loop (%s)", reason)


_noted: set[str] = set()


def use_fused(tensor: torch.Tensor) -> bool:
    """Whether a recurrence of a fused-capable cell on `tensor` runs the kernels, by the current choice."""
    if _choice == "reference":
        return False
    reason = fused_reason(tensor)
    if reason is None:
        return True
    fall_back(reason)
    return False


def describe(device: str = "cpu") -> str:
    """The path a fused-capable float32 recurrence on `device` takes now, in words (for `replacer plugins`)."""
    if _choice == "reference":
        return "reference loop (REPLACER_RECURRENCE=reference)"
    reason = path_reason(device, torch.float32)
    if reason is not None:
        return f"reference loop ({reason})"
    return "FlashRNN CUDA kernels" if device == "cuda" else "fused numba kernels"
