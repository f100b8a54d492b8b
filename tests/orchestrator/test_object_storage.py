"""Run directories on object storage, against a real S3-compatible server (moto's) on 127.0.0.1.

The pipeline runs on `s3://`, a farm whose driver is SIGKILLed resumes there and ends byte-identical to
an uninterrupted local run, and a missing bucket or refused credentials stop before any work.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

BUCKET = "weightgen-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port, one bucket, and the AWS_* variables every process here
    (and the CLI subprocesses and Ray workers they start) reads; the working copies go to a temporary cache."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "WEIGHTGEN_CACHE": str(tmp_path_factory.mktemp("cache"))}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client, env
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def keys(client, prefix: str) -> dict[str, bytes]:
    """{key: object bytes} under `prefix` (directory markers left out)."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            if not o["Key"].endswith("/"):
                out[o["Key"]] = client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
    return out


def seed_features(client, smoke_run_dir: Path, run: str) -> None:
    """Put the session's smoke features under the run on the bucket (the stage then reuses them, as on a rerun)."""
    for f in (smoke_run_dir / "features").rglob("*"):
        if f.is_file():
            client.put_object(Bucket=BUCKET, Key=f"{run}/features/{f.relative_to(smoke_run_dir / 'features').as_posix()}",
                              Body=f.read_bytes())


def test_writes_are_put_to_the_store_and_the_store_is_the_run(s3, tmp_path):
    """Atomic writes in a mirrored folder become objects; a fresh working copy is made equal to the store:
    a file that never reached the store (left by a crash) is removed, a missing one fetched."""
    from orchestrator.storage import remote
    from orchestrator.storage.atomic import write_json
    from orchestrator.storage.rundir import RunDir

    client, _ = s3
    run = RunDir.at(f"s3://{BUCKET}/unit/run")
    write_json(run.plan, {"pairs": [1]})
    assert json.loads(keys(client, "unit/run")["unit/run/models/plan.json"]) == {"pairs": [1]}
    assert RunDir.from_dict(run.to_dict()).uri == run.uri and run.mlflow_artifacts_uri == f"s3://{BUCKET}/unit/mlartifacts"
    (run.root / "results").mkdir(parents=True)
    (run.root / "results" / "orphan.csv").write_text("never put\n")
    run.plan.unlink()
    assert remote.sync_down(run.root) == 1
    assert run.plan.exists() and not (run.root / "results" / "orphan.csv").exists()
    (run.root / "results" / "figure.png").write_bytes(b"\x89PNG")  # a writer outside atomic_path: put at stage end
    assert remote.sync_up(run.root) == 1 and keys(client, "unit/run/results") == {"unit/run/results/figure.png": b"\x89PNG"}
    assert remote.sync_up(run.root) == 0  # in sync: nothing put twice
    from orchestrator.storage.atomic import atomic_dir

    for names in (("a.parquet", "info.json"), ("a.parquet",)):  # a folder replaced whole: its old objects go too
        with atomic_dir(run.features) as tmp:
            for name in names:
                (tmp / name).write_text(name)
    assert set(keys(client, "unit/run/features/")) == {"unit/run/features/a.parquet"}


