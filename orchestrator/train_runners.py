"""How `orchestrator.train.launch` runs a loop: a new Ray Train worker group, or the open warm worker group
(`orchestrator.train_pool`), and the errors either gives (`TrainError`: what failed, how to resume)."""
from __future__ import annotations

import os

import ray
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from models.errors import UserError
from orchestrator.storage.rundir import RunDir
from orchestrator.train_checkpoints import KEEP_CHECKPOINTS

START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # how often the controller polls the workers (Ray's default: 2 s)
POLL_INTERVAL_S = 0.25


class TrainError(UserError, RuntimeError):
    """A Ray Train run failed; the message says where its checkpoints are and how to resume."""


def on_warm_group(run_dir, num_workers: int, cpus_per_worker: float, datasets: dict | None = None) -> bool:
    """Whether `launch` with these arguments runs on the open warm worker group rather than a new Ray Train one.
    The warm group checkpoints into local folders: a run on an object store keeps Ray Train's checkpoints there."""
    from orchestrator import train_pool

    pool = train_pool.active()
    return (pool is not None and RunDir.of(run_dir).ray_train_storage()[1] is None
            and pool.fits(num_workers, cpus_per_worker, datasets))


def unplaceable(name: str, num_workers: int, cpus_per_worker: float, start_timeout_s: float) -> TrainError:
    cpus = ray.cluster_resources().get("CPU", 0)
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
    return TrainError(
        f"Ray Train could not place {num_workers} worker(s) x {cpus_per_worker} CPU for {name!r} within "
        f"{start_timeout_s:g}s: the cluster has {cpus:g} CPU ({largest:g} on its largest node); lower the "
        "stage's num_workers, or add nodes, then rerun (finished models are kept)"
    )


def failed(name: str, storage, e: BaseException) -> TrainError:
    return TrainError(
        f"Ray Train run {name!r} failed: {e}\nIts checkpoints are under {storage}/{name}; "
        "launch again with the same name and run_dir to resume from the latest one."
    )


def run_ray_train(entry, config, name, storage, storage_fs, num_workers, max_failures, cpus_per_worker,
                  start_timeout_s, datasets):
    """One Ray Train run (a new worker group); rank 0's return value and the run's final checkpoint (or None)."""
    os.environ[START_TIMEOUT_ENV] = str(start_timeout_s)  # Ray Train passes it on to its controller
    # The controller notices that the loop finished at its next poll of the workers (default every 2 s).
    os.environ.setdefault(POLL_ENV, str(POLL_INTERVAL_S))
    trainer = TorchTrainer(
        train_loop_per_worker=entry,
        train_loop_config=dict(config),
        datasets=datasets or None,
        dataset_config=DataConfig(datasets_to_split=[], execution_options={
            k: ds.context.execution_options for k, ds in (datasets or {}).items()}),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=False, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            # controller_failure_limit=0: a worker group that timed out starting is not retried for ever
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=0),
        ),
    )
    try:
        result = trainer.fit()
        return result.return_value, result.checkpoint
    except ray.train.TrainingFailedError as e:
        if "worker group startup timed out" in str(e):
            raise unplaceable(name, num_workers, cpus_per_worker, start_timeout_s) from None
        raise failed(name, storage, e) from e


def run_warm_pool(pool, loop, where, config, name, storage, num_workers, max_failures, cpus_per_worker,
                  start_timeout_s) -> dict | None:
    """The same loop on the warm worker group, retried up to `max_failures` times as Ray Train would; rank 0's return value."""
    for attempt in range(max_failures + 1):
        try:
            return pool.run(loop, where, dict(config), num_workers, cpus_per_worker, start_timeout_s)[0]
        except TimeoutError:
            raise unplaceable(name, num_workers, cpus_per_worker, start_timeout_s) from None
        except Exception as e:  # noqa: BLE001 - the loop's own error, raised again as Ray Train would report it
            if attempt == max_failures:
                raise failed(name, storage, e) from e
            pool.log(f"{name}: a worker failed ({type(e).__name__}); retrying from the latest checkpoint")
