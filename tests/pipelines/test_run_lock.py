"""One writer per run directory: concurrent invocations are refused (or wait), never mixed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.storage.runlock import HOLDER_FILE, RunDirBusy, RunLock
from orchestrator.storage.store import WeightStore
from tests.conftest import ROOT, run_cli


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_holder(run: Path, proc: subprocess.Popen, timeout: float = 120) -> dict:
    """The lock record of `proc` once it holds the run directory."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            holder = json.loads((run / HOLDER_FILE).read_text())
            if holder["pid"] == proc.pid:
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{proc.args} never took the lock: {proc.communicate()[1][-2000:]}")


def test_lock_names_its_holder_and_a_dead_holders_record_is_taken_over(tmp_path):
    said: list[str] = []
    with RunLock(tmp_path, "python -m pipelines.full", log=said.append):
        with pytest.raises(RunDirBusy) as e:
            RunLock(tmp_path, "python -m pipelines.experts").acquire()
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and "python -m pipelines.full" in msg and "--wait" in msg
    assert not (tmp_path / HOLDER_FILE).exists()
    (tmp_path / HOLDER_FILE).write_text(json.dumps({"pid": 999999, "host": "h", "command": "c", "started": "t"}))
    with RunLock(tmp_path, "again", log=said.append):
        pass
    assert any("pid 999999" in m and "taking over" in m for m in said), said


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh run directory", "existing run directory"])
def test_same_config_twice_at_once_second_is_refused_then_waits(smoke_run_dir, run_dir_with_features, tmp_path, fresh):
    """Same command twice on one directory: the second stops naming the first; with --wait it runs after it."""
    run = tmp_path / "fresh" if fresh else run_dir_with_features
    if fresh:
        shutil.copytree(smoke_run_dir / "cache", run / "cache")  # encoders' cache only: features are built
    cmd = ("pipelines.features", "--preset", "smoke", "--run-dir", str(run), "--no-progress")
    first = start(*cmd)
    holder = wait_for_holder(run, first)
    second = run_cli(*cmd)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert f"is in use by pid {holder['pid']}" in second.stderr and "pipelines.features" in second.stderr
    waiting = start(*cmd, "--wait")
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    out, err = waiting.communicate(timeout=600)
    assert waiting.returncode == 0, err[-2000:]
    assert "waiting for it (--wait)" in err or "reusing" in err
    assert json.loads((run / "features" / "info.json").read_text())["n_tasks"] == 24


@pytest.mark.ray
@pytest.mark.slow
def test_two_farms_with_different_configs_never_mix_their_experts(run_dir_with_features):
    """The case that once left 48 experts under two config hashes in one store: now one farm runs, the other is
    refused while it runs and refused by the store afterwards; every read returns one config's experts."""
    run = run_dir_with_features
    cmd = ("pipelines.experts", "--preset", "smoke", "--run-dir", str(run), "--no-progress")
    first = start(*cmd)
    wait_for_holder(run, first)
    other = run_cli(*cmd, "--set", "steps=31")
    assert other.returncode == 2 and "is in use by pid" in other.stderr, other.stderr[-2000:]
    assert first.wait(timeout=900) == 0, first.stderr.read()[-2000:]
    later = run_cli(*cmd, "--set", "steps=31")
    assert later.returncode == 2 and "another config" in later.stderr and "Traceback" not in later.stderr, later.stderr[-2000:]
    meta = WeightStore(run / "store" / "weights").read_meta()
    assert len(meta) == 24 and meta["config_hash"].nunique() == 1
