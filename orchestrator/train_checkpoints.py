"""Checkpoint folders of orchestrator.train: safetensors + JSON (no pickle), written by Ray Train or by the
warm worker group (orchestrator.train_pool) into the same run folder, `<run_dir>/ray_train/<name>/`.

Ray Train lists its checkpoints in its snapshot file; the warm group lists its own in WARM_INDEX. Both name a
folder `checkpoint_<date and time>`, so the newest of either kind is the one with the greatest name.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from orchestrator.storage.atomic import write_json

STATE_FILE = "state.safetensors"  # tensors only: no pickle anywhere in a checkpoint
CONFIG_FILE = "config.json"  # the loop's config, saved with every checkpoint
METRICS_FILE = "metrics.json"  # {"step", "latest", "history"}: history lets a resumed run keep its curve
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of its checkpoints in a run's folder
WARM_INDEX = "warm_checkpoints.json"  # the warm worker group's: its checkpoint folders, oldest first
KEEP_CHECKPOINTS = 2


def latest_checkpoint(run_path: Path) -> Path | None:
    """The newest checkpoint folder of one run (`<storage>/<name>`), whichever path wrote it: Ray Train lists
    its own in its snapshot file, the warm worker group in WARM_INDEX; both name them by the time they were made."""
    run_path = Path(run_path)
    names = []
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        snap = json.loads((run_path / RAY_SNAPSHOT).read_text())
        names.append(snap["latest_checkpoint_result"]["checkpoint_dir_name"])
    with contextlib.suppress(OSError, ValueError, IndexError):
        names.append(json.loads((run_path / WARM_INDEX).read_text())[-1])
    found = [run_path / n for n in names if (run_path / n / STATE_FILE).exists()]
    return max(found, key=lambda p: p.name.removeprefix("checkpoint_"), default=None)


def read_checkpoint(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(state, config, metrics.json) of a checkpoint folder written by `report`; no pickle involved."""
    ckpt_dir = Path(ckpt_dir)
    state = load_file(ckpt_dir / STATE_FILE)
    config = json.loads((ckpt_dir / CONFIG_FILE).read_text())
    saved = json.loads((ckpt_dir / METRICS_FILE).read_text())
    return state, config, saved


def write_checkpoint(d: Path, metrics: dict, state: dict[str, torch.Tensor], config: dict | None, history: list[dict]) -> None:
    """A checkpoint's three files in folder `d`; its step is `metrics["step"]` when given, else the reports so far."""
    step = int(metrics.get("step", len(history)))
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, str(d / STATE_FILE))
    write_json(d / CONFIG_FILE, config or {})
    write_json(d / METRICS_FILE, {"step": step, "latest": metrics, "history": history})


def save_warm_checkpoint(run_path: Path, metrics: dict, state: dict[str, torch.Tensor], config: dict | None,
                         history: list[dict]) -> None:
    """A checkpoint folder in `run_path` named as Ray Train names its own, made whole before it is listed in
    WARM_INDEX; the oldest beyond KEEP_CHECKPOINTS are removed."""
    run_path.mkdir(parents=True, exist_ok=True)
    name = "checkpoint_" + datetime.today().strftime("%Y-%m-%d_%H-%M-%S.%f")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=run_path))
    write_checkpoint(tmp, metrics, state, config, history)
    tmp.rename(run_path / name)
    index = run_path / WARM_INDEX
    names = json.loads(index.read_text()) if index.exists() else []
    names.append(name)
    write_json(index, names[-KEEP_CHECKPOINTS:])
    for old in names[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(run_path / old, ignore_errors=True)
