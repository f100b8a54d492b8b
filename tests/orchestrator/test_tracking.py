"""The tracker's outage buffer without a server: everything logged while MLflow is unreachable is kept
on disk and replayed in order, exactly once, even when a replay is itself cut short.
(The same with a real `mlflow server` killed mid-run: tests/orchestrator/test_faults.py.)
Also: both trackers satisfy the `Tracker` protocol, and `NoopTracker` records nothing."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.tracking import MlflowTracker, NoopTracker, Tracker
from orchestrator.tracking import tracker as tracking
from orchestrator.storage.rundir import RunDir
from orchestrator.tracking.buffer import PendingLog

pytestmark = pytest.mark.mlflow


@dataclass(frozen=True)
class Cfg:
    steps: int = 3
    name: str = "x"


@pytest.fixture(autouse=True)
def own_tracking_uri(monkeypatch):
    """mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI: keep one test's store out of the next."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """A run directory whose pipeline was logged while MLflow was unreachable, and the tracker's messages."""
    run_dir = tmp_path_factory.mktemp("offline") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the buffer is under test here, not MLflow's retries
        msgs = offline_run(run_dir, mp)
    return run_dir, msgs


def copy_of(offline, tmp_path):
    import shutil

    shutil.copytree(offline[0], tmp_path / "run")
    return tmp_path / "run"


def offline_run(run_dir, monkeypatch) -> list[str]:
    """One pipeline with two stages logged while nothing answers at the tracking URI; returns the messages."""
    from tests.pipelines.test_bad_input import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    msgs: list[str] = []
    (run_dir / "out.txt").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "out.txt").write_text("v1")
    t = MlflowTracker(run_dir, log=msgs.append)
    assert not t.online and t.experiment_id is None
    with t.pipeline("full", tags={"preset": "smoke"}) as parent:
        for name in ("features", "experts"):
            with t.stage(name, Cfg()) as ref:
                assert ref.startswith("local-") and t.run_id == ref
                t.metrics({f"{name}_n": 24, "skipped": float("nan")}, step=1)
                t.artifact(run_dir / "out.txt")
        t.metrics({"total_s": 1.5})
    assert parent.startswith("local-")
    (run_dir / "out.txt").write_text("v2, changed after logging")
    return msgs


def runs_by_name(run_dir) -> dict[str, object]:
    client = MlflowClient(f"sqlite:///{run_dir.parent / 'mlflow.db'}")  # the store shared by the run directories there
    exp = client.get_experiment_by_name("weightgen")
    return client, {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_offline_run_is_buffered_then_replayed_once(offline, tmp_path):
    run_dir, msgs = copy_of(offline, tmp_path), list(offline[1])
    assert sum("is unreachable" in m for m in msgs) == 1, "say it once"
    assert any("still unreachable" in m and "orchestrator.tracking replay" in m for m in msgs)
    ops = [r["op"] for r in PendingLog(RunDir(run_dir).mlflow_pending).records()]
    assert ops == ["start", "start", "params", "artifact", "metrics", "artifact", "end",
                   "start", "params", "artifact", "metrics", "artifact", "end", "metrics", "end"]

    # MLflow is back (here: the run directory's own SQLite store): the next tracker sends everything first
    msgs.clear()
    t = MlflowTracker(run_dir, log=msgs.append)
    assert t.online and any("sent 15 buffered records" in m for m in msgs), msgs
    assert not PendingLog(RunDir(run_dir).mlflow_pending).path.exists()
    client, runs = runs_by_name(run_dir)
    assert set(runs) == {"full", "features", "experts"}
    for name in ("features", "experts"):
        r = runs[name]
        assert r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == runs["full"].info.run_id
        assert r.data.metrics == {f"{name}_n": 24.0} and r.data.params == {"steps": "3", "name": "x"}
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert arts == {"config.json", "out.txt"}
        got = client.download_artifacts(r.info.run_id, "out.txt", str(tmp_path / name))
        assert open(got).read() == "v1", "the file as it was when logged"
    assert runs["full"].data.metrics == {"total_s": 1.5} and runs["full"].data.tags["preset"] == "smoke"
    assert tracking.main(["replay", str(run_dir)]) == 0  # nothing left: a no-op


def test_replay_cut_short_twice_creates_nothing_twice(offline, tmp_path):
    run_dir = copy_of(offline, tmp_path)
    t = MlflowTracker(tmp_path / "back")  # MLflow back (a SQLite store): nothing pending there at start
    t.pending = PendingLog(RunDir(run_dir).mlflow_pending)  # replay the offline run's buffer into it, by hand

    calls = {"n": 0}

    def flaky(rec, ids):  # the server dies again after four records
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("connection refused")
        return t._replay_one(rec, ids)

    sent, left = t.pending.replay(flaky, tracking.is_outage, print)
    assert (sent, left) == (4, 11)
    assert [r["op"] for r in t.pending.records()][:2] == ["bind", "bind"], "created runs are remembered"
    # a crash right after a run was created, before the buffer was rewritten: the tag finds it again
    first_start = next(r for r in t.pending.records() if r["op"] == "start")
    t._replay_one(first_start, {})
    assert t.flush()
    client, runs = runs_by_name(tmp_path / "back")
    exp = client.get_experiment_by_name("weightgen")
    assert len(client.search_runs([exp.experiment_id])) == 3 == len(runs), "no run created twice"
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["experts"].data.metrics == {"experts_n": 24.0}


def test_a_record_the_server_refuses_is_set_aside_not_dropped(offline, tmp_path):
    run_dir = copy_of(offline, tmp_path)
    records = PendingLog(RunDir(run_dir).mlflow_pending).records()
    assert records[2]["op"] == "params"  # the same param again with another value: MLflow refuses that change
    records.insert(3, {**records[2], "params": {"steps": "999"}})
    PendingLog(RunDir(run_dir).mlflow_pending).path.write_text("".join(json.dumps(r) + "\n" for r in records))
    msgs: list[str] = []
    MlflowTracker(run_dir, log=msgs.append)
    assert any("refused a buffered params record" in m for m in msgs), msgs
    rejected = PendingLog(RunDir(run_dir).mlflow_pending).records_rejected()
    assert len(rejected) == 1 and rejected[0]["params"] == {"steps": "999"} and "error" in rejected[0]
    assert not PendingLog(RunDir(run_dir).mlflow_pending).path.exists(), "everything else was sent"
    _, runs = runs_by_name(run_dir)
    assert runs["features"].data.params["steps"] == "3" and runs["experts"].info.status == "FINISHED"


def test_both_trackers_satisfy_the_protocol(tmp_path):
    assert isinstance(NoopTracker(), Tracker)
    assert isinstance(MlflowTracker(tmp_path / "run"), Tracker)


def test_noop_tracker_records_nothing(tmp_path):
    (tmp_path / "out.txt").write_text("x")
    t = NoopTracker()
    with t.pipeline("full") as parent:
        with t.stage("features", Cfg()) as ref:
            assert parent is None and ref is None and t.run_id is None
            t.metrics({"n": 1.0}, step=1)
            t.artifact(tmp_path / "out.txt")
        t.copy_artifacts("some-run", [tmp_path / "out.txt"])
    assert t.flush() and t.experiment_id is None and "nothing is tracked" in t.ui_command()
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"], "no store, no buffer"


def test_copy_artifacts_reaches_an_earlier_run(tmp_path):
    """A resumed sweep copies its results to the parent run that started it, not only to its own."""
    run_dir = tmp_path / "run"
    t = MlflowTracker(run_dir)
    with t.pipeline("first") as first:
        pass
    (tmp_path / "results.csv").write_text("a,b\n")
    with t.pipeline("second") as second:
        t.copy_artifacts(first, [tmp_path / "results.csv"])
    client, _ = runs_by_name(run_dir)
    assert {a.path for a in client.list_artifacts(first)} == {"results.csv"}
    assert client.list_artifacts(second) == []


def test_a_garbage_line_in_the_buffer_is_set_aside_and_the_rest_is_sent(offline, tmp_path):
    """A damaged records.jsonl (a line of garbage in the middle) blocked every later run in the directory."""
    run_dir = copy_of(offline, tmp_path)
    pending = PendingLog(RunDir(run_dir).mlflow_pending)
    lines = pending.path.read_text().splitlines()
    pending.path.write_text("\n".join(lines[:3] + ["{garbage", "[1, 2]"] + lines[3:]) + "\n")
    msgs: list[str] = []
    MlflowTracker(run_dir, log=msgs.append)
    assert any("2 unreadable line(s)" in m for m in msgs), msgs
    assert [r["line"] for r in pending.records_rejected()] == ["{garbage", "[1, 2]"]
    assert not pending.path.exists(), "every readable record was sent"
    _, runs = runs_by_name(run_dir)
    assert set(runs) == {"full", "features", "experts"}
