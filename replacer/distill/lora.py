"""Low-rank adapters on the kept linear layers for end-to-end tuning (`tune.train: lora`), through PEFT.

The mixers train whole; the teacher's layers around them (projections, MLPs) recover the rest of
the gap through rank-r updates, as LoLCATs does after attention transfer. Adapters are merged into
their layers before the student is saved, so a tuned student is a plain model again and
`replacer.load` needs no PEFT to run it.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from replacer.errors import ReplacerError
from replacer.recipe import LoraSection

ADAPTER = "replacer"
"""The PEFT adapter name; its parameters are named `...<layer>.lora_A.replacer.weight` and so on."""


def lora_targets(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Names of the linear layers to adapt: those matching `patterns`, or by default every linear layer
    outside the mixers except the output head (its input embedding's transpose in most LMs)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".mixer." not in f".{n}."}
    if patterns is None:
        chosen = [n for n, m in linears.items() if m is not head]
    else:
        chosen = [n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        example = next(iter(linears), "(no linear layers)")
        raise ReplacerError(f"tune.lora.targets {patterns} match no linear layer outside the mixers (names look like {example})")
    return chosen


def add_lora(model: nn.Module, spec: LoraSection) -> list[str]:
    """Put adapters on the chosen layers of `model` in place; returns their names. The adapters start as a
    zero update (PEFT's B = 0), so the student is unchanged until it trains."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(model, spec.targets)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    return targets


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its layer and put the plain layer back; returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    adapted = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, layer in adapted:
        layer.merge()
        model.set_submodule(name, layer.get_base_layer())
    return len(adapted)


def is_lora_parameter(name: str) -> bool:
    return f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name
