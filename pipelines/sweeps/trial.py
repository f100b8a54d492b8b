"""One sweep trial: weights from one method at one setting, scored on the validation and meta-test tasks.

A trial with training overrides first trains its own models (Ray Train, in a folder shared by every
trial with the same overrides, under a file lock so that each is trained once), then evaluates.
A finished trial writes `done/<key>.json`; a rerun of the same trial (after a driver was killed
between the trial's end and Tune's next state save) returns that record instead of recomputing.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from pathlib import Path

import torch

from orchestrator.storage.atomic import write_json
from pipelines.sweeps.spec import STAGES_OF, TRAIN_STAGES, family

DONE = "done"
TRAIN = "train"
DEPENDENTS = {"generators": ("hyperclip", "hyperldm")}  # retraining generators changes the routes these use
_data: dict = {}  # (run_dir, split) -> SplitData, per trial process (Tune reuses actors)


def _split(run_dir: Path, split: str):
    from pipelines.zeroshot.data import load_split

    key = (str(run_dir), split)
    if key not in _data:
        _data.clear()  # one split in memory at a time
        _data[key] = load_split(run_dir, split)
    return _data[key]


def stage_config(kind: str, base_dir: Path, split: str, seed: int, overrides: dict):
    """The config `kind` was trained with in the base run, with `overrides` ({field: value}) applied."""
    from pipelines.core.cli import coerce_field
    from pipelines.zeroshot.data import model_path
    from pipelines.zeroshot.launch import config_from

    module = importlib.import_module(f"pipelines.{kind}")
    side = json.loads(model_path(base_dir, kind, split, seed).with_suffix(".json").read_text())
    values = dict(side["stage_config"])
    for k, v in overrides.items():
        values[k] = coerce_field(module.CONFIG, k, ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
    return config_from(module, values)


def trained_run(trial: dict, base_dir: Path, sweep_dir: Path) -> Path:
    """A run folder whose models reflect the trial's training overrides (the base run when there are none)."""
    if not trial["train"]:
        return base_dir
    from filelock import FileLock

    from pipelines.core.cli import RunContext
    from pipelines.zeroshot.launch import train_stage

    digest = hashlib.sha256(json.dumps(trial["train"], sort_keys=True).encode()).hexdigest()[:12]
    run_dir = (sweep_dir / TRAIN / digest).resolve()
    by_stage: dict[str, dict] = {}
    for k, v in trial["train"].items():
        stage, name = k.split(".", 1)
        by_stage.setdefault(stage, {})[name] = v
    retrain = set(by_stage) | {d for s in by_stage for d in DEPENDENTS.get(s, ())}
    retrain &= set(STAGES_OF[family(trial["method"])])
    run_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run_dir) + ".lock"):
        for name in ("features", "store"):
            if not (run_dir / name).exists():
                os.symlink(base_dir / name, run_dir / name)
        (run_dir / "models").mkdir(exist_ok=True)
        if not (run_dir / "models" / "plan.json").exists():
            write_json(run_dir / "models" / "plan.json", json.loads((base_dir / "models" / "plan.json").read_text()))
        for kind in TRAIN_STAGES:
            if kind not in retrain and not (run_dir / "models" / kind).exists():
                os.symlink(base_dir / "models" / kind, run_dir / "models" / kind)
        ctx = RunContext(run_dir=run_dir, progress=False)
        for kind in TRAIN_STAGES:  # in pipeline order: generators before what depends on it
            if kind in retrain:
                cfg = stage_config(kind, base_dir, trial["split"], trial["seed"], by_stage.get(kind, {}))
                train_stage(f"pipelines.{kind}", kind, cfg, ctx, only=[(trial["split"], trial["seed"])])
    return run_dir


def method_weights(method: str, data, part, w_experts, seed: int, params: dict) -> torch.Tensor:
    """Raw weights [B, P] of `method` for the tasks of `part` (validation or meta-test)."""
    from pipelines.zeroshot.trained import Sampling, generate

    if method == "oracle":
        return w_experts
    s = Sampling(**{k: params[k] for k in ("guidance_steps", "guidance_lr", "guidance_l2", "sampler", "sampler_steps") if k in params})
    return generate(method, data, seed, part.c, s, gamma=float(params.get("guidance_scale", 1.0)))


def run_trial(trial: dict) -> dict:
    """The trial's metrics: val_accuracy (choose settings here), test_accuracy (report only), task counts, seconds."""
    from models.zeroshot.training import chance_accuracy, task_accuracy

    sweep_dir = Path(trial["sweep_dir"])
    done = sweep_dir / DONE / f"{trial['key']}.json"
    if done.exists():
        return {**json.loads(done.read_text()), "reused": 1}
    torch.set_num_threads(max(1, int(trial.get("threads", 1))))
    t0 = time.perf_counter()
    run_dir = trained_run(trial, Path(trial["run_dir"]), sweep_dir)
    data = _split(run_dir, trial["split"])
    out = {}
    parts = {"val": (data.val, data.w_val), "test": (data.test, data.w_test)}
    for name, (part, w_experts) in parts.items():
        if part is None:  # a run made without a validation split: nothing to choose on
            out[f"{name}_accuracy"], out[f"n_{name}"] = float("nan"), 0
            continue
        if trial["method"] == "chance":
            acc = chance_accuracy(part)
        else:
            w = method_weights(trial["method"], data, part, w_experts, trial["seed"], trial["params"])
            acc = task_accuracy(part, w.detach())
        out[f"{name}_accuracy"], out[f"n_{name}"] = float(acc.mean()), int(part.batch.n)
    out["trial_seconds"] = time.perf_counter() - t0
    write_json(done, out)
    return {**out, "reused": 0}


def trial_fields(trial: dict) -> dict:
    """Flat params of a trial for tables and MLflow."""
    return {"method": trial["method"], "split": trial["split"], "seed": trial["seed"], **trial["params"],
            **{f"train.{k}": v for k, v in trial["train"].items()}}

