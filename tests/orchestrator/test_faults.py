"""Faults injected for real, on a Ray head plus two worker nodes on this machine:

- a farm actor killed mid-shard (`ray.kill` of `farm-worker-0`), then a damaged store (NaN weights
  with valid checksums, a truncated shard, a deleted one) repaired by rerunning the farm;
- a whole worker node killed mid-farm (its raylet and workers SIGKILLed);
- the MLflow tracking server (a real `mlflow server` on 127.0.0.1) stopped mid-run by its pid
  (runs started while it is down, and replays cut short: tests/orchestrator/test_tracking.py).

Each ends with every expert present exactly once, every checksum valid and the weights bit-identical
to an uninterrupted single-process run with the same seeds. A driver SIGKILLed mid-farm is
tests/orchestrator/test_farm.py::test_killed_driver_resumes_with_only_missing_shards.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.storage.store import MANIFEST, WeightStore, file_sha256, weights_checksum
from orchestrator.storage.atomic import write_json
from pipelines import experts
from pipelines.core.config import build_config
from tests.conftest import ROOT, run_cli
from tests.orchestrator.multinode import assert_store_matches, loopback_cluster, reference_weights

pytestmark = [pytest.mark.ray, pytest.mark.slow]

FARM = ["shard_size=2", "steps=200", "num_actors=2"]  # 12 shards of about a second each: room to strike mid-farm


@pytest.fixture(scope="module")
def cluster():
    with loopback_cluster(workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def expected(smoke_run_dir):
    from orchestrator.storage.suite_features import SuiteFeatures

    return reference_weights(SuiteFeatures.load(smoke_run_dir / "features"), farm_cfg())


def farm_cfg():
    return build_config(experts.ExpertsConfig, experts.PRESETS, "smoke", FARM)


def strike_after(store: WeightStore, shards: int, action) -> threading.Thread:
    """Run `action` from another thread once `shards` shards are in the store (so the farm is mid-run)."""
    def watch():
        deadline = time.time() + 300
        while time.time() < deadline and len(store.completed_shards()) < shards:
            time.sleep(0.05)
        action()

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def farm(run_dir, logs: list[str]):
    from orchestrator.farm import run_farm
    from orchestrator.storage.suite_features import SuiteFeatures

    store = WeightStore(run_dir / "store" / "weights")
    return store, run_farm(SuiteFeatures.load(run_dir / "features"), farm_cfg(), store, progress=False, log=logs.append)


def poison_with_nan(store: WeightStore, sid: str) -> None:
    """NaN/inf in a shard whose row checksums and manifest sha256 were made to match (as another tool might)."""
    path = store.root / f"{sid}.parquet"
    t = pq.read_table(path)
    w = np.stack(t.column("w").to_numpy(zero_copy_only=False)).astype(np.float32)
    w[0, 3], w[-1, -1] = np.nan, np.inf
    from orchestrator.storage.arrow_vectors import to_column

    t = t.set_column(t.schema.get_field_index("w"), t.schema.field("w"), to_column(w))
    t = t.set_column(t.schema.get_field_index("checksum"), "checksum", pa.array([weights_checksum(r) for r in w]))
    pq.write_table(t, path)
    man = store.manifest()
    man["shards"][sid]["file_sha256"] = file_sha256(path)
    write_json(store.root / MANIFEST, man)


def test_actor_killed_mid_shard_then_damaged_store_repaired(cluster, run_dir_with_features, expected):
    import ray

    logs: list[str] = []
    store = WeightStore(run_dir_with_features / "store" / "weights")
    killed = []
    strike_after(store, 1, lambda: killed.append(ray.kill(ray.get_actor("farm-worker-0")) or time.time()))
    _, summary = farm(run_dir_with_features, logs)
    assert killed, "the kill never happened"
    assert any("actor slot 0 died" in m for m in logs), logs
    assert summary.experts_trained == 24
    assert_store_matches(store, expected)

    # the same store, damaged three ways; rerunning retrains exactly those shards
    nan_sid, cut_sid, gone_sid = store.completed_shards()[2:5]
    poison_with_nan(store, nan_sid)
    cut = store.root / f"{cut_sid}.parquet"
    cut.write_bytes(cut.read_bytes()[:300])
    (store.root / f"{gone_sid}.parquet").unlink()
    logs.clear()
    _, repaired = farm(run_dir_with_features, logs)
    assert sorted(repaired.shards_redone) == sorted([nan_sid, cut_sid, gone_sid]) and repaired.shards_trained == 3
    reasons = "\n".join(m for m in logs if "retraining" in m)
    assert "NaN/inf" in reasons and "sha256" in reasons and "missing" in reasons, reasons
    assert_store_matches(store, expected)


def test_worker_node_killed_mid_farm(cluster, run_dir_with_features, expected):
    logs: list[str] = []
    store = WeightStore(run_dir_with_features / "store" / "weights")
    victim = sorted(cluster.worker_nodes, key=lambda n: n.node_id)[0]
    strike_after(store, 2, lambda: cluster.remove_node(victim, allow_graceful=False))
    try:
        _, summary = farm(run_dir_with_features, logs)
    finally:
        cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20)  # as an autoscaler would, for the next test
    assert victim not in cluster.worker_nodes, "the node kill never happened"
    assert any("died" in m or "lost" in m for m in logs), logs
    assert summary.experts_trained == 24
    assert_store_matches(store, expected)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (SQLite + served artifacts); started and stopped by its pid."""

    def __init__(self, root, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
             str(self.root / "artifacts"), "--workers", "1"],
            cwd=self.root, stdout=subprocess.DEVNULL, stderr=open(self.root / "server.log", "a"), start_new_session=True,
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own process group: the server and its uvicorn worker
            self.proc.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    from tests.pipelines.test_bad_input import free_port

    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow", free_port())
    server.start()
    yield server
    server.stop()


