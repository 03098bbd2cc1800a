"""How closely a student's representations follow its teacher's, per site and per layer.

The comparisons follow the FAR paper (arXiv 2505.21535): (a) per-layer similarity of token
representations (linear CKA, Kornblith et al. 2019) and (b) token-to-token cosine-similarity
matrices of the teacher's attention output against the mixer's. They work on any replaced model
through the same hooks distillation uses: tokens are the samples, padded tokens are left out, and
at most `max_tokens` tokens are kept (the same seeded choice for teacher and student) to bound memory.
The figures of these measurements are drawn by `replacer.report.markdown.figures`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from replacer.graph.adapter import site_wrappers
from replacer.distill.capture import capture_sites
from replacer.tasks import Batch, Task

MAX_TOKENS = 4096
SiteStats = dict[str, float]


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA between two (samples x features) matrices; feature counts may differ.

    Computed in float64 after centring each feature. Uses the n x n Gram matrices when they are the
    smaller product (few samples, wide features), the feature cross-products otherwise; both give
    ||Y'X||^2 / (||X'X|| ||Y'Y||). NaN when either side is constant over the samples.
    """
    x = torch.as_tensor(x).detach().to("cpu", torch.float64).flatten(1)
    y = torch.as_tensor(y).detach().to("cpu", torch.float64).flatten(1)
    if len(x) != len(y):
        raise ValueError(f"CKA needs the same samples on both sides; got {len(x)} and {len(y)}")
    if len(x) < 2:
        raise ValueError("CKA needs at least 2 samples")
    x, y = x - x.mean(0), y - y.mean(0)
    if len(x) < x.shape[1] + y.shape[1]:
        kx, ky = x @ x.T, y @ y.T
        cross = (kx * ky).sum()
    else:
        kx, ky = x.T @ x, y.T @ y
        cross = (y.T @ x).square().sum()
    scale = torch.linalg.matrix_norm(kx) * torch.linalg.matrix_norm(ky)
    return float(cross / scale) if scale > 0 else float("nan")


