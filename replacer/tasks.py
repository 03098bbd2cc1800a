"""What a model computes, and therefore how student and teacher are fed, compared and scored.

Three tasks cover the families replacer converts: sentence embeddings from encoders, image
classification, and causal language modelling. Each turns examples into batches, runs a model
on a batch, and defines the distillation loss, the task loss (where labels exist) and the
fidelity metrics.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from replacer.errors import ReplacerError

if TYPE_CHECKING:
    from replacer.graph.scan import ScanResult

Batch = dict[str, torch.Tensor]


class Task(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def collate(self, items: Sequence[Any]) -> Batch:
        """Examples -> one batch of tensors."""

    @abc.abstractmethod
    def run(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """The model's outputs that losses and metrics read."""

    @abc.abstractmethod
    def distill_loss(self, student: dict, teacher: dict, batch: Batch, temperature: float) -> torch.Tensor:
        """How far the student's outputs are from the teacher's."""

    def task_loss(self, student: dict, batch: Batch) -> torch.Tensor | None:
        """The supervised loss where the batch has labels; None otherwise."""
        return None

    def cache_footprint(self, model: nn.Module, batch: Batch) -> dict[str, int] | None:
        """Bytes an incremental-decoding cache holds after reading `batch`, by kind; None where there is no cache."""
        return None

    @abc.abstractmethod
    def compare(self, teacher: list[dict], student: list[dict], batches: list[Batch]) -> dict[str, float]:
        """Fidelity (and task metrics where labels exist) over evaluation batches."""

    headline: str = ""
    """The metric a report leads with."""

    def quality(self, fidelity: dict[str, float]) -> tuple[str, float, float]:
        """(name, teacher's value, student's value) of the figure plotted against model size."""
        return self.headline, float("nan"), fidelity[self.headline]

    higher_is_better: bool = True
    """Whether a larger `quality` value is better (perplexity: no)."""


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


