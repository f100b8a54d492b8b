"""Ray Tune sweeps: one trial per parameter combination, each finished trial logged as an MLflow child run.

The caller (pipelines.sweep) expands its spec into a list of trial configs and gives a pure function
`fn(trial) -> metrics`; this module runs them as Ray Tune trials, sized to the cluster, with a
progress bar. It never restores Tune's own state: Tune pickles its experiment (tuner.pkl, params.pkl,
pickled trials inside experiment_state JSON), and unpickling a file from a shared run directory runs
whatever code was planted there. The caller resumes from its own JSON records of finished trials and
hands this module only the trials still to run; Tune's folder is cleared before every start.
Only the driver writes to MLflow (SQLite locks under concurrent writers): a Tune
callback logs each trial as it finishes, and the caller logs every finished trial again at the end
(pipelines.sweep.run), which fills in any trial whose run a killed driver never wrote. `MlflowTrials.log`
skips a trial that already has a child run (found by its `trial_key` tag), so every trial ends with
exactly one child run.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from ray import tune
from tqdm import tqdm

from models.errors import UserError
from orchestrator.storage.atomic import write_json

TUNE_DIR = "tune"  # Tune's experiment storage under the sweep directory
STATE_FILE = "sweep.json"  # the spec hash, trial count and MLflow parent run of a sweep
METRIC_KEYS = ("val_accuracy", "test_accuracy", "n_val", "n_test", "trial_seconds", "reused")  # what a trial reports
DOMAINS = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint, "choice": tune.choice}


class SweepError(UserError, RuntimeError):
    """A sweep cannot start or resume as asked; the message says what to do."""


def sample_space(kind: str, args, n: int, seed: int) -> list:
    """`n` seeded draws from a Tune search space, e.g. ("loguniform", [1e-3, 1e-1]) or ("choice", [[...]])."""
    if kind not in DOMAINS:
        raise SweepError(f"unknown search space {kind!r}; use one of {', '.join(DOMAINS)} or a list of values (a grid)")
    domain = DOMAINS[kind](args) if kind == "choice" else DOMAINS[kind](*args)
    values = domain.sample(size=n, random_state=np.random.RandomState(seed))
    values = values.tolist() if hasattr(values, "tolist") else values if isinstance(values, list) else [values]
    return [v.item() if hasattr(v, "item") else v for v in values]


def concurrency(cpus_per_trial: float, gpus_per_trial: float = 0.0) -> int:
    """How many trials fit on the cluster at once (at least 1)."""
    import ray

    res = ray.cluster_resources()
    fits = [res.get("CPU", 1.0) / cpus_per_trial] if cpus_per_trial > 0 else []
    if gpus_per_trial > 0:
        fits.append(res.get("GPU", 0.0) / gpus_per_trial)
    return max(1, int(min(fits))) if fits else max(1, int(res.get("CPU", 1.0)))


def _trainable(fn: Callable[[dict], dict], config: dict) -> None:
    """The Tune function trainable: one trial, one report."""
    tune.report(fn(config["trial"]))


def _resources(cpus_per_trial: float, config: dict) -> tune.PlacementGroupFactory:
    """A sampling trial reserves its CPUs; a training trial next to none, since the Ray Train workers it launches reserve theirs
    (a trial holding a CPU while its workers wait for one deadlocks a small cluster)."""
    return tune.PlacementGroupFactory([{"CPU": 0.01 if config["trial"].get("train") else cpus_per_trial}])  # Ray refuses an empty request


class TrialProgress:
    """Driver side: logs each finished trial (MLflow) and shows progress: a bar, or a line every tenth."""

    def __init__(self, log_trial: Callable[[dict, dict], None], total: int, done: int, progress: bool):
        self.log_trial = log_trial
        self.bar = tqdm(total=total, initial=done, desc="sweep trials", unit="trial", file=sys.stderr,
                        disable=not progress, dynamic_ncols=True)
        self.progress, self.total, self.done, self.errors, self.t0 = progress, total, done, 0, time.perf_counter()

    def complete(self, trial: dict, result: dict) -> None:
        self.log_trial(trial, result)
        self.done += 1
        self.bar.update(1)
        if not self.progress and (self.done % max(1, self.total // 10) == 0 or self.done == self.total):
            print(f"sweep: {self.done}/{self.total} trials done ({time.perf_counter() - self.t0:.0f}s)", file=sys.stderr, flush=True)

    def error(self) -> None:
        self.errors += 1
        self.bar.set_postfix(errors=self.errors)


# Tune pickles the RunConfig, callbacks included, into its experiment state; the callback therefore
# holds only a key (nothing live is pickled), and the live logger is looked up here.
_LIVE: dict[str, TrialProgress] = {}


class TrialLogger(tune.Callback):
    """Forwards Tune's trial events to the live `TrialProgress` registered under `key`."""

    def __init__(self, key: str):
        self.key = key

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.key in _LIVE:
            _LIVE[self.key].complete(trial.config["trial"], dict(trial.last_result or {}))

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.key in _LIVE:
            _LIVE[self.key].error()


