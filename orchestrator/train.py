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
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import ray.train
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model

from models.errors import UserError
from orchestrator.storage.atomic import write_json
from orchestrator.storage.rundir import RunDir

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
STATE_FILE = "state.safetensors"  # tensors only: no pickle anywhere in a checkpoint
CONFIG_FILE = "config.json"  # the loop's config, saved with every checkpoint
METRICS_FILE = "metrics.json"  # {"step", "latest", "history"}: history lets a resumed run keep its curve



class TrainError(UserError, RuntimeError):
    """A Ray Train run failed; the message says where its checkpoints are and how to resume."""


@dataclass
class TrainResult:
    """What a finished run left: rank 0's metrics and the final checkpoint, read back from disk."""

    metrics: list[dict]  # rank 0's metrics from every report() call, in order (restored history included)
    checkpoint_dir: Path | None  # the final checkpoint's folder, None if the loop never saved state (or it is on an object store)
    state: dict[str, torch.Tensor] | None  # tensors of the final checkpoint
    config: dict  # config.json of the final checkpoint (the launch config when there is none); JSON-plain
    wall_s: float = 0.0  # seconds in trainer.fit(), worker-group start included


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
    from orchestrator.progress import Progress, Watcher, new_hub

    storage, storage_fs = RunDir.of(run_dir).ray_train_storage()  # on the object store for a run there
    if storage_fs is None:
        Path(storage).mkdir(parents=True, exist_ok=True)
    os.environ[START_TIMEOUT_ENV] = str(start_timeout_s)  # Ray Train passes it on to its controller
    stage = stage or name
    run_label = RunDir.of(run_dir).root.name
    hub = new_hub() if progress_total else None
    trainer = TorchTrainer(
        train_loop_per_worker=functools.partial(_entry, loop, {"hub": hub, "stage": stage, "run": run_label}),
        train_loop_config=dict(config),
        datasets=datasets or None,
        dataset_config=DataConfig(datasets_to_split=[], execution_options={
            k: ds.context.execution_options for k, ds in (datasets or {}).items()}),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # controller_failure_limit=0: a worker group that timed out starting is not retried for ever
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=0),
        ),
    )
    t0 = time.perf_counter()
    watch = contextlib.nullcontext()
    if hub is not None:
        driver = metrics.tags("driver", metrics.this_node(), stage, run_label)
        bar = Progress(progress_total, stage, "step", show_progress, log,
                       on_eta=lambda eta: metrics.gauge("train_eta_seconds", eta, keep=True, **driver))
        watch = Watcher(hub, bar, describe=_describe)
    try:
        with watch:
            result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        if "worker group startup timed out" in str(e):
            cpus = ray.cluster_resources().get("CPU", 0)
            largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
            raise TrainError(
                f"Ray Train could not place {num_workers} worker(s) x {cpus_per_worker} CPU for {name!r} within "
                f"{start_timeout_s:g}s: the cluster has {cpus:g} CPU ({largest:g} on its largest node); lower the "
                "stage's num_workers, or add nodes, then rerun (finished models are kept)"
            ) from None
        raise TrainError(
            f"Ray Train run {name!r} failed: {e}\nIts checkpoints are under {storage}/{name}; "
            "launch again with the same name and run_dir to resume from the latest one."
        ) from e
    finally:
        if hub is not None:
            ray.kill(hub)
            metrics.gauge("train_eta_seconds", 0.0, keep=True, **driver)
    wall = time.perf_counter() - t0

    ckpt_dir, state, saved_config, saved = None, None, dict(config), {}
    if result.checkpoint is not None:
        ckpt_dir = Path(result.checkpoint.path) if storage_fs is None else None  # on an object store: no local folder
        with result.checkpoint.as_directory() as d:  # a local checkpoint is read in place, a remote one fetched
            state, saved_config, saved = read_checkpoint(Path(d))
    # return_value is rank 0's full history (see _entry); the checkpoint's copy is a fallback that
    # misses only the calls made after the last checkpoint.
    metrics = result.return_value if result.return_value is not None else saved.get("history", [])
    return TrainResult(metrics=list(metrics), checkpoint_dir=ckpt_dir, state=state, config=saved_config, wall_s=wall)


def read_checkpoint(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state, config, metrics.json) of a checkpoint folder written by `report`; no pickle involved."""
    ckpt_dir = Path(ckpt_dir)
    state = load_file(ckpt_dir / STATE_FILE)
    config = json.loads((ckpt_dir / CONFIG_FILE).read_text())
    saved = json.loads((ckpt_dir / METRICS_FILE).read_text())
    return state, config, saved


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


def _entry(loop: Callable[[dict], None], where: dict, config: dict) -> list[dict] | None:
    """The real train_loop_per_worker: run the user's loop, hand rank 0's history back to the driver."""
    from orchestrator.progress import Reporter

    _history.clear()
    _progress.clear()
    _progress.update(where, report=Reporter(where.get("hub")), last={})
    loop(config)
    return list(_history) if rank() == 0 else None


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
    return ray.train.get_context().get_world_rank()


def world_size() -> int:
    """Number of workers in this run."""
    return ray.train.get_context().get_world_size()


def prepare(model: torch.nn.Module) -> torch.nn.Module:
    """Move to this worker's device (CPU) and wrap in DDP when there is more than one worker."""
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
    Ray Train V2 drains one report per controller poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by
    default), so reporting every step would cap training at one step per 2 s; they are not lost:
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
    if rank() != 0:
        ray.train.report(metrics, checkpoint=None)  # rank 0 alone writes the checkpoint
        return
    step = int(metrics.get("step", len(_history)))
    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        d = Path(tmp)
        # clone: safetensors refuses tensors that share storage (tied weights, views)
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, str(d / STATE_FILE))
        write_json(d / CONFIG_FILE, config or {})
        write_json(d / METRICS_FILE, {"step": step, "latest": metrics, "history": _history})
        # SYNC upload (the default): the folder is copied into storage before report returns.
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(d)))


def _check_same_on_all_ranks(flag: bool) -> None:
    """Fail loudly, on every rank, when only some workers checkpoint (Ray's report would hang instead)."""
    if world_size() == 1 or not dist.is_initialized():
        return
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(t)
    if int(t.item()) not in (0, world_size()):
        raise RuntimeError("report(): pass `state` on every worker at the same step, or on none")


def restore() -> tuple[dict[str, torch.Tensor] | None, int | None]:
    """(state, step) of the latest checkpoint of this run (after a failure or a relaunch), else (None, None)."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, None
    with ckpt.as_directory() as d:
        state, _, saved = read_checkpoint(Path(d))
    _history[:] = saved.get("history", [])  # so the returned curve covers the steps before the interruption
    return state, int(saved["step"])


__all__ = [
    "TrainError", "TrainResult", "launch", "read_checkpoint",
    "rank", "world_size", "prepare", "unwrap", "shard", "all_mean", "report", "restore", "progress",
]
