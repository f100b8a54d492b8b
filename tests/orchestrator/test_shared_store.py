"""One MLflow store for every run directory beside each other: where it is, that MLFLOW_TRACKING_URI still
wins, that a tracker leaves MLflow's process-wide URI as it found it, one tag format, and two pipelines
logging to a new shared SQLite store at the same moment: neither fails, no record is lost."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.tracking import MlflowTracker
from orchestrator.tracking.tags import flat_params, tag_value
from tests.conftest import ROOT

pytestmark = pytest.mark.mlflow


@pytest.fixture(autouse=True)
def own_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@dataclass(frozen=True)
class Inner:
    lr: float = 0.001


@dataclass(frozen=True)
class Cfg:
    steps: int = 3
    scale: float = 1.0
    splits: tuple = ("random", "compositional")
    maml: Inner = field(default_factory=Inner)


def test_one_tag_format_floats_keep_their_point():
    assert [tag_value(v) for v in (1.0, 0.0, 7.5, 1, "x", True, (0, 1.0))] == ["1.0", "0.0", "7.5", "1", "x", "true", "0,1.0"]
    assert flat_params(Cfg(), "fewshot.") == {"fewshot.steps": "3", "fewshot.scale": "1.0",
                                              "fewshot.splits": "random,compositional", "fewshot.maml.lr": "0.001"}


def test_default_store_is_beside_the_run_directories_and_the_environment_overrides_it(tmp_path, monkeypatch):
    import mlflow

    a, b = MlflowTracker(tmp_path / "a"), MlflowTracker(tmp_path / "b")
    assert a.uri == b.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    with a.pipeline("full"):
        assert mlflow.get_tracking_uri() == a.uri
    assert "MLFLOW_TRACKING_URI" not in os.environ, "the tracker left its URI in the environment"
    exp = MlflowClient(a.uri).get_experiment(a.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development", "the UI opens on model training"
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    other = f"sqlite:///{tmp_path / 'elsewhere' / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert MlflowTracker(tmp_path / "c").uri == other


WRITER = """
import sys
from dataclasses import dataclass
from pathlib import Path
from orchestrator.tracking import MlflowTracker

@dataclass(frozen=True)
class Cfg:
    steps: int = 3

run_dir, stages, batches = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
msgs = []
t = MlflowTracker(run_dir, log=msgs.append)
with t.pipeline("full", tags={"preset": "smoke"}, params={"experts.steps": "3"}):
    for s in range(stages):
        with t.stage(f"stage{s}", Cfg()):
            for b in range(batches):
                t.metrics({"m": b}, step=b)
            t.series({"loss": [(i, 1.0 / (i + 1)) for i in range(1500)]})
    t.metrics({"total": 1.0})
print("MESSAGES", msgs)
sys.exit(0 if t.online and not msgs else 3)
"""


@pytest.mark.slow
def test_two_pipelines_log_to_a_new_shared_store_at_once_and_lose_nothing(tmp_path):
    stages, batches = 3, 20
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / f"run{i}"), str(stages), str(batches)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (1, 2)]  # no store yet: both create it, its tables and the experiment at the same moment
    outs = [p.communicate(timeout=600) for p in procs]
    wall = time.perf_counter() - t0
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, (out, err[-3000:])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("weightgen")
    for i in (1, 2):
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.run_dir = '{tmp_path / f'run{i}'}'")
        by_name = {r.info.run_name: r for r in runs}
        assert sorted(by_name) == ["full"] + [f"stage{s}" for s in range(stages)]
        assert by_name["full"].data.params == {"experts.steps": "3"} and by_name["full"].data.metrics["total"] == 1.0
        for s in range(stages):
            r = by_name[f"stage{s}"]
            assert r.info.status == "FINISHED" and r.data.params == {"steps": "3"}
            assert [m.step for m in client.get_metric_history(r.info.run_id, "m")] == list(range(batches))
            assert len(client.get_metric_history(r.info.run_id, "loss")) == 1500
        assert not (tmp_path / f"run{i}" / "mlflow_pending" / "records.jsonl").exists(), "nothing left buffered"
    print(f"two concurrent writers: {wall:.1f} s")


def test_curves_logged_while_the_store_is_unreachable_are_replayed_whole(tmp_path, monkeypatch):
    from orchestrator.storage.rundir import RunDir
    from orchestrator.tracking.buffer import PendingLog
    from tests.pipelines.test_bad_input import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    run_dir = tmp_path / "run"
    t = MlflowTracker(run_dir, log=lambda m: None)
    curve = [(i, 1.0 / i) for i in range(1, 2501)]  # more than one log_batch's 1000 metrics
    with t.pipeline("full", params={f"experts.p{i}": str(i) for i in range(150)}):  # more than one batch's 100 params
        with t.stage("generators", Cfg()):
            t.series({"given-seed0/hnet_loss": curve})
    assert [r["op"] for r in PendingLog(RunDir(run_dir).mlflow_pending).records()].count("series") == 3
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert MlflowTracker(run_dir, log=lambda m: None).flush()  # back: the shared SQLite store beside the run
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("weightgen")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    got = client.get_metric_history(runs["generators"].info.run_id, "given-seed0/hnet_loss")
    assert sorted((m.step, m.value) for m in got) == curve
    assert len(runs["full"].data.params) == 150