@pytest.mark.ray
@pytest.mark.mlflow
@pytest.mark.slow
def test_smoke_pipeline_runs_on_s3(s3, smoke_run_dir):
    client, env = s3
    run = "runs/smoke"
    seed_features(client, smoke_run_dir, run)
    r = run_cli("pipelines.full", "--preset", "smoke", "--run-dir", f"s3://{BUCKET}/{run}", "--no-progress",
                "--address", "local", timeout=1500, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"run directory: s3://{BUCKET}/{run}" in r.stderr
    objects = keys(client, run)
    manifest = json.loads(objects[f"{run}/store/weights/manifest.json"])
    assert sum(s["rows"] for s in manifest["shards"].values()) == 24
    import hashlib

    for shard, entry in manifest["shards"].items():  # every committed shard is a whole object with the committed bytes
        assert hashlib.sha256(objects[f"{run}/store/weights/{shard}.parquet"]).hexdigest() == entry["file_sha256"]
    models = [k for k in objects if k.startswith(f"{run}/models/") and k.endswith(".safetensors")]
    assert {k.split("/")[3] for k in models} >= {"generators", "hyperclip", "hyperldm"}, models
    assert f"{run}/models/plan.json" in objects and f"{run}/results/zero_shot.csv" in objects
    assert objects[f"{run}/results/zero_shot.png"][:4] == b"\x89PNG"  # written outside the atomic writers
    assert any(k.startswith(f"{run}/ray_train/") for k in objects), "Ray Train's checkpoints live on the store"
    assert json.loads(objects[f"{run}/timings.json"])["total_s"] > 0
    assert f"{run}/logs/driver.log" in objects
    artifacts = keys(client, "runs/mlartifacts/")
    assert any(k.endswith("/artifacts/manifest.json") for k in artifacts), sorted(artifacts)[:20]
    assert any(k.endswith("/zero_shot.csv") for k in artifacts)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_farm_driver_resumes_on_s3_identical_to_an_uninterrupted_local_run(s3, smoke_run_dir, tmp_path, ray_cluster):
    """SIGKILL `python -m pipelines.experts --run-dir s3://...` mid-farm; the same command on a fresh
    working copy (another machine, as far as the run knows) resumes from the store's manifest and ends with
    every shard byte-identical to an uninterrupted run in a local folder."""
    import ray

    client, env = s3
    run = "runs/killed"
    seed_features(client, smoke_run_dir, run)
    args = ["pipelines.experts", "--preset", "smoke", "--no-progress", "--address", ray.get_runtime_context().gcs_address,
            "--set", "shard_size=2", "--set", "steps=200"]
    proc = subprocess.Popen([sys.executable, "-m", *args, "--run-dir", f"s3://{BUCKET}/{run}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, **env})

    def committed() -> dict:
        body = keys(client, f"{run}/store/weights/manifest.json").get(f"{run}/store/weights/manifest.json")
        return json.loads(body)["shards"] if body else {}

    deadline = time.time() + 300
    while time.time() < deadline and len(committed()) < 2 and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = committed()
    assert 2 <= len(done_before) < 12, f"kill landed at {len(done_before)} of 12 shards"
    import shutil

    from orchestrator.storage.remote import working_copy

    shutil.rmtree(working_copy(f"s3://{BUCKET}/{run}"))  # resume from the store alone
    r = run_cli(*args, "--run-dir", f"s3://{BUCKET}/{run}", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(done_before)} already in the store, {12 - len(done_before)} to train" in r.stderr
    local = tmp_path / "clean"
    shutil.copytree(smoke_run_dir / "features", local / "features")
    r = run_cli(*args, "--run-dir", str(local))
    assert r.returncode == 0, r.stderr[-3000:]
    on_s3 = json.loads(keys(client, f"{run}/store/weights/manifest.json")[f"{run}/store/weights/manifest.json"])
    clean = json.loads((local / "store" / "weights" / "manifest.json").read_text())
    assert {s: e["file_sha256"] for s, e in on_s3["shards"].items()} == {s: e["file_sha256"] for s, e in clean["shards"].items()}
    objects = keys(client, f"{run}/store/weights/")
    assert sorted(k.rsplit("/", 1)[1] for k in objects if k.endswith(".parquet")) == sorted(f"{s}.parquet" for s in clean["shards"])


@pytest.mark.slow
def test_missing_bucket_and_refused_credentials_stop_before_any_work(s3, tmp_path):
    """One `error:` line and exit 2, before Ray starts or anything is written (locally or on the store)."""
    import requests

    client, env = s3
    cache = Path(env["WEIGHTGEN_CACHE"]) / "runs" / "s3"
    before_local = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) if cache.exists() else []
    before = set(keys(client, ""))

    def fails(uri: str, **more) -> str:
        r = run_cli("pipelines.full", "--preset", "smoke", "--run-dir", uri, "--no-progress", env={**env, **more}, timeout=300)
        assert r.returncode == 2, r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --run-dir "), r.stderr[-2000:]
        return lines[0]

    line = fails("s3://no-such-bucket/runs/x")
    assert "bucket 'no-such-bucket' does not exist" in line and env["AWS_ENDPOINT_URL"] in line
    reset = f"{env['AWS_ENDPOINT_URL']}/moto-api/reset-auth"
    requests.post(reset, data=b"0", timeout=10).raise_for_status()  # from now on moto checks every request's credentials
    try:
        line = fails(f"s3://{BUCKET}/runs/refused", AWS_ACCESS_KEY_ID="AKIAWRONG", AWS_SECRET_ACCESS_KEY="wrong")
    finally:
        requests.post(reset, data=b"inf", timeout=10).raise_for_status()
    assert "refused the credentials" in line and "AWS_ACCESS_KEY_ID" in line
    after_local = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) if cache.exists() else []
    assert after_local == before_local and set(keys(client, "")) == before
