"""replacer.train.optimizers: the fused Adam/AdamW step is taken on the CPU and computes torch's reference update."""

from __future__ import annotations

import torch

from replacer.train.optimizers import adam, adamw


def _params(seed: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape)) for shape in ((5, 7), (7,), (3, 2, 4))]


def _train(optimizer_of, steps: int = 5) -> list[torch.Tensor]:
    params = _params(0)
    optimizer = optimizer_of(params)
    for step in range(steps):
        torch.manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    return [p.detach() for p in params]


def test_cpu_parameters_take_the_fused_step():
    assert adam(_params(0), lr=1e-3).defaults["fused"] is True
    groups = [{"params": _params(0)}, {"params": _params(1), "lr": 1e-4}]
    assert adamw(groups, lr=1e-3, weight_decay=0.01).defaults["fused"] is True


def test_fused_updates_equal_the_reference_loop():
    for ours, reference in (
        (lambda p: adam(p, lr=1e-2), lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False)),
        (lambda p: adamw(p, lr=1e-2, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False)),
    ):
        for a, b in zip(_train(ours), _train(reference)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_state_of_the_reference_loop_resumes_in_the_fused_step():
    """A state saved by the for-each-tensor step (older checkpoints) continues the same run fused."""
    params, copies = _params(0), _params(0)
    reference = torch.optim.Adam(params, lr=1e-2, foreach=False)
    for p in params:
        p.grad = torch.ones_like(p)
    reference.step()
    with torch.no_grad():
        for c, p in zip(copies, params):
            c.copy_(p)
    resumed = adam(copies, lr=1e-2)
    for c, p in zip(copies, params):
        resumed.state[c] = {k: v.clone() for k, v in reference.state[p].items()}  # as training_state restores it
        c.grad = -2 * torch.ones_like(c)
        p.grad = -2 * torch.ones_like(p)
    reference.step()
    resumed.step()
    for c, p in zip(copies, params):
        torch.testing.assert_close(c, p, atol=1e-6, rtol=1e-5)


def test_parameters_the_fused_step_cannot_take_fall_back():
    assert not adam([torch.nn.Parameter(torch.zeros(2, device="meta"))], lr=1e-3).defaults["fused"]