@pytest.mark.mlflow
def test_mlflow_server_down_mid_run_loses_nothing(cluster, run_dir_with_features, expected, mlflow_server, tmp_path):
    run = run_dir_with_features
    store = WeightStore(run / "store" / "weights")
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    args = ["pipelines.experts", "--preset", "smoke", "--run-dir", str(run), "--no-progress", "--address", cluster.address]
    proc = subprocess.Popen([sys.executable, "-m", *args, *sum((["--set", f] for f in FARM), [])], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    strike_after(store, 1, mlflow_server.stop).join()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"MLflow at {mlflow_server.uri} is unreachable" in err and "mlflow_pending" in err, err[-3000:]
    assert "still unreachable" in err and "orchestrator.tracking replay" in err
    assert_store_matches(store, expected)

    mlflow_server.start()  # back, with the same store
    r = run_cli("orchestrator.tracking", "replay", str(run), env=env)
    assert r.returncode == 0 and "sent" in r.stderr, r.stderr[-3000:]
    assert not (run / "mlflow_pending" / "records.jsonl").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("weightgen")
    runs = {(x.info.run_name, x.data.tags.get("mlflow.parentRunId") is None): x for x in client.search_runs([exp.experiment_id])}
    assert len(runs) == 2, sorted(runs)  # the parent and the stage's child run, each once
    for x in runs.values():
        assert x.info.status == "FINISHED", (x.info.run_name, x.info.status)
    child = runs[("experts", False)]
    assert child.data.tags["mlflow.parentRunId"] == runs[("experts", True)].info.run_id
    assert child.data.metrics["experts_trained"] == 24 and child.data.params["steps"] == "200"
    assert {"manifest.json", "config.json"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
    logged = client.download_artifacts(child.info.run_id, "manifest.json", str(tmp_path))
    assert json.loads(open(logged).read())["shards"] == store.manifest()["shards"], "the manifest as it was at the end"


TRAIN_DRIVER = """
import json, sys
from safetensors.torch import save_file
from orchestrator import train
from orchestrator.cluster import connect
from tests.orchestrator.test_train import toy_loop  # registers the toy's module to be shipped by value
address, cfg, run_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
connect(address)
run = train.launch(toy_loop, cfg, name="toy-sigkill", run_dir=run_dir, num_workers=2)
save_file(run.state, f"{run_dir}/final.safetensors")
print(json.dumps([m["restored_from"] for m in run.metrics]))
"""


def test_driver_sigkilled_mid_training_resumes_from_checkpoint(cluster, tmp_path):
    """A real driver process SIGKILLed while its 2-worker Ray Train job runs; the same command again
    restores the latest checkpoint and ends where an uninterrupted run ends."""
    from safetensors.torch import load_file

    from tests.orchestrator.test_train import BASE, reference

    cfg = {**BASE, "steps": 24, "ckpt_every": 4}
    argv = [sys.executable, "-c", TRAIN_DRIVER, cluster.address, json.dumps(cfg), str(tmp_path)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    ckpts = tmp_path / "ray_train" / "toy-sigkill"
    deadline = time.time() + 240
    # a checkpoint counts once the controller has registered it in its snapshot (it polls every ~2 s);
    # a folder that is only uploaded is, rightly, not resumed from
    while time.time() < deadline and not (ckpts / "checkpoint_manager_snapshot.json").exists() and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started in its own session
    proc.wait()
    assert not (tmp_path / "final.safetensors").exists(), "the kill came too late: training had finished"
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    restored = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(restored) == 24 and max(restored) >= 4 and max(restored) % 4 == 0, restored
    _, ref = reference(cfg)
    got = load_file(str(tmp_path / "final.safetensors"))
    assert set(got) == set(ref) and max(float((got[k] - ref[k]).abs().max()) for k in ref) < 1e-6
