"""Monitoring as a user meets it, on one private Ray: the dashboard needs the token (and a run says where
it is), a private Ray is never joined by another run, and the metrics are real: a real Prometheus with
Ray's generated scrape configuration scrapes a smoke farm and a Ray Train job, the counts equal the
store's, every metric the Grafana dashboard queries is there, and docs/monitoring.md documents each exactly
(names, labels) as scraped."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]

import ray.cloudpickle

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the toy loop below runs on Ray Train workers

RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId",
              "otel_scope_name", "otel_scope_schema_url", "otel_scope_version"}
EMPTY_LABELS = {"otel_scope_schema_url", "otel_scope_version"}  # always "": Prometheus does not store them
PROMETHEUS_LABELS = {"__name__", "instance", "job"}


@pytest.fixture(scope="module")
def private_ray(tmp_path_factory):
    """A private Ray as a run starts it, with its logs folder (where ray.json names the session)."""
    from orchestrator.cluster import connect, shutdown

    logs = tmp_path_factory.mktemp("monitored") / "logs"
    info = connect(num_cpus=2, log_dir=logs)
    assert info.how == "private" and info.started_here and info.address.startswith("127.0.0.1:")
    yield info
    shutdown(info)


def get(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_dashboard_actor_listing_needs_the_token_the_run_points_to(private_ray):
    from orchestrator.cluster import dashboard_hint, read_token, token_file

    url = f"{private_ray.dashboard_url}/api/v0/actors?limit=100"
    status, body = get(url)
    assert status == 401, (status, body[:300])
    status, body = get(url, read_token())
    assert status == 200, (status, body[:300])
    assert json.loads(body)["result"] is True
    # the step a run prints beside the URL names where the token is
    assert token_file() in dashboard_hint() and "ray get-auth-token" in dashboard_hint()
    assert any(private_ray.dashboard_url in line and dashboard_hint() in line for line in private_ray.describe())


def find_from(root: str) -> str:
    """What another run on this machine finds with RAY_TMPDIR pointing at `root`."""
    code = "from orchestrator.cluster import find_running_cluster; print(find_running_cluster())"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_TMPDIR=root, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def test_a_private_ray_is_never_joined(private_ray):
    from orchestrator.cluster import ADDRESS_FILE, PRIVATE_MARKER

    temp = Path(private_ray.private_root, "ray")
    assert (temp / ADDRESS_FILE).read_text() == private_ray.address  # recorded, for Ray's helpers inside it
    assert find_from(private_ray.private_root) == "None"
    marker = temp / PRIVATE_MARKER
    saved = marker.read_text()
    marker.unlink()
    try:  # the marker is what tells it apart: without it the same folder leads to the cluster
        assert find_from(private_ray.private_root) == private_ray.address
    finally:
        marker.write_text(saved)


def progress_loop(config: dict) -> None:
    """A Ray Train loop that reports its steps and loss like the pipeline's stages."""
    from orchestrator import train

    for step in range(1, config["steps"] + 1):
        train.progress(f"toy/s{train.rank()}", step, config["steps"], loss=1.0 / step)
        time.sleep(0.05)


def readme_metrics() -> dict[str, set[str]]:
    """The monitoring page's metric table: exported name -> the labels it documents (Ray's own listed once, below it)."""
    text = (ROOT / "docs" / "monitoring.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(ray_[a-z_]+)` \|[^|]*\|[^|]*\| ([^|]*)\|", section, re.MULTILINE)
    return {name: set(re.findall(r"`([A-Za-z_]+)`", labels)) for name, labels in rows}


def raw_scrape(session: dict) -> dict[str, set[str]]:
    """Exported name -> label names, read straight from the metrics endpoints Ray lists for Prometheus."""
    sd = Path(session["session_dir"]) / "prom_metrics_service_discovery.json"
    out: dict[str, set[str]] = {}
    for target in json.loads(sd.read_text())[0]["targets"]:
        try:
            with urllib.request.urlopen(f"http://{target}/metrics", timeout=30) as r:
                text = r.read().decode()
        except OSError:
            continue
        for name, labels in re.findall(r"^(ray_(?:farm|train)_[a-z_]+)\{(.*)\} ", text, re.MULTILINE):
            out[name] = set(re.findall(r'(\w+)="', labels))
    return out


