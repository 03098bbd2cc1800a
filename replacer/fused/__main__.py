"""`python -m replacer.fused`: compile the fused kernels now and cache them (scripts/install.sh runs it).

Without this the first recurrence of a new install pays the compilation (about 40 s on 2 cores), and
processes started while nothing is cached each compile their own copy; with it, every process loads
the same cached machine code.
"""

from __future__ import annotations

import time

import torch

from replacer.fused import unavailable_reason


def compile_kernels() -> float:
    """Run every kernel once on tiny inputs (forward with and without autograd, backward); returns seconds."""
    from replacer.fused.autograd import gru_scan, lstm_scan

    start = time.perf_counter()
    heads, groups, batch, steps, hidden = 1, 2, 2, 3, 4
    mask = torch.tensor([[True, True, False], [True, True, True]])
    for gates, scan in ((4, lstm_scan), (3, gru_scan)):
        gx = torch.randn(heads, batch * steps, groups * gates * hidden, requires_grad=True)
        bias = torch.zeros(heads, groups * gates * hidden, requires_grad=True)
        w = torch.randn(groups, hidden, gates * hidden, requires_grad=True)
        state = tuple(torch.zeros(groups, batch, hidden) for _ in range(2 if scan is lstm_scan else 1))
        extra = () if scan is lstm_scan else (torch.zeros(groups, gates * hidden, requires_grad=True),)
        for padding in (None, mask):
            hs, _ = scan(gx, bias, w, *extra, [hidden] * groups, state, padding, heads)
            hs.sum().backward()
            with torch.no_grad():
                scan(gx, bias, w, *extra, [hidden] * groups, state, padding, heads)
    return time.perf_counter() - start


def main() -> None:
    reason = unavailable_reason()
    if reason is not None:
        print(f"fused kernels not compiled: {reason}; recurrences will run the reference loop")
        return
    print(f"fused kernels compiled and cached in {compile_kernels():.1f} s")


if __name__ == "__main__":
    main()
