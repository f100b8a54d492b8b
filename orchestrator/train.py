"""Launch Ray Train (V2) jobs: DDP over gloo on CPU, safetensors + JSON checkpoints, resume by name.

Driver side: `launch(loop, config, name=..., run_dir=...)` -> `TrainResult`; with `progress_total`,
a bar (or a line every 30 s) on the driver shows the workers' steps, loss and ETA.
Inside `loop(config)`, on every worker: `rank`, `world_size`, `prepare`, `unwrap`, `shard`,
`all_mean`, `report`, `restore`, and `progress` (step, loss: the driver's bar and the metrics endpoint).
A stage keeps its maths in a pure `train_step` that knows nothing of Ray and wraps it in a short loop
built from these helpers.

Resume (Ray Train V2): there is no `Trainer.restore`; constructing the trainer again with the same
`RunConfig(name, storage_path)` makes the controller load `checkpoint_manager_snapshot.json` from
`<storage_path>/<name>/`, after which `ray.train.get_checkpoint()` on every worker returns the latest
reported checkpoint. The loop must cooperate: call `restore()` first and skip the steps it returns.
The same path serves in-run retries (`FailureConfig(max_failures=...)`).

Inside `orchestrator.train_pool.warm_pool()` the same loop runs on a warm worker group instead of a new
Ray Train one (no worker-group start per launch); its checkpoints sit beside Ray Train's, listed in
WARM_INDEX, and `restore()` and the returned result take the newest of either kind.
"""
from __future__ import annotations

import contextlib
import functools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

import ray.train
from ray.train import Checkpoint
from ray.train.torch import prepare_model

from orchestrator.storage.rundir import RunDir
from orchestrator.train_checkpoints import (  # noqa: F401 - part of this module's interface
    CONFIG_FILE,
    KEEP_CHECKPOINTS,
    METRICS_FILE,
    STATE_FILE,
    latest_checkpoint,
    read_checkpoint,
    save_warm_checkpoint,
    write_checkpoint,
)
from orchestrator.train_runners import TrainError, on_warm_group, run_ray_train, run_warm_pool  # noqa: F401 - interface




@dataclass
class TrainResult:
    """What a finished run left: rank 0's metrics and the final checkpoint, read back from disk."""

    metrics: list[dict]  # rank 0's metrics from every report() call, in order (restored history included)
    checkpoint_dir: Path | None  # the final checkpoint's folder, None if the loop never saved state (or it is on an object store)
    state: dict[str, torch.Tensor] | None  # tensors of the final checkpoint
    config: dict  # config.json of the final checkpoint (the launch config when there is none); JSON-plain
    wall_s: float = 0.0  # seconds in the launch, worker-group start included
    loop_s: float = 0.0  # seconds inside the loop on its slowest worker: the launch's work; the rest is its overhead
    warm: bool = False  # run on the warm worker group (orchestrator.train_pool), not a new Ray Train one


# ----------------------------------------------------------------------------- driver side


