"""What a test needs to look inside a model's call: how many attention computations ran (and where), and
the main output tensor of whatever a model or a site returns."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class AttentionCounter(TorchFunctionMode):
    """While active, counts attention computations: every `scaled_dot_product_attention` call and every
    softmax over a square score map (eager attention). `inside_replaced` counts those made while a
    replaced site runs, which must stay zero: a replaced site computes no attention."""

    _SOFTMAX = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.total = self.inside_replaced = self._depth = 0
        self._model = model
        self._handles: list = []

    def __enter__(self) -> "AttentionCounter":
        from replacer.graph.adapter import ReplacedAttention

        for module in self._model.modules() if self._model is not None else ():
            if isinstance(module, ReplacedAttention):
                self._handles.append(module.register_forward_pre_hook(lambda *_: self._enter()))
                self._handles.append(module.register_forward_hook(lambda *_: self._leave()))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        super().__exit__(*exc)

    def _enter(self) -> None:
        self._depth += 1

    def _leave(self) -> None:
        self._depth -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        scores = args[0] if args else None
        square = func in self._SOFTMAX and isinstance(scores, torch.Tensor) and scores.dim() >= 2 and scores.shape[-1] == scores.shape[-2] > 1
        if func is torch.nn.functional.scaled_dot_product_attention or square:
            self.total += 1
            self.inside_replaced += self._depth > 0
        return func(*args, **kwargs)


def main_tensor(out: object) -> torch.Tensor:
    """The main output of a model or a site call: a tensor, the first of a tuple, or logits / last hidden state."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return main_tensor(out[0])
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise TypeError(f"cannot find the main tensor of a {type(out).__name__}")