def run_trials(
    fn: Callable[[dict], dict],
    trials: list[dict],
    *,
    sweep_dir: Path,
    max_concurrent: int,
    cpus_per_trial: float,
    log_trial: Callable[[dict, dict], None],
    done_before: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Run every trial config through a fresh Ray Tune experiment; returns [{**trial, **metrics}] in trial order.

    Trials run on reused Tune actors, so a trial function may cache loaded data per process.
    """
    import ray

    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
    if any(not t.get("train") for t in trials) and cpus_per_trial > largest:  # Tune would wait for ever
        raise SweepError(f"each sampling trial asks for {cpus_per_trial:g} CPU but the largest node has {largest:g}; "
                         "lower cpus_per_trial (on an autoscaling cluster, start a node that size first)")
    storage = (Path(sweep_dir) / TUNE_DIR).resolve()
    trainable = tune.with_resources(functools.partial(_trainable, fn), functools.partial(_resources, cpus_per_trial))
    key = str(storage)
    _LIVE[key] = TrialProgress(log_trial, done_before + len(trials), done_before, progress)
    # Tune's new output engine prints an experiment box and a TensorBoard hint even at verbose=0; its legacy
    # engine is silent at 0 (measured, Ray 2.60). The sweep shows its own progress (TrialProgress).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    run_config = tune.RunConfig(name="trials", storage_path=str(storage), verbose=0, callbacks=[TrialLogger(key)],
                                failure_config=tune.FailureConfig(max_failures=1))
    if storage.exists():  # an earlier attempt's Tune state: never read back (see the module docstring)
        shutil.rmtree(storage)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True),
        run_config=run_config,
    )
    try:
        grid = tuner.fit()
    finally:
        _LIVE.pop(key).bar.close()
    rows, failed = [], []
    for result in grid:
        if result.error is not None or not result.metrics:
            failed.append((result.config or {}).get("trial", {}).get("key", "?"))
            continue
        rows.append({**result.config["trial"], **{k: v for k, v in result.metrics.items() if k in METRIC_KEYS}})
    if failed:
        raise SweepError(f"{len(failed)} trial(s) failed (e.g. {failed[0]}); see {storage}/trials for their errors, "
                         "then rerun with --resume to retry them (finished trials are kept)")
    return rows


# ----------------------------------------------------------------------------- MLflow


def read_state(sweep_dir: Path) -> dict | None:
    """The sweep's recorded state (spec hash, trial count, MLflow parent), None for a new sweep."""
    path = Path(sweep_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_state(sweep_dir: Path, state: dict) -> None:
    write_json(Path(sweep_dir) / STATE_FILE, state)


class MlflowTrials:
    """Writes trial child runs under a sweep's parent run, each once (keyed by the `trial_key` tag)."""

    def __init__(self, uri: str, experiment_id: str, parent_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.experiment_id, self.parent_id = experiment_id, parent_id
        self.logged: set | None = None  # trial keys with a child run; read on first use (the server may be down now)

    def children(self):
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'", max_results=50000)

    def log(self, trial: dict, metrics: dict, params: dict, tags: dict) -> None:
        """One FINISHED child run: params, tags, metrics; skipped when this trial already has one."""
        from mlflow.entities import Metric, Param

        from orchestrator.tracking.tags import tag_value

        key = trial["key"]
        if self.logged is None:
            self.logged = {r.data.tags.get("trial_key") for r in self.children()}
        if key in self.logged:
            return
        run = self.client.create_run(self.experiment_id, run_name=trial.get("name", key),
                                     tags={"mlflow.parentRunId": self.parent_id, "trial_key": key, **tags})
        now = int(time.time() * 1000)
        self.client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, (int, float))],
            params=[Param(k, tag_value(v)) for k, v in params.items()],
        )
        self.client.set_terminated(run.info.run_id, "FINISHED")
        self.logged.add(key)

    def finish_parent(self) -> None:
        self.client.set_terminated(self.parent_id, "FINISHED")