def launch(
    loop: Callable[[dict], None],
    config: dict,
    *,
    name: str,
    run_dir: Path,
    num_workers: int = 1,
    max_failures: int = 0,
    cpus_per_worker: int = 1,
    start_timeout_s: float = 300.0,
    stage: str | None = None,
    progress_total: float | None = None,
    show_progress: bool = False,
    log: Callable[[str], None] = print,
    datasets: dict | None = None,
) -> TrainResult:
    """Run `loop(config)` on `num_workers` CPU workers (DDP over gloo); rerun with the same name+run_dir to resume.

    A worker group that cannot be placed within `start_timeout_s` (an autoscaler may add nodes meanwhile)
    is one TrainError saying what was asked and what the cluster has; Ray Train alone would retry for ever.
    `stage` labels the loop's metrics (default: `name`). With `progress_total` (the steps the loop's
    `progress` calls add up to) the driver shows them: a bar when `show_progress`, else a line every
    30 s through `log`.
    `datasets` ({name: Ray Data dataset}) reach every worker whole, not split between workers (each worker
    iterates its own stream: `orchestrator.storage.stream.worker_batches`), with the execution options each
    dataset was built with (Ray Train would otherwise replace them with its defaults, e.g. its read-ahead cap).
    """
    from orchestrator import metrics
    from orchestrator import train_pool
    from orchestrator.progress import Progress, Watcher, new_hub

    local = RunDir.of(run_dir).ray_train  # the working copy's folder (the run's own for a local run)
    storage, storage_fs = RunDir.of(run_dir).ray_train_storage()  # on the object store for a run there
    if storage_fs is None:
        local.mkdir(parents=True, exist_ok=True)
    stage = stage or name
    run_label = RunDir.of(run_dir).root.name
    hub = new_hub() if progress_total else None
    where = {"hub": hub, "stage": stage, "run": run_label, "dir": str(local / name)}
    pool = train_pool.active()
    warm = on_warm_group(run_dir, num_workers, cpus_per_worker, datasets)
    t0 = time.perf_counter()
    watch = contextlib.nullcontext()
    if hub is not None:
        driver = metrics.tags("driver", metrics.this_node(), stage, run_label)
        bar = Progress(progress_total, stage, "step", show_progress, log,
                       on_eta=lambda eta: metrics.gauge("train_eta_seconds", eta, keep=True, **driver))
        watch = Watcher(hub, bar, describe=_describe)
    try:
        with watch:
            if warm:
                returned, reported = run_warm_pool(pool, loop, where, config, name, local, num_workers,
                                                   max_failures, cpus_per_worker, start_timeout_s), None
            else:
                returned, reported = run_ray_train(functools.partial(_entry, loop, where), config, name, storage,
                                                   storage_fs, num_workers, max_failures, cpus_per_worker,
                                                   start_timeout_s, datasets)
    finally:
        if hub is not None:
            ray.kill(hub)
            metrics.gauge("train_eta_seconds", 0.0, keep=True, **driver)
    wall = time.perf_counter() - t0

    if storage_fs is not None:  # on an object store: Ray Train's checkpoint only, fetched, no local folder
        ckpt_dir, state, saved_config, saved = None, None, dict(config), {}
        if reported is not None:
            with reported.as_directory() as d:
                state, saved_config, saved = read_checkpoint(Path(d))
    else:
        found = [p for p in (reported and Path(reported.path), latest_checkpoint(local / name)) if p is not None]
        ckpt_dir = max(found, key=lambda p: p.name, default=None)
        state, saved_config, saved = (None, dict(config), {}) if ckpt_dir is None else read_checkpoint(ckpt_dir)
    # The returned history is rank 0's full one (see _entry); the checkpoint's copy is a fallback that
    # misses only the calls made after the last checkpoint.
    history = returned["history"] if returned is not None else saved.get("history", [])
    loop_s = returned["loop_s"] if returned is not None else 0.0
    return TrainResult(metrics=list(history), checkpoint_dir=ckpt_dir, state=state, config=saved_config, wall_s=wall,
                       loop_s=loop_s, warm=warm)


# ----------------------------------------------------------------------------- worker side

def _describe(units: dict) -> str:
    """The bar's postfix: the model most recently reported, its step and loss."""
    if not units:
        return ""
    key, (done, _total, info) = max(units.items(), key=lambda kv: kv[1][2].get("t", 0.0))
    loss = info.get("loss")
    return f"{key} step {info.get('step', done):.0f}" + (f" loss {loss:.4g}" if isinstance(loss, (int, float)) else "")


# Rank 0's reports in this worker process; returned to the driver as the run's metric history.
_history: list[dict] = []
_progress: dict = {}  # this worker's progress hub, labels and last report per model (see `progress`)
_warm: dict = {}  # on a warm worker group's actor during a launch: its rank and world size (else Ray Train's)


