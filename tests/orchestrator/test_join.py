"""A user's machine where `ray start` already runs a cluster: a run with no address joins it on purpose
(with the settings joining needs, never a private Ray's), its farm actors work on both nodes, and the
cluster keeps running afterwards."""
from __future__ import annotations

import re
import shutil

import pytest

from tests.conftest import run_cli
from tests.orchestrator.multinode import alive_nodes, ray_start_cluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_no_address_joins_the_ray_start_cluster_and_uses_both_nodes(smoke_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run_dir / "features", run / "features")
    with ray_start_cluster(workers=1, cpus=1) as (address, env):
        # what a user's shell has: RAY_TMPDIR (where `ray start` recorded its cluster); no RAY_ADDRESS, no RAY_AUTH_MODE
        r = run_cli("pipelines.experts", "--preset", "smoke", "--run-dir", str(run), "--no-progress",
                    "--set", "shard_size=2", "--set", "steps=300", "--set", "num_actors=2", env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-4000:]
        assert f"Ray: joined the Ray cluster running on this machine at {address}" in r.stderr, r.stderr[:2000]
        assert "2 node(s), 2 CPUs, 0 GPUs" in r.stderr
        assert "private Ray" not in r.stderr
        per_node = re.search(r"farm: experts per node: (.*?)(;|$)", r.stderr, re.MULTILINE).group(1)
        counts = [int(n) for n in re.findall(r"\) (\d+)", per_node)]
        assert len(counts) == 2 and sum(counts) == 24, f"both nodes train: {per_node}"
        # not started here, so not stopped here: the user's cluster is still up with both nodes
        assert alive_nodes(address, {**env, "RAY_AUTH_MODE": "token"}) == 2
        assert "Traceback" not in r.stderr


def test_a_cluster_started_without_tokens_is_joined_too_and_local_still_forces_a_private_ray(smoke_run_dir, tmp_path):
    """The journey that failed: `ray start --head` without token authentication, ~/.ray/auth_token on the
    machine (a private Ray made it), no address: Ray's own rule sent the token anyway and every farm actor
    was 'cancelled before it started'. The run now uses the cluster's own mode."""
    with ray_start_cluster(workers=0, cpus=2, auth="disabled") as (address, env):
        run = tmp_path / "run"
        shutil.copytree(smoke_run_dir / "features", run / "features")
        r = run_cli("pipelines.experts", "--preset", "smoke", "--run-dir", str(run), "--no-progress", env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        assert f"Ray: joined the Ray cluster running on this machine at {address}" in r.stderr
        assert "cancelled" not in r.stderr and "Traceback" not in r.stderr

        private = tmp_path / "private"
        shutil.copytree(smoke_run_dir / "features", private / "features")
        r = run_cli("pipelines.experts", "--preset", "smoke", "--run-dir", str(private), "--no-progress",
                    "--address", "local", env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        assert "Ray: started a private Ray at 127.0.0.1:" in r.stderr and address not in r.stderr
        assert alive_nodes(address, env) == 1  # the user's cluster is untouched