class EmbeddingTask(Task):
    """Sentence embeddings of a text encoder: mean-pooled, L2-normalised last hidden states."""

    name = "embedding"
    headline = "embedding_cosine_mean"

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def collate(self, items: Sequence[str]) -> Batch:
        enc = self.tokenizer(list(items), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def run(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return {"hidden": hidden, "embedding": F.normalize(pooled, dim=-1)}

    def distill_loss(self, student: dict, teacher: dict, batch: Batch, temperature: float) -> torch.Tensor:
        mask = batch["attention_mask"].bool()
        scale = teacher["hidden"][mask].pow(2).mean()
        hidden = _masked_mean((student["hidden"] - teacher["hidden"]).pow(2).mean(-1), mask) / scale
        cosine = 1 - (student["embedding"] * teacher["embedding"]).sum(-1).mean()
        return hidden + cosine

    def quality(self, fidelity: dict[str, float]) -> tuple[str, float, float]:
        return "embedding cosine to the teacher", 1.0, fidelity["embedding_cosine_mean"]

    def compare(self, teacher: list[dict], student: list[dict], batches: list[Batch]) -> dict[str, float]:
        t = torch.cat([o["embedding"] for o in teacher]).float()
        s = torch.cat([o["embedding"] for o in student]).float()
        cos = (t * s).sum(-1)
        k = min(10, len(t) - 1)
        agreement = float("nan")
        if k > 0:
            eye = torch.eye(len(t), dtype=torch.bool)
            nt = (t @ t.T).masked_fill(eye, -2).topk(k).indices
            ns = (s @ s.T).masked_fill(eye, -2).topk(k).indices
            agreement = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(nt, ns)) / (k * len(t))
        return {
            "embedding_cosine_mean": cos.mean().item(),
            "embedding_cosine_p5": cos.quantile(0.05).item(),
            f"top{k}_neighbour_agreement": agreement,
            "examples": float(len(t)),
        }


class ClassificationTask(Task):
    """Image classifiers (timm or transformers): logits, with labels for accuracy and the task loss."""

    name = "classification"
    headline = "student_top1"

    def collate(self, items: Sequence[tuple[torch.Tensor, int]]) -> Batch:
        return {"images": torch.stack([x for x, _ in items]), "labels": torch.tensor([int(y) for _, y in items])}

    def run(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        out = model(batch["images"])
        return {"logits": out if isinstance(out, torch.Tensor) else out.logits}

    def distill_loss(self, student: dict, teacher: dict, batch: Batch, temperature: float) -> torch.Tensor:
        return _kl(student["logits"], teacher["logits"], temperature).mean()

    def task_loss(self, student: dict, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(student["logits"], batch["labels"])

    def quality(self, fidelity: dict[str, float]) -> tuple[str, float, float]:
        return "top-1 accuracy (%)", fidelity["teacher_top1"], fidelity["student_top1"]

    def compare(self, teacher: list[dict], student: list[dict], batches: list[Batch]) -> dict[str, float]:
        t = torch.cat([o["logits"] for o in teacher]).float()
        s = torch.cat([o["logits"] for o in student]).float()
        labels = torch.cat([b["labels"] for b in batches])
        return {
            "teacher_top1": (t.argmax(-1) == labels).float().mean().item() * 100,
            "student_top1": (s.argmax(-1) == labels).float().mean().item() * 100,
            "agreement_with_teacher": (t.argmax(-1) == s.argmax(-1)).float().mean().item() * 100,
            "kl_to_teacher": _kl(s, t, 1.0).mean().item(),
            "examples": float(len(t)),
        }


class CausalLMTask(Task):
    """Causal language models: next-token logits, distilled by KL, scored by perplexity and agreement."""

    name = "causal-lm"
    headline = "kl_to_teacher"

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def collate(self, items: Sequence[str]) -> Batch:
        enc = self.tokenizer(list(items), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def run(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        return {"logits": model(**batch, use_cache=False).logits}

    @torch.no_grad()
    def cache_footprint(self, model: nn.Module, batch: Batch) -> dict[str, int] | None:
        """The model family's plugin reads its own cache (`replacer_cache_footprint`); None if none does."""
        from replacer.plugins import get_registry

        return get_registry().cache_footprint(model, batch)

    def distill_loss(self, student: dict, teacher: dict, batch: Batch, temperature: float) -> torch.Tensor:
        return _masked_mean(_kl(student["logits"], teacher["logits"], temperature), batch["attention_mask"].bool())

    def task_loss(self, student: dict, batch: Batch) -> torch.Tensor:
        return self._nll(student["logits"], batch).mean()

    @staticmethod
    def _nll(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Per-token next-token loss over real tokens (flattened)."""
        mask = batch["attention_mask"][:, 1:].bool()
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch["input_ids"][:, 1:], reduction="none")
        return losses[mask]

    higher_is_better = False

    def quality(self, fidelity: dict[str, float]) -> tuple[str, float, float]:
        return "perplexity", fidelity["teacher_perplexity"], fidelity["student_perplexity"]

    def compare(self, teacher: list[dict], student: list[dict], batches: list[Batch]) -> dict[str, float]:
        t_nll = torch.cat([self._nll(o["logits"], b) for o, b in zip(teacher, batches)])
        s_nll = torch.cat([self._nll(o["logits"], b) for o, b in zip(student, batches)])
        kl = torch.cat([_kl(s["logits"], t["logits"], 1.0)[b["attention_mask"].bool()] for s, t, b in zip(student, teacher, batches)])
        agree = torch.cat(
            [(s["logits"].argmax(-1) == t["logits"].argmax(-1))[b["attention_mask"].bool()] for s, t, b in zip(student, teacher, batches)]
        )
        return {
            "teacher_perplexity": t_nll.mean().exp().item(),
            "student_perplexity": s_nll.mean().exp().item(),
            "kl_to_teacher": kl.mean().item(),
            "next_token_agreement": agree.float().mean().item() * 100,
            "tokens": float(len(kl)),
        }


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per position, scaled by T^2 as in Hinton et al."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1) * temperature**2


def task_kind(kind: str, found: ScanResult, is_text: bool) -> str:
    """The task a recipe asks for, or the one its model (as `found` by its scan) and data imply (`auto`):
    image data means classification, text with a causal site a causal LM, other text embeddings."""
    if kind != "auto":
        return kind
    if not is_text:
        return "classification"
    return "causal-lm" if any(s.causal for s in (*found.sites, *found.replaced)) else "embedding"


def resolve_task(kind: str, tokenizer: Any, is_text: bool, max_length: int) -> Task:
    """The task of a kind `task_kind` chose, checked against the data it will see."""
    if kind == "classification":
        if is_text:
            raise ReplacerError("task 'classification' needs image data (image-folder, idx or digits)")
        return ClassificationTask()
    if not is_text:
        raise ReplacerError(f"task '{kind}' needs text data; set data.train/eval to text sources")
    if tokenizer is None:
        raise ReplacerError("text data needs a tokenizer: set model.tokenizer to an HF model dir or alias")
    return CausalLMTask(tokenizer, max_length) if kind == "causal-lm" else EmbeddingTask(tokenizer, max_length)