def _tokens(h: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """(B, ..., D) -> (real tokens, D): a (B, N) mask applies where the token axes flatten to N."""
    flat = h.reshape(h.shape[0], -1, h.shape[-1])
    if keep is not None and keep.shape == flat.shape[:2]:
        return flat[keep.to(flat.device)]
    return flat.reshape(-1, h.shape[-1])


class _Sampler:
    """A seeded, per-batch bounded choice of token rows: at most `max_tokens` rows per site or block
    and model, so memory stays under sites x 2 x max_tokens x width x 4 bytes."""

    def __init__(self, max_tokens: int, batches: int) -> None:
        self.budget = max(1, math.ceil(max_tokens / max(1, batches)))
        self.max_tokens = max_tokens
        self.generator = torch.Generator().manual_seed(0)

    def pick(self, n: int) -> torch.Tensor:
        if n <= self.budget:
            return torch.arange(n)
        return torch.randperm(n, generator=self.generator)[: self.budget].sort().values

    def stack(self, rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(rows)[: self.max_tokens]


def _kept(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Sampled rows on the CPU in float32 (`linear_cka` upcasts): half the memory of float64, no fp16 overflow."""
    return rows[index.to(rows.device)].to("cpu", torch.float32)


@torch.no_grad()
def site_similarity(
    teacher: nn.Module, student: nn.Module, task: Task, batches: Sequence[Batch], max_tokens: int = MAX_TOKENS
) -> dict[str, SiteStats]:
    """Per replaced site: CKA, mean per-token cosine and relative squared error of the student's mixer
    against the teacher's site output, both on the teacher's own site inputs (so errors do not compound).

    Cosine and relative error use every real token; CKA uses the bounded sample. Head-level hybrids,
    which cannot run from their input alone, are left out (the per-layer CKA covers them).
    """
    wrappers = {name: w for name, w in site_wrappers(student).items() if w.mixes_alone}
    teacher.eval()
    student.eval()
    sampler = _Sampler(max_tokens, len(batches))
    sums = {name: {"err": 0.0, "power": 0.0, "cos": 0.0, "count": 0} for name in wrappers}
    picked: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {name: ([], []) for name in wrappers}
    for batch in batches:
        with capture_sites(teacher, wrappers) as records:
            task.run(teacher, batch)
        for name, pairs in records.items():
            for x, y, keep in pairs:
                t = _tokens(y, keep).float()
                s = _tokens(wrappers[name].mix(x, keep), keep).float()
                acc = sums[name]
                acc["err"] += (s - t).square().sum().item()
                acc["power"] += t.square().sum().item()
                acc["cos"] += F.cosine_similarity(s, t, dim=-1).sum().item()
                acc["count"] += len(t)
                index = sampler.pick(len(t))
                picked[name][0].append(_kept(t, index))
                picked[name][1].append(_kept(s, index))
    return {
        name: {
            "cka": linear_cka(sampler.stack(picked[name][0]), sampler.stack(picked[name][1])),
            "cosine": acc["cos"] / max(acc["count"], 1),
            "relative_error": acc["err"] / max(acc["power"], 1e-12),
        }
        for name, acc in sums.items()
    }


def block_names(model: nn.Module) -> list[str]:
    """The transformer blocks holding the replaced sites of `model`, in model order.

    A site's block is its deepest ancestor that is a numbered entry of an `nn.ModuleList` or
    `nn.Sequential` (timm `blocks.3`, HF `encoder.layer.3`, `model.layers.3`, swin
    `layers.1.blocks.0`); the site's parent when it has no such ancestor. The "smallest ancestor
    returning a (B, N, D) tensor" is not used: in BERT that is `attention`, not the layer.
    """
    modules = dict(model.named_modules())
    blocks: list[str] = []
    for site in site_wrappers(model):
        parts = site.split(".")
        block = ".".join(parts[:-1])
        for end in range(len(parts) - 1, 0, -1):
            parent = modules[".".join(parts[: end - 1])]
            if parts[end - 1].isdigit() and isinstance(parent, (nn.ModuleList, nn.Sequential)):
                block = ".".join(parts[:end])
                break
        if block not in blocks:
            blocks.append(block)
    return blocks


@contextlib.contextmanager
def _block_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """While active, each call of a named block appends its main output tensor."""
    records: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook(_mod, _args, output, name: str) -> None:
        main = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(main, torch.Tensor):
            raise ValueError(f"block {name!r} returns {type(output).__name__}, not a tensor; pass blocks= explicitly")
        records[name].append(main.detach())

    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name)) for name in names
    ]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def layer_cka(
    teacher: nn.Module, student: nn.Module, task: Task, batches: Sequence[Batch],
    blocks: Sequence[str] | None = None, max_tokens: int = MAX_TOKENS,
) -> list[float]:
    """CKA between teacher and student hidden states after each block, each model on its own activations.

    Unlike `site_similarity`, student errors compound through the layers. Blocks default to
    `block_names(student)`. Real tokens are those the padding mask of the block's replaced site marks
    (captured on the teacher); a block without a replaced site (explicit `blocks`) keeps every token.
    """
    names = list(blocks) if blocks is not None else block_names(student)
    wrappers = site_wrappers(student)
    site_in = {b: next((s for s in wrappers if s.startswith(b + ".")), None) for b in names}
    probes = {s: wrappers[s] for s in site_in.values() if s is not None}
    teacher.eval()
    student.eval()
    sampler = _Sampler(max_tokens, len(batches))
    picked: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {b: ([], []) for b in names}
    for batch in batches:
        with capture_sites(teacher, probes) as records, _block_outputs(teacher, names) as t_out:
            task.run(teacher, batch)
        with _block_outputs(student, names) as s_out:
            task.run(student, batch)
        for b in names:
            keeps = [keep for _, _, keep in records[site_in[b]]] if site_in[b] else []
            for call, (t, s) in enumerate(zip(t_out[b], s_out[b])):
                keep = keeps[call] if call < len(keeps) else None
                t, s = _tokens(t, keep), _tokens(s, keep)
                index = sampler.pick(len(t))
                picked[b][0].append(_kept(t, index))
                picked[b][1].append(_kept(s, index))
    return [linear_cka(sampler.stack(picked[b][0]), sampler.stack(picked[b][1])) for b in names]


def _cosine_matrix(tokens: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(tokens.to("cpu", torch.float64), dim=-1)
    return unit @ unit.T


@torch.no_grad()
def token_similarity(
    teacher: nn.Module, student: nn.Module, task: Task, batch: Batch, site: str, index: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """N x N token cosine similarities (real tokens only) of one example at one site: the teacher's
    attention output and the student's mixer output, both on the teacher's site input (first call)."""
    wrapper = site_wrappers(student)[site]
    teacher.eval()
    student.eval()
    with capture_sites(teacher, {site: wrapper}) as records:
        task.run(teacher, batch)
    x, y, keep = records[site][0]
    mine = None if keep is None else keep[index : index + 1]
    t = _tokens(y[index : index + 1], mine)
    s = _tokens(wrapper.mix(x, keep)[index : index + 1], mine)
    return _cosine_matrix(t), _cosine_matrix(s)
