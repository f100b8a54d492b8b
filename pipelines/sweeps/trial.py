"""One sweep trial: weights from one method at one setting, scored on the validation and meta-test tasks.

A trial with training overrides first trains its own models (Ray Train) into an overlay of the base
run (`RunDir.overlay`: it holds only the retrained model kinds and reads everything else from the base
run), shared by every trial with the same overrides under a file lock so that each is trained once.
A finished trial writes `done/<key>.json`; a rerun of the same trial (after a driver was killed
between the trial's end and Tune's next state save) returns that record instead of recomputing.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import time
from pathlib import Path

import torch

from orchestrator.storage.atomic import write_json
from orchestrator.storage.rundir import RunDir
from pipelines.core.config import fields
from pipelines.zeroshot.methods import METHODS, accuracy
from pipelines.zeroshot.sampling import SamplingSettings

DONE = "done"
TASKS = "test_tasks"  # in a trial's done record only: {task id: meta-test accuracy}, for the bootstrap CI
TRAIN = "train"
TRAIN_STAGES = ("generators", "hyperclip", "hyperldm", "baselines")  # in pipeline order
DEPENDENTS = {"generators": ("hyperclip", "hyperldm")}  # retraining generators changes the routes these use
_loaded: dict = {}  # (run, split, seed) -> TrainedModels, per trial process (Tune reuses actors)


def trained_models(run: RunDir, split: str, seed: int):
    """The run's models for (split, seed), loaded once per trial process; one split in memory at a time."""
    from pipelines.zeroshot.data import load_split
    from pipelines.zeroshot.trained import TrainedModels

    key = (run, split, seed)
    if key not in _loaded:
        same_split = next((m.data for (r, sp, _), m in _loaded.items() if (r.root, sp) == (run.root, split)), None)
        _loaded.clear()
        _loaded[key] = TrainedModels(run, same_split or load_split(run, split), seed)
    return _loaded[key]


def stage_config(kind: str, base: RunDir, split: str, seed: int, overrides: dict):
    """The config `kind` was trained with in the base run, with `overrides` ({field: value}) applied."""
    from pipelines.core.config import build

    module = importlib.import_module(f"pipelines.{kind}")
    side = json.loads(base.model(kind, split, seed).with_suffix(".json").read_text())
    return build(module.CONFIG, side["stage_config"], overrides)


def trained_run(trial: dict, base: RunDir, sweep_dir: Path) -> RunDir:
    """The run whose models reflect the trial's training overrides (the base run when there are none)."""
    if not trial["train"]:
        return base
    from filelock import FileLock

    from pipelines.core.cli import RunContext
    from pipelines.zeroshot.launch import train_stage

    digest = hashlib.sha256(json.dumps(trial["train"], sort_keys=True).encode()).hexdigest()[:12]
    by_stage: dict[str, dict] = {}
    for k, v in trial["train"].items():
        stage, name = k.split(".", 1)
        by_stage.setdefault(stage, {})[name] = v
    retrain = set(by_stage) | {d for s in by_stage for d in DEPENDENTS.get(s, ())}
    retrain &= set(METHODS[trial["method"]].stages)
    run = base.overlay(sweep_dir / TRAIN / digest, retrain)
    run.root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run.root) + ".lock"):
        ctx = RunContext(run=run, progress=False)
        for kind in TRAIN_STAGES:  # in pipeline order: generators before what depends on it
            if kind in retrain:
                cfg = stage_config(kind, base, trial["split"], trial["seed"], by_stage.get(kind, {}))
                module = importlib.import_module(f"pipelines.{kind}")
                train_stage(kind, module.train_one, cfg, ctx, only=[(trial["split"], trial["seed"])],
                            train_many=getattr(module, "train_many", None))
    return run


def run_trial(trial: dict) -> dict:
    """The trial's metrics: val_accuracy (choose settings here), test_accuracy (report only), task counts, seconds."""
    sweep_dir = Path(trial["sweep_dir"])
    done = sweep_dir / DONE / f"{trial['key']}.json"
    if done.exists():
        return {**{k: v for k, v in json.loads(done.read_text()).items() if k != TASKS}, "reused": 1}
    torch.set_num_threads(max(1, int(trial.get("threads", 1))))
    t0 = time.perf_counter()
    run = trained_run(trial, RunDir(Path(trial["run_dir"])), sweep_dir)
    models = trained_models(run, trial["split"], trial["seed"])
    data = models.data
    sampling = SamplingSettings(**{k: v for k, v in trial["params"].items() if k in fields(SamplingSettings)})
    out, per_task = {}, {}
    parts = {"val": (data.val, data.w_val), "test": (data.test, data.w_test)}
    for name, (part, w_experts) in parts.items():
        if part is None:  # a run made without a validation split: nothing to choose on
            out[f"{name}_accuracy"], out[f"n_{name}"] = float("nan"), 0
            continue
        acc = accuracy(trial["method"], models, part, w_experts, sampling)
        out[f"{name}_accuracy"], out[f"n_{name}"] = float(acc.mean()), int(part.batch.n)
        if name == "test":
            per_task = dict(zip(data.test_ids, acc.tolist()))
    out["trial_seconds"] = time.perf_counter() - t0
    write_json(done, {**out, TASKS: per_task})
    return {**out, "reused": 0}  # Tune gets the scalars; the per-task accuracies stay in the record


def per_task_table(sweep_dir: Path, keys: list[str]):
    """One row per (trial key, task) from the trials' done records; None when a record has none (an older sweep)."""
    import pandas as pd

    rows = []
    for key in keys:
        tasks = json.loads((sweep_dir / DONE / f"{key}.json").read_text()).get(TASKS)
        if not tasks:
            return None
        rows += [{"key": key, "task": t, "test_accuracy": a} for t, a in tasks.items()]
    return pd.DataFrame(rows)


def trial_fields(trial: dict) -> dict:
    """Flat params of a trial for tables and MLflow."""
    return {"method": trial["method"], "split": trial["split"], "seed": trial["seed"], **trial["params"],
            **{f"train.{k}": v for k, v in trial["train"].items()}}

