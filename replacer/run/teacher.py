"""The teacher stage: train the teacher from scratch where no pretrained weights exist (offline vision).

The trained teacher is cached beside the run directories, keyed by everything that shapes it
(model, teacher settings, training data, seed), so restarting a run or changing how the student is
distilled reuses it. From then on it is an ordinary model: the other stages cannot tell it apart
from a pretrained one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from replacer.train.batches import BatchPlan
from replacer.train.loop import train_loop
from replacer.errors import CheckpointError, ReplacerError, summary
from replacer.files import write_atomically
from replacer.recipe import Recipe
from replacer.tasks import Task
from replacer.train.optimizers import adamw
from replacer.train.state import clear_state
from replacer.progress import Advance


def teacher_folder(recipe: Recipe) -> Path:
    """`<runs>/.teachers/<key>`: the key hashes the model, teacher settings, training data and seed."""
    shaping = {
        "model": recipe.model.model_dump(mode="json"),
        "teacher": recipe.teacher.model_dump(mode="json"),
        "train": [s.model_dump(mode="json") for s in recipe.data.train],
        "batch_size": recipe.data.batch_size,
        "seed": recipe.seed,
    }
    key = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
    return recipe.directory.parent / ".teachers" / f"{recipe.name}-{key}"


def obtain_teacher(
    recipe: Recipe, model: nn.Module, task: Task, plan: BatchPlan, advance: Advance, log: Callable[[dict], None],
) -> tuple[nn.Module, bool]:
    """The trained teacher (from the cache, or trained now and cached); True if it was trained now.

    Training resumes from its last checkpoint after an interruption, like every other stage.
    """
    folder = teacher_folder(recipe)
    weights = folder / "model.safetensors"
    if weights.is_file():
        _load(model, weights)
        return model.eval(), False
    folder.mkdir(parents=True, exist_ok=True)
    spec = recipe.teacher
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = adamw(params.values(), lr=spec.lr, weight_decay=spec.weight_decay)
    state = folder / "state"

    def loss_at(step: int) -> torch.Tensor:
        batch = plan.batch(step)
        loss = task.task_loss(task.run(model, batch), batch)
        if loss is None:
            raise ReplacerError(
                f"task '{task.name}' has no labels to learn from, so teacher.train cannot train a teacher; "
                "use a classification or causal-lm task, or a pretrained teacher"
            )
        return loss

    torch.manual_seed(recipe.seed)
    model.train()
    try:
        train_loop(params, optimizer, loss_at, spec.steps, spec.lr, spec.checkpoint_every, state, {"stage": "teacher"}, advance, log)
    finally:
        model.eval()
    write_atomically(weights, lambda tmp: save_model(model, str(tmp)))
    clear_state(state)
    return model, True


def _load(model: nn.Module, path: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable cache file is the same problem
        raise CheckpointError(f"cached teacher {path} cannot be read ({summary(exc)}); delete it to retrain") from None
    if missing or unexpected:
        raise CheckpointError(f"cached teacher {path} does not fit the model (missing {missing[:3]}); delete it to retrain")
