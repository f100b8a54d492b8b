"""Test helpers: a multi-node Ray cluster on loopback, and the farm's expected store computed without Ray.

The cluster is Ray's own `ray.cluster_utils.Cluster`: a head plus worker nodes, each a real raylet
with its own object store, on this machine's node IP (with node_ip_address=127.0.0.1 Ray 2.60 hangs:
ray.init rewrites a loopback GCS address to the node IP). It lives in a private RAY_TMPDIR so that
its address file never makes another process's plain `ray.init()` join it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

FAST_FAILURE_DETECTION = {  # notice a killed node in ~2 s instead of ~30 s
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 4,
}


@contextlib.contextmanager
def loopback_cluster(workers: int, cpus_per_worker: int = 1, head_cpus: int = 0) -> Iterator:
    """A connected `Cluster` with `workers` extra nodes; head_cpus=0 keeps actors off the head."""
    import ray
    from ray.cluster_utils import Cluster

    old = os.environ.get("RAY_TMPDIR")
    tmp = tempfile.mkdtemp(prefix="rwg-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    os.environ["RAY_TMPDIR"] = tmp
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=head_cpus, include_dashboard=False,
            object_store_memory=150 * 2**20, _system_config=FAST_FAILURE_DETECTION,
        ))
        for _ in range(workers):
            cluster.add_node(num_cpus=cpus_per_worker, object_store_memory=150 * 2**20)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="weightgen", logging_level="WARNING")
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old


def reference_weights(feats, cfg) -> dict[tuple[str, int], np.ndarray]:
    """(task_id, seed) -> final weights, every shard trained in this process, one torch thread, no Ray:
    what an uninterrupted single-node farm with the same seeds stores."""
    import torch

    from orchestrator.farm import config_hash, plan_shards, train_shard

    n = torch.get_num_threads()
    torch.set_num_threads(cfg.cpus_per_actor)  # as a farm actor does
    try:
        out = {}
        for shard in plan_shards(feats.tasks, cfg, config_hash(cfg, feats.info.get("config_hash", ""))):
            got = train_shard(feats, shard, cfg)
            for m, w in zip(got["meta"], got["w"]):
                if m["final"]:
                    out[(m["task_id"], int(m["seed"]))] = w
        return out
    finally:
        torch.set_num_threads(n)


def assert_store_matches(store, expected: dict[tuple[str, int], np.ndarray]) -> None:
    """Every expected expert exactly once, checksums valid (read() verifies them), weights bit-identical."""
    got = store.read()
    keys = [(t, int(s)) for t, s in zip(got.meta["task_id"], got.meta["seed"])]
    assert len(keys) == len(set(keys)), "an expert is stored twice"
    assert sorted(keys) == sorted(expected), "experts missing or extra"
    for k, w in zip(keys, got.w.numpy()):
        assert np.array_equal(w, expected[k]), f"expert {k} differs from the uninterrupted run"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    import sys

    return str(Path(sys.executable).with_name("ray"))


def _processes_under(marker: str) -> list[int]:
    """Pids whose command line mentions `marker` (a private temp dir), and all their descendants."""
    kids: dict[int, list[int]] = {}
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
            ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(p))
        if marker in cmd:
            found.append(int(p))
    out, todo = [], list(found)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo += kids.get(pid, [])
    return out


def stop_processes_under(marker: str, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL, the processes a test started with `marker` (its private temp dir) in their
    command line: never `ray stop`, which would stop every Ray on the machine."""
    import signal
    import time

    pids = _processes_under(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline and any(os.path.exists(f"/proc/{p}") and _alive(p) for p in pids):
            time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def alive_nodes(address: str, env: dict) -> int:
    """How many nodes `ray status` lists as active for the cluster at `address` (0 if it does not answer)."""
    import re
    import subprocess

    r = subprocess.run([_ray_cli(), "status", "--address", address], env=env, capture_output=True, text=True, timeout=120,
                       check=False)
    if r.returncode != 0 or "Active:" not in r.stdout:
        return 0
    active = r.stdout.split("Active:", 1)[1].split("Pending:", 1)[0]
    return len(re.findall(r"\bnode_[0-9a-f]+", active))


@contextlib.contextmanager
def ray_start_cluster(workers: int = 1, cpus: int = 1, auth: str = "token") -> Iterator[tuple[str, dict]]:
    """A cluster started the way a user starts one, `ray start --head` plus `ray start --address` per extra
    node, all in a private temp dir (RAY_TMPDIR) that no other test or engineer's Ray shares, with
    RAY_AUTH_MODE=`auth`. Yields (head address, the environment a shell on this machine would have:
    RAY_TMPDIR pointing there, no RAY_ADDRESS, no RAY_AUTH_MODE)."""
    import subprocess
    import time

    tmp = tempfile.mkdtemp(prefix="rwj-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(RAY_TMPDIR=tmp)
    cli_env = {**env, "RAY_AUTH_MODE": auth}  # docs/cluster.md: ray start needs it explicitly
    port = free_port()
    try:
        head = subprocess.run([_ray_cli(), "start", "--head", f"--port={port}", f"--num-cpus={cpus}", "--include-dashboard=false",
                               "--disable-usage-stats"], env=cli_env, capture_output=True, text=True, timeout=300)
        assert head.returncode == 0, f"ray start --head failed:\n{head.stdout[-2000:]}\n{head.stderr[-3000:]}"
        address = Path(tmp, "ray", "ray_current_cluster").read_text().strip()
        for _ in range(workers):
            subprocess.run([_ray_cli(), "start", f"--address={address}", f"--num-cpus={cpus}", "--disable-usage-stats"],
                           env=cli_env, check=True, capture_output=True, timeout=300)
        deadline = time.time() + 120
        while alive_nodes(address, cli_env) < workers + 1:
            assert time.time() < deadline, "the ray start nodes did not all register"
            time.sleep(2)
        yield address, env
    finally:
        stop_processes_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
