"""Block-wise distillation: every selected site's mixer learns its teacher site's input -> output map.

Sites see the teacher's own inputs (not their replaced predecessors'), so they are independent:
trained one after another, or spread over worker processes reading a disk cache. Each site
checkpoints as it trains and writes its final mixer weights when done, so a resumed run skips
finished sites and continues a half-trained one from its last checkpoint.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from replacer.train.batches import BatchPlan
from replacer.errors import DivergedError, ReplacerError
from replacer.distill.capture import DiskStore, MemoryStore, capture_sites
from replacer.distill.losses import site_loss
from replacer.graph.adapter import ReplacedAttention, site_wrappers
from replacer.recipe import DistillSection
from replacer.tasks import Task
from replacer.train.loop import train_loop
from replacer.train.distributed import SINGLE, World
from replacer.files import read_or_explain, write_atomically
from replacer.train.optimizers import adam
from replacer.train.state import clear_state
from replacer.progress import Advance

if TYPE_CHECKING:
    from replacer.progress import Progress

Store = MemoryStore | DiskStore
Log = Callable[[dict], None]


def capture(
    teacher: nn.Module, task: Task, plan: BatchPlan, wrappers: dict[str, ReplacedAttention], spec: DistillSection,
    cache_dir: Path, advance: Advance, marker: str = "complete",
) -> dict[str, Store]:
    """Run the teacher on calibration batches and keep each site's pairs (bounded in memory).

    A disk capture is reused when `cache_dir / marker` says it finished (each rank has its own marker).
    """
    if spec.cache == "disk":
        stores: dict[str, Store] = {n: DiskStore(cache_dir / n) for n in wrappers}
        if (cache_dir / marker).is_file():
            return stores
        for store in stores.values():  # a capture cut short is redone from the start
            for f in store.folder.glob("*"):
                f.unlink()
        stores = {n: DiskStore(cache_dir / n) for n in wrappers}
    else:
        stores = {n: MemoryStore() for n in wrappers}
    budget = int(spec.cache_max_gb * 2**30)
    used = 0
    teacher.eval()
    for k in range(spec.calibration_batches):
        with torch.no_grad(), capture_sites(teacher, wrappers) as records:
            task.run(teacher, plan.batch(k))
        for name, pairs in records.items():
            for pair in pairs:
                if not all(bool(torch.isfinite(t).all()) for t in pair[:2]):
                    raise DivergedError(
                        f"the teacher's site {name} reads or returns NaN or infinite values on calibration batch {k}; "
                        "check the teacher's weights (model.checkpoint) and the data"
                    )
                used += stores[name].add(pair)
        advance()
        if used > budget:
            break
    if spec.cache == "disk":
        (cache_dir / marker).write_text(str(spec.calibration_batches))
    return stores


def train_site(
    wrapper: ReplacedAttention, store: Store, spec: DistillSection, seed: int, state_path: Path,
    advance: Advance = lambda loss=None: None, log: Log = lambda _: None,
) -> float:
    """Train one site's mixer on its pairs; returns the mean loss of the last 10% of steps."""
    params = dict(wrapper.mixer.named_parameters())
    frozen = [p for n, p in wrapper.named_parameters() if not n.startswith("mixer.") and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = adam(params.values(), lr=spec.lr)
    order = BatchPlan(range(len(store)), 1, collate=lambda items: items[0], seed=seed)
    project = wrapper.projection() if "projected" in spec.head_target else None

    def loss_at(step: int) -> torch.Tensor:
        x, y, keep = store.get(order.batch(step))
        pred = wrapper.predict(x, keep)
        loss = site_loss(spec.loss, pred, y, keep) if "heads" in spec.head_target else pred.new_zeros(())
        if "projected" in spec.head_target:
            loss = loss + site_loss(spec.loss, project(pred), project(y), keep)
        return loss

    wrapper.train()
    try:
        return train_loop(
            params, optimizer, loss_at, spec.steps, spec.lr, spec.checkpoint_every, state_path,
            {"site": wrapper.site.name}, advance, log,
        )
    finally:
        wrapper.eval()
        for p in frozen:
            p.requires_grad_(True)


def _mixer_file(folder: Path, site: str) -> Path:
    return folder / f"{site}.safetensors"


def _finish(wrapper: ReplacedAttention, folder: Path, state_path: Path) -> None:
    tensors = {k: v.detach().contiguous() for k, v in wrapper.mixer.state_dict().items()}
    write_atomically(_mixer_file(folder, wrapper.site.name), lambda tmp: save_file(tensors, str(tmp)))
    clear_state(state_path)


def _load_finished(wrapper: ReplacedAttention, folder: Path) -> None:
    """A site's distilled mixer from disk; a damaged file names itself and how to redo that site."""
    read_or_explain(
        _mixer_file(folder, wrapper.site.name), lambda f: wrapper.mixer.load_state_dict(load_file(str(f))),
        "delete it to distil that site again, or run with --restart",
    )


def _train_in_worker(wrapper: ReplacedAttention, cache: Path, spec: DistillSection, seed: int, folder: Path, threads: int) -> tuple[str, float]:
    torch.set_num_threads(threads)
    state = folder / f"{wrapper.site.name}.partial"
    loss = train_site(wrapper, DiskStore(cache / wrapper.site.name), spec, seed, state)
    _finish(wrapper, folder, state)
    return wrapper.site.name, loss


def distill_blockwise(
    student: nn.Module, teacher: nn.Module, task: Task, plan: BatchPlan, spec: DistillSection, folder: Path,
    seed: int, progress: "Progress", log: Log, world: World = SINGLE,
) -> dict[str, float]:
    """Distill every replaced site of `student`; returns the final loss per site (NaN: finished earlier).

    Under torchrun each rank trains its share of the sites; all ranks then load every site's result.
    """
    wrappers = site_wrappers(student)
    bound = [name for name, w in wrappers.items() if not w.distills_alone]
    if bound:
        raise ReplacerError(
            f"site {bound[0]} cannot be distilled block-wise: its output depends on more than its input "
            "(e.g. a residual added inside the layer); set distill.enabled to false (tuning trains it end to end)"
        )
    if "projected" in spec.head_target:
        for wrapper in wrappers.values():
            wrapper.projection()  # a site that cannot be matched after its projection fails before any capture
    folder.mkdir(parents=True, exist_ok=True)
    todo = {n: wrappers[n] for n in world.mine(list(wrappers)) if not _mixer_file(folder, n).is_file()}
    trained = _train_sites(todo, teacher, task, plan, spec, folder, seed, progress, log, world) if todo else {}
    world.barrier()
    for name, wrapper in wrappers.items():
        if name not in trained:  # finished earlier, or on another rank
            _load_finished(wrapper, folder)
    losses = world.merge(trained)
    return {name: losses.get(name, float("nan")) for name in wrappers}


def _train_sites(
    todo: dict[str, ReplacedAttention], teacher: nn.Module, task: Task, plan: BatchPlan, spec: DistillSection,
    folder: Path, seed: int, progress: "Progress", log: Log, world: World,
) -> dict[str, float]:
    results: dict[str, float] = {}
    marker = "complete" if not world.distributed else f"complete-rank{world.rank}-of-{world.size}"
    with progress.task("distill: capture teacher pairs", spec.calibration_batches) as advance:
        stores = capture(teacher, task, plan, todo, spec, folder / "cache", advance, marker)
    if spec.workers > 1:
        threads = max(1, (os.cpu_count() or 1) // spec.workers)
        with progress.task(f"distill: {len(todo)} sites on {spec.workers} workers", len(todo)) as advance:
            with ProcessPoolExecutor(spec.workers, mp_context=get_context("spawn")) as pool:
                futures = [
                    pool.submit(_train_in_worker, w, folder / "cache", spec, seed + w.site.layer_index, folder, threads)
                    for w in todo.values()
                ]
                for future in futures:
                    name, loss = future.result()
                    _load_finished(todo[name], folder)
                    results[name] = loss
                    log({"site": name, "final_loss": loss})
                    advance()
        return results
    for name, wrapper in todo.items():
        state = folder / f"{name}.partial"
        with progress.task(f"distill: {name}", spec.steps) as advance:
            results[name] = train_site(wrapper, stores[name], spec, seed + wrapper.site.layer_index, state, advance, log)
        _finish(wrapper, folder, state)
        log({"site": name, "final_loss": results[name]})
    return results
