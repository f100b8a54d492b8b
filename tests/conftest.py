"""Shared fixtures: smoke-sized features built once with the real encoders, and helpers to run the CLI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_leaked_tracking_uri():
    """mlflow.set_tracking_uri (called by an in-process tracker) writes MLFLOW_TRACKING_URI into os.environ,
    which every later CLI subprocess would inherit: restore it after each test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread: on 2 busy cores a second intra-op thread only adds
    synchronisation (measured 5-30x slower). Modules opt in with usefixtures; the count is restored."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray (2 CPUs) for the module that asks for it, stopped at the module's end."""
    from orchestrator.cluster import connect, shutdown

    info = connect(num_cpus=2)
    yield info
    shutdown(info)


@pytest.fixture(scope="session")
def smoke_run_dir(tmp_path_factory) -> Path:
    """A run directory whose `features/` holds the smoke preset's features (24 procedural tasks)."""
    from pipelines.core.cli import RunContext
    from pipelines.core.config import build_config
    from pipelines import features

    run_dir = tmp_path_factory.mktemp("smoke")
    cfg = build_config(features.FeaturesConfig, features.PRESETS, "smoke", [])
    features.run(cfg, RunContext(run=run_dir, progress=False))
    return run_dir


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`python -m pipelines.full --preset smoke` run once per session: (run directory, its finished process).

    Tests that change the run work on a copy (`copy_run`)."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    # ~4 min on an idle 2-core machine; the limit leaves room for a loaded one
    r = run_cli("pipelines.full", "--preset", "smoke", "--run-dir", str(run_dir), "--no-progress", timeout=1500)
    return run_dir, r


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a trained run without its sweeps (the copy logs to the MLflow store beside its new place)."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("mlflow_pending", "sweeps"))
    return dst


@pytest.fixture
def run_dir_with_features(smoke_run_dir, tmp_path) -> Path:
    """A fresh run directory with a copy of the smoke features."""
    dst = tmp_path / "run"
    shutil.copytree(smoke_run_dir / "features", dst / "features")
    return dst


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m <args>` from the repo root, capturing output."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def zs_run_dir(smoke_run_dir, tmp_path_factory):
    """A run directory with the smoke features and one expert per task (trained here, without Ray)."""
    from dataclasses import asdict

    import pandas as pd
    import torch

    from models.expert_training import evaluate_experts, train_experts
    from models.task_net import TaskNetSpec, WeightLayout, init_weights
    from orchestrator.storage.store import WeightStore
    from orchestrator.storage.suite_features import SuiteFeatures
    from orchestrator.storage.suite_features import task_batch

    run_dir = tmp_path_factory.mktemp("zs") / "run"
    shutil.copytree(smoke_run_dir / "features", run_dir / "features")
    feats = SuiteFeatures.load(run_dir / "features")
    spec = TaskNetSpec(d_img=feats.d_img, d_txt=feats.d_txt)
    layout = WeightLayout(spec)
    X, T = torch.tensor(feats.image_feats), torch.tensor(feats.text_feats)
    rows = list(feats.tasks.itertuples())
    b = task_batch(rows, T)
    w0 = init_weights(spec, 0).expand(b.n, -1)
    (_, w), = train_experts(layout, X, b, w0, steps=100, lr=1e-3)
    q_acc, _ = evaluate_experts(layout, X, w, b.prompts, b.answer_mask, b.query_idx, b.query_lab, b.query_n)
    meta = pd.DataFrame([dict(
        task_id=r.id, description=r.description, split=r.split, seed=0, step=100, final=True, layout_id=layout.id,
        support_acc=1.0, support_loss=0.0, query_acc=float(a), query_loss=0.0, config_hash="test",
    ) for r, a in zip(rows, q_acc)])
    store = WeightStore(run_dir / "store" / "weights")
    store.write_shard("shard-00000-test", meta, w.numpy(), {})
    store.set_info(layout_id=layout.id, n_weights=layout.size, spec=asdict(spec))
    return run_dir
