"""Which path grouped recurrences take, in one place: the fused kernels, or the reference Python loop.

The fused path runs every group, sequence and time step of a recurrence in one compiled loop (numba,
so nothing is compiled at install and no compiler is needed); the reference path is the loop of
small tensor operations in `replacer.recurrent`, kept as the definition the fused path is tested
against. The choice is global state, so it lives here alone, as timm keeps its layer switches:

- `REPLACER_RECURRENCE=auto|fused|reference` in the environment sets the default (auto: fused where
  it can run, which is float32 tensors on the CPU with numba installed);
- `set_recurrence(name)` changes it, and `recurrence(name)` changes it inside a `with` block.

`fused` insists: where the kernels cannot run it raises instead of falling back, so a test (or a
benchmark) can never measure the loop while believing it measures the kernels.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Iterator, Literal

import torch

GATE_BOUND = 15.0
"""Bound on the input part of gate pre-activations, which both paths apply; see `MultiHeadRecurrence.scan`."""

Recurrence = Literal["auto", "fused", "reference"]
CHOICES: tuple[str, ...] = ("auto", "fused", "reference")
logger = logging.getLogger("replacer")


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
    missing = unavailable_reason()
    if missing is not None:
        return missing
    if tensor.device.type != "cpu":
        return f"the fused kernels run on the CPU; this recurrence is on {tensor.device.type}"
    if tensor.dtype != torch.float32:
        return f"the fused kernels compute in float32; this recurrence is {str(tensor.dtype).removeprefix('torch.')}"
    return None


_noted: set[str] = set()


def use_fused(tensor: torch.Tensor) -> bool:
    """Whether a recurrence of a fused-capable cell on `tensor` runs the kernels, by the current choice."""
    if _choice == "reference":
        return False
    reason = fused_reason(tensor)
    if reason is None:
        return True
    if _choice == "fused":
        raise RuntimeError(f"REPLACER_RECURRENCE is 'fused' but {reason}")
    if reason not in _noted:
        _noted.add(reason)
        logger.info("recurrences: reference loop (%s)", reason)
    return False


def describe(tensor: torch.Tensor | None = None) -> str:
    """The path a fused-capable recurrence takes now, in words (for `replacer plugins` and `scan`)."""
    probe = tensor if tensor is not None else torch.zeros(1)
    if _choice == "reference":
        return "reference loop (REPLACER_RECURRENCE=reference)"
    reason = fused_reason(probe)
    return "fused numba kernels" if reason is None else f"reference loop ({reason})"
