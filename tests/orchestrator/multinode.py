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
