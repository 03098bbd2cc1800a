"""Teacher sparsification before distillation ("Sparsity to Simplicity"): every query of the teacher
keeps only its top-k keys, a short recovery trains the teacher to match its dense self, and the
students then learn this sparser, more local function, which a recurrence imitates more easily."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from safetensors.torch import load_model, save_model
from torch import nn

from replacer.train.batches import BatchPlan
from replacer.distill.end_to_end import tune_end_to_end
from replacer.train.distributed import SINGLE, World
from replacer.files import read_or_explain, write_atomically
from replacer.graph.scan import scan
from replacer.plugins import get_registry
from replacer.recipe import SparsifySection, TuneSection
from replacer.tasks import Task
from replacer.train.state import clear_state

if TYPE_CHECKING:
    from replacer.progress import Progress


@contextlib.contextmanager
def sparse_attention(model: nn.Module, top_k: int) -> Iterator[nn.Module]:
    """While active, every attention site of `model` keeps each query's `top_k` highest-scoring keys."""
    adapters = {a.name: a for a in get_registry().adapters}
    with contextlib.ExitStack() as stack:
        for site in scan(model).sites:
            stack.enter_context(adapters[site.adapter].sparsify_attention(model.get_submodule(site.name), top_k))
        yield model


def sparsified_teacher(
    dense: nn.Module, task: Task, plan: BatchPlan, spec: SparsifySection, tune: TuneSection, folder: Path,
    progress: "Progress", log: Callable[[dict], None], stack: contextlib.ExitStack, world: World = SINGLE,
) -> tuple[nn.Module, nn.Module]:
    """The sparse teacher (attention sparse while `stack` lives) and its weights under dense attention,
    which students are built on. Recovery trains every teacher weight against the dense teacher."""
    sparse = stack.enter_context(sparse_attention(copy.deepcopy(dense), spec.top_k))
    weights = folder / "model.safetensors"
    if weights.is_file():
        read_or_explain(weights, lambda f: load_model(sparse, str(f)), "delete it to recover the sparse teacher again")
    elif spec.recovery_steps:
        folder.mkdir(parents=True, exist_ok=True)
        recovery = tune.model_copy(update={
            "steps": spec.recovery_steps, "lr": spec.lr, "train": "all", "other_lr_scale": 1.0,
            "checkpoint_every": spec.checkpoint_every,
        })
        state = folder / "state"
        with progress.task(f"sparsify: top-{spec.top_k} teacher recovery", spec.recovery_steps) as advance:
            tune_end_to_end(sparse, dense, task, plan, recovery, state, advance, log, world, record={"stage": "sparsify"})
        if world.is_main:
            write_atomically(weights, lambda tmp: save_model(sparse, str(tmp)))
            clear_state(state)
        world.barrier()
    base = copy.deepcopy(dense)
    base.load_state_dict(sparse.state_dict())
    return sparse, base