def test_prometheus_scrapes_metrics_that_agree_with_the_store(private_ray, run_dir_with_features, tmp_path):
    from orchestrator import train
    from orchestrator.farm import run_farm
    from orchestrator.metrics import FARM, TRAIN, exported
    from orchestrator.monitor import (
        DASHBOARD,
        MonitorError,
        install_prometheus,
        query,
        read_session,
        start_prometheus,
        wait_ready,
        write_config,
    )
    from orchestrator.storage.store import WeightStore
    from orchestrator.storage.suite_features import SuiteFeatures
    from pipelines import experts
    from pipelines.core.config import build_config
    from tests.orchestrator.multinode import free_port

    try:
        binary = install_prometheus(log=lambda m: None)
    except MonitorError as e:
        pytest.skip(f"no Prometheus on this machine and it cannot be installed here: {e}")

    feats = SuiteFeatures.load(run_dir_with_features / "features")
    store = WeightStore(run_dir_with_features / "store" / "weights")
    cfg = build_config(experts.ExpertsConfig, experts.PRESETS, "smoke", ["shard_size=4", "steps=100"])
    summary = run_farm(feats, cfg, store, progress=False, log=lambda m: None)
    assert summary.experts_trained == 24 and summary.shards_trained == 6
    train.launch(progress_loop, {"steps": 40}, name="toy-metrics", run_dir=tmp_path / "t", num_workers=1,
                 stage="toytrain", progress_total=40, log=lambda m: None)

    session = read_session(private_ray.log_dir.parent)
    assert session is not None, "the run's logs/ray.json names a live session with Ray's prometheus.yml"
    config = write_config(session, tmp_path / "prom" / "prometheus.yml")
    assert "prom_metrics_service_discovery.json" in config.read_text()  # Ray's own scrape configuration
    port = free_port()
    proc = start_prometheus(binary, config, tmp_path / "prom" / "data", port)
    try:
        wait_ready(port, proc)
        rows = len(store.read_meta())
        shard_seconds = sum(e["seconds"] for e in store.manifest()["shards"].values())
        run = run_dir_with_features.name
        deadline, got = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            res = query(port, f'sum(ray_farm_experts_trained_total{{run="{run}"}})')
            got = float(res[0]["value"][1]) if res else None
            # the driver's gauges (ETA) are exported apart from the workers' metrics: wait for both kinds
            if got == rows and query(port, 'ray_train_loss{stage="toytrain"}') and query(port, "ray_train_eta_seconds"):
                break
            time.sleep(3)
        assert got == rows == 24, f"PromQL over Prometheus's scrape: {got} experts, the store holds {rows}"
        # the shard-time histogram agrees with the shards' measured wall times: every bucket holds exactly the
        # shards the manifest says; the exact total is farm_busy_seconds (Ray's _sum is from bucket midpoints)
        measured = [e["seconds"] for e in store.manifest()["shards"].values()]
        for s in query(port, f'sum by (le) (ray_farm_shard_seconds_bucket{{run="{run}"}})'):
            le = float(s["metric"]["le"])
            assert float(s["value"][1]) == sum(x <= le for x in measured), (le, s["value"], measured)
        count = float(query(port, f'sum(ray_farm_shard_seconds_count{{run="{run}"}})')[0]["value"][1])
        busy = float(query(port, f'sum(ray_farm_busy_seconds_total{{run="{run}"}})')[0]["value"][1])
        assert count == len(measured) == 6 and busy == pytest.approx(shard_seconds, rel=1e-6), (count, busy, shard_seconds)

        # every metric the Grafana dashboard queries is in the scrape
        queried = set(re.findall(r"\bray_(?:farm|train)_[a-z_]+", DASHBOARD.read_text()))
        assert len(queried) >= 10
        missing = [m for m in sorted(queried) if not query(port, f'count({{__name__="{m}"}})')]
        assert not missing, f"queried by configs/grafana/weightgen.json but not scraped: {missing}"

        # docs/monitoring.md documents each metric's exported name and labels exactly as scraped
        documented = readme_metrics()
        recorded = {n for name, (kind, _, _) in {**FARM, **TRAIN}.items() for n in exported(name, kind)}
        assert set(documented) == recorded, (sorted(documented), sorted(recorded))
        raw = raw_scrape(session)
        for name, labels in documented.items():
            series = query(port, f'{name}{{run=~"{run}|t"}}')
            assert series, f"{name} is documented but not scraped"
            seen = set(series[0]["metric"]) - PROMETHEUS_LABELS
            assert seen == labels | RAY_LABELS - EMPTY_LABELS, f"{name}: stored labels {sorted(seen)}, docs {sorted(labels)}"
            if name in raw or name.startswith("ray_farm_"):  # a finished Ray Train worker's gauges have left the endpoint
                assert raw.get(name) == labels | RAY_LABELS, f"{name}: scraped labels {sorted(raw.get(name, []))}"
        # the labels say who did the work: actor names, the nodes' ids, the stage
        actors = {s["metric"]["actor"] for s in query(port, f'ray_farm_experts_trained_total{{run="{run}"}}')}
        assert actors <= {"farm-worker-0", "farm-worker-1"} and actors, actors
        assert {s["metric"]["stage"] for s in query(port, "ray_train_step")} == {"toytrain"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