def _entry(loop: Callable[[dict], None], where: dict, config: dict) -> dict | None:
    """The real train_loop_per_worker: run the user's loop; rank 0 hands back its history and the seconds
    the slowest worker spent inside the loop."""
    from orchestrator.progress import Reporter

    _history.clear()
    _progress.clear()
    _progress.update(where, report=Reporter(where.get("hub")), last={})
    t0 = time.perf_counter()
    loop(config)
    loop_s = time.perf_counter() - t0
    if world_size() > 1 and dist.is_initialized():
        t = torch.tensor([loop_s], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        loop_s = float(t.item())
    return {"history": list(_history), "loop_s": loop_s} if rank() == 0 else None


def run_warm(loop: Callable[[dict], None], where: dict, config: dict, rank: int, world_size: int,
             init_method: str | None) -> dict | None:
    """`_entry` on a warm worker group's actor (orchestrator.train_pool): a gloo group when several ranks, as
    Ray Train's torch backend makes, torn down after the loop so the next launch can have another size."""
    _warm.update(rank=rank, world_size=world_size, dir=Path(where["dir"]))
    try:
        if world_size > 1:
            dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
        return _entry(loop, where, config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        _warm.clear()


def progress(model: str, step: float, total: float, loss: float | None = None) -> None:
    """Where this worker is in one model: `step` of `total` optimiser steps. Shown on the driver's bar (when
    the launch asked for one) and exported as the `train_step`, `train_loss`, `train_steps_per_second`
    metrics (orchestrator.metrics), at most every half second per model. Call it from any rank."""
    if not _progress:
        return
    now = time.monotonic()
    last = _progress["last"].get(model)
    if last is not None and step < total and now - last[0] < 0.5:
        return
    from orchestrator import metrics

    ctx = ray.get_runtime_context()
    actor = f"{_progress['stage']}-worker-{rank()}"
    labels = metrics.tags(actor, ctx.get_node_id(), _progress["stage"], _progress["run"], model=model)
    metrics.gauge("train_step", step, **labels)
    if loss is not None:
        metrics.gauge("train_loss", float(loss), **labels)
    if last is not None and now > last[0] and step >= last[1]:
        metrics.gauge("train_steps_per_second", (step - last[1]) / (now - last[0]), **labels)
    _progress["last"][model] = (now, step)
    info = {"step": step, "t": time.time()}
    if loss is not None:
        info["loss"] = float(loss)
    _progress["report"](model, step, total, info)


def rank() -> int:
    """This worker's global rank (0 .. world_size-1)."""
    return _warm["rank"] if _warm else ray.train.get_context().get_world_rank()


def world_size() -> int:
    """Number of workers in this run."""
    return _warm["world_size"] if _warm else ray.train.get_context().get_world_size()


def prepare(model: torch.nn.Module) -> torch.nn.Module:
    """Move to this worker's device (CPU) and wrap in DDP when there is more than one worker."""
    if _warm:  # what Ray Train's prepare_model does on CPU
        return torch.nn.parallel.DistributedDataParallel(model) if world_size() > 1 else model
    return prepare_model(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DDP wrapper, so state-dict keys do not depend on the worker count."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def shard(n: int) -> slice:
    """This worker's equal, contiguous share of a global batch of n rows (n must divide evenly)."""
    ws, r = world_size(), rank()
    if n % ws:
        raise ValueError(f"a global batch of {n} rows does not split evenly over {ws} workers")
    per = n // ws
    return slice(r * per, (r + 1) * per)


def all_mean(x: float | torch.Tensor) -> float:
    """Mean of a scalar over workers (e.g. per-shard mean losses -> the global-batch loss)."""
    value = float(x.detach()) if isinstance(x, torch.Tensor) else float(x)
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)  # float64 so the reduction adds no visible error
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def report(metrics: dict, state: dict[str, torch.Tensor] | None = None, config: dict | None = None) -> None:
    """Record metrics (rank 0 keeps every call's); with `state`, also checkpoint and report to Ray Train.

    Every worker must pass `state` (or None) at the same calls: a checkpointing call is a Ray Train
    report, which is a barrier over all workers. Metrics-only calls stay in this process because
    Ray Train V2 drains one report per controller poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: Ray's default
    2 s, POLL_INTERVAL_S here), so reporting every step would cap the step rate; they are not lost:
    they reach the driver as `TrainResult.metrics` and each checkpoint's `metrics.json`.
    The checkpoint holds `state.safetensors`, `config.json` and `metrics.json`; its step is
    `metrics["step"]` when given, else the number of calls so far.
    """
    metrics = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
    if rank() == 0:
        _history.append(metrics)
    _check_same_on_all_ranks(state is not None)
    if state is None:
        return
    if _warm:
        if rank() == 0:
            save_warm_checkpoint(_warm["dir"], metrics, state, config, _history)
        if world_size() > 1:
            dist.barrier()  # as Ray Train's report: every rank returns once the checkpoint is saved
        return
    if rank() != 0:
        ray.train.report(metrics, checkpoint=None)  # rank 0 alone writes the checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        write_checkpoint(Path(tmp), metrics, state, config, _history)
        # SYNC upload (the default): the folder is copied into storage before report returns.
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def _check_same_on_all_ranks(flag: bool) -> None:
    """Fail loudly, on every rank, when only some workers checkpoint (Ray's report would hang instead)."""
    if world_size() == 1 or not dist.is_initialized():
        return
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(t)
    if int(t.item()) not in (0, world_size()):
        raise RuntimeError("report(): pass `state` on every worker at the same step, or on none")


def restore() -> tuple[dict[str, torch.Tensor] | None, int | None]:
    """(state, step) of the latest checkpoint of this run (after a failure or a relaunch), else (None, None);
    the newest of those Ray Train and the warm worker group saved."""
    ckpt = None if _warm else ray.train.get_checkpoint()
    newest = latest_checkpoint(Path(_warm["dir"] if _warm else _progress["dir"]))
    if ckpt is not None and (newest is None or Path(ckpt.path).name >= newest.name):
        with ckpt.as_directory() as d:
            state, _, saved = read_checkpoint(Path(d))
    elif newest is not None:
        state, _, saved = read_checkpoint(newest)
    else:
        return None, None
    _history[:] = saved.get("history", [])  # so the returned curve covers the steps before the interruption
    return state, int(saved["step"])


__all__ = [
    "TrainError", "TrainResult", "launch", "on_warm_group", "read_checkpoint", "latest_checkpoint",
    "rank", "world_size", "prepare", "unwrap", "shard", "all_mean", "report", "restore", "progress",
]
